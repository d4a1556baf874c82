"""`custom_dataset` functions of the local task configs (pyramoe/evaluation/tasks/*.yaml).

The harness calls them with the task's metadata and the run's model_args as keyword arguments, which
they ignore: the records come from the default corpus's validation split, built on first use into
the pyramoe cache (`pyramoe eval --build-tasks` builds them ahead).
"""

from __future__ import annotations

from typing import Any

from pyramoe.evaluation.taskdata import read_task


def _dataset(task: str):
    import datasets  # a dependency of lm-eval, which is what calls these

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_task(task))})


def cloze(**_: Any):
    return _dataset("pyramoe_stdlib_cloze")


def nextline(**_: Any):
    return _dataset("pyramoe_stdlib_nextline")


def docsig(**_: Any):
    return _dataset("pyramoe_stdlib_docsig")


def ppl(**_: Any):
    return _dataset("pyramoe_stdlib_ppl")
