"""Attention over a paged KV cache with shapes fixed by the caller, not by the rows' contents: the
inference step of an accelerator, where one captured graph serves every step of a bucket.

A step's N rows (tokens of several sequences, padded to the bucket) are projected together. Each
row's key and value go to its (block, offset) of the cache; padding rows repeat a real row's write,
same source row, same place, so a duplicate writes equal bytes whichever lands last. Attention then
runs on a [G, T] grid: group g is one sequence's consecutive rows (a decode row, T = 1, or a prompt
chunk), its keys are the M blocks of its sequence gathered into [Hkv, M * block_size, Dh], and each
cell sees the keys up to its own position (its length, given as a tensor). Padding cells point at a
real row and its position: they compute something valid that nobody reads.

Legend: N rows, G groups, T rows per group, M blocks per group, H query heads, Hkv key/value heads,
Dh head width, L = M * block_size keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyramoe.layers.attention import _SDPA_GQA, CausalSelfAttention


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
    key_position_L = torch.arange(k_GKLD.shape[2], device=x_ND.device)
    hidden_GTL = key_position_L > rows.key_limit_GT.unsqueeze(-1)
    mask_G1TL = torch.zeros(hidden_GTL.shape, dtype=q_GHTD.dtype, device=x_ND.device)
    mask_G1TL = mask_G1TL.masked_fill_(hidden_GTL, float("-inf")).unsqueeze(1)
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
