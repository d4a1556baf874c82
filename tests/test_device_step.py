"""The device step (`pyramoe.inference.device_step`): fixed-shape steps over the paged cache give
the PyTorch step's logits and expert counts for every block kind it runs (GQA, q/k norms, shared
experts, DeepSeek-V3 routing, partial RoPE, GPT-2 blocks with learned positions, Residual-MoE,
dense blocks), fp32 and bf16, prompt chunks and decode rows mixed; rows padded to a bucket give what
they give alone and write nothing else; the forward makes no host sync; the engine runs it when
asked (`step="device"`) with the PyTorch step's tokens. CUDA tests (graphs, the sync debug mode)
skip without CUDA."""

from __future__ import annotations

import copy
from collections import deque

import pytest
import torch
from host_syncs import no_host_syncs
from test_native_decode import CASES, _llama, _model  # noqa: I001 - the block kinds of the engine's tests

from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.device_sampling import RowSampling, SamplingBatch, penalise, sample
from pyramoe.inference.device_step import DeviceStep, _logprobs, bucket
from pyramoe.inference.kv_cache import PagedKVCache, SlotKVCache
from pyramoe.inference.sampling import token_logprobs
from pyramoe.inference.steps import TorchStep
from pyramoe.models import GPT

# Calls over 4 slots, (slot, first position, length) runs: prompts, then a decode row mixed with a
# prompt chunk continuing at position 7 and a new prompt (slots out of order), then decode rows only.
CALLS = [[(2, 0, 7), (0, 0, 5)], [(0, 5, 1), (3, 0, 4), (2, 7, 3)], [(3, 4, 1), (0, 6, 1), (2, 10, 1)]]
BF16_CASES = ["mixtral", "gpt-2 moe", "deepseek-v3 routing"]
_MLA = dict(attention="latent", n_kv_heads=None, qk_norm="off", mla_kv_rank=32, mla_rope_dim=8, mla_nope_dim=16,
            mla_v_dim=12)
# Multi-head latent attention (the PyTorch step expands keys per head; the device step absorbs them).
LATENT_CASES = {
    "deepseek-v2-lite (one q projection)": _llama(**_MLA),
    "deepseek-v3 (q rank, interleaved rope, sigmoid routing)": _llama(
        **_MLA, mla_q_rank=24, rope_interleave=True,
        moe={"router_score": "sigmoid", "score_correction_bias": True, "routed_scaling": 2.5}),
}


def _sequences(vocab: int) -> dict[int, list[int]]:
    generator = torch.Generator().manual_seed(3)
    return {slot: torch.randint(0, vocab, (12,), generator=generator).tolist() for slot in (0, 2, 3)}


def _cache(model: GPT) -> PagedKVCache:
    """Blocks of 4 positions, each slot's scattered over the cache."""
    cache = PagedKVCache.for_model(model, 4, 32, num_blocks=20, block_size=4)
    cache.allocator._free = deque(torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist())
    for slot in (3, 0, 2):
        assert cache.reserve(slot, [slot] * 3, 12) == 0
    return cache


def _rows(runs, sequences):
    tokens, slots, positions = [], [], []
    for slot, start, n in runs:
        tokens += sequences[slot][start : start + n]
        slots += [slot] * n
        positions += range(start, start + n)
    return tokens, slots, positions


def _run(step, sequences, calls=CALLS) -> list[torch.Tensor]:
    out = []
    for runs in calls:
        tokens, slots, positions = _rows(runs, sequences)
        logits_RV, greedy_R = step.forward(tokens, slots, positions, list(range(len(tokens))))
        assert list(greedy_R) == logits_RV.argmax(-1).tolist()
        out.append(logits_RV.float().cpu().clone())
    return out


