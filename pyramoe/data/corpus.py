"""Text corpora: the Python stdlib (default), user files/dirs/JSONL, or a local HF dataset.

A corpus is a deterministic stream of *units* ``(key, text)``; the key alone decides whether a
unit goes to validation, so the split never depends on iteration order or on the machine.

Reading rules. A directory: every text file is one document, except JSON Lines files (``.jsonl``,
``.ndjson``), which hold one document per record; a ``.json`` file there is an ordinary text
document (package.json, fixtures), not records. A file given on its own: ``.jsonl``, ``.ndjson``
and ``.json`` are JSON Lines; anything else is text, cut into chunks at line breaks. Text is
UTF-8 unless a byte-order mark says UTF-8/16/32 or, in a ``.py`` file, a PEP 263 coding cookie names
another encoding; undecodable bytes become U+FFFD. Files with a NUL byte near the start (and no
UTF-16/32 mark) are binary and skipped; `Corpus.skipped` counts them.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyramoe.data.dedup import HeldOut, deduplicate

Unit = tuple[str, str]  # (split key, document text)

DEFAULT_VAL_PERCENT = 2.0
JSONL_SUFFIXES = (".jsonl", ".ndjson")  # JSON Lines wherever they are
FILE_JSONL_SUFFIXES = (*JSONL_SUFFIXES, ".json")  # ... and a .json named as the corpus itself
# Byte-order marks, longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_FORMAT_VERSION = 2  # bump when the unit/split rules change, so old caches are not reused


@dataclass(frozen=True)
class Corpus:
    """A corpus with a stable train/validation split; documents are plain strings."""

    spec: str
    fingerprint: str
    val_percent: float
    units: Callable[[], Iterator[Unit]]
    max_bytes: int | None = None
    approx_bytes: int | None = None  # for progress bars only
    # Files left out, by reason ("binary"); counted during each pass over the units.
    skipped: Counter = field(default_factory=Counter, compare=False)

    def train_docs(self) -> Iterator[str]:
        """Training documents, in a deterministic order."""
        return (text for is_val, text in self._labelled() if not is_val)

    def val_docs(self) -> Iterator[str]:
        """Validation documents; never empty when val_percent > 0 and the corpus has two or more units."""
        return (text for is_val, text in self._labelled() if is_val)

    def heldout(self) -> HeldOut:
        """Validation documents without the near-duplicates of training text (see `dedup`), with the
        training split's line hashes for finer checks. Reads the corpus twice."""
        return deduplicate(self.val_docs(), self.train_docs())

    def _labelled(self) -> Iterator[tuple[bool, str]]:
        """``(is_val, text)`` per unit: val when the key's hash falls under val_percent.

        Tiny corpora get two exceptions, decided at the end so one pass suffices: with no unit under the
        threshold, the smallest-hash unit becomes val; a single unit is always train.
        """
        frac = self.val_percent / 100
        held: tuple[float, str] | None = None  # smallest-hash train unit so far: val if nothing else is
        first_val: str | None = None  # a val first unit: train if it turns out to be the only one
        saw_val, count = False, 0
        for key, text in self._capped_units():
            count += 1
            u = _unit_hash(key)
            if frac and u < frac:
                saw_val = True
                if count == 1:
                    first_val = text
                else:
                    yield True, text
            elif frac and (held is None or u < held[0]):
                if held is not None:
                    yield False, held[1]
                held = (u, text)
            else:
                yield False, text
        if first_val is not None:
            yield count > 1, first_val
        if held is not None:
            yield not saw_val and count >= 2, held[1]

    def _capped_units(self) -> Iterator[Unit]:
        budget = self.max_bytes
        for key, text in self.units():
            if not text:
                continue
            if budget is None:
                yield key, text
                continue
            if budget <= 0:
                return
            data = text.encode("utf-8", "replace")
            if len(data) > budget:
                text = data[:budget].decode("utf-8", "ignore")
            budget -= len(data)
            yield key, text


def load_corpus(
    spec: str = "stdlib",
    val_percent: float = DEFAULT_VAL_PERCENT,
    text_field: str = "text",
    max_bytes: int | None = None,
) -> Corpus:
    """Open a corpus: ``"stdlib"``, a text file, a directory, a ``.jsonl`` file, or ``"hf:PATH[:split]"``."""
    if not 0 <= val_percent <= 50:
        raise ValueError(f"val_percent must be between 0 and 50, got {val_percent}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    spec = str(spec)
    skipped: Counter = Counter()
    if spec == "stdlib":
        root = stdlib_root()
        units, stamp, size = _files_source(root, stdlib_files(root), text_field, skipped)
    elif spec.startswith("hf:"):
        units, stamp, size = _hf_source(spec[3:], text_field)
    else:
        units, stamp, size = _path_source(Path(spec).expanduser(), text_field, skipped)
    parts = [_FORMAT_VERSION, spec, val_percent, text_field, max_bytes, stamp]
    fingerprint = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    if max_bytes is not None and size is not None:
        size = min(size, max_bytes)
    return Corpus(spec, fingerprint, val_percent, units, max_bytes, size, skipped)


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, without site-packages or a venv inside it."""
    root = root or stdlib_root()
    venv = Path(sys.prefix).resolve() if sys.prefix != sys.base_prefix else None
    files = [p for p in _walk(root, venv) if p.suffix == ".py"]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _walk(root: Path, exclude: Path | None = None) -> Iterator[Path]:
    """Files under root, skipping hidden entries, package dirs, caches and ``exclude``."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".") and here / d != exclude
        ]
        yield from (here / f for f in filenames if not f.startswith("."))


