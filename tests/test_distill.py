"""Mixture-of-Students: the KD loss and schedule, student building and initialisation, and distillation
runs (staged KD in the metrics, a frozen teacher, exact resume) on a width-32 tiny PR-MoE teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pyramoe.config import ModelConfig
from pyramoe.models import GPT
from pyramoe.models.student import (
    default_layer_map,
    init_student_from_teacher,
    student_config,
    student_depth,
    student_layer_ids,
)
from pyramoe.presets import get_preset
from pyramoe.train import create_trainer, resolve_run
from pyramoe.train.config import run_config_from_dict
from pyramoe.train.distill import create_distill_trainer, resolve_distill_run
from pyramoe.train.kd import DistillConfig, kd_loss, kd_weight_at
from pyramoe.train.metrics import read_metrics, records_of

TINY = {"d_model": 32, "max_seq_len": 64}


def tiny_teacher_config() -> ModelConfig:
    data = get_preset("tiny-prmoe").to_dict()  # 4 blocks, MoE with 4 and 8 experts in blocks 1 and 3
    data.update(TINY, vocab_size=300, d_ff=None)
    return ModelConfig.from_dict(data)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny-prmoe teacher (width 32, vocab 300) trained for 4 steps on a ~20 KB corpus."""
    root = tmp_path_factory.mktemp("teacher")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x, y):\n    return x * {i % 13} + y - {i % 7}\n\n" for i in range(400)))
    train = dict(corpus=str(corpus), vocab_size=300, run_dir=str(root / "teacher"), steps=4, batch_size=8,
                 seq_len=32, warmup=1, eval_every=0, eval_batches=2, val_percent=10.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYRAMOE_CACHE", str(root / "cache"))
        run, _ = resolve_run([{"train": train, "model": {"preset": "tiny-prmoe", **TINY}}])
        create_trainer(run, progress=False).fit()
    torch.set_num_threads(threads)
    return root / "teacher"


pytestmark = pytest.mark.usefixtures("tiny_run_env")


def distill(teacher: Path, run_dir: Path, resume: str | None = None, model: dict | None = None, **settings):
    train = {k: settings.pop(k) for k in list(settings) if k not in DistillConfig.__dataclass_fields__}
    sources = [{"train": {"run_dir": str(run_dir), **train}, "distill": {"teacher": str(teacher), **settings}}]
    if model:
        sources.append({"model": model})
    return create_distill_trainer(resolve_distill_run(sources, resume), progress=False)


# -- the loss and its schedule ------------------------------------------------------------------------------


def test_kd_loss_matches_hand_computation():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    temperature = 2.0

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    per_token = [sum(p * math.log(p / q) for p, q in zip(softmax(t), softmax(s))) for s, t in zip(student, teacher)]
    expected = temperature**2 * sum(per_token) / len(per_token)  # T² · KL summed over vocab, mean over tokens
    s = torch.tensor([student], requires_grad=True)  # [B=1, T=2, V=3]
    loss = kd_loss(s, torch.tensor([teacher]), temperature)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    same = torch.randn(2, 3, 7).bfloat16()
    assert kd_loss(same, same, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        kd_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), 1.0)


def test_kd_weight_drops_to_zero_at_the_stop_step():
    stop = DistillConfig(kd_weight=0.5, kd_schedule="stop", kd_stop_step=10)
    assert [kd_weight_at(s, stop) for s in (0, 9, 10, 11, 500)] == [0.5, 0.5, 0.0, 0.0, 0.0]
    decay = DistillConfig(kd_weight=0.5, kd_schedule="linear_decay", kd_stop_step=10)
    weights = [kd_weight_at(s, decay) for s in range(12)]
    assert weights[0] == 0.5 and weights[5] == pytest.approx(0.25) and weights[9] == pytest.approx(0.05)
    assert weights[10:] == [0.0, 0.0] and all(a > b for a, b in zip(weights[:10], weights[1:11]))
    assert kd_weight_at(10**6, DistillConfig(kd_weight=0.5, kd_schedule="constant", kd_stop_step=3)) == 0.5
    # An unset stop step becomes 3/4 of the run's steps when the run starts.
    assert DistillConfig().with_stop_step(40).kd_stop_step == 30
    assert DistillConfig(kd_stop_step=7).with_stop_step(40).kd_stop_step == 7


