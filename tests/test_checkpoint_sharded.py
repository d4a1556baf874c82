"""Sharded checkpoints (spawned gloo ranks): every rank writes its own pieces in the Hugging Face
sharded layout (experts under global ids, no gather), the save is all-or-nothing, and a checkpoint
saved at one EP/TP layout resumes at another, and in one process, with the losses of an
uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import run_workers
from safetensors import safe_open

import pyramoe.train.checkpoint as ckpt_io
from pyramoe.comm import Topology
from pyramoe.config import ModelConfig, build_layers
from pyramoe.models import GPT
from pyramoe.parallel import parallelize
from pyramoe.parallel.launch import DistRun
from pyramoe.train.distributed import model_parts, optimizer_parts, optimizer_rank_parts, rank_parts
from pyramoe.train.trainer import train_step

VOCAB = 97
SLICES = 4  # sequences per global batch; each data-parallel rank trains on SLICES / DP of them
SAVED_AT = 2
STEPS = 4


def config() -> ModelConfig:
    # A pyramid: the 2-expert layer runs at EP min(ep, 2), with expert-data-parallel replicas at EP=4
    # (pieces several ranks hold alike, written once).
    return ModelConfig(
        vocab_size=VOCAB, max_seq_len=32, d_model=32, n_heads=4,
        layers=build_layers(4, "every_other", [2, 4], top_k=2, dropless=True),
    )


def build() -> GPT:
    torch.manual_seed(0)
    return GPT(config())


def optimizer(model: GPT) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def micro_batches(step: int, dp: int, dp_index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's sequences of the step's global batch, one micro-batch each: every
    layout computes the mean loss over the same SLICES sequences."""
    seqs = torch.randint(0, VOCAB, (SLICES, 17), generator=torch.Generator().manual_seed(1000 + step))
    per = SLICES // dp
    return [(s[:, :-1], s[:, 1:]) for s in seqs[dp_index * per : (dp_index + 1) * per].split(1)]


def train(model, opt, steps, topology: Topology | None = None, state=None) -> list[float]:
    losses = []
    for step in steps:
        dp, index = (topology.dp, topology.dp_index) if topology is not None else (1, 0)
        stats = train_step(model, opt, micro_batches(step, dp, index), grad_clip=0.5, parallel=state)
        loss = torch.tensor([stats.loss], dtype=torch.float64)
        if topology is not None:
            dist.all_reduce(loss)
            loss /= topology.world_size  # TP ranks of one DP rank report the same loss
        losses.append(float(loss))
    return losses


def _save_worker(rank: int, world: int, ep: int, tp: int, slicing: bool, root: str, out: str) -> None:
    topology = Topology(world, rank, tp=tp)
    model = build()
    state = parallelize(model, topology, ep=ep, expert_slicing=slicing)
    opt = optimizer(model)
    losses = train(model, opt, range(SAVED_AT), topology, state)
    record = {"model_config": model.config.to_dict(), "run_config": {"train": {}}}
    ckpt_io.save_sharded_checkpoint(
        Path(root), SAVED_AT, ckpt_io.model_tensors(model), rank_parts(model), ckpt_io.optimizer_tensors(opt),
        optimizer_rank_parts(model, opt), record, None, keep_last=3,
    )
    if rank == 0:
        torch.save(losses, f"{out}/saved.pt")


def _resume_worker(rank: int, world: int, ep: int, root: str, out: str) -> None:
    topology = Topology(world, rank)
    model = build()
    run = DistRun(topology, parallelize(model, topology, ep=ep))
    opt = optimizer(model)
    ckpt = ckpt_io.load_checkpoint(root)
    ckpt_io.load_model_weights(model, ckpt, model_parts(model, run))
    ckpt_io.load_optimizer_state(opt, ckpt, optimizer_parts(model, opt, run))
    losses = train(model, opt, range(SAVED_AT, STEPS), topology, run.state)
    if rank == 0:
        torch.save(losses, f"{out}/resumed.pt")


@pytest.fixture(scope="module")
def reference() -> list[float]:
    model = build()
    return train(model, optimizer(model), range(STEPS))


