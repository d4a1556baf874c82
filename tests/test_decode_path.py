"""The inference fast paths give what the general paths give: the MoE layer's few-assignment mix
(decode steps) against sort/scatter dispatch, RoPE by roll against rotate-half, q and k rotated
together against separately, and an additive engine mask against a bool one."""

import pytest
import torch

from pyramoe.config import MoEConfig
from pyramoe.layers import moe as moe_module
from pyramoe.layers.attention import CausalSelfAttention
from pyramoe.layers.moe import MoELayer
from pyramoe.layers.rope import RotaryEmbedding, apply_rope, rotate_half

CASES = [
    dict(activation="swiglu", bias=False, moe=dict(num_experts=8, top_k=2)),
    dict(activation="gelu", bias=True, moe=dict(num_experts=4, top_k=1)),
    dict(activation="swiglu", bias=False, moe=dict(num_experts=8, top_k=3, gate_norm="softmax")),
    dict(activation="gelu", bias=True, moe=dict(num_experts=4, top_k=1, use_residual=True)),
    dict(activation="swiglu", bias=False, moe=dict(num_experts=8, top_k=2, shared_d_ff=24, shared_gate=True,
                                                  router_score="sigmoid", score_correction_bias=True,
                                                  routed_scaling=2.5)),
]


def _layer(case: dict) -> MoELayer:
    torch.manual_seed(0)
    config = MoEConfig(dropless=True, **case["moe"])
    layer = MoELayer(16, 32, config, case["activation"], case["bias"]).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        if config.score_correction_bias:
            layer.router.score_bias.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_few_assignment_mix_equals_dispatch(case, tokens, monkeypatch):
    layer = _layer(case)
    x = torch.randn(tokens, 16)
    calls = []
    original = MoELayer._mix_few
    monkeypatch.setattr(MoELayer, "_mix_few", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        fast, fast_stats = layer(x)
        assert calls, "the fast path did not run"
        monkeypatch.setattr(moe_module, "FEW_ASSIGNMENTS", 0)
        reference, ref_stats = layer(x)
    assert len(calls) == 1
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast_stats.tokens_per_expert, ref_stats.tokens_per_expert)
    assert float(fast_stats.dropped_fraction) == 0.0


def test_fast_path_only_for_inference():
    layer = _layer(CASES[0])
    x = torch.randn(3, 16, requires_grad=True)
    calls = []
    layer._mix_few = lambda *a: calls.append(1)
    layer(x)  # grad enabled: the general path (training semantics, aux losses)
    layer.train()
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer.config.dropless = False  # capacity: drops are the general path's business
    with torch.no_grad():
        layer(x)
    assert not calls


def test_rope_by_roll_is_rotate_half_bit_for_bit():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 10000.0)
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rope.cos_sin(torch.arange(7)[None], dtype)
        x = torch.randn(1, 3, 7, 16).to(dtype)
        assert torch.equal(apply_rope(x, cos, sin), x * cos + rotate_half(x) * sin)


def test_joint_qk_rope_equals_separate():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, bias=False, n_kv_heads=2)
    cos, sin = RotaryEmbedding(8, 10000.0).cos_sin(torch.arange(5)[None], torch.float32)
    x = torch.randn(1, 5, 32)
    q, k, v = attn._project(x, (cos, sin))
    q_ref, k_ref, v_ref = attn.qkv(x).split(attn.split, dim=-1)
    q_ref = q_ref.view(1, 5, 4, 8).transpose(1, 2)
    k_ref = k_ref.view(1, 5, 2, 8).transpose(1, 2)
    assert torch.equal(q, apply_rope(q_ref, cos, sin))
    assert torch.equal(k, apply_rope(k_ref, cos, sin))
    assert torch.equal(v, v_ref.view(1, 5, 2, 8).transpose(1, 2))


def test_additive_mask_equals_bool_mask():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, bias=False).eval()
    x = torch.randn(2, 1, 32)
    visible = torch.tensor([[True, True, False], [True, True, True]])
    cache_k = torch.randn(2, 4, 3, 8)
    cache_v = torch.randn(2, 4, 3, 8)

    class Cache:
        def update(self, layer, start, k, v):
            keys, values = cache_k[: k.shape[0]].clone(), cache_v[: k.shape[0]].clone()
            keys[:, :, 2:3], values[:, :, 2:3] = k, v
            return keys, values

    additive = torch.zeros(2, 3).masked_fill_(~visible, float("-inf"))[:, None, None, :]
    with torch.no_grad():
        a = attn(x, Cache(), 2, key_mask_BL=visible[:, None, None, :])
        b = attn(x, Cache(), 2, key_mask_BL=additive)  # (batched: through decode_attention)
        one = attn(x[:1], Cache(), 2, key_mask_BL=additive[:1])  # (one row: through SDPA)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[:1], one, rtol=1e-5, atol=1e-6)