@pytest.mark.parametrize(
    ("distill", "message"),
    [
        ({"kd_schedule": "cosine"}, "distill.kd_schedule: must be one of"),
        ({"temperature": 0}, "distill.temperature: must be > 0"),
        ({"tempreature": 2}, "did you mean distill.temperature?"),
        ({"kd_weight": "high"}, "distill.kd_weight: expected float"),
        ({"kd_weight": 0, "ce_weight": 0}, "cannot both be 0"),
        ({"kd_stop_step": 0}, "distill.kd_stop_step: must be >= 1"),
        ({"layer_fraction": 1.5}, "distill.layer_fraction"),
    ],
)
def test_distill_settings_are_checked_like_train_settings(distill, message):
    with pytest.raises(ValueError, match=message):
        run_config_from_dict({"distill": distill})


# -- the student ---------------------------------------------------------------------------------------------


def test_student_keeps_first_last_and_evenly_spaced_blocks():
    assert student_layer_ids(4, 3) == [0, 1, 3]
    assert sorted(set(range(24)) - set(student_layer_ids(24, 21))) == [4, 12, 19]
    assert student_layer_ids(5, 2) == [0, 4] and student_layer_ids(6, 6) == list(range(6))
    assert student_depth(4) == 3 and student_depth(24) == 21 and student_depth(8, layer_fraction=0.5) == 4
    with pytest.raises(ValueError, match="at least 2"):
        student_layer_ids(4, 1)
    with pytest.raises(ValueError, match=r"must be in \[1, 4\]"):
        student_layer_ids(4, 5)
    # tiny-mos is exactly the student derived from tiny-prmoe.
    assert student_config(get_preset("tiny-prmoe")) == (get_preset("tiny-mos"), [0, 1, 3])
    # The paper's PR-MoE: each kept block keeps its FFN and expert count.
    teacher = get_preset("350m-prmoe-32-64")
    student, keep = student_config(teacher)
    assert student.n_layers == 21 and [student.layers[i] for i in range(21)] == [teacher.layers[i] for i in keep]
    assert [layer.moe.num_experts for layer in student.layers if layer.moe] == [32] * 9 + [64] * 2


def test_init_from_teacher_copies_embeddings_final_ln_and_kept_blocks():
    teacher = GPT(tiny_teacher_config())
    config, keep = student_config(teacher.config, n_layers=3)
    student = GPT(config)
    copied = init_student_from_teacher(student, teacher, keep)
    assert len(copied) == len(student.state_dict())
    t, s = teacher.state_dict(), student.state_dict()
    for name in ("tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias"):
        assert torch.equal(s[name], t[name])
    for i, j in enumerate(keep):
        block = [k for k in s if k.startswith(f"blocks.{i}.")]
        assert block and all(torch.equal(s[k], t[k.replace(f"blocks.{i}.", f"blocks.{j}.", 1)]) for k in block)
    assert student.blocks[2].ffn.num_experts == 8 and student.lm_head.weight is student.tok_emb.weight
    assert student(torch.randint(0, 300, (2, 16))).logits.shape == (2, 16, 300)

    wider = GPT(ModelConfig.from_dict({**config.to_dict(), "d_model": 64, "d_ff": None}))
    with pytest.raises(ValueError, match=r"tok_emb.weight: shape \(300, 64\) in the student, \(300, 32\)"):
        init_student_from_teacher(wider, teacher, keep)
    # Another preset: only same-shaped tensors are copied (tiny-moe's 8-expert block 1 <- teacher block 3,
    # but not its longer position table).
    layers = get_preset("tiny-moe").to_dict()["layers"][:2]
    other = GPT(ModelConfig.from_dict({**get_preset("tiny-moe").to_dict(), "d_model": 32, "max_seq_len": 128,
                                       "vocab_size": 300, "d_ff": None, "layers": layers}))
    layer_map = default_layer_map(4, 2)
    copied = init_student_from_teacher(other, teacher, layer_map, strict=False)
    assert layer_map == [0, 3] and "blocks.1.ffn.experts.w_in" in copied and "tok_emb.weight" in copied
    assert set(other.state_dict()) - set(copied) == {"pos_emb.weight"}


