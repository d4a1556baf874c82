"""Write a pyramoe model as a Hugging Face checkpoint transformers loads: config.json, safetensors in
the per-expert hub layout, and the tokenizer (tokenizer.json + a tokenizer_config.json naming
PreTrainedTokenizerFast, what its save_pretrained writes). transformers is not needed to export.

Which architecture: the one whose features the model has (`choose_architecture`):
- multi-head latent attention -> DeepSeek-V3;
- sigmoid scores / score-correction bias / expert groups / routed scaling (DeepSeek-V3 routing) ->
  dots1, or GLM-4.5 when the model also has q/k/v biases, partial RoPE or no q/k norm;
- a sigmoid-gated shared expert -> Qwen2-MoE;
- q/k norm over the full projection (or qkv clip) -> OLMoE;
- per-head q/k norm -> Qwen3-MoE;
- none of those, every layer MoE, top-k >= 2 renormalised -> Mixtral.
A feature with no counterpart (learned positions, LayerNorm, biases, GELU, Residual-MoE, MoE layers
that differ from each other as in PR-MoE, ...) is a ValueError naming it.

HF MoE layers never drop tokens: the exported model computes what pyramoe computes dropless.
Tensors are written in fp32 (what checkpoints store) or bf16 (`dtype`); config.json's `dtype` (and
`torch_dtype`, its older name) says which, so transformers' `dtype="auto"` loads them as written.
Legend: E experts, F expert width.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pyramoe.config import ModelConfig, MoEConfig
from pyramoe.hf.architectures import ARCHITECTURES, Architecture
from pyramoe.hf.load import latent_names
from pyramoe.models import GPT

_NO_COUNTERPART = "has no Hugging Face MoE counterpart"
# The dtypes an export writes, by the names config.json gives them.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """config.json's name for `dtype` ("float32", "bfloat16"); ValueError for any other."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"export: dtype must be float32 or bfloat16, got {dtype}")


def choose_architecture(config: ModelConfig) -> Architecture:
    """The HF architecture that expresses `config`, or a ValueError naming the first feature none has."""
    _check_common(config)
    moe = _uniform_moe(config)
    if config.attention == "latent":
        return ARCHITECTURES["deepseek_v3"]
    if not moe.plain_selection or moe.routed_scaling != 1.0:
        glm = config.attn_qkv_bias or config.rope_fraction != 1.0 or config.qk_norm == "off"
        return ARCHITECTURES["glm4_moe" if glm else "dots1"]
    if moe.shared_d_ff:
        return ARCHITECTURES["qwen2_moe"]
    if config.qk_norm == "full" or config.qkv_clip is not None:
        return ARCHITECTURES["olmoe"]
    if config.qk_norm == "head":
        return ARCHITECTURES["qwen3_moe"]
    return ARCHITECTURES["mixtral"]


def hf_config(
    config: ModelConfig, arch: Architecture, eos_id: int | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """config.json for `arch` with tensors in `dtype`; ValueError when `config` needs something `arch` lacks."""
    moe = _uniform_moe(config)
    dense = [i for i, layer in enumerate(config.layers) if layer.moe is None]
    _require(not config.attn_qkv_bias or arch.model_type in ("qwen2_moe", "glm4_moe"),
             f"q/k/v biases without a gated shared expert or DeepSeek-V3 routing ({arch.hf_class} has none)")
    _require(config.rope_fraction == 1.0 or arch.model_type == "glm4_moe",
             f"partial RoPE (rope_fraction) without DeepSeek-V3 routing ({arch.hf_class} rotates whole heads)")
    out: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.attn_head_dim,
        "intermediate_size": config.d_ff,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.layer_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta,
                            "partial_rotary_factor": config.rope_fraction, **(config.rope_scaling or {})},
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": _normalised(moe),
        "router_aux_loss_coef": config.aux_loss_coef,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype_name(dtype),
        "torch_dtype": dtype_name(dtype),  # what transformers < 4.56 and other readers look for
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
    }
    out.update(_ARCH_FIELDS[arch.model_type](config, moe, dense))
    return out


