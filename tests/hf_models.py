"""Tiny random Hugging Face MoE models built offline, and a greedy decoding loop over pyramoe's model
(left-padded batch, its KV cache, per-row positions), for the HF import/export tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, initializer_range=0.25)

# One config per architecture, each exercising the options its family is known for.
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**_COMMON, intermediate_size=24, num_local_experts=4,
                                                  num_experts_per_tok=2, rope_theta=1e6),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=16,
                                                     shared_expert_intermediate_size=24, num_experts=8,
                                                     num_experts_per_tok=2, norm_topk_prob=False,
                                                     mlp_only_layers=[0], tie_word_embeddings=True),
    "qwen3_moe": lambda **kw: transformers.Qwen3MoeConfig(**_COMMON, intermediate_size=48,
                                                          moe_intermediate_size=16, head_dim=16, num_experts=8,
                                                          num_experts_per_tok=2, norm_topk_prob=True,
                                                          mlp_only_layers=[0], **kw),
    "olmoe": lambda: transformers.OlmoeConfig(**{**_COMMON, "num_key_value_heads": 4}, intermediate_size=16,
                                              num_experts=8, num_experts_per_tok=2, clip_qkv=1.5,
                                              eos_token_id=None, pad_token_id=None),
    "dots1": lambda: transformers.Dots1Config(**_COMMON, intermediate_size=48, moe_intermediate_size=16,
                                              n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                                              n_group=4, topk_group=2, first_k_dense_replace=1,
                                              norm_topk_prob=True, routed_scaling_factor=2.5),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=16,
                                                   head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                                                   n_shared_experts=1, n_group=2, topk_group=1,
                                                   first_k_dense_replace=1, norm_topk_prob=True,
                                                   routed_scaling_factor=1.5, attention_bias=True, use_qk_norm=True,
                                                   partial_rotary_factor=0.5),
    "deepseek_v3": lambda **kw: transformers.DeepseekV3Config(**{
        **_COMMON, "num_key_value_heads": 4, "intermediate_size": 48, "moe_intermediate_size": 16,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "q_lora_rank": 12,
        "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 12, "rope_scaling": None,
        **kw}),
}


def build_hf(arch: str, seed: int = 0, **config) -> transformers.PreTrainedModel:
    """A random model whose norms, router biases and weights are all away from their initial values,
    so a wrong mapping of any of them shows in the logits."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch](**config)).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                tensor.copy_(1.0 + 0.2 * torch.randn_like(tensor))
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.randn_like(tensor))
            elif name.endswith(".bias"):
                tensor.copy_(0.1 * torch.randn_like(tensor))
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def save_hf(model: transformers.PreTrainedModel, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    idx_BT = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask_BT = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        idx_BT[b, longest - len(prompt):] = torch.tensor(prompt)
        mask_BT[b, longest - len(prompt):] = True
    return idx_BT, mask_BT


@torch.no_grad()
def pyramoe_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuation of a left-padded batch: one prefill, then one token per step for every row,
    each row at its own position, pads masked out of attention."""
    idx_BT, mask_BL = left_pad(prompts)
    length = idx_BT.shape[1]
    positions_BT = (mask_BL.long().cumsum(-1) - 1).clamp_min(0)
    cache = model.new_kv_cache(len(prompts), length + new_tokens)
    logits_BV = model(idx_BT, kv_cache=cache, key_mask_BL=mask_BL, positions_BT=positions_BT).logits[:, -1]
    position_B1 = positions_BT[:, -1:]
    tokens = []
    for step in range(new_tokens):
        token_B1 = logits_BV.argmax(-1, keepdim=True)
        tokens.append(token_B1)
        if step + 1 == new_tokens:
            break
        mask_BL = torch.cat([mask_BL, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
        position_B1 = position_B1 + 1
        logits_BV = model(token_B1, kv_cache=cache, start_pos=length + step, key_mask_BL=mask_BL,
                          positions_BT=position_B1).logits[:, -1]
    return torch.cat(tokens, dim=1).tolist()


@torch.no_grad()
def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    idx_BT, mask_BT = left_pad(prompts)
    out = model.generate(input_ids=idx_BT, attention_mask=mask_BT.long(), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, idx_BT.shape[1]:].tolist()
