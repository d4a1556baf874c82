"""A KV cache of slots for continuous batching: every sequence owns one slot (a row of each layer's
[slots, Hkv, max_len, Dh] buffers) for its whole life, so sequences of different lengths decode
together and join or leave between steps without touching the others.

Legend: S slots, B active rows, Hkv key/value heads, L key positions, Dh head width, T new tokens.
(Models with latent attention cache [S, 1, L, latent] instead; the slot logic is the same.)
Active sequences always fill slots 0..B-1 (a departing one's slot is refilled by the last), so a
decode step reads plain views, never a gather of the whole cache.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Implements the model's cache hook (`update(layer, start_pos, k, v)`) in two modes, set before
    each forward: `prefill(slot)` writes a chunk of one sequence; `decode(positions, length)` writes
    one token per active row, row b at its own position."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], max_len: int):
        """Per-layer buffers whose dimension 0 is the slot and dimension 2 the position (any head
        and width layout: [S, Hkv, L, Dh], or MLA's [S, 1, L, latent])."""
        self.keys, self.values = keys, values
        self.slots, self.max_len = keys[0].shape[0], max_len
        self._slot: int | None = None
        self._rows_B: torch.Tensor | None = None
        self._positions_B: torch.Tensor | None = None
        self._length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, slots: int, max_len: int) -> SlotKVCache:
        """Buffers shaped like the model's own cache (`model.new_kv_cache`), one slot per batch row."""
        template = model.new_kv_cache(batch_size=slots, max_len=max_len)
        return cls(template.keys, template.values, template.max_len)

    def prefill(self, slot: int) -> SlotKVCache:
        """The next forward writes a chunk of the sequences in slots [slot, slot + its batch size)."""
        self._slot, self._positions_B = slot, None
        return self

    def decode(self, positions_B: torch.Tensor, length: int) -> SlotKVCache:
        """Row b writes at positions_B[b]; attention then reads key slots [0, length) of rows 0..B-1."""
        self._slot, self._positions_B, self._length = None, positions_B, length
        self._rows_B = torch.arange(positions_B.numel(), device=positions_B.device)
        return self

    def update(
        self, layer_idx: int, start_pos: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._positions_B is None:
            assert self._slot is not None and self._slot + k_BHTd.shape[0] <= self.slots
            end = start_pos + k_BHTd.shape[2]
            if end > self.max_len:
                raise ValueError(f"kv cache: position {end} exceeds max_len={self.max_len}")
            rows = slice(self._slot, self._slot + k_BHTd.shape[0])
            keys[rows, :, start_pos:end] = k_BHTd
            values[rows, :, start_pos:end] = v_BHTd
            return keys[rows, :, :end], values[rows, :, :end]
        keys[self._rows_B, :, self._positions_B] = k_BHTd[:, :, 0]
        values[self._rows_B, :, self._positions_B] = v_BHTd[:, :, 0]
        batch = self._rows_B.numel()
        return keys[:batch, :, : self._length], values[:batch, :, : self._length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (compaction)."""
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]
