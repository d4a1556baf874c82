"""Tests for pyramoe.data: corpora, tokenizer, token files and batches (small corpora, fast)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pyramoe.data import (
    EOS_TOKEN,
    TokenDataset,
    Tokenizer,
    load_corpus,
    prepare_data,
    stdlib_files,
    stdlib_root,
)

SMALL_VOCAB = 320


def _doc(i: int) -> str:
    return f"def function_{i}(x):\n    return x * {i} + {i % 7}  # number {i}\n"


def _write_dir(root: Path, n: int = 40) -> Path:
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i:03d}.py").write_text(_doc(i) * 3, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    return Tokenizer.train((_doc(i) * 5 for i in range(200)), SMALL_VOCAB)


# ---- corpora ---------------------------------------------------------------------------------------------


def test_text_file_corpus_is_chunked_and_split(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    text = "".join(f"line {i} of a long book\n" for i in range(20_000))
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path), val_percent=5)
    train, val = list(corpus.train_docs()), list(corpus.val_docs())
    assert len(train) > 10 and len(val) >= 1
    assert sorted(train + val) == sorted(_all_docs(str(path)))
    assert len("".join(train + val)) == len(text)


def _all_docs(spec: str, **kw) -> list[str]:
    return list(load_corpus(spec, val_percent=0, **kw).train_docs())


def test_directory_corpus_recursive_skips_binary_and_hidden(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "src", n=6)
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (root / ".hidden.txt").write_text("secret", encoding="utf-8")
    (root / "notes.jsonl").write_text('{"text": "from jsonl"}\n', encoding="utf-8")
    docs = _all_docs(str(root))
    assert len(docs) == 7
    assert "from jsonl" in docs and "secret" not in docs
    assert docs[0] == "from jsonl"  # sorted by relative path: notes.jsonl < pkg0/...


def test_jsonl_corpus_with_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"body": f"record number {i}", "id": i} for i in range(50)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    corpus = load_corpus(str(path), val_percent=10, text_field="body")
    train, val = list(corpus.train_docs()), list(corpus.val_docs())
    assert sorted(train + val) == sorted(r["body"] for r in rows)
    assert val and not set(train) & set(val)


def test_split_is_deterministic_and_by_file(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "src", n=60)
    a, b = load_corpus(str(root), val_percent=10), load_corpus(str(root), val_percent=10)
    assert a.fingerprint == b.fingerprint
    assert list(a.train_docs()) == list(b.train_docs())
    val = list(a.val_docs())
    assert val == list(b.val_docs()) and 0 < len(val) < 60
    assert not set(val) & set(a.train_docs())
    assert len(val) + len(list(a.train_docs())) == 60  # whole files, never split inside


def test_tiny_corpus_still_gets_a_val_doc(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "src", n=3)
    corpus = load_corpus(str(root), val_percent=1)
    assert len(list(corpus.val_docs())) == 1 and len(list(corpus.train_docs())) == 2
    assert list(load_corpus(str(root), val_percent=0).val_docs()) == []
    (tmp_path / "one.txt").write_text("only one short unit", encoding="utf-8")
    single = load_corpus(str(tmp_path / "one.txt"), val_percent=50)
    assert list(single.train_docs()) == ["only one short unit"] and list(single.val_docs()) == []


def test_fingerprint_changes_with_content_and_settings(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "src", n=5)
    before = load_corpus(str(root)).fingerprint
    assert load_corpus(str(root), val_percent=10).fingerprint != before
    assert load_corpus(str(root), max_bytes=100).fingerprint != before
    (root / "pkg0" / "mod000.py").write_text("changed and longer", encoding="utf-8")
    assert load_corpus(str(root)).fingerprint != before


def test_stdlib_corpus_lists_many_files_without_site_packages() -> None:
    root = stdlib_root()
    files = stdlib_files()
    assert len(files) > 500
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)
    assert not any(Path(sys.prefix).resolve() in f.parents for f in files if sys.prefix != sys.base_prefix)
    assert root / "os.py" in files
    rels = [f.relative_to(root).as_posix() for f in files]
    assert rels == sorted(rels)


def test_max_bytes_caps_the_corpus() -> None:
    corpus = load_corpus("stdlib", max_bytes=50_000)
    total = sum(len(d.encode()) for d in [*corpus.train_docs(), *corpus.val_docs()])
    assert 45_000 < total <= 50_000
    assert list(corpus.val_docs())


def test_hf_dataset_via_load_from_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDataset:
        column_names = ["text"]

        def __init__(self, texts: list[str]) -> None:
            self.texts = texts

        def iter(self, batch_size: int):
            for i in range(0, len(self.texts), batch_size):
                yield {"text": self.texts[i : i + batch_size]}

    texts = [f"hf row {i}" for i in range(30)]
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: {"train": FakeDataset(texts), "test": FakeDataset(["t"])}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (tmp_path / "ds").mkdir()
    assert sorted(_all_docs(f"hf:{tmp_path / 'ds'}")) == sorted(texts)
    assert _all_docs(f"hf:{tmp_path / 'ds'}:test") == ["t"]
    with pytest.raises(ValueError, match="no split 'nope'"):
        load_corpus(f"hf:{tmp_path / 'ds'}:nope")
    with pytest.raises(ValueError, match="no 'body' column"):
        load_corpus(f"hf:{tmp_path / 'ds'}", text_field="body")


# ---- tokenizer -------------------------------------------------------------------------------------------


def test_tokenizer_roundtrip_and_eos(small_tok: Tokenizer) -> None:
    assert small_tok.vocab_size <= SMALL_VOCAB
    assert small_tok.eos_id == small_tok._tok.token_to_id(EOS_TOKEN)
    for text in ["def function_3(x):\n    return x", "unseen ünïcødé ✓ text\t\n", ""]:
        ids = small_tok.encode(text)
        assert all(0 <= i < small_tok.vocab_size for i in ids)
        assert small_tok.decode(ids) == text
    assert small_tok.encode_batch(["a b", "c"]) == [small_tok.encode("a b"), small_tok.encode("c")]
    assert len(small_tok.encode(_doc(5))) < len(_doc(5))  # merges were learned


def test_tokenizer_save_load(tmp_path: Path, small_tok: Tokenizer) -> None:
    path = tmp_path / "tok" / "tokenizer.json"
    small_tok.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.sha == small_tok.sha and loaded.eos_id == small_tok.eos_id
    assert loaded.encode(_doc(9)) == small_tok.encode(_doc(9))


def test_tokenizer_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer file not found: .*missing.json"):
        Tokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read tokenizer file .*bad.json"):
        Tokenizer.from_file(bad)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], 100)


# ---- token files -----------------------------------------------------------------------------------------


def test_prepare_builds_then_reuses_then_rebuilds(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "src", n=30)
    cache = tmp_path / "cache"
    first = prepare_data(str(root), SMALL_VOCAB, cache, val_percent=10, progress=False)
    assert first.rebuilt and first.train_tokens > 0 and first.val_tokens > 0
    assert first.dtype == "uint16" and first.train_path.stat().st_size == 2 * first.train_tokens
    mtime = first.train_path.stat().st_mtime_ns

    again = prepare_data(str(root), SMALL_VOCAB, cache, val_percent=10, progress=False)
    assert not again.rebuilt and again.train_path.stat().st_mtime_ns == mtime
    assert again.tokenizer.sha == first.tokenizer.sha

    (root / "pkg1" / "extra.py").write_text("x = 1\n" * 50, encoding="utf-8")
    changed = prepare_data(str(root), SMALL_VOCAB, cache, val_percent=10, progress=False)
    assert changed.rebuilt
    assert changed.train_tokens + changed.val_tokens > first.train_tokens + first.val_tokens
    assert not list(cache.rglob("*.tmp*"))


def test_token_file_holds_docs_joined_by_eos(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "src", n=8)
    data = prepare_data(str(root), SMALL_VOCAB, tmp_path / "c", val_percent=0, progress=False)
    tokens = np.fromfile(data.train_path, dtype=data.dtype)
    assert tokens[-1] == data.tokenizer.eos_id and (tokens == data.tokenizer.eos_id).sum() == 8
    docs = data.tokenizer.decode(tokens.tolist()).split(EOS_TOKEN)
    assert docs[:-1] == _all_docs(str(root))


def test_default_cache_dir_and_user_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_tok: Tokenizer
) -> None:
    monkeypatch.setenv("PYRAMOE_CACHE", str(tmp_path / "home"))
    data = prepare_data("stdlib", SMALL_VOCAB, max_bytes=30_000, progress=False)
    assert data.cache_dir.parent == tmp_path / "home" / "data"
    assert (data.cache_dir / "tokenizer.json").is_file() and (data.cache_dir / "meta.json").is_file()

    small_tok.save(tmp_path / "mine.json")
    mine = prepare_data(
        "stdlib", 999, tokenizer_path=tmp_path / "mine.json", max_bytes=30_000, progress=False
    )
    assert mine.tokenizer.sha == small_tok.sha and mine.cache_dir != data.cache_dir
    assert Tokenizer.from_file(mine.cache_dir / "tokenizer.json").sha == small_tok.sha


def _dataset(tmp_path: Path, n: int = 1000) -> TokenDataset:
    path = tmp_path / "tokens.bin"
    np.arange(n, dtype=np.uint16).tofile(path)
    return TokenDataset(path, "uint16")


def test_get_batch_shapes_shift_and_reproducibility(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    x, y = ds.get_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # file holds 0..n-1, so the target is the next token
    x2, _ = ds.get_batch(4, 16, torch.Generator().manual_seed(0))
    x3, _ = ds.get_batch(4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    x_end, y_end = _dataset(tmp_path, 17).get_batch(2, 16, torch.Generator())
    assert x_end[0, 0] == 0 and y_end[0, -1] == 16  # the only window reaches the last token


def test_eval_batches_walk_file_in_order(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, 101)
    batches = list(ds.iter_eval_batches(3, 10))
    assert [b[0].shape[0] for b in batches] == [3, 3, 3, 1]
    xs = torch.cat([x for x, _ in batches])
    assert torch.equal(xs[:, 0], torch.arange(0, 100, 10))
    assert torch.equal(torch.cat([y for _, y in batches])[-1, -1], torch.tensor(100))
    assert len(list(ds.iter_eval_batches(3, 10, max_batches=2))) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, ds.iter_eval_batches(3, 10), strict=True))


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too few"):
        _dataset(tmp_path, 10).get_batch(1, 16, torch.Generator())
    with pytest.raises(ValueError, match="token file not found"):
        TokenDataset(tmp_path / "nope.bin", "uint16")
    (tmp_path / "empty.bin").write_bytes(b"")
    assert len(TokenDataset(tmp_path / "empty.bin", "uint16")) == 0


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"text": "ok"}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: record has no 'text' field"),
        ('{"text": 3}\n', r"bad\.jsonl:1: field 'text' is int"),
        ("[1, 2]\n", r"bad\.jsonl:1: record has no 'text' field"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: str, pattern: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=pattern):
        prepare_data(str(path), SMALL_VOCAB, tmp_path / "c", progress=False)


def test_bad_corpus_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="corpus path not found: .*nowhere"):
        load_corpus(str(tmp_path / "nowhere"))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="corpus file is empty: .*empty.txt"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="no files found in corpus directory .*emptydir"):
        load_corpus(str(tmp_path / "emptydir"))
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no training text"):
        prepare_data(str(tmp_path / "blank.jsonl"), SMALL_VOCAB, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="val_percent"):
        load_corpus("stdlib", val_percent=150)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    (tmp_path / "ds").mkdir()
    with pytest.raises(ValueError, match="needs the 'datasets' package"):
        load_corpus(f"hf:{tmp_path / 'ds'}")
    with pytest.raises(ValueError, match="tokenizer file not found"):
        prepare_data("stdlib", SMALL_VOCAB, tmp_path / "c", tokenizer_path=tmp_path / "x.json")


def test_data_package_does_not_import_model_code() -> None:
    src = Path(__file__).resolve().parents[1] / "pyramoe" / "data"
    for path in src.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for layer in ("layers", "models", "train", "cli"):
            assert f"pyramoe.{layer}" not in text, f"{path.name} imports pyramoe.{layer}"


def test_splits_with_other_settings_never_overwrite_each_other(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "src", n=30)
    cache = tmp_path / "cache"
    ten = prepare_data(str(root), SMALL_VOCAB, cache, val_percent=10, progress=False)
    val_before = ten.val_path.read_bytes()
    twenty = prepare_data(str(root), SMALL_VOCAB, cache, val_percent=20, progress=False)
    capped = prepare_data(str(root), SMALL_VOCAB, cache, val_percent=10, max_bytes=2000, progress=False)
    assert len({ten.val_path, twenty.val_path, capped.val_path}) == 3 and twenty.val_tokens > ten.val_tokens
    again = prepare_data(str(root), SMALL_VOCAB, cache, val_percent=10, progress=False)
    assert not again.rebuilt and again.val_path == ten.val_path and again.val_path.read_bytes() == val_before


# ---- reading rules ---------------------------------------------------------------------------------------


def test_directory_json_is_a_text_document_and_jsonl_holds_records(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    package = '{\n  "name": "demo",\n  "version": "1.0.0"\n}\n'
    (root / "package.json").write_text(package, encoding="utf-8")
    (root / "notes.jsonl").write_text('{"text": "first"}\n{"text": "second"}\n', encoding="utf-8")
    assert sorted(_all_docs(str(root))) == sorted([package, "first", "second"])
    # A .json named as the corpus itself is still read as JSON Lines.
    (tmp_path / "records.json").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert _all_docs(str(tmp_path / "records.json")) == ["a", "b"]


def test_python_sources_honour_coding_cookies_and_byte_order_marks(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "latin.py").write_bytes("# -*- coding: latin-1 -*-\nname = 'café'\n".encode("latin-1"))
    (root / "bom.py").write_bytes(b"\xef\xbb\xbfx = 'na\xc3\xafve'\n")
    (root / "wide.txt").write_text("hello ünïcode\n", encoding="utf-16")  # with a BOM
    (root / "bad_cookie.py").write_bytes(b"# coding: no-such-codec\ny = 1\n")
    docs = {doc.splitlines()[-1] for doc in _all_docs(str(root))}
    assert docs == {"name = 'café'", "x = 'naïve'", "hello ünïcode", "y = 1"}


def test_binary_files_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "src", n=6)
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    corpus = load_corpus(str(root), val_percent=0)
    assert len(list(corpus.train_docs())) == 6 and corpus.skipped == {"binary": 1}
    assert len(list(corpus.train_docs())) == 6 and corpus.skipped == {"binary": 1}  # not once per pass
    data = prepare_data(str(root), SMALL_VOCAB, tmp_path / "c", val_percent=10, progress=False)
    cached = prepare_data(str(root), SMALL_VOCAB, tmp_path / "c", val_percent=10, progress=False)
    assert data.skipped_files == cached.skipped_files == {"binary": 1} and not cached.rebuilt


def test_a_utf16_text_file_is_decoded_before_it_is_cut_into_chunks(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    text = "".join(f"ligne {i} d'un long livre\n" for i in range(3000))
    path.write_text(text, encoding="utf-16")
    docs = _all_docs(str(path))
    assert len(docs) > 1 and "".join(docs) == text