LAYOUTS = {"ep4": (4, 4, 1, False), "ep2xtp2-slicing": (4, 2, 2, True)}  # world, EP, TP, expert-slicing


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def saved(request, tmp_path_factory) -> tuple[str, Path, list[float]]:
    """A run trained SAVED_AT steps and saved sharded at one layout (4 ranks): (layout, root, losses)."""
    tmp = tmp_path_factory.mktemp(request.param)
    root = tmp / "ckpt"
    run_workers(_save_worker, LAYOUTS[request.param][0], tmp, *LAYOUTS[request.param][1:], str(root), str(tmp))
    return request.param, root, torch.load(tmp / "saved.pt")


def test_saved_sharded_resumes_at_ep2_and_in_one_process(tmp_path, reference, saved):
    """EP=4 -> EP=2 and -> one process; EP=2 x TP=2 with every expert's hidden units sliced -> one
    process (its TP pieces joined; tests/test_train_distributed.py resumes such a run under torchrun)."""
    layout, root, losses = saved
    assert losses == pytest.approx(reference[:SAVED_AT], rel=1e-5)
    path = ckpt_io.latest_checkpoint(root)
    assert path is not None and not (path / ckpt_io.MODEL_FILE).exists()
    assert len(list(path.glob("model-*-of-00004.safetensors"))) == 4

    if layout == "ep4":
        run_workers(_resume_worker, 2, tmp_path, 2, str(root), str(tmp_path))  # EP=2
        assert torch.load(tmp_path / "resumed.pt") == pytest.approx(reference[SAVED_AT:], rel=1e-5)

    ckpt = ckpt_io.load_checkpoint(root)  # one process: what eval / export / generate build
    model = ckpt_io.build_model(ckpt).train()
    opt = optimizer(model)
    ckpt_io.load_optimizer_state(opt, ckpt)
    assert train(model, opt, range(SAVED_AT, STEPS)) == pytest.approx(reference[SAVED_AT:], rel=1e-5)


def test_index_is_the_hugging_face_layout_with_experts_under_global_ids(saved):
    layout, root, _ = saved
    path = ckpt_io.latest_checkpoint(root)
    for kind, index_name in (("model", ckpt_io.MODEL_INDEX), ("optimizer", ckpt_io.OPTIMIZER_INDEX)):
        index = json.loads((path / index_name).read_text())
        assert set(index) == {"metadata", "weight_map"}
        weight_map = index["weight_map"]
        stored, size = {}, 0
        for name in sorted(set(weight_map.values())):
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    stored[key] = name
                    size += f.get_tensor(key).numel() * 4
        assert stored == weight_map  # every piece once, in the file the index names
        assert index["metadata"]["total_size"] == size
        assert set(weight_map.values()) <= {f"{kind}-0000{r}-of-00004.safetensors" for r in (1, 2, 3, 4)}
    index = json.loads((path / ckpt_io.MODEL_INDEX).read_text())
    weight_map, tensors = index["weight_map"], index["metadata"]["tensors"]
    model = build()
    assert set(tensors) == set(ckpt_io.model_tensors(model))
    assert "blocks.3.ffn.experts.w_in" not in weight_map and tensors["blocks.3.ffn.experts.w_in"]["experts"]
    assert tensors["blocks.3.ffn.experts.w_in"]["shape"] == list(model.blocks[3].ffn.experts.w_in.shape)
    assert weight_map["tok_emb.weight"] == "model-00001-of-00004.safetensors"  # replicated: written once
    if layout == "ep4":
        # Layer 3: 4 experts over 4 ranks, expert e on rank e; layer 1: 2 experts at EP=2, held
        # twice (expert-data-parallel), each expert written by its lowest holder (rank e).
        for e in range(4):
            assert weight_map[f"blocks.3.ffn.experts.{e}.w_in"] == f"model-0000{e + 1}-of-00004.safetensors"
        for e in range(2):
            assert weight_map[f"blocks.1.ffn.experts.{e}.w_out"] == f"model-0000{e + 1}-of-00004.safetensors"
    else:
        # EP=2 x TP=2 (ranks 0,1: TP group of EP rank 0): expert 3's hidden units in two slices, on
        # ranks 2 and 3; attention's fused q/k/v split the same way over ranks 0 and 1.
        for r in range(2):
            assert weight_map[f"blocks.3.ffn.experts.3.w_in.tp-{r}-of-2"] == f"model-0000{r + 3}-of-00004.safetensors"
            assert weight_map[f"blocks.0.attn.qkv.weight.tp-{r}-of-2"] == f"model-0000{r + 1}-of-00004.safetensors"
        assert tensors["blocks.0.attn.qkv.weight"]["tp"] == {"dim": 0, "blocks": [32, 32, 32], "size": 2}


