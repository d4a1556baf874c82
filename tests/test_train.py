"""The training loop on tiny models and corpora: loss falls, exact resume, signals, safe checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from pyramoe.models import GPT
from pyramoe.train import build_model, create_trainer, latest_checkpoint, load_checkpoint, resolve_run
from pyramoe.train import checkpoint as ckpt_io
from pyramoe.train.checkpoint import list_checkpoints, load_optimizer_state
from pyramoe.train.config import build_model_config, run_config_from_dict
from pyramoe.train.optim import LRPlan, make_optimizer
from pyramoe.train.trainer import train_step


def write_corpus(path: Path, n: int = 400) -> Path:
    lines = [f"def f{i}(x, y):\n    return x * {i % 13} + y - {i % 7}\n\n" for i in range(n)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def tiny_sources(tmp_path: Path, run_dir: str = "run", **train) -> list[dict]:
    """A 2-layer, width-32 tiny-moe on a ~20 KB corpus: each step takes milliseconds."""
    settings = dict(
        corpus=str(write_corpus(tmp_path / "corpus.txt")), vocab_size=300, run_dir=str(tmp_path / run_dir),
        steps=40, batch_size=8, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=5, eval_every=20, eval_batches=2,
        save_every=10, keep_last=2, val_percent=10.0,
    )
    settings.update(train)
    return [{"train": settings, "model": {"d_model": 32, "n_layers": 2, "max_seq_len": 64}}]


pytestmark = pytest.mark.usefixtures("tiny_run_env")


def start(sources: list[dict], resume: str | None = None):
    run, ckpt = resolve_run(sources, resume)
    return create_trainer(run, ckpt, progress=False)


def test_tiny_run_lowers_loss_and_writes_run_dir(tmp_path):
    trainer = start(tiny_sources(tmp_path))
    result = trainer.fit()
    assert result.stopped_by is None and result.step == 40 and sorted(result.losses) == list(range(1, 41))
    assert sorted(result.evals) == [0, 20, 40]
    assert result.evals[40].loss < result.evals[0].loss - 0.5
    assert 0 <= result.evals[40].load[1].drop_rate < 1
    run_dir = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-0000030", "step-0000040"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 41))
    assert all(set(r["expert_load"]) == {"1"} for r in records if r["type"] == "eval")
    assert (run_dir / "config.json").is_file() and (run_dir / "tokenizer.json").is_file()


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    # Dropout, random token dropping and accumulation all draw randomness that must be restored.
    extra = dict(steps=12, save_every=0, eval_every=4, grad_accum=2)
    model = {"dropout": 0.1, "moe": {"drop_policy": "random", "capacity_factor": 1.0}}
    sources = tiny_sources(tmp_path, "full", **extra)
    sources[0]["model"].update(model)
    full = start(sources).fit()

    sources = tiny_sources(tmp_path, "split", **extra)
    sources[0]["model"].update(model)
    first = start(sources).fit(max_steps=6)
    assert first.step == 6 and latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-0000006"
    second = start([{"train": {"run_dir": str(tmp_path / "split")}}], resume="latest").fit()
    assert second.step == 12
    assert {**first.losses, **second.losses} == full.losses  # bit-for-bit, not approximately
    assert second.evals[12].loss == full.evals[12].loss


def test_resume_can_extend_steps_but_not_change_the_model(tmp_path):
    start(tiny_sources(tmp_path, steps=4, eval_every=0)).fit()
    run_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="model.d_model: cannot change when resuming"):
        resolve_run([{"train": {"run_dir": run_dir}, "model": {"d_model": 64}}], resume="latest")
    with pytest.raises(ValueError, match="already holds a run"):
        start(tiny_sources(tmp_path, steps=4))
    more = start([{"train": {"run_dir": run_dir, "steps": 6}}], resume=run_dir).fit()
    assert more.step == 6 and sorted(more.losses) == [5, 6]


def test_sigint_finishes_the_step_saves_and_restores_the_handler(tmp_path):
    trainer = start(tiny_sources(tmp_path, save_every=0))
    original, handler = trainer.next_batches, signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job

    def interrupting() -> list:
        if trainer.step == 3:
            signal.raise_signal(signal.SIGINT)  # as if Ctrl-C arrived during step 4
        return original()

    trainer.next_batches = interrupting
    result = trainer.fit()
    assert result.stopped_by == signal.SIGINT and result.step == 4
    assert load_checkpoint(result.checkpoint).step == 4
    assert signal.getsignal(signal.SIGINT) is handler


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = start(tiny_sources(tmp_path, steps=8, save_every=4, eval_every=0))
    trainer.fit(max_steps=4)
    real_save = ckpt_io.save_file
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if path.endswith(ckpt_io.OPTIMIZER_FILE):  # the model file is already written by now
            raise OSError("disk full")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    assert trainer.step == 8 and len(calls) == 2
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000004"]  # no temporaries left behind
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 4
    model = build_model(ckpt)
    load_optimizer_state(make_optimizer(model, trainer.config), ckpt)


def test_damaged_checkpoint_is_a_one_line_error(tmp_path):
    trainer = start(tiny_sources(tmp_path, steps=2, eval_every=0))
    path = trainer.fit().checkpoint
    (path / ckpt_io.MODEL_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="unreadable safetensors file") as info:
        build_model(load_checkpoint(path))
    assert "\n" not in str(info.value)
    (path / ckpt_io.STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_tied_embeddings_are_stored_once_and_reload_tied(tmp_path):
    path = start(tiny_sources(tmp_path, steps=1, eval_every=0)).fit().checkpoint
    model = build_model(load_checkpoint(path))
    assert model.lm_head.weight is model.tok_emb.weight
    with ckpt_io.safe_open(str(path / ckpt_io.MODEL_FILE), framework="pt") as f:
        assert "tok_emb.weight" in f.keys() and "lm_head.weight" not in f.keys()


def linear_output_dtypes(trainer, names: tuple[str, ...]) -> dict[str, set]:
    """Record the output dtype of the named nn.Linear modules during training forwards."""
    seen: dict[str, set] = {name: set() for name in names}
    modules = dict(trainer.model.named_modules())
    for name in names:
        assert isinstance(modules[name], torch.nn.Linear)
        modules[name].register_forward_hook(
            lambda module, args, out, name=name: seen[name].add(out.dtype) if module.training else None
        )
    return seen


def test_bf16_runs_the_matmuls_in_bf16_and_keeps_fp32_weights(tmp_path):
    # One tiny step only: this CPU may have no native bf16, where bf16 matmuls are much slower.
    probes = ("blocks.0.attn.qkv", "lm_head")
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = start(tiny_sources(tmp_path, f"run-{precision}", steps=1, eval_every=0, batch_size=2,
                                     precision=precision))
        seen = linear_output_dtypes(trainer, probes)
        runs[precision] = (trainer.fit(), seen)
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        assert all(state["exp_avg"].dtype == torch.float32 for state in trainer.optimizer.state.values())
    assert runs["fp32"][1] == dict.fromkeys(probes, {torch.float32})  # the probe sees what ran
    assert runs["bf16"][1] == dict.fromkeys(probes, {torch.bfloat16})
    fp32_loss, bf16_loss = runs["fp32"][0].losses[1], runs["bf16"][0].losses[1]
    assert math.isfinite(bf16_loss) and bf16_loss == pytest.approx(fp32_loss, rel=0.02)


def test_gradient_accumulation_equals_one_large_batch():
    # Dense model, no dropout: two micro-batches of b must give one batch of 2b's loss and update.
    run = run_config_from_dict({"train": {"seq_len": 16, "grad_clip": 1.0},
                                "model": {"preset": "tiny-dense", "d_model": 32, "n_layers": 2, "max_seq_len": 64}})
    config = build_model_config(run, vocab_size=300)
    x = torch.randint(0, 300, (8, 16))
    y = torch.randint(0, 300, (8, 16))
    models, stats = [], []
    for batches in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])]):
        torch.manual_seed(0)
        model = GPT(config)
        optimizer = make_optimizer(model, run.train)
        stats.append(train_step(model, optimizer, batches, grad_clip=run.train.grad_clip))
        models.append(model)
    one, accumulated = stats
    assert accumulated.loss == pytest.approx(one.loss, rel=1e-5)
    assert accumulated.grad_norm == pytest.approx(one.grad_norm, rel=1e-4)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(0)
    assert not torch.equal(models[0].tok_emb.weight, GPT(config).tok_emb.weight)  # the step moved it


def train_lrs(run_dir: Path) -> dict[int, float]:
    """step -> the LR logged for it (step 1 is optimizer step 0)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if r["type"] == "train"}


