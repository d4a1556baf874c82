"""The paper's claims as small studies: each is a set of arms trained alike on the embedded corpus.

Every arm is a `pyramoe train` run (a preset plus model overrides) with the study's budget and each
seed; arms within a study see the same data, tokenizer and number of tokens. The tiny models
(4 blocks, width 256) stand in for the paper's 24-block GPTs, so these test directions, not sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arm:
    name: str
    preset: str
    model: dict[str, Any] = field(default_factory=dict)  # `model.*` overrides, as with --set
    distill: dict[str, Any] | None = None  # `distill.*` settings: a student of the study's teacher


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    paper_finding: str
    arms: tuple[Arm, ...]
    # The paper's direction: the arm expected to reach the lower validation loss, and the other.
    expected_better: str
    expected_worse: str
    seeds: tuple[int, ...] = (1, 2)
    steps: int = 120
    compare: str = "val_loss"  # what decides the direction
    notes: str = ""
    teacher: Arm | None = None  # trained once (first seed, teacher_steps) for the distill arms
    teacher_steps: int = 0


_EVERY_OTHER_8 = {"moe_placement": "every_other", "num_experts": 8}

STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        Study(
            name="moe-vs-dense",
            title="MoE vs dense with the same active parameters",
            paper_finding=(
                "1.3B+MoE-128 reaches a clearly lower validation loss than the 1.3B dense base at the "
                "same training compute (on par with the 6.7B dense model)."
            ),
            arms=(Arm("dense", "tiny-dense"), Arm("moe-8", "tiny-moe")),
            expected_better="moe-8",
            expected_worse="dense",
        ),
        Study(
            name="half-moe",
            title="First-Half-MoE vs Second-Half-MoE",
            paper_finding=(
                "Second-Half-MoE (MoE in the deeper half) reaches a lower validation loss than First-Half-MoE."
            ),
            arms=(
                Arm("first-half", "tiny-moe", {"moe_placement": "first_half", "num_experts": 8}),
                Arm("second-half", "tiny-moe", {"moe_placement": "second_half", "num_experts": 8}),
            ),
            expected_better="second-half",
            expected_worse="first-half",
        ),
        Study(
            name="top2-vs-residual",
            title="Top-2 MoE vs Residual-MoE (top-1 + a fixed MLP)",
            paper_finding=(
                "Residual-MoE matches Top2-MoE's validation loss and is more than 10% faster, "
                "because it sends each token to one expert instead of two."
            ),
            arms=(
                Arm("top2", "tiny-moe-top2"),
                Arm("residual", "tiny-moe", {"moe": {"use_residual": True}}),
            ),
            expected_better="residual",
            expected_worse="top2",
            compare="step_time",
            notes="Direction judged on step time; quality is expected on par (difference within spread).",
        ),
        Study(
            name="prmoe-vs-moe",
            title="PR-MoE vs standard MoE: parameters vs validation loss",
            paper_finding=(
                "PR-MoE (fewer experts in shallow layers + Residual-MoE) reaches about the quality of "
                "standard MoE with far fewer parameters (350M: 4B vs 13B)."
            ),
            arms=(
                Arm("moe-8-8", "tiny-moe", _EVERY_OTHER_8),
                Arm("prmoe-4-8", "tiny-prmoe"),
            ),
            expected_better="prmoe-4-8",
            expected_worse="moe-8-8",
            compare="loss_per_param",
            notes=(
                "Direction holds when PR-MoE's validation loss is within the seed spread (or better) "
                "of standard MoE's while using fewer parameters."
            ),
        ),
        Study(
            name="mos",
            title="Mixture-of-Students: no KD vs full KD vs staged KD",
            paper_finding=(
                "A PR-MoE student with 12.5% fewer layers trained with KD all the way ends up worse than "
                "without KD late in training; stopping KD early (staged KD) lets it match the teacher "
                "(99.1-99.5% of the teacher's zero-shot accuracy)."
            ),
            teacher=Arm("teacher", "tiny-prmoe"),
            teacher_steps=240,
            arms=(
                Arm("no-kd", "tiny-prmoe", distill={"kd_weight": 0.0}),
                Arm("full-kd", "tiny-prmoe", distill={"kd_schedule": "constant"}),
                Arm("staged-kd", "tiny-prmoe", distill={"kd_schedule": "stop", "kd_stop_step": 60}),
            ),
            expected_better="staged-kd",
            expected_worse="full-kd",
            notes=(
                "Students are tiny-prmoe minus one of its 4 blocks (3 blocks: 25% fewer at this depth), "
                "initialised from the teacher's kept blocks, trained 120 steps with KD weight 1 and "
                "temperature 1; staged KD stops at step 60. The teacher trained 240 steps."
            ),
        ),
    )
}


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"study: unknown study {name!r}; choose from {', '.join(STUDIES)}")
    return STUDIES[name]
