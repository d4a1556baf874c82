"""KV caches for continuous batching: every sequence owns one slot for its whole life, so sequences
of different lengths run together and join or leave between steps without touching the others.

- `SlotKVCache`: a slot is a row of each layer's [slots, Hkv, max_len, Dh] buffers (every slot
  reserves the whole context).
- `PagedKVCache` (the engine's): a slot is a row of a block table over [blocks, Hkv, block_size, Dh]
  buffers; a sequence holds the blocks of the positions it has filled, and sequences with a common
  prompt prefix share its full blocks (`BlockAllocator`), and the same prompt its partial last
  block too, copied when the sharer first writes into it (copy-on-write).

Legend: S slots, B active rows, Hkv key/value heads, L key positions, Dh head width, T new tokens.
(Models with latent attention cache [S, 1, L, latent] instead; the slot logic is the same.)
A departing sequence's slot is free for the next one; nothing is copied.

A paged cache may hold int8 keys and values (`kv_dtype="int8"`): each (position, head) row is stored
as int8 with one fp32 scale (symmetric, scale = max|x| / 127), quantized when written and read back
as int8 x scale. At long contexts decode time is mostly reading the cache: int8 reads about half the
bytes of bf16 per position.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import torch

KV_CACHE_DTYPES = ("auto", "bf16", "int8")


def check_kv_cache_dtype(kv_dtype: str, model_dtype: torch.dtype) -> None:
    """A one-line ValueError for a KV cache dtype the engine cannot keep. "auto" and "bf16" keep the
    cache in the model's dtype (bf16 asks that it be bf16); "int8" quantizes it."""
    if kv_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_dtype!r}")
    if kv_dtype == "bf16" and model_dtype != torch.bfloat16:
        raise ValueError(f"kv_cache_dtype: bf16 keeps the cache in the model's dtype, which is {model_dtype} "
                         "here (use auto or int8)")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and an fp32 scale per row of x's last dimension: scale = max|x| / 127 (0 for a row
    of zeros), value = round-half-even(x / scale), as the native step quantizes (native_attention.h)."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    return torch.round(x / divisor).clamp_(-127, 127).to(torch.int8), scale


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


