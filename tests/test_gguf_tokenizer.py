"""A GGUF file's own tokenizer (`pyramoe.inference.gguf_tokenizer`): written with the `gguf` package's
writer as llama.cpp's converter writes it, read back, it tokenizes as its source does: SentencePiece
itself for a "llama" (SentencePiece BPE) vocabulary, our byte-level BPE for a "gpt2" one; and
`Engine.load` of a whole GGUF model answers text prompts with it."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import unicodedata

import pytest
import regex
import test_gguf
import test_native_decode as native_cases
import torch
from tokenizers import pre_tokenizers

from pyramoe.data import Tokenizer
from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.gguf_tokenizer import PRE_TOKENIZERS, pre_tokenizer, tokenizer_from_gguf

gguf = pytest.importorskip("gguf")

TEXT = """def parse(line: str) -> dict[str, int]:
    \"\"\"Split 'key=value' pairs; values are integers.\"\"\"
    out = {}
    for part in line.split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = int(value)  # ValueError for a bad number
    return out

class Counter(dict):
    def __missing__(self, key):
        return 0
"""
SAMPLES = [
    "def main():\n    return parse('a=1, b=22')",
    "  leading spaces and trailing  ",
    "unicode: naïve café ∑ 数字 🙂 and tabs\tand\r\nnewlines",
    "x" * 40 + " 12345 67",
    "",
]


def _read(path):
    return gguf.GGUFReader(str(path)).fields


def _write_vocab(path, put):
    writer = gguf.GGUFWriter(str(path), "llama")
    put(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _spm_fields(writer, sp):
    """What llama.cpp's converter writes for a SentencePiece model."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 3, encoding="utf-8")
    # Llama's settings: BPE, byte fallback, no normalization (what llama.cpp assumes of a "llama" vocabulary).
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "m"), model_type="bpe", vocab_size=400,
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(root / "m.model"))


def test_llama_vocabulary_tokenizes_as_sentencepiece(tmp_path, sentencepiece_model):
    sp = sentencepiece_model
    tok = tokenizer_from_gguf(_read(_write_vocab(tmp_path / "v.gguf", lambda w: _spm_fields(w, sp))), "v.gguf")
    assert tok.eos_id == sp.eos_id() and tok.vocab_size == sp.get_piece_size()
    for text in [*SAMPLES[:-1], TEXT]:
        expected = [sp.bos_id(), *sp.encode(text)]  # llama.cpp puts BOS first for this kind by default
        assert tok.encode(text) == expected, text
        assert tok.decode(expected[1:]) == sp.decode(expected[1:]) == text


