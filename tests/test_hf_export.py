"""pyramoe models written as HF checkpoints: transformers loads them with pyramoe's (dropless) logits;
models with a feature no HF MoE architecture has are refused with one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hf_models import build_hf, save_hf
from safetensors import safe_open

from pyramoe.cli.main import main
from pyramoe.config import LayerConfig, ModelConfig, MoEConfig, build_layers
from pyramoe.data import Tokenizer
from pyramoe.hf import load_hf_model
from pyramoe.hf.export import choose_architecture, export_hf
from pyramoe.models import GPT
from pyramoe.presets import get_preset
from pyramoe.train import build_model, load_checkpoint


def llama(layers: list[LayerConfig], **overrides) -> ModelConfig:
    settings = dict(vocab_size=96, max_seq_len=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=40,
                    activation="swiglu", bias=False, tie_embeddings=False, position="rope", rope_theta=5e4,
                    norm="rmsnorm", layer_norm_eps=1e-6, layers=layers)
    settings.update(overrides)
    return ModelConfig(**settings)


def moe(**kwargs) -> LayerConfig:
    return LayerConfig(moe=MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_d_ff": 16, **kwargs}))


# One pyramoe config per HF architecture it exports as.
EXPORTABLE = {
    "mixtral": lambda: llama([moe(), moe()]),
    "qwen2_moe": lambda: llama([LayerConfig(), moe(shared_d_ff=24, shared_gate=True, gate_norm="softmax")],
                               qkv_bias=True, tie_embeddings=True),
    "qwen3_moe": lambda: llama([LayerConfig(), moe()], qk_norm="head", head_dim=16),
    "olmoe": lambda: llama([moe(gate_norm="softmax"), moe(gate_norm="softmax")], n_kv_heads=4, qk_norm="full",
                           qkv_clip=1.0),
    "dots1": lambda: llama([LayerConfig(), moe(num_experts=8, top_k=3, router_score="sigmoid",
                                               score_correction_bias=True, expert_groups=4, topk_groups=2,
                                               routed_scaling=2.0, shared_d_ff=32)], qk_norm="head"),
    "glm4_moe": lambda: llama([LayerConfig(), moe(num_experts=8, router_score="sigmoid", score_correction_bias=True,
                                                  expert_groups=2, topk_groups=1, gate_norm="softmax",
                                                  shared_d_ff=16)], qkv_bias=True, rope_fraction=0.5),
    "deepseek_v3": lambda: llama([LayerConfig(), moe(num_experts=8, router_score="sigmoid", score_correction_bias=True,
                                                     expert_groups=4, topk_groups=2, routed_scaling=2.5,
                                                     shared_d_ff=16)],
                                 n_kv_heads=None, attention="latent", mla_q_rank=12, mla_kv_rank=16, mla_rope_dim=8,
                                 mla_nope_dim=8, mla_v_dim=12, rope_interleave=True,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                                               "original_max_position_embeddings": 16}),
}


def random_model(config: ModelConfig, seed: int = 0) -> GPT:
    """Weights far from their initial values (norm gains, router biases too), dropless MoE layers."""
    for layer in config.layers:
        if layer.moe is not None:
            layer.moe.dropless = True
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.dim() == 1:
                tensor.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(tensor))
            else:
                tensor.normal_(0.0, 0.25)
    return model


def assert_transformers_matches(model: GPT, directory: Path) -> None:
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    idx_BT = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx_BT).logits, model(idx_BT).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(EXPORTABLE))
def test_exported_model_loads_in_transformers_with_the_same_logits(arch, tmp_path):
    model = random_model(EXPORTABLE[arch]())
    assert export_hf(model, tmp_path / arch).model_type == arch
    config = json.loads((tmp_path / arch / "config.json").read_text())
    assert config["model_type"] == arch and not (tmp_path / arch / "tokenizer.json").exists()
    assert_transformers_matches(model, tmp_path / arch)
    # ... and pyramoe reads its own export back.
    again = load_hf_model(tmp_path / arch).model
    idx_BT = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(again(idx_BT).logits, model(idx_BT).logits, atol=1e-5, rtol=1e-5)


def test_hf_checkpoint_round_trips_through_pyramoe(tmp_path):
    hf_model = build_hf("dots1")
    ours = load_hf_model(save_hf(hf_model, tmp_path / "in")).model
    export_hf(ours, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in hf_model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize(
    "config, fragment",
    [
        (lambda: get_preset("tiny-moe"), "learned position embeddings"),
        (lambda: llama([moe(), moe()], norm="layernorm"), "LayerNorm"),
        (lambda: llama([moe(), moe()], activation="gelu"), "GELU feed-forward"),
        (lambda: llama([moe(), moe()], bias=True), "biases"),
        (lambda: llama([moe(use_residual=True), moe(use_residual=True)]), "Residual-MoE"),
        (lambda: llama(build_layers(4, "every_other", [4, 8], top_k=2)), "different num_experts"),
        (lambda: llama([LayerConfig(), LayerConfig()]), "a model without MoE layers"),
        (lambda: llama([LayerConfig(), moe()]), "dense layers between MoE layers"),
        (lambda: llama([moe(gate_norm="softmax"), moe(gate_norm="softmax")]), "unnormalised top-k weights"),
        (lambda: llama([moe(shared_d_ff=16), moe(shared_d_ff=16)]), "an ungated shared expert"),
        (lambda: llama([moe(), moe()], rope_fraction=0.5), "partial RoPE"),
    ],
)
def test_features_without_hf_counterpart_are_named(config, fragment, tmp_path):
    model = GPT(config())
    with pytest.raises(ValueError, match="has no Hugging Face MoE counterpart") as info:
        export_hf(model, tmp_path / "out")
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_tiny_llama_moe_is_qwen3_moe():
    assert choose_architecture(get_preset("tiny-llama-moe")).hf_class == "Qwen3MoeForCausalLM"


def safetensors_dtypes(directory: Path) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def assert_bf16_matches(model: GPT, directory: Path) -> None:
    """transformers loads the bf16 export as bf16 (dtype="auto"), with logits close to pyramoe's in bf16."""
    config = json.loads((directory / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert safetensors_dtypes(directory) == {"BF16"}
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()
    assert {p.dtype for p in hf_model.parameters()} == {torch.bfloat16}
    ours = model.to(torch.bfloat16)
    idx_BT = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs_BTV, ours_BTV = hf_model(idx_BT).logits.float(), ours(idx_BT).logits.float()
    scale = ours_BTV.abs().max().item()
    torch.testing.assert_close(theirs_BTV, ours_BTV, atol=0.015 * scale, rtol=0.01)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_bf16_export_is_bf16_and_loads_in_transformers_with_pyramoe_bf16_logits(arch, tmp_path):
    model = random_model(EXPORTABLE[arch]())
    export_hf(model, tmp_path / "fp32")
    assert safetensors_dtypes(tmp_path / "fp32") == {"F32"}
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    export_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("fp32", "bf16")}
    assert size["bf16"] < 0.55 * size["fp32"]
    assert_bf16_matches(model, tmp_path / "bf16")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        export_hf(model, tmp_path / "fp16", dtype=torch.float16)


def train_tiny(tmp_path: Path, preset: str, *settings: str) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i % 11}\n\n" for i in range(200)))
    argv = ["train", "--preset", preset, "--corpus", str(corpus), "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--set", "train.vocab_size=300", "--set", "train.val_percent=10",
            "--set", "train.eval_every=2", "--set", "train.eval_batches=1", "--set", "model.d_model=32",
            *[arg for setting in settings for arg in ("--set", setting)],
            "--run-dir", str(tmp_path / preset), "--quiet"]
    assert main(argv) == 0
    return tmp_path / preset


