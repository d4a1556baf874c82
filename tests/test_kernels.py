"""The native kernels' blocked bf16 layout: products equal F.linear on the same bf16 values for any
row count and output width (padding to 16 included), a model packed in it still runs in PyTorch
with the same outputs, and the engine blocks bf16 models at its first step and decodes the same
tokens as with plain weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pyramoe.config import ModelConfig, build_layers
from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.native import layout_of
from pyramoe.inference.packing import pack_model
from pyramoe.kernels import BlockedWeight, block_weights, blocked_linear, blocking_available
from pyramoe.models import GPT

pytestmark = pytest.mark.skipif(not blocking_available(), reason="needs the native kernels with AVX512-BF16")


@pytest.mark.parametrize("out_features", [16, 40, 77])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 13, 30])
def test_blocked_product_equals_linear(out_features, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(out_features, 64, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(rows, 64, generator=generator).bfloat16()
    blocked = BlockedWeight(block_weights(weight), out_features, 64)
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias)
    torch.testing.assert_close(blocked_linear(x.float(), blocked, bias), expected, rtol=1e-5, atol=1e-4)
    assert blocked_linear(x, blocked, None).dtype == torch.bfloat16


def test_block_layout():
    weight = torch.arange(20 * 4, dtype=torch.float32).reshape(20, 4).bfloat16()
    data = block_weights(weight)
    assert data.shape == (2, 2, 16, 2)
    assert data[0, 1, 3].tolist() == weight[3, 2:4].tolist()  # block 0, input pair 1, output 3
    assert data[1, 0, 3].tolist() == weight[19, 0:2].tolist()
    assert data[1, 0, 4:].abs().sum() == 0  # outputs 20..31: padding


def test_huge_page_tensors_are_aligned_views_of_one_buffer():
    from pyramoe.kernels import huge_page_tensors

    a, b, c = huge_page_tensors([(3, 5), (7,), (2, 2, 16, 2)])
    assert a.data_ptr() % (2 << 20) == 0 and b.data_ptr() % 64 == 0 and c.data_ptr() % 64 == 0
    assert a.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()
    assert (a.shape, b.shape, c.shape) == ((3, 5), (7,), (2, 2, 16, 2)) and a.dtype == torch.bfloat16
    if sys.platform.startswith("linux"):  # the buffer is marked for transparent huge pages
        from pyramoe.kernels.memory import _advise_huge_pages

        assert _advise_huge_pages(a)
        smaps = Path("/proc/self/smaps").read_text().split("\n")
        start = next(i for i, line in enumerate(smaps) if _maps_range(line, a.data_ptr()))
        flags = next(line for line in smaps[start + 1 :] if line.startswith("VmFlags:"))
        assert " hg" in flags  # the kernel's mark for MADV_HUGEPAGE


def _maps_range(line: str, address: int) -> bool:
    head = line.split(" ", 1)[0]
    if "-" not in head:
        return False
    try:
        low, high = (int(part, 16) for part in head.split("-"))
    except ValueError:
        return False
    return low <= address < high


def _model(expert_ff: int = 96) -> GPT:
    layers = build_layers(2, [1], 8, top_k=2, dropless=True, expert_d_ff=expert_ff, shared_d_ff=64)
    config = ModelConfig(vocab_size=101, max_seq_len=64, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                         activation="swiglu", bias=False, tie_embeddings=False, position="rope", norm="rmsnorm",
                         layers=layers)
    torch.manual_seed(0)
    return GPT(config).to(torch.bfloat16).eval()


def test_blocked_model_runs_in_pytorch():
    model, twin = _model(), _model()
    ids = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        expected = twin(ids).logits.float()
        assert pack_model(model, "blocked") > 0
        data = [model.lm_head.packed_weight.data, model.blocks[1].ffn.experts.packed[0][0].data]
        assert len({d.untyped_storage().data_ptr() for d in data}) == 1  # one buffer for all
        assert layout_of(model.lm_head) == "blocked" and layout_of(model.blocks[1].ffn.experts) == "blocked"
        got = model(ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    with pytest.raises(ValueError, match="layout"):
        pack_model(model, "other")


def test_bench_reads_the_engines_blocked_weights():
    from pyramoe.bench.generate import packed_weights_read

    engine = Engine(_model(), max_batch=1)
    assert packed_weights_read(engine) is None  # nothing blocked before the first step
    engine.generate([[1, 2]], SamplingParams(max_tokens=2, temperature=0))
    assert packed_weights_read(engine) > 0


def test_engine_blocks_bf16_weights_and_decodes_the_same_tokens():
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    blocked = Engine(_model(), max_batch=2)
    plain = Engine(_model(), max_batch=2, pack_weights=False)
    ours, theirs = blocked.generate(prompts, params), plain.generate(prompts, params)
    assert blocked.decode_path == plain.decode_path == "native"
    assert blocked.packed_weights > 0 and plain.packed_weights is None
    assert layout_of(blocked.model.lm_head) == "blocked" and layout_of(plain.model.lm_head) == "plain"
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]


def test_odd_widths_stay_plain():
    engine = Engine(_model(expert_ff=95), max_batch=1)  # the experts' second projection: 95 inputs
    engine.generate([[1, 2]], SamplingParams(max_tokens=3, temperature=0))
    assert engine.decode_path == "native" and layout_of(engine.model.lm_head) == "plain"