def test_extending_a_finished_run_continues_at_min_lr(tmp_path):
    start(tiny_sources(tmp_path, steps=8, warmup=2, eval_every=0, save_every=0)).fit()
    run_dir = tmp_path / "run"
    assert train_lrs(run_dir)[8] == 3e-4  # the last step is at min_lr exactly
    more = start([{"train": {"run_dir": str(run_dir), "steps": 12}}], resume="latest").fit()
    extension = {s: lr for s, lr in train_lrs(run_dir).items() if s > 8}
    assert more.step == 12 and extension == dict.fromkeys(range(9, 13), 3e-4)
    # The re-planned schedule travels with the checkpoint: resuming again keeps it.
    again = start([{"train": {"run_dir": str(run_dir)}}], resume="latest")
    assert again.lr_plan == LRPlan.from_dict(load_checkpoint(run_dir).state["lr_plan"])
    assert (again.lr_plan.start, again.lr_plan.start_lr, again.lr_plan.steps) == (8, 3e-4, 12)


def test_resume_accepts_restated_model_settings_and_names_a_changed_one(tmp_path):
    sources = tiny_sources(tmp_path, steps=2, eval_every=0)
    start(sources).fit()
    run_dir = str(tmp_path / "run")
    preset_moe = load_checkpoint(run_dir).model_config().layers[1].moe
    # The first run's own settings, the preset and values the preset already had are no change.
    same = {**sources[0]["model"], "preset": "tiny-moe", "dropout": 0.0, "moe_placement": "every_other",
            "num_experts": preset_moe.num_experts, "moe": {"top_k": preset_moe.top_k}}
    run, ckpt = resolve_run([{"train": {"run_dir": run_dir}, "model": same}], resume="latest")
    assert ckpt is not None and run.model == sources[0]["model"]
    for model, message in [
        ({"dropout": 0.1}, "model.dropout: cannot change when resuming \\(the checkpoint has 0.0\\)"),
        ({"moe": {"top_k": preset_moe.top_k + 1}}, f"model.moe.top_k: .* has {preset_moe.top_k}\\)"),
        ({"n_layers": 4}, "model.n_layers: .* has 2\\)"),
        ({"preset": "tiny-dense"}, "model.preset: .* has 'tiny-moe'\\)"),
        ({"dropuot": 0.1}, "model.dropuot: unknown setting"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_run([{"train": {"run_dir": run_dir}, "model": model}], resume="latest")


def test_resume_applies_new_optimizer_settings_to_the_loaded_optimizer(tmp_path):
    start(tiny_sources(tmp_path, steps=2, eval_every=0, weight_decay=0.1, beta2=0.95)).fit()
    new = {"weight_decay": 0.3, "beta2": 0.9, "expert_lr_scale": 0.5, "steps": 3}
    trainer = start([{"train": {"run_dir": str(tmp_path / "run"), **new}}], resume="latest")
    trainer.fit()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"dense", "dense_no_decay", "expert", "expert_no_decay"}
    assert groups["dense"]["weight_decay"] == groups["expert"]["weight_decay"] == 0.3
    assert groups["dense_no_decay"]["weight_decay"] == 0.0
    assert all(g["betas"] == (0.9, 0.9) for g in groups.values())
    # The step just taken ran with them: the expert groups' rate is half the dense ones'.
    assert groups["expert"]["lr"] == groups["dense"]["lr"] * 0.5 > 0
    saved = load_checkpoint(tmp_path / "run").state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in saved] == [g["weight_decay"] for g in trainer.optimizer.param_groups]