@pytest.mark.usefixtures("tiny_run_env")
def test_cli_exports_a_trained_run_with_its_tokenizer(tmp_path, capsys):
    run_dir = train_tiny(tmp_path, "tiny-llama-moe")
    capsys.readouterr()
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    assert "Qwen3MoeForCausalLM" in capsys.readouterr().out
    ours = build_model(load_checkpoint(run_dir), dropless=True)
    assert_transformers_matches(ours, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokenizer = Tokenizer.from_file(run_dir / "tokenizer.json")
    text = "def f7(x):\n    return x + 3\n"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.eos_token == tokenizer.eos_token
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_id and config["mlp_only_layers"] == [0]

    # A second export into the now non-empty directory is refused.
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


@pytest.mark.usefixtures("tiny_run_env")
def test_cli_dtype_defaults_to_fp32_and_auto_follows_the_training_precision(tmp_path, capsys):
    run_dir = train_tiny(tmp_path, "tiny-llama-moe", "train.precision=bf16")
    assert main(["export", str(run_dir), str(tmp_path / "default")]) == 0
    assert safetensors_dtypes(tmp_path / "default") == {"F32"}
    assert main(["export", str(run_dir), str(tmp_path / "auto"), "--dtype", "auto"]) == 0
    assert "bfloat16" in capsys.readouterr().out.splitlines()[-1]
    assert_bf16_matches(build_model(load_checkpoint(run_dir), dropless=True), tmp_path / "auto")
    assert main(["export", str(run_dir), str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    assert safetensors_dtypes(tmp_path / "fp32") == {"F32"}


@pytest.mark.usefixtures("tiny_run_env")
def test_cli_refuses_the_gpt2_block_in_one_line(tmp_path, capsys):
    run_dir = train_tiny(tmp_path, "tiny-moe")
    capsys.readouterr()
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "learned position embeddings" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


def test_export_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    usage = "usage: pyramoe export [-h] [--dtype {fp32,bf16,auto}] RUN_OR_CKPT OUT_DIR"
    assert info.value.code == 0 and usage in capsys.readouterr().out
