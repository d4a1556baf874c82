"""Expert parallelism == one process: an EP training step on W gloo ranks gives the loss and every
gradient (and the global gradient norm) of one process that runs each rank's batch and averages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed import run_workers

from pyramoe.comm import Topology
from pyramoe.config import ModelConfig, build_layers
from pyramoe.models import GPT
from pyramoe.parallel import parallelize

VOCAB = 97
# 8 experts: every rank holds several, so rows from several sources must be regrouped per expert; the
# pyramid's 2-expert layer runs at EP min(ep, 2), with expert-data-parallel replicas when ep > 2.
CASES = {
    "top1": dict(num_experts=8, top_k=1, capacity_factor=1.0, min_capacity=0),
    "top2": dict(num_experts=8, top_k=2, capacity_factor=1.25, min_capacity=0),
    "dropless": dict(num_experts=8, top_k=2, dropless=True),
    "residual": dict(num_experts=8, top_k=1, capacity_factor=1.0, use_residual=True),
    "pyramid": dict(num_experts=[2, 8], top_k=1, capacity_factor=1.0, min_capacity=0),
}


def build(case: str) -> GPT:
    settings = dict(CASES[case])
    counts = settings.pop("num_experts")
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, max_seq_len=32, d_model=32, n_heads=4,
        layers=build_layers(4, "every_other", counts, **settings),
    )
    return GPT(config)


def rank_batch(rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(100 + rank))


def step_loss(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx[:, :-1])
    return F.cross_entropy(out.logits.flatten(0, 1), idx[:, 1:].flatten()) + out.aux_loss


def _ep_worker(rank: int, world: int, ep: int, per_node: int | None, out_dir: str) -> None:
    results = {}
    topology = Topology(world, rank, ranks_per_node=per_node)
    for case in CASES:
        model = build(case)
        state = parallelize(model, topology, ep=ep, hierarchical=per_node is not None)
        loss = step_loss(model, rank_batch(rank))
        loss.backward()
        state.sync_gradients(model)
        grads = {}
        for name, param in model.named_parameters():
            offset = None
            if name.endswith(tuple(f"experts.{p}" for p in ("w_in", "w_out", "b_in", "b_out"))):
                offset = model.get_submodule(name.rsplit(".", 1)[0]).expert_offset
            grads[name] = (offset, param.grad.clone())
        results[case] = dict(loss=loss.detach(), grads=grads, norm=state.grad_norm(model))
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize(
    ("world", "ep", "per_node"),
    [(2, 2, None), (4, 4, None), (4, 2, None), (4, 4, 2)],  # the last: hierarchical, 2 nodes x 2 ranks
)
def test_expert_parallel_step_matches_one_process(tmp_path, world, ep, per_node):
    run_workers(_ep_worker, world, tmp_path, ep, per_node, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for case in CASES:
        reference = build(case)
        losses = [step_loss(reference, rank_batch(r)) for r in range(world)]
        (torch.stack(losses).mean()).backward()
        ref_grads = {name: p.grad for name, p in reference.named_parameters()}
        ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()]))
        for r, result in enumerate(ranks):
            got = result[case]
            torch.testing.assert_close(got["loss"], losses[r].detach(), msg=f"{case} rank {r} loss")
            torch.testing.assert_close(got["norm"], ref_norm, rtol=1e-5, atol=1e-7, msg=f"{case} norm")
            for name, (offset, grad) in got["grads"].items():
                expected = ref_grads[name]
                if offset is not None:
                    expected = expected[offset : offset + grad.shape[0]]
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7, msg=f"{case} rank {r} {name}")
        sharded = [n for n, (off, g) in ranks[0][case]["grads"].items() if off is not None]
        assert sharded and all(
            ranks[0][case]["grads"][n][1].shape[0] < ref_grads[n].shape[0] for n in sharded
        ), "experts were not sharded"
