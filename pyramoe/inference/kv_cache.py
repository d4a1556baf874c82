"""A KV cache of slots for continuous batching: every sequence owns one slot (a row of each layer's
[slots, Hkv, max_len, Dh] buffers) for its whole life, so sequences of different lengths decode
together and join or leave between steps without touching the others.

Legend: S slots, B active rows, Hkv key/value heads, L key positions, Dh head width, T new tokens.
(Models with latent attention cache [S, 1, L, latent] instead; the slot logic is the same.)
A departing sequence's slot is free for the next one; nothing is copied.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Implements the model's cache hook (`update(layer, start_pos, k, v)`) in two modes, set before
    each forward: `prefill(slot)` writes a chunk of consecutive slots' sequences at start_pos;
    `rows(...)` writes ragged chunks of any slots, each at its own positions."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], max_len: int):
        """Per-layer buffers whose dimension 0 is the slot and dimension 2 the position (any head
        and width layout: [S, Hkv, L, Dh], or MLA's [S, 1, L, latent])."""
        self.keys, self.values = keys, values
        self.slots, self.max_len = keys[0].shape[0], max_len
        self._slot: int | None = None
        self._writes: tuple[torch.Tensor, ...] | None = None  # ragged mode: what goes where
        self._read: slice | torch.Tensor = slice(0)
        self._length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, slots: int, max_len: int) -> SlotKVCache:
        """Buffers shaped like the model's own cache (`model.new_kv_cache`), one slot per batch row."""
        template = model.new_kv_cache(batch_size=slots, max_len=max_len)
        return cls(template.keys, template.values, template.max_len)

    def prefill(self, slot: int) -> SlotKVCache:
        """The next forward writes a chunk of the sequences in slots [slot, slot + its batch size)."""
        self._slot, self._writes = slot, None
        return self

    def rows(self, slots_G: list[int], starts_G: list[int], lengths_G: list[int], total: int) -> SlotKVCache:
        """The next forward is ragged: batch row g holds lengths_G[g] new tokens (then padding) of the
        sequence in slot slots_G[g], at positions starts_G[g]...; attention then reads key positions
        [0, total) of those slots (the caller's mask says which each query sees). Padding is never
        written. Lists in: the plan is built on the host, once per forward, not per layer."""
        device = self.keys[0].device
        g_M = [g for g, n in enumerate(lengths_G) for _ in range(n)]
        t_M = [t for n in lengths_G for t in range(n)]
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
        self._slot, self._length = None, total
        self._writes = (as_tensor(g_M), as_tensor(t_M), as_tensor([slots_G[g] for g in g_M]),
                        as_tensor([starts_G[g] + t for g, t in zip(g_M, t_M)]))
        # Slots a, a+1, ... (one sequence, or sequences admitted together): plain views, no gather.
        first = slots_G[0]
        consecutive = slots_G == list(range(first, first + len(slots_G)))
        self._read = slice(first, first + len(slots_G)) if consecutive else as_tensor(slots_G)
        return self

    def update(
        self, layer_idx: int, start_pos: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._writes is None:
            assert self._slot is not None and self._slot + k_BHTd.shape[0] <= self.slots
            end = start_pos + k_BHTd.shape[2]
            if end > self.max_len:
                raise ValueError(f"kv cache: position {end} exceeds max_len={self.max_len}")
            rows = slice(self._slot, self._slot + k_BHTd.shape[0])
            keys[rows, :, start_pos:end] = k_BHTd
            values[rows, :, start_pos:end] = v_BHTd
            return keys[rows, :, :end], values[rows, :, :end]
        g_M, t_M, slot_M, position_M = self._writes
        keys[slot_M, :, position_M] = k_BHTd[g_M, :, t_M]
        values[slot_M, :, position_M] = v_BHTd[g_M, :, t_M]
        if isinstance(self._read, slice):
            return keys[self._read, :, : self._length], values[self._read, :, : self._length]
        return (keys[:, :, : self._length].index_select(0, self._read),
                values[:, :, : self._length].index_select(0, self._read))

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
