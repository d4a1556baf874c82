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
NOISY_GATE_POLICIES = ("off", "jitter", "gumbel", "gumbel_second")
GATE_NORMS = ("after_drop", "before_drop", "softmax")
BALANCE_LOSS_CHOICES = ("all", "first")
ROUTER_CONVENTIONS = ("pyramoe", "deepspeed")
# The routing settings a convention decides when they are left at None.
CONVENTION_SETTINGS = ("drop_policy", "noisy_gate_policy", "gate_norm", "balance_loss")
PLACEMENTS = ("every_other", "all", "first_half", "second_half", "none")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
QK_NORMS = ("off", "head", "full")
ATTENTIONS = ("standard", "latent")
ROUTER_SCORES = ("softmax", "sigmoid")


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {message}")


@dataclass(frozen=True)
class RouterRules:
    """The routing conventions one MoE layer follows, resolved from its `MoEConfig`."""

    drop_policy: str  # which assignments an over-full expert serves first: by position or at random
    noisy_gate_policy: str  # noise on the routing decision in training
    gate_norm: str  # how the k combine weights of a token are normalised (top_k >= 2)
    balance_loss: str  # which choices the balance loss counts


def convention_defaults(convention: str, top_k: int) -> dict[str, str]:
    """The routing settings a named convention implies for `top_k`.

    "pyramoe": drop by position, no noise, gates renormalised over the experts that kept the token,
    balance loss over all k choices (GShard/Switch top-k, as Mixtral/Qwen/OLMoE train; every choice
    takes a capacity slot, so all of them need balancing).
    "deepspeed": DeepSpeed-MoE's `TopKGate` defaults (deepspeed/moe/sharded_moe.py): top-1 uses
    random token selection (`use_rts=True`); top-2 samples the second expert with Gumbel noise
    (`top2_2nd_expert_sampling=True`), keeps by position with every first choice ahead of every
    second, renormalises the surviving gates and counts only first choices in the balance loss.
    Unlike DeepSpeed, noise and random selection apply in training only, so eval is deterministic.
    """
    if convention == "deepspeed":
        return {
            "drop_policy": "random" if top_k == 1 else "position",
            "noisy_gate_policy": "gumbel_second" if top_k == 2 else "off",
            "gate_norm": "after_drop",
            "balance_loss": "first",
        }
    return {"drop_policy": "position", "noisy_gate_policy": "off", "gate_norm": "after_drop", "balance_loss": "all"}


