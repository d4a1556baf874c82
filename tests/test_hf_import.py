"""HF MoE checkpoints load into pyramoe with transformers' logits and greedy generations.

Each architecture: a tiny random model built offline, saved by `save_pretrained` (the per-expert hub
layout), loaded by pyramoe; logits equal in fp32 and greedy tokens identical, for a left-padded
batch of prompts of different lengths too. Also the fused layout transformers 5 keeps in memory,
sharded checkpoints, and the one-line errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import CONFIGS, build_hf, hf_greedy, pyramoe_greedy, save_hf
from safetensors.torch import load_file, save_file

from pyramoe.hf import load_hf_model
from pyramoe.layers import RotaryEmbedding

ARCHS = sorted(CONFIGS)
PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [11, 2], [77, 31, 120, 9]]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_logits(hf_model, ours, idx_BT: torch.Tensor, mask_BT: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        expected = hf_model(input_ids=idx_BT, attention_mask=None if mask_BT is None else mask_BT.long()).logits
        got = ours(idx_BT).logits if mask_BT is None else ours(
            idx_BT, key_mask_BL=mask_BT, positions_BT=(mask_BT.long().cumsum(-1) - 1).clamp_min(0)
        ).logits
    if mask_BT is not None:
        expected, got = expected[mask_BT], got[mask_BT]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_hub_layout_logits_and_greedy_generation_match_transformers(arch, tmp_path):
    hf_model = build_hf(arch)
    directory = save_hf(hf_model, tmp_path / arch)
    assert any(".experts.0." in k for k in load_file(directory / "model.safetensors"))  # per-expert layout
    loaded = load_hf_model(directory)
    assert loaded.architecture.model_type == arch
    ours = loaded.model
    assert all(layer.moe.dropless for layer in ours.config.layers if layer.moe is not None)
    idx_BT = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    assert_same_logits(hf_model, ours, idx_BT)
    # Prompts of different lengths: each alone, and together as a left-padded batch.
    for prompt in PROMPTS:
        assert pyramoe_greedy(ours, [prompt], 8) == hf_greedy(hf_model, [prompt], 8)
    batch = pyramoe_greedy(ours, PROMPTS, 8)
    assert batch == hf_greedy(hf_model, PROMPTS, 8)
    assert batch == [pyramoe_greedy(ours, [p], 8)[0] for p in PROMPTS]


def test_deepseek_v3_without_q_latent_matches_transformers(tmp_path):
    hf_model = build_hf("deepseek_v3", q_lora_rank=None, rope_interleave=False)
    ours = load_hf_model(save_hf(hf_model, tmp_path / "ds")).model
    assert ours.config.mla_q_rank is None and not ours.config.rope_interleave
    assert_same_logits(hf_model, ours, torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(9)))
    assert pyramoe_greedy(ours, PROMPTS, 6) == hf_greedy(hf_model, PROMPTS, 6)


YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1}


@pytest.mark.parametrize(
    "arch, yarn",
    [("deepseek_v3", {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}), ("qwen3_moe", YARN)],
)
def test_yarn_rope_scaling_matches_transformers(arch, yarn, tmp_path):
    """DeepSeek-V3's published config scales RoPE with YaRN (and its softmax by mscale^2); long-context
    Qwen3 configs use YaRN too."""
    hf_model = build_hf(arch, rope_parameters=yarn)
    ours = load_hf_model(save_hf(hf_model, tmp_path / arch)).model
    plain = RotaryEmbedding(ours.rope.head_dim, ours.rope.theta)
    assert ours.config.rope_scaling["factor"] == 4.0 and not torch.equal(ours.rope.inv_freq, plain.inv_freq)
    idx_BT = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(10))  # past the original 16
    assert_same_logits(hf_model, ours, idx_BT)
    assert pyramoe_greedy(ours, PROMPTS, 6) == hf_greedy(hf_model, PROMPTS, 6)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_right_padded_batch_logits_match_transformers(arch, tmp_path):
    hf_model = build_hf(arch)
    ours = load_hf_model(save_hf(hf_model, tmp_path / arch)).model
    idx_BT = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    mask_BT = torch.ones(2, 9, dtype=torch.bool)
    mask_BT[1, 5:] = False
    assert_same_logits(hf_model, ours, idx_BT, mask_BT)


@pytest.mark.parametrize("arch", ["mixtral", "dots1", "glm4_moe"])
def test_fused_expert_layout_loads(arch, tmp_path):
    """transformers 5's in-memory names: experts.gate_up_proj [E, 2F, D] and experts.down_proj."""
    hf_model = build_hf(arch, seed=3)
    directory = tmp_path / arch
    directory.mkdir()
    hf_model.config.to_json_file(directory / "config.json")
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, directory / "model.safetensors")
    ours = load_hf_model(directory).model
    assert_same_logits(hf_model, ours, torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4)))


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = build_hf("qwen3_moe", seed=5)
    directory = save_hf(hf_model, tmp_path / "sharded", max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    assert_same_logits(hf_model, load_hf_model(directory).model, torch.tensor([[1, 2, 3, 4, 5]]))


@pytest.fixture(scope="module")
def saved_qwen3(tmp_path_factory):
    return save_hf(build_hf("qwen3_moe", seed=6), tmp_path_factory.mktemp("hf") / "qwen3")


def copy_dir(src, dst, config_edit=None, drop=None, add=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config.update(config_edit)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    "edit, drop, add, fragment",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, None, None,
         "unsupported architecture model_type='llama'"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}}, None, None,
         "rope_parameters.rope_type='linear' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, None, None,
         "YaRN rope scaling without original_max_position_embeddings"),
        ({"hidden_act": "gelu"}, None, None, "hidden_act='gelu' is not supported"),
        ({"attention_bias": True}, None, None, "attention_bias=true is not supported"),
        ({"num_hidden_layers": None}, None, None, "config.json: missing num_hidden_layers"),
        (None, "model.layers.1.mlp.gate.weight", None, "missing tensor model.layers.1.mlp.gate.weight"),
        (None, "model.layers.1.mlp.experts.7.up_proj.weight", None,
         "missing tensor model.layers.1.mlp.experts.7.up_proj.weight"),
        (None, None, {"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(16, 32)},
         "unexpected tensor model.layers.1.mlp.experts.8.up_proj.weight"),
        ({"num_local_experts": 4}, None, None, "unexpected tensor model.layers.1.mlp.experts.4."),
        ({"moe_intermediate_size": 8}, None, None, "blocks.1.ffn.experts.w_in: checkpoint shape (8, 32, 32)"),
        ({"num_experts_per_tok": 1}, None, None, "num_experts_per_tok=1 with normalised top-k weights"),
    ],
)
def test_errors_are_one_line_naming_what_is_missing(saved_qwen3, tmp_path, edit, drop, add, fragment):
    directory = copy_dir(saved_qwen3, tmp_path / "bad", edit, drop, add)
    with pytest.raises(ValueError) as info:
        load_hf_model(directory)
    message = str(info.value)
    assert "\n" not in message and fragment in message, message


