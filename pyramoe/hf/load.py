"""Load a local Hugging Face MoE checkpoint into pyramoe's decoder.

Legend: E experts, F expert hidden width, D model width.
Expert weights arrive either per expert (`experts.N.gate_proj/up_proj/down_proj`, Mixtral's
`experts.N.w1/w3/w2`: the hub layout `save_pretrained` writes) or fused as transformers 5 keeps them
in memory (`experts.gate_up_proj` [E, 2F, D], `experts.down_proj` [E, D, F]). Both become
GroupedExperts' [E, out, in] stacks: w_in = [gate | up] along the output rows (`activate` splits
it in that order), w_out = down.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyramoe.config import ModelConfig, MoEConfig
from pyramoe.hf.architectures import Architecture, architecture_of, model_config
from pyramoe.hf.files import TensorSource, read_config, weight_files
from pyramoe.models import GPT

# Tensors some checkpoints carry that hold nothing to load (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class HFModel:
    model: GPT
    architecture: Architecture
    hf_config: dict[str, Any]
    directory: Path

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.directory / "tokenizer.json"
        return path if path.is_file() else None


def load_hf_model(directory: str | Path, dtype: torch.dtype = torch.float32, dropless: bool = True) -> HFModel:
    """Build pyramoe's model from an HF directory (config.json + safetensors). ValueError, one line,
    for an unknown architecture, an unsupported option, or a missing/unexpected/misshapen tensor."""
    directory = Path(directory)
    hf_config = read_config(directory)
    arch = architecture_of(hf_config)
    config = model_config(hf_config, arch, dropless=dropless)
    source = TensorSource(weight_files(directory))
    state = map_tensors(source, config, arch)
    leftover = [n for n in source.untaken() if not n.endswith(_IGNORED_SUFFIXES) and not _mtp_layer(n, hf_config)]
    if leftover:
        raise ValueError(f"{directory}: unexpected tensor {leftover[0]} for {arch.hf_class} ({len(leftover)} in all)")
    return HFModel(build_with_weights(config, state, dtype), arch, hf_config, directory)


def _mtp_layer(name: str, hf_config: dict[str, Any]) -> bool:
    """A multi-token-prediction layer (GLM-4.5, DeepSeek-V3 store them after the last decoder layer)."""
    if not hf_config.get("num_nextn_predict_layers") or not name.startswith("model.layers."):
        return False
    return int(name.split(".")[2]) >= hf_config["num_hidden_layers"]


def build_with_weights(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> GPT:
    """The model with exactly `state`'s tensors (built on the meta device: no random init to overwrite)."""
    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    for name, param in expected.items():
        if config.tie_embeddings and name == "lm_head.weight":
            continue
        if name not in state:
            raise ValueError(f"missing tensor for {name}")
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: checkpoint shape {tuple(state[name].shape)}, config.json implies {tuple(param.shape)}"
            )
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def map_tensors(source: TensorSource, config: ModelConfig, arch: Architecture) -> dict[str, torch.Tensor]:
    """pyramoe state-dict name -> tensor, taken from the checkpoint's names."""
    state = {"tok_emb.weight": source.get("model.embed_tokens.weight"), "ln_f.weight": source.get("model.norm.weight")}
    if not config.tie_embeddings:
        state["lm_head.weight"] = source.get("lm_head.weight")
    elif "lm_head.weight" in source:
        source.get("lm_head.weight")  # a tied head saved anyway: the same values as the embedding
    for i, layer in enumerate(config.layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        state[ours + "ln_attn.weight"] = source.get(hf + "input_layernorm.weight")
        state[ours + "ln_ffn.weight"] = source.get(hf + "post_attention_layernorm.weight")
        state.update(_attention(source, config, hf + "self_attn.", ours + "attn."))
        if layer.moe is None:
            state.update(_mlp(source, hf + "mlp.", ours + "ffn.", ("gate_proj", "up_proj", "down_proj")))
        else:
            state.update(_moe(source, arch, layer.moe, hf, ours + "ffn."))
    return state


def _attention(source: TensorSource, config: ModelConfig, hf: str, ours: str) -> dict[str, torch.Tensor]:
    if config.attention == "latent":
        return _latent_attention(source, config, hf, ours)
    out = {
        ours + "qkv.weight": torch.cat([source.get(f"{hf}{p}_proj.weight") for p in "qkv"]),
        ours + "proj.weight": source.get(hf + "o_proj.weight"),
    }
    if config.attn_qkv_bias:
        out[ours + "qkv.bias"] = torch.cat([source.get(f"{hf}{p}_proj.bias") for p in "qkv"])
    if config.qk_norm != "off":
        out[ours + "q_norm.weight"] = source.get(hf + "q_norm.weight")
        out[ours + "k_norm.weight"] = source.get(hf + "k_norm.weight")
    return out


# pyramoe LatentAttention name -> DeepSeek's (transformers') name
LATENT_NAMES = {
    "wq.weight": "q_proj.weight",
    "wq_a.weight": "q_a_proj.weight",
    "q_a_norm.weight": "q_a_layernorm.weight",
    "wq_b.weight": "q_b_proj.weight",
    "wkv_a.weight": "kv_a_proj_with_mqa.weight",
    "kv_a_norm.weight": "kv_a_layernorm.weight",
    "wkv_b.weight": "kv_b_proj.weight",
    "proj.weight": "o_proj.weight",
}


def latent_names(config: ModelConfig) -> dict[str, str]:
    """The LatentAttention tensors of `config` (q from one projection or through the q latent)."""
    skip = ("wq_a.", "q_a_norm.", "wq_b.") if config.mla_q_rank is None else ("wq.",)
    return {ours: hf for ours, hf in LATENT_NAMES.items() if not ours.startswith(skip)}


def _latent_attention(source: TensorSource, config: ModelConfig, hf: str, ours: str) -> dict[str, torch.Tensor]:
    return {ours + name: source.get(hf + hf_name) for name, hf_name in latent_names(config).items()}


def _mlp(source: TensorSource, hf: str, ours: str, leaves: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    gate, up, down = (source.get(f"{hf}{leaf}.weight") for leaf in leaves)
    return {ours + "fc_in.weight": torch.cat([gate, up]), ours + "fc_out.weight": down}


def _moe(source: TensorSource, arch: Architecture, moe: MoEConfig, layer: str, ours: str) -> dict[str, torch.Tensor]:
    # Mixtral's block is `block_sparse_moe` on the hub and `mlp` in transformers 5's own state dict.
    prefix = next((p for p in arch.moe_prefixes if f"{layer}{p}.gate.weight" in source), arch.moe_prefixes[0])
    hf = f"{layer}{prefix}."
    out = {ours + "router.weight": source.get(hf + "gate.weight")}
    out[ours + "experts.w_in"], out[ours + "experts.w_out"] = _experts(source, arch, hf + "experts.", moe.num_experts)
    if moe.score_correction_bias:
        out[ours + "router.score_bias"] = source.get(hf + "gate.e_score_correction_bias")
    if moe.shared_d_ff:
        shared = f"{hf}{arch.shared_name}."
        out.update(_mlp(source, shared, ours + "shared_expert.", ("gate_proj", "up_proj", "down_proj")))
    if moe.shared_gate:
        out[ours + "shared_expert_gate.weight"] = source.get(hf + "shared_expert_gate.weight")
    return out


def _experts(source: TensorSource, arch: Architecture, hf: str, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_in [E, 2F, D], w_out [E, D, F]) from the fused or the per-expert layout."""
    if hf + "gate_up_proj" in source:
        return source.get(hf + "gate_up_proj"), source.get(hf + "down_proj")
    gate, up, down = arch.expert_leaves
    w_in = [torch.cat([source.get(f"{hf}{e}.{gate}.weight"), source.get(f"{hf}{e}.{up}.weight")])
            for e in range(num_experts)]
    w_out = [source.get(f"{hf}{e}.{down}.weight") for e in range(num_experts)]
    return torch.stack(w_in), torch.stack(w_out)
