"""The lm-eval model "pyramoe" and `pyramoe eval --tasks` on a tiny run, checked against log-likelihoods
computed directly with the model (forward + log_softmax, one sequence at a time)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import lm_eval.api.registry
import lm_eval.utils
import pytest
import torch
import torch.nn.functional as F
from live_server import train_tiny_run
from lm_eval.api.instance import Instance

from pyramoe.cli.main import main
from pyramoe.evaluation.lm import PyramoeLM
from pyramoe.evaluation.lm_eval_cli import lm_eval_argv
from pyramoe.evaluation.scoring import Scorer
from pyramoe.evaluation.taskdata import read_task
from pyramoe.runtime import cpu_has_native_bf16

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DISABLE_MULTIPROC": "1"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 6-step tiny-moe run (MoE in block 1); caches and tasks in a module-wide PYRAMOE_CACHE."""
    return train_tiny_run(tmp_path_factory.mktemp("evalrun"))


@pytest.fixture
def env(run_dir, monkeypatch):
    monkeypatch.setenv("PYRAMOE_CACHE", str(run_dir.parent / "cache"))
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield run_dir
    torch.set_num_threads(threads)


@pytest.fixture
def lm(env) -> PyramoeLM:
    return PyramoeLM(checkpoint=str(env), batch_size=3)


