"""The native step's attention at long positions (`pyramoe/kernels/native_attention.h`: tiles of 16
keys, online softmax, long rows split over the threads and merged): the PyTorch step's logits from
the same cache at 1-2K keys, rows of different lengths (split and unsplit) with a prefill chunk among
them, GQA, head widths on the AVX512 kernel and on the portable one, fp32 and bf16 caches whose
blocks are scattered; and the engine's greedy tokens after a long prompt."""

from __future__ import annotations

import copy
import dataclasses
from collections import deque

import pytest
import torch
from test_native_decode import CASES, _llama, _model  # noqa: I001 - the block kinds the native step computes

from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.kv_cache import PagedKVCache
from pyramoe.inference.native import NativeForward, load_library
from pyramoe.inference.steps import NativeStep, TorchStep
from pyramoe.models import GPT

pytestmark = pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the native step is not built")

CONTEXT = 2064
# (slot, first position, rows): decode rows at 1500, 2047 and 37 keys' positions, and a prefill
# chunk of 7 positions from 1030, in one call; the cache holds random keys and values before each.
RUNS = [(0, 1500, 1), (1, 1030, 7), (2, 2047, 1), (3, 37, 1)]
# The AVX512 kernel's paths: bf16 rows widened in pairs of 16-lane vectors (even head-width/16) or with
# a last single one (odd), query heads of a key/value head taken 16/C at a time for P.V (one group,
# several, a partial last one), MHA; the portable kernel for widths not a multiple of 16.
LONG_CASES = {
    "gqa, head width 16 (2 query heads per kv head)": CASES["mixtral"],
    "head width 64, 4 query heads per kv head": CASES["head width 64, 4 query heads per kv head"],
    "head width 128": CASES["head width 128"],
    "head width 128, 4 query heads per kv head (two head groups)": _llama(d_model=512, n_heads=4, n_kv_heads=1),
    "head width 48, 8 query heads per kv head (groups of 5 and 3)": _llama(d_model=384, n_heads=8, n_kv_heads=1),
    "mha, head width 32": _llama(d_model=128, n_heads=4, n_kv_heads=4),
    "head width 12 (portable kernel)": CASES["odd widths"],
}


def _long_model(name: str, dtype: torch.dtype) -> GPT:
    return _model(dataclasses.replace(LONG_CASES[name], max_seq_len=CONTEXT), dtype)


def _filled_cache(model: GPT, block_size: int = 16, ramp: float = 0.0) -> PagedKVCache:
    """A paged cache whose slots hold scattered blocks, every position random: keys large enough
    that a row's softmax peaks on a few of its 2K keys (a wrong merge or tile shows). `ramp` > 0
    scales position p's keys by 1 + ramp p: scores that keep rising along a row, so its running max
    moves again and again, by more than the kernel's slack, in late tiles and parts."""
    blocks = 4 * -(-CONTEXT // block_size)
    cache = PagedKVCache.for_model(model, 4, CONTEXT, num_blocks=blocks, block_size=block_size)
    cache.allocator._free = deque(torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).tolist())
    for slot in (2, 0, 3, 1):
        assert cache.reserve(slot, [slot], CONTEXT, share=False) == 0
    assert any(b - a != 1 for a, b in zip(cache._blocks[0], cache._blocks[0][1:]))  # scattered
    generator = torch.Generator().manual_seed(1)
    for keys, values in zip(cache.keys, cache.values):
        keys.copy_(4 * torch.randn(keys.shape, generator=generator))
        values.copy_(torch.randn(values.shape, generator=generator))
        if ramp:
            for slot in range(4):
                for i, block in enumerate(cache._blocks[slot]):
                    at = torch.arange(i * block_size, (i + 1) * block_size, dtype=torch.float32)
                    keys[block].mul_((1 + ramp * at).to(keys.dtype)[None, :, None])
    return cache


