"""Pre-norm decoder whose FFN per block is dense, MoE or Residual-MoE (from the config).

One class holds both the GPT-2 block (learned positions, LayerNorm, biases, tied head) and the
Llama-family MoE block (RoPE, RMSNorm, grouped-query attention, q/k norm, no biases, untied head,
SwiGLU and shared experts): see `ModelConfig`.
Single-device: knows nothing of processes; parallelism is applied to a built model afterwards.
Legend: B batch, T positions, D width, V vocabulary, L key slots (cached + new).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pyramoe.config import LayerConfig, ModelConfig
from pyramoe.layers.attention import CausalSelfAttention, KVCache
from pyramoe.layers.mla import LatentAttention, LatentKVCache
from pyramoe.layers.mlp import MLP
from pyramoe.layers.moe import MoELayer, MoEStats
from pyramoe.layers.norms import make_norm
from pyramoe.layers.rope import RotaryEmbedding, yarn_mscale


@dataclass
class GPTOutput:
    logits: torch.Tensor  # [B, T, V]
    aux_loss: torch.Tensor  # sum over MoE layers of aux_loss_coef*balance + z_loss_coef*z (0 if dense)
    moe_stats: dict[int, MoEStats] = field(default_factory=dict)  # block index -> stats
    # The aux losses' value, to log: `aux_loss` is this process's term of the objective, which under
    # tensor parallelism weighs each layer by its share of the tokens (None: equal to aux_loss).
    aux_value: torch.Tensor | None = None

    @property
    def balance_loss(self) -> torch.Tensor:
        return _sum_or_zero([s.balance_loss for s in self.moe_stats.values()], self.logits)

    @property
    def z_loss(self) -> torch.Tensor:
        return _sum_or_zero([s.z_loss for s in self.moe_stats.values()], self.logits)


def _sum_or_zero(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(values).sum() if values else like.new_zeros((), dtype=torch.float32)


def latent_softmax_scale(config: ModelConfig) -> float | None:
    """DeepSeek's MLA under YaRN multiplies the softmax scale by mscale(factor, mscale_all_dim)^2."""
    scaling = config.rope_scaling
    if scaling is None or not scaling.get("mscale_all_dim"):
        return None
    mscale = yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
    return (config.mla_nope_dim + config.mla_rope_dim) ** -0.5 * mscale * mscale


