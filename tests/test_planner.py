"""`pyramoe plan`: memory arithmetic on a hand-computed preset, placement, the paper's claims, errors."""

import pytest

from pyramoe.cli.main import main
from pyramoe.cli.plan import parse_memory
from pyramoe.comm import cost_model as cm
from pyramoe.parallel.planner import (
    Hardware,
    Plan,
    Workload,
    add_latency,
    bytes_read_per_token,
    make_plan,
    memory_per_gpu,
    model_sizes,
)
from pyramoe.presets import get_preset

# tiny-moe by hand: vocab 8192, context 256, width 256, 4 blocks, MoE (8 experts, d_ff 1024) in 1 and 3.
EMBEDDINGS = 8192 * 256 + 256 * 256 + 2 * 256  # token, position, final LayerNorm (tied head)
NORMS = 4 * 2 * 2 * 256  # two LayerNorms per block
ROUTERS = 2 * 8 * 256
ATTENTION = 4 * ((3 * 256 * 256 + 3 * 256) + (256 * 256 + 256))  # qkv, proj (with biases)
DENSE_MLP = 2 * ((1024 * 256 + 1024) + (256 * 1024 + 256))  # blocks 0 and 2
EXPERTS = 8 * (1024 * 256 + 1024 + 256 * 1024 + 256)  # per MoE layer
KV_CACHE = 2 * 4 * 256 * 256 * 8 * 2  # K and V, 4 layers, width 256, 256 tokens, batch 8, 16-bit


def test_parameter_counts_by_placement():
    sizes = model_sizes(get_preset("tiny-moe"))
    assert sizes.replicated == EMBEDDINGS + NORMS + ROUTERS
    assert sizes.tp_sliced == ATTENTION + DENSE_MLP
    assert sizes.experts == {1: (8, EXPERTS), 3: (8, EXPERTS)}
    assert sizes.active == EMBEDDINGS + NORMS + ROUTERS + ATTENTION + DENSE_MLP + 2 * EXPERTS // 8


def test_memory_per_gpu_inference_and_training():
    sizes = model_sizes(get_preset("tiny-moe"))
    inference = memory_per_gpu(sizes, tp=1, eps={1: 2, 3: 2}, workload=Workload("inference", batch=8))
    held = EMBEDDINGS + NORMS + ROUTERS + ATTENTION + DENSE_MLP + 2 * EXPERTS // 2
    assert inference == {"parameters": 2 * held, "kv_cache": KV_CACHE}
    train = memory_per_gpu(sizes, tp=2, eps={1: 4, 3: 4}, workload=Workload("train", micro_batch=1))
    held = EMBEDDINGS + NORMS + ROUTERS + (ATTENTION + DENSE_MLP) / 2 + 2 * EXPERTS // 4
    # s b h (10 + 24/t + 5 a s / (h t)) per layer, 4 layers, + fp32 logits s b V
    activations = 4 * 256 * 256 * (10 + 24 / 2 + 5 * 4 * 256 / (256 * 2)) + 4 * 256 * 8192
    assert train == {"parameters": pytest.approx(16 * held), "activations": pytest.approx(activations)}


def test_zero_holds_one_dp_share_of_the_training_state_and_gathers_an_expert_shard():
    sizes = model_sizes(get_preset("tiny-moe"))
    plain = memory_per_gpu(sizes, tp=1, eps={1: 2, 3: 2}, workload=Workload("train"), dp=4)
    zero = memory_per_gpu(sizes, tp=1, eps={1: 2, 3: 2}, workload=Workload("train", zero=True), dp=4)
    total = EMBEDDINGS + NORMS + ROUTERS + ATTENTION + DENSE_MLP + 2 * EXPERTS
    assert zero["parameters"] == pytest.approx(16 * total / 4)
    assert zero["gathered experts"] == pytest.approx(8 * EXPERTS / 2)  # one layer's EP shard, fp32 weights + grads
    assert zero["activations"] == plain["activations"]
    assert sum(zero.values()) < sum(plain.values())
    # with TP: each TP rank's share over its DP group (the EP shard of each layer over DP/EP), so
    # the state is the plain TP plan's over DP; the gathered shard is 1/t of one with expert-slicing
    for slicing in (False, True):
        plain_tp = memory_per_gpu(sizes, tp=2, eps={1: 2, 3: 2}, workload=Workload("train"), expert_slicing=slicing,
                                  dp=4)
        zero_tp = memory_per_gpu(sizes, tp=2, eps={1: 2, 3: 2}, workload=Workload("train", zero=True),
                                 expert_slicing=slicing, dp=4)
        held = EMBEDDINGS + NORMS + ROUTERS + (ATTENTION + DENSE_MLP) / 2 + 2 * EXPERTS / (2 if slicing else 1)
        assert zero_tp["parameters"] == pytest.approx(16 * held / 4)
        assert plain_tp["parameters"] == pytest.approx(16 * (held - 2 * EXPERTS / (2 if slicing else 1))
                                                       + 16 * 2 * EXPERTS / (4 if slicing else 2))
        assert zero_tp["gathered experts"] == pytest.approx(8 * EXPERTS / (4 if slicing else 2))


