"""Zero-shot accuracy on the local tasks computed in-process, without lm-evaluation-harness.

The same numbers as `pyramoe eval CKPT --tasks ...` (the harness with the "pyramoe" model), from the
same scoring code (`scoring.Scorer`): each request is encoded as the harness's TemplateLM does
(trailing context whitespace moves to the continuation; the continuation's ids are those of the whole
text after the context's), the model is the checkpoint's with MoE layers dropless, and a row longer
than max_length + 1 tokens keeps its last max_length + 1 (the context is cut on the left); max_length is
the checkpoint's trained seq_len unless given.

    cloze      acc = greedy decoding gives exactly the target (the harness's is_greedy)
    nextline   acc = the true line has the highest log-likelihood of the 4 (the harness's "acc",
    docsig         unnormalised; ties go to the first choice, as numpy's argmax)

`limit` keeps each task's first `limit` records (the same records for every model), as --limit does.
Each task's result carries its per-record outcomes (a "0"/"1" string in record order), so that arms
scored on the same records can be compared example by example, and the trivial baseline on them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pyramoe.evaluation.baselines import task_baseline
from pyramoe.evaluation.scoring import Scorer, TokenPair, resolve_dtype, trained_seq_len
from pyramoe.evaluation.taskdata import TaskFiles, build_tasks, read_task

ACCURACY_TASKS = ("pyramoe_stdlib_cloze", "pyramoe_stdlib_nextline", "pyramoe_stdlib_docsig")
SCORING_VERSION = 2  # bump when what a stored accuracy means changes (encoding, truncation, metric)


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> TokenPair:
    """(context ids, continuation ids) as the harness's TemplateLM builds them for a causal model."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = encode(context)
    return ctx, encode(context + continuation)[len(ctx) :]


def _requests(task: str, records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    if task == "pyramoe_stdlib_cloze":
        return [(r["context"], r["target"]) for r in records]
    return [(r["context"], choice) for r in records for choice in r["choices"]]


def _outcomes(task: str, records: Sequence[dict[str, Any]], scored: list[tuple[float, bool]]) -> list[bool]:
    """Whether the model gets each record right."""
    if task == "pyramoe_stdlib_cloze":
        return [greedy for _, greedy in scored]
    hits, at = [], 0
    for record in records:
        logps = [logp for logp, _ in scored[at : at + len(record["choices"])]]
        at += len(record["choices"])
        hits.append(max(range(len(logps)), key=lambda i: (logps[i], -i)) == record["label"])
    return hits


def task_accuracy(
    scorer: Scorer, encode: Callable[[str], list[int]], tasks: Sequence[str] = ACCURACY_TASKS,
    limit: int | None = None, files: TaskFiles | None = None,
) -> dict[str, dict[str, Any]]:
    """task -> {"acc", "n", "chance", "baseline", "outcomes"} for the local accuracy tasks (baseline:
    the best trivial strategy's accuracy on the same records; outcomes: "1" per record got right)."""
    files = files or build_tasks()
    out = {}
    for task in tasks:
        if task not in ACCURACY_TASKS:
            raise ValueError(f"accuracy: {task!r} is not one of the local accuracy tasks ({', '.join(ACCURACY_TASKS)})")
        records = read_task(task, files)[:limit]
        pairs = [encode_pair(encode, context, continuation) if context else ([scorer.pad_id], encode(continuation))
                 for context, continuation in _requests(task, records)]  # empty context: the prefix token
        hits = _outcomes(task, records, scorer.loglikelihood(pairs))
        baseline = task_baseline(records)
        out[task] = {"acc": sum(hits) / len(records), "n": len(records), "chance": files.meta["chance"][task],
                     "baseline": baseline["acc"] if baseline else None,
                     "outcomes": "".join("1" if hit else "0" for hit in hits)}
    return out


def eval_settings(tasks: Sequence[str], limit: int | None, dtype: str, files: TaskFiles,
                  max_length: int | None = None) -> dict[str, Any]:
    """What a stored accuracy depends on besides the checkpoint: the task files' contents (hashed),
    the tasks, the per-task limit, the dtype, the scoring length (None: each checkpoint's trained
    seq_len) and the scoring code's version."""
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(files.path(task).read_bytes())
    return {"tasks": list(tasks), "limit": limit, "dtype": dtype, "dropless": True, "max_length": max_length,
            "scoring_version": SCORING_VERSION, "task_data": digest.hexdigest()[:16],
            "task_fingerprint": files.meta.get("fingerprint")}


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def checkpoint_accuracy(
    checkpoint: str | Path, tasks: Sequence[str] = ACCURACY_TASKS, limit: int | None = None, dtype: str = "fp32",
    batch_size: int = 32, files: TaskFiles | None = None, max_length: int | None = None,
) -> dict[str, dict[str, Any]]:
    """A pyramoe checkpoint (or run directory: its latest) loaded dropless, scored on the local tasks in
    at most `max_length` tokens (default: the seq_len it trained on)."""
    from pyramoe.checkpoint import build_model, load_checkpoint
    from pyramoe.data import Tokenizer

    ckpt = load_checkpoint(checkpoint)
    tokenizer = Tokenizer.from_file(ckpt.tokenizer_path)
    tokenizer.encode_specials_as_text(True)  # as the harness model does (and the corpus was tokenized)
    model = build_model(ckpt, dropless=True).eval()
    length = max_length or min(trained_seq_len(ckpt.state) or model.config.max_seq_len, model.config.max_seq_len)
    scorer = Scorer(model, tokenizer.eos_id, batch_size, resolve_dtype(dtype), length)
    with torch.no_grad():
        return task_accuracy(scorer, tokenizer.encode, tasks, limit, files)
