"""The native step's AMX bf16 tile kernel (pyramoe/kernels/native_amx.h): blocked products equal
F.linear at row counts around its 16-row tiles (1, 5, 16, 17, 33, 200) and output widths that are
not multiples of 16, with the AMX kernel forced on (where the CPU has it) and off (the AVX512-BF16
kernel); widths that are not a multiple of 32 stay on the AVX512 kernel; a packed model's native
prefill and decode give the same logits either way, and the PyTorch step's within bf16 rounding."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pyramoe.config import ModelConfig, build_layers
from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.kv_cache import SlotKVCache
from pyramoe.inference.native import NativeForward
from pyramoe.inference.packing import pack_model
from pyramoe.kernels import BlockedWeight, block_weights, blocked_linear, blocking_available
from pyramoe.kernels.blocked import amx_mode, amx_products, amx_set_to, amx_state, native_products
from pyramoe.models import GPT

pytestmark = pytest.mark.skipif(not blocking_available(), reason="needs the native kernels with AVX512-BF16")
NO_AMX = ("no AMX-BF16 in this build (the CPU lacks it, or PYRAMOE_NATIVE_MARCH leaves it out) or Linux refused "
          "the tile state: only the AVX512-BF16 kernel runs")


def _needs_amx(mode: str) -> None:
    if mode == "1" and amx_state() != 1:
        pytest.skip(NO_AMX)


@pytest.mark.parametrize("mode", ["0", "1"])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 200])
@pytest.mark.parametrize("out_features, in_features", [(40, 64), (77, 96), (16, 32), (530, 128)])
def test_blocked_product_equals_linear_on_either_kernel(mode, rows, out_features, in_features):
    _needs_amx(mode)
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    blocked = BlockedWeight(block_weights(weight), out_features, in_features)
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias)
    with amx_set_to(mode):
        before = amx_products()
        got = blocked_linear(x.float(), blocked, bias)
        ran = amx_products() - before
    assert ran == (1 if mode == "1" else 0)  # the kernel asked for is the one that ran
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    with amx_set_to(mode):
        got = blocked_linear(x.float(), blocked, None)
    torch.testing.assert_close(got, expected - bias, rtol=1e-5, atol=1e-4)


def test_widths_off_the_tiles_stay_on_the_avx512_kernel():
    """48 inputs: not whole 32-input tiles, so the AVX512 kernel runs even with AMX forced on."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 48, generator=generator).bfloat16()
    x = torch.randn(33, 48, generator=generator).bfloat16()
    with amx_set_to("1"):
        before = amx_products()
        got = blocked_linear(x.float(), BlockedWeight(block_weights(weight), 40, 48), None)
        assert amx_products() == before
    torch.testing.assert_close(got, x.float() @ weight.float().T, rtol=1e-5, atol=1e-4)


def test_auto_mode_runs_the_tiles_only_from_the_threshold():
    if amx_state() != 1:
        pytest.skip(NO_AMX)
    from pyramoe.kernels.build import load_library

    threshold = int(load_library().pm_amx_min_rows())
    weight = BlockedWeight(block_weights(torch.randn(32, 64).bfloat16()), 32, 64)
    with amx_set_to("auto"):
        for rows, tiles in ((threshold - 1, 0), (threshold, 1)):
            before = amx_products()
            blocked_linear(torch.randn(rows, 64), weight, None)
            assert amx_products() - before == tiles, rows
    assert "AMX-BF16 tiles" in native_products()


def _model() -> GPT:
    layers = build_layers(2, [1], 8, top_k=2, dropless=True, expert_d_ff=96, shared_d_ff=64)
    config = ModelConfig(vocab_size=101, max_seq_len=128, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                         activation="swiglu", bias=False, tie_embeddings=False, position="rope", norm="rmsnorm",
                         layers=layers)
    torch.manual_seed(0)
    return GPT(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("rows", [5, 17, 33, 70])
def test_packed_model_prefill_is_the_same_on_either_kernel(rows):
    """A prompt of `rows` positions in one native call on blocked weights (every product K = 64 or
    96): the AMX kernel's logits equal the AVX512 kernel's up to summation order, and both are as
    close to the fp32 model as the PyTorch bf16 forward is."""
    model, exact_model = _model(), _model().float()
    pack_model(model, "blocked")
    prompt = torch.randint(0, 101, (rows,), generator=torch.Generator().manual_seed(rows))
    logits = {}
    for mode in ("0", "1") if amx_state() == 1 else ("0",):
        forward = NativeForward(model, SlotKVCache.for_model(model, 2, 96), rows)
        with amx_set_to(mode):
            before = amx_products()
            logits[mode], _ = forward.forward(prompt, torch.zeros(rows, dtype=torch.int64), torch.arange(rows),
                                              torch.arange(rows))
            assert (amx_products() > before) == (mode == "1")
    with torch.no_grad():
        exact = exact_model(prompt[None]).logits[0].float()
        reference = _model()(prompt[None]).logits[0].float()
    scale = exact.abs().max()
    for mode, got in logits.items():
        assert (got - exact).abs().max() <= 2 * (reference - exact).abs().max() + 1e-3 * scale, mode
    if "1" in logits:
        torch.testing.assert_close(logits["1"], logits["0"], rtol=1e-4, atol=1e-4 * scale.item())
    else:
        pytest.skip(f"AVX512-BF16 kernel checked; {NO_AMX}")


def test_engine_decodes_the_same_tokens_on_either_kernel():
    """Batch 6 (products of 6 rows and of the experts' shares), prompts of 20-40 tokens."""
    if amx_state() != 1:
        pytest.skip(NO_AMX)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 101, (20 + 4 * i,), generator=generator).tolist() for i in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = {}
    for mode in ("0", "1"):
        with amx_set_to(mode):
            before = amx_products()
            engine = Engine(_model(), max_batch=6)
            tokens[mode] = [c.token_ids for c in engine.generate(prompts, params)]
            assert engine.decode_path == "native" and (amx_products() > before) == (mode == "1")
    assert tokens["1"] == tokens["0"]


def test_environment_chooses_the_mode():
    script = "from pyramoe.kernels.blocked import amx_mode; print(amx_mode())"
    for value, expected in (("0", "0"), ("1", "1"), ("", "auto")):
        env = {**os.environ, "PYRAMOE_NATIVE_AMX": value}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert out.stdout.strip() == expected, out.stderr[-1000:]
    env = {**os.environ, "PYRAMOE_NATIVE_AMX": "yes"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "PYRAMOE_NATIVE_AMX must be 0, 1 or auto" in out.stderr
    assert amx_mode() in ("0", "1", "auto")
