"""Setting a run up: merge the config sources, pick the checkpoint to resume, prepare the data and
build a Trainer. Refuses to start a new run over an existing one, so nothing on disk is overwritten.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

import pyramoe.train.checkpoint as ckpt_io
from pyramoe.config import ModelConfig, moe_layer_indices
from pyramoe.data import PreparedData, prepare_data
from pyramoe.parallel.launch import DistRun, Launch, init_distributed
from pyramoe.train.config import (
    DEFAULT_PRESET,
    RunConfig,
    TrainConfig,
    build_model_config,
    check_model_overrides,
    merge,
    run_config_from_dict,
)
from pyramoe.train.metrics import METRICS_FILE
from pyramoe.train.run_lock import lock_run_dir
from pyramoe.train.trainer import Trainer

LATEST = "latest"


def resolve_run(
    sources: list[dict[str, Any]], resume: str | None = None
) -> tuple[RunConfig, ckpt_io.Checkpoint | None]:
    """The run's config from `sources` (merged in order) and, when resuming, the checkpoint.

    Resuming keeps the checkpoint's settings; `train.*` (and a distillation run's `distill.*`) settings
    in `sources` replace them (e.g. more steps), while the model and its preset cannot change.
    """
    merged: dict[str, Any] = {}
    for source in sources:
        merged = merge(merged, source)
    if resume is None:
        return run_config_from_dict(merged), None
    if resume == LATEST:
        run_dir = run_config_from_dict(merged).run_dir
        path = ckpt_io.latest_checkpoint(ckpt_io.checkpoint_root(run_dir))
        if path is None:
            raise ValueError(f"--resume: no checkpoint in {ckpt_io.checkpoint_root(run_dir)}")
    else:
        path = ckpt_io.resolve_checkpoint(resume)
    ckpt = ckpt_io.load_checkpoint(path)
    saved = ckpt.state["run_config"]
    saved_model = saved.get("model", {})
    check_model_unchanged(merged.get("model", {}), ckpt)
    train = merge(saved["train"], merged.get("train", {}))
    check_split_unchanged(saved["train"], train)
    if "run_dir" not in merged.get("train", {}):
        train["run_dir"] = str(ckpt.path.parent.parent)  # where the checkpoint lives, whatever the cwd
    resumed = {"train": train, "model": saved_model}
    if "distill" in saved or "distill" in merged:
        resumed["distill"] = merge(saved.get("distill", {}), merged.get("distill", {}))
    return run_config_from_dict(resumed), ckpt


# Settings that decide which documents are validation documents.
SPLIT_SETTINGS = ("val_percent", "max_bytes", "text_field")


def check_split_unchanged(saved: dict[str, Any], train: dict[str, Any]) -> None:
    """A resumed run on the same corpus keeps its train/validation split: another split would put
    documents it trained on into validation (a new corpus is a new split anyway)."""
    if train.get("corpus") != saved.get("corpus"):
        return
    for name in SPLIT_SETTINGS:
        if name in saved and train.get(name) != saved[name]:
            raise ValueError(
                f"train.{name}: cannot change when resuming on the same corpus (the checkpoint's "
                f"train/validation split used {saved[name]!r}); start a new run for another split"
            )


def check_model_unchanged(requested: dict[str, Any], ckpt: ckpt_io.Checkpoint) -> None:
    """Resuming cannot change the model, but may restate it (a TOML file shared with the first run):
    each model.* setting must equal the checkpoint's value, its override or its effective config."""
    if not isinstance(requested, dict):
        raise ValueError("model: must be a table of settings")
    requested = dict(requested)
    saved_model = ckpt.state["run_config"].get("model", {})
    saved_preset = saved_model.get("preset", DEFAULT_PRESET)
    if "preset" in requested and requested.pop("preset") != saved_preset:
        raise _model_changed("preset", saved_preset)
    effective = ckpt.model_config()
    for key, value in check_model_overrides(requested).items():
        if key == "moe":
            for name, setting in value.items():
                have = _moe_values(effective, name)
                if have != [setting] and saved_model.get("moe", {}).get(name) != setting:
                    raise _model_changed(f"moe.{name}", have[0] if len(have) == 1 else have)
        elif saved_model.get(key) != value and _effective_value(effective, key, value) != value:
            raise _model_changed(key, _effective_value(effective, key, value))


def _moe_values(config: ModelConfig, name: str) -> list[Any]:
    """The distinct values of MoEConfig field `name` over the MoE layers, in layer order."""
    values: list[Any] = []
    for layer in config.layers:
        value = dataclasses.asdict(layer.moe).get(name) if layer.moe is not None else None
        if layer.moe is not None and value not in values:
            values.append(value)
    return values


