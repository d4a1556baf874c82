"""The paper's claims as small studies: each is a set of arms trained alike on the embedded corpus.

Every arm is a `pyramoe train` run (a preset plus model overrides) with the study's budget and each
seed; arms within a study see the same data, tokenizer and number of tokens, and on each seed the
same initialisation seed and batch order, so their difference per seed is a paired measurement. The
tiny presets stand in for the paper's 24-block GPTs, so these test directions, not sizes.
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
    seeds: tuple[int, ...] = (1, 2, 3)
    steps: int = 300
    # what decides the direction: val_loss, step_time, loss_per_param or inference (decode speed of the
    # expected-better arm against the quality-equivalent dense arm: pyramoe/experiments/inference_study.py)
    compare: str = "val_loss"
    # A str.format template over the summary's "settings" (steps, batch_size, seq_len, precision, ...;
    # distillation studies add teacher_steps, kd_stop_step, teacher_layers, student_layers, ...).
    notes: str = ""
    teacher: Arm | None = None  # trained once (first seed, teacher_steps) for the distill arms
    teacher_steps: int = 0
    speedup_threshold: float = 1.10  # step_time: the claim's "more than 10% faster"
    timing_rounds: int = 10  # interleaved step-time rounds per arm
    zeroshot: bool = False  # score every run's final checkpoint on the local accuracy tasks (runner.add_zeroshot)


_EVERY_OTHER_8 = {"moe_placement": "every_other", "num_experts": 8}

STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        Study(
            name="moe-vs-dense",
            zeroshot=True,
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
            zeroshot=True,
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
            zeroshot=True,
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
            notes=(
                "Direction judged on the step-time speedup of one interleaved timing run ({batch_size}x{seq_len} "
                "tokens, {precision}) against the claim's 1.10x, with the validation loss required not to be worse."
            ),
        ),
        Study(
            name="prmoe-vs-moe",
            zeroshot=True,
            title="PR-MoE vs standard MoE: parameters vs validation loss",
            paper_finding=(
                "PR-MoE (fewer experts in shallow layers + Residual-MoE) reaches about the quality of "
                "standard MoE with far fewer parameters (350M: 4B vs 13B)."
            ),
            arms=(
                Arm("moe-8-8", "tiny-moe", _EVERY_OTHER_8),  # the same run as moe-vs-dense's moe-8 (reused)
                Arm("prmoe-4-8", "tiny-prmoe"),
            ),
            expected_better="prmoe-4-8",
            expected_worse="moe-8-8",
            compare="loss_per_param",
            notes=(
                "Direction holds when PR-MoE has fewer parameters and its validation loss is lower on every "
                "seed beyond the spread, or on par (every paired difference within 0.02)."
            ),
        ),
        Study(
            name="mos",
            zeroshot=True,
            title="Mixture-of-Students: no KD vs full KD vs staged KD",
            paper_finding=(
                "A PR-MoE student with 12.5% fewer layers trained with KD all the way ends up worse than "
                "without KD late in training; stopping KD early (staged KD) lets it match the teacher "
                "(99.1-99.5% of the teacher's zero-shot accuracy)."
            ),
            teacher=Arm("teacher", "tiny-prmoe"),
            steps=200,
            teacher_steps=400,
            arms=(
                Arm("no-kd", "tiny-prmoe", distill={"kd_weight": 0.0}),
                Arm("full-kd", "tiny-prmoe", distill={"kd_schedule": "constant"}),
                Arm("staged-kd", "tiny-prmoe", distill={"kd_schedule": "stop", "kd_stop_fraction": 0.5}),
            ),
            expected_better="staged-kd",
            expected_worse="full-kd",
            notes=(
                "Students are the teacher ({teacher_preset}, {teacher_layers} blocks) minus {dropped_layers} "
                "block(s), i.e. {student_layers} blocks, initialised from the teacher's kept blocks and trained "
                "{steps} steps with KD weight 1 and temperature 1; staged KD stops at step {kd_stop_step}. The "
                "teacher trained {teacher_steps} steps on the first seed; students train on seed + "
                "{student_seed_offset}, so they do not replay the teacher's batches."
            ),
        ),
        Study(
            name="inference",
            title="Inference: MoE vs the quality-equivalent dense model",
            paper_finding=(
                "At the same quality, MoE inference is faster and cheaper than dense: 1.3B+MoE-128 (52B "
                "parameters) matches the 6.7B dense model's quality, and DeepSpeed-MoE serves such models up to "
                "4.5x faster and 9x cheaper than their quality-equivalent dense models, since a token reads only "
                "its experts' weights."
            ),
            # Dense arms of growing FFN width (same corpus, budget, seeds) from which the quality-equivalent
            # one is picked (pyramoe/experiments/inference_study.py); moe-8 and dense are moe-vs-dense's runs.
            arms=(
                Arm("moe-8", "tiny-moe"),
                Arm("dense", "tiny-dense"),
                Arm("dense-ff1.5x", "tiny-dense", {"d_ff": 1536}),
                Arm("dense-ff2x", "tiny-dense", {"d_ff": 2048}),
                Arm("dense-ff3x", "tiny-dense", {"d_ff": 3072}),
            ),
            expected_better="moe-8",
            expected_worse="dense",
            compare="inference",
            notes=(
                "Arms: moe-8, the dense model with its active parameters, and dense models with a 1.5x, 2x and "
                "3x wider FFN, trained alike ({steps} steps, same corpus and seeds). Why the speeds come out as they "
                "do: a decode step reads the weights it uses (\"MB read/step\", bf16: every weight but the embedding "
                "lookups - the tied table once, as the LM head - and of each MoE layer only the experts the step's "
                "tokens chose, counted in an untimed pass). At batch 1 moe-8 reads one of its 8 experts per MoE "
                "layer: the same-active dense model's bytes, fewer than the wider dense arms'. At batch 16 its "
                "tokens choose most experts (\"experts/step\"), so it reads up to its 2.4x larger weights, while "
                "a dense model reads the same bytes at any batch. So at batch 1 the gap between moe-8's and the "
                "same-active dense model's ms/token is what routing costs (router, top-1 choice, dispatch to the "
                "chosen expert in each of the 2 MoE layers). In the paper the "
                "quality-equivalent dense model has about 5x the MoE's active parameters (6.7B vs 1.3B), so the MoE "
                "reads far less even with extra experts; here moe-8 gains only about 0.02 nats over the "
                "same-active dense model, so its quality-equivalent dense arm is barely larger (1.2x the bytes at "
                "batch 1): at batch 1 the MoE can save at most that, against its routing, and at batch 16 it "
                "reads more than the dense arm. moe-8's "
                "validation loss is measured at its eval capacity factor (2.0); the engine runs it dropless."
            ),
        ),
    )
}


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"study: unknown study {name!r}; choose from {', '.join(STUDIES)}")
    return STUDIES[name]
