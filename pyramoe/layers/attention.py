"""Causal multi-head self-attention with a KV-cache hook.

Legend: B batch, T new positions, H heads, Dh head width, L cached length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len

    def update(
        self, layer_idx: int, start_pos: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k_BHTd.shape[2]
        if end > self.max_len:
            raise ValueError(f"kv cache: position {end} exceeds max_len={self.max_len}")
        batch = k_BHTd.shape[0]
        self.keys[layer_idx][:batch, :, start_pos:end] = k_BHTd
        self.values[layer_idx][:batch, :, start_pos:end] = v_BHTd
        return self.keys[layer_idx][:batch, :, :end], self.values[layer_idx][:batch, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool = True, dropout: float = 0.0, layer_idx: int = 0):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.layer_idx = layer_idx
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x_BTD: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        batch, length, width = x_BTD.shape
        qkv = self.qkv(x_BTD).view(batch, length, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, Dh]
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)
        dropout = self.dropout if self.training else 0.0
        total = k.shape[2]
        if length == 1 or total == length:
            # One new position may attend to every key; with keys == queries the mask is the plain causal one.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, dropout_p=dropout)
        else:
            # Keys are positions [end - total, end): the cached prefix (if any) then the new ones.
            end = start_pos + length
            query_pos = torch.arange(start_pos, end, device=x_BTD.device)
            key_pos = torch.arange(end - total, end, device=x_BTD.device)
            mask_TL = query_pos.unsqueeze(1) >= key_pos.unsqueeze(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TL, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))