# -- weights prepacked for oneDNN -------------------------------------------------------------------------

packing = pytest.importorskip("pyramoe.inference.packing")
needs_packing = pytest.mark.skipif(not packing.packing_available(), reason="oneDNN packing unavailable")
needs_bf16_packing = pytest.mark.skipif(
    not packing.packing_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="no oneDNN bf16 kernels on this CPU")


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_packing)])
def test_packed_linear_equals_linear(dtype):
    from pyramoe.layers.packed import PackedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(dtype)
    x = torch.randn(3, 5, 64).to(dtype)
    with torch.no_grad():
        expected = linear(x)
        got = PackedLinear(linear)(x)
    assert got.shape == expected.shape
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected)
    else:  # another summation order
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_packing
@pytest.mark.parametrize("case", CASES[:2])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_packed_moe_layer_equals_plain(case, tokens):
    layer = _layer(case)
    x = torch.randn(tokens, 16)
    with torch.no_grad():
        expected, _ = layer(x)
        assert packing.pack_model(layer) > 0
        assert layer.experts.w_in is None and layer.experts.packed is not None
        got, _ = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_bf16_packing
def test_engine_packs_at_first_step_and_generates_the_same_tokens():
    from pyramoe.config import ModelConfig
    from pyramoe.inference import Engine, SamplingParams
    from pyramoe.layers.packed import PackedLinear
    from pyramoe.models import GPT
    from pyramoe.presets import get_preset

    torch.manual_seed(0)
    config = ModelConfig.from_dict({**get_preset("tiny-llama-moe").to_dict(), "vocab_size": 97, "max_seq_len": 64})
    model = GPT(config).to(torch.bfloat16)
    twin = GPT(config).to(torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    plain = Engine(twin, max_batch=2, pack_weights=False, native=False).generate(prompts, params)
    engine = Engine(model, max_batch=2, native=False)
    assert engine.packed_weights is None  # not before the first step
    packed = engine.generate(prompts, params)
    assert engine.packed_weights > 0 and isinstance(engine.model.lm_head, PackedLinear)
    assert type(model.lm_head) is torch.nn.Linear  # the engine packed its own view, not the caller's model
    assert [c.token_ids for c in packed] == [c.token_ids for c in plain]
    with pytest.raises(ValueError, match="distribute"):
        engine.distribute(ep=2)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_reference_formula_bit_for_bit(dtype):
    from pyramoe.layers.norms import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(4, 3, 48) * 5).to(dtype)
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(norm(x), expected)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_decode_attention_equals_sdpa(heads, kv_heads):
    from pyramoe.layers.attention import decode_attention

    torch.manual_seed(0)
    batch, length, head_dim = 5, 9, 16
    q = torch.randn(batch, heads, 1, head_dim)
    k, v = torch.randn(batch, kv_heads, length, head_dim), torch.randn(batch, kv_heads, length, head_dim)
    visible = torch.arange(length) <= torch.tensor([8, 3, 0, 5, 8])[:, None]
    mask = torch.zeros(batch, length).masked_fill_(~visible, float("-inf"))[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1), attn_mask=mask)
    got = decode_attention(q, k, v, mask)
    torch.testing.assert_close(got, expected.reshape(batch, heads * head_dim), rtol=1e-5, atol=1e-6)
    bf16 = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16())
    torch.testing.assert_close(bf16.float(), expected.reshape(batch, -1), rtol=0.02, atol=0.02)


def test_batched_decode_runs_decode_attention_and_matches_sdpa(monkeypatch):
    import pyramoe.layers.attention as attention

    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, bias=False, n_kv_heads=2).eval()
    keys, values = torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)

    class Cache:
        def update(self, layer, start, k, v):
            return torch.cat([keys[:, :, :5], k], 2), torch.cat([values[:, :, :5], v], 2)

    visible = torch.arange(6) <= torch.tensor([5, 2, 4])[:, None]
    mask = torch.zeros(3, 6).masked_fill_(~visible, float("-inf"))[:, None, None, :]
    x = torch.randn(3, 1, 32)
    calls = []
    original = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        fast = attn(x, Cache(), 5, key_mask_BL=mask)
        assert calls
        reference = attn(x, Cache(), 5, key_mask_BL=visible[:, None, None, :])  # bool mask: SDPA
    assert len(calls) == 1
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