def test_gpt2_vocabulary_tokenizes_as_its_source(tmp_path):
    source = Tokenizer.train([TEXT * 3], vocab_size=400)
    spec = json.loads(source._tok.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [source._tok.id_to_token(i) for i in range(len(tokens), source.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]

    def put(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t == source.eos_token else 1 for t in tokens])
        writer.add_token_merges(merges)
        writer.add_eos_token_id(source.eos_id)

    tok = tokenizer_from_gguf(_read(_write_vocab(tmp_path / "v.gguf", put)), "v.gguf")
    assert tok.eos_id == source.eos_id
    for text in [*SAMPLES, TEXT, f"two documents{source.eos_token}the second"]:
        assert tok.encode(text) == source.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_user_defined_tokens_are_matched_whole(tmp_path):
    """A user-defined token (type 4) is one id wherever its text appears; a control token (type 3) too."""
    source = Tokenizer.train([TEXT * 3], vocab_size=400)
    spec = json.loads(source._tok.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [source._tok.id_to_token(i) for i in range(len(tokens), source.vocab_size)]
    tool = len(tokens)
    tokens.append("<tool>")

    def put(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t == source.eos_token else 4 if t == "<tool>" else 1 for t in tokens])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
        writer.add_eos_token_id(source.eos_id)

    tok = tokenizer_from_gguf(_read(_write_vocab(tmp_path / "v.gguf", put)), "v.gguf")
    ids = tok.encode(f"x = 1<tool>return{source.eos_token}")
    assert ids.count(tool) == 1 and ids[-1] == source.eos_id
    assert tok.decode(ids) == f"x = 1<tool>return{source.eos_token}"


@pytest.mark.parametrize("fields, message", [
    ({"model": "bert"}, "tokenizer.ggml.model 'bert'"),
    ({"model": "gpt2", "pre": "made-up"}, "tokenizer.ggml.pre 'made-up'"),
    ({"model": "gpt2", "pre": "kimi-k2"}, "tokenizer.ggml.pre 'kimi-k2' is not reproduced"),
    ({"model": "gpt2", "merges": None}, "tokenizer.ggml.merges missing"),
    ({"model": "llama", "scores": None}, "tokenizer.ggml.scores"),
    ({"model": "llama", "eos": 999}, "tokenizer.ggml.eos_token_id 999"),
])
def test_bad_tokenizer_metadata_is_a_one_line_error(tmp_path, fields, message):
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab"]

    def put(writer):
        writer.add_tokenizer_model(fields["model"])
        writer.add_token_list(tokens)
        if fields.get("pre"):
            writer.add_tokenizer_pre(fields["pre"])
        if fields.get("merges", ["a b"]) is not None:
            writer.add_token_merges(fields.get("merges", ["a b"]))
        if fields.get("scores", [0.0] * 6) is not None:
            writer.add_token_scores(fields.get("scores", [0.0] * 6))
        writer.add_eos_token_id(fields.get("eos", 2))

    with pytest.raises(ValueError, match=message) as info:
        tokenizer_from_gguf(_read(_write_vocab(tmp_path / "bad.gguf", put)), "bad.gguf")
    assert "\n" not in str(info.value) and "bad.gguf" in str(info.value)


def test_engine_loads_a_gguf_file_with_its_tokenizer(tmp_path, sentencepiece_model):
    sp = sentencepiece_model
    config = dataclasses.replace(test_gguf.CONFIG, vocab_size=sp.get_piece_size())
    model = native_cases._model(config, torch.float32)
    path = test_gguf._write(model, tmp_path / "model.gguf", extra=lambda w: _spm_fields(w, sp))
    engine = Engine.load(path, dtype="fp32", max_batch=2)
    assert engine.tokenizer is not None and engine.eos_id == sp.eos_id()
    prompt = "def parse(line):"
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    answer = engine.generate([prompt], greedy)[0]
    by_ids = engine.generate([[sp.bos_id(), *sp.encode(prompt)]], greedy)[0]
    assert answer.token_ids == by_ids.token_ids and answer.text == engine.tokenizer.decode(answer.token_ids)
    # A tokenizer.json beside the file wins over the file's own.
    beside = Tokenizer.train([TEXT], vocab_size=300)
    beside.save(tmp_path / "tokenizer.json")
    assert Engine.load(path, dtype="fp32", max_batch=1).tokenizer.sha == beside.sha


# --- llama.cpp's pre-tokenizers: an independent model of llama.cpp's `unicode_regex_split` -------------

# The two regexes llama.cpp splits with hand-written code that reads Unicode categories directly.
_HAND_WRITTEN = {PRE_TOKENIZERS["gpt-2"].splits[0], PRE_TOKENIZERS["llama-bpe"].splits[0]}
# llama.cpp's "collapsed" text: a non-ASCII character becomes one byte per category, and \p{X} in a
# regex becomes that byte plus the ASCII characters it lists for X.
_CATEGORY_BYTE = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
_CATEGORY_ASCII = {"N": "0-9", "L": "A-Za-z", "P": r"!-#%-*,-/:-;?-@\[-\]_\{\}", "M": "", "S": r"\$\+<-\>\^`\|~"}
PRE_SAMPLES = [
    "Hello WORLD, it's 12345 dollars!!  \n\n\tdon'T  STOP—ÉCOLE naïve été\r\nend   ",
    "数字和汉字，カタカナ ひらがな 한국어 🙂🙂 x~~+y ~é $100 3.14159 ١٢٣ e\u0301t\u00e9",
    "   leading\u3000。and\u3000\u3000ideographic\u00a0nbsp\u2003em …。，、 a.b,c!d?e (x|y)",
    "Ǆungla ΐΩK ＡＢＣ！？ ＡＢＣａｂｃ CamelCaseWord HTTPServer i'M we'LL\n\n\n  \n",
    "<sentinel:12>IMGIMGABZ def f(x):\n\treturn x**2  # ok\n    \n\t\t}",
]


def _as_llamacpp_sees(piece, expr):
    if expr in _HAND_WRITTEN:
        return piece, expr
    if "\\p{" not in expr:  # std::wregex over the text, non-ASCII whitespace read as '\v'
        seen = "".join("\v" if ord(c) > 127 and c.isspace() else c for c in piece)
        return seen, expr[:-1] + r"\Z" if expr.endswith("$") else expr
    seen = "".join(c if ord(c) < 128 else "\v" if c.isspace()
                   else _CATEGORY_BYTE.get(unicodedata.category(c)[0], "\xd0") for c in piece)
    pattern, inside, i = "", False, 0
    while i < len(expr):
        c = expr[i]
        if c == "[" and (i == 0 or expr[i - 1] != "\\"):
            inside = True
        elif c == "]" and inside and expr[i - 1] != "\\":
            inside = False
        elif expr.startswith("\\p{", i) and expr[i + 4: i + 5] == "}" and expr[i + 3] in _CATEGORY_BYTE:
            cls = _CATEGORY_BYTE[expr[i + 3]] + _CATEGORY_ASCII[expr[i + 3]]
            pattern += cls if inside else f"[{cls}]"
            i += 5
            continue
        pattern += c
        i += 1
    return seen, pattern


def llamacpp_split(text, exprs):
    """Each regex in turn over each piece (`regex` package); the text between matches is a piece too."""
    pieces = [text]
    for expr in exprs:
        out = []
        for piece in pieces:
            seen, pattern = _as_llamacpp_sees(piece, expr)
            at = 0
            for m in regex.finditer(pattern, seen):
                assert m.end() > m.start(), (expr, piece)
                if m.start() > at:
                    out.append(piece[at:m.start()])
                out.append(piece[m.start():m.end()])
                at = m.end()
            if at < len(piece):
                out.append(piece[at:])
        pieces = out
    return pieces


def _byte_level(pieces):
    to_chars = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return ["".join(s for s, _ in to_chars.pre_tokenize_str(p)) for p in pieces]


@pytest.mark.parametrize("name", sorted(PRE_TOKENIZERS))
def test_pre_tokenizer_splits_as_llamacpp(name):
    pre = PRE_TOKENIZERS[name]
    ours = pre_tokenizer(pre)
    for text in _fuzz_texts(150):
        expected = llamacpp_split(text, pre.splits)
        assert "".join(expected) == text
        assert [s for s, _ in ours.pre_tokenize_str(text)] == _byte_level(expected), (name, text)


def test_multi_regex_pre_tokenizers_split_in_turn():
    """A few splits worked by hand from llama.cpp's regex lists, so the model above is checked too."""
    assert llamacpp_split("ab12345 c", PRE_TOKENIZERS["starcoder"].splits) == ["ab", "1", "2", "3", "4", "5", " c"]
    assert llamacpp_split("x 1234567", PRE_TOKENIZERS["deepseek-v3"].splits) == ["x", " ", "123", "456", "7"]
    assert llamacpp_split("a ~é x~~+y", PRE_TOKENIZERS["deepseek-v3"].splits) == ["a", " ~", "é", " x", "~~+", "y"]
    # U+3000 is whitespace to llama.cpp: \s takes it, no literal class does (over the real text, the
    # punctuation class and then the CJK class would keep all three characters together).
    assert llamacpp_split("。\u3000。", PRE_TOKENIZERS["deepseek-llm"].splits) == ["。", "\u3000", "。"]
    assert llamacpp_split("A 1234!", PRE_TOKENIZERS["falcon"].splits) == ["A", " ", "123", "4", "!"]
    assert llamacpp_split("x 1234", PRE_TOKENIZERS["default"].splits) == ["x", " ", "123", "4"]


def _bpe_reference(pieces, vocab, ranks):
    """Plain byte-level BPE over pre-split pieces: the lowest-ranked adjacent pair merges first."""
    ids = []
    for piece in _byte_level(pieces):
        parts = list(piece)
        while True:
            pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs, default=(len(ranks), 0))
            if rank == len(ranks):
                break
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids


