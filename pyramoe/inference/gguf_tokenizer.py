r"""The tokenizer a GGUF file carries (`tokenizer.ggml.*` metadata) as a pyramoe `Tokenizer`, so a
llama.cpp file loads with text in and out and nothing beside it.

Two of llama.cpp's vocabulary kinds are read, built as Hugging Face `tokenizers` objects the way
their own converters build them:
- "llama" (SentencePiece BPE, Llama/Mistral/Mixtral): pieces with scores and types. SentencePiece
  BPE merges, at each step, the adjacent pair whose merged piece scores highest; a BPE model whose
  merges are ranked by the merged piece's score does the same. Spaces become "▁" with one prefixed
  ("add_space_prefix", default on), unknown characters fall back to byte pieces "<0xXX>". llama.cpp
  assumes no other normalization (Llama's own model has none), and so does this.
- "gpt2" (byte-level BPE, Llama 3/Qwen2/DeepSeek/GPT-2 style): byte-level tokens and ranked merges,
  split first as llama.cpp splits for the `tokenizer.ggml.pre` name (`PRE_TOKENIZERS`: the names
  llama.cpp knows, src/llama-vocab.cpp, whose split is a list of regexes): each regex in turn splits
  every piece the earlier ones left, as a `pre_tokenizers.Sequence` of isolated `Split`s does.
  llama.cpp runs most of them through std::regex over a "collapsed" text, and `onig_regex` writes
  the one place where that differs from matching the real text: non-ASCII whitespace matches only
  \s, never a literal class. (llama.cpp builds older than its \p{S} fix left ASCII '~' out of
  \p{S}, which changes the deepseek-v3 split around '~'.) A piece that is itself a token skips the
  merges where llama.cpp does so (`ignore_merges`: llama-bpe and its aliases, tekken, minicpm5). Categories
  come from Oniguruma's Unicode tables rather than llama.cpp's own, which agree on assigned
  characters of ordinary text. Names llama.cpp splits with hand-written code or whose vocabulary is
  not byte-level (`NOT_REPRODUCED`), and unknown names, are refused rather than guessed, since
  another split tokenizes differently. A file without the field is read as "default", as llama.cpp reads
  it (warning that such files are degraded).

Control tokens (type 3) become special tokens and user-defined ones (type 4) added tokens, matched
whole in text. A BOS id is put in front of every encoded text where the file says so
(`tokenizer.ggml.add_bos_token`; llama.cpp's default: on for "llama", and for "gpt2" on only with
the llama-bpe, tekken and chameleon pre-tokenizers).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from pyramoe.data import Tokenizer

KINDS = ("llama", "gpt2")
TYPE_CONTROL, TYPE_USER_DEFINED = 3, 4
SPACE = "▁"  # SentencePiece's visible space

# llama.cpp's split regexes (src/llama-vocab.cpp, `llm_tokenizer_bpe`) as it holds them, applied in
# turn: each one splits every piece the previous ones left, and the text between two matches is a
# piece of its own (what `Split(..., behavior="isolated")` does in a `pre_tokenizers.Sequence`).
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
_BAILINGMOE = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]|\s+(?!\S)|\s+")
_EXAONE_MOE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
               r"|\s*[\r\n]|\s+(?!\S)|\s+")
_MINICPM5 = (r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LAGUNA = (r"[^\n]+|[\n]+", _QWEN2)
_JAIS2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4)) + r"|\s{1,2}(?!\S)|\s{1}")
# llama.cpp's stand-in for \p{Lu}/\p{Ll} (std::regex has neither): a letter that is not ASCII a-z / A-Z.
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
          rf"{_CONTRACTIONS}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek LLM's cased letters, as code point ranges (its tokenizer lists them literally; several are
# canonical singletons such as U+212A KELVIN SIGN, which an editor's normalization would silently change).
_DEEPSEEK_CASED = "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in (
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
    (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x376), (0x377, 0x377), (0x37B, 0x37D), (0x37F, 0x37F),
    (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F),
    (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF),
    (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45),
    (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D),
    (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3),
    (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107),
    (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128),
    (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E),
    (0x2183, 0x2183), (0x2184, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF2),
    (0x2CF3, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E),
    (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F),
    (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF),
    (0x1E900, 0x1E943)))
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM = ("[\r\n]", rf"\s?[{_DEEPSEEK_CASED}]+",
                 "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$", _CJK_HANGUL, r"\p{N}+")
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")
_DEEPSEEK_V3 = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^""" "\r\n" r"\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+[" "\r\n" r"]*|\s*[" "\r\n" r"]+|\s+(?!\S)|\s+")
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_CHAMELEON = ("<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
              r"[\p{P}!-/:-@\[-`{-~]", _GPT2)


class PreTokenizer(NamedTuple):
    """How llama.cpp pre-tokenizes for one `tokenizer.ggml.pre` name: its regexes in order, whether a
    piece that is itself a token skips the merges (`ignore_merges`), and whether a BOS goes first when
    the file has no `tokenizer.ggml.add_bos_token`."""

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


def _names(names: str, pre: PreTokenizer) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names.split(), pre)


