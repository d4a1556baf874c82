"""Deployment planner: the fewest GPUs that hold a model, its EP/TP/DP degrees, the all-to-all scheme
per MoE layer and a predicted step (training) or token (inference) latency.

Placement follows what `pyramoe.parallel.parallelize` does: with TP = t, attention and dense MLPs
are sliced over t ranks of a node, and each MoE layer's experts go over EP = min(DP, experts) ranks
(DP = N / t). The MoE layers either split their tokens over the TP group (coordinated, the default:
every TP rank holds its EP shard's experts whole) or, with expert-slicing (`--expert-slicing`), every
expert's hidden units over it (a GPU holds 1/t of its EP shard's experts: t times less expert memory,
for the price of an all-reduce of the expert outputs in the TP group and an all-to-all of all the
tokens instead of 1/t of them). Everything else (embeddings, norms, routers, the residual MLP of
PR-MoE layers) is replicated. The planner takes the smallest t that fits, coordinated before
expert-slicing at the same t, since TP adds all-reduces to every layer.

Memory per GPU (bytes): the parameters it holds times `bytes_per_param` (training: 16, fp32 weights
and gradients and two fp32 Adam moments; inference: 2, fp16/bf16 weights). Training with `zero`
(`pyramoe train --zero`, FSDP2): those 16 bytes of 1/DP of what a GPU would hold (each TP rank's
parameters split over its DP group, the experts' EP shard over their DP/EP replicas), plus the
largest MoE layer's expert shard gathered whole, fp32 weights and gradients (8 bytes each: FSDP
gathers a block for its forward and backward; a dense block's own gather is not counted). Then, training, activations of
one micro-batch (Korthikanti et al. 2022, no recomputation, 16-bit: s b h (10 + 24/t + 5 a s /
(h t)) per layer, plus fp32 logits s b V) or, inference, the KV cache of `batch` sequences of
`seq_len` tokens (16-bit, K and V per layer, heads split over t).
A GPU may use `usable_fraction` of its memory (the rest: CUDA context, allocator, workspace).

Latency: the MoE layers' all-to-all from `pyramoe.comm.cost_model` (per layer the faster of flat and
hierarchical; coordinated under TP, or among the EP group's ranks of one TP index on all the tokens
under expert-slicing, plus the ring all-reduce of the expert outputs), TP all-reduces (ring: 2 (t-1)
messages, 2 (t-1)/t of the bytes, two per layer) and a roofline term: training 6 x active parameters
x tokens / (GPUs x peak FLOP/s x MFU); inference the time to read, per token, each GPU's non-expert
weights, the local experts its tokens touch (expected count under uniform routing; 1/t of each under
expert-slicing) and its KV cache from HBM.
Gradient all-reduce, pipeline bubbles, overlap and kernel time are not modelled. Every hardware
figure is an assumption printed with the plan (`Hardware.describe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyramoe.comm import cost_model as cm
from pyramoe.config import ModelConfig
from pyramoe.models import GPT

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    gpu_memory_bytes: float = 80 * GB
    usable_fraction: float = 0.9  # assumed
    network: cm.Network = cm.PUBLISHED_GPU_NETWORK
    hbm_bytes_per_s: float = 2.039e12  # NVIDIA A100 80GB SXM datasheet
    peak_flops: float = 312e12  # NVIDIA A100 dense bf16/fp16 tensor-core peak, datasheet
    mfu: float = 0.4  # assumed model-FLOPs utilization for training

    def describe(self) -> list[str]:
        return [
            f"{self.gpus_per_node} GPUs per node, {self.gpu_memory_bytes / GB:g} GB each, "
            f"{self.usable_fraction:.0%} of it usable (assumed)",
            cm.PUBLISHED_GPU_NETWORK_NOTE if self.network == cm.PUBLISHED_GPU_NETWORK else f"network {self.network}",
            f"HBM {self.hbm_bytes_per_s / 1e12:.3f} TB/s and {self.peak_flops / 1e12:g} TFLOP/s 16-bit peak "
            f"(NVIDIA A100 80GB datasheet figures, assumed for this GPU), training at {self.mfu:.0%} MFU (assumed)",
        ]


@dataclass(frozen=True)
class Workload:
    mode: str = "inference"  # or "train"
    seq_len: int | None = None  # None: the model's max_seq_len
    micro_batch: int = 1  # training: sequences per data-parallel rank per step
    batch: int = 8  # inference: sequences decoding together per data-parallel rank
    bytes_per_param: int | None = None  # None: 16 training, 2 inference
    activation_bytes: int = 2  # 16-bit activations and KV cache
    zero: bool = False  # training: parameters, gradients and Adam moments sharded over DP (FSDP2)

    @property
    def param_bytes(self) -> int:
        return self.bytes_per_param or (16 if self.mode == "train" else 2)


@dataclass
class ModelSizes:
    """Parameter counts by how they are placed."""

    replicated: int  # embeddings, norms, MoE routers / residual MLPs / coefficients
    tp_sliced: int  # attention and dense MLPs
    experts: dict[int, tuple[int, int]]  # MoE layer index -> (experts, parameters of all its experts)
    active: int  # parameters one token passes through
    config: ModelConfig

    @property
    def total(self) -> int:
        return self.replicated + self.tp_sliced + sum(p for _, p in self.experts.values())


def model_sizes(config: ModelConfig) -> ModelSizes:
    """Counts from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(config)
    replicated = tp_sliced = 0
    experts: dict[int, tuple[int, int]] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks" and parts[2] == "ffn" and parts[3] == "experts":
            count, total = experts.get(int(parts[1]), (param.shape[0], 0))
            experts[int(parts[1])] = (count, total + param.numel())
        elif parts[0] == "blocks" and (parts[2] == "attn" or (parts[2] == "ffn" and parts[3] in ("fc_in", "fc_out"))):
            tp_sliced += param.numel()
        else:
            replicated += param.numel()
    active = replicated + tp_sliced
    for index, (count, total) in experts.items():
        active += total // count * config.layers[index].moe.top_k
    return ModelSizes(replicated, tp_sliced, experts, active, config)


