"""The native int8 and int4 products on AMX-INT8 tiles (pyramoe/kernels/native_amx_quant.h): with the tiles
forced on they equal the VNNI kernels bit for bit (the same integer sums through the same float epilogue) and
the PyTorch reference within its fp32 rounding, at row counts around the 16-row tiles (1, 5, 16, 17, 33, 200),
output widths that are not multiples of 16, int4 groups of 32, 64 and 128, symmetric and asymmetric; int8
widths that are not whole 64-input tiles stay on VNNI; auto mode switches at the measured thresholds; and a
quantized model's native prefill gives the same logits on either kernel."""

from __future__ import annotations

import pytest
import test_native_decode as native_cases
import torch

from pyramoe.inference.kv_cache import SlotKVCache
from pyramoe.inference.native import NativeForward, load_library
from pyramoe.inference.packing import quantize_model
from pyramoe.kernels import int4_linear, int4_linear_native, quantize_weights_int4
from pyramoe.kernels.blocked import (
    amx_int8_state,
    amx_products,
    amx_quant_min_rows,
    amx_set_to,
    native_products,
)
from pyramoe.kernels.quantized import int8_linear, int8_linear_native, int8_native, quantize_weights

pytestmark = pytest.mark.skipif(load_library() is None or not int8_native(),
                                reason="needs the native kernels with VNNI (AVX512-VNNI)")
NO_AMX = ("no AMX-INT8 in this build (the CPU lacks it, or PYRAMOE_NATIVE_MARCH leaves it out) or Linux refused "
          "the tile state: only the VNNI kernels run")
needs_amx = pytest.mark.skipif(amx_int8_state() != 1, reason=NO_AMX)
ROWS = [1, 5, 16, 17, 33, 200]


def _both_kernels(product, x, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(VNNI's output, the tiles' output), checking through the counter that each ran as asked."""
    outputs = []
    for mode in ("0", "1"):
        with amx_set_to(mode):
            before = amx_products()
            outputs.append(product(x, weight, bias))
            assert amx_products() - before == (1 if mode == "1" else 0), mode
    return outputs[0], outputs[1]


def _inputs(rows: int, n: int, k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=generator), torch.randn(n, generator=generator),
            torch.randn(rows, k, generator=generator))


@needs_amx
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n, k", [(77, 128), (40, 256), (16, 64), (530, 192)])
def test_int8_tiles_equal_vnni_bit_for_bit(rows, n, k):
    weight, bias, x = _inputs(rows, n, k, rows * 1000 + n)
    quantized = quantize_weights(weight)
    for b in (bias, None):
        vnni, tiles = _both_kernels(int8_linear_native, x, quantized, b)
        assert torch.equal(tiles, vnni)
        torch.testing.assert_close(tiles, int8_linear(x, quantized, b), rtol=1e-5, atol=1e-5)


@needs_amx
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("group, asymmetric", [(32, False), (32, True), (64, False), (64, True), (128, False),
                                               (128, True)])
@pytest.mark.parametrize("n, k", [(77, 256), (530, 128)])
def test_int4_tiles_equal_vnni_bit_for_bit(rows, group, asymmetric, n, k):
    weight, bias, x = _inputs(rows, n, k, rows * 1000 + group + n)
    quantized = quantize_weights_int4(weight, group, asymmetric)
    for b in (bias, None):
        vnni, tiles = _both_kernels(int4_linear_native, x, quantized, b)
        assert torch.equal(tiles, vnni)
        torch.testing.assert_close(tiles, int4_linear(x, quantized, b), rtol=1e-5, atol=2e-5)


def test_int8_widths_off_the_tiles_stay_on_vnni():
    """96 inputs: not whole 64-input tiles, so VNNI runs even with the tiles forced on."""
    weight, bias, x = _inputs(33, 40, 96, 3)
    quantized = quantize_weights(weight)
    with amx_set_to("1"):
        before = amx_products()
        got = int8_linear_native(x, quantized, bias)
        assert amx_products() == before
    torch.testing.assert_close(got, int8_linear(x, quantized, bias), rtol=1e-5, atol=1e-5)


@needs_amx
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_auto_mode_runs_the_tiles_only_from_the_threshold(quant):
    threshold = amx_quant_min_rows(quant)
    weight, _, _ = _inputs(1, 32, 128, 4)
    quantized, product = ((quantize_weights(weight), int8_linear_native) if quant == "int8" else
                          (quantize_weights_int4(weight, 64), int4_linear_native))
    with amx_set_to("auto"):
        for rows, tiles in ((threshold - 1, 0), (threshold, 1)):
            before = amx_products()
            product(torch.randn(rows, 128), quantized, None)
            assert amx_products() - before == tiles, rows
    assert "AMX-INT8 tiles" in native_products()


@needs_amx
@pytest.mark.parametrize("quantize", ["int8", "int4", "int4-g64-asym", "int4-g128"])
def test_quantized_model_prefill_is_the_same_on_either_kernel(quantize):
    """22 prompt rows in one native forward: logits equal bit for bit, the tiles ran only when asked."""
    model = native_cases._model(native_cases.CASES["qwen2 (shared gated expert, qkv bias)"], torch.float32)
    assert quantize_model(model, quantize) > 0
    prompts = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(2))
    logits = {}
    for mode in ("0", "1"):
        decoder = NativeForward(model, SlotKVCache.for_model(model, 3, 32), 32)
        with amx_set_to(mode):
            before = amx_products()
            logits[mode], _ = decoder.forward(prompts.reshape(-1), torch.tensor([1, 2]).repeat_interleave(11),
                                              torch.arange(11).repeat(2), torch.tensor([10, 21]))
            assert (amx_products() > before) == (mode == "1")
    assert torch.equal(logits["1"], logits["0"])