@dataclass
class MoEConfig:
    """Settings of one MoE layer.

    capacity per expert = max(min_capacity, ceil(top_k * tokens / num_experts * capacity_factor)),
    using `eval_capacity_factor` in eval mode. `dropless=True` ignores capacity (no token is dropped).
    `use_residual=True` is Residual-MoE: a dense MLP every token passes plus the routed expert(s),
    mixed by a learned per-token coefficient.

    Routing conventions (values are strings, never "none", so `--set KEY=none` can mean "unset";
    `convention_defaults` says what each convention picks for a setting left at None):
    - `router_convention`: "pyramoe" (default) or "deepspeed" (all of DeepSpeed's top-1/top-2 choices).
    - `drop_policy`: "position" keeps, per expert, all first choices ahead of all second choices and
      earlier tokens first; "random" ranks tokens within a choice at random in training (DeepSpeed's
      random token selection). Eval always keeps by position.
    - `noisy_gate_policy` (training only): "off"; "jitter" multiplies the router input by
      U(1-eps, 1+eps); "gumbel" adds Gumbel noise to the logits that pick every choice; "gumbel_second"
      picks the first choice from clean logits and the others from noisy ones (DeepSpeed's top-2).
      Noise changes which experts are picked, never the combine weights' values.
    - `gate_norm` (top_k >= 2): "after_drop" divides each kept gate by the sum of the token's kept
      gates, so a token whose other choice overflowed sends weight 1.0 to the expert that kept it
      (DeepSpeed's top2gating/topkgating); "before_drop" normalises over the k choices and then zeroes
      dropped ones (the token's output shrinks); "softmax" keeps the softmax probabilities
      (`norm_topk_prob=False` in Qwen2-MoE). Top-1 always uses the softmax probability (Switch, DeepSpeed).
    - `balance_loss`: E * sum_e f_e * P_e with f_e the fraction of "all" k choices routed to e
      (GShard/Switch top-k) or of the "first" choices only (DeepSpeed's top2gating).

    Llama-family routing (defaults keep the GPT-MoE router above):
    - `router_score`: "softmax" over the experts, or an independent "sigmoid" per expert
      (DeepSeek-V3). `gate_norm` applies to either score: "after_drop"/"before_drop" divide the k
      chosen scores by their sum (`norm_topk_prob=True`), "softmax" keeps them as they are
      (`norm_topk_prob=False`: raw probabilities, or raw sigmoids).
    - `score_correction_bias`: a per-expert bias added to the scores only to choose experts, never
      to weight them (DeepSeek-V3's `e_score_correction_bias`, a buffer of the router).
    - `expert_groups` / `topk_groups`: group-limited top-k: experts split into `expert_groups`
      groups, each scored by the sum of its two best (bias-corrected) scores, and the k experts
      chosen only within the `topk_groups` best groups (DeepSeek-V3's n_group / topk_group).
    - `routed_scaling`: the combine weights of the routed experts are multiplied by it, after
      normalisation (DeepSeek-V3's routed_scaling_factor).
    - `shared_d_ff`: width of a shared expert, a dense SwiGLU/GELU MLP every token passes, added to
      the routed output (0: none; DeepSeek's n_shared_experts * moe_intermediate_size);
      `shared_gate=True` scales it by a per-token sigmoid(x . w) (Qwen2-MoE's shared_expert_gate).
    """

    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    dropless: bool = False
    router_convention: str = "pyramoe"
    drop_policy: str | None = None
    noisy_gate_policy: str | None = None
    jitter_eps: float = 0.01
    gate_norm: str | None = None
    balance_loss: str | None = None
    use_residual: bool = False
    expert_d_ff: int | None = None  # None: the model's d_ff
    router_score: str = "softmax"
    score_correction_bias: bool = False
    expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    shared_d_ff: int = 0
    shared_gate: bool = False

    @property
    def plain_selection(self) -> bool:
        """Experts are the top-k of the softmax logits: no bias, no groups (the GPT-MoE router)."""
        return self.router_score == "softmax" and not self.score_correction_bias and self.expert_groups == 1

    def router_rules(self) -> RouterRules:
        """The routing conventions in force: explicit settings, else the convention's."""
        defaults = convention_defaults(self.router_convention, self.top_k)
        chosen = {name: getattr(self, name) for name in CONVENTION_SETTINGS}
        return RouterRules(**{name: value if value is not None else defaults[name] for name, value in chosen.items()})

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
            self.router_convention in ROUTER_CONVENTIONS,
            f"{prefix}.router_convention",
            f"must be one of {ROUTER_CONVENTIONS}, got {self.router_convention!r}",
        )
        _require(
            self.router_convention != "deepspeed" or self.top_k <= 2,
            f"{prefix}.router_convention",
            f"'deepspeed' covers top_k 1 and 2 (its top1gating/top2gating), got top_k={self.top_k}",
        )
        for name, allowed in (
            ("drop_policy", DROP_POLICIES),
            ("noisy_gate_policy", NOISY_GATE_POLICIES),
            ("gate_norm", GATE_NORMS),
            ("balance_loss", BALANCE_LOSS_CHOICES),
        ):
            value = getattr(self, name)
            _require(
                value is None or value in allowed,
                f"{prefix}.{name}",
                f"must be one of {allowed} (or unset for the convention's), got {value!r}",
            )
        _require(
            self.noisy_gate_policy != "gumbel_second" or self.top_k >= 2,
            f"{prefix}.noisy_gate_policy",
            "'gumbel_second' needs top_k >= 2 (it noises the choices after the first)",
        )
        _require(self.jitter_eps >= 0, f"{prefix}.jitter_eps", f"must be >= 0, got {self.jitter_eps}")
        _require(
            self.expert_d_ff is None or self.expert_d_ff >= 1,
            f"{prefix}.expert_d_ff",
            f"must be >= 1, got {self.expert_d_ff}",
        )
        self._validate_llama_routing(prefix)

    def _validate_llama_routing(self, prefix: str) -> None:
        _require(
            self.router_score in ROUTER_SCORES,
            f"{prefix}.router_score",
            f"must be one of {ROUTER_SCORES}, got {self.router_score!r}",
        )
        _require(
            self.expert_groups >= 1 and self.num_experts % self.expert_groups == 0,
            f"{prefix}.expert_groups",
            f"must be >= 1 and divide num_experts={self.num_experts}, got {self.expert_groups}",
        )
        group_size = self.num_experts // max(self.expert_groups, 1)
        _require(
            self.expert_groups == 1 or group_size >= 2,
            f"{prefix}.expert_groups",
            f"groups are scored by their two best experts, so need >= 2 experts each, got {group_size}",
        )
        _require(
            1 <= self.topk_groups <= self.expert_groups,
            f"{prefix}.topk_groups",
            f"must be in [1, expert_groups={self.expert_groups}], got {self.topk_groups}",
        )
        _require(
            self.top_k <= self.topk_groups * group_size,
            f"{prefix}.topk_groups",
            f"{self.topk_groups} groups of {group_size} experts hold fewer than top_k={self.top_k}",
        )
        _require(
            isinstance(self.routed_scaling, (int, float)) and math.isfinite(self.routed_scaling)
            and self.routed_scaling > 0,
            f"{prefix}.routed_scaling",
            f"must be > 0, got {self.routed_scaling}",
        )
        _require(self.shared_d_ff >= 0, f"{prefix}.shared_d_ff", f"must be >= 0, got {self.shared_d_ff}")
        _require(
            not self.shared_gate or self.shared_d_ff > 0,
            f"{prefix}.shared_gate",
            "gates the shared expert, so needs shared_d_ff > 0",
        )
        noise = self.router_rules().noisy_gate_policy
        _require(
            self.plain_selection or noise in ("off", "jitter"),
            f"{prefix}.noisy_gate_policy",
            f"Gumbel noise picks from softmax logits; {noise!r} does not combine with sigmoid "
            "scores, a score-correction bias or expert groups",
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
    """A pre-norm decoder. `layers` has one entry per block.

    The defaults are the GPT-2 block (learned positions, LayerNorm, biases, tied head, multi-head
    attention). The Llama family (Mixtral, Qwen-MoE, OLMoE, DeepSeek-style) sets:
    - `position="rope"` with `rope_theta` (rotary embeddings on q and k, rotate-half convention);
      `rope_fraction` < 1 rotates only the first int(head_dim * rope_fraction) dimensions of each
      head (GLM-4.5's partial_rotary_factor); `rope_scaling` = {"rope_type": "yarn", "factor",
      "original_max_position_embeddings", optional "beta_fast", "beta_slow", "mscale",
      "mscale_all_dim", "attention_factor", "truncate"} is YaRN context extension, with
      transformers' key names (DeepSeek-V3, long-context Qwen3);
    - `norm="rmsnorm"` (`layer_norm_eps` is its epsilon);
    - `n_kv_heads` < n_heads: grouped-query attention (None: = n_heads); `head_dim` when it is not
      d_model // n_heads (Qwen3);
    - `bias=False`, `tie_embeddings=False`; `qkv_bias` overrides `bias` for the q/k/v projection
      only (Qwen2-MoE: True, with no output-projection bias);
    - `qk_norm`: RMSNorm of q and k per "head" (Qwen3) or over the "full" projection (OLMoE), "off";
    - `qkv_clip`: clamp q, k, v to [-c, c] after the norms (OLMoE's clip_qkv);
    - `activation="swiglu"`; dense first layers are LayerConfig(moe=None) entries;
    - `attention="latent"`: DeepSeek-V2/V3 multi-head latent attention (`layers/mla.py`): q from a
      rank-`mla_q_rank` bottleneck (None: one projection), keys and values expanded per head from a
      cached rank-`mla_kv_rank` latent, `mla_nope_dim` + `mla_rope_dim` query/key dimensions per head
      (RoPE on the second part, its key shared by all heads) and `mla_v_dim` value dimensions;
      `rope_interleave` rotates interleaved pairs (DeepSeek's layout) instead of halves.
    """

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
    position: str = "learned"
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0
    rope_scaling: dict[str, Any] | None = None
    norm: str = "layernorm"
    n_kv_heads: int | None = None  # None: n_heads
    head_dim: int | None = None  # None: d_model // n_heads
    qkv_bias: bool | None = None  # None: bias
    qk_norm: str = "off"
    qkv_clip: float | None = None
    attention: str = "standard"
    mla_q_rank: int | None = None
    mla_kv_rank: int = 512
    mla_rope_dim: int = 64
    mla_nope_dim: int = 128
    mla_v_dim: int = 128
    rope_interleave: bool = False

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

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions of each head that RoPE rotates."""
        if self.attention == "latent":
            return self.mla_rope_dim
        return int(self.attn_head_dim * self.rope_fraction)

    @property
    def attn_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    def validate(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "d_ff"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        _require(
            self.head_dim is not None or self.attention == "latent" or self.d_model % self.n_heads == 0,
            "n_heads",
            f"d_model={self.d_model} is not divisible by n_heads={self.n_heads} (or set head_dim)",
        )
        self._validate_llama_block()
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

    def _validate_llama_block(self) -> None:
        for name, allowed in (("position", POSITIONS), ("norm", NORMS), ("qk_norm", QK_NORMS)):
            value = getattr(self, name)
            _require(value in allowed, name, f"must be one of {allowed}, got {value!r}")
        _require(
            isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 0,
            "rope_theta",
            f"must be > 0, got {self.rope_theta}",
        )
        _require(
            self.head_dim is None or (isinstance(self.head_dim, int) and self.head_dim >= 1),
            "head_dim",
            f"must be a positive integer, got {self.head_dim!r}",
        )
        _require(
            isinstance(self.rope_fraction, (int, float)) and 0 < self.rope_fraction <= 1,
            "rope_fraction",
            f"must be in (0, 1], got {self.rope_fraction}",
        )
        self._validate_rope_scaling()
        rope_field = "rope_fraction" if self.rope_fraction != 1 else "head_dim"
        _require(
            self.position != "rope" or (self.rope_dim % 2 == 0 and self.rope_dim >= 2),
            "mla_rope_dim" if self.attention == "latent" else rope_field,
            f"rotary embeddings rotate pairs of dimensions, so need an even rotated width, got {self.rope_dim}",
        )
        kv = self.n_kv_heads
        _require(
            kv is None or (isinstance(kv, int) and kv >= 1 and self.n_heads % kv == 0),
            "n_kv_heads",
            f"must be a positive integer dividing n_heads={self.n_heads}, got {kv!r}",
        )
        _require(
            self.qkv_clip is None or self.qkv_clip > 0, "qkv_clip", f"must be > 0 (or unset), got {self.qkv_clip}"
        )
        self._validate_latent_attention()

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        _require(isinstance(scaling, dict) and scaling.get("rope_type") == "yarn", "rope_scaling",
                 f"must be None or a dict with rope_type 'yarn', got {scaling!r}")
        factor, original = scaling.get("factor"), scaling.get("original_max_position_embeddings")
        _require(isinstance(factor, (int, float)) and factor > 0, "rope_scaling.factor", f"must be > 0, got {factor!r}")
        _require(isinstance(original, int) and original >= 1, "rope_scaling.original_max_position_embeddings",
                 f"must be a positive integer, got {original!r}")
        known = {"rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim", "attention_factor", "truncate"}
        unknown = sorted(set(scaling) - known)
        _require(not unknown, f"rope_scaling.{unknown[0] if unknown else ''}", "unknown YaRN setting")

    def _validate_latent_attention(self) -> None:
        _require(self.attention in ATTENTIONS, "attention", f"must be one of {ATTENTIONS}, got {self.attention!r}")
        _require(
            not self.rope_interleave or self.attention == "latent",
            "rope_interleave",
            "interleaved RoPE is implemented for attention='latent' only",
        )
        if self.attention != "latent":
            return
        _require(self.position == "rope", "attention", "'latent' attention needs position='rope'")
        for name in ("mla_kv_rank", "mla_rope_dim", "mla_nope_dim", "mla_v_dim"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        _require(
            self.mla_q_rank is None or (isinstance(self.mla_q_rank, int) and self.mla_q_rank >= 1),
            "mla_q_rank",
            f"must be a positive integer (or unset), got {self.mla_q_rank!r}",
        )
        _require(
            self.qk_norm == "off" and self.qkv_clip is None and self.n_kv_heads in (None, self.n_heads),
            "attention",
            "'latent' attention has its own norms and a key/value per head: no qk_norm, qkv_clip or n_kv_heads",
        )

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
    moe = _upgrade_moe_dict(moe)
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    unknown = sorted(set(moe) - known)
    if unknown:
        raise ValueError(f"layers[{index}].moe.{unknown[0]}: unknown MoE config field")
    return LayerConfig(moe=MoEConfig(**moe))


def _upgrade_moe_dict(moe: dict[str, Any]) -> dict[str, Any]:
    """Configs saved before `gate_norm` existed normalised the top-k gates before drops (or not at all)."""
    moe = dict(moe)
    if "normalize_top_k" in moe:
        normalize = moe.pop("normalize_top_k")
        moe.setdefault("gate_norm", "before_drop" if normalize else "softmax")
    return moe


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
