"""The Llama-family block: RoPE, RMSNorm, grouped-query attention, q/k norm, shared experts,
sigmoid / bias-corrected / group-limited routing, padded batches, and the tiny-llama-moe preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pyramoe.cli.main import main
from pyramoe.config import LayerConfig, ModelConfig, MoEConfig, build_layers
from pyramoe.layers import CausalSelfAttention, MoELayer, RMSNorm, Router
from pyramoe.layers.rope import RotaryEmbedding, apply_rope
from pyramoe.models import GPT
from pyramoe.presets import get_preset


def llama_config(**overrides) -> ModelConfig:
    settings = dict(
        vocab_size=64, max_seq_len=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, activation="swiglu",
        bias=False, tie_embeddings=False, position="rope", norm="rmsnorm", qk_norm="head",
        layers=[LayerConfig(), LayerConfig(moe=MoEConfig(num_experts=4, top_k=2, dropless=True, expert_d_ff=16,
                                                         shared_d_ff=24, shared_gate=True))],
    )
    settings.update(overrides)
    return ModelConfig(**settings)


# DeepSeek-style multi-head latent attention instead of grouped-query attention.
LATENT = dict(attention="latent", n_kv_heads=None, qk_norm="off", mla_q_rank=12, mla_kv_rank=16, mla_rope_dim=8,
              mla_nope_dim=8, mla_v_dim=12, rope_interleave=True)


def test_default_config_is_the_gpt2_block():
    model = GPT(ModelConfig(vocab_size=64, max_seq_len=16, d_model=32, n_heads=4))
    assert isinstance(model.ln_f, torch.nn.LayerNorm) and model.rope is None and hasattr(model, "pos_emb")
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.blocks[0].attn.qkv.weight.shape == (96, 32) and model.blocks[0].attn.qkv.bias is not None


def test_llama_block_modules():
    model = GPT(llama_config())
    assert not hasattr(model, "pos_emb") and isinstance(model.ln_f, RMSNorm)
    assert model.lm_head.weight is not model.tok_emb.weight
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == ((4 + 2 + 2) * 8, 32) and attn.qkv.bias is None and attn.proj.bias is None
    assert attn.q_norm.weight.shape == (8,)
    moe = model.blocks[1].ffn
    assert moe.shared_expert.fc_in.weight.shape == (48, 32) and moe.shared_expert_gate.weight.shape == (1, 32)
    assert model.new_kv_cache(2, 10).keys[0].shape == (2, 2, 10, 8)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"position": "alibi"}, "position"),
        ({"norm": "batchnorm"}, "norm"),
        ({"qk_norm": "yes"}, "qk_norm"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"head_dim": 7}, "head_dim"),
        ({"qkv_clip": -1.0}, "qkv_clip"),
        ({"rope_fraction": 0.0}, "rope_fraction"),
        ({"rope_fraction": 0.125}, "rope_fraction"),  # 1 of 8 head dimensions: rotation needs pairs
        ({"attention": "sparse"}, "attention"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling.original_max_position_embeddings"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "beta": 1}},
         "rope_scaling.beta"),
        ({"rope_interleave": True}, "rope_interleave"),
        ({**LATENT, "mla_kv_rank": 0}, "mla_kv_rank"),
        ({**LATENT, "mla_rope_dim": 7}, "mla_rope_dim"),
        ({**LATENT, "qk_norm": "head"}, "attention"),
    ],
)
def test_model_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        llama_config(**overrides)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"router_score": "tanh"}, "router_score"),
        ({"expert_groups": 3}, "expert_groups"),
        ({"expert_groups": 2, "topk_groups": 3}, "topk_groups"),
        ({"expert_groups": 4, "topk_groups": 1, "num_experts": 8, "top_k": 3}, "topk_groups"),
        ({"routed_scaling": 0.0}, "routed_scaling"),
        ({"shared_gate": True}, "shared_gate"),
        ({"shared_d_ff": -1}, "shared_d_ff"),
        ({"router_score": "sigmoid", "noisy_gate_policy": "gumbel"}, "noisy_gate_policy"),
    ],
)
def test_moe_config_errors_name_the_field(kwargs, field):
    settings = {"num_experts": 8, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"^moe\.{field}: "):
        MoEConfig(**settings).validate()


def test_config_roundtrip_keeps_llama_fields():
    config = llama_config(qkv_clip=3.0, head_dim=16)
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.layers[1].moe.shared_gate


def test_rmsnorm_matches_definition():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pos_q: int, pos_k: int) -> torch.Tensor:
        rq = apply_rope(q, *rope.cos_sin(torch.tensor([[pos_q]]), q.dtype))
        rk = apply_rope(k, *rope.cos_sin(torch.tensor([[pos_k]]), k.dtype))
        return (rq * rk).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_partial_rope_rotates_only_the_first_dimensions():
    model = GPT(llama_config(rope_fraction=0.5))
    assert model.rope.inv_freq.numel() == 2  # 4 of 8 head dimensions, in pairs
    x = torch.randn(1, 2, 3, 8)
    out = apply_rope(x, *model.rope.cos_sin(torch.tensor([[0, 5, 9]]), x.dtype))
    torch.testing.assert_close(out[..., 4:], x[..., 4:], atol=0, rtol=0)
    assert not torch.allclose(out[..., 1:, :4], x[..., 1:, :4])


def test_latent_cache_holds_the_compressed_latent():
    model = GPT(llama_config(**LATENT))
    cache = model.new_kv_cache(2, 10)
    assert cache.keys[0].shape == (2, 1, 10, 16) and cache.values[0].shape == (2, 1, 10, 8)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = CausalSelfAttention(32, 4, bias=False, n_kv_heads=2)
    mha = CausalSelfAttention(32, 4, bias=False)
    q_w, k_w, v_w = gqa.qkv.weight.split((32, 16, 16))
    repeat = lambda w: w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q_w, repeat(k_w), repeat(v_w)]))
        mha.proj.weight.copy_(gqa.proj.weight)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(gqa(x), mha(x))


@pytest.mark.parametrize("overrides", [{}, LATENT], ids=["gqa", "latent"])
def test_llama_kv_cache_decoding_matches_full_forward(overrides):
    torch.manual_seed(0)
    model = GPT(llama_config(**overrides)).eval()
    idx = torch.randint(0, 64, (2, 12))
    full = model(idx).logits
    cache = model.new_kv_cache(2, 12)
    steps = [model(idx[:, :7], kv_cache=cache).logits]
    steps += [model(idx[:, t : t + 1], kv_cache=cache, start_pos=t).logits for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{"position": "rope"}, {"position": "learned"}, LATENT],
                         ids=["rope", "learned", "latent"])
def test_left_padded_row_matches_the_unpadded_sequence(overrides):
    torch.manual_seed(0)
    model = GPT(llama_config(**overrides)).eval()
    short, long = torch.randint(1, 64, (1, 5)), torch.randint(1, 64, (1, 8))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], dtype=torch.bool)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = model.new_kv_cache(2, 9)
    out = model(batch, kv_cache=cache, key_mask_BL=mask, positions_BT=positions).logits
    torch.testing.assert_close(out[0, 3:], model(short).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(long).logits[0], atol=1e-5, rtol=1e-5)
    # One decode step for both rows, each at its own position.
    nxt = torch.tensor([[7], [9]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    step = model(nxt, kv_cache=cache, start_pos=8, key_mask_BL=mask, positions_BT=positions[:, -1:] + 1).logits
    torch.testing.assert_close(step[0, 0], model(torch.cat([short, nxt[:1]], 1)).logits[0, -1], atol=1e-5, rtol=1e-5)


def test_full_qk_norm_and_clip_apply():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, bias=False, qk_norm="full", qkv_clip=0.05)
    assert attn.q_norm.weight.shape == (32,) and attn.k_norm.weight.shape == (32,)
    x = torch.randn(1, 4, 32) * 10
    q, k, v = attn._project(x)
    assert q.abs().max() <= 0.05 and v.abs().max() <= 0.05


def test_sigmoid_router_with_bias_and_groups_chooses_by_biased_score_weights_by_raw_score():
    config = MoEConfig(num_experts=4, top_k=2, dropless=True, router_score="sigmoid", score_correction_bias=True,
                       expert_groups=2, topk_groups=1, routed_scaling=2.5, gate_norm="softmax")
    router = Router(2, config)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 1.0], [0.0, 0.9]]))
        router.score_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    x = torch.tensor([[2.0, 1.9]])  # expert 0 is best alone, but group {2, 3} sums higher
    routing = router(x)
    assert sorted(routing.expert_idx_TK[0].tolist()) == [2, 3]
    with torch.no_grad():
        router.score_bias.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))  # lifts group {0, 1}
    routing = router(x)
    assert sorted(routing.expert_idx_TK[0].tolist()) == [0, 1]
    raw = torch.sigmoid(x @ router.weight.t())[0, routing.expert_idx_TK[0]]
    torch.testing.assert_close(routing.weights_TK[0], raw)  # the bias never weights
    assert routing.scale == 2.5


@pytest.mark.parametrize("gate_norm, normalised", [("after_drop", True), ("softmax", False)])
def test_sigmoid_scores_compose_with_gate_norm_and_scaling(gate_norm, normalised):
    torch.manual_seed(0)
    config = MoEConfig(num_experts=4, top_k=2, dropless=True, router_score="sigmoid", gate_norm=gate_norm,
                       routed_scaling=2.0)
    layer = MoELayer(8, 16, config, activation="swiglu", bias=False)
    x_TD = torch.randn(5, 8)
    scores_TE = torch.sigmoid(x_TD @ layer.router.weight.t())
    top_TK, idx_TK = scores_TE.topk(2, dim=-1)
    if normalised:
        top_TK = top_TK / top_TK.sum(-1, keepdim=True)
    expected = torch.zeros_like(x_TD)
    for t in range(5):
        for w, e in zip(top_TK[t] * 2.0, idx_TK[t]):
            gate, up = (x_TD[t] @ layer.experts.w_in[e].t()).chunk(2)
            expected[t] += w * ((F.silu(gate) * up) @ layer.experts.w_out[e].t())
    torch.testing.assert_close(layer(x_TD)[0], expected, atol=1e-6, rtol=1e-5)


def test_gated_shared_expert_adds_to_routed_output():
    torch.manual_seed(0)
    config = MoEConfig(num_experts=4, top_k=2, dropless=True, shared_d_ff=12, shared_gate=True)
    layer = MoELayer(8, 16, config, activation="swiglu", bias=False)
    x_TD = torch.randn(5, 8)
    with_shared = layer(x_TD)[0]
    shared, gate = layer.shared_expert, layer.shared_expert_gate
    layer.shared_expert = None
    routed = layer(x_TD)[0]
    torch.testing.assert_close(with_shared, routed + torch.sigmoid(gate(x_TD)) * shared(x_TD))


SIGMOID_ROUTING = dict(router_score="sigmoid", score_correction_bias=True, expert_groups=2, topk_groups=1,
                       routed_scaling=2.0, shared_d_ff=8)


@pytest.mark.parametrize(
    "overrides, routing",
    [({}, dict(shared_d_ff=8, shared_gate=True)), (LATENT, SIGMOID_ROUTING)],
    ids=["gqa-gated-shared", "latent-deepseek-routing"],
)
def test_every_llama_parameter_gets_a_gradient(overrides, routing):
    torch.manual_seed(0)
    model = GPT(llama_config(layers=build_layers(2, [1], 4, top_k=2, **routing), **overrides))
    out = model(torch.randint(0, 64, (2, 8)))
    (out.logits.sum() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_tiny_llama_moe_preset_shape():
    config = get_preset("tiny-llama-moe")
    assert (config.position, config.norm, config.qk_norm, config.n_kv_heads) == ("rope", "rmsnorm", "head", 2)
    assert not config.bias and not config.tie_embeddings and config.moe_layer_ids == [1, 2, 3]


@pytest.mark.usefixtures("tiny_run_env")
def test_tiny_llama_moe_trains_and_loss_falls(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i % 11}\n\n" for i in range(300)))
    argv = [
        "train", "--preset", "tiny-llama-moe", "--corpus", str(corpus), "--steps", "30", "--batch-size", "4",
        "--seq-len", "32", "--lr", "3e-3", "--set", "train.vocab_size=300", "--set", "train.val_percent=10",
        "--set", "train.eval_every=30", "--set", "train.eval_batches=1", "--set", "train.warmup=3",
        "--set", "model.d_model=64", "--quiet",
    ]
    assert main(argv) == 0
    records = [json.loads(line) for line in Path("runs/tiny-llama-moe/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind", r.get("type")) == "train"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert main(["generate", "runs/tiny-llama-moe", "--prompt", "def f1", "--max-new-tokens", "5"]) == 0