def _mixtral(config: ModelConfig, moe: MoEConfig, dense: list[int]) -> dict[str, Any]:
    _require(not dense, "dense layers between MoE layers (Mixtral is MoE in every layer)")
    _require(moe.top_k >= 2 and _normalised(moe), "unnormalised top-k weights without q/k norm (Mixtral "
             "renormalises; Qwen3-MoE/OLMoE, which do not, need q/k norm)")
    return {"num_local_experts": moe.num_experts, "intermediate_size": moe.expert_d_ff or config.d_ff,
            "sliding_window": None, "router_jitter_noise": 0.0}


def _qwen_dense(config: ModelConfig, moe: MoEConfig, dense: list[int]) -> dict[str, Any]:
    return {"num_experts": moe.num_experts, "moe_intermediate_size": moe.expert_d_ff or config.d_ff,
            "decoder_sparse_step": 1, "mlp_only_layers": dense, "use_sliding_window": False, "sliding_window": None}


def _qwen2(config: ModelConfig, moe: MoEConfig, dense: list[int]) -> dict[str, Any]:
    _require(config.qk_norm == "off", "q/k norm together with a gated shared expert (Qwen2-MoE has no q/k norm)")
    _require(config.head_dim is None, "head_dim != d_model / n_heads in Qwen2-MoE")
    _require(moe.shared_gate, "an ungated shared expert without sigmoid routing (DeepSeek-style)")
    return {**_qwen_dense(config, moe, dense), "shared_expert_intermediate_size": moe.shared_d_ff,
            "qkv_bias": config.attn_qkv_bias, "layer_types": ["full_attention"] * config.n_layers}


def _qwen3(config: ModelConfig, moe: MoEConfig, dense: list[int]) -> dict[str, Any]:
    return {**_qwen_dense(config, moe, dense), "num_local_experts": moe.num_experts}


def _olmoe(config: ModelConfig, moe: MoEConfig, dense: list[int]) -> dict[str, Any]:
    _require(not dense, "dense layers in an OLMoE-style model (OLMoE is MoE in every layer)")
    _require(config.qk_norm == "full", "qkv_clip without full-width q/k norm (only OLMoE clips)")
    _require(config.head_dim is None, "head_dim != d_model / n_heads in OLMoE")
    return {"num_experts": moe.num_experts, "intermediate_size": moe.expert_d_ff or config.d_ff,
            "clip_qkv": config.qkv_clip}


def _deepseek_routed(config: ModelConfig, moe: MoEConfig, dense: list[int]) -> dict[str, Any]:
    """Fields dots1 and GLM-4.5 share (DeepSeek-V3 routing, shared experts, dense first layers)."""
    _require(config.qk_norm != "full", "full-width q/k norm with DeepSeek-V3 routing")
    _require(moe.router_score == "sigmoid" and moe.score_correction_bias,
             "DeepSeek-V3 routing without both sigmoid scores and the score-correction bias")
    _require(dense == list(range(len(dense))), "dense layers after MoE layers (DeepSeek-style models have dense "
             "first layers only)")
    width = moe.expert_d_ff or config.d_ff
    _require(moe.shared_d_ff > 0 and moe.shared_d_ff % width == 0 and not moe.shared_gate,
             "DeepSeek-V3 routing without an ungated shared expert a whole number of experts wide")
    return {"n_routed_experts": moe.num_experts, "moe_intermediate_size": width,
            "n_shared_experts": moe.shared_d_ff // width, "first_k_dense_replace": len(dense),
            "n_group": moe.expert_groups, "topk_group": moe.topk_groups, "routed_scaling_factor": moe.routed_scaling}


def _dots1(config: ModelConfig, moe: MoEConfig, dense: list[int]) -> dict[str, Any]:
    return {**_deepseek_routed(config, moe, dense), "layer_types": ["full_attention"] * config.n_layers,
            "sliding_window": None}


