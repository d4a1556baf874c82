"""The engine's step interface (`pyramoe.inference.steps`): rows of (token, slot, position) of any
mix - prompt chunks at any start, decode rows, slots in any order - give the logits of one full
forward over each sequence, on the native step and the PyTorch step alike, for every block kind the
native step computes, over a slot cache and a paged one whose sequences hold scattered blocks; both
count the same tokens per expert."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from test_native_decode import CASES, _model  # noqa: I001 - the block kinds the native step computes

from pyramoe.inference.kv_cache import PagedKVCache, SlotKVCache
from pyramoe.inference.native import NativeForward, load_library
from pyramoe.inference.steps import NativeStep, TorchStep
from pyramoe.models import GPT

# Two calls over 4 slots: (slot, first position, length) runs. The second mixes a decode row, a
# prompt chunk continuing at position 7 and a new prompt, slots out of order.
CALLS = [[(2, 0, 7), (0, 0, 5)], [(0, 5, 1), (3, 0, 4), (2, 7, 3)]]


def _sequences(vocab: int) -> dict[int, list[int]]:
    generator = torch.Generator().manual_seed(3)
    return {slot: torch.randint(0, vocab, (10,), generator=generator).tolist() for slot in (0, 2, 3)}


def _cache(model: GPT, kind: str) -> SlotKVCache:
    """A slot cache, or a paged one (blocks of 4 positions) whose slots hold scattered blocks."""
    if kind == "slots":
        return SlotKVCache.for_model(model, 4, 32)
    cache = PagedKVCache.for_model(model, 4, 32, num_blocks=20, block_size=4)
    cache.allocator._free = deque(torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist())
    for slot in (3, 0, 2):
        assert cache.reserve(slot, [slot] * 3, 12) == 0
    assert any(b - a != 1 for a, b in zip(cache._blocks[0], cache._blocks[0][1:]))  # scattered
    return cache


def _run(step, sequences: dict[int, list[int]]) -> list[torch.Tensor]:
    out = []
    for runs in CALLS:
        tokens, slots, positions = [], [], []
        for slot, start, n in runs:
            tokens += sequences[slot][start : start + n]
            slots += [slot] * n
            positions += range(start, start + n)
        logits_RV, greedy_R = step.forward(tokens, slots, positions, list(range(len(tokens))))
        assert list(greedy_R) == logits_RV.argmax(-1).tolist()
        out.append(logits_RV.clone())
    return out


@torch.no_grad()
def _reference(model: GPT, sequences: dict[int, list[int]]) -> list[torch.Tensor]:
    full = {slot: model(torch.tensor([ids])).logits[0].float() for slot, ids in sequences.items()}
    return [torch.cat([full[slot][start : start + n] for slot, start, n in runs]) for runs in CALLS]


@pytest.mark.parametrize("kind", ["slots", "paged"])
@pytest.mark.parametrize("name", list(CASES))
def test_pytorch_step_rows_equal_full_forward(name, kind):
    model = _model(CASES[name], torch.float32)
    sequences = _sequences(model.config.vocab_size)
    step = TorchStep(model, _cache(model, kind), max_rows=16)
    with torch.no_grad():
        got = _run(step, sequences)
    for a, b in zip(got, _reference(model, sequences)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the native step is not built")
@pytest.mark.parametrize("kind", ["slots", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_native_step_equals_pytorch_step(name, dtype, kind):
    model = _model(CASES[name], dtype)
    sequences = _sequences(model.config.vocab_size)
    moe_layers = [i for i, block in enumerate(model.blocks) if block.is_moe]
    native = NativeStep(NativeForward(model, _cache(model, kind), 16), moe_layers)
    pytorch = TorchStep(model, _cache(model, kind), max_rows=16)
    with torch.no_grad():
        got, want = _run(native, sequences), _run(pytorch, sequences)
    tolerance = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)
    if dtype == torch.float32:  # a bf16 near-tie may route one token differently
        assert torch.equal(native.expert_counts(), pytorch.expert_counts())
    rows = sum(n for runs in CALLS for _, _, n in runs)
    top_k = [model.blocks[i].ffn.config.top_k for i in moe_layers]
    assert pytorch.expert_counts().sum(1).tolist() == [rows * k for k in top_k]


def test_rows_are_checked():
    model = _model(CASES["mixtral"], torch.float32)
    step = TorchStep(model, SlotKVCache.for_model(model, 2, 8), max_rows=4)
    with pytest.raises(ValueError, match="^step: 5 rows"):
        step.forward([1] * 5, [0] * 5, list(range(5)), [0])
    with pytest.raises(ValueError, match="consecutive"):
        step.forward([1, 1, 1], [0, 1, 0], [0, 0, 1], [0])
    with pytest.raises(ValueError, match="outside the cache"):
        step.forward([1], [0], [8], [0])
    with pytest.raises(ValueError, match="logit rows"):
        step.forward([1], [0], [0], [1])
