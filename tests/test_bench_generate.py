"""`pyramoe bench generate` on a tiny shape: every implementation measured for every batch, and the
roofline is the measured bandwidth over the weight bytes a batch-1 decode step reads."""

import json

import pytest
import torch

from pyramoe.cli.main import main


def test_bench_generate_tiny(tmp_path, capsys):
    out = tmp_path / "generate.json"
    argv = ["bench", "generate", "--hidden", "32", "--layers", "2", "--experts", "4", "--top-k", "2",
            "--intermediate", "48", "--heads", "4", "--kv-heads", "2", "--vocab", "64", "--prompt-len", "4",
            "--new-tokens", "3", "--batches", "1,2", "--rounds", "1", "--dtype", "fp32", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    from pyramoe.inference.native import load_library

    impls = ("pyramoe", "transformers", "plain-moe") + (("pyramoe-pytorch",) if load_library() else ())
    assert {(r["impl"], r["batch"]) for r in payload["results"]} == {(impl, b) for impl in impls for b in (1, 2)}
    hidden, heads, kv, head_dim, experts, k, inter, vocab, layers = 32, 4, 2, 8, 4, 2, 48, 64, 2
    per_layer = (
        hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden  # q, k, v, o
        + 2 * hidden  # two RMSNorm gains
        + experts * hidden  # router
        + k * 3 * hidden * inter  # the top-k experts' gate, up, down
    )
    weights = layers * per_layer + hidden + vocab * hidden  # + final norm and the LM head (fp32: 4 bytes)
    assert payload["roofline_tok_s"] == pytest.approx(payload["bandwidth_bytes_s"] / (4 * weights))
    assert set(payload["prefill_tok_s"]) == set(impls)
    # Batch 2 touches 4 * (1 - (1 - 2/4)^2) = 3 experts per layer on average.
    batch2 = weights - layers * (k - 3) * 3 * hidden * inter
    assert payload["rooflines_tok_s"]["2"] == pytest.approx(2 * payload["bandwidth_bytes_s"] / (4 * batch2))
    assert payload["gemv_floor_tok_s"] > 0
    assert payload["decode_path"] == ("native" if load_library() is not None else "pytorch")
    assert payload["weights_read_bytes_s"] is None  # fp32: nothing is blocked
    printed = capsys.readouterr().out
    assert "of roofline" in printed and "x oneDNN GEMVs (b1)" in printed and "pyramoe decode step:" in printed


def test_gemv_shapes_of_a_decode_step():
    from pyramoe.bench.generate import decode_gemv_shapes
    from pyramoe.config import ModelConfig
    from pyramoe.models import GPT
    from pyramoe.presets import get_preset

    config = ModelConfig.from_dict({**get_preset("tiny-llama-moe").to_dict(), "vocab_size": 50})
    model = GPT(config)
    shapes = decode_gemv_shapes(model, top_k=2)
    moe_blocks = [b for b in model.blocks if b.is_moe]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(shapes) == len(linears) + 4 * len(moe_blocks)  # two projections of two experts per MoE layer
    w_in = moe_blocks[0].ffn.experts.w_in
    assert shapes.count(tuple(w_in.shape[1:])) >= 2 * len(moe_blocks) and (50, config.d_model) in shapes


def test_bench_generate_int8_with_its_own_roofline(tmp_path, capsys):
    """pyramoe-int8 beside bf16 (its step reads 1 byte per weight plus 8 per output of scales and
    sums), and the quality of int8 on a trained checkpoint."""
    from live_server import train_tiny_run

    run = train_tiny_run(tmp_path)
    out = tmp_path / "generate.json"
    argv = ["bench", "generate", "--hidden", "32", "--layers", "2", "--experts", "4", "--top-k", "2",
            "--intermediate", "48", "--heads", "4", "--kv-heads", "2", "--vocab", "64", "--prompt-len", "4",
            "--new-tokens", "3", "--batches", "1", "--rounds", "1", "--dtype", "bf16", "--no-transformers",
            "--no-pytorch-path", "--quantize", "int8", "--quality-checkpoint", str(run), "--quality-tokens", "32",
            "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    rows = {r["impl"]: r for r in payload["results"]}
    assert set(rows) == {"pyramoe", "pyramoe-int8"} and set(payload["prefill_tok_s"]) == set(rows)
    hidden, heads, kv, head_dim, experts, k, inter, vocab, layers = 32, 4, 2, 8, 4, 2, 48, 64, 2
    matrices = [(heads + 2 * kv) * head_dim, hidden] + k * [2 * inter, hidden]  # outputs (inputs: the rest)
    inputs = [hidden, heads * head_dim] + k * [hidden, inter]
    int8 = layers * sum(n * i + 8 * -(-n // 16) * 16 for n, i in zip(matrices, inputs))
    int8 += vocab * hidden + 8 * vocab  # the LM head
    other = layers * (2 * hidden + experts * hidden) * 2 + hidden * 2  # norms, routers (bf16)
    assert rows["pyramoe-int8"]["step_bytes"] == int8 + other
    assert rows["pyramoe-int8"]["roofline_tok_s"] == pytest.approx(payload["bandwidth_bytes_s"] / (int8 + other))
    quality = payload["quality"]
    assert quality["greedy_tokens"] == 32 and 0 <= quality["greedy_agreement"] <= 1
    assert quality["perplexity_ratio"] == pytest.approx(1, rel=0.05) and quality["decode_path"] in ("native", "pytorch")
    printed = capsys.readouterr().out
    assert "x pyramoe" in printed and "held-out perplexity bf16" in printed


@pytest.mark.parametrize(("flag", "value"), [("--new-tokens", "1"), ("--batches", "1,x"), ("--top-k", "9"),
                                             ("--quantize", "int3"), ("--quality-checkpoint", "/nonexistent")])
def test_bench_generate_bad_input_is_one_line(flag, value, capsys):
    assert main(["bench", "generate", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and flag in err


def test_bench_generate_device_is_checked(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    assert main(["bench", "generate", "--device", "cuda", "--out", "unused.json"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device" in err


def test_bench_generate_shapes_step_and_compiled_peer(tmp_path, capsys):
    """--shape fills the sizes left unset; --step picks the engine's step; transformers-compiled is
    CUDA-only (a note on the CPU), and where it fails it is dropped with a note, nothing else is."""
    import argparse

    from pyramoe.bench.generate import COMPILED, add_arguments, resolve_shape, warm_up

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--shape", "large", "--layers", "2"])
    resolve_shape(args)
    assert (args.hidden, args.layers, args.experts, args.intermediate, args.heads, args.kv_heads) == (
        2048, 2, 8, 5632, 16, 4)
    out = tmp_path / "generate.json"
    argv = ["bench", "generate", "--hidden", "32", "--layers", "2", "--experts", "4", "--intermediate", "48",
            "--heads", "4", "--kv-heads", "2", "--vocab", "64", "--prompt-len", "4", "--new-tokens", "3",
            "--batches", "1,3", "--rounds", "1", "--dtype", "fp32", "--step", "device", "--no-pytorch-path",
            "--no-plain-moe", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["decode_path"] == "device" and payload["shape"]["shape"] == "small"
    assert {r["impl"] for r in payload["results"]} == {"pyramoe", "transformers"}
    assert f"{COMPILED}: not run (CUDA only)" in payload["notes"]

    def fails(n):
        raise RuntimeError("inductor: no compiler\nmore")

    notes = []
    fns = {"pyramoe": lambda n: None, COMPILED: fails}
    warm_up(fns, 8, notes)
    assert list(fns) == ["pyramoe"] and notes == [f"{COMPILED} dropped: RuntimeError: inductor: no compiler"]
    with pytest.raises(RuntimeError):
        warm_up({"pyramoe": fails}, 8, [])
    capsys.readouterr()
    for flag, value in (("--shape", "huge"), ("--step", "graphs")):
        assert main(["bench", "generate", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and flag in err