def _glm4(config: ModelConfig, moe: MoEConfig, dense: list[int]) -> dict[str, Any]:
    return {**_deepseek_routed(config, moe, dense), "attention_bias": config.attn_qkv_bias,
            "use_qk_norm": config.qk_norm == "head", "partial_rotary_factor": config.rope_fraction,
            "num_nextn_predict_layers": 0}


def _deepseek_v3(config: ModelConfig, moe: MoEConfig, dense: list[int]) -> dict[str, Any]:
    return {**_deepseek_routed(config, moe, dense), "q_lora_rank": config.mla_q_rank,
            "kv_lora_rank": config.mla_kv_rank, "qk_rope_head_dim": config.mla_rope_dim,
            "qk_nope_head_dim": config.mla_nope_dim, "v_head_dim": config.mla_v_dim, "head_dim": config.mla_rope_dim,
            "num_key_value_heads": config.n_heads, "rope_interleave": config.rope_interleave,
            "num_nextn_predict_layers": 0, "rope_scaling": None}


_ARCH_FIELDS = {"mixtral": _mixtral, "qwen2_moe": _qwen2, "qwen3_moe": _qwen3, "olmoe": _olmoe, "dots1": _dots1,
                "glm4_moe": _glm4, "deepseek_v3": _deepseek_v3}


def _require(cond: bool, feature: str) -> None:
    if not cond:
        raise ValueError(f"export: {feature} {_NO_COUNTERPART}")


def _normalised(moe: MoEConfig) -> bool:
    return moe.top_k > 1 and moe.router_rules().gate_norm != "softmax"


def _check_common(config: ModelConfig) -> None:
    _require(config.position == "rope", "learned position embeddings (position='learned', the GPT-2 block)")
    _require(config.norm == "rmsnorm", "LayerNorm (norm='layernorm')")
    _require(config.activation == "swiglu", f"{config.activation.upper()} feed-forward layers (activation)")
    _require(not config.bias, "biases on projections and feed-forward layers (bias=true)")
    _require(not config.qkv_bias or config.qk_norm == "off", "q/k/v biases together with q/k norm")
    moe_layers = [layer.moe for layer in config.layers if layer.moe is not None]
    _require(bool(moe_layers), "a model without MoE layers (HF MoE architectures)")
    _require(not any(m.use_residual for m in moe_layers), "Residual-MoE (moe.use_residual)")


def _uniform_moe(config: ModelConfig) -> MoEConfig:
    """The MoE layers' shared settings; HF configs hold one set for every MoE layer."""
    moe_layers = [layer.moe for layer in config.layers if layer.moe is not None]
    first = moe_layers[0]
    for name in ("num_experts", "top_k", "expert_d_ff", "router_score", "score_correction_bias", "expert_groups",
                 "topk_groups", "routed_scaling", "shared_d_ff", "shared_gate"):
        values = {getattr(m, name) for m in moe_layers}
        _require(len(values) == 1,
                 f"MoE layers with different {name} ({sorted(values, key=str)}, e.g. a PR-MoE pyramid)")
    _require(len({m.router_rules().gate_norm != "softmax" for m in moe_layers}) == 1,
             "MoE layers that differ in top-k normalisation (gate_norm)")
    return first


# -- tensors --------------------------------------------------------------------------------------