def _compare_steps(model) -> tuple[DeviceStep, TorchStep, dict]:  # noqa: ANN001
    """The device and PyTorch steps over the same sequences, their logits checked equal within the
    dtype's tolerance (returned with both steps)."""
    sequences = _sequences(model.config.vocab_size)
    device, pytorch = DeviceStep(model, _cache(model), max_rows=16), TorchStep(model, _cache(model), max_rows=16)
    with torch.no_grad():
        got, want = _run(device, sequences), _run(pytorch, sequences)
    dtype = next(model.parameters()).dtype
    tolerance = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)
    return device, pytorch, tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_device_step_equals_pytorch_step(name, dtype):
    if dtype == torch.bfloat16 and name not in BF16_CASES:
        pytest.skip("bf16 on a few block kinds")
    device, pytorch, _ = _compare_steps(_model(CASES[name], dtype))
    if dtype == torch.float32:  # a bf16 near-tie may route one token differently
        assert torch.equal(device.expert_counts(), pytorch.expert_counts())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LATENT_CASES))
def test_latent_attention_equals_pytorch_step(name, dtype):
    device, pytorch, tolerance = _compare_steps(_model(LATENT_CASES[name], dtype))
    for ours, theirs in zip(device.cache.keys + device.cache.values, pytorch.cache.keys + pytorch.cache.values):
        torch.testing.assert_close(ours, theirs, **tolerance)  # the same latents and rotated keys, same blocks


def test_padded_rows_equal_rows_alone_and_write_nothing_else():
    model = _model(CASES["mixtral"], torch.float32)
    sequences = _sequences(model.config.vocab_size)
    together, alone = DeviceStep(model, _cache(model), 16), DeviceStep(model, _cache(model), 16)
    prompts = CALLS[0] + [(3, 0, 4)]
    decode = [(0, 5, 1), (2, 7, 1), (3, 4, 1)]  # 3 rows: padded to a bucket of 4
    got = _run(together, sequences, [prompts, decode])[1]
    want = torch.cat([_run(alone, sequences, [[run]])[0] for run in prompts + decode][len(prompts) :])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(together.cache.keys + together.cache.values, alone.cache.keys + alone.cache.values):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # blocks no row owns untouched (zeros) in both
    assert torch.equal(together.expert_counts(), alone.expert_counts())


def test_rows_are_checked():
    model = _model(CASES["mixtral"], torch.float32)
    step = DeviceStep(model, _cache(model), max_rows=4)
    with pytest.raises(ValueError, match="^step: 5 rows"):
        step.forward([1] * 5, [0] * 5, list(range(5)), [0])
    with pytest.raises(ValueError, match="consecutive"):
        step.forward([1, 1, 1], [0, 2, 0], [0, 0, 1], [0])
    with pytest.raises(ValueError, match="past the blocks its slot holds"):
        step.forward([1], [0], [12], [0])  # slot 0 holds 3 blocks of 4 positions
    with pytest.raises(ValueError, match="^device step: it needs the paged KV cache"):
        DeviceStep(model, SlotKVCache.for_model(model, 2, 8), max_rows=4)


def test_buckets():
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 16, 17, 64)] == [1, 2, 4, 8, 16, 32, 64]
    assert bucket(40, 48) == 48 and bucket(8, 6) == 8  # capped at the most rows; beyond: as is


