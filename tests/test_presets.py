import pytest
import torch

from pyramoe.models import GPT, count_active_parameters, count_parameters
from pyramoe.presets import PAPER_PARAMETERS, PAPER_SEQ_LEN, PAPER_VOCAB, PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_paper_presets_match_paper_parameter_counts(name):
    """Vocabulary 50257, sequence length 2048 (see presets.py); the paper rounds, so allow 5%."""
    config = get_preset(name)
    assert (config.vocab_size, config.max_seq_len) == (PAPER_VOCAB, PAPER_SEQ_LEN)
    with torch.device("meta"):
        model = GPT(config)
    total = count_parameters(model)
    assert abs(total / PAPER_PARAMETERS[name] - 1) < 0.05, f"{name}: {total / 1e9:.2f}B"


def test_moe_presets_keep_base_active_parameters():
    with torch.device("meta"):
        dense, moe = GPT(get_preset("1.3b")), GPT(get_preset("1.3b-moe-128"))
        prmoe, mos = GPT(get_preset("350m-prmoe-32-64")), GPT(get_preset("350m-mos-32-64"))
    assert count_active_parameters(moe) == pytest.approx(count_parameters(dense), rel=0.01)
    assert count_parameters(moe) > 35 * count_parameters(dense)
    moe_layers = [b.ffn.num_experts for b in prmoe.blocks if b.is_moe]
    assert moe_layers == [32] * 10 + [64] * 2
    assert len(mos.blocks) == 21 and sum(b.is_moe for b in mos.blocks) == 10


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny")])
def test_tiny_presets_run(name):
    model = GPT(get_preset(name))
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    out = model(idx)
    assert out.logits.shape == (2, 16, model.config.vocab_size)
    assert torch.isfinite(out.aux_loss)


def test_tiny_moe_matches_dense_active_parameters():
    dense, moe = GPT(get_preset("tiny-dense")), GPT(get_preset("tiny-moe"))
    assert count_active_parameters(moe) == pytest.approx(count_parameters(dense), rel=0.01)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        get_preset("13b-moe")
