"""Study 6 (inference): the quality-equivalent dense arm, the per-batch speed verdict, decode bytes, the
timing run on tiny models, and the report section, from synthetic summaries and a tiny end-to-end study."""

from __future__ import annotations

import json

import pytest
import torch

from pyramoe.config import ModelConfig, build_layers
from pyramoe.experiments import STUDIES, inference_study, render_results, run_study, runner
from pyramoe.experiments.inference_study import (
    add_inference,
    decode_bytes,
    inference_verdict,
    measure_inference,
    quality_equivalent,
)
from pyramoe.experiments.studies import Arm, Study
from pyramoe.experiments.verdicts import speed_outcome, speedup_interval
from pyramoe.models import GPT


def arm(params: int, losses: dict[int, float], active: int | None = None) -> dict:
    values = list(losses.values())
    return {"preset": "x", "model": {}, "seeds": list(losses), "val_loss_by_seed": losses,
            "val_loss_mean": sum(values) / len(values), "val_loss_min": min(values), "val_loss_max": max(values),
            "val_loss_spread": max(values) - min(values), "parameters": params,
            "active_parameters": active or params, "n_layers": 4, "d_model": 256}


MOE = arm(12_700_000, {1: 4.97, 2: 4.91, 3: 4.95}, active=5_300_000)
ARMS = {  # deliberately not in size order
    "dense-ff2x": arm(7_400_000, {1: 4.80, 2: 4.78, 3: 4.82}),
    "moe-8": MOE,
    "dense": arm(5_300_000, {1: 4.99, 2: 4.94, 3: 4.96}),
    "dense-ff1.5x": arm(6_400_000, {1: 4.95, 2: 4.92, 3: 4.93}),  # mean paired diff -0.01: reaches
    "dense-ff1.25x": arm(5_800_000, {1: 4.96, 2: 4.93, 3: 4.97}),  # +0.01: does not
    "moe-4": arm(9_000_000, {1: 4.00, 2: 4.00, 3: 4.00}, active=5_300_000),  # an MoE is never a candidate
}


def test_quality_equivalent_is_the_smallest_dense_arm_at_or_below_the_moe_loss():
    qe = quality_equivalent(ARMS, "moe-8")
    assert qe["arm"] == "dense-ff1.5x"
    assert [c["arm"] for c in qe["candidates"]] == ["dense", "dense-ff1.25x", "dense-ff1.5x", "dense-ff2x"]
    assert [c["reaches"] for c in qe["candidates"]] == [False, False, True, True]
    assert qe["candidates"][1]["mean_diff"] == pytest.approx(0.01)
    assert qe["candidates"][1]["diffs"] == pytest.approx({"1": -0.01, "2": 0.02, "3": 0.02})
    # Exactly the MoE's loss counts as reaching it; nothing at or below it: no quality-equivalent arm.
    assert quality_equivalent({"moe-8": MOE, "d": arm(6, dict(MOE["val_loss_by_seed"]))}, "moe-8")["arm"] == "d"
    assert quality_equivalent({k: ARMS[k] for k in ("moe-8", "dense", "dense-ff1.25x")}, "moe-8")["arm"] is None


