"""Held-out text deduplicated by content against the training split.

A corpus splits by key (a file's path), so a held-out file can still repeat training text: a codec
table generated from the same template as twenty training ones, a test helper copied between
packages. Evaluating on it measures memory, not generalisation. Two levels, both on exact hashes of
*normalized* lines (whitespace runs collapsed, ends stripped) that are *non-trivial* (at least
MIN_LINE_CHARS characters, one of them alphanumeric; shorter lines - `else:`, `)` - repeat everywhere):

- a held-out document is a near-duplicate, and dropped, when at least NEAR_DUPLICATE of its shingles
  (SHINGLE consecutive non-trivial lines) occur in the training split;
- a task record is a duplicate (`TrainingText.seen_line` / `seen_shingle`), and the task builders
  drop it, when its answer's line occurs in the training split.

Exact hashing (8 bytes of BLAKE2b) rather than MinHash: the training split is read once per task
build, a set lookup per line is cheaper than sketching, and containment - how much of a held-out
document training already holds - is what leakage is about, not Jaccard similarity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

MIN_LINE_CHARS = 8
SHINGLE = 3
NEAR_DUPLICATE = 0.5


def normalize_line(line: str) -> str | None:
    """The line with whitespace runs collapsed, or None when it is trivial."""
    text = " ".join(line.split())
    if len(text) < MIN_LINE_CHARS or not any(c.isalnum() for c in text):
        return None
    return text


def content_lines(text: str) -> list[str]:
    """The non-trivial lines of a text, normalized, in order."""
    return [n for n in map(normalize_line, text.splitlines()) if n is not None]


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big")


def _shingles(lines: list[str]) -> Iterable[int]:
    return (_digest("\n".join(lines[i : i + SHINGLE])) for i in range(len(lines) - SHINGLE + 1))


@dataclass
class TrainingText:
    """Hashes of the training split's non-trivial lines and line shingles."""

    lines: set[int] = field(default_factory=set)
    shingles: set[int] = field(default_factory=set)

    @classmethod
    def from_docs(cls, docs: Iterable[str]) -> TrainingText:
        index = cls()
        for text in docs:
            lines = content_lines(text)
            index.lines.update(map(_digest, lines))
            index.shingles.update(_shingles(lines))
        return index

    def seen_line(self, line: str) -> bool:
        """Whether the line, normalized, is non-trivial and occurs in the training split."""
        text = normalize_line(line)
        return text is not None and _digest(text) in self.lines

    def seen_shingle(self, lines: list[str]) -> bool:
        """Whether the last SHINGLE non-trivial lines of `lines` occur, consecutively, in the training split."""
        tail = [n for n in map(normalize_line, lines) if n is not None][-SHINGLE:]
        return len(tail) == SHINGLE and _digest("\n".join(tail)) in self.shingles

    def containment(self, text: str) -> float:
        """The share of the text's shingles (of its lines, when it has too few for one) found in training."""
        lines = content_lines(text)
        if len(lines) >= SHINGLE:
            hashes, known = list(_shingles(lines)), self.shingles
        else:
            hashes, known = [_digest(line) for line in lines], self.lines
        return sum(h in known for h in hashes) / len(hashes) if hashes else 0.0


@dataclass
class HeldOut:
    """Held-out documents without the near-duplicates of training text, and what was dropped."""

    docs: list[str]
    dropped: int
    training: TrainingText

    def report(self) -> dict[str, int | float]:
        return {"documents_kept": len(self.docs), "documents_dropped": self.dropped,
                "near_duplicate_share": NEAR_DUPLICATE, "shingle_lines": SHINGLE, "min_line_chars": MIN_LINE_CHARS}


def deduplicate(val_docs: Iterable[str], train_docs: Iterable[str], threshold: float = NEAR_DUPLICATE) -> HeldOut:
    """The validation documents whose shingle containment in the training split is under `threshold`."""
    training = TrainingText.from_docs(train_docs)
    kept, dropped = [], 0
    for text in val_docs:
        if training.containment(text) >= threshold:
            dropped += 1
        else:
            kept.append(text)
    return HeldOut(kept, dropped, training)
