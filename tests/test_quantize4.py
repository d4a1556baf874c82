"""int4 weights (`pyramoe.kernels.quantized4`, `quantize_model(model, "int4...")`): codes and group
scales within a step of the weights; the native int4 products (VNNI, and the portable kernel of an
AVX2 build) equal to their PyTorch reference, symmetric and asymmetric, every group size; the
native step equal to the PyTorch step on int4 models (dense, MoE, shared expert, GQA, Residual-MoE,
int8 fallbacks for widths the group does not divide; fp32 and bf16 activations; prefill rows); the
LM head kept at int8 unless asked; the engine and the command line's --quantize int4."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_native_decode as native_cases
import torch

from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.kv_cache import SlotKVCache
from pyramoe.inference.native import NativeForward, layout_of, load_library, unsupported_reason
from pyramoe.inference.packing import QuantSpec, parse_quantize, quantize_model
from pyramoe.kernels import Int4Weight, Int8Weight, int4_linear, int4_linear_native, quantize_weights_int4
from pyramoe.kernels.quantized4 import quantize_int4

needs_native = pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the native step is not built")


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_round_trip_within_a_step_per_group(group, asymmetric):
    torch.manual_seed(group)
    w = torch.randn(37, 256) * torch.logspace(-3, 1, 37)[:, None]
    w[5] = 0
    quantized = quantize_weights_int4(w, group, asymmetric)
    assert quantized.data.shape == (3, 32, 64) and quantized.scales.shape == (3, 256 // group, 16)
    assert (quantized.mins is not None) == asymmetric
    codes, scales, mins = quantize_int4(w, group, asymmetric)
    torch.testing.assert_close(quantized.codes(), codes, rtol=0, atol=0)  # the layout round trip
    grouped = w.reshape(37, -1, group)
    spread = grouped.amax(-1) - grouped.amin(-1) if asymmetric else grouped.abs().amax(-1)
    step = spread / (15 if asymmetric else 8)
    error = (quantized.dequantize() - w).abs().reshape(37, -1, group)
    # Half a step where the value rounds inside the codes; symmetric: the clipped end (+8 steps) up to
    # one; asymmetric: fp16 scales and mins shift the grid by a little.
    bound = step * (0.5 if asymmetric else 1.0) * (1 + 1e-2) + 1e-3 * spread
    assert (error <= bound[..., None]).all()
    assert quantized.dequantize()[5].abs().sum() == 0
    assert (quantized.dequantize() - w).norm() / w.norm() < 0.12


def test_bad_formats_are_one_line_errors():
    assert parse_quantize("int4") == QuantSpec(4, 32, False, 8)
    assert parse_quantize("int4-g128-asym-head4") == QuantSpec(4, 128, True, 4)
    for bad in ("int3", "int4-g48", "int4-g64-g64", "int8-asym", "int4-"):
        with pytest.raises(ValueError, match="^--quantize: must be one of int8, int4") as raised:
            parse_quantize(bad, "--quantize")
        assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_weights_int4(torch.randn(16, 48))


@needs_native
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize(("n", "k", "group"), [(40, 128, 32), (16, 256, 64), (101, 384, 128), (300, 512, 32)])
@pytest.mark.parametrize("rows", [1, 2, 3, 12, 17, 40])
def test_native_products_equal_the_reference(n, k, group, rows, asymmetric):
    """Tiles of 1-2 rows (split sums) and 3-12; outputs not a multiple of 16; a bias; a zero row."""
    generator = torch.Generator().manual_seed(n + k + rows)
    weight = quantize_weights_int4(torch.randn(n, k, generator=generator), group, asymmetric)
    x, bias = torch.randn(rows, k, generator=generator), torch.randn(n, generator=generator)
    x[0, :] = 0
    reference = int4_linear(x, weight, bias)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.testing.assert_close(int4_linear_native(x, weight, bias), reference, rtol=1e-5, atol=2e-5)
    finally:
        torch.set_num_threads(before)
    exact = x @ weight.dequantize().T + bias  # the activations' rounding: within a few percent
    assert (reference - exact).abs().max() <= 0.03 * (exact - bias).abs().max() + 1e-6


CASES = ["mixtral", "qwen2 (shared gated expert, qkv bias)", "gpt-2 moe", "residual moe (pr-moe)",
         "residual moe with a gated shared expert", "head width 64, 4 query heads per kv head", "odd widths"]


def _quantized(name: str, dtype: torch.dtype, quantize: str = "int4"):
    model = native_cases._model(native_cases.CASES[name], dtype)
    assert quantize_model(model, quantize) > 0
    return model


def assert_close_but_for_one_rounding_flip(native: torch.Tensor, reference: torch.Tensor) -> None:
    """Rows equal to fp32 rounding, but for at most one row within 1% of the logits' scale. Each product
    quantizes its rows of activations to integers, which absorbs the last-bit differences the two
    steps' attention and norms leave (their sums run in different orders, by CPU); an element at a
    rounding boundary flips one integer step instead (seen on an AVX2-only CPU: one row of four,
    1.1e-3 against logits of 0.44), which no tighter test can tell from an exact kernel."""
    far_B = ~torch.isclose(native, reference, rtol=1e-5, atol=5e-5).all(dim=-1)
    assert int(far_B.sum()) <= 1, f"rows beyond fp32 rounding: {far_B.nonzero().flatten().tolist()}"
    assert (native - reference).abs().max() <= 0.01 * reference.abs().max()


@needs_native
@pytest.mark.parametrize("quantize", ["int4", "int4-g64-asym"])
@pytest.mark.parametrize("name", CASES)
def test_native_step_equals_pytorch_on_the_int4_model_fp32(name, quantize):
    model = _quantized(name, torch.float32, quantize)
    assert layout_of(model.lm_head) == "int8"  # the LM head stays at 8 bits by default
    formats = {layout_of(m) for m in (model.blocks[0].attn.qkv, model.blocks[-1].ffn.experts)}
    assert formats == ({"int8"} if name == "odd widths" else {"int4"})  # width 48: no 32-input groups
    assert unsupported_reason(model, SlotKVCache.for_model(model, 2, 8)) is None
    native, reference = native_cases._logits_both_ways(model, [5, 9, 1, 13])
    assert_close_but_for_one_rounding_flip(native, reference)
    plain, _ = native_cases._logits_both_ways(native_cases._model(native_cases.CASES[name], torch.float32),
                                              [5, 9, 1, 13])
    assert (native - plain).abs().max() <= 0.25 * plain.abs().max()  # random weights: int4 stays near


@needs_native
def test_head4_quantizes_the_lm_head_to_int4():
    model = _quantized("mixtral", torch.float32, "int4-head4")
    assert isinstance(model.lm_head.packed_weight, Int4Weight)
    native, reference = native_cases._logits_both_ways(model, [3, 7])
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=5e-5)


@needs_native
@pytest.mark.parametrize("name", ["mixtral", "qwen2 (shared gated expert, qkv bias)",
                                  "head width 64, 4 query heads per kv head"])
def test_native_step_bf16_activations_on_the_int4_model(name):
    """bf16 model: against an fp32 copy of the same quantized model."""
    model = _quantized(name, torch.bfloat16)
    native, reference = native_cases._logits_both_ways(model, [3, 17, 6])
    exact, _ = native_cases._logits_both_ways(copy.deepcopy(model).float(), [3, 17, 6])
    scale = exact.abs().max()
    assert (native - exact).abs().max() <= 0.03 * scale
    assert (native - exact).abs().max() <= 2 * (reference - exact).abs().max() + 2e-3 * scale


@needs_native
def test_native_prefill_on_the_int4_model():
    """22 prompt rows in one forward (tiles of 12 rows and a rest) and the cached keys."""
    model = _quantized("qwen2 (shared gated expert, qkv bias)", torch.float32, "int4-asym")
    prompts = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(2))
    reference_cache, native_cache = (SlotKVCache.for_model(model, 3, 32) for _ in range(2))
    with torch.no_grad():
        reference = model(prompts, kv_cache=reference_cache.prefill(1), start_pos=0).logits[:, -1]
    decoder = NativeForward(model, native_cache, 32)
    logits, greedy = decoder.forward(prompts.reshape(-1), torch.tensor([1, 2]).repeat_interleave(11),
                                     torch.arange(11).repeat(2), torch.tensor([10, 21]))
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=5e-5)
    assert greedy == reference.argmax(-1).tolist()


@needs_native
def test_engine_int4_greedy_tokens_native_equal_pytorch():
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 3, 12, 5)]
    engines = [Engine(native_cases._model(native_cases.CASES["mixtral"], torch.float32), max_batch=3,
                      quantize="int4", native=native) for native in (True, False)]
    ours, theirs = (engine.generate(prompts, params) for engine in engines)
    assert [e.decode_path for e in engines] == ["native", "pytorch"]
    assert isinstance(engines[0].model.lm_head.packed_weight, Int8Weight)
    assert isinstance(engines[0].model.blocks[0].attn.qkv.packed_weight, Int4Weight)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]


AVX2_CHECK = """
import torch
import test_native_decode as t
from pyramoe.inference.packing import quantize_model
from pyramoe.kernels import int8_native, load_library
assert load_library() is not None and not int8_native()
for spec in ("int4", "int4-g64-asym"):
    model = t._model(t.CASES["mixtral"], torch.float32)
    quantize_model(model, spec)
    native, reference = t._logits_both_ways(model, [3, 17])
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=5e-5)
print("ok")
"""


@needs_native
@pytest.mark.skipif(not native_cases._has_avx2(), reason="builds for x86-64-v3 (AVX2)")
def test_portable_int4_kernel_gives_the_same_logits(tmp_path):
    """The portable int4 kernel (what a machine without AVX512-VNNI builds) on this machine."""
    env = {**os.environ, "PYRAMOE_NATIVE_MARCH": "x86-64-v3", "PYRAMOE_CACHE": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from live_server import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("quantize4"))


def test_generate_and_eval_int4(tiny_run, capsys):
    from pyramoe.cli.main import main

    assert main(["generate", str(tiny_run), "--prompt", "def f1", "--max-new-tokens", "8", "--temperature", "0",
                 "--quantize", "int4-g64"]) == 0
    assert "int4-g64 weights" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--batches", "2", "--json", "--quantize", "int4-asym"]) == 0
    assert main(["eval", str(tiny_run), "--batches", "2", "--quantize", "int4-g16"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--quantize" in err and "int4-g16" in err, err
