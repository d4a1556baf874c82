"""The int8 KV cache (`PagedKVCache(kv_dtype="int8")`): rows of int8 with an fp32 scale each. The
native step's attention over it equals the PyTorch step's (both read the same dequantized values) at
lengths crossing tiles and blocks, GQA and MHA, rows of mixed lengths with a prefill chunk; the
engine's logits with it stay close to the bf16/fp32 cache's; it keeps half the bytes of bf16 per
position; prefix sharing works on it; a bad option value is a one-line error."""

from __future__ import annotations

import dataclasses
from collections import deque

import pytest
import torch
from test_native_attention import CONTEXT, LONG_CASES, _logits  # noqa: I001 - the long-row harness
from test_native_decode import CASES, _model

from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.kv_cache import PagedKVCache, quantize_rows
from pyramoe.inference.native import NativeForward, load_library
from pyramoe.inference.steps import NativeStep, TorchStep
from pyramoe.models import GPT

native_only = pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the native step is not built")

INT8_CASES = ["gqa, head width 16 (2 query heads per kv head)", "head width 64, 4 query heads per kv head",
              "head width 128, 4 query heads per kv head (two head groups)", "mha, head width 32",
              "head width 12 (portable kernel)"]


def _int8_cache(model: GPT, block_size: int = 16) -> PagedKVCache:
    """Scattered blocks, every position a quantized random key (large: peaked softmax) and value."""
    blocks = 4 * -(-CONTEXT // block_size)
    cache = PagedKVCache.for_model(model, 4, CONTEXT, num_blocks=blocks, block_size=block_size, kv_dtype="int8")
    cache.allocator._free = deque(torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).tolist())
    for slot in (2, 0, 3, 1):
        assert cache.reserve(slot, [slot], CONTEXT, share=False) == 0
    generator = torch.Generator().manual_seed(1)
    for buffers in zip(cache.keys, cache.key_scales, cache.values, cache.value_scales):
        for (data, scales), spread in ((buffers[:2], 4.0), (buffers[2:], 1.0)):
            data[...], scales[...] = quantize_rows(spread * torch.randn(data.shape, generator=generator))
    return cache


def _float_cache(model: GPT) -> PagedKVCache:
    """_int8_cache's draws unquantized (the same generators, in the same order)."""
    blocks = 4 * -(-CONTEXT // 16)
    cache = PagedKVCache.for_model(model, 4, CONTEXT, num_blocks=blocks, block_size=16)
    cache.allocator._free = deque(torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).tolist())
    for slot in (2, 0, 3, 1):
        assert cache.reserve(slot, [slot], CONTEXT, share=False) == 0
    generator = torch.Generator().manual_seed(1)
    for keys, values in zip(cache.keys, cache.values):
        keys.copy_(4 * torch.randn(keys.shape, generator=generator))
        values.copy_(torch.randn(values.shape, generator=generator))
    return cache


def _model_for(name: str, dtype: torch.dtype) -> GPT:
    return _model(dataclasses.replace(LONG_CASES[name], max_seq_len=CONTEXT), dtype)


def test_quantize_rows_round_trip():
    x = torch.randn(3, 5, 64) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    x[0, 0] = 0  # a row of zeros: scale 0, values 0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 5) and scale[0, 0] == 0
    assert q.abs().amax(-1)[1:].eq(127).all()  # every nonzero row uses the full range
    back = q.float() * scale.unsqueeze(-1)
    assert ((back - x).abs() <= scale.unsqueeze(-1) / 2 * (1 + 1e-5)).all()


@native_only
@pytest.mark.parametrize("name", INT8_CASES)
@pytest.mark.parametrize("block_size", [16, 24])
def test_native_equals_pytorch_on_int8_cache(name, block_size):
    """fp32 model: both steps dequantize the same int8 rows to the same fp32 values."""
    model = _model_for(name, torch.float32)
    vocab = model.config.vocab_size
    native = _logits(NativeStep(NativeForward(model, _int8_cache(model, block_size), 16), []), vocab)
    pytorch = _logits(TorchStep(model, _int8_cache(model, block_size), max_rows=16), vocab)
    torch.testing.assert_close(native, pytorch, atol=2e-5, rtol=1e-4)


@native_only
def test_native_bf16_model_on_int8_cache_within_rounding():
    """bf16 model: the PyTorch step rounds the dequantized rows to bf16, the native step keeps fp32."""
    model = _model_for("head width 64, 4 query heads per kv head", torch.bfloat16)
    vocab = model.config.vocab_size
    native = _logits(NativeStep(NativeForward(model, _int8_cache(model), 16), []), vocab)
    pytorch = _logits(TorchStep(model, _int8_cache(model), max_rows=16), vocab)
    assert (native - pytorch).abs().max() <= 0.02 * pytorch.abs().max()


@pytest.mark.parametrize("native", [True, False] if load_library() is not None else [False])
def test_int8_cache_logits_close_to_float_cache(native):
    """The same random keys and values, kept in fp32 and in int8 (each entry moved by at most half
    its row's scale, max|row| / 254): logits within 2% of their largest magnitude (measured 0.82%
    on both steps; MHA at head width 32 measured 4.8%), and the same greedy token on every row."""
    model = _model_for("head width 64, 4 query heads per kv head", torch.float32)
    vocab = model.config.vocab_size
    step = (lambda cache: NativeStep(NativeForward(model, cache, 16), [])) if native else (
        lambda cache: TorchStep(model, cache, max_rows=16))
    exact = _logits(step(_float_cache(model)), vocab)
    ours = _logits(step(_int8_cache(model)), vocab)
    assert (ours - exact).abs().max() <= 0.02 * exact.abs().max()
    assert ours.argmax(-1).tolist() == exact.argmax(-1).tolist()