def test_smallest_count_that_holds_it():
    one_gpu = 2 * (EMBEDDINGS + NORMS + ROUTERS + ATTENTION + DENSE_MLP + 2 * EXPERTS) + KV_CACHE
    two_gpus = 2 * (EMBEDDINGS + NORMS + ROUTERS + ATTENTION + DENSE_MLP + EXPERTS) + KV_CACHE
    assert two_gpus < 30e6 < one_gpu
    hardware = Hardware(gpus_per_node=8, gpu_memory_bytes=30e6 / 0.9)
    plan, smallest, _ = make_plan(get_preset("tiny-moe"), hardware, Workload("inference"))
    assert plan is smallest
    assert (plan.gpus, plan.tp, plan.dp, plan.layer_ep) == (2, 1, 2, {1: 2, 3: 2})
    assert plan.memory_total == pytest.approx(two_gpus)
    assert plan.all_to_all == {1: "flat", 3: "flat"}  # one node
    assert set(plan.latency) == {"all-to-all", "tp all-reduce", "HBM reads (roofline)"}


def test_decode_reads_the_experts_its_tokens_touch():
    hardware = Hardware(gpus_per_node=8, gpu_memory_bytes=30e6 / 0.9)
    plan, _, sizes = make_plan(get_preset("tiny-moe"), hardware, Workload("inference", batch=8))
    # 4 local experts per MoE layer; 8 tokens spread uniformly touch 4 (1 - (3/4)^8) of them.
    touched = 4 * (1 - 0.75**8)
    expected = 2 * (EMBEDDINGS + NORMS + ROUTERS + ATTENTION + DENSE_MLP + 2 * touched * EXPERTS / 8)
    assert bytes_read_per_token(plan, sizes, Workload("inference", batch=8)) == pytest.approx(expected)


def test_training_plan_figures_quoted_in_the_readme():
    config = get_preset("1.3b-moe-128")
    counts = [make_plan(config, Hardware(gpu_memory_bytes=m), Workload("train"))[1] for m in (80e9, 40e9)]
    assert [(p.gpus, p.tp, p.expert_slicing) for p in counts] == [(16, 2, True), (32, 4, True)]
    whole = [make_plan(config, Hardware(gpu_memory_bytes=m), Workload("train"), expert_slicing=False)[1].gpus
             for m in (80e9, 40e9)]
    assert whole == [32, 128]  # experts kept whole under TP: every TP rank holds its EP shard's experts
    plan, _, _ = make_plan(config, Hardware(), Workload("train"), gpus=128)
    assert set(plan.latency) == {"all-to-all", "tp all-reduce", "compute (roofline)"}
    decode, _, _ = make_plan(config, Hardware(), Workload("inference"), gpus=128)
    assert decode.latency["all-to-all"] > decode.latency["HBM reads (roofline)"]


def test_pyramid_layers_get_their_own_ep_and_hierarchical_pays_off_across_nodes():
    plan, _, _ = make_plan(get_preset("1.3b-prmoe-64-128"), Hardware(), Workload("inference"), gpus=128)
    assert {plan.layer_ep[i] for i in range(1, 20, 2)} == {64} and plan.layer_ep[21] == plan.layer_ep[23] == 128
    assert set(plan.all_to_all.values()) == {"hierarchical"}  # 8 tokens per GPU over 8-16 nodes
    one_node, _, _ = make_plan(get_preset("1.3b-prmoe-64-128"), Hardware(), Workload("inference"), gpus=8)
    assert set(one_node.all_to_all.values()) == {"flat"}


@pytest.mark.parametrize("memory", ["80GB", "32GB"])
def test_paper_claim_prmoe_mos_needs_about_half_the_gpus_of_the_standard_moe(memory):
    """The paper: PR-MoE+MoS (1.3B base: 27B parameters) serves with the quality of the standard
    1.3B+MoE-128 (52B) on about half the GPUs. The planner gives exactly half at 80 and 32 GB."""
    hardware = Hardware(gpu_memory_bytes=parse_memory(memory))
    counts = {}
    for preset in ("1.3b-moe-128", "1.3b-prmoe-64-128", "1.3b-mos-64-128"):
        _, smallest, _ = make_plan(get_preset(preset), hardware, Workload("inference"))
        counts[preset] = smallest.gpus
    assert counts["1.3b-mos-64-128"] * 2 == counts["1.3b-moe-128"]
    # At 32 GB expert-slicing (TP=2) brings the standard MoE down to 4 GPUs, as many as PR-MoE, whose
    # residual MLPs - replicated, not sliced - leave it nothing to gain; without it PR-MoE needs fewer.
    assert counts["1.3b-mos-64-128"] <= counts["1.3b-prmoe-64-128"] <= counts["1.3b-moe-128"]
    whole = {preset: make_plan(get_preset(preset), hardware, Workload("inference"), expert_slicing=False)[1].gpus
             for preset in counts}
    assert whole["1.3b-mos-64-128"] * 2 == whole["1.3b-moe-128"]
    assert whole["1.3b-mos-64-128"] <= whole["1.3b-prmoe-64-128"] < whole["1.3b-moe-128"]


