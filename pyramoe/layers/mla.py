"""Multi-head latent attention (MLA, DeepSeek-V2/V3), with a cache of the compressed latent.

Legend: B batch, T new positions, H heads, L key positions (cached + new), R kv latent rank,
r rotary dimensions per head (one rotary key shared by all heads), n non-rotary q/k dimensions per
head, Dv value dimensions per head.

Keys and values are not projected per head from x: x -> [latent (R) | rotary key (r)], the latent is
RMS-normed and expanded per head by `wkv_b` into [k_nope (n) | v (Dv)]. The cache holds only the
normed latent and the rotated key, R + r numbers per position instead of H * (n + r + Dv), and the
keys/values are re-expanded from it each step (as transformers does; absorbing `wkv_b` into the
query and output projections would save that work and is left to the inference engine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyramoe.layers.attention import KVCache, padded_causal_mask
from pyramoe.layers.norms import RMSNorm
from pyramoe.layers.rope import apply_rope

# DeepSeek's q/kv latent RMSNorms use this epsilon whatever the model's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class LatentKVCache(KVCache):
    """Per layer: `keys` hold the normed kv latent [B, 1, L, R], `values` the rotated key [B, 1, L, r]."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, kv_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.keys = [torch.zeros(batch_size, 1, max_len, kv_rank, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(batch_size, 1, max_len, rope_dim, dtype=dtype, device=device)
                       for _ in range(n_layers)]
        self.max_len = max_len


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's weight layout); the result is laid
    out de-interleaved, [evens | odds], for queries and keys alike, so their dot products are unchanged."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]  # cos/sin are [angles | angles]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


class LatentAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        q_rank: int | None,
        kv_rank: int,
        nope_dim: int,
        rope_dim: int,
        v_dim: int,
        rope_interleave: bool = False,
        dropout: float = 0.0,
        layer_idx: int = 0,
        softmax_scale: float | None = None,
    ):
        super().__init__()
        self.softmax_scale = softmax_scale  # None: 1 / sqrt(q/k head width)
        self.n_heads, self.kv_rank = n_heads, kv_rank
        self.nope_dim, self.rope_dim, self.v_dim = nope_dim, rope_dim, v_dim
        self.rope_interleave = rope_interleave
        self.dropout = dropout
        self.layer_idx = layer_idx
        qk_dim = nope_dim + rope_dim
        if q_rank is None:
            self.wq = nn.Linear(d_model, n_heads * qk_dim, bias=False)
        else:
            self.wq_a = nn.Linear(d_model, q_rank, bias=False)
            self.q_a_norm = RMSNorm(q_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(q_rank, n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(d_model, kv_rank + rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(kv_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(kv_rank, n_heads * (nope_dim + v_dim), bias=False)
        self.proj = nn.Linear(n_heads * v_dim, d_model, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x_BTD.shape
        q = self.wq(x_BTD) if hasattr(self, "wq") else self.wq_b(self.q_a_norm(self.wq_a(x_BTD)))
        q_nope, q_rot = q.view(batch, length, self.n_heads, -1).transpose(1, 2).split(
            (self.nope_dim, self.rope_dim), dim=-1
        )
        latent, k_rot = self.wkv_a(x_BTD).split((self.kv_rank, self.rope_dim), dim=-1)
        latent_B1TR = self.kv_a_norm(latent).unsqueeze(1)
        k_rot_B1Tr = k_rot.unsqueeze(1)
        rotate = apply_rope_interleaved if self.rope_interleave else apply_rope
        q_rot, k_rot_B1Tr = rotate(q_rot, *rope), rotate(k_rot_B1Tr, *rope)
        if kv_cache is not None:
            latent_B1TR, k_rot_B1Tr = kv_cache.update(self.layer_idx, start_pos, latent_B1TR, k_rot_B1Tr)
        total = latent_B1TR.shape[2]
        k_nope, v = self.wkv_b(latent_B1TR.squeeze(1)).view(batch, total, self.n_heads, -1).transpose(1, 2).split(
            (self.nope_dim, self.v_dim), dim=-1
        )
        q = torch.cat([q_nope, q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot_B1Tr.expand(-1, self.n_heads, -1, -1)], dim=-1)
        mask = self._mask(key_mask_BL, start_pos, length, total, q.device)
        causal = key_mask_BL is None and total == length and length > 1
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                             scale=self.softmax_scale)
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))

    @staticmethod
    def _mask(
        key_mask_BL: torch.Tensor | None, start_pos: int, length: int, total: int, device: torch.device
    ) -> torch.Tensor | None:
        if key_mask_BL is not None:
            return key_mask_BL if key_mask_BL.dim() == 4 else padded_causal_mask(key_mask_BL, start_pos, length, total)
        if length == 1 or total == length:
            return None  # one new position sees every key; keys == queries: is_causal
        end = start_pos + length
        query_pos = torch.arange(start_pos, end, device=device)
        key_pos = torch.arange(end - total, end, device=device)
        return query_pos.unsqueeze(1) >= key_pos.unsqueeze(0)
