"""Where a study's run lives and what it is: every arm x seed resolved to its full settings and keyed by a
hash of them, so that a finished result is reused only for the very settings that produced it.

A run directory is `ROOT/STUDY/ARM-seedN-KEY`, where KEY hashes the resolved settings: the train
settings (steps, seed, batch, LR, ... every `TrainConfig` field except the bookkeeping ones in
`NOT_KEYED`), the model config the preset and overrides build (so one model spelled two ways is one
run), or for a student its [distill] settings and its teacher's own key - each without the settings
at their defaults, so that a field added later at a neutral default keeps the keys. Other settings
land in another directory; a `result.json` whose stored key differs from its directory's is never
read back (but see `runner.same_run_elsewhere`).

Students of a Mixture-of-Students study train on seed + STUDENT_SEED_OFFSET: the seed also orders
the training batches, so a student on its teacher's seed would replay the teacher's batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyramoe.experiments.studies import Arm, Study

# Train settings that do not change what a run computes: where it lives, threads, checkpoint cadence.
NOT_KEYED = ("run_dir", "threads", "save_every", "keep_last")
# Checkpoint every SAVE_EVERY steps (the last one kept), so that an interrupted run resumes near where it stopped.
BOOKKEEPING = {"save_every": 50, "keep_last": 1}
STUDENT_SEED_OFFSET = 1000


@dataclass
class ArmPlan:
    study: str
    arm: Arm
    seed: int  # the study's seed (pairs arms); a student trains on seed + STUDENT_SEED_OFFSET
    sources: list[dict[str, Any]]  # settings for resolve_run / resolve_distill_run
    config: dict[str, Any] = field(default_factory=dict)  # the resolved settings the key hashes
    key: str = ""
    run_dir: Path = Path()

    @property
    def is_student(self) -> bool:
        return self.arm.distill is not None

    @property
    def train_seed(self) -> int:
        return self.seed + STUDENT_SEED_OFFSET if self.is_student else self.seed


def config_key(config: dict[str, Any]) -> str:
    """A short, stable hash of resolved settings (JSON with sorted keys), settings at their defaults
    left out: a setting added to the code later, at a default that changes nothing, keeps old keys."""
    text = json.dumps(canonical(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def canonical(config: dict[str, Any]) -> dict[str, Any]:
    """`config` without the train, distill, model and MoE settings that equal their defaults."""
    from pyramoe.config import ModelConfig, MoEConfig
    from pyramoe.train.config import TrainConfig
    from pyramoe.train.kd import DistillConfig

    def model(m: dict[str, Any]) -> dict[str, Any]:
        pruned = _without_defaults({k: v for k, v in m.items() if k != "layers"}, ModelConfig)
        layers = [{"moe": _without_defaults(layer["moe"], MoEConfig)} if layer.get("moe") else layer
                  for layer in m.get("layers", [])]
        return {**pruned, "layers": layers} if "layers" in m else pruned

    out = dict(config)
    if isinstance(out.get("train"), dict):
        out["train"] = _without_defaults(out["train"], TrainConfig)
    if isinstance(out.get("distill"), dict):
        out["distill"] = _without_defaults(out["distill"], DistillConfig)
    if isinstance(out.get("model_config"), dict):
        out["model_config"] = model(out["model_config"])
    if isinstance(out.get("models"), dict):
        out["models"] = {name: model(m) for name, m in out["models"].items()}
    return out


def _without_defaults(values: dict[str, Any], cls: type) -> dict[str, Any]:
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()

    def same(a: Any, b: Any) -> bool:
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

    return {k: v for k, v in values.items() if not (k in defaults and same(v, defaults[k]))}


def arm_train_settings(plan_seed: int, steps: int, train: dict[str, Any]) -> dict[str, Any]:
    return {**BOOKKEEPING, **train, "steps": steps, "seed": plan_seed}


def distill_settings(arm: Arm, steps: int) -> dict[str, Any]:
    """The arm's [distill] settings; `kd_stop_fraction` becomes kd_stop_step of this run's steps."""
    settings = dict(arm.distill or {})
    fraction = settings.pop("kd_stop_fraction", None)
    if fraction is not None:
        settings["kd_stop_step"] = max(1, round(fraction * steps))
    return settings


def plan_arm(
    study: Study, arm: Arm, seed: int, root: Path, train: dict[str, Any], steps: int,
    teacher: ArmPlan | None = None,
) -> ArmPlan:
    """The arm's settings resolved (defaults included), keyed and placed."""
    plan = ArmPlan(study.name, arm, seed, [])
    settings = arm_train_settings(plan.train_seed, steps, train)
    if plan.is_student:
        if teacher is None:
            raise ValueError(f"{study.name}: arm {arm.name!r} is a student and needs the study's teacher")
        distill = {"teacher": str(teacher.run_dir), **distill_settings(arm, steps)}
        plan.sources = [{"train": settings, "distill": distill}]
        plan.config = _student_config(plan.sources, teacher)
    else:
        plan.sources = [{"train": settings, "model": {"preset": arm.preset, **arm.model}}]
        plan.config = _plain_config(plan.sources)
    plan.key = config_key(plan.config)
    plan.run_dir = root / study.name / f"{arm.name}-seed{seed}-{plan.key}"
    for source in plan.sources:
        source["train"]["run_dir"] = str(plan.run_dir)
    return plan


def _keyed(run_dict: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in run_dict["train"].items() if k not in NOT_KEYED}
    return {**run_dict, "train": train}


def _plain_config(sources: list[dict[str, Any]]) -> dict[str, Any]:
    from pyramoe.train.config import build_model_config
    from pyramoe.train.session import resolve_run

    run, _ = resolve_run(sources)
    model = build_model_config(run, run.train.vocab_size).to_dict()
    return {"train": _keyed(run.to_dict())["train"], "model_config": model}  # the model as built, however spelled


def _student_config(sources: list[dict[str, Any]], teacher: ArmPlan) -> dict[str, Any]:
    """A student's settings as `pyramoe distill` resolves them (inheriting the teacher's), the teacher
    named by its key rather than its path. The teacher's checkpoint must exist."""
    from pyramoe.train.distill import resolve_distill_run

    config = _keyed(resolve_distill_run(sources).run.to_dict())
    config["distill"] = {**config["distill"], "teacher": teacher.key}
    return config
