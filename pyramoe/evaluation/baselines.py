"""What a trivial strategy scores on each local task, to report beside chance.

Chance says what guessing blindly gets; these say what reading the record without a model gets, which
is the level a small model has to beat before its score means anything (cloze's chance is 0, yet
picking the context's most frequent identifier is right a few times in a hundred). Each task's
baseline is the best of its strategies on the same records, named:

    cloze      the most frequent identifier of the context / the most recent one (ties: the most recent)
    choices    the shortest choice / the longest / the one sharing the most words with the context
               (ties: the first, as the harness's argmax)

No strategy looks at the label; a perplexity task has none.
"""

from __future__ import annotations

import keyword
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD = re.compile(r"[A-Za-z0-9_]+")


def _identifiers(text: str) -> list[str]:
    """Identifiers as the cloze builder accepts a target: two characters or more, not a keyword."""
    return [w for w in _IDENT.findall(text) if len(w) >= 2 and not keyword.iskeyword(w)
            and not keyword.issoftkeyword(w)]


def most_frequent_identifier(context: str) -> str | None:
    names = _identifiers(context)
    if not names:
        return None
    counts = Counter(names)
    last = {name: i for i, name in enumerate(names)}
    return max(counts, key=lambda name: (counts[name], last[name]))


def most_recent_identifier(context: str) -> str | None:
    names = _identifiers(context)
    return names[-1] if names else None


def _argmax(scores: Sequence[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def shortest_choice(record: dict[str, Any]) -> int:
    return _argmax([-len(c.strip()) for c in record["choices"]])


def longest_choice(record: dict[str, Any]) -> int:
    return _argmax([len(c.strip()) for c in record["choices"]])


def most_shared_words(record: dict[str, Any]) -> int:
    context = set(_WORD.findall(record["context"]))
    return _argmax([len(set(_WORD.findall(c)) & context) for c in record["choices"]])


CLOZE: dict[str, Callable[[str], str | None]] = {
    "most frequent identifier in the context": most_frequent_identifier,
    "most recent identifier in the context": most_recent_identifier,
}
CHOICE: dict[str, Callable[[dict[str, Any]], int]] = {
    "shortest choice": shortest_choice,
    "longest choice": longest_choice,
    "most words shared with the context": most_shared_words,
}


def strategy_outcomes(records: Sequence[dict[str, Any]]) -> dict[str, list[bool]]:
    """strategy -> whether it is right on each record (cloze records have a "target", multiple-choice
    ones "choices" and "label"; others have no strategy)."""
    if not records:
        return {}
    if "target" in records[0]:
        return {name: [guess(r["context"]) == r["target"] for r in records] for name, guess in CLOZE.items()}
    if "choices" in records[0]:
        return {name: [pick(r) == r["label"] for r in records] for name, pick in CHOICE.items()}
    return {}


def task_baseline(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """{"acc": the best strategy's accuracy, "strategy": its name, "strategies": {name: acc}}, or None
    when the records' task has no strategy (perplexity) or there are no records."""
    outcomes = strategy_outcomes(records)
    if not outcomes:
        return None
    accs = {name: sum(hits) / len(hits) for name, hits in outcomes.items()}
    best = max(accs, key=lambda name: accs[name])
    return {"acc": accs[best], "strategy": best, "strategies": accs}