def direct_logprob(lm: PyramoeLM, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) from unpadded forwards of the last max_length + 1 tokens, one per
    max_length continuation tokens (a longer continuation is scored in windows)."""
    model, n = lm.scorer.model, lm.max_length
    total, greedy = 0.0, True
    for a in range(0, len(continuation_ids), n):
        target_ids = continuation_ids[a : a + n]
        whole = (context_ids + continuation_ids[: a + len(target_ids)])[-(n + 1) :]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), dim=-1)
        rows = logp[-len(target_ids) :]
        target = torch.tensor(target_ids)
        total += float(rows.gather(-1, target[:, None]).sum())
        greedy = greedy and bool((rows.argmax(-1) == target).all())
    return total, greedy


def split_pair(lm: PyramoeLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's convention: trailing context whitespace moves to the continuation; the continuation's
    ids are those of the whole string after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = lm.tok_encode(context)
    return ctx, lm.tok_encode(context + continuation)[len(ctx) :]


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_registered_in_the_harness_registry():
    assert lm_eval.api.registry.get_model("pyramoe") is PyramoeLM


def test_loglikelihood_equals_direct_forward(lm):
    long_context = "".join(f"def f{i}(x):\n    return x + {i % 11}\n\n" for i in range(40))  # > max_seq_len
    pairs = [("def f1(x):\n    return", " x + 1"), ("def f2", "(x):"), ("x", " + 3\n"),
             (long_context, "def f40(x):\n"), ("def f3(x):\n    ", "return x + 3")]
    got = lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    assert len(lm.tok_encode(long_context)) > lm.max_length
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        want_logp, want_greedy = direct_logprob(lm, *split_pair(lm, context, continuation))
        assert logp == pytest.approx(want_logp, abs=1e-4)
        assert greedy == want_greedy


def test_loglikelihood_rolling_equals_the_harness_windows(lm):
    texts = ["def f5(x):\n    return x + 5\n", "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(50))]
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    for text, total in zip(texts, got):
        windows = lm_eval.utils.get_rolling_token_windows(
            token_list=lm.tok_encode(text), prefix_token=lm.eot_token_id, max_seq_len=lm.max_length, context_len=1)
        want = sum(direct_logprob(lm, *lm_eval.utils.make_disjoint_window(w))[0] for w in windows)
        assert total == pytest.approx(want, abs=1e-3)
    assert len(lm.tok_encode(texts[1])) > lm.max_length  # several windows


def test_generate_until_equals_greedy_decoding_one_prompt_at_a_time(lm):
    prompts = ["def f1(x):\n", "def f12(x):\n    return", "def"]
    args = [(p, {"until": ["\n\n"], "max_gen_toks": 12}) for p in prompts]
    got = lm.generate_until(instances("generate_until", args), disable_tqdm=True)
    for prompt, text in zip(prompts, got):
        ids = lm.tok_encode(prompt)
        new: list[int] = []
        with torch.no_grad():  # no cache, no padding: the whole sequence again for every token
            for _ in range(12):
                token = int(lm.scorer.model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == lm.eot_token_id:
                    break
                new.append(token)
        want = lm.tok_decode(new).split("\n\n")[0]
        assert text == want


def test_sampling_is_refused(lm):
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(instances("generate_until", [("def", {"until": ["\n"], "do_sample": True,
                                                               "temperature": 1.0})]))


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="no native bf16 on this CPU")
def test_bf16_autocast_is_close_to_fp32_but_not_identical(lm):
    bf16 = Scorer(lm.scorer.model, lm.scorer.pad_id, 4, torch.bfloat16)
    pairs = [split_pair(lm, "def f1(x):\n    return", " x + 1"), split_pair(lm, "def f2(x):", "\n    return x")]
    fp32 = lm.scorer.loglikelihood(pairs)
    low = bf16.loglikelihood(pairs)
    assert [a for a, _ in low] == pytest.approx([a for a, _ in fp32], abs=0.5)
    assert [a for a, _ in low] != [a for a, _ in fp32]


def test_model_args_errors(env):
    with pytest.raises(ValueError, match="checkpoint=RUN_OR_CKPT"):
        PyramoeLM()
    with pytest.raises(ValueError, match="dtype"):
        PyramoeLM(checkpoint=str(env), dtype="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        PyramoeLM(checkpoint=str(env), batch_size="many")
    with pytest.raises(ValueError, match="unknown argument 'pretrained'"):
        PyramoeLM(checkpoint=str(env), pretrained="gpt2")


def direct_choice_scores(lm: PyramoeLM, record: dict) -> list[float]:
    return [direct_logprob(lm, *split_pair(lm, record["context"], choice))[0] for choice in record["choices"]]


def test_eval_tasks_accuracy_equals_argmax_of_direct_loglikelihoods(lm, env, capsys):
    metrics = env / "metrics.jsonl"
    before = metrics.read_text().count("\n")
    limit = 6
    assert main(["eval", str(env), "--tasks", "pyramoe_stdlib_nextline,pyramoe_stdlib_docsig,pyramoe_stdlib_cloze",
                 "--limit", str(limit), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["type"] == "zeroshot" and record["step"] == 6
    for task in ("pyramoe_stdlib_nextline", "pyramoe_stdlib_docsig"):
        docs = read_task(task)[:limit]
        hits = [int(torch.tensor(direct_choice_scores(lm, doc)).argmax()) == doc["label"] for doc in docs]
        assert record["tasks"][task]["acc"] == pytest.approx(sum(hits) / limit)
        assert record["tasks"][task]["chance"] == 0.25 and record["tasks"][task]["n"] == limit
    cloze = read_task("pyramoe_stdlib_cloze")[:limit]
    greedy = [direct_logprob(lm, *split_pair(lm, d["context"], d["target"]))[1] for d in cloze]
    assert record["tasks"]["pyramoe_stdlib_cloze"]["acc"] == pytest.approx(sum(greedy) / limit)
    lines = metrics.read_text().splitlines()
    assert len(lines) == before + 1 and json.loads(lines[-1]) == record


def test_eval_tasks_prints_a_table_with_chance_and_skips_metrics_outside_a_run(env, tmp_path, capsys):
    loose = tmp_path / "ckpt"
    shutil.copytree(env / "checkpoints" / "step-0000006", loose)
    before = (env / "metrics.jsonl").read_text()
    assert main(["eval", str(loose), "--tasks", "pyramoe_stdlib_docsig,pyramoe_stdlib_ppl", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "chance" in out.splitlines()[1] and "0.2500" in out and "bits_per_byte" in out
    assert (env / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--tasks", "pyramoe_stdlib_nope"], "--tasks: unknown task 'pyramoe_stdlib_nope'"),
        (["--tasks", "pyramoe_stdlib_cloze", "--limit", "0"], "--limit: must be >= 1"),
        (["--tasks", "pyramoe_stdlib_cloze", "--dtype", "fp8"], "dtype: must be"),
        (["--tasks", ","], "--tasks: give one or more"),
    ],
)
def test_eval_tasks_errors_are_one_line(env, capsys, argv, fragment):
    assert main(["eval", str(env), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and fragment in err, err


def test_eval_without_checkpoint_is_one_line(capsys):
    assert main(["eval"]) == 2
    assert "CKPT" in capsys.readouterr().err


def test_lm_eval_cli_adds_the_local_tasks_and_runs(env, capsys, monkeypatch):
    import lm_eval.tasks

    from pyramoe.evaluation.lm_eval_cli import main as cli_main

    # Indexing the harness's thousands of own task configs takes seconds; the local ones suffice here.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))
    assert lm_eval_argv(["--include_path", "x"]) == ["--include_path", "x"]
    argv = ["--model", "pyramoe", "--model_args", f"checkpoint={env}", "--tasks", "pyramoe_stdlib_docsig",
            "--limit", "2", "--device", "cpu"]
    assert lm_eval_argv(argv)[-2] == "--include_path"
    cli_main(argv)
    out = capsys.readouterr().out
    assert "pyramoe_stdlib_docsig" in out and "acc" in out


def test_hugging_face_directory_loads_through_the_same_class(env, tmp_path):
    from pyramoe.config import LayerConfig, ModelConfig, MoEConfig
    from pyramoe.hf.export import export_hf
    from pyramoe.models import GPT

    tokenizer_json = env / "checkpoints" / "step-0000006" / "tokenizer.json"
    moe = LayerConfig(moe=MoEConfig(num_experts=4, top_k=2, expert_d_ff=16, dropless=True))
    config = ModelConfig(vocab_size=300, max_seq_len=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=40,
                         activation="swiglu", bias=False, tie_embeddings=False, position="rope", norm="rmsnorm",
                         layers=[moe, moe])
    model = GPT(config).eval()
    export_hf(model, tmp_path / "hf", tokenizer_json, "<|endoftext|>")
    hf_lm = PyramoeLM(checkpoint=str(tmp_path / "hf"), batch_size=2)
    assert hf_lm.source.step is None and hf_lm.eot_token_id == hf_lm.pyramoe_tokenizer.eos_id
    pairs = [("def f1(x):\n    return", " x + 1"), ("def f2", "(x):\n")]
    got = hf_lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (logp, _) in zip(pairs, got):
        ctx, cont = split_pair(hf_lm, context, continuation)
        with torch.no_grad():
            logits = model(torch.tensor([(ctx + cont)[:-1]])).logits[0, -len(cont):]
        want = F.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum()
        assert logp == pytest.approx(float(want), abs=1e-4)


def test_warns_when_a_stdlib_run_trained_on_task_files(env, tmp_path, capsys):
    loose = tmp_path / "ckpt"
    shutil.copytree(env / "checkpoints" / "step-0000006", loose)
    state = json.loads((loose / "state.json").read_text())
    state["run_config"]["train"].update(corpus="stdlib", val_percent=1.0)
    (loose / "state.json").write_text(json.dumps(state))
    assert main(["eval", str(loose), "--tasks", "pyramoe_stdlib_docsig", "--limit", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "val_percent=1 < 2" in err
    state["run_config"]["train"].update(val_percent=2.0)
    (loose / "state.json").write_text(json.dumps(state))
    assert main(["eval", str(loose), "--tasks", "pyramoe_stdlib_docsig", "--limit", "2"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_in_process_accuracy_equals_the_harness(env, tmp_path, capsys):
    """pyramoe.evaluation.accuracy (what `pyramoe experiments` stores) gives the harness's acc numbers."""
    from pyramoe.evaluation.accuracy import ACCURACY_TASKS, checkpoint_accuracy

    loose = tmp_path / "ckpt"  # outside the run: no metrics record
    shutil.copytree(env / "checkpoints" / "step-0000006", loose)
    limit = 8
    assert main(["eval", str(loose), "--tasks", ",".join(ACCURACY_TASKS), "--limit", str(limit), "--json"]) == 0
    harness = json.loads(capsys.readouterr().out)["tasks"]
    direct = checkpoint_accuracy(loose, limit=limit, batch_size=3)
    for task in ACCURACY_TASKS:
        outcomes = direct[task].pop("outcomes")
        assert len(outcomes) == limit and outcomes.count("1") / limit == pytest.approx(direct[task]["acc"])
        assert direct[task] == {"acc": pytest.approx(harness[task]["acc"]), "n": limit,
                                "chance": harness[task]["chance"], "baseline": harness[task]["baseline"]}


