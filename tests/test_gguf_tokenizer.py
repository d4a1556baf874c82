"""A GGUF file's own tokenizer (`pyramoe.inference.gguf_tokenizer`): written with the `gguf` package's
writer as llama.cpp's converter writes it, read back, it tokenizes as its source does: SentencePiece
itself for a "llama" (SentencePiece BPE) vocabulary, our byte-level BPE for a "gpt2" one; and
`Engine.load` of a whole GGUF model answers text prompts with it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import test_gguf
import test_native_decode as native_cases
import torch

from pyramoe.data import Tokenizer
from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.gguf_tokenizer import tokenizer_from_gguf

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