@dataclass
class Plan:
    gpus: int
    tp: int
    dp: int
    layer_ep: dict[int, int]
    memory: dict[str, float]  # bytes per GPU by part
    fits: bool
    expert_slicing: bool = False  # MoE layers: experts' hidden units split over TP (else their tokens)
    all_to_all: dict[int, str] = field(default_factory=dict)  # layer -> "flat" / "hierarchical"
    latency: dict[str, float] = field(default_factory=dict)  # seconds by part

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())


def check_inputs(config: ModelConfig, hardware: Hardware, workload: Workload, gpus: int | None) -> None:
    if hardware.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node: must be >= 1, got {hardware.gpus_per_node}")
    if hardware.gpu_memory_bytes <= 0:
        raise ValueError(f"--gpu-memory: must be > 0, got {hardware.gpu_memory_bytes}")
    if workload.mode not in ("train", "inference"):
        raise ValueError(f"--mode: must be train or inference, got {workload.mode!r}")
    if gpus is not None and (gpus < 1 or (gpus > hardware.gpus_per_node and gpus % hardware.gpus_per_node)):
        raise ValueError(f"--gpus: {gpus} must be >= 1 and whole nodes of {hardware.gpus_per_node} GPUs")
    for name in ("micro_batch", "batch"):
        if getattr(workload, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(workload, name)}")
    if workload.seq_len is not None and not 1 <= workload.seq_len <= config.max_seq_len:
        raise ValueError(f"--seq-len: must be in [1, {config.max_seq_len}], got {workload.seq_len}")


def layer_eps(sizes: ModelSizes, dp: int) -> dict[int, int] | None:
    """Each MoE layer's EP degree min(dp, experts); None when it does not split evenly."""
    eps = {}
    for index, (count, _) in sizes.experts.items():
        ep = min(dp, count)
        if count % ep or dp % ep:
            return None
        eps[index] = ep
    return eps


