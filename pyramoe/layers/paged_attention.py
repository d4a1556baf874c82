"""Attention over a paged KV cache with shapes fixed by the caller, not by the rows' contents: the
inference step of an accelerator, where one captured graph serves every step of a bucket.

A step's N rows (tokens of several sequences, padded to the bucket) are projected together. Each
row's key and value go to its (block, offset) of the cache; padding rows repeat a real row's write,
same source row, same place, so a duplicate writes equal bytes whichever lands last. Attention then
runs on a [G, T] grid: group g is one sequence's consecutive rows (a decode row, T = 1, or a prompt
chunk), its keys are the M blocks of its sequence gathered into [Hkv, M * block_size, Dh], and each
cell sees the keys up to its own position (its length, given as a tensor). Padding cells point at a
real row and its position: they compute something valid that nobody reads.

Latent attention (MLA, `paged_latent_attention`) caches each position's normed latent and rotated
key (the layer's `LatentKVCache` layout, in blocks) and attends in the latent space: `wkv_b`'s key
half is absorbed into the queries and its value half applied after, so a step reads R + r numbers
per cached position and never re-expands the cache per head (DeepSeek-V2's inference form).

Legend: N rows, G groups, T rows per group, M blocks per group, H query heads, Hkv key/value heads,
Dh head width, L = M * block_size keys; MLA: R latent rank, r rotary width, n non-rotary q/k width,
Dv value width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyramoe.layers.attention import _SDPA_GQA, CausalSelfAttention
from pyramoe.layers.mla import LatentAttention, apply_rope_interleaved
from pyramoe.layers.rope import apply_rope


@dataclass
class PagedRows:
    """Where a step's rows write and read the cache (int64 device tensors of the bucket's shapes)."""

    write_block_N: torch.Tensor  # the block each row's key/value goes to
    write_offset_N: torch.Tensor  # its row within that block
    write_source_N: torch.Tensor  # the row whose key/value goes there (padding rows: a real row's)
    grid_row_GT: torch.Tensor  # [G, T]: the row each cell of the attention grid computes
    key_limit_GT: torch.Tensor  # [G, T]: the last key position each cell sees (its row's position)
    cell_of_row_N: torch.Tensor  # each row's cell in the flattened grid
    blocks_GM: torch.Tensor  # [G, M]: the blocks holding each group's keys, in position order
    block_size: int


def paged_attention(attn: CausalSelfAttention, x_ND: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                    keys: torch.Tensor, values: torch.Tensor, rows: PagedRows) -> torch.Tensor:
    """`attn`'s output [N, D] for rows `x_ND`; writes their keys and values into one layer's
    cache buffers `keys`/`values` ([blocks, Hkv, block_size, Dh]) first, so a row sees its own."""
    q_1HND, k_1KND, v_1KND = attn._project(x_ND.unsqueeze(0), rope)  # the layer's norms, clipping and RoPE
    k_NKD, v_NKD = k_1KND[0].transpose(0, 1), v_1KND[0].transpose(0, 1)
    keys[rows.write_block_N, :, rows.write_offset_N] = k_NKD.index_select(0, rows.write_source_N)
    values[rows.write_block_N, :, rows.write_offset_N] = v_NKD.index_select(0, rows.write_source_N)
    groups, per_group = rows.grid_row_GT.shape
    q_GHTD = (q_1HND[0].transpose(0, 1).index_select(0, rows.grid_row_GT.reshape(-1))
              .view(groups, per_group, attn.n_heads, attn.head_dim).transpose(1, 2))
    k_GKLD, v_GKLD = _gather_blocks(keys, rows.blocks_GM), _gather_blocks(values, rows.blocks_GM)
    mask_G1TL = _key_mask(rows, k_GKLD.shape[2], q_GHTD.dtype)
    gqa = {}
    if attn.n_kv_heads != attn.n_heads:
        if _SDPA_GQA:
            gqa = {"enable_gqa": True}
        else:
            group = attn.n_heads // attn.n_kv_heads
            k_GKLD, v_GKLD = k_GKLD.repeat_interleave(group, dim=1), v_GKLD.repeat_interleave(group, dim=1)
    out_GHTD = F.scaled_dot_product_attention(q_GHTD, k_GKLD, v_GKLD, attn_mask=mask_G1TL, **gqa)
    out_ND = out_GHTD.transpose(1, 2).reshape(groups * per_group, -1).index_select(0, rows.cell_of_row_N)
    return attn.proj(out_ND)


def _gather_blocks(buffer_BKbD: torch.Tensor, blocks_GM: torch.Tensor) -> torch.Tensor:
    """[G, Hkv, M * block_size, Dh]: each group's blocks, one after the other."""
    groups, per_group = blocks_GM.shape
    _, heads, block_size, width = buffer_BKbD.shape
    gathered = buffer_BKbD.index_select(0, blocks_GM.reshape(-1)).view(groups, per_group, heads, block_size, width)
    return gathered.transpose(1, 2).reshape(groups, heads, per_group * block_size, width)


