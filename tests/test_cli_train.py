"""`pyramoe train / eval / generate / plot` and `bench train-step` through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyramoe.cli.main import main

pytestmark = pytest.mark.usefixtures("tiny_run_env")


def tiny_args(tmp_path: Path, steps: int = 6) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("".join(f"def f{i}(x):\n    return x + {i % 11}\n\n" for i in range(300)))
    return [
        "train", "--corpus", str(corpus), "--steps", str(steps), "--batch-size", "4", "--seq-len", "32",
        "--set", "train.vocab_size=300", "--set", "train.val_percent=10", "--set", "train.eval_every=3",
        "--set", "train.eval_batches=2", "--set", "model.d_model=32", "--set", "model.n_layers=2",
        "--quiet",
    ]


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("argv", [["train"], ["eval"], ["generate"], ["plot"], ["bench", "train-step"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    assert f"usage: pyramoe {' '.join(argv)}" in capsys.readouterr().out


def test_train_eval_generate_plot_end_to_end(tmp_path, capsys):
    assert main([*tiny_args(tmp_path), "--sample-tokens", "8"]) == 0
    out = capsys.readouterr().out
    run_dir = Path("runs/tiny-moe")
    assert "val loss" in out and "sample (8 tokens" in out and (run_dir / "plots" / "loss.png").is_file()
    assert (run_dir / "plots" / "expert_load.png").stat().st_size > 1000

    assert main(["eval", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6 and result["val_loss"] > 0 and set(result["expert_load"]) == {"1"}
    assert main(["eval", str(run_dir / "checkpoints" / "step-0000006"), "--dropless"]) == 0
    assert "max load / uniform" in capsys.readouterr().out

    assert main(["generate", str(run_dir), "--prompt", "def f1", "--max-new-tokens", "5", "--seed", "1"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("def f1")
    from pyramoe.kernels import load_library

    assert f"{'native' if load_library() else 'pytorch'} decode step" in printed.err

    assert main(["plot", str(run_dir), "--out", str(tmp_path / "pngs")]) == 0
    assert (tmp_path / "pngs" / "loss.png").is_file()

    # A second run into the same directory is refused; --resume continues it instead.
    one_line_error(capsys, tiny_args(tmp_path), "already holds a run", "--resume")
    assert main([*tiny_args(tmp_path, steps=8), "--resume", "--no-plot", "--sample-tokens", "0"]) == 0
    assert "resuming at step 6" in capsys.readouterr().out
    assert main(["train", "--resume", "--quiet"]) == 0  # already at its last step
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--set", "train.lrr=1"], ["train.lrr: unknown setting", "train.lr?"]),
        (["--set", "model.dropout=2"], ["model.dropout"]),
        (["--set", "train.steps"], ["--set", "SECTION.KEY=VALUE"]),
        (["--steps", "-1"], ["train.steps: must be >= 1"]),
        (["--lr", "fast"], ["train.lr: expected float"]),
        (["--precision", "fp16"], ["train.precision"]),
        (["--preset", "gigantic"], ["unknown preset 'gigantic'"]),
        (["--config", "missing.toml"], ["config file not found"]),
        (["--corpus", "no/such/corpus.txt"], ["corpus path not found"]),
        (["--resume"], ["--resume: no checkpoint"]),
    ],
)
def test_train_errors_are_one_line(tmp_path, capsys, extra, fragments):
    one_line_error(capsys, [*tiny_args(tmp_path), *extra], *fragments)
    assert not Path("runs").exists() or not any(Path("runs").rglob("*.safetensors"))


def test_eval_and_generate_errors_are_one_line(tmp_path, capsys):
    one_line_error(capsys, ["eval", str(tmp_path / "nothing")], "checkpoint not found")
    one_line_error(capsys, ["generate", str(tmp_path)], "no checkpoints under it")
    one_line_error(capsys, ["plot", str(tmp_path)], "no metrics.jsonl")
    assert main([*tiny_args(tmp_path, steps=1), "--no-plot", "--sample-tokens", "0"]) == 0
    ckpt = Path("runs/tiny-moe/checkpoints/step-0000001")
    one_line_error(capsys, ["generate", str(ckpt), "--prompt", " ".join(map(str, range(300)))], "max_seq_len")
    one_line_error(capsys, ["generate", str(ckpt), "--temperature", "-1"], "--temperature")
    state = json.loads((ckpt / "state.json").read_text())
    state["model_config"]["d_model"] = 64
    (ckpt / "state.json").write_text(json.dumps(state))
    one_line_error(capsys, ["eval", str(ckpt)], "incompatible checkpoint")
    (ckpt / "model.safetensors").unlink()
    one_line_error(capsys, ["generate", str(ckpt)], "model.safetensors missing")


def test_bench_train_step_writes_json(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    argv = ["bench", "train-step", "--batch-size", "2", "--seq-len", "16", "--vocab-size", "300",
            "--repeats", "2", "--warmup", "0", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert [r["preset"] for r in payload["results"]] == ["tiny-moe", "tiny-dense"]
    assert payload["results"][1]["x_baseline"] == 1.0 and payload["results"][0]["tokens_per_s"] > 0
    assert "x tiny-dense" in capsys.readouterr().out
    one_line_error(capsys, ["bench", "train-step", "--presets", "tiny-moe"], "--presets")


def test_train_reports_skipped_files_and_refuses_another_split_on_resume(tmp_path, capsys):
    corpus = tmp_path / "src"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {j % 11}\n" for j in range(30)))
    (corpus / "blob.bin").write_bytes(b"\x00\xff" * 64)
    args = [*tiny_args(tmp_path, steps=2), "--corpus", str(corpus), "--no-plot", "--sample-tokens", "0"]
    assert main(args) == 0
    assert f"corpus {corpus}: skipped files (1 binary)" in capsys.readouterr().out
    one_line_error(capsys, [*args, "--resume", "--max-bytes", "5000"], "train.max_bytes: cannot change when resuming")