class BlockAllocator:
    """Blocks of a paged cache: reference counts, and full prompt blocks kept by content hash
    (prefix caching). A block whose last user left but whose hash is known stays reusable until a
    new block is needed and none is free (least recently released first)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # holding nothing anyone may reuse
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}
        self._by_hash: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks still holding a known prefix
        self.hit_tokens = 0  # prompt tokens served from cached blocks (full ones and shared partial ones)
        self.copies = 0  # shared partial blocks copied on a sharer's first write into them

    @property
    def available(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    def cached(self, hashes: list[int]) -> list[int]:
        """The blocks holding the longest known prefix of these chained block hashes."""
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def acquire(self, shared: list[int], new: int, spare: int = 0) -> list[int] | None:
        """Reference `shared` and `new` fresh blocks; None (nothing taken) if they do not fit with
        `spare` blocks still available afterwards."""
        idle_shared = sum(1 for b in shared if b in self._idle)
        if new + spare > self.available - idle_shared:
            return None
        for block in shared:
            self._idle.pop(block, None)
            self._refs[block] += 1
        fresh = [self._take() for _ in range(new)]
        for block in fresh:
            self._refs[block] = 1
        return shared + fresh

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._idle.popitem(last=False)  # evict the least recently released prefix
        del self._by_hash[self._hash_of.pop(block)]
        return block

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            assert self._refs[block] >= 0
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def publish(self, block: int, block_hash: int) -> None:
        """`block` now holds the prefix whose chained hash is `block_hash` (fully written)."""
        if block_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash


class PagedKVCache(SlotKVCache):
    """A KV cache of fixed-size blocks: per layer [blocks, Hkv, block_size, Dh] (or MLA's
    [blocks, 1, block_size, latent]); slot s's position p lives in row p % block_size of block
    block_table[s, p // block_size]. Memory follows the tokens in use: a sequence takes the blocks of
    its prompt when it enters (`reserve`) and one more whenever it reaches a new block (`extend`),
    returns them when it leaves, and shares the full blocks of a prompt prefix it has in common with
    a sequence before it (`n` choices, a common system prompt).

    A sequence whose prompt is that of a running one (`n` choices) also shares the prompt's partial
    last block: the rows of every prompt position but the last (whose logits each sequence needs, so
    it computes that row itself). Its first write goes into that block, so before it the block is
    copied into one the sequence took when it entered (`copy_on_write`): its memory is reserved as
    for any block, and what is saved is computing the shared rows. The owner's later writes go to
    rows past the shared ones, so it never copies.

    Legend as above; N blocks, bs block size, M blocks per sequence."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: int, max_len: int,
                 block_size: int, scales: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
                 dtype: torch.dtype | None = None):
        """`scales` (int8 keys and values): per layer the keys' and the values' fp32 scales
        [blocks, Hkv, block_size]; reads then come back dequantized in `dtype` (the model's)."""
        super().__init__(keys, values, max_len)
        assert (scales is None) == (keys[0].dtype != torch.int8) and (scales is None or dtype is not None)
        self.key_scales, self.value_scales = scales if scales is not None else (None, None)
        self.dtype = dtype if dtype is not None else keys[0].dtype  # what reads return
        self.slots, self.block_size = slots, block_size
        self.max_blocks = -(-max_len // block_size)
        # On the CPU: the native step reads it in place; the PyTorch step copies what it needs per forward.
        self.block_table = torch.zeros(slots, self.max_blocks, dtype=torch.int64, device="cpu")
        self.allocator = BlockAllocator(keys[0].shape[0])
        self._blocks: list[list[int]] = [[] for _ in range(slots)]
        self._hashes: list[list[int]] = [[] for _ in range(slots)]  # chained hashes of full prompt blocks
        self._published = [0] * slots
        # Partial last prompt blocks: (key, block index, rows) a slot will offer once written; key ->
        # block of the offered ones (while their writer holds them); (block index, copy target) of
        # a slot that shares one and has not written into it yet.
        self._partial: list[tuple[int, int, int] | None] = [None] * slots
        self._offered: dict[int, int] = {}
        self._offered_by: list[int | None] = [None] * slots
        self._cow: list[tuple[int, int] | None] = [None] * slots
        self.pending_copies = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, slots: int, max_len: int, num_blocks: int | None = None,
                  block_size: int = 16, kv_dtype: str = "auto") -> PagedKVCache:
        """`num_blocks` defaults to every slot's whole context (what a slot cache reserves);
        `kv_dtype` as `check_kv_cache_dtype` takes it."""
        blocks = num_blocks if num_blocks is not None else slots * -(-max_len // block_size)
        if kv_dtype != "int8":
            check_kv_cache_dtype(kv_dtype, model.tok_emb.weight.dtype)
            template = model.new_kv_cache(batch_size=blocks, max_len=block_size)
            return cls(template.keys, template.values, slots, max_len, block_size)
        one = model.new_kv_cache(batch_size=1, max_len=block_size)  # the shapes, without a full-size copy
        shape, device = (blocks, *one.keys[0].shape[1:]), one.keys[0].device
        zeros = lambda dtype, size: [torch.zeros(size, dtype=dtype, device=device) for _ in one.keys]  # noqa: E731
        return cls(zeros(torch.int8, shape), zeros(torch.int8, shape), slots, max_len, block_size,
                   (zeros(torch.float32, shape[:3]), zeros(torch.float32, shape[:3])), one.keys[0].dtype)

    @property
    def int8(self) -> bool:
        return self.key_scales is not None

    def bytes(self) -> int:
        scales = [*self.key_scales, *self.value_scales] if self.int8 else []
        return super().bytes() + sum(t.numel() * t.element_size() for t in scales)

    def prefill(self, slot: int) -> SlotKVCache:
        raise ValueError("paged kv cache: a forward's rows go through rows(), not prefill()")

    def with_keys(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> PagedKVCache:
        """The same geometry over other buffers (a tensor-parallel rank's share of the heads)."""
        if self.int8:
            raise ValueError("kv_cache_dtype: int8 is not split over tensor-parallel ranks (use auto)")
        return PagedKVCache(keys, values, self.slots, self.max_len, self.block_size)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def reserve(self, slot: int, prompt_ids: list[int], tokens: int, share: bool = True,
                spare: int = 0) -> int | None:
        """Blocks for `tokens` positions of the sequence entering `slot` (more come by `extend`),
        reusing cached blocks of its prompt's full-block prefix when `share`, and a running
        sequence's partial last block of the same prompt. Returns how many prompt tokens are already
        cached (short of the last prompt token: its logits are needed), or None if the blocks are
        not there with `spare` blocks left over (the request waits)."""
        bs = self.block_size
        hashes = self.block_hashes(prompt_ids)
        full, rows, key = self._prefix(prompt_ids, hashes)
        shared = self.allocator.cached(hashes[:full]) if share else []
        borrowed = self._offered.get(key) if share and rows and len(shared) == full else None
        held = shared + ([borrowed] if borrowed is not None else [])
        # The copy target of a borrowed block is taken now, with the rest: the copy cannot fail later.
        blocks = self.allocator.acquire(held, self.blocks_for(tokens) - len(shared), spare)
        if blocks is None:
            return None
        if borrowed is not None:
            self._cow[slot] = (full, blocks[full + 1])
            self.pending_copies += 1
            blocks = blocks[: full + 1] + blocks[full + 2 :]
        self._blocks[slot], self._hashes[slot], self._published[slot] = blocks, hashes, len(shared)
        self._partial[slot] = (key, full, rows) if rows and borrowed is None else None
        self.block_table[slot, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64, device="cpu")
        cached = len(shared) * bs + (rows if borrowed is not None else 0)
        self.allocator.hit_tokens += cached
        return cached

    def _prefix(self, prompt_ids: list[int], hashes: list[int]) -> tuple[int, int, int]:
        """The full blocks before the prompt's last position, the rows of the partial block after
        them, and that partial block's key (its tokens after the full blocks' chained hash)."""
        bs = self.block_size
        full, rows = divmod(len(prompt_ids) - 1, bs)
        key = hash((hashes[full - 1] if full else 0, tuple(prompt_ids[full * bs : full * bs + rows]))) if rows else 0
        return full, rows, key

    def copy_on_write(self, slots: list[int]) -> None:
        """Before a forward that writes rows of `slots`: a slot still sharing a partial block gets
        its own copy (or keeps the block, if its writer has left it)."""
        for slot in set(slots):
            pending = self._cow[slot]
            if pending is None:
                continue
            index, target = pending
            self._cow[slot] = None
            self.pending_copies -= 1
            source = self._blocks[slot][index]
            if self.allocator.refs(source) == 1:  # nobody else reads it any more
                self.allocator.release([target])
                continue
            for buffer in (*self.keys, *self.values):
                buffer[target].copy_(buffer[source])
            self._blocks[slot][index] = target
            self.block_table[slot, index] = target
            self.allocator.release([source])
            self.allocator.copies += 1

    def extend(self, slot: int, tokens: int) -> bool:
        """The sequence in `slot` holds the blocks of its first `tokens` positions, taking new ones
        if needed; False (nothing taken) if there are none."""
        held = self._blocks[slot]
        fresh = self.allocator.acquire([], max(0, self.blocks_for(tokens) - len(held)))
        if fresh is None:
            return False
        if fresh:
            self.block_table[slot, len(held) : len(held) + len(fresh)] = torch.tensor(fresh, dtype=torch.int64)
            held += fresh
        return True

    def block_hashes(self, prompt_ids: list[int]) -> list[int]:
        """Chained hashes of the prompt's full blocks: block i's names the whole prefix up to it."""
        hashes, h, bs = [], 0, self.block_size
        for start in range(0, len(prompt_ids) - bs + 1, bs):
            h = hash((h, tuple(prompt_ids[start : start + bs])))
            hashes.append(h)
        return hashes

    def being_written(self, prompt_ids: list[int]) -> bool:
        """A running sequence is still writing this prompt's first block (the same prompt, or one
        with a common preamble), or the partial last block of the same prompt: waiting a few steps
        lets the prompt share them instead of computing them."""
        if len(prompt_ids) > self.block_size:
            first = self.block_hashes(prompt_ids[: self.block_size])[0]
            if first not in self.allocator._by_hash and any(
                    hashes and hashes[0] == first and published == 0
                    for hashes, published in zip(self._hashes, self._published)):
                return True
        full, rows, key = self._prefix(prompt_ids, self.block_hashes(prompt_ids))
        return rows > 0 and key not in self._offered and any(p is not None and p[0] == key for p in self._partial)

    def written(self, slot: int, positions: int) -> None:
        """The sequence in `slot` has its first `positions` positions written: its full prompt
        blocks among them become shareable, and its partial last prompt block once its rows are."""
        full = min(positions // self.block_size, len(self._hashes[slot]))
        for i in range(self._published[slot], full):
            self.allocator.publish(self._blocks[slot][i], self._hashes[slot][i])
        self._published[slot] = max(self._published[slot], full)
        partial = self._partial[slot]
        if partial is not None and positions >= partial[1] * self.block_size + partial[2]:
            self._partial[slot] = None
            if partial[0] not in self._offered:
                self._offered[partial[0]] = self._blocks[slot][partial[1]]
                self._offered_by[slot] = partial[0]

    def free(self, slot: int) -> None:
        self.allocator.release(self._blocks[slot])
        if self._cow[slot] is not None:
            self.allocator.release([self._cow[slot][1]])
            self._cow[slot] = None
            self.pending_copies -= 1
        if self._offered_by[slot] is not None:  # released, the block may go to a new sequence: no more sharers
            del self._offered[self._offered_by[slot]]
            self._offered_by[slot] = None
        self._blocks[slot], self._hashes[slot], self._partial[slot] = [], [], None

    def rows(self, slots_G: list[int], starts_G: list[int], lengths_G: list[int], total: int) -> PagedKVCache:
        """As SlotKVCache.rows, through the block table: writes go to (block, row) pairs; reads
        gather each slot's blocks into [G, Hkv, total, Dh]."""
        device, bs = self.keys[0].device, self.block_size
        self._slot, self._length = None, total
        g_M = [g for g, n in enumerate(lengths_G) for _ in range(n)]
        t_M = [t for n in lengths_G for t in range(n)]
        position_M = [starts_G[g] + t for g, t in zip(g_M, t_M)]
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
        block_M = [self._blocks[slots_G[g]][p // bs] for g, p in zip(g_M, position_M)]
        self._writes = (as_tensor(g_M), as_tensor(t_M), as_tensor(block_M), as_tensor([p % bs for p in position_M]))
        used = self.blocks_for(total)
        self._read = as_tensor([self._blocks[s][:used] + [self._blocks[s][0]] * (used - len(self._blocks[s][:used]))
                                for s in slots_G])  # [G, used blocks]
        return self

    def update(
        self, layer_idx: int, start_pos: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._writes is None:
            raise ValueError("paged kv cache: set the rows of the forward first (rows())")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        g_M, t_M, block_M, row_M = self._writes
        if not self.int8:
            keys[block_M, :, row_M] = k_BHTd[g_M, :, t_M]
            values[block_M, :, row_M] = v_BHTd[g_M, :, t_M]
            return self._gather(keys), self._gather(values)
        out = []
        for x_BHTd, buffer, scales in ((k_BHTd, keys, self.key_scales[layer_idx]),
                                       (v_BHTd, values, self.value_scales[layer_idx])):
            buffer[block_M, :, row_M], scales[block_M, :, row_M] = quantize_rows(x_BHTd[g_M, :, t_M])
            # Dequantized in fp32 (the native step's values exactly), then to the model's dtype.
            out.append((self._gather(buffer).float() * self._gather(scales.unsqueeze(-1))).to(self.dtype))
        return out[0], out[1]

    def _gather(self, buffer_NHbD: torch.Tensor) -> torch.Tensor:
        groups, used = self._read.shape
        blocks_GMHbD = buffer_NHbD.index_select(0, self._read.reshape(-1)).view(groups, used, *buffer_NHbD.shape[1:])
        heads, width = buffer_NHbD.shape[1], buffer_NHbD.shape[3]
        out = blocks_GMHbD.transpose(1, 2).reshape(groups, heads, used * self.block_size, width)
        return out[:, :, : self._length]