def test_requests_are_scored_in_the_trained_length_by_default(env, capsys):
    lm = PyramoeLM(checkpoint=str(env), batch_size=2)
    assert lm.source.trained_len == 32 < lm.scorer.model.config.max_seq_len and lm.max_length == 32
    assert PyramoeLM(checkpoint=str(env), max_length="48").max_length == 48
    assert main(["eval", str(env), "--tasks", "pyramoe_stdlib_docsig", "--limit", "2", "--seq-len", "48",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_length"] == 48
    assert main(["eval", str(env), "--tasks", "pyramoe_stdlib_docsig", "--seq-len", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--seq-len: must be between 2 and the model's max_seq_len" in err


def test_generate_until_keeps_the_prompt_and_shortens_a_budget_that_does_not_fit(lm):
    prompts = ["def f1(x):\n", "def f12(x):\n    return", "x = 1\ny = 2\n" * 4]
    args = [(p, {"until": ["@@@"], "max_gen_toks": 256}) for p in prompts]
    got = lm.generate_until(instances("generate_until", args), disable_tqdm=True)
    assert lm.scorer.shortened_generations == len(prompts)
    for prompt, text in zip(prompts, got):
        ids = lm.tok_encode(prompt)[-(lm.max_length - 1) :]  # only a prompt that does not fit loses its start
        new: list[int] = []
        with torch.no_grad():
            while len(ids) + len(new) < lm.max_length:  # new tokens while they fit after the prompt
                token = int(lm.scorer.model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == lm.eot_token_id:
                    break
                new.append(token)
        assert text == lm.tok_decode(new)


def test_table_and_json_carry_trivial_baselines_and_dedup(env, capsys):
    assert main(["eval", str(env), "--tasks", "pyramoe_stdlib_nextline", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out.splitlines()[1] and "dropped as their answer line is in the training split" in out
    assert main(["eval", str(env), "--tasks", "pyramoe_stdlib_nextline", "--limit", "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    from pyramoe.evaluation.baselines import task_baseline

    want = task_baseline(read_task("pyramoe_stdlib_nextline")[:4])["acc"]
    assert record["tasks"]["pyramoe_stdlib_nextline"]["baseline"] == want
    assert record["dedup"]["records_dropped"]["pyramoe_stdlib_nextline"] > 0


def test_standard_task_offline_is_one_line_and_reads_a_local_copy(env, tmp_path, capsys, monkeypatch):
    from pyramoe.evaluation import standard

    for key in standard.OFFLINE:  # as on a machine with no network: the probe decides
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(standard, "hub_reachable", lambda: False)
    assert main(["eval", str(env), "--tasks", "piqa", "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot be downloaded here" in err and "--data-dir" in err
    # a piqa-shaped copy in the Hugging Face layout: DIR/baber/piqa/{train,validation}.jsonl
    rows = [{"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "eat the lid.", "label": 0},
            {"goal": "To cut paper,", "sol1": "use a spoon.", "sol2": "use scissors.", "label": 1},
            {"goal": "To dry hair,", "sol1": "use a towel.", "sol2": "use water.", "label": 0}]
    local = tmp_path / "data" / "baber" / "piqa"
    local.mkdir(parents=True)
    for split in ("train", "validation"):
        (local / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(env), "--tasks", "piqa", "--data-dir", str(tmp_path / "data"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tasks"]["piqa"]["n"] == 3 and 0 <= record["tasks"]["piqa"]["acc"] <= 1
    assert "dedup" not in record
