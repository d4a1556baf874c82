import torch

from pyramoe.config import ModelConfig, build_layers
from pyramoe.models import GPT


def small_config(**moe):
    return ModelConfig(
        vocab_size=97, max_seq_len=32, d_model=32, n_heads=4,
        layers=build_layers(4, "every_other", [2, 4], capacity_factor=2.0, **moe),
    )


def test_forward_shapes_aux_loss_and_stats():
    config = small_config(top_k=2)
    config.aux_loss_coef, config.z_loss_coef = 0.01, 0.003
    model = GPT(config)
    router_inputs = {}
    for i in config.moe_layer_ids:
        model.blocks[i].ffn.router.register_forward_hook(
            lambda mod, args, out, i=i: router_inputs.__setitem__(i, args[0].detach())
        )
    idx = torch.randint(0, 97, (3, 20))
    out = model(idx)
    assert out.logits.shape == (3, 20, 97)
    assert sorted(out.moe_stats) == [1, 3]
    assert out.moe_stats[3].tokens_per_expert.numel() == 4
    # The aux loss from first principles: per MoE block, E * sum_e f_e P_e over all top-2 choices
    # and mean(logsumexp(logits)^2), weighted by the model's coefficients.
    expected = torch.zeros(())
    for i, x_TD in router_inputs.items():
        logits = x_TD @ model.blocks[i].ffn.router.weight.detach().t()
        probs = torch.softmax(logits, -1)
        num_experts = probs.shape[1]
        chosen = probs.topk(2, dim=-1).indices
        fraction = torch.stack([(chosen == e).float().sum() for e in range(num_experts)]) / chosen.numel()
        balance = num_experts * (fraction * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        expected = expected + 0.01 * balance + 0.003 * z
    torch.testing.assert_close(out.aux_loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert out.z_loss.item() > 0


def test_dense_model_has_zero_aux_loss():
    config = ModelConfig(vocab_size=50, max_seq_len=16, d_model=16, n_heads=2, layers=build_layers(2, "none"))
    out = GPT(config)(torch.randint(0, 50, (1, 8)))
    assert out.aux_loss.item() == 0.0 and out.moe_stats == {}


def test_every_parameter_gets_a_gradient():
    model = GPT(small_config(use_residual=True))
    idx = torch.randint(0, 97, (4, 16))
    out = model(idx)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), idx.flatten()) + out.aux_loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_kv_cache_decoding_matches_full_forward():
    # Dropless: with a capacity, which tokens are dropped depends on how many arrive together.
    model = GPT(small_config(dropless=True)).eval()
    idx = torch.randint(0, 97, (2, 12))
    full = model(idx).logits
    cache = model.new_kv_cache(batch_size=2)
    prefill = model(idx[:, :5], kv_cache=cache, start_pos=0).logits
    steps = [model(idx[:, t : t + 1], kv_cache=cache, start_pos=t).logits for t in range(5, 9)]
    chunk = model(idx[:, 9:], kv_cache=cache, start_pos=9).logits  # multi-token chunk after a prefix
    torch.testing.assert_close(torch.cat([prefill, *steps, chunk], dim=1), full, rtol=1e-4, atol=1e-5)


def test_prompt_in_two_chunks_matches_one_pass():
    model = GPT(small_config(dropless=True)).eval()
    idx = torch.randint(0, 97, (2, 14))
    full = model(idx).logits
    cache = model.new_kv_cache(batch_size=2)
    first = model(idx[:, :6], kv_cache=cache, start_pos=0).logits
    second = model(idx[:, 6:], kv_cache=cache, start_pos=6).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-4, atol=1e-5)


def test_chunk_without_cache_is_causal():
    """With no cache a chunk at start_pos > 0 attends only to itself, causally (positions come from
    the embeddings, so attention equals that of the same chunk at position 0)."""
    from pyramoe.layers import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x, None, start_pos=7), attn(x, None, start_pos=0))
    model = GPT(small_config(dropless=True)).eval()
    idx = torch.randint(0, 97, (1, 8))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 97
    early, late = model(idx, start_pos=4).logits, model(changed, start_pos=4).logits
    torch.testing.assert_close(early[:, :-1], late[:, :-1])


def test_padding_skips_the_moe_layers_and_their_statistics():
    """Left-padded batch: real tokens get the logits of their unpadded sequence; pad tokens are not
    routed, so each MoE layer's routed count is exactly the real tokens x top_k."""
    model = GPT(small_config(top_k=2, dropless=True)).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    idx = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, 6 - len(prompt):] = torch.tensor(prompt)
        mask[row, 6 - len(prompt):] = True
    out = model(idx, key_mask_BL=mask, positions_BT=(mask.long().cumsum(-1) - 1).clamp_min(0))
    for stats in out.moe_stats.values():
        assert stats.routed_per_expert.sum().item() == 9 * 2
    for row, prompt in enumerate(prompts):
        alone = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(out.logits[row, 6 - len(prompt):], alone, rtol=1e-4, atol=1e-5)