@torch.no_grad()
@pytest.mark.parametrize("mode", ["greedy", "sampled", "top-k top-p", "penalised", "logprobs"])
def test_device_forward_makes_no_host_sync(mode):
    """The whole step on the device, from the plan's copy to the chosen tokens, sampling, penalties
    and log-probabilities included: no sync until `forward` reads the choices back (its one sync)."""
    model = _model(CASES["qwen2 (shared gated expert, qkv bias)"], torch.bfloat16)
    step = DeviceStep(model, _cache(model), max_rows=16)
    sequences = _sequences(model.config.vocab_size)
    params = {"greedy": None, "sampled": SamplingParams(temperature=0.8),
              "top-k top-p": SamplingParams(temperature=0.8, top_k=5, top_p=0.9),
              "penalised": SamplingParams(temperature=0.8, presence_penalty=1.0, frequency_penalty=0.5),
              "logprobs": SamplingParams(temperature=0.8, top_k=5)}[mode]
    if mode == "penalised":
        for slot in (0, 2, 3):
            step.set_output_counts(slot, sequences[slot][:5])
    for runs in CALLS:
        tokens, slots, positions = _rows(runs, sequences)
        logit_rows = list(range(len(tokens)))
        sampling = [None if params is None or row % 2 else RowSampling(params, 7 + row, row) for row in logit_rows]
        targets = [-1 if row % 3 else tokens[row] for row in logit_rows] if mode == "logprobs" else None
        counts = step._output_counts.clone()
        plan, host = step._plan(tokens, slots, positions, logit_rows, sampling, targets)
        assert plan.sampling == {"greedy": 0, "sampled": 1, "penalised": 1}.get(mode, 2)
        assert (plan.penalties, plan.logprobs) == (mode == "penalised", mode == "logprobs")
        with no_host_syncs():
            logits_RV, out_RC = step._device_forward(plan, host)
        batch = SamplingBatch.build([r.params if r else SamplingParams(temperature=0) for r in sampling],
                                    [r.seed if r else 0 for r in sampling], [r.counter if r else 0 for r in sampling],
                                    "cpu")
        logits_RV, out_RC = logits_RV[: len(logit_rows)], out_RC[: len(logit_rows)]
        scored_RV = penalise(logits_RV, counts.index_select(0, torch.tensor(slots)), batch)
        assert out_RC[:, 0].tolist() == sample(scored_RV, batch).tolist()
        if mode == "penalised":  # the sampled rows' choices counted in their slots, the greedy ones' not
            added = counts.clone()
            for row, slot, token in zip(logit_rows, slots, out_RC[:, 0].tolist()):
                added[slot, token] += row % 2 == 0
            assert torch.equal(step._output_counts, added)
        if mode == "logprobs":
            for row, got in zip(logit_rows, _logprobs(out_RC, targets)):
                target = out_RC[row, 0].item() if targets[row] == -1 else targets[row]
                want = token_logprobs(logits_RV[row], target, 20)
                assert abs(got[0] - want[0]) < 1e-5 and [t for t, _ in got[1]] == [t for t, _ in want[1]]
                torch.testing.assert_close(torch.tensor([v for _, v in got[1]]), torch.tensor([v for _, v in want[1]]))


def _engine_tokens(model: GPT, step: str, params: SamplingParams) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, max_batch=3, max_len=48, max_step_tokens=8, step=step, block_size=4)
    prompts = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 11], [3, 1], [7, 7, 7, 2, 5]]
    return [c.token_ids for c in engine.generate(prompts, params)], engine


@pytest.mark.parametrize("name", ["mixtral", "gpt-2 top-2", "deepseek-v3 (q rank, interleaved rope, sigmoid routing)"])
def test_engine_runs_the_device_step(name):
    model = _model({**CASES, **LATENT_CASES}[name], torch.float32)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    got, engine = _engine_tokens(model, "device", params)
    want, reference = _engine_tokens(model, "pytorch", params)
    assert engine.decode_path == "device" and reference.decode_path == "pytorch"
    assert got == want
    assert torch.equal(engine.expert_counts(), reference.expert_counts())


def test_engine_step_choice_is_checked():
    model = _model(copy.deepcopy(CASES["mixtral"]), torch.float32)  # its MoE configs changed below: not the shared ones
    with pytest.raises(ValueError, match="^step: must be one of auto, pytorch, device"):
        Engine(model, step="cuda-graphs")
    for block in model.blocks:
        if block.is_moe:
            block.ffn.config.dropless = False  # capacity drops (the engine keeps them with dropless=False)
    engine = Engine(model, step="device", dropless=False)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="^device step: the layer drops tokens"):
        engine.step()
    assert Engine(model).step_choice == "auto"  # the CPU default: native, else pytorch


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("name", ["mixtral", "gpt-2 moe"])
def test_cuda_graph_replays_equal_eager_and_the_cpu(name):
    model = _model(CASES[name], torch.bfloat16)
    sequences = _sequences(model.config.vocab_size)
    cpu = _run(TorchStep(model, _cache(model), 16), sequences)
    model = model.cuda()
    graphed, eager = DeviceStep(model, _cache(model), 16), DeviceStep(model, _cache(model), 16, graphs=False)
    calls = CALLS + [[(3, 5, 1), (0, 7, 1), (2, 11, 1)]]  # a second decode step: a replay
    got, want = _run(graphed, sequences, calls), _run(eager, sequences, calls)
    assert len(graphed._graphs) == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)
    for a, b in zip(got, cpu):
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)