def test_resume_refuses_another_train_validation_split(tmp_path):
    start(tiny_sources(tmp_path, steps=2, eval_every=0)).fit()
    run_dir = str(tmp_path / "run")
    for name, value in [("val_percent", 20.0), ("max_bytes", 5000)]:
        with pytest.raises(ValueError, match=f"train.{name}: cannot change when resuming on the same corpus"):
            resolve_run([{"train": {"run_dir": run_dir, name: value}}], resume="latest")
    restated = resolve_run([{"train": {"run_dir": run_dir, "val_percent": 10, "max_bytes": None}}], resume="latest")
    assert restated[0].train.val_percent == 10.0


def test_a_second_run_in_the_same_directory_is_refused_in_one_line(tmp_path, capsys):
    from pyramoe.cli.main import main

    first = start(tiny_sources(tmp_path, steps=2, eval_every=0))
    with pytest.raises(ValueError, match="another run is using this directory") as info:
        start(tiny_sources(tmp_path, steps=2))
    assert "\n" not in str(info.value) and str(tmp_path / "run") in str(info.value)
    corpus = str(tmp_path / "corpus.txt")
    argv = ["train", "--corpus", corpus, "--run-dir", str(tmp_path / "run"), "--steps", "2", "--quiet"]
    assert main(argv) == 2  # e.g. a second terminal: refused before anything is written
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"pid {os.getpid()}" in err
    first.fit()
    assert not (tmp_path / "run" / "metrics.jsonl").read_text().count('"resume"')
    first.close()  # the directory is free again
    with start([{"train": {"run_dir": str(tmp_path / "run"), "steps": 3}}], resume="latest") as again:
        assert again.fit().step == 3


