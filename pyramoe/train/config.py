"""Training configuration: `TrainConfig`, TOML files and `section.key=value` overrides.

A run has two sections: [train] (the fields of `TrainConfig`) and [model] (`preset` plus overrides of
`ModelConfig` fields; `n_layers`, `moe_placement` and `num_experts` rebuild the layer list, and a
[model.moe] table sets `MoEConfig` fields on every MoE layer); a distillation run adds [distill]
(`DistillConfig`, pyramoe/train/kd.py). Sources are merged in order, later ones winning:
preset < TOML file < dedicated CLI flags < `--set`. Every error names the setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyramoe.config import PLACEMENTS, ModelConfig, MoEConfig, build_layers, moe_layer_indices
from pyramoe.presets import get_preset
from pyramoe.train.kd import DistillConfig

PRECISIONS = ("fp32", "bf16")
DEFAULT_PRESET = "tiny-moe"
LAYOUT_KEYS = ("n_layers", "moe_placement", "num_experts")
# Fields that come from elsewhere: the vocabulary from the tokenizer, layers from LAYOUT_KEYS.
_MODEL_FIXED = {"vocab_size": "set train.vocab_size instead", "layers": "use n_layers/moe_placement/num_experts"}


@dataclass
class TrainConfig:
    """Optimisation, data and bookkeeping settings of one run.

    One optimizer step sees batch_size * grad_accum sequences of seq_len tokens. Defaults train the
    tiny-moe preset on the embedded stdlib corpus in a few minutes on two CPU cores.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    expert_lr_scale: float = 1.0  # expert parameters' LR relative to the rest
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 50  # 0: evaluate only at the end
    eval_batches: int = 8
    save_every: int = 100  # 0: save only at the end (and on SIGINT/SIGTERM)
    keep_last: int = 3
    seed: int = 1234
    threads: int | None = None  # torch CPU threads; None: torch's default (one per core)
    precision: str = "fp32"
    corpus: str = "stdlib"
    max_bytes: int | None = None
    val_percent: float = 2.0
    text_field: str = "text"
    tokenizer: str | None = None  # a tokenizer.json; None: train a BPE of vocab_size on the corpus
    vocab_size: int = 8192
    run_dir: str | None = None  # None: runs/<preset>
    aux_loss_coef: float | None = None  # None: the model's (preset's) value
    z_loss_coef: float | None = None
    # Aux-loss-free balancing (DeepSeek-V3): after every step each MoE router's per-expert selection
    # bias (model.moe.score_correction_bias) moves by this much toward an even load. 0: off.
    router_bias_rate: float = 0.0

    def validate(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last")
        for name in positive:
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every", "weight_decay", "grad_clip"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(self.expert_lr_scale > 0, "expert_lr_scale", f"must be > 0, got {self.expert_lr_scale}")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        _check(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        _check(self.max_bytes is None or self.max_bytes >= 1, "max_bytes", f"must be >= 1, got {self.max_bytes}")
        _check(0 < self.val_percent <= 50, "val_percent", f"must be in (0, 50], got {self.val_percent}")
        _check(self.vocab_size >= 257, "vocab_size", f"must be >= 257 (byte-level BPE), got {self.vocab_size}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            _check(value is None or value >= 0, name, f"must be >= 0, got {value}")
        _check(self.router_bias_rate >= 0, "router_bias_rate", f"must be >= 0, got {self.router_bias_rate}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"train.{name}: {message}")


@dataclass
class RunConfig:
    """Everything needed to (re)build a run: training settings, a preset and model overrides, and
    for a distillation run (`pyramoe distill`) its KD settings."""

    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = DEFAULT_PRESET
    model: dict[str, Any] = field(default_factory=dict)
    distill: DistillConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"train": dataclasses.asdict(self.train), "model": {"preset": self.preset, **self.model}}
        if self.distill is not None:
            out["distill"] = dataclasses.asdict(self.distill)
        return out

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.preset}")


# -- reading sources ---------------------------------------------------------------------------------------


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a one-line ValueError."""
    import tomllib  # Python >= 3.11; imported here so that the rest works on 3.10

    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML ({exc})") from None


def parse_override(item: str) -> dict[str, Any]:
    """`section.key=value` (or `model.moe.key=value`) as a nested dict.

    Values are read as JSON (numbers, true/false, null, lists, "strings"); anything else is a bare
    string, so paths need no quotes.
    """
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    for part in reversed(parts):
        value = {part: value}
    return value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Check and convert merged settings ({"train": {...}, "model": {...}[, "distill": {...}]}) into a
    RunConfig; a "distill" section (even empty) makes it a distillation run."""
    _reject_unknown(data, ("train", "model", "distill"), "")
    for section in ("train", "model", "distill"):
        if not isinstance(data.get(section, {}), dict):
            raise ValueError(f"{section}: must be a table of settings")
    train = TrainConfig(**_typed(data.get("train", {}), TrainConfig, "train"))
    train.validate()
    model = dict(data.get("model", {}))
    preset = model.pop("preset", DEFAULT_PRESET)
    if not isinstance(preset, str):
        raise ValueError(f"model.preset: must be a preset name, got {preset!r}")
    get_preset(preset)  # fails early on an unknown name
    distill = None
    if "distill" in data:
        distill = DistillConfig(**_typed(data["distill"], DistillConfig, "distill"))
        distill.validate()
    return RunConfig(train=train, preset=preset, model=check_model_overrides(model), distill=distill)


def check_model_overrides(model: dict[str, Any]) -> dict[str, Any]:
    for key, reason in _MODEL_FIXED.items():
        if key in model:
            raise ValueError(f"model.{key}: cannot be set here ({reason})")
    moe = model.pop("moe", {})
    if not isinstance(moe, dict):
        raise ValueError("model.moe: must be a table of MoE settings")
    layout = {k: model.pop(k) for k in LAYOUT_KEYS if k in model}
    out = _typed(model, ModelConfig, "model", skip=tuple(_MODEL_FIXED))
    for key, value in layout.items():
        out[key] = _layout_value(key, value)
    if moe:
        out["moe"] = _typed(moe, MoEConfig, "model.moe", skip=("num_experts",))
    return out


def _layout_value(key: str, value: Any) -> Any:
    ints = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if key == "n_layers" and isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if key == "moe_placement" and (value in PLACEMENTS or ints):
        return value
    if key == "num_experts" and ((isinstance(value, int) and not isinstance(value, bool)) or ints):
        return value
    expected = {
        "n_layers": "a positive integer",
        "moe_placement": f"one of {PLACEMENTS} or a list of layer ids",
        "num_experts": "an integer or a list of integers (one per MoE layer)",
    }[key]
    raise ValueError(f"model.{key}: expected {expected}, got {value!r}")


# -- typed fields --------------------------------------------------------------------------------------------


def _reject_unknown(data: dict[str, Any], known: typing.Iterable[str], prefix: str) -> None:
    known = list(known)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ValueError(f"{prefix}{key}: unknown setting{hint}")


def _typed(values: dict[str, Any], cls: type, section: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """`values` checked against the dataclass field types of `cls` (ints, floats, strings, optionals)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    extra = list(LAYOUT_KEYS) + ["moe"] if cls is ModelConfig else []
    _reject_unknown(values, names + extra, f"{section}.")
    return {key: _coerce(f"{section}.{key}", value, hints[key]) for key, value in values.items()}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    kind = getattr(hint, "__name__", str(hint))
    raise ValueError(f"{name}: expected {kind}, got {value!r}")


# -- the model ------------------------------------------------------------------------------------------------


def build_model_config(run: RunConfig, vocab_size: int, base: ModelConfig | None = None) -> ModelConfig:
    """The preset (or `base`, e.g. a student derived from a teacher) with the run's model overrides,
    the tokenizer's vocabulary and train.*_loss_coef."""
    base = base if base is not None else get_preset(run.preset)
    overrides = dict(run.model)
    moe = overrides.pop("moe", {})
    layout = {k: overrides.pop(k) for k in LAYOUT_KEYS if k in overrides}
    data = base.to_dict()
    if "d_model" in overrides and "d_ff" not in overrides:
        data["d_ff"] = None  # follow the new width (4 * d_model) rather than keep the preset's
    data.update(overrides)
    data["vocab_size"] = vocab_size
    for name in ("aux_loss_coef", "z_loss_coef"):
        if getattr(run.train, name) is not None:
            data[name] = getattr(run.train, name)
    layers = _relayout(base, layout) if layout else base.layers
    data["layers"] = [_with_moe(layer.moe, moe) for layer in layers]
    try:
        config = ModelConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model.{exc}") from None
    if run.train.seq_len > config.max_seq_len:
        raise ValueError(f"train.seq_len: {run.train.seq_len} exceeds model.max_seq_len={config.max_seq_len}")
    return config


def _with_moe(moe: MoEConfig | None, settings: dict[str, Any]) -> dict[str, Any]:
    if moe is None:
        return {"moe": None}
    return {"moe": {**dataclasses.asdict(moe), **settings}}


def _relayout(base: ModelConfig, layout: dict[str, Any]) -> list:
    """A new layer list from n_layers / moe_placement / num_experts, keeping the preset's MoE settings."""
    moe_layers = [layer.moe for layer in base.layers if layer.moe is not None]
    template = moe_layers[0] if moe_layers else MoEConfig()
    n_layers = layout.get("n_layers", base.n_layers)
    placement = layout.get("moe_placement", _placement_of(base))
    counts = layout.get("num_experts")
    if counts is None:
        preset_counts = [m.num_experts for m in moe_layers]
        try:
            wanted = len(moe_layer_indices(n_layers, placement))
        except ValueError as exc:
            raise ValueError(f"model.{exc}") from None
        counts = preset_counts if len(preset_counts) == wanted else template.num_experts
    settings = {k: v for k, v in dataclasses.asdict(template).items() if k != "num_experts"}
    try:
        return build_layers(n_layers, placement, counts, **settings)
    except ValueError as exc:
        raise ValueError(f"model.{exc}") from None


def _placement_of(config: ModelConfig) -> str | list[int]:
    """The preset's placement by name when it has one, so that it carries over to a new depth."""
    for name in PLACEMENTS:
        if moe_layer_indices(config.n_layers, name) == config.moe_layer_ids:
            return name
    return config.moe_layer_ids