def memory_per_gpu(
    sizes: ModelSizes, tp: int, eps: dict[int, int], workload: Workload, expert_slicing: bool = False, dp: int = 1,
) -> dict[str, float]:
    config = sizes.config
    per_expert_shard = tp if expert_slicing else 1  # expert-slicing: 1/t of each local expert
    params = (sizes.replicated + sizes.tp_sliced / tp
              + sum(sizes.experts[i][1] / (ep * per_expert_shard) for i, ep in eps.items()))
    memory = {"parameters": params * workload.param_bytes}
    if workload.zero and workload.mode == "train":
        # Dense state over DP; an EP shard over its DP/EP replicas: each layer's experts / DP.
        held = (sizes.replicated + sizes.tp_sliced / tp
                + sum(sizes.experts[i][1] / per_expert_shard for i in eps))
        memory["parameters"] = held / dp * workload.param_bytes
        shards = [sizes.experts[i][1] / (ep * per_expert_shard) for i, ep in eps.items()]
        memory["gathered experts"] = max(shards, default=0.0) * 8
    s = workload.seq_len or config.max_seq_len
    h, a, layers = config.d_model, config.n_heads, config.n_layers
    if workload.mode == "train":
        b = workload.micro_batch
        per_layer = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
        memory["activations"] = layers * per_layer + 4 * s * b * config.vocab_size
    else:
        kv_width = config.kv_heads * config.attn_head_dim / tp
        memory["kv_cache"] = 2 * layers * kv_width * s * workload.batch * workload.activation_bytes
    return memory


def candidate_counts(gpus_per_node: int, limit: int = 65536) -> list[int]:
    """1, 2, 4, ... below a node, then whole nodes in powers of two."""
    counts = [n for n in (2**i for i in range(17)) if n < gpus_per_node]
    counts += [gpus_per_node * 2**i for i in range(17) if gpus_per_node * 2**i <= limit]
    return counts


def tp_options(config: ModelConfig, gpus: int, gpus_per_node: int) -> list[int]:
    out = []
    t = 1
    while t <= min(gpus, gpus_per_node):
        if gpus % t == 0 and config.n_heads % t == 0 and config.kv_heads % t == 0:
            out.append(t)
        t *= 2
    return out


