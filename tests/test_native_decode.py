"""The native decode step (`pyramoe.inference.native`) gives the PyTorch step's logits: every block
kind it accepts (GQA + RoPE + RMSNorm + SwiGLU, q/k norms per head and full, clipping, qkv biases,
partial RoPE, shared experts with a sigmoid gate, DeepSeek-V3 sigmoid/grouped/biased routing with a
routed scale, top-3 without renormalisation, GPT-2 blocks, Residual-MoE alone and with a gated shared
expert, dense blocks), fp32 to the last bits and bf16 within bf16 rounding, on the AVX512-BF16
kernel's widths (multiples of 32) and on odd ones; rows at different positions; the engine's tokens
with requests joining and leaving; and the PyTorch step wherever the native one does not apply."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyramoe.config import ModelConfig, build_layers
from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.kv_cache import SlotKVCache
from pyramoe.inference.native import NativeForward, load_library, unsupported_reason
from pyramoe.models import GPT
from pyramoe.presets import get_preset

pytestmark = pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the native step is not built")

LLAMA = dict(vocab_size=101, max_seq_len=64, n_heads=4, n_kv_heads=2, activation="swiglu", bias=False,
             tie_embeddings=False, position="rope", norm="rmsnorm", layer_norm_eps=1e-6)


def _llama(d_model: int = 64, moe: dict | None = None, **model) -> ModelConfig:
    moe = {"top_k": 2, "dropless": True, "expert_d_ff": 96, **(moe or {})}
    layers = build_layers(3, [1, 2], 8, **moe)
    return ModelConfig(**{**LLAMA, "d_model": d_model, "d_ff": 2 * d_model, "layers": layers, **model})


def _gpt2(name: str) -> ModelConfig:
    config = get_preset(name)
    for layer in config.layers:
        if layer.moe is not None:
            layer.moe.dropless = True
    return dataclasses.replace(config, vocab_size=101, max_seq_len=64, d_model=64, n_heads=4, d_ff=128)


CASES = {
    "mixtral": _llama(),
    "qwen3 (q/k norm per head)": _llama(qk_norm="head"),
    "olmoe (full q/k norm, clip)": _llama(qk_norm="full", qkv_clip=0.5),
    "qwen2 (shared gated expert, qkv bias)": _llama(qkv_bias=True, moe={"shared_d_ff": 80, "shared_gate": True}),
    "deepseek-v3 routing": _llama(moe={"router_score": "sigmoid", "score_correction_bias": True,
                                       "expert_groups": 4, "topk_groups": 2, "routed_scaling": 2.5}),
    "top-3 unnormalised, partial rope": _llama(rope_fraction=0.5, moe={"top_k": 3, "gate_norm": "softmax"}),
    "odd widths": _llama(d_model=48, moe={"expert_d_ff": 40}),
    # The attention kernel with queries in registers: head widths 32 / 64 / 128.
    "head width 32": _llama(d_model=128, n_heads=4, n_kv_heads=2),
    "head width 64, 4 query heads per kv head": _llama(d_model=256, n_heads=4, n_kv_heads=1),
    "head width 128": _llama(d_model=256, n_heads=2, n_kv_heads=1),
    "gpt-2 moe": _gpt2("tiny-moe"),
    "gpt-2 top-2": _gpt2("tiny-moe-top2"),
    "residual moe (pr-moe)": _gpt2("tiny-prmoe"),
    # The shared expert joins after the Residual-MoE mix, unscaled by its coefficient.
    "residual moe with a gated shared expert": _llama(moe={"use_residual": True, "shared_d_ff": 80,
                                                           "shared_gate": True}),
}


def _model(config: ModelConfig, dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():  # norm gains, biases and selection biases away from their initial values
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith(("b_in", "b_out")):
                p.add_(torch.randn_like(p) * 0.2)
        for module in model.modules():
            if hasattr(module, "score_bias"):
                module.score_bias.normal_(0, 0.1)
    return model.to(dtype)


def _logits_both_ways(model: GPT, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose prompts have `lengths`, prefilled one by one into two caches; then one decode step
    through PyTorch (the engine's call) and one natively."""
    rows, vocab = len(lengths), model.config.vocab_size
    caches = [SlotKVCache.for_model(model, rows + 1, 48) for _ in range(2)]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for slot, length in enumerate(lengths):
            prompt = torch.randint(0, vocab, (1, length), generator=generator)
            for cache in caches:
                model(prompt, kv_cache=cache.prefill(slot), start_pos=0)
        positions_B = torch.tensor(lengths)
        tokens_B = torch.randint(0, vocab, (rows,), generator=generator)
        width = int(positions_B.max()) + 1
        mask = torch.zeros(rows, width, dtype=caches[0].keys[0].dtype)
        mask = mask.masked_fill_(torch.arange(width) > positions_B[:, None], float("-inf"))[:, None, None, :]
        decode_rows = caches[0].rows(list(range(rows)), lengths, [1] * rows, width)
        reference = model(tokens_B[:, None], kv_cache=decode_rows, start_pos=width - 1,
                          key_mask_BL=mask, positions_BT=positions_B[:, None]).logits[:, -1].float()
        native, greedy = NativeForward(model, caches[1], rows + 1).step(tokens_B, positions_B)
        assert greedy == native.argmax(-1).tolist()
        for layer in range(model.config.n_layers):  # the native step wrote the same keys and values
            for ours, theirs in ((caches[1].keys, caches[0].keys), (caches[1].values, caches[0].values)):
                torch.testing.assert_close(ours[layer][:rows], theirs[layer][:rows], rtol=0.02, atol=0.02)
    return native, reference