@cuda
def test_cuda_replayed_decode_step_makes_no_host_sync():
    model = _model(CASES["mixtral"], torch.bfloat16).cuda()
    step = DeviceStep(model, _cache(model), 16)
    sequences = _sequences(model.config.vocab_size)
    _run(step, sequences, CALLS)  # captures the decode bucket
    tokens, slots, positions = _rows([(3, 5, 1), (0, 7, 1), (2, 11, 1)], sequences)
    sampling = [RowSampling(SamplingParams(temperature=0.8, top_k=5, top_p=0.9), 3, 0), None,
                RowSampling(SamplingParams(temperature=1.1), 4, 2)]
    for rows in (None, sampling):  # greedy, then sampled on the device: a graph each
        plan, host = step._plan(tokens, slots, positions, [0, 1, 2], rows)
        step._replay(plan, host)  # captures this (bucket, sampling) pair
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _, out_RC = step._replay(plan, host)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    eager = DeviceStep(model, _cache(model), 16, graphs=False)
    _run(eager, sequences, CALLS)
    assert out_RC[:3, 0].tolist() == eager.forward(tokens, slots, positions, [0, 1, 2], sampling)[1]
    assert len(step._graphs) == 2


def test_a_call_without_logit_rows():
    """A prompt chunk that does not reach its prompt's end asks for no logits (a long prompt alone)."""
    model = _model(CASES["mixtral"], torch.float32)
    sequences = _sequences(model.config.vocab_size)
    step, reference = DeviceStep(model, _cache(model), 16), DeviceStep(model, _cache(model), 16)
    tokens, slots, positions = _rows([(2, 0, 7)], sequences)
    logits_RV, tokens_R = step.forward(tokens, slots, positions, [])
    assert logits_RV.shape == (0, model.config.vocab_size) and tokens_R == []
    tokens, slots, positions = _rows([(2, 7, 3)], sequences)
    got = step.forward(tokens, slots, positions, [2])[0]
    want = _run(reference, sequences, [[(2, 0, 10)]])[0][-1:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@cuda
def test_cuda_graphs_with_penalties_and_logprobs_equal_eager():
    """Penalties (counts on the device, counted inside the graph) and log-probabilities replayed
    from a captured decode graph give eager's tokens, values and counts."""
    model = _model(CASES["mixtral"], torch.float32).cuda()
    sequences = _sequences(model.config.vocab_size)
    graphed, eager = DeviceStep(model, _cache(model), 16), DeviceStep(model, _cache(model), 16, graphs=False)
    penalised = RowSampling(SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=1.0), 0, 0)
    for step in (graphed, eager):
        _run(step, sequences, CALLS[:2])
        for slot in (0, 3):
            step.set_output_counts(slot, sequences[slot][:6])
    for t in range(3):  # capture, then two replays
        tokens, slots, positions = _rows([(3, 4 + t, 1), (0, 6 + t, 1)], sequences)
        got, want = (step.forward(tokens, slots, positions, [0, 1], [penalised, None], [-1, tokens[1]])
                     for step in (graphed, eager))
        assert got[1] == want[1]
        for ours, theirs in zip(graphed.logprobs, eager.logprobs):
            assert abs(ours[0] - theirs[0]) < 1e-3 and [i for i, _ in ours[1]] == [i for i, _ in theirs[1]]
    assert len(graphed._graphs) == 1
    assert torch.equal(graphed._output_counts, eager._output_counts)
