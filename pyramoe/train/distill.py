"""Mixture-of-Students training: a frozen teacher checkpoint, a shallower student, and the trainer's
loop with a loss hook that adds the staged KD term (pyramoe/train/kd.py).

The student is either derived from the teacher (its blocks minus evenly spaced middle ones,
pyramoe/models/student.py; its weights copied from the teacher's unless distill.init_from_teacher is
false) or any preset with model overrides (`model.preset`; then only same-shaped tensors are copied).
Teacher and student share the teacher's tokenizer, and by default its data and training settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

import pyramoe.train.checkpoint as ckpt_io
from pyramoe.config import ModelConfig
from pyramoe.data import PreparedData
from pyramoe.models import GPT
from pyramoe.models.student import LayerMap, default_layer_map, init_student_from_teacher, student_config
from pyramoe.train.config import LAYOUT_KEYS, RunConfig, build_model_config, merge
from pyramoe.train.evaluate import EvalResult, autocast, evaluate
from pyramoe.train.kd import DistillConfig, kd_loss, kd_weight_at
from pyramoe.train.run_lock import lock_run_dir
from pyramoe.train.session import LATEST, load_data, prepare_run, resolve_run, resumed_model_config, write_run_config
from pyramoe.train.trainer import LossFn, Trainer, cross_entropy_loss

# Teacher training settings a student does not inherit: where the teacher's run lives, and the
# machine-specific thread count (the tokenizer always comes from the teacher checkpoint).
_NOT_INHERITED = ("run_dir", "tokenizer", "threads")


def distill_loss(teacher: GPT, config: DistillConfig, kd_weight: float, precision: str) -> LossFn:
    """The loss hook: ce_weight·CE + kd_weight·KD. With kd_weight 0 the teacher does not run."""

    def loss_fn(out, x, y):
        ce, terms = cross_entropy_loss(out, x, y)
        if kd_weight == 0:
            return config.ce_weight * ce, terms
        # no_grad rather than inference_mode: the KL's backward saves the teacher's probabilities, and
        # autograd refuses to save inference tensors (a copy of [B, T, V] logits would be needed).
        with torch.no_grad(), autocast(precision):
            teacher_logits = teacher(x).logits
        kd = kd_loss(out.logits, teacher_logits, config.temperature)
        return config.ce_weight * ce + kd_weight * kd, {**terms, "kd": kd.detach()}

    return loss_fn


class DistillTrainer(Trainer):
    """A Trainer whose objective adds KD to a frozen teacher; checkpoints carry the [distill] settings."""

    def __init__(self, run: RunConfig, model_config: ModelConfig, data: PreparedData, teacher: GPT,
                 progress: bool = True):
        if run.distill is None:
            raise ValueError("a distillation run needs [distill] settings")
        super().__init__(run, model_config, data, progress)
        self.distill: DistillConfig = run.distill
        # eval(): no dropout, eval capacity; frozen: no gradients, and never in the optimizer.
        self.teacher = teacher.eval().requires_grad_(False)
        self.initialised: list[str] = []  # student tensors copied from the teacher
        self.layer_map: LayerMap = []  # a derived student's teacher block per block (new runs only)

    def step_objective(self, step: int) -> tuple[LossFn, dict[str, float | None]]:
        weight = kd_weight_at(step, self.distill)
        settings: dict[str, float | None] = {"kd_weight": weight}
        if weight == 0:
            settings["kd"] = None  # the teacher no longer runs; keeps every record's keys the same
        return distill_loss(self.teacher, self.distill, weight, self.config.precision), settings

    def init_from_teacher(self, layer_map: LayerMap, strict: bool) -> list[str]:
        self.initialised = init_student_from_teacher(self.model, self.teacher, layer_map, strict)
        return self.initialised

    def evaluate_teacher(self) -> EvalResult:
        """The teacher's validation loss on the batches the student is evaluated on: the bar to reach."""
        cfg = self.config
        result = evaluate(self.teacher, self.val_data, cfg.batch_size, cfg.seq_len, cfg.eval_batches, cfg.precision)
        self.metrics.write({"type": "teacher_eval", "step": self.step, **result.to_record()})
        return result