@pytest.mark.parametrize("name", list(CASES))
def test_native_step_equals_pytorch_fp32(name):
    model = _model(CASES[name], torch.float32)
    assert unsupported_reason(model, SlotKVCache.for_model(model, 2, 8)) is None
    native, reference = _logits_both_ways(model, [5, 9, 1, 13])
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["mixtral", "qwen2 (shared gated expert, qkv bias)", "odd widths", "gpt-2 moe",
                                  "head width 64, 4 query heads per kv head",
                                  "residual moe with a gated shared expert"])
def test_native_step_bf16_within_rounding(name):
    """bf16 weights: the native step keeps activations in fp32, PyTorch rounds them to bf16 after
    every op; both are compared with the fp32 model on the same (bf16-rounded) weights."""
    model = _model(CASES[name], torch.bfloat16)
    native, reference = _logits_both_ways(model, [3, 17, 6])
    exact, _ = _logits_both_ways(model.float(), [3, 17, 6])
    scale = exact.abs().max()
    assert (native - exact).abs().max() <= 0.02 * scale
    assert (native - exact).abs().max() <= 2 * (reference - exact).abs().max() + 1e-3 * scale


def test_engine_tokens_equal_with_requests_joining_and_leaving():
    model = _model(CASES["qwen3 (q/k norm per head)"], torch.float32)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15], [16, 17, 18, 19]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 3, 12, 5, 7)]
    native = Engine(model, max_batch=3)
    pytorch = Engine(_model(CASES["qwen3 (q/k norm per head)"], torch.float32), max_batch=3, native=False)
    ours, theirs = native.generate(prompts, params), pytorch.generate(prompts, params)
    assert native.decode_path == "native" and pytorch.decode_path == "pytorch"
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    sampled = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert ([c.token_ids for c in Engine(model, max_batch=2).generate(prompts[:3], sampled)]
            == [c.token_ids for c in Engine(pytorch.model, max_batch=2, native=False).generate(prompts[:3], sampled)])


@pytest.mark.parametrize("name", ["qwen3 (q/k norm per head)", "gpt-2 top-2"])
def test_native_prefill_equals_pytorch(name):
    """Prompt positions as rows (two prompts together, split over calls of at most 8 rows): the last
    positions' logits and the cached keys equal a PyTorch forward over the prompts."""
    model = _model(CASES[name], torch.float32)
    prompts = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(2))
    reference_cache, native_cache = (SlotKVCache.for_model(model, 3, 32) for _ in range(2))
    with torch.no_grad():
        reference = model(prompts, kv_cache=reference_cache.prefill(1), start_pos=0).logits[:, -1]
    native = NativeForward(model, native_cache, 8)
    for start in range(0, 11, 4):  # rows: prompt 0's positions of the chunk, then prompt 1's
        n = min(4, 11 - start)
        positions = torch.arange(start, start + n).repeat(2)
        slots = torch.tensor([1, 2]).repeat_interleave(n)
        logits, greedy = native.forward(prompts[:, start : start + n].reshape(-1), slots, positions,
                                         torch.tensor([n - 1, 2 * n - 1]))
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=2e-5)
    assert greedy == reference.argmax(-1).tolist()
    for layer in range(model.config.n_layers):
        torch.testing.assert_close(native_cache.keys[layer][1:3, :, :11], reference_cache.keys[layer][1:3, :, :11])
    assert native_cache.keys[0][0].abs().sum() == 0  # slot 0 untouched
    with pytest.raises(ValueError, match="token"):
        native.forward(torch.tensor([101]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))


def test_engine_keeps_pytorch_where_native_does_not_apply(monkeypatch):
    config = get_preset("tiny-moe")  # MoE layers with a capacity (dropless=False): tokens may drop
    config = dataclasses.replace(config, vocab_size=101, max_seq_len=64, d_model=64, n_heads=4, d_ff=128)
    engine = Engine(GPT(config), max_batch=2, dropless=False)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))
    assert engine.decode_path == "pytorch" and "capacity" in engine.native_unavailable
    latent = dataclasses.replace(_llama(), attention="latent", n_kv_heads=None, mla_kv_rank=32, mla_rope_dim=8,
                                 mla_nope_dim=8, mla_v_dim=16)
    assert unsupported_reason(GPT(latent), SlotKVCache.for_model(GPT(latent), 1, 8)) == "latent attention"