def plan_at(
    sizes: ModelSizes, gpus: int, hardware: Hardware, workload: Workload, expert_slicing: bool = True
) -> Plan | None:
    """The fitting plan with the smallest TP at `gpus` GPUs - at one TP, MoE tokens split over it
    before expert-slicing (when allowed and the experts' hidden units split over t) - else the
    smallest-memory one (fits=False)."""
    best = None
    for tp in tp_options(sizes.config, gpus, hardware.gpus_per_node):
        eps = layer_eps(sizes, gpus // tp)
        if eps is None:
            continue
        slicings = [False] + ([True] if expert_slicing and tp > 1 and _experts_slice(sizes.config, tp) else [])
        for slicing in slicings:
            memory = memory_per_gpu(sizes, tp, eps, workload, slicing, gpus // tp)
            fits = sum(memory.values()) <= hardware.gpu_memory_bytes * hardware.usable_fraction
            plan = Plan(gpus, tp, gpus // tp, eps, memory, fits, slicing)
            if fits:
                return plan
            if best is None or plan.memory_total < best.memory_total:
                best = plan
    return best


def _experts_slice(config: ModelConfig, tp: int) -> bool:
    """Every MoE layer's expert hidden size splits over t (what `SlicedExperts` needs)."""
    return all((layer.moe.expert_d_ff or config.d_ff) % tp == 0 for layer in config.layers if layer.moe is not None)


def smallest_plan(sizes: ModelSizes, hardware: Hardware, workload: Workload, expert_slicing: bool = True) -> Plan:
    for gpus in candidate_counts(hardware.gpus_per_node):
        plan = plan_at(sizes, gpus, hardware, workload, expert_slicing)
        if plan is not None and plan.fits:
            return plan
    raise ValueError("--gpu-memory: the model does not fit on any GPU count up to 65536 with this placement")


def add_latency(plan: Plan, sizes: ModelSizes, hardware: Hardware, workload: Workload) -> None:
    """Fill plan.all_to_all and plan.latency (seconds per training step or per generated token)."""
    config = sizes.config
    train = workload.mode == "train"
    tokens = workload.micro_batch * (workload.seq_len or config.max_seq_len) if train else workload.batch
    nbytes = tokens * config.d_model * workload.activation_bytes
    passes = 2 if train else 1  # backward repeats the forward exchanges
    a2a = reduce = 0.0
    for index, ep in plan.layer_ep.items():
        top_k = config.layers[index].moe.top_k
        best = _best_scheme(ep, plan.tp, hardware, nbytes * top_k, plan.expert_slicing)
        plan.all_to_all[index] = best[0]
        a2a += passes * best[1]
        if plan.expert_slicing:  # the partial expert outputs of the rows a GPU received
            reduce += passes * _ring_all_reduce(plan.tp, nbytes * top_k, hardware)
    plan.latency["all-to-all"] = a2a
    if plan.expert_slicing:
        plan.latency["expert-slicing all-reduce"] = reduce
    plan.latency["tp all-reduce"] = passes * 2 * config.n_layers * _ring_all_reduce(plan.tp, nbytes, hardware)
    if train:
        flops = 6 * sizes.active * tokens * plan.dp
        plan.latency["compute (roofline)"] = flops / (plan.gpus * hardware.peak_flops * hardware.mfu)
    else:
        read = bytes_read_per_token(plan, sizes, workload) + plan.memory["kv_cache"]
        plan.latency["HBM reads (roofline)"] = read / hardware.hbm_bytes_per_s


def bytes_read_per_token(plan: Plan, sizes: ModelSizes, workload: Workload) -> float:
    """Weight bytes a GPU reads in one decode step: its non-expert weights, and in each MoE layer the
    local experts its tokens touch - m = batch x top_k tokens over L local experts, uniformly, touch
    L (1 - (1 - 1/L)^m) of them on average."""
    params = sizes.replicated + sizes.tp_sliced / plan.tp
    shard = plan.tp if plan.expert_slicing else 1
    for index, ep in plan.layer_ep.items():
        experts, total = sizes.experts[index]
        local = experts // ep
        arriving = workload.batch * sizes.config.layers[index].moe.top_k
        touched = local * (1 - (1 - 1 / local) ** arriving)
        params += touched * total / experts / shard
    return params * workload.param_bytes


def _best_scheme(
    ep: int, tp: int, hardware: Hardware, nbytes: float, expert_slicing: bool = False
) -> tuple[str, float]:
    """(scheme, seconds) of the faster of flat and hierarchical for one MoE layer's forward. Under
    expert-slicing the exchange runs among the EP group's ranks of one TP index (G / t of them per
    node) on all the tokens; otherwise, under TP, coordinated (1/t of the tokens, then all-gather)."""
    if ep == 1:
        return "none", 0.0
    if expert_slicing:
        per_node = max(1, hardware.gpus_per_node // tp)
        options = [(kind, cm.predict(hardware.network, cm.round_trip(kind, ep, per_node, nbytes)))
                   for kind in ("flat", "hierarchical")]
        return min(options, key=lambda o: o[1])
    p, prefix = ep * tp, ("coordinated" if tp > 1 else "")
    options = []
    for kind in ("flat", "hierarchical"):
        scheme = kind if not prefix else (prefix if kind == "flat" else f"{prefix}-{kind}")
        phases = cm.round_trip(scheme, p, hardware.gpus_per_node, nbytes, tp)
        options.append((kind, cm.predict(hardware.network, phases)))
    return min(options, key=lambda o: o[1])


def _ring_all_reduce(tp: int, nbytes: float, hardware: Hardware) -> float:
    if tp == 1:
        return 0.0
    link = hardware.network.intra
    return hardware.network.call_s + 2 * (tp - 1) * (link.alpha_s + nbytes / tp * link.beta_s_per_byte)


def make_plan(
    config: ModelConfig, hardware: Hardware, workload: Workload, gpus: int | None = None, expert_slicing: bool = True
) -> tuple[Plan, Plan, ModelSizes]:
    """(the plan at `gpus` - or at the smallest count when None -, the smallest plan, sizes);
    `expert_slicing=False` keeps every MoE layer's experts whole under TP."""
    check_inputs(config, hardware, workload, gpus)
    sizes = model_sizes(config)
    smallest = smallest_plan(sizes, hardware, workload, expert_slicing)
    plan = smallest if gpus is None else plan_at(sizes, gpus, hardware, workload, expert_slicing)
    if plan is None or not plan.fits:
        if plan is None:
            raise ValueError(f"--gpus: the experts and heads do not split evenly over {gpus} GPUs; "
                             f"the smallest count that holds the model is {smallest.gpus}")
        raise ValueError(f"--gpus: {gpus} GPUs do not hold the model ({plan.memory_total / GB:.1f} GB per GPU); "
                         f"the smallest count is {smallest.gpus}")
    for p in {id(plan): plan, id(smallest): smallest}.values():
        add_latency(p, sizes, hardware, workload)
    return plan, smallest, sizes