# `tokenizer.ggml.pre` names (as llama.cpp's converter writes them) -> llama.cpp's pre-tokenization.
# "gpt2" is not one of llama.cpp's names; earlier pyramoe read it as "gpt-2" and still does.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **_names("gpt-2 gpt2 mpt olmo jais phi-2 jina-es jina-de jina-v2-es jina-v2-de gigachat a.x-4.0 mellum "
             "modern-bert exaone4 trillion granite-docling", PreTokenizer((_GPT2,))),
    **_names("llama-bpe llama3 llama-v3 falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
             PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)),
    **_names("dbrx smaug-bpe", PreTokenizer((_LLAMA3,))),
    **_names("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2",
             PreTokenizer((_QWEN2,))),
    "seed-coder": PreTokenizer((_SEED_CODER,)),
    **_names("bailingmoe bailingmoe2 llada-moe", PreTokenizer((_BAILINGMOE,))),
    "exaone-moe": PreTokenizer((_EXAONE_MOE,)),
    "minicpm5": PreTokenizer(_MINICPM5, ignore_merges=True),
    "ufakzeka": PreTokenizer((_UFAKZEKA,)),
    "laguna": PreTokenizer(_LAGUNA),
    "qwen35": PreTokenizer((_QWEN35,)),
    "jais-2": PreTokenizer((_JAIS2,)),
    **_names("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", PreTokenizer((r"\p{N}", _GPT2))),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")),
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    "deepseek-llm": PreTokenizer(_DEEPSEEK_LLM),
    "deepseek-coder": PreTokenizer(_DEEPSEEK_CODER),
    **_names("deepseek-v3 hunyuan-dense joyai-llm hy_v4", PreTokenizer(_DEEPSEEK_V3)),
    **_names("poro-chat bloom gpt3-finnish", PreTokenizer((_PORO,))),
    "viking": PreTokenizer((_PORO, r"\p{N}")),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    "chameleon": PreTokenizer(_CHAMELEON, add_bos=True),
    **_names("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizer((_GPT4O,))),
}
# Names llama.cpp knows whose split is not a list of regexes a `tokenizers` Split reproduces.
NOT_REPRODUCED = {
    "kimi-k2": "llama.cpp splits it with hand-written code",
    "afmoe": "llama.cpp groups its digits with hand-written code",
    "superbpe": "one of its regexes matches only empty strings (a lookahead), which pyramoe does not model",
    "gemma4": "it is SentencePiece-style BPE over raw UTF-8",
    "sarvam-moe": "it is SentencePiece-style BPE over raw UTF-8",
    "whitespace": "it is not byte-level BPE",
    "glm4": "llama.cpp ignores its BOS token id", "chatglm-bpe": "llama.cpp ignores its BOS token id",
    "glm5": "llama.cpp ignores its BOS token id",
    "granite-embed-multi-311m": "it is SentencePiece-style BPE over raw UTF-8",
    "jina-v1-en": "llama.cpp adds a SEP token", "jina-v2-code": "llama.cpp adds a SEP token",
    "roberta-bpe": "llama.cpp adds a SEP token",
}
_CLASS = re.compile(r"\[(\^)?(?:\\.|[^\]\\])+\]")  # a bracketed class; group 1 is its '^' when negated


def onig_regex(expr: str) -> str:
    """llama.cpp's regex `expr` as the `tokenizers` library (Oniguruma over the real text) must write it
    to split as llama.cpp does. llama.cpp runs a regex with \\p{..} classes over "collapsed" text (every
    non-ASCII character replaced by one byte for its category), which matches as the real text does;
    any other regex sees non-ASCII whitespace as '\\v', which only \\s matches, never a literal class
    (DeepSeek's CJK ranges span U+3000). Its `$` is the end of the piece."""
    if "\\p{" not in expr:
        expr = _CLASS.sub(lambda m: m[0] if m[1] or max(m[0]) < "\x80" else m[0][:-1] + r"&&\S]", expr)
    return expr[:-1] + r"\z" if expr.endswith("$") and not expr.endswith("\\$") else expr


def pre_tokenizer(pre: PreTokenizer) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer that splits as llama.cpp does for `pre`, then maps bytes to
    byte-level characters."""
    splits = [pre_tokenizers.Split(Regex(onig_regex(e)), behavior="isolated") for e in pre.splits]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


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
    if kind == "llama":
        tok, add_bos = _spm_tokenizer(fields, tokens, types, where), True
    else:
        pre = _pre_tokenizer_named(fields, where)
        tok, add_bos = _bpe_tokenizer(fields, tokens, pre, where), pre.add_bos
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TYPE_CONTROL]
    added = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TYPE_USER_DEFINED]
    tok.add_special_tokens(specials)
    tok.add_tokens(added)
    _add_bos(tok, fields, tokens, default=add_bos, where=where)
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


def _pre_tokenizer_named(fields: dict[str, Any], where: str) -> PreTokenizer:
    pre = _get(fields, "tokenizer.ggml.pre") or "default"  # as llama.cpp reads a file without the field
    if pre in NOT_REPRODUCED:
        raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not reproduced by pyramoe ({NOT_REPRODUCED[pre]}); "
                         "put the model's tokenizer.json beside the file")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not one pyramoe knows (it knows "
                         f"{len(PRE_TOKENIZERS)}, listed in pyramoe.inference.gguf_tokenizer.PRE_TOKENIZERS); "
                         "put the model's tokenizer.json beside the file")
    return PRE_TOKENIZERS[pre]


def _bpe_tokenizer(fields: dict[str, Any], tokens: list[str], pre: PreTokenizer, where: str) -> _HFTokenizer:
    merges = _get(fields, "tokenizer.ggml.merges")
    if not merges:
        raise ValueError(f"{where}: tokenizer.ggml.merges missing for a 'gpt2' tokenizer")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"{where}: tokenizer.ggml.merges entry {merge!r} is not 'left right'")
        pairs.append((left, right))
    tok = _HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs, ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre_tokenizer(pre)
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