@dataclass
class DistillSetup:
    run: RunConfig
    teacher: ckpt_io.Checkpoint
    ckpt: ckpt_io.Checkpoint | None = None  # the student's own, when resuming
    derived: bool = True  # a new run's student is the teacher minus some blocks (False: a preset)


def resolve_distill_run(sources: list[dict[str, Any]], resume: str | None = None) -> DistillSetup:
    """The run's settings, its teacher and, when resuming, the student's checkpoint.

    A new run starts from the teacher's training settings (same corpus, tokenizer, validation split
    and recipe, minus _NOT_INHERITED); `sources` override them. Without `model.preset` the student
    is derived from the teacher. Resuming keeps the checkpoint's settings, as `pyramoe train` does.
    """
    merged: dict[str, Any] = {}
    for source in sources:
        merged = merge(merged, source)
    teacher_spec, student_preset = _table(merged, "distill").get("teacher"), _table(merged, "model").get("preset")
    if teacher_spec is not None and not isinstance(teacher_spec, str):
        raise ValueError(f"distill.teacher: expected a checkpoint path, got {teacher_spec!r}")
    if resume is not None:
        return _resolve_resumed(sources, merged, resume, teacher_spec, student_preset)
    if not teacher_spec:
        raise ValueError("--teacher: required (the teacher's checkpoint or run directory)")
    teacher = _load_teacher(teacher_spec)
    _check_student_settings(merged, teacher, derived=student_preset is None)
    inherited = {k: v for k, v in teacher.state["run_config"]["train"].items() if k not in _NOT_INHERITED}
    inherited["run_dir"] = default_run_dir(teacher, student_preset)
    base = {"train": inherited, "model": {"preset": student_preset or _preset_of(teacher)}, "distill": {}}
    run, _ = resolve_run([base, *sources])
    return _pinned(DistillSetup(run, teacher, derived=student_preset is None))


def _table(merged: dict[str, Any], section: str) -> dict[str, Any]:
    """A section of the merged settings; anything but a table is reported later, by run_config_from_dict."""
    value = merged.get(section, {})
    return value if isinstance(value, dict) else {}


def _resolve_resumed(
    sources: list[dict[str, Any]], merged: dict[str, Any], resume: str, teacher_spec: str | None,
    student_preset: str | None,
) -> DistillSetup:
    if resume == LATEST and "run_dir" not in _table(merged, "train"):
        if not teacher_spec and not student_preset:
            raise ValueError("--resume: pass --run-dir DIR or --resume CKPT (or the --teacher of the run)")
        teacher = _load_teacher(teacher_spec) if teacher_spec else None
        sources = [{"train": {"run_dir": default_run_dir(teacher, student_preset)}}, *sources]
    run, ckpt = resolve_run([{"distill": {}}, *sources], resume)
    assert ckpt is not None
    if "distill" not in ckpt.state["run_config"]:
        raise ValueError(f"{ckpt.path}: not a distillation run (continue it with `pyramoe train --resume`)")
    assert run.distill is not None
    return _pinned(DistillSetup(run, _load_teacher(run.distill.teacher), ckpt))


def _pinned(setup: DistillSetup) -> DistillSetup:
    """Teacher and KD stop step made explicit in the saved settings, so that a resumed run uses the very
    checkpoint (not a run directory's latest) and stop step (even with more --steps) it started with."""
    run = setup.run
    assert run.distill is not None
    distill = dataclasses.replace(run.distill, teacher=str(setup.teacher.path.resolve()))
    run.distill = distill.with_stop_step(run.train.steps) if setup.ckpt is None else distill
    return setup


def _load_teacher(spec: str | None) -> ckpt_io.Checkpoint:
    if not spec:
        raise ValueError("distill.teacher: the run records no teacher; pass --teacher CKPT")
    try:
        return ckpt_io.load_checkpoint(spec)
    except ValueError as exc:
        raise ValueError(f"distill.teacher: {exc}") from None


def _preset_of(teacher: ckpt_io.Checkpoint) -> str:
    return str(teacher.state["run_config"].get("model", {}).get("preset", "teacher"))


def default_run_dir(teacher: ckpt_io.Checkpoint | None, student_preset: str | None) -> str:
    """runs/TEACHER_PRESET-mos for a derived student, runs/STUDENT_PRESET-distilled for a preset one."""
    if student_preset:
        return f"runs/{student_preset}-distilled"
    assert teacher is not None
    return f"runs/{_preset_of(teacher)}-mos"


