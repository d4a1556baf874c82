"""Zero-shot tasks built from a corpus's held-out validation documents (no download).

Every record comes from `Corpus.heldout()` alone: the validation documents (which no run on that corpus
and split trains on, nor its tokenizer) less those that are near-duplicates of training text. A record
whose answer line (cloze: the completed line; nextline: the true line; docsig: a line of the docstring
summary or of the signature) occurs in the training split is dropped too (`pyramoe.data.dedup`);
meta.json counts both. Building is deterministic: the same documents give the same files, byte for
byte (selection and choice order come from SHA-256 hashes of the text, never from a random state).

    pyramoe_stdlib_cloze     last identifier of a line, LAMBADA-style: {"context", "target"}
    pyramoe_stdlib_nextline  the true next line among 4 (3 from other files): {"context", "choices", "label"}
    pyramoe_stdlib_docsig    the signature a docstring belongs to, among 4: {"context", "choices", "label"}
    pyramoe_stdlib_ppl       perplexity of held-out text chunks: {"text"}

Files: CACHE/evaluation/FINGERPRINT-vVERSION/TASK.jsonl and meta.json (counts, chance levels, trivial
baselines, what deduplication dropped, corpus).
"""

from __future__ import annotations

import ast
import hashlib
import json
import keyword
import os
import re
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyramoe.data import DEFAULT_VAL_PERCENT, default_cache_root, load_corpus
from pyramoe.data.dedup import TrainingText
from pyramoe.evaluation.baselines import task_baseline

BUILDER_VERSION = 2  # 2: deduplicated against the training split; up to 5000 records a task
TASK_VAL_PERCENT = DEFAULT_VAL_PERCENT  # the split the shipped task configs are built from
CHOICES = 4  # multiple-choice tasks: the true answer and CHOICES - 1 distractors
MAX_EXAMPLES = 5000  # every record the held-out text gives, up to this (intervals shrink with n)
CONTEXT_CHARS = 1500  # preceding text given as context, cut at a line start
MIN_LINE_CHARS = 8
PPL_CHUNK_CHARS = 2000
_IDENT_END = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)$")
_SIG_MAX_CHARS = 200
_DOC_MAX_LINES = 3
_DOC_MAX_CHARS = 300


@dataclass(frozen=True)
class TaskSpec:
    name: str
    # (held-out documents, training split) -> (records, candidate records dropped as seen in training)
    build: Callable[[list[str], TrainingText], tuple[list[dict[str, Any]], int]]
    chance: float | None  # accuracy of a uniform random choice; None: no accuracy metric
    about: str