def _path_source(
    path: Path, text_field: str, skipped: Counter
) -> tuple[Callable[[], Iterator[Unit]], list, int]:
    if not path.exists():
        raise ValueError(f"corpus path not found: {path}")
    path = path.resolve()
    if path.is_dir():
        files = sorted(_walk(path), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"no files found in corpus directory {path}")
        return _files_source(path, files, text_field, skipped)
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"corpus file is empty: {path}")
    stamp = [[path.name, size, path.stat().st_mtime_ns]]
    if path.suffix.lower() in FILE_JSONL_SUFFIXES:
        return (lambda: _jsonl_units(path, text_field, path.name)), stamp, size
    return (lambda: _chunk_units(path, size)), stamp, size


def _files_source(
    root: Path, files: list[Path], text_field: str, skipped: Counter
) -> tuple[Callable[[], Iterator[Unit]], list, int]:
    stats = [(p, p.relative_to(root).as_posix(), p.stat()) for p in files]
    stamp = [[rel, st.st_size, st.st_mtime_ns] for _, rel, st in stats]

    def units() -> Iterator[Unit]:
        skipped.clear()  # every pass sees the same files: count one pass
        for path, rel, _ in stats:
            if path.suffix.lower() in JSONL_SUFFIXES:
                yield from _jsonl_units(path, text_field, rel)
                continue
            text = _read_text(path)
            if text is None:
                skipped["binary"] += 1
            else:
                yield rel, text

    return units, stamp, sum(st.st_size for _, _, st in stats)


def _read_text(path: Path) -> str | None:
    """File contents as text (see the module's reading rules), or None for a binary file."""
    with open(path, "rb") as f:
        data = f.read()
    encoding = _encoding_of(path, data[:8192])
    return None if encoding is None else data.decode(encoding, errors="replace")


def _encoding_of(path: Path, head: bytes) -> str | None:
    """The encoding `head` (a file's first bytes) is in; None: binary."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding  # the -sig/BOM-reading codecs drop the mark itself
    if b"\0" in head:
        return None
    if path.suffix.lower() in (".py", ".pyw"):
        try:
            return tokenize.detect_encoding(io.BytesIO(head).readline)[0]
        except SyntaxError:  # a cookie naming an unknown codec, or an invalid UTF-8 first line
            return "utf-8"
    return "utf-8"


def _chunk_units(path: Path, size: int) -> Iterator[Unit]:
    """A single text file cut at line breaks into chunks, so that it can still be split.

    UTF-8 is cut on its bytes (chunk keys and contents as in format 1); a file marked as UTF-16/32 is
    decoded first, since its line breaks are not single bytes.
    """
    target = min(max(size // 64, 4096), 1 << 20)
    with open(path, "rb") as f:
        head = f.read(8192)
    encoding = _encoding_of(path, head) or "utf-8"
    if encoding.startswith("utf-8"):
        with open(path, "rb") as f:
            lines = (line for line in f)
            yield from _chunked(lines, target, lambda chunk: chunk.decode(encoding, errors="replace"))
    else:
        with open(path, encoding=encoding, errors="replace", newline="") as f:
            yield from _chunked(f, target, str)


def _chunked(lines, target: int, decode: Callable) -> Iterator[Unit]:
    """Consecutive lines joined into units of about `target` bytes (characters for decoded text)."""
    buf: list = []
    n = index = 0
    for line in lines:
        buf.append(line)
        n += len(line)
        if n >= target:
            yield str(index), decode(buf[0][:0].join(buf))
            buf, n, index = [], 0, index + 1
    if buf:
        yield str(index), decode(buf[0][:0].join(buf))


def _jsonl_units(path: Path, text_field: str, prefix: str) -> Iterator[Unit]:
    """One unit per JSON line; blank lines are skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{prefix}:{lineno}", _jsonl_text(line, text_field, path, lineno)


def _jsonl_text(line: str, text_field: str, path: Path, lineno: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one object per line") from None
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{path}:{lineno}: record has no {text_field!r} field")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
    return _clean(text)


def _clean(text: str) -> str:
    """Drop lone surrogates (legal in JSON, illegal for the Rust tokenizer)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _hf_source(rest: str, text_field: str) -> tuple[Callable[[], Iterator[Unit]], list, None]:
    path_str, split = rest, None
    head, sep, tail = rest.rpartition(":")
    if sep and tail and "/" not in tail and "\\" not in tail and not Path(rest).exists():
        path_str, split = head, tail
    path = Path(path_str).expanduser()
    if not path.exists():
        raise ValueError(f"Hugging Face dataset directory not found: {path}")
    try:
        import datasets  # optional dependency
    except ImportError:
        raise ValueError(f"corpus 'hf:{rest}' needs the 'datasets' package (pip install datasets)") from None
    ds = _pick_split(datasets.load_from_disk(str(path)), split, path)
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {path} has no {text_field!r} column (columns: {ds.column_names})")
    files = sorted(_walk(path))
    stamp = [split, [[p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]]

    def units() -> Iterator[Unit]:
        index = 0
        for batch in ds.iter(batch_size=1024):
            for text in batch[text_field]:
                if isinstance(text, str):
                    yield str(index), _clean(text)
                index += 1

    return units, stamp, None


def _pick_split(ds, split: str | None, path: Path):
    """A Dataset as is, or one split of a DatasetDict (default "train")."""
    if not isinstance(ds, dict):  # DatasetDict is a dict of split name -> Dataset
        if split is not None:
            raise ValueError(f"dataset {path} has no splits, but split {split!r} was requested")
        return ds
    name = split or "train"
    if name not in ds:
        raise ValueError(f"dataset {path} has no split {name!r} (splits: {sorted(ds.keys())})")
    return ds[name]


def _unit_hash(key: str) -> float:
    """A uniform number in [0, 1) derived from the key only."""
    digest = hashlib.sha1(key.encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