def hf_tensors(model: GPT, arch: Architecture, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's weights under `arch`'s hub names (per-expert layout), contiguous copies in `dtype`."""
    dtype_name(dtype)
    config = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["ln_f.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    q_width, kv_width = config.n_heads * config.attn_head_dim, config.kv_heads * config.attn_head_dim
    for i, layer in enumerate(config.layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        out[hf + "input_layernorm.weight"] = state[ours + "ln_attn.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[ours + "ln_ffn.weight"]
        if config.attention == "latent":
            out.update({f"{hf}self_attn.{name}": state[f"{ours}attn.{ours_name}"]
                        for ours_name, name in latent_names(config).items()})
            out.update(_ffn(state, arch, layer.moe is None, ours, hf))
            continue
        for kind in ("weight", "bias"):
            if ours + f"attn.qkv.{kind}" in state:
                q, k, v = state[ours + f"attn.qkv.{kind}"].split((q_width, kv_width, kv_width))
                out.update({f"{hf}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v))})
        out[hf + "self_attn.o_proj.weight"] = state[ours + "attn.proj.weight"]
        for norm in ("q_norm", "k_norm"):
            if ours + f"attn.{norm}.weight" in state:
                out[f"{hf}self_attn.{norm}.weight"] = state[ours + f"attn.{norm}.weight"]
        out.update(_ffn(state, arch, layer.moe is None, ours, hf))
    return {name: t.to(dtype).contiguous().clone() for name, t in out.items()}


def _ffn(
    state: dict[str, torch.Tensor], arch: Architecture, dense: bool, ours: str, hf: str
) -> dict[str, torch.Tensor]:
    if dense:
        return _mlp(state, ours + "ffn.", hf + "mlp.")
    return _moe(state, arch, ours + "ffn.", f"{hf}{arch.moe_prefixes[0]}.")


def _mlp(state: dict[str, torch.Tensor], ours: str, hf: str) -> dict[str, torch.Tensor]:
    gate, up = state[ours + "fc_in.weight"].chunk(2)
    down = state[ours + "fc_out.weight"]
    return {hf + "gate_proj.weight": gate, hf + "up_proj.weight": up, hf + "down_proj.weight": down}


def _moe(state: dict[str, torch.Tensor], arch: Architecture, ours: str, hf: str) -> dict[str, torch.Tensor]:
    out = {hf + "gate.weight": state[ours + "router.weight"]}
    if ours + "router.score_bias" in state:
        out[hf + "gate.e_score_correction_bias"] = state[ours + "router.score_bias"]
    gate_leaf, up_leaf, down_leaf = arch.expert_leaves
    w_in_E2FD, w_out_EDF = state[ours + "experts.w_in"], state[ours + "experts.w_out"]
    for e in range(w_in_E2FD.shape[0]):
        gate, up = w_in_E2FD[e].chunk(2)
        out[f"{hf}experts.{e}.{gate_leaf}.weight"] = gate
        out[f"{hf}experts.{e}.{up_leaf}.weight"] = up
        out[f"{hf}experts.{e}.{down_leaf}.weight"] = w_out_EDF[e]
    if ours + "shared_expert.fc_in.weight" in state:
        out.update(_mlp(state, ours + "shared_expert.", f"{hf}{arch.shared_name}."))
    if ours + "shared_expert_gate.weight" in state:
        out[hf + "shared_expert_gate.weight"] = state[ours + "shared_expert_gate.weight"]
    return out


# -- the directory --------------------------------------------------------------------------------


def export_hf(
    model: GPT, out_dir: str | Path, tokenizer_json: Path | None = None, eos_token: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Architecture:
    """Write `model` (and the tokenizer, if given) as an HF checkpoint into the new directory `out_dir`,
    its tensors in `dtype` (float32 or bfloat16)."""
    dtype_name(dtype)
    arch = choose_architecture(model.config)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: exists and is not an empty directory")
    eos_id = _token_id(tokenizer_json, eos_token)
    config = hf_config(model.config, arch, eos_id, dtype)
    tensors = hf_tensors(model, arch, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer_json is not None:
        write_tokenizer(out_dir, tokenizer_json, eos_token, model.config.max_seq_len)
    return arch


def _token_id(tokenizer_json: Path | None, token: str | None) -> int | None:
    if tokenizer_json is None or token is None:
        return None
    vocab = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    for added in vocab.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    return (vocab.get("model", {}).get("vocab") or {}).get(token)


def write_tokenizer(out_dir: Path, tokenizer_json: Path, eos_token: str | None, max_len: int) -> None:
    """tokenizer.json as is, and the tokenizer_config.json PreTrainedTokenizerFast.save_pretrained writes
    for it, so AutoTokenizer loads it."""
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    if eos_token is not None:
        tokenizer_config["eos_token"] = eos_token
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