def test_more_threads_than_the_workspace_was_sized_for():
    model = _model(CASES["head width 64, 4 query heads per kv head"], torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        native = NativeForward(model, SlotKVCache.for_model(model, 4, 16), 4)
        torch.set_num_threads(8)  # the attention scratch is per thread: the step keeps to one
        logits, _ = native.step([1, 2, 3, 4], [0, 0, 0, 0])
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(logits).all()


def test_native_step_refuses_rows_beyond_its_cache():
    model = _model(CASES["mixtral"], torch.float32)
    native = NativeForward(model, SlotKVCache.for_model(model, 2, 8), 2)
    with pytest.raises(ValueError, match="rows"):
        native.step(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="positions"):
        native.step(torch.tensor([1]), torch.tensor([8]))
    model.tok_emb.weight.data = model.tok_emb.weight.data.clone()  # e.g. model.to(...) after the first step
    with pytest.raises(ValueError, match="moved"):
        native.step(torch.tensor([1]), torch.tensor([0]))


def test_native_step_refuses_positions_beyond_the_learned_table():
    """A cache longer than a GPT-2 model's context: positions past its learned table are refused
    (they would read beyond the table), those within it still run."""
    model = _model(CASES["gpt-2 moe"], torch.float32)
    context = model.config.max_seq_len
    native = NativeForward(model, SlotKVCache.for_model(model, 1, context + 32), 1)
    logits, _ = native.step([1], [context - 1])
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match=f"learned {context} positions"):
        native.step([1], [context])


def test_engine_keeps_learned_position_models_within_their_context():
    model = _model(CASES["gpt-2 moe"], torch.float32)
    context = model.config.max_seq_len
    engine = Engine(model, max_batch=1, max_len=2 * context)
    assert engine.max_len == context
    with pytest.raises(ValueError, match="max_len"):
        engine.add_request(list(range(1, context + 1)), SamplingParams(max_tokens=4))
    [done] = engine.generate([list(range(1, context - 3))], SamplingParams(max_tokens=50, temperature=0,
                                                                           ignore_eos=True))
    assert engine.decode_path == "native" and done.finish_reason == "length" and done.error is None
    # Every position of the context fed; the last one's token is sampled, never fed.
    assert len(done.prompt_ids) + len(done.token_ids) == context + 1


def test_build_is_cached_per_machine_and_falls_back_without_a_compiler(tmp_path, monkeypatch):
    from pyramoe.kernels import build

    monkeypatch.setenv("PYRAMOE_CACHE", str(tmp_path))
    path = build.build()
    assert path.parent == tmp_path / "native" and path.exists()
    assert build.build() == path  # cached: no second compile
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises((RuntimeError, OSError)):
        build.build()


AVX2_CHECK = """
import torch
from pyramoe.kernels import blocking_available, load_library
import test_native_decode as t
assert load_library() is not None and not blocking_available()
for name in ("mixtral", "gpt-2 top-2", "head width 64, 4 query heads per kv head"):
    native, reference = t._logits_both_ways(t._model(t.CASES[name], torch.float32), [5, 9, 1])
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=2e-5)
    model = t._model(t.CASES[name], torch.bfloat16)
    native, _ = t._logits_both_ways(model, [3, 17])
    exact, _ = t._logits_both_ways(model.float(), [3, 17])
    assert (native - exact).abs().max() <= 0.02 * exact.abs().max()
print("ok")
"""


def _has_avx2() -> bool:
    try:
        return platform.machine() in ("x86_64", "AMD64") and " avx2 " in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_no_native_environment_keeps_the_pytorch_path(monkeypatch):
    from pyramoe.kernels import build

    for name, value in (("_tried", False), ("_library", None), ("_error", None)):
        monkeypatch.setattr(build, name, value)  # restored after the test
    monkeypatch.setenv("PYRAMOE_NO_NATIVE", "1")
    assert build.load_library() is None and "PYRAMOE_NO_NATIVE" in build.build_error()
    engine = Engine(_model(CASES["mixtral"], torch.float32), max_batch=1)
    engine.generate([[1, 2]], SamplingParams(max_tokens=2, temperature=0))
    assert engine.decode_path == "pytorch" and "PYRAMOE_NO_NATIVE" in engine.native_unavailable


@pytest.mark.skipif(not _has_avx2(), reason="builds for x86-64-v3 (AVX2)")
def test_avx2_build_gives_the_same_logits(tmp_path):
    """The portable kernels (what an AVX2-only machine builds) on this machine: -march=x86-64-v3."""
    env = {**os.environ, "PYRAMOE_NATIVE_MARCH": "x86-64-v3", "PYRAMOE_CACHE": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_native_read_streams_the_whole_buffer():
    from pyramoe.kernels import huge_page_tensors, native_read

    buffer = huge_page_tensors([(3 * 4096 + 50,)], torch.float32)[0].fill_(7.0)
    x = buffer[: 3 * 4096 + 49].fill_(0.5)  # an odd count; the float after it must not be read
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert native_read(x) == 0.5 * x.numel()
    finally:
        torch.set_num_threads(before)