def test_missing_files_are_named(tmp_path, saved_qwen3):
    with pytest.raises(ValueError, match="config.json: missing"):
        load_hf_model(tmp_path)
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((saved_qwen3 / "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="only pytorch_model.bin .pickle. found; pyramoe loads safetensors only"):
        load_hf_model(bin_only)
    (bin_only / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors file"):
        load_hf_model(bin_only)


def test_multi_token_prediction_layers_are_skipped_only_when_declared(tmp_path):
    source = save_hf(build_hf("glm4_moe", seed=8), tmp_path / "glm")
    assert json.loads((source / "config.json").read_text())["num_nextn_predict_layers"] == 1
    mtp = {"model.layers.2.eh_proj.weight": torch.zeros(32, 64)}
    assert load_hf_model(copy_dir(source, tmp_path / "mtp", add=mtp)).model.config.n_layers == 2
    with pytest.raises(ValueError, match="unexpected tensor model.layers.2.eh_proj.weight"):
        load_hf_model(copy_dir(source, tmp_path / "no_mtp", {"num_nextn_predict_layers": 0}, add=mtp))


def test_partial_rotary_factor_is_refused_outside_glm(saved_qwen3, tmp_path):
    edit = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5 is not supported for Qwen3MoeForCausalLM"):
        load_hf_model(copy_dir(saved_qwen3, tmp_path / "bad", edit))


def test_sliding_window_caps_max_seq_len(tmp_path):
    hf_model = build_hf("mixtral")
    hf_model.config.sliding_window = 16
    ours = load_hf_model(save_hf(hf_model, tmp_path / "m")).model
    assert ours.config.max_seq_len == 16
    assert_same_logits(hf_model, ours, torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(7)))
