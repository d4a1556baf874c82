"""Aux-loss-free balancing (DeepSeek-V3): per-expert selection biases nudged after each step toward an
even load, with no gradient."""

from __future__ import annotations

import pytest
import torch
from test_train import start, tiny_sources

from pyramoe.config import MoEConfig
from pyramoe.layers.gating import Router

pytestmark = pytest.mark.usefixtures("tiny_run_env")


def test_nudge_moves_biases_by_the_sign_of_the_load_gap():
    router = Router(4, MoEConfig(num_experts=4, score_correction_bias=True))
    router.nudge_score_bias(torch.tensor([10, 2, 6, 6]), rate=0.01)  # mean 6
    torch.testing.assert_close(router.score_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert not router.score_bias.requires_grad


def test_training_moves_the_biases_and_only_with_a_rate(tmp_path):
    moe = {"score_correction_bias": True}
    sources = tiny_sources(tmp_path, run_dir="nudged", steps=6, eval_every=0, router_bias_rate=0.01)
    sources[0]["model"]["moe"] = moe
    trainer = start(sources)
    loads = []
    original = trainer._balance_routers

    def record(routed, rate):  # the counts each step nudges by
        loads.append(routed[1].clone())
        original(routed, rate)

    trainer._balance_routers = record
    trainer.fit()
    expected = sum(torch.sign(load.float().mean() - load.float()) for load in loads) * 0.01
    torch.testing.assert_close(trainer.model.blocks[1].ffn.router.score_bias, expected)
    assert len(loads) == 6 and expected.abs().sum() > 0

    still = tiny_sources(tmp_path, run_dir="still", steps=3, eval_every=0)
    still[0]["model"]["moe"] = moe
    trainer = start(still)
    trainer.fit()
    assert torch.count_nonzero(trainer.model.blocks[1].ffn.router.score_bias) == 0


def test_a_rate_without_a_bias_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train.router_bias_rate"):
        start(tiny_sources(tmp_path, steps=2, router_bias_rate=0.01))
