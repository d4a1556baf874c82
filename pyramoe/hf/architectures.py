"""Hugging Face MoE architectures pyramoe reads: config.json -> ModelConfig, and where each tensor
lives in the checkpoint.

All are pre-norm RMSNorm/RoPE/SwiGLU decoders named the Llama way (model.layers.N.self_attn.
q_proj, ...); they differ in config keys, in the MoE block's name and expert tensor names, in
attention and in routing:
- Mixtral: softmax top-k renormalised, every layer MoE, experts `block_sparse_moe.experts.N.w1/w3/w2`.
- Qwen2-MoE: q/k/v biases, a shared expert gated by sigmoid(x . w), norm_topk_prob, dense layers by
  mlp_only_layers / decoder_sparse_step.
- Qwen3-MoE: per-head q/k RMSNorm, explicit head_dim, norm_topk_prob, dense layers as Qwen2-MoE.
- OLMoE: q/k RMSNorm over the whole projection, optional clip_qkv, norm_topk_prob (False in OLMoE).
- DeepSeek-V3 (`deepseek_v3`, also Kimi-K2 / Moonlight checkpoints of that type): DeepSeek-V3
  routing - sigmoid scores, score-correction bias, group-limited top-k, routed scaling factor,
  ungated shared experts, dense first layers - with multi-head latent attention (`layers/mla.py`,
  interleaved RoPE, YaRN RoPE scaling with DeepSeek's softmax mscale).
- dots.llm1 (`dots1`): the same routing on Qwen3 attention (per-head q/k norm).
- GLM-4.5 (`glm4_moe`): the same DeepSeek-V3 routing, with q/k/v biases, partial RoPE
  (partial_rotary_factor) and optional per-head q/k norm. Its multi-token-prediction layers
  (num_nextn_predict_layers, stored as layers past num_hidden_layers) serve speculative decoding
  and are skipped.
RoPE: plain or YaRN-scaled (`rope_parameters` in transformers 5, `rope_scaling` before); other
scalings (linear, dynamic, llama3, longrope) are refused.
Sliding-window attention is loaded as full attention with max_seq_len capped at the window: within
the window the two are the same, past it pyramoe refuses the sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyramoe.config import LayerConfig, ModelConfig, MoEConfig

_REQUIRED = object()


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_class: str  # the *ForCausalLM class named in config.json's "architectures"
    moe_prefixes: tuple[str, ...]  # the MoE block's module name(s) under model.layers.N.
    expert_leaves: tuple[str, str, str]  # per-expert gate, up, down tensor names
    shared_name: str | None  # the shared expert's module name under the MoE block
    moe_layers: Callable[[dict[str, Any], int], list[bool]]  # which layers are MoE


def get(cfg: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config.json: missing {key}")
        return default
    return value


def _qwen_moe_layers(cfg: dict[str, Any], n_layers: int) -> list[bool]:
    dense = set(get(cfg, "mlp_only_layers", []))
    step = get(cfg, "decoder_sparse_step", 1)
    return [i not in dense and (i + 1) % step == 0 for i in range(n_layers)]


def _all_moe(cfg: dict[str, Any], n_layers: int) -> list[bool]:
    return [True] * n_layers


def _first_k_dense(cfg: dict[str, Any], n_layers: int) -> list[bool]:
    first = get(cfg, "first_k_dense_replace", 0)
    every = get(cfg, "moe_layer_freq", 1)
    return [i >= first and i % every == 0 for i in range(n_layers)]


_GUP = ("gate_proj", "up_proj", "down_proj")

ARCHITECTURES: dict[str, Architecture] = {
    "mixtral": Architecture("mixtral", "MixtralForCausalLM", ("block_sparse_moe", "mlp"), ("w1", "w3", "w2"), None,
                            _all_moe),
    "qwen2_moe": Architecture("qwen2_moe", "Qwen2MoeForCausalLM", ("mlp",), _GUP, "shared_expert", _qwen_moe_layers),
    "qwen3_moe": Architecture("qwen3_moe", "Qwen3MoeForCausalLM", ("mlp",), _GUP, None, _qwen_moe_layers),
    "olmoe": Architecture("olmoe", "OlmoeForCausalLM", ("mlp",), _GUP, None, _all_moe),
    "dots1": Architecture("dots1", "Dots1ForCausalLM", ("mlp",), _GUP, "shared_experts", _first_k_dense),
    "glm4_moe": Architecture("glm4_moe", "Glm4MoeForCausalLM", ("mlp",), _GUP, "shared_experts", _first_k_dense),
    "deepseek_v3": Architecture("deepseek_v3", "DeepseekV3ForCausalLM", ("mlp",), _GUP, "shared_experts",
                                _first_k_dense),
}

# Families with DeepSeek-V3 routing (sigmoid scores, score-correction bias, groups, scaling, shared experts).
DEEPSEEK_ROUTED = ("dots1", "glm4_moe", "deepseek_v3")


def architecture_of(cfg: dict[str, Any]) -> Architecture:
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        named = cfg.get("architectures") or []
        raise ValueError(
            f"config.json: unsupported architecture model_type={model_type!r} {named} "
            f"(pyramoe loads {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]


# -- config.json -> ModelConfig -------------------------------------------------------------------


def model_config(cfg: dict[str, Any], arch: Architecture, dropless: bool = True) -> ModelConfig:
    """The pyramoe config of an HF config (MoE layers dropless unless asked otherwise, as at inference)."""
    _check_supported(cfg, arch)
    n_layers = get(cfg, "num_hidden_layers")
    d_model, n_heads = get(cfg, "hidden_size"), get(cfg, "num_attention_heads")
    head_dim = cfg.get("head_dim")
    moe = _moe_config(cfg, arch, dropless)
    placement = arch.moe_layers(cfg, n_layers)
    if not any(placement):
        raise ValueError("config.json: no MoE layer (num_experts / layer placement); pyramoe.hf loads MoE models")
    qkv_bias = {"qwen2_moe": get(cfg, "qkv_bias", False), "glm4_moe": get(cfg, "attention_bias", False)}.get(
        arch.model_type
    )
    settings = dict(
        vocab_size=get(cfg, "vocab_size"),
        max_seq_len=_max_seq_len(cfg),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=get(cfg, "num_key_value_heads", n_heads),
        head_dim=None if head_dim in (None, d_model // n_heads) else head_dim,
        d_ff=get(cfg, "intermediate_size"),
        activation="swiglu",
        bias=False,
        qkv_bias=qkv_bias,
        dropout=0.0,
        tie_embeddings=bool(get(cfg, "tie_word_embeddings", False)),
        layer_norm_eps=float(get(cfg, "rms_norm_eps", 1e-6)),
        position="rope",
        rope_theta=float(_rope_theta(cfg)),
        rope_fraction=float(_rope_setting(cfg, "partial_rotary_factor", 1.0)),
        rope_scaling=_yarn(cfg),
        norm="rmsnorm",
        qk_norm=_qk_norm(cfg, arch),
        qkv_clip=cfg.get("clip_qkv") if arch.model_type == "olmoe" else None,
        aux_loss_coef=float(get(cfg, "router_aux_loss_coef", 0.01)),
        layers=[LayerConfig(moe=moe if is_moe else None) for is_moe in placement],
    )
    return ModelConfig(**{**settings, **_latent_attention(cfg, arch)})


def _latent_attention(cfg: dict[str, Any], arch: Architecture) -> dict[str, Any]:
    if arch.model_type != "deepseek_v3":
        return {}
    return dict(
        attention="latent",
        head_dim=None,
        n_kv_heads=None,
        mla_q_rank=cfg.get("q_lora_rank"),
        mla_kv_rank=get(cfg, "kv_lora_rank"),
        mla_rope_dim=get(cfg, "qk_rope_head_dim"),
        mla_nope_dim=get(cfg, "qk_nope_head_dim"),
        mla_v_dim=get(cfg, "v_head_dim"),
        rope_interleave=bool(get(cfg, "rope_interleave", True)),
    )


def _qk_norm(cfg: dict[str, Any], arch: Architecture) -> str:
    if arch.model_type == "glm4_moe":
        return "head" if cfg.get("use_qk_norm") else "off"
    return {"qwen3_moe": "head", "dots1": "head", "olmoe": "full"}.get(arch.model_type, "off")


def _moe_config(cfg: dict[str, Any], arch: Architecture, dropless: bool) -> MoEConfig:
    sigmoid = arch.model_type in DEEPSEEK_ROUTED
    num_experts = get(cfg, "n_routed_experts") if sigmoid else _first_key(cfg, "num_local_experts", "num_experts")
    top_k = get(cfg, "num_experts_per_tok")
    normalised = True if arch.model_type == "mixtral" else bool(get(cfg, "norm_topk_prob", False))
    if top_k == 1 and normalised:
        # HF then weighs the one expert by 1.0; pyramoe's top-1 always uses its raw score (Switch, DeepSpeed).
        raise ValueError("config.json: num_experts_per_tok=1 with normalised top-k weights is not supported")
    settings: dict[str, Any] = dict(
        num_experts=num_experts,
        top_k=top_k,
        dropless=dropless,
        expert_d_ff=get(cfg, "intermediate_size") if arch.model_type in ("mixtral", "olmoe")
        else get(cfg, "moe_intermediate_size"),
        gate_norm="after_drop" if normalised else "softmax",
    )
    if arch.model_type == "qwen2_moe":
        shared = get(cfg, "shared_expert_intermediate_size", 0)
        settings.update(shared_d_ff=shared, shared_gate=shared > 0)
    if sigmoid:
        settings.update(
            router_score="sigmoid",
            score_correction_bias=True,
            expert_groups=get(cfg, "n_group", 1),
            topk_groups=get(cfg, "topk_group", 1),
            routed_scaling=float(get(cfg, "routed_scaling_factor", 1.0)),
            shared_d_ff=get(cfg, "n_shared_experts", 0) * settings["expert_d_ff"],
        )
    return MoEConfig(**settings)


def _first_key(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise ValueError(f"config.json: missing {keys[0]}")


def _rope_theta(cfg: dict[str, Any]) -> float:
    return _rope_setting(cfg, "rope_theta", 10000.0)


def _rope_setting(cfg: dict[str, Any], key: str, default: Any) -> Any:
    """transformers 5 keeps RoPE settings in rope_parameters; older configs at the top level."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict) and params.get(key) is not None:
        return params[key]
    return get(cfg, key, default)


