import torch

from pyramoe.config import ModelConfig, build_layers
from pyramoe.models import GPT


def small_config(**moe):
    return ModelConfig(
        vocab_size=97, max_seq_len=32, d_model=32, n_heads=4,
        layers=build_layers(4, "every_other", [2, 4], capacity_factor=2.0, **moe),
    )


def test_forward_shapes_aux_loss_and_stats():
    model = GPT(small_config())
    idx = torch.randint(0, 97, (3, 20))
    out = model(idx)
    assert out.logits.shape == (3, 20, 97)
    assert sorted(out.moe_stats) == [1, 3]
    expected = model.config.aux_loss_coef * out.balance_loss
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.moe_stats[3].tokens_per_expert.numel() == 4


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