@pytest.mark.parametrize("name", ["deepseek-llm", "starcoder", None])
def test_multi_regex_gguf_vocabulary_encodes_as_llamacpp(tmp_path, name):
    """A byte-level vocabulary written with a multi-regex `tokenizer.ggml.pre` encodes as llama.cpp's
    split followed by plain BPE does; without the field, as llama.cpp's "default"."""
    corpus = [TEXT * 3, *PRE_SAMPLES * 3]
    source = Tokenizer.train(corpus, vocab_size=600)
    spec = json.loads(source._tok.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]

    def put(writer):
        writer.add_tokenizer_model("gpt2")
        if name:
            writer.add_tokenizer_pre(name)
        writer.add_token_list(tokens)
        writer.add_token_types([1] * len(tokens))
        writer.add_token_merges(merges)

    tok = tokenizer_from_gguf(_read(_write_vocab(tmp_path / "v.gguf", put)), "v.gguf")
    name = name or "default"
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    for text in [*PRE_SAMPLES, TEXT]:
        expected = _bpe_reference(llamacpp_split(text, PRE_TOKENIZERS[name].splits), vocab, ranks)
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == text


def test_llama3_pieces_in_the_vocabulary_skip_merges_and_bos_leads(tmp_path):
    """llama.cpp's llama-bpe takes a piece that is a token whole (ignore_merges) and puts BOS first."""
    tokens = ["<|begin_of_text|>", "a", "b", "c", "ab", "abc"]

    def put(pre):
        def write(writer):
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types([3, 1, 1, 1, 1, 1])
            writer.add_token_merges(["a b"])  # "abc" is not reachable by merges
            writer.add_bos_token_id(0)
        return write

    llama3 = tokenizer_from_gguf(_read(_write_vocab(tmp_path / "l.gguf", put("llama-bpe"))), "l.gguf")
    gpt2 = tokenizer_from_gguf(_read(_write_vocab(tmp_path / "g.gguf", put("gpt-2"))), "g.gguf")
    assert llama3.encode("abc") == [0, 5]
    assert gpt2.encode("abc") == [4, 3]