def _logits(step: object, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    tokens, slots, positions = [], [], []
    for slot, first, rows in RUNS:
        tokens += torch.randint(0, vocab, (rows,), generator=generator).tolist()
        slots += [slot] * rows
        positions += range(first, first + rows)
    with torch.no_grad():
        logits_RV, greedy_R = step.forward(tokens, slots, positions, list(range(len(tokens))))
    assert list(greedy_R) == logits_RV.argmax(-1).tolist()
    return logits_RV.float().clone()


def _native(model: GPT, **cache) -> torch.Tensor:
    return _logits(NativeStep(NativeForward(model, _filled_cache(model, **cache), 16), []), model.config.vocab_size)


def _pytorch(model: GPT, **cache) -> torch.Tensor:
    return _logits(TorchStep(model, _filled_cache(model, **cache), max_rows=16), model.config.vocab_size)


@pytest.mark.parametrize("name", list(LONG_CASES))
def test_long_rows_fp32_equal_pytorch(name):
    model = _long_model(name, torch.float32)
    torch.testing.assert_close(_native(model), _pytorch(model), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(LONG_CASES))
def test_long_rows_bf16_within_rounding(name):
    """A bf16 cache read as it is: the native step against the fp32 model over the same (bf16)
    keys, values and weights, within twice the bf16 PyTorch step's own distance from it."""
    model = _long_model(name, torch.bfloat16)
    native, reference = _native(model), _pytorch(model)
    exact_model = copy.deepcopy(model).float()
    exact_cache = _filled_cache(exact_model)
    rounded = _filled_cache(model)  # the same draws, rounded to bf16
    for exact, bf16 in zip(exact_cache.keys + exact_cache.values, rounded.keys + rounded.values):
        exact.copy_(bf16.float())
    exact = _logits(TorchStep(exact_model, exact_cache, max_rows=16), model.config.vocab_size)
    scale = exact.abs().max()
    assert (native - exact).abs().max() <= 0.02 * scale
    assert (native - exact).abs().max() <= 2 * (reference - exact).abs().max() + 1e-3 * scale


@pytest.mark.parametrize("block_size", [8, 24, 32])
def test_blocks_other_than_16_positions_equal_pytorch(block_size):
    """Blocks of 8 and 24 rows (a tile of 16 keys spans blocks: each key's row looked up alone) and
    of 32 (a tile within one block, rows taken from its first)."""
    model = _long_model("head width 64, 4 query heads per kv head", torch.float32)
    torch.testing.assert_close(_native(model, block_size=block_size), _pytorch(model, block_size=block_size),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_rising_along_rows_equal_pytorch(dtype):
    """Keys growing along each row (the max keeps moving past the slack, in every part of a split
    row): fp32 equal to PyTorch, bf16 within the PyTorch bf16 step's own distance of fp32 (as above)."""
    name = "head width 128, 4 query heads per kv head (two head groups)"
    model = _long_model(name, dtype)
    native = _native(model, ramp=0.002)
    if dtype == torch.float32:
        torch.testing.assert_close(native, _pytorch(model, ramp=0.002), atol=2e-5, rtol=1e-4)
        return
    exact_model = copy.deepcopy(model).float()
    exact_cache, rounded = _filled_cache(exact_model, ramp=0.002), _filled_cache(model, ramp=0.002)
    for exact, bf16 in zip(exact_cache.keys + exact_cache.values, rounded.keys + rounded.values):
        exact.copy_(bf16.float())
    exact = _logits(TorchStep(exact_model, exact_cache, max_rows=16), model.config.vocab_size)
    reference, scale = _pytorch(model, ramp=0.002), exact.abs().max()
    assert (native - exact).abs().max() <= 2 * (reference - exact).abs().max() + 1e-3 * scale


def test_batch_1_row_split_over_threads_equals_one_thread():
    """A lone long row is split into parts over the threads: the same logits as on one thread (no split)."""
    model = _long_model("head width 64, 4 query heads per kv head", torch.float32)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            native = NativeForward(model, _filled_cache(model), 4)
            out.append(native.step([7], [2047])[0].clone())
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out[0], out[1], atol=2e-5, rtol=1e-5)


def test_engine_greedy_tokens_equal_after_long_prompts():
    config = dataclasses.replace(CASES["qwen3 (q/k norm per head)"], max_seq_len=1400)
    prompts = torch.randint(1, 101, (2, 1100), generator=torch.Generator().manual_seed(4)).tolist()
    prompts[1] = prompts[1][:700]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    native = Engine(_model(config, torch.float32), max_batch=2)
    pytorch = Engine(_model(config, torch.float32), max_batch=2, native=False)
    ours, theirs = native.generate(prompts, params), pytorch.generate(prompts, params)
    assert native.decode_path == "native" and pytorch.decode_path == "pytorch"
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
