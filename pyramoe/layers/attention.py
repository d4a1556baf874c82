"""Causal multi-head self-attention with a KV-cache hook.

Legend: B batch, T new positions, H query heads, Hkv key/value heads, Dh head width, L key positions
(cached + new).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyramoe.layers.norms import RMSNorm
from pyramoe.layers.rope import apply_rope

# torch >= 2.5 attends grouped-query heads in SDPA itself (enable_gqa); older torch repeats k/v.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


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
    """Multi-head (n_kv_heads == n_heads) or grouped-query attention, with optional RoPE, q/k
    RMSNorm and q/k/v clipping. q, k and v come from one fused projection, rows [q | k | v].

    `key_mask_BL` may also be a full [B, 1, T, L] attention mask (bool, or additive 0/-inf in the
    activations' dtype), used as given.
    `key_mask_BL` (bool, True for real tokens) covers every key slot [0, start_pos + T) of the
    batch; with it, queries see the keys at or before their own slot that are real tokens, plus
    always their own (a padding query would otherwise see no key at all, and softmax would give NaN).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        bias: bool = True,
        dropout: float = 0.0,
        layer_idx: int = 0,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool | None = None,
        qk_norm: str = "off",
        norm_eps: float = 1e-6,
        qkv_clip: float | None = None,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.layer_idx = layer_idx
        self.dropout = dropout
        self.qkv_clip = qkv_clip
        self.qk_norm = qk_norm
        q_width, kv_width = n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split = (q_width, kv_width, kv_width)
        self.qkv = nn.Linear(d_model, q_width + 2 * kv_width, bias=bias if qkv_bias is None else qkv_bias)
        self.proj = nn.Linear(q_width, d_model, bias=bias)
        if qk_norm != "off":
            # "head": one gain per head dimension, shared by heads (Qwen3); "full": over the whole projection (OLMoE).
            self.q_norm = RMSNorm(self.head_dim if qk_norm == "head" else q_width, norm_eps)
            self.k_norm = RMSNorm(self.head_dim if qk_norm == "head" else kv_width, norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x_BTD.shape
        q, k, v = self._project(x_BTD, rope)  # [B, H|Hkv, T, Dh], RoPE applied
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)
        if _use_decode_attention(q, key_mask_BL, self.training):
            return self.proj(decode_attention(q, k, v, key_mask_BL).reshape(batch, 1, -1))
        gqa = {}
        if self.n_kv_heads != self.n_heads:
            if _SDPA_GQA:  # each key/value head serves its group of query heads without a copy
                gqa = {"enable_gqa": True}
            else:
                group = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dropout = self.dropout if self.training else 0.0
        total = k.shape[2]
        if key_mask_BL is not None:
            # A [B, 1, T, L] mask is used as given: an engine whose rows sit at different positions
            # (continuous batching) knows which key slots each query may see; slots are not shared.
            mask = key_mask_BL if key_mask_BL.dim() == 4 else padded_causal_mask(key_mask_BL, start_pos, length, total)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, **gqa)
        elif length == 1 or total == length:
            # One new position may attend to every key; with keys == queries the mask is the plain causal one.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, dropout_p=dropout, **gqa)
        else:
            # Keys are positions [end - total, end): the cached prefix (if any) then the new ones.
            end = start_pos + length
            query_pos = torch.arange(start_pos, end, device=x_BTD.device)
            key_pos = torch.arange(end - total, end, device=x_BTD.device)
            mask_TL = query_pos.unsqueeze(1) >= key_pos.unsqueeze(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TL, dropout_p=dropout, **gqa)
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _project(
        self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = x_BTD.shape
        qkv = self.qkv(x_BTD)
        if self.qk_norm == "off" and self.qkv_clip is None:
            # q and k rotated together, as one view of the fused projection: a decode step is mostly
            # small ops, and this halves those of RoPE.
            heads_BHTD = qkv.view(batch, length, -1, self.head_dim).transpose(1, 2)
            qk_heads = self.n_heads + self.n_kv_heads
            qk = heads_BHTD[:, :qk_heads]
            if rope is not None:
                qk = apply_rope(qk, *rope)
            return qk[:, : self.n_heads], qk[:, self.n_heads :], heads_BHTD[:, qk_heads:]
        q, k, v = qkv.split(self.split, dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.qkv_clip is not None:
            q, k, v = (t.clamp(-self.qkv_clip, self.qkv_clip) for t in (q, k, v))
        q = q.view(batch, length, self.n_heads, self.head_dim)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v


def _use_decode_attention(q_BHTD: torch.Tensor, mask: torch.Tensor | None, training: bool) -> bool:
    """A decode step with an additive mask (the engine's) where `decode_attention` measured faster
    than SDPA: on the CPU with several rows (SDPA's flash kernel took 4x as long at 16 rows, 8 heads),
    on CUDA with one row (H100, bench model: 85 against 73 tok/s; at 16 rows SDPA won, 1,032 against
    815)."""
    if training or q_BHTD.shape[2] != 1 or mask is None or mask.dim() != 4 or not mask.is_floating_point():
        return False
    rows = q_BHTD.shape[0]
    return rows == 1 if q_BHTD.is_cuda else rows > 1 and q_BHTD.device.type == "cpu"


def decode_attention(
    q_BH1D: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor, mask_B11L: torch.Tensor
) -> torch.Tensor:
    """One query per row: softmax(q k^T / sqrt(Dh) + mask) v with scores in fp32, as two batched
    matmuls. The G query heads of a key/value head form that head's query block, so grouped-query
    attention needs no copy of k or v. Returns [B, H, 1, Dh] -> as [B, H * Dh] rows."""
    batch, heads, _, head_dim = q_BH1D.shape
    kv_heads, length = k_BKLD.shape[1], k_BKLD.shape[2]
    q_BKGD = q_BH1D.reshape(batch, kv_heads, heads // kv_heads, head_dim).float()
    scores_BKGL = torch.matmul(q_BKGD, k_BKLD.float().transpose(-1, -2)).mul_(head_dim**-0.5)
    scores_BKGL += mask_B11L.float().view(batch, 1, 1, length)
    probs_BKGL = scores_BKGL.softmax(-1).to(v_BKLD.dtype)
    return torch.matmul(probs_BKGL, v_BKLD).reshape(batch, heads * head_dim)


def padded_causal_mask(key_mask_BL: torch.Tensor, start_pos: int, length: int, total: int) -> torch.Tensor:
    """[B, 1, T, L] bool: query slot start_pos + t sees key slot j <= it when j holds a real token,
    and always its own slot."""
    if key_mask_BL.shape[1] != total:
        raise ValueError(f"attention mask: covers {key_mask_BL.shape[1]} positions, the keys are {total}")
    device = key_mask_BL.device
    query_pos_T = torch.arange(start_pos, start_pos + length, device=device)
    key_pos_L = torch.arange(total, device=device) + (start_pos + length - total)
    causal_TL = query_pos_T.unsqueeze(1) >= key_pos_L.unsqueeze(0)
    own_TL = query_pos_T.unsqueeze(1) == key_pos_L.unsqueeze(0)
    mask_BTL = (causal_TL & key_mask_BL.bool().unsqueeze(1)) | own_TL
    return mask_BTL.unsqueeze(1)