def _effective_value(config: ModelConfig, key: str, requested: Any) -> Any:
    """The checkpoint's value of model.KEY, in the form `requested` takes."""
    if key == "n_layers":
        return config.n_layers
    if key == "moe_placement":
        try:
            same = moe_layer_indices(config.n_layers, requested) == config.moe_layer_ids
        except ValueError:
            same = False
        return requested if same else config.moe_layer_ids
    if key == "num_experts":
        counts = [layer.moe.num_experts for layer in config.layers if layer.moe is not None]
        if isinstance(requested, int) and counts and set(counts) == {requested}:
            return requested
        return counts
    return config.to_dict().get(key)


def _model_changed(key: str, have: Any) -> ValueError:
    return ValueError(f"model.{key}: cannot change when resuming (the checkpoint has {have!r})")


def check_fresh_run_dir(run_dir: Path) -> None:
    """A new run must not mix its metrics and checkpoints with an earlier run's."""
    latest = ckpt_io.latest_checkpoint(ckpt_io.checkpoint_root(run_dir))
    if latest is not None:
        raise ValueError(
            f"{run_dir} already holds a run (latest checkpoint: {latest.name}); "
            "pass --resume to continue it or --run-dir for a new one"
        )
    if (run_dir / METRICS_FILE).exists():
        raise ValueError(
            f"{run_dir} holds {METRICS_FILE} of a run that saved no checkpoint; "
            "delete the directory or pass --run-dir for a new one"
        )


def load_data(run: RunConfig, ckpt: ckpt_io.Checkpoint | None = None, progress: bool = True) -> PreparedData:
    """Tokenized train/val data. A checkpoint brings its own tokenizer, so resumed and evaluated runs
    see the very token ids they were trained on (its token cache is reused when still there)."""
    cfg = run.train
    tokenizer, cache_dir = cfg.tokenizer, None
    if ckpt is not None:
        tokenizer = ckpt.tokenizer_path
        if not tokenizer.is_file():
            raise ValueError(f"{ckpt.path}: incomplete checkpoint ({tokenizer.name} missing)")
        saved_cache = Path(str(ckpt.state.get("data", {}).get("cache_dir", "")))
        same_corpus = ckpt.state["run_config"]["train"].get("corpus") == cfg.corpus
        cache_dir = saved_cache if same_corpus and saved_cache.is_dir() and str(saved_cache) != "." else None
    return prepare_data(
        cfg.corpus, cfg.vocab_size, cache_dir=cache_dir, tokenizer_path=tokenizer, val_percent=cfg.val_percent,
        text_field=cfg.text_field, max_bytes=cfg.max_bytes, progress=progress,
    )


def create_trainer(
    run: RunConfig, ckpt: ckpt_io.Checkpoint | None = None, progress: bool = True, launch: Launch | None = None
) -> Trainer:
    """Data, model and optimizer for a new run, or restored from `ckpt`. Under torchrun (see
    `pyramoe.train.distributed`) this joins the job; rank 0 prepares the data first and alone writes."""
    check_plain_run(run)
    launch = launch or Launch()
    device = launch.resolved_device()
    dist_run = init_distributed(launch, device)
    run = keep_global_batch(run, ckpt, dist_run.dp if dist_run is not None else 1)
    lock = lock_run_dir(run.run_dir, dist_run)
    try:
        trainer = _build_trainer(run, ckpt, progress, launch, device, dist_run)
    except BaseException:
        lock.abandon()
        raise
    trainer.run_lock = lock
    return trainer


def _build_trainer(
    run: RunConfig, ckpt: ckpt_io.Checkpoint | None, progress: bool, launch: Launch, device: torch.device,
    dist_run: DistRun | None,
) -> Trainer:
    prepare_run(run, ckpt)
    data = _rank0_first(dist_run, lambda: load_data(run, ckpt, progress and (dist_run is None or dist_run.is_main)))
    if ckpt is None:
        model_config = build_model_config(run, data.vocab_size)
    else:
        model_config = resumed_model_config(run, ckpt, data.vocab_size)
    trainer = Trainer(
        run, model_config, data, progress, device=device, dist_run=dist_run, ep=launch.ep,
        hierarchical=launch.hierarchical, expert_slicing=launch.expert_slicing, zero=launch.zero,
    )
    if ckpt is not None:
        trainer.restore(ckpt)
    elif trainer.is_main:
        write_run_config(run, trainer)
    return trainer