def _failing_worker(rank: int, world: int, root: str, out: str) -> None:
    topology = Topology(world, rank)
    model = build()
    state = parallelize(model, topology, ep=2)
    opt = optimizer(model)
    record = {"model_config": model.config.to_dict(), "run_config": {"train": {}}}

    def save(step: int) -> None:
        ckpt_io.save_sharded_checkpoint(
            Path(root), step, ckpt_io.model_tensors(model), rank_parts(model), ckpt_io.optimizer_tensors(opt),
            optimizer_rank_parts(model, opt), record, None, keep_last=3,
        )

    train(model, opt, range(1), topology, state)
    save(1)
    train(model, opt, range(1, 2), topology, state)
    if rank == 1:
        real = ckpt_io.save_file

        def dies_mid_write(tensors, path, metadata=None):
            if "optimizer-" in path:  # its model file is written by now
                Path(path).write_bytes(b"\x08\x00\x00\x00half")
                raise OSError("disk full")
            real(tensors, path, metadata=metadata)

        ckpt_io.save_file = dies_mid_write
    try:
        save(2)
        message = "saved"
    except (OSError, RuntimeError) as exc:
        message = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.txt").write_text(message)


def test_a_rank_failing_mid_save_leaves_no_checkpoint_that_looks_complete(tmp_path):
    root = tmp_path / "ckpt"
    run_workers(_failing_worker, 2, tmp_path, str(root), str(tmp_path))
    assert (tmp_path / "rank1.txt").read_text() == "OSError: disk full"
    assert (tmp_path / "rank0.txt").read_text() == (
        "RuntimeError: checkpoint step 2: rank 1 failed (OSError: disk full); nothing was saved"
    )
    assert [p.name for p in root.iterdir()] == ["step-0000001"]  # no step-2, no temporary left behind
    ckpt = ckpt_io.load_checkpoint(root)
    assert ckpt.step == 1
    model = ckpt_io.build_model(ckpt)
    ckpt_io.load_optimizer_state(optimizer(model), ckpt)