def _check_student_settings(merged: dict[str, Any], teacher: ckpt_io.Checkpoint, derived: bool) -> None:
    """Settings that contradict sharing the teacher's tokenizer, or the kind of student."""
    train, model, distill = _table(merged, "train"), _table(merged, "model"), _table(merged, "distill")
    if train.get("tokenizer") is not None:
        raise ValueError(f"train.tokenizer: a student uses its teacher's tokenizer ({teacher.tokenizer_path})")
    teacher_vocab = teacher.model_config().vocab_size
    if "vocab_size" in train and train["vocab_size"] != teacher_vocab:
        raise ValueError(f"train.vocab_size: {train['vocab_size']} differs from the teacher's vocabulary "
                         f"({teacher_vocab}); a student shares its teacher's tokenizer")
    layout = [key for key in LAYOUT_KEYS if key in model]
    if derived and layout:
        raise ValueError(f"model.{layout[0]}: a student derived from the teacher keeps its layout; set "
                         "distill.student_layers, or pass --student PRESET for another one")
    if not derived and distill.get("student_layers") is not None:
        raise ValueError("distill.student_layers: only for a student derived from the teacher (not --student PRESET)")


def create_distill_trainer(setup: DistillSetup, progress: bool = True) -> DistillTrainer:
    """Data (the teacher's tokenizer), teacher, student and optimizer; restored when resuming."""
    run = setup.run
    assert run.distill is not None
    lock = lock_run_dir(run.run_dir)
    try:
        trainer = _build_distill_trainer(setup, progress)
    except BaseException:
        lock.abandon()
        raise
    trainer.run_lock = lock
    return trainer


def _build_distill_trainer(setup: DistillSetup, progress: bool) -> DistillTrainer:
    run, ckpt, teacher_ckpt = setup.run, setup.ckpt, setup.teacher
    prepare_run(run, ckpt)
    teacher_config = teacher_ckpt.model_config()
    data = load_data(run, ckpt or teacher_ckpt, progress)
    _check_shared_tokenizer(teacher_ckpt, teacher_config, data)
    if run.train.seq_len > teacher_config.max_seq_len:
        raise ValueError(f"train.seq_len: {run.train.seq_len} exceeds the teacher's max_seq_len="
                         f"{teacher_config.max_seq_len}")
    if ckpt is None:
        model_config, layer_map = _student(setup, teacher_config, data.vocab_size)
    else:
        model_config, layer_map = resumed_model_config(run, ckpt, data.vocab_size), []
    teacher = ckpt_io.build_model(teacher_ckpt)  # before the student: the trainer seeds its init itself
    trainer = DistillTrainer(run, model_config, data, teacher, progress)
    if ckpt is not None:
        trainer.restore(ckpt)
        return trainer
    if setup.derived:
        trainer.layer_map = layer_map
    if run.distill.init_from_teacher:
        trainer.init_from_teacher(layer_map, strict=setup.derived)
    write_run_config(run, trainer)
    return trainer


def _student(setup: DistillSetup, teacher: ModelConfig, vocab_size: int) -> tuple[ModelConfig, LayerMap]:
    """The student's config and which teacher block each of its blocks is initialised from."""
    run = setup.run
    assert run.distill is not None
    if not setup.derived:
        config = build_model_config(run, vocab_size)
        return config, default_layer_map(teacher.n_layers, config.n_layers)
    base, keep = student_config(teacher, run.distill.student_layers, run.distill.layer_fraction)
    return build_model_config(run, vocab_size, base=base), list(keep)


def _check_shared_tokenizer(teacher: ckpt_io.Checkpoint, teacher_config: ModelConfig, data: PreparedData) -> None:
    saved_sha = teacher.state.get("data", {}).get("tokenizer_sha")
    if teacher_config.vocab_size != data.vocab_size or (saved_sha and saved_sha != data.tokenizer.sha):
        raise ValueError(
            f"{teacher.path}: the teacher's vocabulary ({teacher_config.vocab_size} tokens) is not the "
            f"student's tokenizer ({data.vocab_size} tokens); a teacher and its student must share one tokenizer"
        )