def timing(moe_ms: dict[int, list[float]], dense_ms: dict[int, list[float]], name: str = "dense-ff1.5x") -> dict:
    decode = {}
    for batch in (1, 16):
        decode[str(batch)] = {
            n: {"step_ms": ms[batch], "ms_per_token": sorted(ms[batch])[len(ms[batch]) // 2],
                "tok_s": batch * 1e3 / sorted(ms[batch])[len(ms[batch]) // 2], "bytes_per_step": 10_000_000,
                "experts_touched": {"mean": 1.0 if batch == 1 else 5.5, "of": 8, "top_k": 1} if n == "moe-8" else None}
            for n, ms in (("moe-8", moe_ms), (name, dense_ms))}
    prefill = {n: {"seconds": [0.1], "tok_s": 9000.0, "tokens": 1024} for n in ("moe-8", name)}
    return {"batches": [1, 16], "new_tokens": 32, "prompt_len": 64, "rounds": 5, "warmup": 1, "decode": decode,
            "prefill": prefill, "dtype": "bfloat16", "threads": 2, "machine": "test machine", "load_before": [0.1]}


def test_speed_outcome_needs_the_interval_clear_of_the_threshold():
    assert speed_outcome([1.2, 1.3, 1.25, 1.4, 1.22], 1.0) == "holds"
    assert speed_outcome([1.2, 1.3, 1.25, 1.4, 1.22], 1.3) == "inconclusive"
    assert speed_outcome([0.6, 0.7, 0.65, 0.8, 0.7], 1.0) == "contradicted"
    assert speed_outcome([0.8, 1.2, 0.9, 1.1, 1.3], 1.0) == "inconclusive"
    assert speed_outcome([2.0], 1.0) == "inconclusive"  # one round is no verdict


def test_speedup_interval_is_a_geometric_mean_with_a_bootstrap_interval():
    interval = speedup_interval([2.0, 0.5, 2.0, 0.5])
    assert interval["speedup"] == pytest.approx(1.0)  # ratios cancel in log space
    assert interval["low"] < 1.0 < interval["high"]
    tight = speedup_interval([1.2] * 9 + [1.21])
    assert 1.2 <= tight["low"] <= tight["speedup"] <= tight["high"] <= 1.21
    assert speedup_interval([1.5]) is None


def test_verdict_per_batch_against_the_quality_equivalent_arm():
    summary = {"arms": ARMS}
    fast_b1 = timing({1: [2.0] * 5, 16: [6.0, 6.1, 5.9, 6.0, 6.2]}, {1: [3.0] * 5, 16: [4.0] * 5})
    verdict = add_inference(summary, "moe-8", fast_b1)["verdict"]
    assert "batch 1: holds" in verdict and "batch 16: contradicted" in verdict
    assert "1.50x as fast as dense-ff1.5x" in verdict and "0.66x as fast" in verdict
    # Slower at batch 1 turns it round.
    slow_b1 = timing({1: [4.0] * 5, 16: [3.0] * 5}, {1: [3.0] * 5, 16: [4.0] * 5})
    verdict = add_inference(summary, "moe-8", slow_b1)["verdict"]
    assert "batch 1: contradicted" in verdict and "batch 16: holds" in verdict
    # Without a quality-equivalent arm, or without timings, there is no verdict.
    no_qe = {"arms": {k: ARMS[k] for k in ("moe-8", "dense", "dense-ff1.25x")}}
    assert add_inference(no_qe, "moe-8", fast_b1)["verdict"].startswith("inconclusive: no dense arm reached")
    assert inference_verdict({"arms": ARMS}) == "inconclusive: not timed yet"


def _summary_file(docs, verdict_timing: dict) -> dict:
    summary = {"study": "inference", "title": STUDIES["inference"].title, "paper": "x",
               "settings": {"steps": 300, "batch_size": 16, "seq_len": 128, "grad_accum": 1, "lr": 0.002,
                            "min_lr": 0.0002, "warmup": 30, "precision": "bf16", "corpus": "stdlib",
                            "tokens_per_run": 614400},
               "machine": "test machine", "arms": ARMS, "runs": [], "step_time": None,
               "paired": {"diffs": {}, "n": 0, "mean": 0.0, "min": 0.0, "max": 0.0, "spread": 0.0}}
    add_inference(summary, "moe-8", verdict_timing)
    docs.mkdir(parents=True)
    (docs / "inference.json").write_text(json.dumps(summary))
    return summary


def test_report_section_renders_from_a_summary(tmp_path):
    docs = tmp_path / "docs" / "results"
    _summary_file(docs, timing({1: [2.0] * 5, 16: [6.0] * 5}, {1: [3.0] * 5, 16: [4.0] * 5}))
    text = render_results(docs, {"inference": STUDIES["inference"]}).read_text()
    section = text.split(f"## {STUDIES['inference'].title}")[1]
    assert "up to 4.5x faster" in section  # the paper's claim
    assert "dense-ff1.5x (q-eq)" in section and "quality-equivalent" in section and "above MoE loss" in section
    assert "-0.010, +0.020, +0.020" in section  # dense-ff1.25x - moe-8 by seed
    assert "1.50 (1.50-1.50)" in section and "0.67 (0.67-0.67)" in section  # per-batch speedups
    assert "5.5 of 8" in section and "1.0 of 8" in section  # experts a decode step touched
    assert "**Direction:** MoE faster than quality-equivalent dense at batch 1: holds" in section
    assert "batch 16: contradicted" in section and "pyramoe experiments inference --set train.precision=bf16" in section


def tiny_model(moe: bool, d_ff: int | None = None) -> GPT:
    torch.manual_seed(0)
    layers = build_layers(2, "every_other" if moe else "none", 4)
    return GPT(ModelConfig(vocab_size=64, max_seq_len=32, d_model=16, n_heads=2, d_ff=d_ff, layers=layers)).eval()


def test_decode_bytes_count_the_experts_read_and_skip_embedding_lookups():
    dense, moe = tiny_model(False), tiny_model(True)
    params = {n: p for n, p in dense.named_parameters()}
    full = sum(p.numel() * 4 for n, p in params.items() if n != "pos_emb.weight")  # tied table = the LM head
    assert decode_bytes(dense, None) == full
    expert_bytes = sum(p.numel() * 4 for n, p in moe.named_parameters() if ".experts." in n)
    all_experts = decode_bytes(moe, 4.0)
    assert all_experts - decode_bytes(moe, 1.0) == expert_bytes * 3 // 4
    assert decode_bytes(moe, 4.0) == decode_bytes(moe, None)


def test_measure_inference_times_each_model_at_each_batch():
    models = {"moe": tiny_model(True).to(torch.bfloat16), "dense": tiny_model(False, d_ff=96).to(torch.bfloat16)}
    prompts = [[(7 * i + j) % 64 for j in range(8)] for i in range(16)]
    out = measure_inference(models, prompts, batches=(1, 4), new_tokens=4, rounds=2, warmup=1)
    for batch in ("1", "4"):
        for name in models:
            arm = out["decode"][batch][name]
            assert len(arm["step_ms"]) == 2 and arm["tok_s"] == pytest.approx(int(batch) * 1e3 / arm["ms_per_token"])
        assert out["decode"][batch]["dense"]["experts_touched"] is None
    assert out["decode"]["1"]["moe"]["experts_touched"]["mean"] == 1.0  # top-1: one expert per token
    assert 1.0 <= out["decode"]["4"]["moe"]["experts_touched"]["mean"] <= 4.0
    assert out["prefill"]["moe"]["tokens"] == 16 * 8 and out["prefill"]["dense"]["tok_s"] > 0
    # Bytes as the weights were before the engine prepacked them: one expert of 4 per MoE layer at batch 1.
    fresh = {"moe": tiny_model(True).to(torch.bfloat16), "dense": tiny_model(False, d_ff=96).to(torch.bfloat16)}
    assert out["decode"]["1"]["moe"]["bytes_per_step"] == decode_bytes(fresh["moe"], 1.0) > 0
    assert out["decode"]["4"]["dense"]["bytes_per_step"] == decode_bytes(fresh["dense"], None)


SMALL = {"d_model": 32, "n_layers": 2, "max_seq_len": 32}
TINY = Study(
    name="tiny-inference", title="tiny inference", paper_finding="MoE decodes faster.",
    arms=(Arm("moe", "tiny-moe", SMALL), Arm("dense", "tiny-dense", SMALL),
          Arm("dense-wide", "tiny-dense", {**SMALL, "d_ff": 256})),
    expected_better="moe", expected_worse="dense", seeds=(1, 2), steps=3, compare="inference",
)


@pytest.mark.usefixtures("tiny_run_env")
def test_study_trains_once_and_re_times_on_every_call(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i % 11}\n\n" for i in range(300)))
    train = dict(corpus=str(corpus), vocab_size=300, batch_size=4, seq_len=16, eval_every=3, eval_batches=1,
                 val_percent=10.0, warmup=1, threads=1)
    monkeypatch.setattr(inference_study, "ROUNDS", 2)
    monkeypatch.setattr(inference_study, "BATCHES", (1, 2))
    docs = tmp_path / "docs" / "results"
    summary = run_study(TINY, tmp_path / "runs", docs, train=train, progress=False)
    assert summary["step_time"] is None  # no training step times for this study
    timing = summary["inference"]["timing"]
    assert set(timing["decode"]["1"]) == {"moe", "dense", "dense-wide"} and timing["rounds"] == 2
    assert timing["prompt_len"] == 16 and timing["new_tokens"] == 15  # cut to max_seq_len 32
    assert summary["verdict"] == inference_verdict(summary)
    assert "paired_accuracy" not in summary and "accuracy" not in summary["arms"]["moe"]  # not a scored study
    assert summary["inference"]["timing"]["decode"]["1"]["moe"]["bytes_per_step"] > 0
    assert json.loads((docs / "tiny-inference.json").read_text())["inference"]["timing"]["rounds"] == 2

    calls = []
    monkeypatch.setattr(runner, "open_trainer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    original = inference_study.measure_inference
    monkeypatch.setattr(inference_study, "measure_inference", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = run_study(TINY, tmp_path / "runs", docs, train=train, progress=False)
    assert calls == [1] and again["runs"] == summary["runs"]  # re-timed, not retrained
    # Another study with these arms reuses the runs and times the checkpoints they were reused from.
    other = run_study(Study(**{**TINY.__dict__, "name": "tiny-2"}), tmp_path / "runs", docs, train=train,
                      progress=False)
    checkpoints = other["inference"]["timing"]["checkpoints"]
    assert calls == [1, 1] and all("/tiny-inference/" in path for path in checkpoints.values())