_SPLIT_MAIN = r"""
#include "unicode.h"
#include <fstream>
#include <iostream>
#include <sstream>
// argv[1], argv[2]: NUL-terminated regexes and texts; prints each text's pieces, \x01 after each, \0 after each text.
static std::vector<std::string> parts(const char * path) {
    std::stringstream all;
    all << std::ifstream(path, std::ios::binary).rdbuf();
    std::vector<std::string> out;
    for (std::string item; std::getline(all, item, '\0');) out.push_back(item);
    return out;
}
int main(int, char ** argv) {
    const auto exprs = parts(argv[1]);
    for (const auto & text : parts(argv[2])) {
        for (const auto & piece : unicode_regex_split(text, exprs, true)) std::cout << piece << '\x01';
        std::cout << '\0';
    }
}
"""


def _fuzz_texts(count, seed=0):
    rng = random.Random(seed)
    alphabet = [*"abXYZ019 _'!?.,;:~$+<=>^`|-()[]{}/\\\"#%&*@", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n",
                *"\u3000\u00a0\u2003\x0b\x0c\x85\u2028\u200b数字汉カタひら한국🙂é\u0301ÉΩKΐＡａ！？…。，、١٢३½Ⅷ²ǅᾈ",
                "'s", "'T", "'ll", "DON'T", "IMGIMGABZ", "<sentinel:3>", "12345678"]
    random_texts = ("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(count))
    return [*PRE_SAMPLES, TEXT, *random_texts]


@pytest.mark.skipif(not os.environ.get("PYRAMOE_LLAMACPP_SRC"), reason="PYRAMOE_LLAMACPP_SRC (llama.cpp src/) unset")
def test_pre_tokenizers_split_as_llamacpp_itself(tmp_path):
    """llama.cpp's own `unicode_regex_split`, compiled from the source tree PYRAMOE_LLAMACPP_SRC names
    (llama.cpp's src/ directory), splits every name's regex list as our pre-tokenizer does."""
    src = os.environ["PYRAMOE_LLAMACPP_SRC"]
    (tmp_path / "split.cpp").write_text(_SPLIT_MAIN)
    subprocess.run(["g++", "-O1", "-std=c++17", f"-I{src}", str(tmp_path / "split.cpp"), f"{src}/unicode.cpp",
                    f"{src}/unicode-data.cpp", "-o", str(tmp_path / "split")], check=True)
    texts = _fuzz_texts(500)
    (tmp_path / "texts").write_bytes(b"".join(t.encode() + b"\0" for t in texts))
    for name, pre in sorted(PRE_TOKENIZERS.items()):
        (tmp_path / "exprs").write_bytes(b"".join(e.encode() + b"\0" for e in pre.splits))
        out = subprocess.run([str(tmp_path / "split"), str(tmp_path / "exprs"), str(tmp_path / "texts")],
                             capture_output=True, check=True).stdout
        theirs = [[p.decode() for p in chunk.split(b"\x01")[:-1]] for chunk in out.split(b"\0")[:-1]]
        ours = pre_tokenizer(pre)
        for text, pieces in zip(texts, theirs, strict=True):
            assert [s for s, _ in ours.pre_tokenize_str(text)] == pieces, (name, text)
