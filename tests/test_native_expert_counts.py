"""`NativeForward.expert_counts` (the rows routed to each expert of each MoE layer, counted by the
native forward) equals the sum of `MoEStats.routed_per_expert` of PyTorch forwards over the same
tokens: prefill rows of several slots in one call, then decode steps; GPT-2 top-1, Llama top-2 with a
dense first block, DeepSeek-V3 routing (sigmoid, score bias, groups, routed scale, shared expert),
PR-MoE (layers with different expert counts); fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from test_native_decode import CASES, _llama, _model

from pyramoe.inference.kv_cache import SlotKVCache
from pyramoe.inference.native import NativeForward, load_library
from pyramoe.models import GPT

pytestmark = pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the native step is not built")

MODELS = {
    "gpt-2 top-1 gelu": CASES["gpt-2 moe"],
    "llama top-2 swiglu, dense first block": CASES["mixtral"],
    "deepseek-v3 (shared expert)": _llama(moe={"router_score": "sigmoid", "score_correction_bias": True,
                                               "expert_groups": 4, "topk_groups": 2, "routed_scaling": 2.5,
                                               "shared_d_ff": 80}),
    "pr-moe (4 and 8 experts)": CASES["residual moe (pr-moe)"],
}
PROMPTS = [5, 9, 3]  # prompt lengths of slots 0, 1, 2
DECODE_STEPS = 3


def _tokens(vocab: int) -> list[list[int]]:
    """Each slot's whole sequence: its prompt, then the tokens its decode steps feed."""
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n + DECODE_STEPS,), generator=generator).tolist() for n in PROMPTS]


def _native_counts(model: GPT, sequences: list[list[int]]) -> torch.Tensor:
    """One prefill forward with the prompts of every slot as rows, then decode steps of all slots."""
    native = NativeForward(model, SlotKVCache.for_model(model, len(PROMPTS), 32), sum(PROMPTS))
    assert native.expert_counts.shape == (model.config.n_layers, max(b.ffn.num_experts for b in model.blocks
                                                                       if b.is_moe))
    assert native.expert_counts.dtype == torch.int64 and not native.expert_counts.any()
    tokens = torch.tensor([t for seq, n in zip(sequences, PROMPTS) for t in seq[:n]])
    slots = torch.repeat_interleave(torch.arange(len(PROMPTS)), torch.tensor(PROMPTS))
    positions = torch.cat([torch.arange(n) for n in PROMPTS])
    native.forward(tokens, slots, positions, torch.tensor([n - 1 for n in PROMPTS]).cumsum(0))
    for step in range(DECODE_STEPS):
        native.step([seq[n + step] for seq, n in zip(sequences, PROMPTS)], [n + step for n in PROMPTS])
    counts = native.expert_counts.clone()
    address = native.expert_counts.data_ptr()
    native.reset_expert_counts()
    assert not native.expert_counts.any() and native.expert_counts.data_ptr() == address
    native.step([1], [0])  # counts again after the reset: one row
    for index, block in enumerate(model.blocks):
        assert int(native.expert_counts[index].sum()) == (block.ffn.config.top_k if block.is_moe else 0)
    return counts


def _pytorch_counts(model: GPT, sequences: list[list[int]]) -> torch.Tensor:
    """Each slot's sequence in one PyTorch forward (dropless): the sum of its routed_per_expert."""
    counts = torch.zeros(model.config.n_layers, max(b.ffn.num_experts for b in model.blocks if b.is_moe),
                         dtype=torch.int64)
    with torch.no_grad():
        for seq in sequences:
            for index, stats in model(torch.tensor([seq])).moe_stats.items():
                counts[index, : stats.routed_per_expert.numel()] += stats.routed_per_expert
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_native_expert_counts_equal_routed_per_expert(name, dtype):
    model = _model(MODELS[name], dtype)
    for block in model.blocks:
        if block.is_moe:
            block.ffn.config.dropless = True
    sequences = _tokens(model.config.vocab_size)
    native, reference = _native_counts(model, sequences), _pytorch_counts(model, sequences)
    rows = sum(PROMPTS) + len(PROMPTS) * DECODE_STEPS
    for index, block in enumerate(model.blocks):
        if not block.is_moe:
            assert not native[index].any()  # dense blocks stay 0
            continue
        assert int(native[index].sum()) == rows * block.ffn.config.top_k
        assert not native[index, block.ffn.num_experts :].any()
    torch.testing.assert_close(native, reference, rtol=0, atol=0)
