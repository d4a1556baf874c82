"""Tokenized corpora on disk and batch sampling from them.

    CACHE_DIR/tokenizer.json, meta.json        the tokenizer (trained on the corpus, or the user's)
    CACHE_DIR/split-FINGERPRINT-TOKSHA/        train.bin / val.bin (memory-mapped) and their meta.json
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pyramoe.data.corpus import DEFAULT_VAL_PERCENT, Corpus, load_corpus
from pyramoe.data.tokenizer import TRAIN_SAMPLE_BYTES, Tokenizer

_META_VERSION = 1
_CHUNK_CHARS = 1 << 21  # text per encode_batch call: big enough to keep all Rust threads busy


class TokenDataset:
    """A flat token file, memory-mapped, sampled as (input, shifted target) windows."""

    def __init__(self, path: str | os.PathLike, dtype: str | np.dtype) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if not self.path.is_file():
            raise ValueError(f"token file not found: {self.path}")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"token file {self.path} is not a whole number of {self.dtype} tokens")
        # np.memmap refuses empty files; an empty split is still a valid (if useless) dataset.
        self.tokens = np.memmap(self.path, self.dtype, mode="r") if size else np.empty(0, self.dtype)

    def __len__(self) -> int:
        return len(self.tokens)

    def get_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x, y int64 [batch_size, seq_len] with y[:, t] == x[:, t + 1]."""
        self._check_window(seq_len)
        starts = torch.randint(0, len(self) - seq_len, (batch_size,), generator=generator)
        return self._windows(starts.numpy(), seq_len)

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows from the start of the file; the last batch may be smaller."""
        self._check_window(seq_len)
        n_windows = (len(self) - 1) // seq_len
        for b, first in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
            yield self._windows(starts, seq_len)

    def _check_window(self, seq_len: int) -> None:
        if len(self) < seq_len + 1:
            raise ValueError(
                f"{self.path} has {len(self)} tokens, too few for seq_len {seq_len}; "
                "use more data or a shorter seq_len"
            )

    def _windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(seq_len + 1)
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


@dataclass
class PreparedData:
    """A tokenizer plus the token files built with it."""

    tokenizer: Tokenizer
    cache_dir: Path
    train_path: Path
    val_path: Path
    dtype: str
    train_tokens: int
    val_tokens: int
    rebuilt: bool  # True when the token files were (re)built by this call
    skipped_files: dict[str, int] = field(default_factory=dict)  # corpus files left out, by reason

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_dataset(self) -> TokenDataset:
        return TokenDataset(self.train_path, self.dtype)

    def val_dataset(self) -> TokenDataset:
        return TokenDataset(self.val_path, self.dtype)


def default_cache_root() -> Path:
    """``$PYRAMOE_CACHE`` or ``~/.cache/pyramoe``."""
    return Path(os.environ.get("PYRAMOE_CACHE") or Path.home() / ".cache" / "pyramoe").expanduser()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_data(
    corpus_spec: str = "stdlib",
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    val_percent: float = DEFAULT_VAL_PERCENT,
    text_field: str = "text",
    max_bytes: int | None = None,
    progress: bool = True,
) -> PreparedData:
    """Load (or train) the tokenizer and build train.bin / val.bin once; later calls reuse them."""
    corpus = load_corpus(corpus_spec, val_percent, text_field, max_bytes)
    if next(corpus.train_docs(), None) is None:
        raise ValueError(f"corpus {corpus.spec!r} contains no training text")
    user_tok = Tokenizer.from_file(tokenizer_path) if tokenizer_path is not None else None
    if cache_dir is None:
        tag = f"t{user_tok.sha}" if user_tok else f"v{vocab_size}"
        cache_dir = default_cache_root() / "data" / f"{corpus.fingerprint}-{tag}"
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = _read_meta(cache_dir / "meta.json")
    tokenizer = user_tok or _trained_tokenizer(corpus, vocab_size, cache_dir, meta)
    if user_tok is not None:
        user_tok.save(cache_dir / "tokenizer.json")  # keep the cache dir self-contained
        meta.pop("tokenizer_key", None)

    dtype = token_dtype(tokenizer.vocab_size)
    split_dir = cache_dir / split_dir_name(corpus, tokenizer)
    split_dir.mkdir(exist_ok=True)
    split_meta = _read_meta(split_dir / "meta.json")
    paths = {split: split_dir / f"{split}.bin" for split in ("train", "val")}
    wanted = {
        "version": _META_VERSION,
        "fingerprint": corpus.fingerprint,
        "tokenizer_sha": tokenizer.sha,
        "dtype": dtype.name,
    }
    rebuilt = not _cache_valid(split_meta, wanted, paths)
    if rebuilt:
        # Invalidate first: a crash mid-build must not leave old meta beside new files.
        _write_json(split_dir / "meta.json", {})
        counts = _build_token_files(corpus, tokenizer, paths, dtype, progress)
        split_meta = {**wanted, "train_tokens": counts["train"], "val_tokens": counts["val"],
                      "skipped_files": dict(corpus.skipped)}
        _write_json(split_dir / "meta.json", split_meta)
    return PreparedData(
        tokenizer,
        cache_dir,
        paths["train"],
        paths["val"],
        dtype.name,
        split_meta["train_tokens"],
        split_meta["val_tokens"],
        rebuilt,
        dict(split_meta.get("skipped_files", {})),
    )


def split_dir_name(corpus: Corpus, tokenizer: Tokenizer) -> str:
    """Token files live in a directory named by everything that decides their contents - the corpus
    and its split settings (the fingerprint covers val_percent, max_bytes, text_field and the files)
    and the tokenizer - so that one cache directory can hold several splits and building one never
    overwrites another (a run resumed with other settings must not turn its training text into
    another run's validation text)."""
    return f"split-{corpus.fingerprint}-{tokenizer.sha[:16]}"


def _trained_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path, meta: dict) -> Tokenizer:
    """The cached tokenizer if it was trained on this corpus with this vocab size, else a new one."""
    key = hashlib.sha256(
        json.dumps([corpus.fingerprint, vocab_size, TRAIN_SAMPLE_BYTES]).encode()
    ).hexdigest()[:16]
    path = cache_dir / "tokenizer.json"
    if meta.get("tokenizer_key") == key and path.is_file():
        try:
            return Tokenizer.from_file(path)
        except ValueError:
            pass  # damaged cache: retrain below
    tokenizer = Tokenizer.train(corpus.train_docs(), vocab_size)
    tokenizer.save(path)
    meta["tokenizer_key"] = key
    _write_json(cache_dir / "meta.json", meta)
    return tokenizer


