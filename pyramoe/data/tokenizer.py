"""Byte-level BPE tokenizer: trained locally with HF ``tokenizers``, or loaded from a tokenizer.json."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# Separators of common pretrained tokenizers, tried in order when a user file lacks EOS_TOKEN.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
MIN_VOCAB_SIZE = 257  # 256 byte symbols + the separator
TRAIN_SAMPLE_BYTES = 8 << 20


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with a known end-of-text id."""

    def __init__(self, tok: _HFTokenizer, eos_token: str | None = None) -> None:
        """`eos_token`: the end-of-text token where the source names it (a GGUF file does); else the
        first of the usual separators the vocabulary holds, else a new <|endoftext|>."""
        self._tok = tok
        if eos_token is not None and tok.token_to_id(eos_token) is None:
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary")
        eos = eos_token or next((t for t in _EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos is None:
            tok.add_special_tokens([EOS_TOKEN])
            eos = EOS_TOKEN
        self.eos_token: str = eos
        self.eos_id: int = tok.token_to_id(eos)
        self.sha: str = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    @classmethod
    def train(cls, docs: Iterable[str], vocab_size: int, sample_bytes: int = TRAIN_SAMPLE_BYTES) -> Tokenizer:
        """Train a byte-level BPE on the first ``sample_bytes`` of ``docs``."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} for byte-level BPE, got {vocab_size}")
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            # All 256 byte symbols up front: any input stays encodable, even bytes absent from the sample.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        seen = [0]
        tok.train_from_iterator(_sample(docs, sample_bytes, seen), trainer=trainer)
        if seen[0] == 0:
            raise ValueError("no text to train the tokenizer on")
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer.json; a missing or unreadable file raises ValueError."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"cannot read tokenizer file {path}: {first_line}") from None
        return cls(tok)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self._tok.to_str())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself durable
        finally:
            os.close(fd)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); much faster than looping over encode()."""
        fast = getattr(self._tok, "encode_batch_fast", None)  # skips offsets; tokenizers >= 0.20
        encodings = fast(texts) if fast is not None else self._tok.encode_batch(texts)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_specials_as_text(self, flag: bool) -> None:
        """When on, a literal "<|endoftext|>" inside a document is ordinary text, not the separator."""
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = flag

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, sha={self.sha})"


def _sample(docs: Iterable[str], budget: int, seen: list[int]) -> Iterator[str]:
    """Docs until ``budget`` characters were given; ``seen[0]`` counts them."""
    for doc in docs:
        if seen[0] >= budget:
            return
        doc = doc[: budget - seen[0]]
        seen[0] += len(doc)
        yield doc
