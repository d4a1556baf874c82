"""A quantized model on disk (`pyramoe quantize`, `pyramoe.inference.quantized_checkpoint`): saved
and loaded back it computes what quantizing at load computes (int8, int4 symmetric and asymmetric;
experts, shared experts, int8 fallbacks), loads through `Engine.load` and `pyramoe generate`, and a
bad directory is a one-line error naming the file."""

from __future__ import annotations

import json

import pytest
import test_native_decode as native_cases
import torch

from pyramoe.cli.main import main
from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.native import layout_of
from pyramoe.inference.packing import quantize_model
from pyramoe.inference.quantized_checkpoint import META_FILE, TENSOR_FILE, load_quantized, save_quantized


def _logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("quantize", ["int8", "int4", "int4-g64-asym"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2 (shared gated expert, qkv bias)", "odd widths"])
def test_round_trip_equals_quantizing_at_load(tmp_path, name, quantize):
    saved = native_cases._model(native_cases.CASES[name], torch.float32)
    at_load = native_cases._model(native_cases.CASES[name], torch.float32)  # the same seeded weights
    save_quantized(saved, quantize, tmp_path / "q", None)
    quantize_model(at_load, quantize)
    loaded, meta = load_quantized(tmp_path / "q")
    assert meta["quantize"] == quantize and not (tmp_path / "q" / "tokenizer.json").exists()
    assert layout_of(loaded.blocks[0].attn.qkv) == layout_of(at_load.blocks[0].attn.qkv)
    torch.testing.assert_close(_logits(loaded), _logits(at_load), rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from live_server import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("quantized-checkpoint"))


def test_cli_quantize_then_generate(tiny_run, tmp_path, capsys):
    out = tmp_path / "int4"
    assert main(["quantize", str(tiny_run), "--quantize", "int4", "--out", str(out), "--dtype", "fp32"]) == 0
    assert "int4" in capsys.readouterr().out
    prompts, params = [[5, 6, 7], [8, 9]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ours = Engine.load(out, dtype="fp32", max_batch=2)
    theirs = Engine.load(tiny_run, dtype="fp32", max_batch=2, quantize="int4")
    outputs = [[c.token_ids for c in engine.generate(prompts, params)] for engine in (ours, theirs)]
    assert outputs[0] == outputs[1]
    assert ours.quantize == "int4" and ours.quantized_weights == 0  # nothing left to quantize
    with pytest.raises(ValueError, match="holds int4 weights already"):
        Engine.load(out, quantize="int8")
    assert main(["generate", str(out), "--prompt", "def", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert "int4 weights" in capsys.readouterr().err
    # Writing over a directory with files in it is refused.
    assert main(["quantize", str(tiny_run), "--quantize", "int8", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err


def _corrupt(directory, how):
    if how == "json":
        (directory / META_FILE).write_text("{not json")
    elif how == "version":
        meta = json.loads((directory / META_FILE).read_text())
        (directory / META_FILE).write_text(json.dumps({**meta, "version": 99}))
    elif how == "truncated":
        data = (directory / TENSOR_FILE).read_bytes()
        (directory / TENSOR_FILE).write_bytes(data[: len(data) // 2])
    elif how == "shape":
        meta = json.loads((directory / META_FILE).read_text())
        first = next(iter(meta["matrices"]))
        meta["matrices"][first]["in_features"] *= 2
        (directory / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["json", "version", "truncated", "shape"])
def test_bad_files_are_one_line_errors(tmp_path, how, capsys):
    model = native_cases._model(native_cases.CASES["mixtral"], torch.float32)
    directory = save_quantized(model, "int4", tmp_path / "q", None)
    _corrupt(directory, how)
    with pytest.raises(ValueError) as raised:
        load_quantized(directory)
    message = str(raised.value)
    assert "\n" not in message and str(directory) in message, message