def make_attention(config: ModelConfig, layer_idx: int) -> nn.Module:
    if config.attention == "latent":
        return LatentAttention(
            config.d_model, config.n_heads, config.mla_q_rank, config.mla_kv_rank, config.mla_nope_dim,
            config.mla_rope_dim, config.mla_v_dim, config.rope_interleave, config.dropout, layer_idx,
            softmax_scale=latent_softmax_scale(config),
        )
    return CausalSelfAttention(
        config.d_model, config.n_heads, config.bias, config.dropout, layer_idx,
        n_kv_heads=config.n_kv_heads, head_dim=config.head_dim, qkv_bias=config.qkv_bias,
        qk_norm=config.qk_norm, norm_eps=config.layer_norm_eps, qkv_clip=config.qkv_clip,
    )


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: LayerConfig, layer_idx: int):
        super().__init__()
        self.ln_attn = make_norm(config.norm, config.d_model, config.layer_norm_eps)
        self.attn = make_attention(config, layer_idx)
        self.ln_ffn = make_norm(config.norm, config.d_model, config.layer_norm_eps)
        if layer.moe is None:
            self.ffn: nn.Module = MLP(config.d_model, config.d_ff, config.activation, config.bias)
        else:
            self.ffn = MoELayer(config.d_model, config.d_ff, layer.moe, config.activation, config.bias)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None,
        start_pos: int,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask_BL: torch.Tensor | None = None,
        token_mask_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.dropout(self.attn(self.ln_attn(x), kv_cache, start_pos, rope, key_mask_BL))
        h = self.ln_ffn(x)
        stats = None
        if self.is_moe:
            h, stats = self.ffn(h, token_mask=token_mask_BT)
        else:
            h = self.ffn(h)
        return x + self.dropout(h), stats


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.position == "learned":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
            self.rope = None
        else:
            self.rope = RotaryEmbedding(config.rope_dim, config.rope_theta, config.rope_scaling)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer, i) for i, layer in enumerate(config.layers))
        self.ln_f = make_norm(config.norm, config.d_model, config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation; residual output projections scaled by 1/sqrt(2 * n_layers)."""
        if self.tok_emb.weight.is_meta:
            return
        out_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf in ("bias", "b_in", "b_out"):
                    p.zero_()
                elif p.dim() == 1:  # LayerNorm gain
                    p.fill_(1.0)
                else:
                    std = out_std if leaf in ("w_out",) or name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                    p.normal_(0.0, std)

    def forward(
        self,
        idx_BT: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        key_mask_BL: torch.Tensor | None = None,
        positions_BT: torch.Tensor | None = None,
    ) -> GPTOutput:
        """Logits for tokens `idx_BT` written at cache slots [start_pos, start_pos + T).

        Padded batches (prompts of different lengths): `key_mask_BL` marks the real tokens among all
        key slots [0, start_pos + T), and `positions_BT` gives each token its position in its own
        sequence (e.g. mask.cumsum(-1) - 1 for left padding). Padding tokens skip the MoE layers
        (their FFN output is 0): they take no expert capacity and count in no load statistics.
        """
        h_BTD, moe_stats = self.final_hidden(idx_BT, kv_cache, start_pos, key_mask_BL, positions_BT)
        logits = self.lm_head(h_BTD)
        cfg = self.config
        if self.training or torch.is_grad_enabled():
            aux_terms = [cfg.aux_loss_coef * s.balance_loss + cfg.z_loss_coef * s.z_loss for s in moe_stats.values()]
            weights = [s.aux_weight for s in moe_stats.values()]
        else:  # inference: the routers return no aux losses (see `Routing`)
            aux_terms, weights = [], []
        aux_value = _sum_or_zero(aux_terms, logits)
        if any(w != 1.0 for w in weights):
            aux_loss = _sum_or_zero([w * term for w, term in zip(weights, aux_terms)], logits)
        else:
            aux_loss = aux_value
        return GPTOutput(logits=logits, aux_loss=aux_loss, moe_stats=moe_stats, aux_value=aux_value)

    def final_hidden(
        self,
        idx_BT: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        key_mask_BL: torch.Tensor | None = None,
        positions_BT: torch.Tensor | None = None,
        token_mask_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, MoEStats]]:
        """`forward` up to the LM head: the final norm's output [B, T, D] and the MoE statistics, so
        a caller wanting few rows' logits (an inference engine) multiplies only those by the head.
        `token_mask_BT` marks the real tokens where `key_mask_BL` is a full [B, 1, T, L] mask."""
        length = idx_BT.shape[1]
        if start_pos + length > self.config.max_seq_len:
            raise ValueError(f"sequence length {start_pos + length} exceeds max_seq_len={self.config.max_seq_len}")
        if positions_BT is None:
            positions = torch.arange(start_pos, start_pos + length, device=idx_BT.device)
        else:
            positions = positions_BT
        x = self.tok_emb(idx_BT)
        rope = None
        if self.rope is None:
            x = x + self.pos_emb(positions)
        else:
            rope = self.rope.cos_sin(positions.expand(idx_BT.shape[0], length), x.dtype)
        x = self.drop(x)
        moe_stats: dict[int, MoEStats] = {}
        if token_mask_BT is None and key_mask_BL is not None and key_mask_BL.dim() == 2:
            token_mask_BT = key_mask_BL[:, -length:].bool()
        for i, block in enumerate(self.blocks):
            x, stats = block(x, kv_cache, start_pos, rope, key_mask_BL, token_mask_BT)
            if stats is not None:
                moe_stats[i] = stats
        return self.ln_f(x), moe_stats

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg = self.config
        p = self.tok_emb.weight
        if cfg.attention == "latent":
            return LatentKVCache(cfg.n_layers, batch_size, max_len or cfg.max_seq_len, cfg.mla_kv_rank,
                                 cfg.mla_rope_dim, dtype=p.dtype, device=p.device)
        return KVCache(
            cfg.n_layers, batch_size, cfg.kv_heads, max_len or cfg.max_seq_len, cfg.attn_head_dim,
            dtype=p.dtype, device=p.device,
        )


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_active_parameters(model: GPT) -> int:
    """Parameters one token passes through: every expert layer counts top_k experts, not all."""
    total = count_parameters(model)
    for block in model.blocks:
        if block.is_moe:
            experts = block.ffn.experts
            per_expert = sum(p[0].numel() for p in experts.parameters())
            total -= per_expert * (experts.num_experts - block.ffn.config.top_k)
    return total