# -- distillation runs ---------------------------------------------------------------------------------------


def test_staged_kd_run_logs_ce_kd_and_weight_and_keeps_the_teacher_frozen(teacher, tmp_path):
    trainer = distill(teacher, tmp_path / "mos", steps=6, kd_stop_step=4, eval_every=3)
    assert trainer.model.config.n_layers == 3 and trainer.layer_map == [0, 1, 3]
    assert len(trainer.initialised) == len(trainer.model.state_dict())
    frozen = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    result = trainer.fit()
    assert result.step == 6 and not trainer.teacher.training
    assert all(torch.equal(frozen[k], v) for k, v in trainer.teacher.state_dict().items())
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    records = records_of(read_metrics(tmp_path / "mos" / "metrics.jsonl"), "train")
    assert [r["kd_weight"] for r in records] == [1.0] * 4 + [0.0] * 2
    assert all(r["kd"] > 0 for r in records[:4]) and [r["kd"] for r in records[4:]] == [None, None]
    assert all(r["loss"] == pytest.approx(r["ce"] + (r["kd"] or 0) + r["aux"], rel=1e-5) for r in records)
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["run_config"]["distill"]["kd_stop_step"] == 4
    assert state["run_config"]["distill"]["teacher"] == str((teacher / "checkpoints" / "step-0000004").resolve())
    assert state["run_config"]["train"]["corpus"].endswith("corpus.txt")  # the teacher's data


def test_distill_resume_reproduces_an_uninterrupted_run_exactly(teacher, tmp_path):
    # Linear decay crosses zero in the second half; dropout and accumulation draw randomness to restore.
    settings = dict(steps=8, grad_accum=2, eval_every=4, save_every=0, kd_schedule="linear_decay", kd_stop_step=6,
                    temperature=2.0, ce_weight=0.5)
    model = {"dropout": 0.1}
    full = distill(teacher, tmp_path / "full", model=model, **settings).fit()
    first = distill(teacher, tmp_path / "split", model=model, **settings).fit(max_steps=4)
    resumed = create_distill_trainer(resolve_distill_run([{"train": {"run_dir": str(tmp_path / "split")}}], "latest"),
                                     progress=False)
    assert resumed.distill == first_distill(tmp_path / "split") and resumed.step == 4
    second = resumed.fit()
    assert {**first.losses, **second.losses} == full.losses  # bit-for-bit
    assert second.evals[8].loss == full.evals[8].loss


def first_distill(run_dir: Path) -> DistillConfig:
    state = json.loads((run_dir / "checkpoints" / "step-0000004" / "state.json").read_text())
    return DistillConfig(**state["run_config"]["distill"])


def test_preset_student_copies_what_matches(teacher, tmp_path):
    model = {"preset": "tiny-moe", **TINY, "n_layers": 2, "num_experts": 2}  # the teacher's block 3 has 8
    trainer = distill(teacher, tmp_path / "preset", model=model, steps=1, eval_every=0)
    assert trainer.model.config.n_layers == 2 and trainer.layer_map == []
    assert "tok_emb.weight" in trainer.initialised and "blocks.1.attn.qkv.weight" in trainer.initialised
    assert not any(name.startswith("blocks.1.ffn.") for name in trainer.initialised)
    assert trainer.fit().step == 1
