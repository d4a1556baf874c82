"""Tensor parallelism == one process: TP=2 and EP x TP (2 x 2) training steps on gloo give the loss
and every gradient of one process running each data-parallel batch, for the GPT-2 block and the
Llama-family block (GQA, RoPE, SwiGLU, q/k norm), dense and MoE (tokens split over TP, all-to-all
among ranks of the same TP index, outputs all-gathered), and with expert-slicing (every expert's
hidden units split over TP, tokens whole)."""

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


def build(case: str) -> GPT:
    torch.manual_seed(0)
    # Dropless and no aux loss: both depend on how many tokens one router sees at once, and under
    # TP each rank routes half of them.
    moe = dict(top_k=2, dropless=True)
    common = dict(vocab_size=VOCAB, max_seq_len=32, d_model=32, n_heads=4, aux_loss_coef=0.0, z_loss_coef=0.0)
    if case == "gpt2":
        return GPT(ModelConfig(**common, layers=build_layers(4, "every_other", 4, use_residual=True, **moe)))
    llama = dict(n_kv_heads=2, activation="swiglu", bias=False, tie_embeddings=False, position="rope",
                 norm="rmsnorm", qk_norm="head", d_ff=48)
    return GPT(ModelConfig(**common, **llama, layers=build_layers(3, [1, 2], 4, expert_d_ff=24, **moe)))


def dp_batch(dp_index: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(50 + dp_index))


def step_loss(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx[:, :-1])
    return F.cross_entropy(out.logits.flatten(0, 1), idx[:, 1:].flatten()) + out.aux_loss


def _worker(rank: int, world: int, tp: int, ep: int, slicing: bool, out_dir: str) -> None:
    topology = Topology(world, rank, tp=tp)
    results = {}
    for case in ("gpt2", "llama"):
        model = build(case)
        state = parallelize(model, topology, ep=ep, expert_slicing=slicing)
        loss = step_loss(model, dp_batch(topology.dp_index))
        loss.backward()
        state.sync_gradients(model)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results[case] = dict(loss=loss.detach(), grads=grads, norm=state.grad_norm(model))
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def expected_slice(name: str, full: torch.Tensor, got: torch.Tensor, model: GPT, tp_index: int, tp: int,
                   expert_offset: int | None) -> torch.Tensor:
    """The part of a full gradient a rank holds: its experts, its heads, its hidden units."""
    if expert_offset is not None:
        full = full[expert_offset : expert_offset + got.shape[0]]
    if full.shape == got.shape:
        return full
    if ".experts." in name:  # expert-slicing: hidden units of every expert ([gate | up] for SwiGLU)
        dim = 1 if name.endswith("w_in") else 2
        halves = 2 if model.config.activation == "swiglu" and not name.endswith("w_out") else 1
        blocks = [full.shape[dim] // halves] * halves
        return torch.cat([part.chunk(tp, dim=dim)[tp_index] for part in full.split(blocks, dim=dim)], dim=dim)
    if name.endswith(("attn.proj.weight", "fc_out.weight")):  # row parallel: input columns
        return full.chunk(tp, dim=1)[tp_index]
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):  # column parallel per block [q | k | v]
        blocks = model.get_submodule(name.rsplit(".", 2)[0]).split
    elif name.endswith(("fc_in.weight", "fc_in.bias")):  # [gate | up] for SwiGLU
        blocks = [full.shape[0] // 2] * 2 if model.config.activation == "swiglu" else [full.shape[0]]
    else:
        raise AssertionError(f"unexpected shard {name}")
    return torch.cat([part.chunk(tp, dim=0)[tp_index] for part in full.split(list(blocks), dim=0)])


@pytest.mark.parametrize(
    ("world", "tp", "ep", "slicing"),
    [(2, 2, 1, False), (4, 2, 2, False), (2, 2, 1, True), (4, 2, 2, True)],  # True: expert-slicing
)
def test_tensor_parallel_step_matches_one_process(tmp_path, world, tp, ep, slicing):
    run_workers(_worker, world, tmp_path, tp, ep, slicing, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    dp = world // tp
    for case in ("gpt2", "llama"):
        reference = build(case)
        losses = [step_loss(reference, dp_batch(d)) for d in range(dp)]
        torch.stack(losses).mean().backward()
        ref_grads = {name: p.grad for name, p in reference.named_parameters()}
        ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()]))
        for rank, result in enumerate(ranks):
            topology = Topology(world, rank, tp=tp)
            got = result[case]
            torch.testing.assert_close(got["loss"], losses[topology.dp_index].detach(), msg=f"{case} loss {rank}")
            torch.testing.assert_close(got["norm"], ref_norm, rtol=1e-5, atol=1e-7, msg=f"{case} norm {rank}")
            sharded = 0
            for name, grad in got["grads"].items():
                full = ref_grads[name]
                offset = None
                if ".experts." in name and ep > 1:
                    offset = topology.ep_rank(ep) * grad.shape[0]
                want = expected_slice(name, full, grad, reference, topology.tp_index, tp, offset)
                sharded += want.shape != full.shape
                torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=f"{case} rank {rank} {name}")
            assert sharded > 0


# -- the logged aux loss ---------------------------------------------------------------------------------


def build_with_aux() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=VOCAB, max_seq_len=32, d_model=32, n_heads=4, aux_loss_coef=0.01,
                           z_loss_coef=0.001, layers=build_layers(4, "every_other", 4, top_k=2, dropless=True)))


def _aux_worker(rank: int, world: int, out_dir: str) -> None:
    from pyramoe.train.trainer import train_step

    model = build_with_aux()
    state = parallelize(model, Topology(world, rank, tp=world))
    idx = dp_batch(0)
    stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [(idx[:, :-1], idx[:, 1:].contiguous())],
                       parallel=state)
    torch.save(stats.aux, f"{out_dir}/aux{rank}.pt")


def test_the_logged_aux_loss_under_tp_is_its_value_not_a_share(tmp_path):
    """Each TP rank routes half of an MoE layer's tokens; the logged aux loss (the ranks' mean, as
    the trainer logs it) is the mean of the halves' aux losses, not that divided by TP."""
    run_workers(_aux_worker, 2, tmp_path, str(tmp_path))
    logged = sum(torch.load(tmp_path / f"aux{r}.pt") for r in range(2)) / 2
    model = build_with_aux()
    inputs = {}
    for index, block in enumerate(model.blocks):
        if block.is_moe:
            block.ffn.register_forward_hook(lambda m, args, out, i=index: inputs.__setitem__(i, args[0]))
    idx = dp_batch(0)
    model(idx[:, :-1])
    expected = 0.0
    for index, x in inputs.items():
        router = model.blocks[index].ffn.router
        for half in x.reshape(-1, x.shape[-1]).chunk(2):
            routing = router(half)
            expected += (0.01 * routing.balance_loss + 0.001 * routing.z_loss).item() / 2
    assert expected > 0
    assert logged == pytest.approx(expected, rel=1e-4)