@pytest.mark.parametrize("native", [True, False] if load_library() is not None else [False])
def test_int8_cache_greedy_tokens_close_to_float_cache(native):
    """The engine after long prompts, native or PyTorch step: greedy tokens with the int8 cache as
    with the fp32 cache on most of 2 x 24 steps (measured on the native step: all of them)."""
    config = dataclasses.replace(CASES["qwen3 (q/k norm per head)"], max_seq_len=1400)
    prompts = torch.randint(1, 101, (2, 1100), generator=torch.Generator().manual_seed(4)).tolist()
    prompts[1] = prompts[1][:700]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    out = {}
    for kv_dtype in ("auto", "int8"):
        engine = Engine(_model(config, torch.float32), max_batch=2, kv_cache_dtype=kv_dtype, native=native)
        out[kv_dtype] = [c.token_ids for c in engine.generate(prompts, params)]
    assert engine.cache.int8 and engine.decode_path == ("native" if native else "pytorch")
    same = sum(a == b for exact, ours in zip(out["auto"], out["int8"]) for a, b in zip(exact, ours))
    assert same >= 0.9 * 48


def test_int8_cache_bytes_per_position_half_of_bf16():
    model = _model(CASES["mixtral"], torch.bfloat16)
    bf16 = PagedKVCache.for_model(model, 2, 64, block_size=16)
    int8 = PagedKVCache.for_model(model, 2, 64, block_size=16, kv_dtype="int8")
    head_dim = bf16.keys[0].shape[3]
    assert int8.bytes() * 2 * head_dim == bf16.bytes() * (head_dim + 4)  # Dh bytes + a 4-byte scale vs 2 Dh
    assert int8.keys[0].dtype == torch.int8 and int8.dtype == torch.bfloat16
    engine = Engine(model, max_batch=2, kv_cache_dtype="int8", kv_cache_bytes=bf16.bytes())
    assert engine.cache.allocator.num_blocks == bf16.allocator.num_blocks * 2 * head_dim // (head_dim + 4)


def test_prefix_sharing_on_int8_cache():
    config = dataclasses.replace(CASES["mixtral"], max_seq_len=256)
    engine = Engine(_model(config, torch.float32), max_batch=2, kv_cache_dtype="int8")
    prefix = list(range(1, 50))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = engine.generate([prefix + [60]], params)[0].token_ids
    again = engine.generate([prefix + [60]], params)[0].token_ids
    assert engine.cache.allocator.hit_tokens >= 48
    assert first == again


@pytest.mark.parametrize("value, message", [("fp8", "kv_cache_dtype: must be one of auto, bf16, int8"),
                                            ("bf16", "kv_cache_dtype: bf16 keeps the cache in the model's dtype")])
def test_bad_kv_cache_dtype_is_one_line_error(value, message):
    model = _model(CASES["mixtral"], torch.float32)
    with pytest.raises(ValueError, match=message) as error:
        Engine(model, max_batch=1, kv_cache_dtype=value)
    assert "\n" not in str(error.value)


def test_kv_cache_dtype_flag_of_generate_serve_and_bench(tmp_path, capsys):
    from live_server import train_tiny_run

    from pyramoe.cli.main import main

    run = str(train_tiny_run(tmp_path))
    capsys.readouterr()
    argv = ["generate", run, "--prompt", "def f", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(argv) == 0
    exact = capsys.readouterr().out
    assert main([*argv, "--kv-cache-dtype", "int8"]) == 0
    assert capsys.readouterr().out == exact  # greedy: the same 6 tokens over the int8 cache (measured)
    for command in ("generate", "serve", "bench long-context"):
        assert main([*command.split(), *([run] if command != "bench long-context" else []),
                     "--kv-cache-dtype", "fp8"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--kv-cache-dtype" in err, err


@native_only
def test_bench_long_context_times_both_caches(tmp_path):
    from test_bench_long_context import TINY

    from pyramoe.cli.main import main

    out = tmp_path / "long_context.json"
    assert main(["bench", "long-context", *TINY, "--kv-cache-dtype", "auto,int8", "--out", str(out)]) == 0
    import json

    got = {(r["impl"], r["context"], r["batch"]): r for r in json.loads(out.read_text())["results"]}
    assert {impl for impl, _, _ in got} == {"pyramoe", "pyramoe kv int8"}
    for (impl, context, batch), r in got.items():
        # 2 layers x keys and values x 2 heads: fp32 rows of 8 (32 bytes), int8 rows of 8 and a 4-byte scale
        row = 12 if impl == "pyramoe kv int8" else 32
        assert r["kv_bytes_per_step"] == batch * (context + 1) * 2 * 2 * 2 * row
        assert r["kv_cache_dtype"] == ("int8" if impl == "pyramoe kv int8" else "float32")


def test_device_step_refuses_int8_cache():
    model = _model(CASES["mixtral"], torch.float32)
    engine = Engine(model, max_batch=1, step="device", kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="device step: an int8 KV cache") as error:
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))
    assert "\n" not in str(error.value)
