"""int8 weights (`pyramoe.kernels.quantized`, `pyramoe.inference.packing.quantize_model`): the
quantize/dequantize round trip within half a step per output channel; the native int8 products
(VNNI, and the portable kernel of an AVX2 build) equal to their PyTorch reference; the native step
equal to the PyTorch step on a quantized model (dense, MoE, shared expert, GQA, GELU with biases,
Residual-MoE; fp32 and bf16 activations; decode and prefill rows); the engine's greedy tokens; the
command line's --quantize."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_native_decode as native_cases
import torch

from pyramoe.cli.main import main
from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.kv_cache import SlotKVCache
from pyramoe.inference.native import NativeForward, layout_of, load_library, unsupported_reason
from pyramoe.inference.packing import quantize_model
from pyramoe.kernels import Int8Weight, int8_linear, int8_linear_native, quantize_weights

needs_native = pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the native step is not built")


def test_round_trip_within_half_a_step_per_output():
    torch.manual_seed(0)
    w = torch.randn(37, 64) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different magnitudes
    w[5] = 0
    quantized = quantize_weights(w)
    assert quantized.data.shape == (3, 16, 16, 4) and quantized.scales.shape == (48,)
    assert quantized.data.min() >= -127
    step = w.abs().amax(dim=-1) / 127
    error = (quantized.dequantize() - w).abs()
    assert (error <= step[:, None] / 2 * (1 + 1e-5)).all()
    assert quantized.dequantize()[5].abs().sum() == 0
    relative = (quantized.dequantize() - w).norm() / w.norm()
    assert relative < 0.01
    # A stack quantizes matrix by matrix; its items are views of it.
    stack = torch.randn(3, 20, 8)
    stacked = quantize_weights(stack)
    for e in range(3):
        torch.testing.assert_close(stacked[e].dequantize(), quantize_weights(stack[e]).dequantize(), rtol=0, atol=0)
    assert stacked[1].data.data_ptr() == stacked.data.data_ptr() + stacked[0].data.numel()


def test_input_width_not_divisible_by_4_is_refused():
    with pytest.raises(ValueError, match="int8: .*divisible by 4"):
        quantize_weights(torch.randn(16, 6))


@needs_native
@pytest.mark.parametrize(("n", "k"), [(40, 48), (16, 4), (101, 132), (300, 512)])
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 17, 40])
def test_native_products_equal_the_reference(n, k, rows):
    """Tiles of 1-16 rows (one 16-output block, two sums per row where there are 1-2 rows) and of 12
    rows x 2 blocks past 16; odd 4-input groups; outputs not a multiple of 16; a bias."""
    generator = torch.Generator().manual_seed(n + k + rows)
    weight = quantize_weights(torch.randn(n, k, generator=generator))
    x, bias = torch.randn(rows, k, generator=generator), torch.randn(n, generator=generator)
    x[0, :] = 0  # a zero row (scale 1)
    reference = int8_linear(x, weight, bias)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.testing.assert_close(int8_linear_native(x, weight, bias), reference, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)
    exact = x @ weight.dequantize().T + bias  # the activations' rounding: within a few percent
    assert (reference - exact).abs().max() <= 0.03 * (exact - bias).abs().max() + 1e-6


CASES = ["mixtral", "qwen2 (shared gated expert, qkv bias)", "gpt-2 moe", "residual moe (pr-moe)",
         "head width 64, 4 query heads per kv head", "odd widths"]


def _quantized(name: str, dtype: torch.dtype):
    model = native_cases._model(native_cases.CASES[name], dtype)
    assert quantize_model(model) > 0
    return model


@needs_native
@pytest.mark.parametrize("name", CASES)
def test_native_step_equals_pytorch_on_the_int8_model_fp32(name):
    model = _quantized(name, torch.float32)
    assert {layout_of(m) for m in (model.lm_head, model.blocks[0].attn.qkv)} == {"int8"}
    assert unsupported_reason(model, SlotKVCache.for_model(model, 2, 8)) is None
    native, reference = native_cases._logits_both_ways(model, [5, 9, 1, 13])
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=5e-5)
    plain_model = native_cases._model(native_cases.CASES[name], torch.float32)
    plain, _ = native_cases._logits_both_ways(plain_model, [5, 9, 1, 13])
    assert (native - plain).abs().max() <= 0.05 * plain.abs().max()  # int8 stays close to the fp32 model


@needs_native
@pytest.mark.parametrize("name", ["mixtral", "qwen2 (shared gated expert, qkv bias)", "gpt-2 moe",
                                  "head width 64, 4 query heads per kv head"])
def test_native_step_bf16_activations_on_the_int8_model(name):
    """bf16 model: PyTorch rounds activations to bf16 after every op, the native step keeps fp32;
    both against an fp32 copy of the same quantized model."""
    model = _quantized(name, torch.bfloat16)
    native, reference = native_cases._logits_both_ways(model, [3, 17, 6])
    exact, _ = native_cases._logits_both_ways(copy.deepcopy(model).float(), [3, 17, 6])
    scale = exact.abs().max()
    assert (native - exact).abs().max() <= 0.03 * scale
    assert (native - exact).abs().max() <= 2 * (reference - exact).abs().max() + 2e-3 * scale


@needs_native
def test_native_prefill_on_the_int8_model():
    """22 prompt rows in one forward (the 12-row x 2-block tiles) and the cached keys."""
    model = _quantized("qwen2 (shared gated expert, qkv bias)", torch.float32)
    prompts = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(2))
    reference_cache, native_cache = (SlotKVCache.for_model(model, 3, 32) for _ in range(2))
    with torch.no_grad():
        reference = model(prompts, kv_cache=reference_cache.prefill(1), start_pos=0).logits[:, -1]
    decoder = NativeForward(model, native_cache, 32)
    logits, greedy = decoder.forward(prompts.reshape(-1), torch.tensor([1, 2]).repeat_interleave(11),
                                     torch.arange(11).repeat(2), torch.tensor([10, 21]))
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=5e-5)
    assert greedy == reference.argmax(-1).tolist()
    for layer in range(model.config.n_layers):
        torch.testing.assert_close(native_cache.keys[layer][1:3, :, :11], reference_cache.keys[layer][1:3, :, :11],
                                   rtol=1e-5, atol=1e-5)


@needs_native
def test_engine_int8_greedy_tokens_native_equal_pytorch():
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 3, 12, 5)]
    engines = [Engine(native_cases._model(native_cases.CASES["mixtral"], torch.float32), max_batch=3,
                      quantize="int8", native=native) for native in (True, False)]
    ours, theirs = (engine.generate(prompts, params) for engine in engines)
    assert [e.decode_path for e in engines] == ["native", "pytorch"]
    assert engines[0].quantized_weights == engines[1].quantized_weights == 41
    assert isinstance(engines[0].model.lm_head.packed_weight, Int8Weight)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [len(c.token_ids) for c in ours] == [9, 3, 12, 5]


def test_engine_refuses_an_unknown_format():
    model = native_cases._model(native_cases.CASES["mixtral"], torch.float32)
    with pytest.raises(ValueError, match="^quantize: must be one of int8, int4"):
        Engine(model, quantize="int3")


AVX2_CHECK = """
import torch
import test_native_decode as t
from pyramoe.inference.packing import quantize_model
from pyramoe.kernels import int8_native, load_library
assert load_library() is not None and not int8_native()
model = t._model(t.CASES["mixtral"], torch.float32)
quantize_model(model)
native, reference = t._logits_both_ways(model, [3, 17])
torch.testing.assert_close(native, reference, rtol=1e-5, atol=5e-5)
print("ok")
"""


@needs_native
@pytest.mark.skipif(not native_cases._has_avx2(), reason="builds for x86-64-v3 (AVX2)")
def test_portable_int8_kernel_gives_the_same_logits(tmp_path):
    """The portable int8 kernel (what a machine without AVX512-VNNI builds) on this machine."""
    env = {**os.environ, "PYRAMOE_NATIVE_MARCH": "x86-64-v3", "PYRAMOE_CACHE": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from live_server import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("quantize"))


@pytest.mark.parametrize("command", [["generate", "--prompt", "def"], ["eval"], ["serve"]])
def test_unknown_quantize_format_is_one_line(tiny_run, command, capsys):
    argv = [command[0], str(tiny_run), *command[1:], "--quantize", "int3"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--quantize" in err and "int3" in err, err


def test_generate_and_eval_quantized(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "def f1", "--max-new-tokens", "8", "--temperature", "0",
                 "--quantize", "int8"]) == 0
    err = capsys.readouterr().err
    assert "int8 weights" in err
    perplexities = []
    for extra in ([], ["--quantize", "int8"]):
        assert main(["eval", str(tiny_run), "--batches", "2", "--json", *extra]) == 0
        out = capsys.readouterr().out
        perplexities.append(json.loads(out[out.index("{"):])["val_ppl"])
    assert perplexities[1] == pytest.approx(perplexities[0], rel=0.02)
