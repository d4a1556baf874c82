"""Study 6, the paper's inference claim: a trained MoE decodes faster than the dense model of the same
quality, at batch 1 and 16.

The study's arms are the MoE (`expected_better`) and dense models of growing size trained on the
same corpus, budget and seeds (`expected_worse` is the dense model with the MoE's active parameters).
What is compared:

1. The quality-equivalent dense model (`quality_equivalent`): the smallest dense arm (by parameters)
   whose mean final validation loss over the seeds is at or below the MoE's (the mean paired
   difference dense - MoE <= 0; arms share each seed's initialisation and batch order). Smallest,
   because it is the fastest dense model of that quality: the choice least favourable to the claim.
2. Speed (`measure_inference`): every arm's first-seed checkpoint in pyramoe's `Engine` (dropless,
   bf16 where the CPU multiplies bf16 natively), greedy decode of B prompts of real text at B = 1 and
   16, and the prefill of 16 prompts, all in ONE run with the arms alternating round by round (so
   other load on the machine slows each alike). Decode step time is (t(N new tokens) - t(1)) / (N - 1),
   so prefill is excluded; per-token latency is that step time, throughput B / step time. Medians
   over rounds; the MoE's speedup over a dense arm is judged per round (dense time / MoE time).
3. Verdict per batch (`batch_verdicts`): the per-round speedups over the quality-equivalent dense
   (geometric mean, 95% bootstrap interval over the rounds: `verdicts.speed_outcome`): holds when the
   interval lies above 1, contradicted when below 1, inconclusive otherwise, or when no dense arm
   reached the MoE's loss.

Why (stated with the numbers, `decode_bytes`): a decode step reads the weights it uses. At batch 1
the MoE reads top-k of E experts per MoE layer; at batch 16 its tokens together pick most experts, so
it reads nearly all of its (larger) weights, while a dense model reads the same weights at any batch.
The distinct experts each decode step touched are counted in an untimed pass.

Timings are never cached: `pyramoe experiments inference` re-measures them on every call, reusing the
trained runs (their result.json), so the verdict can be re-checked on an idle machine in minutes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pyramoe.bench.common import decode_bytes, timed
from pyramoe.experiments.verdicts import INCONCLUSIVE, describe_speedup, speed_outcome
from pyramoe.tables import format_table

BATCHES = (1, 16)
PROMPT_LEN = 64
NEW_TOKENS = 64
ROUNDS = 15
WARMUP = 2
PREFILL_BATCH = 16


# -- which dense model is quality-equivalent ------------------------------------------------------------------


def paired_by_seed(dense: dict[str, Any], moe: dict[str, Any]) -> dict[str, float]:
    """dense loss - MoE loss on each seed both arms ran (seeds as strings, as JSON keeps them)."""
    d = {str(k): v for k, v in dense["val_loss_by_seed"].items()}
    m = {str(k): v for k, v in moe["val_loss_by_seed"].items()}
    return {seed: d[seed] - m[seed] for seed in sorted(set(d) & set(m), key=int)}


def quality_equivalent(arms: dict[str, dict[str, Any]], moe: str) -> dict[str, Any]:
    """The smallest dense arm whose mean paired validation loss is at or below the MoE's (None if none).

    `arms` are arm summaries (runner.arm_summary: parameters, active_parameters, val_loss_by_seed);
    every dense arm (all parameters active) is a candidate."""
    candidates = []
    for name, arm in sorted(arms.items(), key=lambda item: (item[1]["parameters"], item[0])):
        if name == moe or arm["parameters"] != arm["active_parameters"]:
            continue
        diffs = paired_by_seed(arm, arms[moe])
        diff = statistics.mean(diffs.values()) if diffs else float("nan")
        candidates.append({"arm": name, "parameters": arm["parameters"], "mean_diff": diff, "seeds": len(diffs),
                           "diffs": diffs, "reaches": bool(diffs) and diff <= 0.0})
    chosen = next((c["arm"] for c in candidates if c["reaches"]), None)
    return {"arm": chosen, "moe": moe, "candidates": candidates}


# -- timing ----------------------------------------------------------------------------------------------------


def text_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens of Python source (the stdlib, the corpus the arms trained
    on), so that the MoE routes real text; from the last files, one window each."""
    from pyramoe.data.corpus import stdlib_files

    prompts: list[list[int]] = []
    for path in reversed(stdlib_files()):
        try:
            ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")[:20000])
        except OSError:
            continue
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"inference study: fewer than {count} stdlib files of {length} tokens")


def _engine(model: torch.nn.Module, batch: int, **options: Any) -> Any:
    from pyramoe.inference import Engine

    return Engine(model, None, max_batch=batch, eos_id=None, prefix_caching=False, **options)  # timed again and again


