"""Small-scale reproductions of the DeepSpeed-MoE paper's claims (`pyramoe experiments`)."""

from pyramoe.experiments.report import render_results
from pyramoe.experiments.runner import run_study
from pyramoe.experiments.studies import STUDIES, Study, get_study

__all__ = ["STUDIES", "Study", "get_study", "render_results", "run_study"]
