"""TrainConfig, TOML and --set overrides, model-config building, LR schedule and parameter groups."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyramoe.models import GPT
from pyramoe.train.config import (
    TrainConfig,
    build_model_config,
    load_toml,
    merge,
    parse_override,
    run_config_from_dict,
)
from pyramoe.train.optim import LRPlan, lr_at, make_optimizer, param_groups, resume_plan


def test_defaults_are_valid_and_resolve_tiny_moe():
    run = run_config_from_dict({})
    assert run.preset == "tiny-moe" and run.run_dir == Path("runs/tiny-moe")
    config = build_model_config(run, vocab_size=8192)
    assert config.moe_layer_ids == [1, 3] and config.vocab_size == 8192


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("train.lr=3e-4", {"train": {"lr": 3e-4}}),
        ("train.steps=10", {"train": {"steps": 10}}),
        ("train.corpus=/data/my file.txt", {"train": {"corpus": "/data/my file.txt"}}),
        ("train.max_bytes=null", {"train": {"max_bytes": None}}),
        ("model.moe.capacity_factor=1.5", {"model": {"moe": {"capacity_factor": 1.5}}}),
        ("model.moe_placement=[0, 1]", {"model": {"moe_placement": [0, 1]}}),
    ],
)
def test_parse_override(item, expected):
    assert parse_override(item) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"lrr": 1.0}}, "train.lrr: unknown setting (did you mean train.lr?)"),
        ({"train": {"steps": "many"}}, "train.steps: expected int"),
        ({"train": {"steps": 0}}, "train.steps: must be >= 1"),
        ({"train": {"min_lr": 1.0}}, "train.min_lr"),
        ({"train": {"precision": "fp16"}}, "train.precision"),
        ({"model": {"preset": "huge"}}, "unknown preset 'huge'"),
        ({"model": {"vocab_size": 10}}, "model.vocab_size: cannot be set here"),
        ({"model": {"moe": {"top_kk": 2}}}, "model.moe.top_kk: unknown setting"),
        ({"model": {"n_layers": 0}}, "model.n_layers: expected a positive integer"),
        ({"optim": {}}, "optim: unknown setting"),
    ],
)
def test_bad_settings_name_the_field(data, message):
    with pytest.raises(ValueError, match=None) as info:
        run_config_from_dict(data)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"dropout": 1.5}, "model.dropout"),
        ({"n_heads": 5}, "model.n_heads"),
        ({"moe": {"top_k": 9}}, "model.layers[1].moe.top_k"),
        ({"moe_placement": [7]}, "model.moe_placement"),
    ],
)
def test_invalid_model_overrides_fail_when_built(model, message):
    run = run_config_from_dict({"model": model})
    with pytest.raises(ValueError) as info:
        build_model_config(run, vocab_size=300)
    assert message in str(info.value)


def test_model_overrides_layout_moe_settings_and_loss_coefficients():
    run = run_config_from_dict({
        "train": {"aux_loss_coef": 0.05, "seq_len": 64},
        "model": {"d_model": 32, "n_layers": 2, "max_seq_len": 64, "moe": {"capacity_factor": 2.0}},
    })
    config = build_model_config(run, vocab_size=300)
    assert config.n_layers == 2 and config.moe_layer_ids == [1]  # tiny-moe's every_other placement
    assert config.d_ff == 4 * 32  # follows the new width
    assert config.layers[1].moe.capacity_factor == 2.0 and config.layers[1].moe.num_experts == 8
    assert config.aux_loss_coef == 0.05 and config.vocab_size == 300
    too_long = run_config_from_dict({"train": {"seq_len": 128}, "model": {"max_seq_len": 64}})
    with pytest.raises(ValueError, match="train.seq_len"):
        build_model_config(too_long, vocab_size=300)


def test_toml_file_and_merge_order(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 5\nlr = 1e-3\n[model]\npreset = "tiny-dense"\n[model.moe]\nmin_capacity = 2\n')
    merged = merge(load_toml(path), parse_override("train.lr=5e-4"))
    run = run_config_from_dict(merged)
    assert (run.train.steps, run.train.lr, run.preset) == (5, 5e-4, "tiny-dense")
    assert run.model == {"moe": {"min_capacity": 2}}
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_toml(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="config file not found"):
        load_toml(tmp_path / "missing.toml")


def test_lr_schedule_peaks_once_at_the_end_of_warmup_and_ends_exactly_at_min_lr():
    cfg = TrainConfig(steps=110, warmup=10, lr=1e-3, min_lr=1e-4)
    values = [lr_at(s, cfg) for s in range(110)]
    assert values[0] == pytest.approx(1e-4)
    assert values[9] == 1e-3 and values.count(1e-3) == 1  # the peak: the last warmup step, once
    assert all(a < b for a, b in zip(values[:10], values[1:10]))
    assert all(a > b for a, b in zip(values[9:], values[10:]))  # strictly down from the peak
    assert values[109] == 1e-4 and min(values) == 1e-4  # min_lr exactly, on the last step only
    assert values[59] == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway between steps 9 and 109
    assert lr_at(110, cfg) == 1e-4 and lr_at(500, cfg) == 1e-4
    no_warmup = TrainConfig(steps=5, warmup=0, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, no_warmup) == 1e-3 and lr_at(4, no_warmup) == 1e-4
    only_warmup = TrainConfig(steps=4, warmup=8, lr=1e-3, min_lr=1e-4)
    assert [lr_at(s, only_warmup) for s in range(4)] == pytest.approx([1.25e-4, 2.5e-4, 3.75e-4, 5e-4])


def test_resume_plan_keeps_an_unchanged_schedule_and_never_jumps_up():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    plan = LRPlan.fresh(cfg)
    assert resume_plan(plan, cfg, 50) is plan
    # Extending a finished run: the extension stays at min_lr.
    finished = resume_plan(plan, dataclasses.replace(cfg, steps=150), 100)
    assert [finished.lr_at(s) for s in range(100, 150)] == [1e-4] * 50
    # Extending an unfinished run: a cosine from the current rate down to min_lr on the new last step.
    longer = resume_plan(plan, dataclasses.replace(cfg, steps=200), 50)
    assert longer.lr_at(50) == plan.lr_at(50) and longer.lr_at(199) == 1e-4
    rest = [longer.lr_at(s) for s in range(50, 200)]
    assert all(a > b for a, b in zip(rest, rest[1:]))
    # During warmup the ramp carries on and the cosine is planned over the new length.
    early = resume_plan(plan, dataclasses.replace(cfg, steps=200), 5)
    assert early == LRPlan.fresh(dataclasses.replace(cfg, steps=200)) and early.lr_at(5) == plan.lr_at(5)
    # A lower min_lr after the run: decay from min_lr to the new one; re-planning twice still works.
    lower = resume_plan(finished, dataclasses.replace(cfg, steps=160, min_lr=1e-5), 150)
    assert lower.lr_at(150) == 1e-4 and lower.lr_at(159) == 1e-5
    assert LRPlan.from_dict(lower.to_dict()) == lower
    with pytest.raises(ValueError, match="train.lr: cannot change when resuming after warmup"):
        resume_plan(plan, dataclasses.replace(cfg, lr=2e-3, steps=200), 50)


def test_param_groups_split_experts_and_decay():
    run = run_config_from_dict({"model": {"d_model": 32, "n_layers": 2, "moe": {"use_residual": True}}})
    model = GPT(build_model_config(run, vocab_size=300))
    cfg = TrainConfig(weight_decay=0.1, expert_lr_scale=0.5)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"dense", "dense_no_decay", "expert", "expert_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())  # every parameter once; the tied embedding once
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups["expert"]["params"]} == {"w_in", "w_out"}
    assert all(".experts." in names[id(p)] for p in groups["expert_no_decay"]["params"])
    assert "blocks.1.ffn.router.weight" in {names[id(p)] for p in groups["dense"]["params"]}
    assert "tok_emb.weight" in {names[id(p)] for p in groups["dense"]["params"]}
    assert all(p.dim() == 1 for p in groups["dense_no_decay"]["params"])
    assert groups["dense_no_decay"]["weight_decay"] == 0.0 and groups["expert"]["lr_scale"] == 0.5
    optimizer = make_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 4


def test_importing_one_train_submodule_loads_neither_the_trainer_nor_the_data_stack():
    # torch itself imports tqdm (torch.hub), so measure what pyramoe.train.optim adds to `import torch`.
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import pyramoe.train.optim\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    unwanted = ("tokenizers", "tqdm", "pyramoe.train.distill", "pyramoe.train.trainer", "pyramoe.data")
    assert "pyramoe.train.optim" in out
    assert [m for m in out if m.split(".")[0] in unwanted or m.startswith(unwanted)] == []


def test_the_package_still_exports_its_names_lazily():
    import pyramoe.train as train

    assert train.TrainConfig is TrainConfig and "create_trainer" in dir(train)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        train.nope  # noqa: B018


def test_the_exported_evaluate_is_the_function_even_after_its_submodule_is_imported():
    code = (
        "import pyramoe.train.trainer\n"  # imports the submodule pyramoe.train.evaluate
        "from pyramoe.train import evaluate\n"
        "print(callable(evaluate) and evaluate.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "pyramoe.train.evaluate"
