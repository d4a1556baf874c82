"""Corpora, tokenizer and tokenized datasets (imports nothing from layers/models/train/cli)."""

from pyramoe.data.corpus import DEFAULT_VAL_PERCENT, Corpus, load_corpus, stdlib_files, stdlib_root
from pyramoe.data.dataset import (
    PreparedData,
    TokenDataset,
    default_cache_root,
    prepare_data,
    token_dtype,
)
from pyramoe.data.tokenizer import EOS_TOKEN, Tokenizer

__all__ = [
    "DEFAULT_VAL_PERCENT",
    "EOS_TOKEN",
    "Corpus",
    "PreparedData",
    "TokenDataset",
    "Tokenizer",
    "default_cache_root",
    "load_corpus",
    "prepare_data",
    "stdlib_files",
    "stdlib_root",
    "token_dtype",
]
