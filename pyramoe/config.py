"""Model configuration: plain dataclasses with validation, no process groups.

A model is a list of per-layer FFN settings, so a pyramid (more experts in deeper layers) or any
placement of MoE layers is plain data. `LayerConfig.moe is None` means a dense FFN layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("gelu", "swiglu")
DROP_POLICIES = ("position", "random")
NOISY_GATE_POLICIES = (None, "jitter", "gumbel")
PLACEMENTS = ("every_other", "all", "first_half", "second_half", "none")


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {message}")


@dataclass
class MoEConfig:
    """Settings of one MoE layer.

    capacity per expert = max(min_capacity, ceil(top_k * tokens / num_experts * capacity_factor)),
    using `eval_capacity_factor` in eval mode. `dropless=True` ignores capacity (no token is dropped).
    `use_residual=True` is Residual-MoE: a dense MLP every token passes plus the routed expert(s),
    mixed by a learned per-token coefficient.
    """

    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    dropless: bool = False
    drop_policy: str = "position"
    noisy_gate_policy: str | None = None
    jitter_eps: float = 0.01
    normalize_top_k: bool = True
    use_residual: bool = False
    expert_d_ff: int | None = None  # None: the model's d_ff

    def validate(self, prefix: str = "moe") -> None:
        _require(self.num_experts >= 1, f"{prefix}.num_experts", f"must be >= 1, got {self.num_experts}")
        _require(self.top_k >= 1, f"{prefix}.top_k", f"must be >= 1, got {self.top_k}")
        _require(
            self.top_k <= self.num_experts,
            f"{prefix}.top_k",
            f"top_k={self.top_k} exceeds num_experts={self.num_experts}",
        )
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            _require(
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                f"{prefix}.{name}",
                f"must be > 0, got {value}",
            )
        _require(self.min_capacity >= 0, f"{prefix}.min_capacity", f"must be >= 0, got {self.min_capacity}")
        _require(
            self.drop_policy in DROP_POLICIES,
            f"{prefix}.drop_policy",
            f"must be one of {DROP_POLICIES}, got {self.drop_policy!r}",
        )
        _require(
            self.noisy_gate_policy in NOISY_GATE_POLICIES,
            f"{prefix}.noisy_gate_policy",
            f"must be one of {NOISY_GATE_POLICIES}, got {self.noisy_gate_policy!r}",
        )
        _require(self.jitter_eps >= 0, f"{prefix}.jitter_eps", f"must be >= 0, got {self.jitter_eps}")
        _require(
            self.expert_d_ff is None or self.expert_d_ff >= 1,
            f"{prefix}.expert_d_ff",
            f"must be >= 1, got {self.expert_d_ff}",
        )


@dataclass
class LayerConfig:
    """One transformer block's FFN: dense when `moe` is None."""

    moe: MoEConfig | None = None

    @property
    def is_moe(self) -> bool:
        return self.moe is not None


@dataclass
class ModelConfig:
    """A GPT-style pre-LN decoder. `layers` has one entry per block."""

    vocab_size: int = 50257
    max_seq_len: int = 2048
    d_model: int = 1024
    n_heads: int = 16
    d_ff: int | None = None  # None: 4 * d_model
    activation: str = "gelu"
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    layers: list[LayerConfig] = field(default_factory=lambda: [LayerConfig() for _ in range(2)])

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        self.validate()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.is_moe]

    def validate(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "d_ff"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        _require(
            self.d_model % self.n_heads == 0,
            "n_heads",
            f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
        )
        _require(
            self.activation in ACTIVATIONS, "activation", f"must be one of {ACTIVATIONS}, got {self.activation!r}"
        )
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.aux_loss_coef >= 0, "aux_loss_coef", f"must be >= 0, got {self.aux_loss_coef}")
        _require(self.z_loss_coef >= 0, "z_loss_coef", f"must be >= 0, got {self.z_loss_coef}")
        _require(len(self.layers) >= 1, "layers", "a model needs at least one layer")
        for i, layer in enumerate(self.layers):
            _require(isinstance(layer, LayerConfig), f"layers[{i}]", "must be a LayerConfig")
            if layer.moe is not None:
                layer.moe.validate(prefix=f"layers[{i}].moe")

    # -- serialisation (checkpoints store the config as JSON) -------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown model config field")
        layers = [_layer_from_dict(i, layer) for i, layer in enumerate(data.pop("layers", []))]
        if layers:
            data["layers"] = layers
        return cls(**data)