def _held_by(full: dict[str, torch.Tensor], ep: int, tp: int, dim: int, blocks: tuple[int, ...]):
    """Simulated ranks (EP outer, TP inner) holding experts and TP slices of one expert tensor."""
    held, tensors = [], []
    experts = full["w"].shape[0] // ep
    for rank in range(ep * tp):
        part = ckpt_io.Part(experts=(rank // tp * experts, experts), tp=(dim, blocks, rank % tp, tp))
        mine = {"w": part.cut(full["w"]), "s": full["s"]}
        held.append(ckpt_io.held_parts(mine, {"w": part}))
        tensors.append(mine)
    return held, tensors


@pytest.mark.parametrize(("saved", "loaded"), [((2, 2), (1, 4)), ((1, 4), (4, 2)), ((4, 1), (2, 1)), ((2, 2), (1, 1))])
def test_any_part_is_read_from_the_pieces_of_another_layout(tmp_path, saved, loaded):
    """Fused blocks ([gate | up] of 8 + 8 rows) split block by block, re-cut at another TP size and
    expert count, reading only the overlapping ranges; scalars stay whole."""
    dim, blocks = 1, (8, 8)
    full = {"w": torch.randn(4, 16, 3), "s": torch.tensor(7.0)}
    held, tensors = _held_by(full, *saved, dim, blocks)
    for rank, mine in enumerate(tensors):
        ckpt_io.write_shard(tmp_path, "model", rank, held, mine)
    (tmp_path / ckpt_io.MODEL_INDEX).write_text(json.dumps(ckpt_io.shard_index("model", held)))
    ep, tp = loaded
    with ckpt_io.ShardedFiles(tmp_path, ckpt_io.MODEL_INDEX) as files:
        assert torch.equal(files.read("w"), full["w"]) and torch.equal(files.read("s"), full["s"])
        for rank in range(ep * tp):
            part = ckpt_io.Part(experts=(rank // tp * (4 // ep), 4 // ep), tp=(dim, blocks, rank % tp, tp))
            assert torch.equal(files.read("w", part), part.cut(full["w"]))


def _fsdp_held_by(full: dict[str, torch.Tensor], dp: int, tp: int, blocks: tuple[int, ...]):
    """Simulated --zero ranks (DP outer, TP inner): each holds FSDP's rows (torch.chunk's split,
    the last ranks fewer or none) of its TP slice of "w" (fused blocks along dimension 0), of
    the whole "v" and, when given, of "u" (fused blocks along dimension 1)."""
    held, tensors = [], []
    for rank in range(dp * tp):
        mine, parts = {}, {}
        for name, part in _fsdp_parts(full, dp, tp, blocks, rank).items():
            parts[name] = part
            mine[name] = part.cut(full[name])
        held.append(ckpt_io.held_parts(mine, parts))
        tensors.append(mine)
    return held, tensors


def _fsdp_parts(full: dict[str, torch.Tensor], dp: int, tp: int, blocks: tuple[int, ...], rank: int):
    """Rank `rank`'s (DP outer, TP inner) `Part` of each tensor under --zero: FSDP rows of its TP slice."""
    d, t = divmod(rank, tp)
    out = {}
    for name, tp_part in (("w", (0, blocks, t, tp)), ("v", None), ("u", (1, blocks, t, tp))):
        if name not in full:
            continue
        total = ckpt_io.Part(tp=tp_part).cut(full[name]).shape[0]
        chunk = -(-total // dp)
        out[name] = ckpt_io.Part(tp=tp_part, rows=(min(d * chunk, total), min((d + 1) * chunk, total), total))
    return out


@pytest.mark.parametrize(("saved", "loaded_tp"), [((2, 2), 1), ((4, 1), 2), ((3, 2), 4)])
def test_fsdp_row_chunks_are_read_at_any_layout(tmp_path, saved, loaded_tp):
    """--zero saves: each rank writes its FSDP rows of its TP slice; a reader assembles any TP slice
    (or the whole tensor) from them, reading only what overlaps; a missing chunk is one clear line."""
    blocks = (8, 8)
    full = {"w": torch.randn(16, 3), "v": torch.randn(5, 2)}
    held, tensors = _fsdp_held_by(full, *saved, blocks)
    for rank, mine in enumerate(tensors):
        ckpt_io.write_shard(tmp_path, "model", rank, held, mine)
    index = ckpt_io.shard_index("model", held)
    (tmp_path / ckpt_io.MODEL_INDEX).write_text(json.dumps(index))
    with ckpt_io.ShardedFiles(tmp_path, ckpt_io.MODEL_INDEX) as files:
        assert torch.equal(files.read("w"), full["w"]) and torch.equal(files.read("v"), full["v"])
        for rank in range(loaded_tp):
            part = ckpt_io.Part(tp=(0, blocks, rank, loaded_tp))
            assert torch.equal(files.read("w", part), part.cut(full["w"]))
    index["metadata"]["chunks"]["v"].pop(0)
    (tmp_path / ckpt_io.MODEL_INDEX).write_text(json.dumps(index))
    with ckpt_io.ShardedFiles(tmp_path, ckpt_io.MODEL_INDEX) as files, pytest.raises(ValueError, match="gap"):
        files.read("v")


@pytest.mark.parametrize(("saved", "loaded"), [((2, 2), (1, 2)), ((3, 2), (2, 4)), ((4, 1), (3, 1)), ((1, 2), (4, 2))])
def test_a_rank_reads_only_its_fsdp_rows(tmp_path, saved, loaded):
    """Loading under --zero (DP x TP = `loaded`) from a --zero save at another layout: each rank's
    FSDP rows of its TP slice equal the full tensor's, and only their bytes are read (empty
    shares included)."""
    blocks = (8, 8)
    full = {"w": torch.randn(16, 3), "v": torch.randn(5, 2), "u": torch.randn(7, 16)}
    held, tensors = _fsdp_held_by(full, *saved, blocks)
    for rank, mine in enumerate(tensors):
        ckpt_io.write_shard(tmp_path, "model", rank, held, mine)
    (tmp_path / ckpt_io.MODEL_INDEX).write_text(json.dumps(ckpt_io.shard_index("model", held)))
    dp, tp = loaded
    empty = 0
    with ckpt_io.ShardedFiles(tmp_path, ckpt_io.MODEL_INDEX) as files:
        for rank in range(dp * tp):
            for name, part in _fsdp_parts(full, dp, tp, blocks, rank).items():
                before = files.bytes_read
                got = files.read(name, part)
                assert torch.equal(got, part.cut(full[name])), (name, part)
                assert files.bytes_read - before == got.numel() * got.element_size()
                empty += got.numel() == 0
    assert empty == (1 if loaded == (4, 2) else 0) * tp  # "v" (5 rows over 4): the last DP rank has none


def test_fsdp_rows_of_an_expert_tensor_are_whole_experts(tmp_path):
    """Under --zero an expert tensor's FSDP rows are experts of the rank's EP share: only those are
    read; an empty share has the right shape."""
    dim, blocks = 1, (8, 8)
    full = {"w": torch.randn(4, 16, 3), "s": torch.tensor(7.0)}
    held, tensors = _held_by(full, 2, 1, dim, blocks)
    for rank, mine in enumerate(tensors):
        ckpt_io.write_shard(tmp_path, "model", rank, held, mine)
    (tmp_path / ckpt_io.MODEL_INDEX).write_text(json.dumps(ckpt_io.shard_index("model", held)))
    with ckpt_io.ShardedFiles(tmp_path, ckpt_io.MODEL_INDEX) as files:
        part = ckpt_io.Part(experts=(2, 2), tp=(dim, blocks, 1, 2), rows=(1, 2, 2))
        got = files.read("w", part)
        assert torch.equal(got, part.cut(full["w"])) and got.shape == (1, 8, 3)
        assert files.bytes_read == got.numel() * got.element_size()
        empty = files.read("w", ckpt_io.Part(experts=(2, 2), rows=(2, 2, 2)))
        assert empty.shape == (0, 16, 3)


def _run_directory_worker(rank: int, world: int, root: str, out: str) -> None:
    """Rank 0 alone cleans the checkpoint directory while the others wait; then a sharded save in
    which each rank records what it fsynced and renamed."""
    import os
    import time

    from pyramoe.train.distributed import clean_stale_once

    calls = []

    def slow_clean(path):
        calls.append(rank)
        time.sleep(0.5)  # a rank that did not wait would be past the barrier before this ends
        Path(out, "cleaned").write_text("done")

    ckpt_io.clean_stale = slow_clean
    clean_stale_once(Path(root), DistRun(Topology(world, rank)))
    Path(out, f"clean{rank}.json").write_text(json.dumps({"calls": calls, "saw_done": Path(out, "cleaned").exists()}))

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    os.fsync = lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1]
    os.replace = lambda src, dst: (events.append(("replace", str(Path(dst).resolve()))), real_replace(src, dst))[1]
    tensors = {"w": torch.full((2, 3), float(rank))}
    parts = {"w": ckpt_io.Part(experts=(2 * rank, 2))}
    ckpt_io.save_sharded_checkpoint(Path(root), 1, tensors, parts, ({}, []), {}, {}, None, keep_last=3)
    Path(out, f"events{rank}.json").write_text(json.dumps(events))


def test_rank_0_alone_cleans_and_every_file_is_on_disk_before_the_checkpoint_is_published(tmp_path):
    from test_checkpoint import check_published_durably

    root = tmp_path / "ckpt"
    run_workers(_run_directory_worker, 2, tmp_path, str(root), str(tmp_path))
    assert json.loads((tmp_path / "clean0.json").read_text()) == {"calls": [0], "saw_done": True}
    assert json.loads((tmp_path / "clean1.json").read_text()) == {"calls": [], "saw_done": True}
    final = root / "step-0000001"
    # Rank 1 flushes its own files before it reports them written, and rank 0 renames only after
    # every rank reported: its fsyncs come first.
    events_1 = [tuple(e) for e in json.loads((tmp_path / "events1.json").read_text())]
    assert {Path(p).name for kind, p in events_1 if kind == "fsync"} == {
        ckpt_io.shard_file("model", 1, 2), ckpt_io.shard_file("optimizer", 1, 2)}
    events = events_1 + [tuple(e) for e in json.loads((tmp_path / "events0.json").read_text())]
    check_published_durably(events, final)