def _rank0_first(dist_run: DistRun | None, build):  # noqa: ANN001, ANN202
    """Rank 0 builds (tokenizer, token cache) while the others wait, then they read what it wrote.
    The barrier also keeps rank 0 from writing before every rank has checked the run directory."""
    if dist_run is None:
        return build()
    if dist_run.is_main:
        dist_run.barrier()
        result = build()
        dist_run.barrier()
        return result
    dist_run.barrier()
    dist_run.barrier()
    return build()


def global_batch(train: TrainConfig, dp: int) -> int:
    """Sequences per optimizer step: every data-parallel rank's micro-batches together."""
    return train.batch_size * train.grad_accum * dp


def saved_global_batch(ckpt: ckpt_io.Checkpoint) -> int | None:
    """The global batch `ckpt` was trained on (None: a sharded checkpoint from before it was
    recorded, whose data-parallel size is unknown)."""
    if "global_batch" in ckpt.state:
        return int(ckpt.state["global_batch"])
    if ckpt.state.get("layout") == "sharded":
        return None
    saved = ckpt.state["run_config"]["train"]
    return int(saved.get("batch_size", 1)) * int(saved.get("grad_accum", 1))  # one process: DP 1


def keep_global_batch(run: RunConfig, ckpt: ckpt_io.Checkpoint | None, dp: int) -> RunConfig:
    """A resumed run keeps the checkpoint's global batch on any number of data-parallel ranks.

    With the checkpoint's micro-batch settings (unset or restated), the micro-batch is derived from
    it, as Megatron derives accumulation: batch_size = global / (grad_accum x DP), which keeps the
    very batch stream; when that does not divide, the largest micro-batch up to the saved one that
    does, and the accumulation that fills the global batch. Settings that change the global batch
    are refused in one line: never silently."""
    want = saved_global_batch(ckpt) if ckpt is not None else None
    cfg = run.train
    if want is None or global_batch(cfg, dp) == want:
        return run
    saved = ckpt.state["run_config"]["train"]
    restated = cfg.batch_size == saved.get("batch_size") and cfg.grad_accum == saved.get("grad_accum", 1)
    if not restated:
        raise ValueError(
            f"train.batch_size: {cfg.batch_size} x grad_accum {cfg.grad_accum} x DP {dp} = {global_batch(cfg, dp)} "
            f"sequences per step, but {ckpt.path} trained on {want}; resume with batch_size x grad_accum x DP = "
            f"{want} (or leave both unset to derive them)"
        )
    if want % dp:
        raise ValueError(f"--nproc-per-node: data-parallel size {dp} does not divide the global batch of {want} "
                         f"sequences that {ckpt.path} trained on; resume on a size that does")
    per_rank = want // dp
    if per_rank % cfg.grad_accum == 0:
        micro, accum = per_rank // cfg.grad_accum, cfg.grad_accum
    else:
        micro = max(b for b in range(1, min(cfg.batch_size, per_rank) + 1) if per_rank % b == 0)
        accum = per_rank // micro
    return dataclasses.replace(run, train=dataclasses.replace(cfg, batch_size=micro, grad_accum=accum))


def check_plain_run(run: RunConfig) -> None:
    """A run with [distill] settings needs a teacher: `pyramoe distill` builds those."""
    if run.distill is not None:
        raise ValueError("distill.*: a distillation run (a teacher and a student) belongs to `pyramoe distill`; "
                         "continue one with `pyramoe distill --resume`")


def prepare_run(run: RunConfig, ckpt: ckpt_io.Checkpoint | None) -> None:
    """Checks, and process-wide settings (threads), before any data or model is built."""
    if ckpt is None:
        check_fresh_run_dir(run.run_dir)
    if run.train.threads is not None:
        torch.set_num_threads(run.train.threads)


def resumed_model_config(run: RunConfig, ckpt: ckpt_io.Checkpoint, vocab_size: int) -> ModelConfig:
    """The checkpoint's model config, checked against the tokenizer and the run's sequence length."""
    model_config = ckpt.model_config()
    if model_config.vocab_size != vocab_size:
        raise ValueError(
            f"{ckpt.path}: incompatible checkpoint (vocab {model_config.vocab_size}, tokenizer {vocab_size})"
        )
    if run.train.seq_len > model_config.max_seq_len:
        raise ValueError(f"train.seq_len: {run.train.seq_len} exceeds model.max_seq_len={model_config.max_seq_len}")
    return model_config


def write_run_config(run: RunConfig, trainer: Trainer) -> None:
    """config.json: the resolved settings, for people reading the run directory."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"run": run.to_dict(), "model_config": trainer.model.config.to_dict()}
    ckpt_io.write_json_atomically(run.run_dir / "config.json", payload)