def _hash(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8", "replace")).hexdigest()


def _doc_id(text: str) -> str:
    return _hash("doc", text)[:16]


def _context(lines: list[str], index: int) -> str:
    """Whole lines before `index`, the last ones first, up to CONTEXT_CHARS characters."""
    out: list[str] = []
    size = 0
    for line in reversed(lines[:index]):
        if size + len(line) > CONTEXT_CHARS and out:
            break
        out.append(line)
        size += len(line)
    return "".join(reversed(out))


def _spread(per_doc: dict[str, list[tuple[str, dict]]], limit: int) -> list[dict]:
    """Up to `limit` records taken round-robin over documents (each document's in hash order), so
    that no single large file dominates a task; documents in hash order."""
    queues = [sorted(items, key=lambda item: item[0]) for _, items in sorted(per_doc.items())]
    out: list[dict] = []
    depth = 0
    while len(out) < limit and any(depth < len(q) for q in queues):
        out.extend(q[depth][1] for q in queues if depth < len(q))
        depth += 1
    return out[:limit]


# -- (a) last-identifier cloze ----------------------------------------------------------------------------


def _cloze_candidate(lines: list[str], i: int) -> dict | None:
    line = lines[i].rstrip()
    stripped = line.lstrip()
    if i < 3 or stripped.startswith("#") or '"' in line or "'" in line:
        return None
    match = _IDENT_END.search(line)
    if match is None:
        return None
    name = match.group(1)
    prefix = line[: match.start()]
    if len(name) < 2 or keyword.iskeyword(name) or keyword.issoftkeyword(name) or not prefix.strip():
        return None
    if prefix[-1:].isalnum():  # the tail of a number literal (0xff), not a name
        return None
    context = _context(lines, i) + prefix
    if not re.search(rf"\b{re.escape(name)}\b", context):  # as LAMBADA: the answer is in the context
        return None
    return {"context": context, "target": name}


def build_cloze(docs: list[str], training: TrainingText) -> tuple[list[dict], int]:
    per_doc: dict[str, list[tuple[str, dict]]] = {}
    dropped = 0
    for text in docs:
        doc = _doc_id(text)
        lines = text.splitlines(keepends=True)
        for i in range(len(lines)):
            record = _cloze_candidate(lines, i)
            if record is not None and training.seen_line(lines[i]):
                dropped += 1
            elif record is not None:
                per_doc.setdefault(doc, []).append((_hash("cloze", doc, i), record))
    return _spread(per_doc, MAX_EXAMPLES), dropped


# -- (b) next line among lines of other files ---------------------------------------------------------------


def _is_content_line(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= MIN_LINE_CHARS and any(c.isalnum() for c in stripped)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _distractors(pool: list[tuple[str, str]], doc: str, truth: str, key: str, wanted: int) -> list[str] | None:
    """`wanted` texts from `pool` ((doc id, text) pairs) of documents other than `doc`, distinct from
    `truth` and each other, picked by hashing `key`; None when the pool has too few."""
    picked: list[str] = []
    seen = {truth}
    start = int(_hash("pick", key)[:12], 16)
    for step in range(len(pool)):
        other_doc, text = pool[(start + step * 7919) % len(pool)]
        if other_doc != doc and text not in seen:
            picked.append(text)
            seen.add(text)
            if len(picked) == wanted:
                return picked
    return None


def _multiple_choice(context: str, truth: str, others: list[str], key: str) -> dict:
    """Choices in an order fixed by `key`: the true one's index is uniform over the positions."""
    label = int(_hash("label", key)[:8], 16) % (len(others) + 1)
    choices = others[:label] + [truth] + others[label:]
    return {"context": context, "choices": choices, "label": label}


def build_nextline(docs: list[str], training: TrainingText) -> tuple[list[dict], int]:
    split = [(_doc_id(text), text.splitlines(keepends=True)) for text in docs]
    pool = [(doc, line.strip()) for doc, lines in split for line in lines if _is_content_line(line)]
    pool.sort(key=lambda item: _hash("pool", *item))
    per_doc: dict[str, list[tuple[str, dict]]] = {}
    dropped = 0
    for doc, lines in split:
        for i in range(3, len(lines)):
            line = lines[i].rstrip("\r\n")
            if not _is_content_line(line):
                continue
            if training.seen_line(line):
                dropped += 1
                continue
            key = _hash("nextline", doc, i)
            others = _distractors(pool, doc, line.strip(), key, CHOICES - 1)
            if others is None:
                continue
            others = [_indent(line) + text for text in others]  # indentation must not give it away
            record = _multiple_choice(_context(lines, i), line, others, key)
            per_doc.setdefault(doc, []).append((key, record))
    return _spread(per_doc, MAX_EXAMPLES), dropped


# -- (c) docstring -> signature --------------------------------------------------------------------------


def _functions(text: str) -> Iterator[tuple[str, str]]:
    """(docstring summary as comment lines, dedented signature) of each documented function."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        body_line = node.body[0].lineno  # the docstring's first line
        if not doc or body_line <= node.lineno:
            continue
        signature = textwrap.dedent("\n".join(lines[node.lineno - 1 : body_line - 1])).rstrip()
        summary = doc.split("\n\n")[0].strip().splitlines()[:_DOC_MAX_LINES]
        comment = "".join(f"# {line.strip()}\n" for line in summary)
        if signature.endswith(":") and len(signature) <= _SIG_MAX_CHARS and 12 <= len(comment) <= _DOC_MAX_CHARS:
            yield comment, signature


def build_docsig(docs: list[str], training: TrainingText) -> tuple[list[dict], int]:
    found = [(_doc_id(text), comment, sig) for text in docs for comment, sig in _functions(text)]
    pool = sorted(((doc, sig) for doc, _, sig in found), key=lambda item: _hash("pool", *item))
    per_doc: dict[str, list[tuple[str, dict]]] = {}
    dropped = 0
    for doc, comment, sig in found:
        lines = [line.removeprefix("# ") for line in comment.splitlines()] + sig.splitlines()
        if any(training.seen_line(line) for line in lines):
            dropped += 1
            continue
        key = _hash("docsig", doc, comment, sig)
        others = _distractors(pool, doc, sig, key, CHOICES - 1)
        if others is not None:
            per_doc.setdefault(doc, []).append((key, _multiple_choice(comment, sig, others, key)))
    return _spread(per_doc, MAX_EXAMPLES), dropped


# -- perplexity chunks -------------------------------------------------------------------------------------


def build_ppl(docs: list[str], training: TrainingText) -> tuple[list[dict], int]:  # noqa: ARG001 - documents deduplicated already
    """Each document's first PPL_CHUNK_CHARS characters, cut at a line end."""
    per_doc: dict[str, list[tuple[str, dict]]] = {}
    for text in docs:
        head = text[:PPL_CHUNK_CHARS]
        cut = head.rfind("\n") + 1 if len(text) > PPL_CHUNK_CHARS else len(head)
        if head[:cut].strip():
            doc = _doc_id(text)
            per_doc[doc] = [(doc, {"text": head[:cut]})]
    return _spread(per_doc, MAX_EXAMPLES), 0


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("pyramoe_stdlib_cloze", build_cloze, 0.0,
                 "LAMBADA-style: the last identifier of a line (one that occurs earlier in the context), "
                 "scored exactly by greedy decoding; chance is 0 (an open vocabulary)"),
        TaskSpec("pyramoe_stdlib_nextline", build_nextline, 1 / CHOICES,
                 f"the true next line among {CHOICES}, the others drawn from other held-out files and "
                 "re-indented like the true one"),
        TaskSpec("pyramoe_stdlib_docsig", build_docsig, 1 / CHOICES,
                 f"given a docstring's summary as comment lines, the signature of its function among {CHOICES} "
                 "(the others from functions of other held-out files)"),
        TaskSpec("pyramoe_stdlib_ppl", build_ppl, None,
                 "word/byte perplexity and bits per byte of held-out files' first "
                 f"{PPL_CHUNK_CHARS} characters"),
    )
}


