"""The tokenizer a GGUF file carries (`tokenizer.ggml.*` metadata) as a pyramoe `Tokenizer`, so a
llama.cpp file loads with text in and out and nothing beside it.

Two of llama.cpp's vocabulary kinds are read, built as Hugging Face `tokenizers` objects the way
their own converters build them:
- "llama" (SentencePiece BPE, Llama/Mistral/Mixtral): pieces with scores and types. SentencePiece
  BPE merges, at each step, the adjacent pair whose merged piece scores highest; a BPE model whose
  merges are ranked by the merged piece's score does the same. Spaces become "▁" with one prefixed
  ("add_space_prefix", default on), unknown characters fall back to byte pieces "<0xXX>". llama.cpp
  assumes no other normalization (Llama's own model has none), and so does this.
- "gpt2" (byte-level BPE, Llama 3/Qwen2/GPT-2 style): byte-level tokens and ranked merges, split
  first by the pre-tokenizer regex that `tokenizer.ggml.pre` names (the names llama.cpp's converter
  writes); an unknown name is refused rather than guessed, since another regex tokenizes differently.

Control tokens (type 3) become special tokens and user-defined ones (type 4) added tokens, matched
whole in text. A BOS id is put in front of every encoded text where the file says so
(`tokenizer.ggml.add_bos_token`; llama.cpp's default: on for "llama", off for "gpt2").
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from pyramoe.data import Tokenizer

KINDS = ("llama", "gpt2")
TYPE_CONTROL, TYPE_USER_DEFINED = 3, 4
SPACE = "▁"  # SentencePiece's visible space

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` names (as llama.cpp's converter writes them) -> the split regex they stand for.
PRE_TOKENIZERS = {"gpt-2": _GPT2_SPLIT, "gpt2": _GPT2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
                  "qwen2": _QWEN2_SPLIT}


def tokenizer_from_gguf(fields: dict[str, Any], where: str) -> Tokenizer | None:
    """The file's tokenizer, or None when it has none (`tokenizer.ggml.model` absent)."""
    kind = _get(fields, "tokenizer.ggml.model")
    if kind is None:
        return None
    tokens = _get(fields, "tokenizer.ggml.tokens")
    if kind not in KINDS:
        raise ValueError(f"{where}: tokenizer.ggml.model {kind!r} (pyramoe reads 'llama' (SentencePiece) and "
                         "'gpt2' (byte-level BPE)); put a tokenizer.json beside the file to use another")
    if not tokens:
        raise ValueError(f"{where}: tokenizer.ggml.tokens missing or empty")
    types = _get(fields, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    tok = _spm_tokenizer(fields, tokens, types, where) if kind == "llama" else _bpe_tokenizer(fields, tokens, where)
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TYPE_CONTROL]
    added = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TYPE_USER_DEFINED]
    tok.add_special_tokens(specials)
    tok.add_tokens(added)
    _add_bos(tok, fields, tokens, default=kind == "llama", where=where)
    eos_id = _get(fields, "tokenizer.ggml.eos_token_id")
    return Tokenizer(tok, eos_token=_token(tokens, eos_id, "eos", where) if eos_id is not None else None)


def _get(fields: dict[str, Any], key: str) -> Any:
    return fields[key].contents() if key in fields else None


def _token(tokens: list[str], index: Any, name: str, where: str) -> str:
    if not isinstance(index, int) or not 0 <= index < len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.{name}_token_id {index!r} is not a token id (0..{len(tokens) - 1})")
    return tokens[index]


def _spm_tokenizer(fields: dict[str, Any], tokens: list[str], types: list[int], where: str) -> _HFTokenizer:
    scores = _get(fields, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.scores must hold one score per token for a 'llama' tokenizer")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = _get(fields, "tokenizer.ggml.unknown_token_id")
    unk = _token(tokens, unk_id, "unknown", where) if unk_id is not None else None
    mergeable = {t: s for t, s, k in zip(tokens, scores, types) if k == 1 and len(t) > 1}
    tok = _HFTokenizer(models.BPE(vocab, spm_merges(vocab, mergeable), unk_token=unk, fuse_unk=True,
                                  byte_fallback=True))
    steps = [normalizers.Replace(" ", SPACE)]
    if _get(fields, "tokenizer.ggml.add_space_prefix") is not False:
        steps.insert(0, normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if _get(fields, "tokenizer.ggml.add_space_prefix") is not False:
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    return tok


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece BPE over `scores` (piece -> score): every split of a
    scored piece into two vocabulary pieces, highest-scoring merged piece first (ties by the pieces' ids)."""
    ranked = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _bpe_tokenizer(fields: dict[str, Any], tokens: list[str], where: str) -> _HFTokenizer:
    merges = _get(fields, "tokenizer.ggml.merges")
    if not merges:
        raise ValueError(f"{where}: tokenizer.ggml.merges missing for a 'gpt2' tokenizer")
    pre = _get(fields, "tokenizer.ggml.pre") or "gpt-2"
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not one pyramoe knows ({', '.join(PRE_TOKENIZERS)}); "
                         "put the model's tokenizer.json beside the file")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"{where}: tokenizer.ggml.merges entry {merge!r} is not 'left right'")
        pairs.append((left, right))
    tok = _HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_bos(tok: _HFTokenizer, fields: dict[str, Any], tokens: list[str], default: bool, where: str) -> None:
    add = _get(fields, "tokenizer.ggml.add_bos_token")
    bos_id = _get(fields, "tokenizer.ggml.bos_token_id")
    if not (default if add is None else add) or bos_id is None:
        return
    bos = _token(tokens, bos_id, "bos", where)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_id)])