def _cache_valid(meta: dict, wanted: dict, paths: dict[str, Path]) -> bool:
    if any(meta.get(k) != v for k, v in wanted.items()):
        return False
    itemsize = np.dtype(wanted["dtype"]).itemsize
    for split, path in paths.items():
        count = meta.get(f"{split}_tokens")
        if not isinstance(count, int) or not path.is_file() or path.stat().st_size != count * itemsize:
            return False
    return True


def _build_token_files(
    corpus: Corpus, tokenizer: Tokenizer, paths: dict[str, Path], dtype: np.dtype, progress: bool
) -> dict[str, int]:
    bar = tqdm(total=corpus.approx_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    tokenizer.encode_specials_as_text(True)
    try:
        docs = {"train": corpus.train_docs(), "val": corpus.val_docs()}
        return {split: _write_tokens(docs[split], tokenizer, paths[split], dtype, bar) for split in paths}
    finally:
        tokenizer.encode_specials_as_text(False)
        bar.close()


def _write_tokens(docs: Iterable[str], tokenizer: Tokenizer, path: Path, dtype: np.dtype, bar: tqdm) -> int:
    """Tokenize docs into ``path`` (each followed by EOS); written under a temp name, then renamed."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    count = 0
    try:
        with open(tmp, "wb") as f:
            for batch in _chunks(docs, _CHUNK_CHARS):
                ids = _join(tokenizer.encode_batch(batch), tokenizer.eos_id, dtype)
                f.write(ids.tobytes())
                count += len(ids)
                bar.update(sum(len(doc) for doc in batch))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _chunks(docs: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _join(encoded: list[list[int]], eos_id: int, dtype: np.dtype) -> np.ndarray:
    out = np.empty(sum(len(ids) for ids in encoded) + len(encoded), dtype=dtype)
    pos = 0
    for ids in encoded:
        out[pos : pos + len(ids)] = ids
        pos += len(ids)
        out[pos] = eos_id
        pos += 1
    return out


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)
