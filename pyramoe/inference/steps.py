"""The engine's step interface: one forward over rows of (token, slot, position), logits of the rows
asked for out. The engine schedules above it; each implementation computes it its own way:

- `NativeStep`: the compiled CPU forward (`pyramoe.inference.native`), every row in one call.
- `TorchStep`: the model in PyTorch (any device, any parallelised model), rows grouped by slot
  into a right-padded batch with a per-row causal mask.

Rows of one slot must be consecutive in the call, at consecutive positions (a prompt chunk, or a
decode row); a row sees its slot's keys at positions up to its own, those this call writes included.
Both count the tokens each MoE layer routes to each expert (`expert_counts`).

Legend: N rows, R rows asked for logits, G slots in the call, T longest run of one slot, L keys, V vocabulary.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Protocol

import torch

from pyramoe.inference.kv_cache import SlotKVCache
from pyramoe.inference.native import NativeForward
from pyramoe.models import GPT


class ModelStep(Protocol):
    name: str  # "native", "pytorch"
    max_rows: int  # rows one call takes

    def forward(
        self, tokens_N: Sequence[int], slots_N: Sequence[int], positions_N: Sequence[int], logit_rows_R: Sequence[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """Runs the rows; returns the logits of rows `logit_rows_R` [R, V] (fp32, on the CPU or the
        model's device; valid until the next call) and each one's argmax."""
        ...

    def expert_counts(self) -> torch.Tensor:
        """Tokens routed to each expert so far, [MoE layers, max experts] int64 (a CPU copy)."""
        ...


def check_rows(tokens_N: Sequence[int], slots_N: Sequence[int], positions_N: Sequence[int],
               logit_rows_R: Sequence[int], max_rows: int) -> None:
    rows = len(tokens_N)
    if not 1 <= rows <= max_rows or len(slots_N) != rows or len(positions_N) != rows:
        raise ValueError(f"step: {rows} rows (with {len(slots_N)} slots, {len(positions_N)} positions), "
                         f"sized for 1..{max_rows}")
    if any(not 0 <= r < rows for r in logit_rows_R):
        raise ValueError(f"step: logit rows must be in [0, {rows})")


class NativeStep:
    """The compiled CPU forward over preallocated buffers: lists in, no tensors made per call (a
    batch-1 decode step spent ~0.1 ms of its ~2 ms making small tensors)."""

    name = "native"

    def __init__(self, native: NativeForward, moe_layers: list[int]):
        self.native, self.max_rows = native, native.max_rows
        self._moe_layers = moe_layers
        rows = self.max_rows
        self._tokens, self._slots, self._positions, self._picks, self._argmax = ((ctypes.c_int64 * rows)()
                                                                                 for _ in range(5))
        self._logits = torch.empty(rows, native.model.config.vocab_size, device="cpu")  # the native call writes it

    def forward(
        self, tokens_N: Sequence[int], slots_N: Sequence[int], positions_N: Sequence[int], logit_rows_R: Sequence[int]
    ) -> tuple[torch.Tensor, list[int]]:
        check_rows(tokens_N, slots_N, positions_N, logit_rows_R, self.max_rows)
        rows, picks = len(tokens_N), len(logit_rows_R)
        self._tokens[:rows], self._slots[:rows], self._positions[:rows] = tokens_N, slots_N, positions_N
        self._picks[:picks] = logit_rows_R
        self.native._call(self._tokens, self._slots, self._positions, rows, self._picks, picks, self._logits,
                           self._argmax)
        return self._logits[:picks], self._argmax[:picks]

    def expert_counts(self) -> torch.Tensor:
        return self.native.expert_counts[self._moe_layers].clone()


class TorchStep:
    """The model's own forward: rows grouped by slot into a [G, T] batch, right-padded; each query
    sees its slot's keys up to its position (an additive mask), padding skips the MoE layers and is
    never written to the cache. Only the rows asked for go through the LM head.

    `logits_source`: under torchrun every rank runs the same rows in lockstep (experts spread over
    them); that rank's logits decide for all, so a last-bit difference never makes ranks diverge."""

    name = "pytorch"

    def __init__(self, model: GPT, cache: SlotKVCache, max_rows: int, logits_source: int | None = None):
        self.model, self.cache, self.max_rows, self.logits_source = model, cache, max_rows, logits_source
        self.device = next(model.parameters()).device
        self._moe_blocks = [i for i, block in enumerate(model.blocks) if block.is_moe]
        experts = max((model.blocks[i].ffn.config.num_experts for i in self._moe_blocks), default=1)
        self._counts = torch.zeros(len(self._moe_blocks), experts, dtype=torch.int64, device=self.device)

    def forward(
        self, tokens_N: Sequence[int], slots_N: Sequence[int], positions_N: Sequence[int], logit_rows_R: Sequence[int]
    ) -> tuple[torch.Tensor, list[int]]:
        check_rows(tokens_N, slots_N, positions_N, logit_rows_R, self.max_rows)
        slots_G, starts_G, lengths_G, first_row_G = _runs_by_slot(slots_N, positions_N)
        groups, longest = len(slots_G), max(lengths_G)
        total = max(s + n for s, n in zip(starts_G, lengths_G))
        if total > self.cache.max_len:
            raise ValueError(f"step: position {total - 1} is outside the cache ({self.cache.max_len} positions)")
        # Padding repeats each run's last token and position: valid embeddings, never written.
        index_GT = [[first + min(t, n - 1) for t in range(longest)] for first, n in zip(first_row_G, lengths_G)]
        device = self.device
        tokens_GT = torch.tensor([[tokens_N[i] for i in row] for row in index_GT], device=device)
        positions_GT = torch.tensor([[positions_N[i] for i in row] for row in index_GT], device=device)
        real_GT = torch.tensor([[t < n for t in range(longest)] for n in lengths_G], device=device)
        visible_GTL = torch.arange(total, device=device) <= positions_GT[:, :, None]
        dtype = getattr(self.cache, "dtype", self.cache.keys[0].dtype)  # an int8 cache's reads come back in this
        mask_G1TL = torch.zeros(visible_GTL.shape, dtype=dtype, device=device)
        mask_G1TL = mask_G1TL.masked_fill_(~visible_GTL, float("-inf"))[:, None]
        cache = self.cache.rows(slots_G, starts_G, lengths_G, total)
        hidden_GTD, stats = self.model.final_hidden(tokens_GT, cache, 0, mask_G1TL, positions_GT, real_GT)
        for row, block in enumerate(self._moe_blocks):
            routed = stats[block].routed_per_expert
            self._counts[row, : routed.numel()] += routed
        # Row n of the call is batch position (g, n - first_row_G[g]).
        group_of = [g for g, n in enumerate(lengths_G) for _ in range(n)]
        flat_R = torch.tensor([group_of[r] * longest + r - first_row_G[group_of[r]] for r in logit_rows_R],
                              dtype=torch.int64, device=device)
        hidden_RD = hidden_GTD.reshape(groups * longest, -1).index_select(0, flat_R)
        logits_RV = self.model.lm_head(hidden_RD).float()
        if self.logits_source is not None:
            torch.distributed.broadcast(logits_RV, src=self.logits_source)
        return logits_RV, logits_RV.argmax(-1).tolist()  # one op for every greedy row of the step

    def expert_counts(self) -> torch.Tensor:
        return self._counts.cpu()


def _runs_by_slot(slots_N: Sequence[int], positions_N: Sequence[int]) -> tuple[list[int], ...]:
    """Split the rows into runs of one slot at consecutive positions: each run's slot, first
    position, length and first row."""
    slots, starts, lengths, firsts = [], [], [], []
    seen = set()
    for row, (slot, position) in enumerate(zip(slots_N, positions_N)):
        if slots and slots[-1] == slot and starts[-1] + lengths[-1] == position:
            lengths[-1] += 1
            continue
        if slot in seen:
            raise ValueError(f"step: rows of slot {slot} must be consecutive, at consecutive positions")
        seen.add(slot)
        slots.append(slot)
        starts.append(position)
        lengths.append(1)
        firsts.append(row)
    return slots, starts, lengths, firsts