def _layer_from_dict(index: int, data: dict[str, Any] | LayerConfig) -> LayerConfig:
    if isinstance(data, LayerConfig):
        return data
    moe = data.get("moe")
    if moe is None:
        return LayerConfig()
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    unknown = sorted(set(moe) - known)
    if unknown:
        raise ValueError(f"layers[{index}].moe.{unknown[0]}: unknown MoE config field")
    return LayerConfig(moe=MoEConfig(**moe))


def moe_layer_indices(n_layers: int, placement: str | Sequence[int]) -> list[int]:
    """Which blocks hold an MoE FFN.

    "every_other" is DeepSpeed's default (blocks 1, 3, 5, ...); an explicit list is validated.
    """
    if isinstance(placement, str):
        half = n_layers // 2
        table = {
            "every_other": list(range(1, n_layers, 2)),
            "all": list(range(n_layers)),
            "first_half": list(range(half)),
            "second_half": list(range(half, n_layers)),
            "none": [],
        }
        if placement not in table:
            raise ValueError(f"moe_placement: must be one of {PLACEMENTS} or a list of layer ids, got {placement!r}")
        return table[placement]
    ids = sorted(set(int(i) for i in placement))
    bad = [i for i in ids if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"moe_placement: layer id {bad[0]} out of range for {n_layers} layers")
    return ids


def build_layers(
    n_layers: int,
    placement: str | Sequence[int] = "every_other",
    num_experts: int | Sequence[int] = 8,
    **moe_settings: Any,
) -> list[LayerConfig]:
    """Per-layer configs from a placement and expert counts.

    `num_experts` is one count for every MoE layer, or one count per MoE layer (a pyramid such as
    [32] * 10 + [64] * 2 is PR-MoE's shape).
    """
    known = {f.name for f in dataclasses.fields(MoEConfig)} - {"num_experts"}
    unknown = sorted(set(moe_settings) - known)
    if unknown:
        raise ValueError(f"moe.{unknown[0]}: unknown MoE setting")
    moe_ids = moe_layer_indices(n_layers, placement)
    if isinstance(num_experts, int):
        counts = [num_experts] * len(moe_ids)
    else:
        counts = [int(c) for c in num_experts]
        if len(counts) != len(moe_ids):
            raise ValueError(
                f"num_experts: {len(counts)} counts given for {len(moe_ids)} MoE layers ({placement!r})"
            )
    layers = [LayerConfig() for _ in range(n_layers)]
    for layer_id, count in zip(moe_ids, counts):
        layers[layer_id] = LayerConfig(moe=MoEConfig(num_experts=count, **moe_settings))
    return layers


def pyramid(n_moe_layers: int, experts: Sequence[int], deep_layers: Sequence[int]) -> list[int]:
    """Expert counts per MoE layer for a pyramid: `deep_layers[i]` MoE layers at the end get `experts[i+1]`.

    pyramid(12, (32, 64), (2,)) == [32] * 10 + [64] * 2, the paper's PR-MoE-32/64.
    """
    if len(experts) != len(deep_layers) + 1:
        raise ValueError("pyramid: need one more expert count than deep-layer group sizes")
    if sum(deep_layers) > n_moe_layers:
        raise ValueError(f"pyramid: {sum(deep_layers)} deep layers exceed {n_moe_layers} MoE layers")
    counts = [experts[0]] * (n_moe_layers - sum(deep_layers))
    for count, n in zip(experts[1:], deep_layers):
        counts += [count] * n
    return counts