def test_resume_on_another_dp_size_keeps_the_global_batch(tmp_path):
    from pyramoe.train.session import keep_global_batch

    with start(tiny_sources(tmp_path, steps=2, eval_every=0, grad_accum=2, batch_size=4)) as trainer:
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.state["global_batch"] == 8
    run, _ = resolve_run([{"train": {"run_dir": str(tmp_path / "run")}}], "latest")

    def settings(dp: int, **train) -> tuple[int, int]:
        resumed, _ = resolve_run([{"train": {"run_dir": str(tmp_path / "run"), **train}}], "latest")
        got = keep_global_batch(resumed, ckpt, dp).train
        assert got.batch_size * got.grad_accum * dp == 8
        return got.batch_size, got.grad_accum

    assert settings(1) == (4, 2)
    assert settings(2) == (2, 2)  # the same micro-batches of the same global draws, split over 2 ranks
    assert settings(4) == (1, 2)
    assert settings(8) == (1, 1)  # the accumulation derived when the micro-batch cannot shrink further
    assert settings(2, batch_size=4, grad_accum=1) == (4, 1)  # restated to fit: accepted as given
    with pytest.raises(ValueError, match=r"train.batch_size: 8 x grad_accum 2 x DP 2 = 32 sequences per step, "
                                         r"but .* trained on 8") as info:
        keep_global_batch(resolve_run([{"train": {"run_dir": str(tmp_path / "run"), "batch_size": 8}}],
                                      "latest")[0], ckpt, 2)
    with pytest.raises(ValueError, match="data-parallel size 3 does not divide the global batch of 8"):
        keep_global_batch(run, ckpt, 3)
    assert "\n" not in str(info.value)