def paged_latent_attention(attn: LatentAttention, x_ND: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                           latents: torch.Tensor, rotary_keys: torch.Tensor, rows: PagedRows) -> torch.Tensor:
    """`attn`'s output [N, D] for rows `x_ND`; writes their normed latents and rotated keys into one
    layer's cache buffers (`latents` [blocks, 1, block_size, R], `rotary_keys` [.., r]) first."""
    heads, nope, latent_rank = attn.n_heads, attn.nope_dim, attn.kv_rank
    x_1ND = x_ND.unsqueeze(0)
    q = attn.wq(x_1ND) if hasattr(attn, "wq") else attn.wq_b(attn.q_a_norm(attn.wq_a(x_1ND)))
    q_nope_1HNn, q_rot_1HNr = q.view(1, -1, heads, nope + attn.rope_dim).transpose(1, 2).split(
        (nope, attn.rope_dim), dim=-1)
    latent_1NR, k_rot_1Nr = attn.wkv_a(x_1ND).split((latent_rank, attn.rope_dim), dim=-1)
    rotate = apply_rope_interleaved if attn.rope_interleave else apply_rope
    q_rot_1HNr, k_rot_11Nr = rotate(q_rot_1HNr, *rope), rotate(k_rot_1Nr.unsqueeze(1), *rope)
    latent_N1R = attn.kv_a_norm(latent_1NR)[0].unsqueeze(1)
    latents[rows.write_block_N, :, rows.write_offset_N] = latent_N1R.index_select(0, rows.write_source_N)
    rotary_keys[rows.write_block_N, :, rows.write_offset_N] = (
        k_rot_11Nr[0].transpose(0, 1).index_select(0, rows.write_source_N))
    w_HDR = attn.wkv_b.weight.view(heads, nope + attn.v_dim, latent_rank)
    w_key_HnR, w_value_HvR = w_HDR[:, :nope], w_HDR[:, nope:]
    # Absorbed keys: q_nope . (W_k latent) = (q_nope W_k) . latent, one [H, N, R] product per step.
    q_HN = torch.cat([torch.matmul(q_nope_1HNn[0], w_key_HnR), q_rot_1HNr[0]], dim=-1)  # [H, N, R + r]
    groups, per_group = rows.grid_row_GT.shape
    q_GHTW = q_HN.index_select(1, rows.grid_row_GT.reshape(-1)).view(heads, groups, per_group, -1).transpose(0, 1)
    latent_G1LR = _gather_blocks(latents, rows.blocks_GM)
    k_G1LW = torch.cat([latent_G1LR, _gather_blocks(rotary_keys, rows.blocks_GM)], dim=-1)
    mask_G1TL = _key_mask(rows, k_G1LW.shape[2], q_GHTW.dtype)
    scale = attn.softmax_scale if attn.softmax_scale is not None else (nope + attn.rope_dim) ** -0.5
    out_GHTR = F.scaled_dot_product_attention(q_GHTW, k_G1LW.expand(-1, heads, -1, -1),
                                              latent_G1LR.expand(-1, heads, -1, -1), attn_mask=mask_G1TL, scale=scale)
    out_GHTv = torch.matmul(out_GHTR, w_value_HvR.transpose(1, 2))  # the value half of wkv_b, after attention
    out_ND = out_GHTv.transpose(1, 2).reshape(groups * per_group, -1).index_select(0, rows.cell_of_row_N)
    return attn.proj(out_ND)


def _key_mask(rows: PagedRows, keys: int, dtype: torch.dtype) -> torch.Tensor:
    """[G, 1, T, L] additive mask: each cell sees the keys up to its own position."""
    key_position_L = torch.arange(keys, device=rows.key_limit_GT.device)
    hidden_GTL = key_position_L > rows.key_limit_GT.unsqueeze(-1)
    mask_GTL = torch.zeros(hidden_GTL.shape, dtype=dtype, device=hidden_GTL.device)
    return mask_GTL.masked_fill_(hidden_GTL, float("-inf")).unsqueeze(1)