def _generate(engine: Any, prompts: list[list[int]], new_tokens: int) -> Any:
    from pyramoe.inference import SamplingParams

    return engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0))


def experts_touched(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> dict[str, float] | None:
    """Mean distinct experts per MoE layer per decode step over an untimed greedy decode of `prompts`
    (None for a dense model, or when the MoE layers report no routing statistics)."""
    from pyramoe.layers.moe import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        return None
    counts: list[int] = []
    batch = len(prompts)

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if args else None
        stats = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        routed = getattr(stats, "routed_per_expert", None)
        if x is not None and routed is not None and x.reshape(-1, x.shape[-1]).shape[0] == batch:
            counts.append(int((routed > 0).sum()))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        # The PyTorch decode step (the native one runs the MoE layers without calling their modules),
        # on plain weights (one short run: packing would cost more than it saves). The engine's view
        # of the model copies the hooks registered above.
        _generate(_engine(model, batch, native=False, pack_weights=False), prompts, new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    if not counts:
        return None
    return {"mean": statistics.mean(counts), "of": layers[0].num_experts, "top_k": layers[0].config.top_k}


def decode_step_ms(engine: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """One decode step's time (ms): generating `new_tokens` minus generating 1, per further token."""
    long = timed(lambda: _generate(engine, prompts, new_tokens))
    short = timed(lambda: _generate(engine, prompts, 1))
    return max(long - short, 1e-9) / (new_tokens - 1) * 1e3


def measure_inference(
    models: dict[str, torch.nn.Module], prompts: list[list[int]], batches: tuple[int, ...] = BATCHES,
    new_tokens: int = NEW_TOKENS, rounds: int = ROUNDS, warmup: int = WARMUP, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Decode step time at each batch and prefill time per model, in one run, models alternating
    round by round (the order rotated each round). Per model and batch: step times (ms), median ms per
    token, tokens/s, and the distinct experts a decode step touched; prefill tokens/s of the prompts."""
    names = list(models)
    # Weight bytes of the plain weights (each engine packs its own view of a model, never the model).
    weights = {name: (decode_bytes(model, 0.0), decode_bytes(model, None)) for name, model in models.items()}
    out: dict[str, Any] = {"batches": list(batches), "new_tokens": new_tokens, "prompt_len": len(prompts[0]),
                           "rounds": rounds, "warmup": warmup, "decode": {}, "prefill": {}}
    for batch in batches:
        rows = prompts[:batch]
        engines = {name: _engine(model, batch) for name, model in models.items()}
        steps: dict[str, list[float]] = {name: [] for name in names}
        for r in range(warmup + rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                ms = decode_step_ms(engines[name], rows, new_tokens)
                if r >= warmup:
                    steps[name].append(ms)
            if log and r >= warmup:
                log(f"batch {batch} round {r - warmup + 1}: " + ", ".join(f"{n} {steps[n][-1]:.2f} ms" for n in names))
        out["decode"][str(batch)] = {}
        for name, model in models.items():
            ms = statistics.median(steps[name])
            touched = experts_touched(model, rows, min(new_tokens, 8))
            shared, every_expert = weights[name]
            read = every_expert
            if touched is not None:
                read = shared + (every_expert - shared) * touched["mean"] / touched["of"]
            out["decode"][str(batch)][name] = {
                "step_ms": steps[name], "ms_per_token": ms, "tok_s": batch * 1e3 / ms,
                "experts_touched": touched, "bytes_per_step": int(read),
            }
    rows = prompts[:PREFILL_BATCH]
    engines = {name: _engine(model, len(rows)) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = timed(lambda engine=engines[name]: _generate(engine, rows, 1))
            if r >= warmup:
                times[name].append(t)
    tokens = sum(len(p) for p in rows)
    out["prefill"] = {name: {"seconds": times[name], "tok_s": tokens / statistics.median(times[name]),
                             "tokens": tokens} for name in names}
    return out


def speedups(timing: dict[str, Any], batch: int, moe: str, dense: str) -> list[float]:
    """Per round: the dense arm's decode step time over the MoE's (> 1: the MoE is faster)."""
    arms = timing["decode"][str(batch)]
    return [d / m for d, m in zip(arms[dense]["step_ms"], arms[moe]["step_ms"])]


# -- the verdict -----------------------------------------------------------------------------------------------


def batch_verdicts(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """batch -> outcome (on the rounds' speedups' interval), median speedup and its per-round range over
    the quality-equivalent dense."""
    study = summary.get("inference") or {}
    chosen, timing = (study.get("quality_equivalent") or {}).get("arm"), study.get("timing")
    moe = (study.get("quality_equivalent") or {}).get("moe")
    out = {}
    for batch in (timing or {}).get("batches", BATCHES):
        if chosen is None or timing is None:
            out[str(batch)] = {"outcome": INCONCLUSIVE, "speedup": None}
            continue
        values = speedups(timing, batch, moe, chosen)
        out[str(batch)] = {"outcome": speed_outcome(values, 1.0), "speedup": statistics.median(values),
                           "min": min(values), "max": max(values), "rounds": len(values),
                           "described": describe_speedup(values, f"{moe} decodes").format(other=chosen)}
    return out


def inference_verdict(summary: dict[str, Any]) -> str:
    """One line: per batch, whether the MoE decodes faster than the quality-equivalent dense."""
    study = summary.get("inference")
    if not study or not study.get("timing"):
        return f"{INCONCLUSIVE}: not timed yet"
    qe = study["quality_equivalent"]
    if qe["arm"] is None:
        best = min(qe["candidates"], key=lambda c: c["mean_diff"], default=None)
        detail = f" (closest: {best['arm']}, {best['mean_diff']:+.3f})" if best else ""
        return (f"{INCONCLUSIVE}: no dense arm reached {qe['moe']}'s validation loss{detail}; "
                "train a larger dense arm")
    parts = []
    for batch, v in batch_verdicts(summary).items():
        parts.append(f"batch {batch}: {v['outcome']} ({v['described']})")
    return "MoE faster than quality-equivalent dense at " + "; ".join(parts)


def add_inference(summary: dict[str, Any], moe: str, timing: dict[str, Any] | None) -> dict[str, Any]:
    """The quality-equivalent choice, the timing and the verdict, into the study's summary."""
    summary["inference"] = {"quality_equivalent": quality_equivalent(summary["arms"], moe), "timing": timing}
    summary["verdict"] = inference_verdict(summary)
    return summary


def checkpoint_dir(run_dir: Path) -> Path:
    """The run's latest checkpoint, or that of the run its result was reused from (followed on)."""
    from pyramoe.experiments.rundirs import checkpoint_run_dir
    from pyramoe.train import checkpoint as ckpt_io

    latest = ckpt_io.latest_checkpoint(ckpt_io.checkpoint_root(checkpoint_run_dir(run_dir)))
    assert latest is not None  # checkpoint_run_dir raises when there is none
    return latest


def time_study(run_dirs: dict[str, Path], dtype: str = "auto", rounds: int = ROUNDS,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load each arm's checkpoint into the engine's dtype and time them all in one run (prompts of
    PROMPT_LEN tokens and NEW_TOKENS new ones, both cut to fit the models' max_seq_len)."""
    from pyramoe.data import Tokenizer
    from pyramoe.inference import resolve_dtype
    from pyramoe.train import build_model, load_checkpoint

    torch_dtype = resolve_dtype(dtype)
    models, tokenizer = {}, None
    for name, run_dir in run_dirs.items():
        ckpt = load_checkpoint(checkpoint_dir(run_dir))
        models[name] = build_model(ckpt, dropless=True).to(torch_dtype)
        tokenizer = tokenizer or Tokenizer.from_file(ckpt.tokenizer_path)
    max_len = min(model.config.max_seq_len for model in models.values())
    prompt_len = min(PROMPT_LEN, max_len // 2)
    new_tokens = min(NEW_TOKENS, max_len - prompt_len - 1)
    prompts = text_prompts(tokenizer, max(max(BATCHES), PREFILL_BATCH), prompt_len)
    with torch.no_grad():
        timing = measure_inference(models, prompts, BATCHES, new_tokens=new_tokens, rounds=rounds, log=log)
    from pyramoe.bench.common import machine_label

    return {**timing, "dtype": str(torch_dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "machine": machine_label(), "load_before": _loadavg(), "checkpoints": {
                n: str(checkpoint_dir(d)) for n, d in run_dirs.items()}}


def _loadavg() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- the report ------------------------------------------------------------------------------------------------


def selection_table(summary: dict[str, Any]) -> str:
    qe = summary["inference"]["quality_equivalent"]
    moe = summary["arms"][qe["moe"]]
    rows = [[qe["moe"], f"{moe['parameters'] / 1e6:.2f}M", f"{moe['active_parameters'] / 1e6:.2f}M",
             f"{moe['val_loss_mean']:.3f}", "-", "-", "MoE"]]
    for c in qe["candidates"]:
        arm = summary["arms"][c["arm"]]
        role = "quality-equivalent" if c["arm"] == qe["arm"] else ("reaches" if c["reaches"] else "above MoE loss")
        per_seed = ", ".join(f"{d:+.3f}" for d in c.get("diffs", {}).values())
        rows.append([c["arm"], f"{arm['parameters'] / 1e6:.2f}M", f"{arm['active_parameters'] / 1e6:.2f}M",
                     f"{arm['val_loss_mean']:.3f}", f"{c['mean_diff']:+.3f}", per_seed, role])
    headers = ["arm", "params", "active", "val loss (mean)", "dense - MoE (mean)", "by seed", "role"]
    return format_table(headers, rows)


def timing_table(summary: dict[str, Any]) -> str:
    study = summary["inference"]
    timing, qe = study["timing"], study["quality_equivalent"]
    moe = qe["moe"]
    headers = ["arm", "batch", "ms/token", "tok/s", f"{moe} speedup", "MB read/step", "experts/step",
               "prefill tok/s"]
    rows = []
    for batch in timing["batches"]:
        for name, arm in timing["decode"][str(batch)].items():
            if name == moe:
                speed = "-"
            else:
                values = speedups(timing, batch, moe, name)
                speed = f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
            touched = arm["experts_touched"]
            experts = f"{touched['mean']:.1f} of {touched['of']}" if touched else "-"
            label = f"{name} (q-eq)" if name == qe["arm"] else name
            rows.append([label, batch, f"{arm['ms_per_token']:.2f}", f"{arm['tok_s']:.0f}", speed,
                         f"{arm['bytes_per_step'] / 1e6:.1f}", experts,
                         f"{timing['prefill'][name]['tok_s']:,.0f}" if batch == timing["batches"][0] else ""])
    return format_table(headers, rows)


def inference_section(study: Any, summary: dict[str, Any], image_dir: str, settings_line: str) -> list[str]:
    """docs/results.md's section for the inference study (report.study_section delegates here)."""
    seeds = ",".join(str(s) for s in next(iter(summary["arms"].values()))["seeds"])
    lines = [f"**Quality** (`pyramoe experiments {study.name}`: {settings_line}; seeds {seeds}; "
             f"{summary['machine']}). Quality-equivalent dense: the smallest dense arm whose mean paired "
             "validation loss is at or below the MoE's.", "", "```", selection_table(summary), "```", ""]
    timing = (summary.get("inference") or {}).get("timing")
    if timing:
        load = timing.get("load_before")
        lines += [
            f"**Speed** (one run, arms alternating round by round, {timing['rounds']} rounds after "
            f"{timing['warmup']} warm-up; {timing['dtype']}, {timing['threads']} thread(s), pyramoe `Engine` "
            f"greedy and dropless; prompts of {timing['prompt_len']} tokens of stdlib source; decode step = "
            f"(t({timing['new_tokens']} tokens) - t(1)) / {timing['new_tokens'] - 1}; prefill: "
            f"{timing['prefill'][next(iter(timing['prefill']))]['tokens']} prompt tokens in one batch; "
            f"{timing['machine']}{f', load average {load[0]:.2f} before timing' if load else ''}). "
            "Speedup: median (min-max) over rounds of dense step time / MoE step time; the verdict uses "
            "their geometric mean with a 95% bootstrap interval over the rounds. Re-time without "
            f"retraining: `pyramoe experiments {study.name} --set train.precision=bf16` (add `--set "
            "train.threads=1` for one thread).",
            "", "```", timing_table(summary), "```", ""]
    lines += [f"![{study.name}]({image_dir}{study.name}.png)", "", f"**Direction:** {summary['verdict']}.", ""]
    if study.notes:
        lines += [study.notes.format(**summary["settings"]), ""]
    return lines


def time_inference_study(study: Any, summary: dict[str, Any], plans: list[Any], train: dict[str, Any],
                         progress: bool = True) -> dict[str, Any]:
    """runner.run_study's step for a `compare="inference"` study: time the arms' first-seed checkpoints
    (one thread per `train.threads` when set, else torch's default) and add the selection, timing and
    verdict to the summary."""
    if train.get("threads"):
        torch.set_num_threads(int(train["threads"]))
    first = plans[0].seed
    run_dirs = {p.arm.name: p.run_dir for p in plans if p.seed == first}
    log = print if progress else None
    add_inference(summary, study.expected_better, time_study(run_dirs, rounds=ROUNDS, log=log))
    if not getattr(study, "zeroshot", False):  # runs reused from a scored study carry accuracies: not compared here
        for key in ("zeroshot", "paired_accuracy", "accuracy_verdict"):
            summary.pop(key, None)
        for arm in summary["arms"].values():
            arm.pop("accuracy", None)
            arm.pop("accuracy_by_seed", None)
    if progress:
        print(selection_table(summary))
        print(timing_table(summary))
    return summary