def _rope_type(params: Any) -> str | None:
    if not isinstance(params, dict):
        return None
    return params.get("rope_type", params.get("type"))


def _yarn(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """YaRN settings from rope_parameters (or the older rope_scaling), factor filled in as transformers does."""
    params = next((cfg[k] for k in ("rope_parameters", "rope_scaling") if _rope_type(cfg.get(k)) == "yarn"), None)
    if params is None:
        return None
    keep = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
            "attention_factor", "truncate")
    scaling = {"rope_type": "yarn", **{k: params[k] for k in keep if params.get(k) is not None}}
    if "original_max_position_embeddings" not in scaling:
        raise ValueError("config.json: YaRN rope scaling without original_max_position_embeddings")
    if "factor" not in scaling:
        scaling["factor"] = get(cfg, "max_position_embeddings") / scaling["original_max_position_embeddings"]
    return scaling


def _check_supported(cfg: dict[str, Any], arch: Architecture) -> None:
    """One line naming the first option pyramoe's block cannot express."""
    act = get(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not supported (SwiGLU experts use silu)")
    for key in ("rope_parameters", "rope_scaling"):
        rope_type = _rope_type(cfg.get(key))
        if rope_type not in (None, "default", "yarn"):
            raise ValueError(f"config.json: {key}.rope_type={rope_type!r} is not supported (plain or YaRN RoPE only)")
    partial = _rope_setting(cfg, "partial_rotary_factor", 1.0)
    if partial != 1.0 and arch.model_type != "glm4_moe":
        raise ValueError(f"config.json: partial_rotary_factor={partial} is not supported for {arch.hf_class}")
    if arch.model_type not in ("qwen2_moe", "glm4_moe") and cfg.get("attention_bias"):
        raise ValueError("config.json: attention_bias=true is not supported (biases on q/k/v and o_proj)")
    if arch.model_type in DEEPSEEK_ROUTED and cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"config.json: scoring_func={cfg['scoring_func']!r} is not supported")


def _max_seq_len(cfg: dict[str, Any]) -> int:
    """max_position_embeddings, capped at the sliding window where some layer slides."""
    longest = get(cfg, "max_position_embeddings")
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types") or []
    if layer_types:
        slides = "sliding_attention" in layer_types
    elif "use_sliding_window" in cfg:
        slides = bool(cfg["use_sliding_window"])
    else:  # Mixtral: a window applies whenever one is set
        slides = window is not None
    if slides and window:
        return min(longest, int(window))
    return longest
