"""The device step on a model `distribute`d over processes (`Engine(step="device")` after
`Engine.distribute`): on 2 gloo processes, expert parallel (EP=2) and tensor parallel (TP=2, tokens
split or experts sliced), every rank chooses the one-process device step's greedy tokens (penalised
ones included) and gives its log-probabilities; the ranks agree. Under TP with the tokens split the
MoE layers run on the device on each rank's share and the step still makes no host sync."""

from __future__ import annotations

import json
import os

import pytest
import torch
from distributed import run_workers
from host_syncs import no_host_syncs
from test_native_decode import CASES, _model  # noqa: I001 - the block kinds of the engine's tests

from pyramoe.inference import Engine, SamplingParams

REQUESTS = [([5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 11], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                                logprobs=2)),
            ([3, 1], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)),
            ([7, 7, 7, 2, 5], SamplingParams(max_tokens=9, temperature=0.0, frequency_penalty=1.5, ignore_eos=True)),
            ([4, 4, 9, 1], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=1))]


def _generate(engine: Engine) -> dict:
    ids = [engine.add_request(prompt, params) for prompt, params in REQUESTS]
    tokens = {i: [] for i in ids}
    logprobs = {i: [] for i in ids}
    for event in engine.stream():
        if event.token_id is not None:
            tokens[event.request_id].append(event.token_id)
        if event.logprob is not None:
            logprobs[event.request_id].append(event.logprob[0])
        if event.prompt_logprobs is not None:
            logprobs[event.request_id] += [p[0] for p in event.prompt_logprobs[1:]]
    return {"tokens": [tokens[i] for i in ids], "logprobs": [logprobs[i] for i in ids], "path": engine.decode_path,
            "counts": engine.expert_counts().tolist()}


def _engine() -> Engine:
    # max_batch 3 for 4 requests: a slot is reused; 8 rows a step: prompts in chunks beside decode rows.
    return Engine(_model(CASES["mixtral"], torch.float32), max_batch=3, max_len=48, max_step_tokens=8, block_size=4,
                  step="device")


def _worker(rank: int, world: int, ep: int, tp: int, slicing: bool, out_dir: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    engine = _engine()
    assert engine.distribute(ep=ep, tp=tp, expert_slicing=slicing) is not None
    engine.prepare()
    runner = engine.runner
    kinds = {type(moe).__name__ for moe in runner._moe.values()}
    assert kinds == ({"_SpreadMoE"} if ep > 1 or slicing else {"_SplitDeviceMoE"})
    assert not runner.graphs  # spread layers run eagerly
    assert engine.model.blocks[0].attn.n_heads == 4 // tp
    if ep == 1 and not slicing:  # DeviceMoE on each rank's share, collectives only: still no host sync
        forward = runner._device_forward

        def guarded(plan, host):
            with no_host_syncs():
                return forward(plan, host)

        runner._device_forward = guarded
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(_generate(engine), f)


@pytest.mark.parametrize("ep, tp, slicing", [(2, 1, False), (1, 2, False), (1, 2, True)])
def test_distributed_device_step_equals_one_process(tmp_path, ep, tp, slicing):
    want = _generate(_engine())
    run_workers(_worker, 2, tmp_path, ep, tp, slicing, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        assert got["path"] == "device"
        assert got["tokens"] == want["tokens"]
        assert [len(lp) for lp in got["logprobs"]] == [len(lp) for lp in want["logprobs"]] == [10, 0, 0, 3]
        for ours, theirs in zip(got["logprobs"], want["logprobs"]):
            torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=1e-4)
    assert ranks[0]["tokens"] == ranks[1]["tokens"] and ranks[0]["logprobs"] == ranks[1]["logprobs"]
    if tp == 1 or slicing:  # every rank routes all tokens (under TP's token split each routes a share)
        assert ranks[0]["counts"] == ranks[1]["counts"] == want["counts"]