# -- files -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFiles:
    directory: Path
    meta: dict[str, Any]

    def path(self, task: str) -> Path:
        return self.directory / f"{task}.jsonl"


def task_dir(corpus_fingerprint: str, root: Path | None = None) -> Path:
    return (root or default_cache_root()) / "evaluation" / f"{corpus_fingerprint}-v{BUILDER_VERSION}"


def build_tasks(
    corpus: str = "stdlib", val_percent: float = TASK_VAL_PERCENT, root: Path | None = None, force: bool = False
) -> TaskFiles:
    """Build every task's JSONL from the corpus's held-out documents, deduplicated against its training
    split (once; later calls reuse them)."""
    source = load_corpus(corpus, val_percent)
    directory = task_dir(source.fingerprint, root)
    meta_path = directory / "meta.json"
    if not force and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if all(TaskFiles(directory, meta).path(name).is_file() for name in TASKS):
            return TaskFiles(directory, meta)
    heldout = source.heldout()
    docs = heldout.docs
    if not docs:
        raise ValueError(f"corpus {corpus!r}: no validation documents to build tasks from (val_percent={val_percent}; "
                         f"{heldout.dropped} dropped as near-duplicates of training text)")
    directory.mkdir(parents=True, exist_ok=True)
    counts, dropped, baselines = {}, {}, {}
    for name, spec in TASKS.items():
        records, dropped[name] = spec.build(docs, heldout.training)
        _write_jsonl(directory / f"{name}.jsonl", records)
        counts[name] = len(records)
        baselines[name] = task_baseline(records)
    meta = {"builder_version": BUILDER_VERSION, "corpus": corpus, "val_percent": val_percent,
            "fingerprint": source.fingerprint, "val_documents": len(docs), "examples": counts,
            "chance": {name: spec.chance for name, spec in TASKS.items()}, "baseline": baselines,
            "dedup": {**heldout.report(), "records_dropped": dropped}}
    _write_atomic(meta_path, json.dumps(meta, indent=1) + "\n")
    return TaskFiles(directory, meta)


def read_task(task: str, files: TaskFiles | None = None) -> list[dict[str, Any]]:
    if task not in TASKS:
        raise ValueError(f"unknown local task {task!r} (known: {', '.join(TASKS)})")
    files = files or build_tasks()
    with open(files.path(task), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