def test_expert_slicing_holds_a_tp_slice_of_each_expert_and_pays_all_tokens_and_an_all_reduce():
    sizes = model_sizes(get_preset("tiny-moe"))
    sliced = memory_per_gpu(sizes, tp=2, eps={1: 1, 3: 1}, workload=Workload("inference"), expert_slicing=True)
    two_gpus = 2 * (EMBEDDINGS + NORMS + ROUTERS + (ATTENTION + DENSE_MLP) / 2 + 2 * EXPERTS / 2) + KV_CACHE / 2
    assert sum(sliced.values()) == pytest.approx(two_gpus)
    # 20 MB: on 2 GPUs neither EP=2 (25.3 MB) nor TP=2 with whole experts (27.5 MB) fits, TP=2 with
    # sliced experts (19.0 MB) does; keeping experts whole takes 4 GPUs (TP=2, EP=2: 19.0 MB).
    hardware = Hardware(gpus_per_node=8, gpu_memory_bytes=20e6 / 0.9)
    plan, _, _ = make_plan(get_preset("tiny-moe"), hardware, Workload("inference"))
    assert (plan.gpus, plan.tp, plan.layer_ep, plan.expert_slicing) == (2, 2, {1: 1, 3: 1}, True)
    assert plan.memory_total == pytest.approx(two_gpus)
    whole, _, _ = make_plan(get_preset("tiny-moe"), hardware, Workload("inference"), expert_slicing=False)
    assert (whole.gpus, whole.tp, whole.layer_ep, whole.expert_slicing) == (4, 2, {1: 2, 3: 2}, False)

    # Communication on 4 nodes of 8: EP=8 among the ranks of one TP index (4 per node) on all 8 tokens
    # (coordinated: half of them, then an all-gather), and a ring all-reduce of the expert outputs in
    # each TP pair.
    hardware = Hardware(gpus_per_node=8)
    memory = {"kv_cache": 0.0}
    sliced = Plan(32, 2, 16, {1: 8, 3: 8}, memory, True, expert_slicing=True)
    coordinated = Plan(32, 2, 16, {1: 8, 3: 8}, memory, True)
    for p in (sliced, coordinated):
        add_latency(p, sizes, hardware, Workload("inference", batch=8))
    nbytes = 8 * 256 * 2 * 1  # tokens x width x 16 bits x top-1
    exchange = min(cm.predict(hardware.network, cm.round_trip(kind, 8, 4, nbytes)) for kind in ("flat", "hierarchical"))
    assert sliced.latency["all-to-all"] == pytest.approx(2 * exchange)
    link = hardware.network.intra
    ring = hardware.network.call_s + 2 * (link.alpha_s + nbytes / 2 * link.beta_s_per_byte)
    assert sliced.latency["expert-slicing all-reduce"] == pytest.approx(2 * ring)
    assert "expert-slicing all-reduce" not in coordinated.latency
    half = min(cm.predict(hardware.network, cm.round_trip(f"coordinated{kind}", 16, 8, nbytes, 2))
               for kind in ("", "-hierarchical"))
    assert coordinated.latency["all-to-all"] == pytest.approx(2 * half)


def test_cli_prints_plan_and_assumptions(capsys):
    assert main(["plan", "1.3b-moe-128", "--gpus", "64", "--gpus-per-node", "8", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "smallest GPU count that holds it: 2" in out
    assert "on 64 GPUs: TP=1" in out and "hierarchical" in out
    assert "ASSUMED" in out and "datasheet" in out and "predicted time per generated token" in out
    assert main(["plan", "1.3b-moe-128", "--gpu-memory", "32GB"]) == 0
    out = capsys.readouterr().out
    assert "smallest GPU count that holds it: 4 (TP=2, expert-slicing, DP=2" in out and "64 x 1/2" in out
    assert main(["plan", "1.3b-moe-128", "--gpu-memory", "32GB", "--no-expert-slicing"]) == 0
    assert "smallest GPU count that holds it: 8 (TP=1, DP=8" in capsys.readouterr().out


@pytest.mark.parametrize("argv,flag", [
    (["tiny-moe", "--gpu-memory", "80XB"], "--gpu-memory"),
    (["tiny-moe", "--mode", "serve"], "--mode"),
    (["tiny-moe", "--gpus", "12"], "--gpus"),
    (["tiny-moe", "--gpus", "1", "--gpu-memory", "0.03GB"], "--gpus"),
    (["tiny-moe", "--gpu-memory", "0.001GB"], "--gpu-memory"),
    (["tiny-moe", "--gpus-per-node", "0"], "--gpus-per-node"),
    (["tiny-moe", "--seq-len", "100000"], "--seq-len"),
    (["nope"], "preset"),
])
def test_cli_bad_input_one_line_exit_2(argv, flag, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and "\n" not in err
