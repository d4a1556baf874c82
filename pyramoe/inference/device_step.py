"""The engine's step for accelerators (`DeviceStep`): a whole forward in fixed shapes over static
buffers, so that on CUDA each decode bucket is captured once as a CUDA graph and every later step
of that bucket is one graph replay (gpt-fast's and vLLM's way), with no host sync inside.

- Rows are padded to buckets (1, 2, 4, 8, ...: `bucket`), and so are the step's sequences
  (groups), the longest run of one sequence and the key blocks attention reads; padding repeats a
  real row (valid numbers, outputs never read, never counted, writes identical to that row's).
- The host plans the step in one int64 tensor (`StepPlan`), copied to the device in one transfer;
  attention reads each sequence's blocks of the paged cache (`pyramoe.layers.paged_attention`)
  and MoE layers run `DeviceMoE` (routing table, offsets and grouped GEMMs on the device).
- Each logit row's token is chosen on the device: its argmax, or, for the rows the caller asks to
  sample (`sampling_R`), a draw by `pyramoe.inference.device_sampling` (temperature, top-k, top-p,
  the request's seed and a counter), all rows in one batched call. Rows with presence/frequency
  penalties are penalised first, from per-slot counts of the request's generated tokens kept on
  the device ([slots, V] int32: set once when a penalised request starts in a slot,
  `set_output_counts`, then counted inside each step from the tokens it chooses).
- Log-probabilities (`logprobs_R`: the rows asked for) are computed on the device too: fp32
  log-softmax of the row's logits (before penalties), the asked token's value and the
  `MAX_LOGPROBS` likeliest, read back with the chosen tokens as one int64 [R, 2 + 2K] tensor (fp32
  as their bits). The only sync is that read-back, once per step; the logits stay on the device.
- A model `distribute`d over processes (expert or tensor parallel) runs the same step, eagerly (no
  graphs): attention's and dense layers' TP collectives run inside their modules; a MoE layer
  split over TP ranks with local experts runs `DeviceMoE` on this rank's share of the tokens and
  all-gathers the outputs (no host sync); one with experts over EP ranks (or sliced over TP
  ranks) runs its own forward, whose all-to-all reads its row splits back once per layer (a sync
  the step adds per such layer; expert slicing's grouped GEMMs read their counts back too).
  The source rank's choices are broadcast to every rank before they are read back.

On the CPU the same code runs eagerly (no capture): that is how CI tests it.

Legend: N rows (bucketed), R logit rows, G groups, T rows per group, M key blocks per group, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from pyramoe.inference.device_sampling import (
    FIELDS,
    RowSampling,
    SamplingBatch,
    penalise,
    penalty_mode,
    sample,
    sampling_fields,
    sampling_mode,
)
from pyramoe.inference.kv_cache import PagedKVCache, SlotKVCache
from pyramoe.inference.requests import Logprob
from pyramoe.inference.sampling import MAX_LOGPROBS
from pyramoe.inference.steps import check_rows
from pyramoe.layers.attention import CausalSelfAttention
from pyramoe.layers.device_moe import DeviceMoE, device_moe_unsupported, spread_over_processes
from pyramoe.layers.mla import LatentAttention
from pyramoe.layers.moe import MoELayer
from pyramoe.layers.paged_attention import PagedRows, paged_attention, paged_latent_attention
from pyramoe.models import GPT


def bucket(n: int, cap: int) -> int:
    """The bucket of n: the next power of two, or `cap` where that is beyond it."""
    return min(1 << (n - 1).bit_length(), cap) if n <= cap else n


def device_step_unsupported(model: GPT, cache: SlotKVCache) -> str | None:
    """Why `DeviceStep` cannot run this model over this cache, or None."""
    if not isinstance(cache, PagedKVCache):
        return "it needs the paged KV cache"
    if cache.int8:
        return "an int8 KV cache (kv_cache_dtype='int8' runs on the PyTorch or native step)"
    for block in model.blocks:
        if type(block.attn) not in (CausalSelfAttention, LatentAttention):
            return f"{type(block.attn).__name__} (only multi-head, grouped-query and latent attention)"
        if block.is_moe and not spread_over_processes(block.ffn):
            reason = device_moe_unsupported(block.ffn)
            if reason is not None:
                return reason
    return None


class StepPlan:
    """One step's rows as fixed-shape int64 fields of one host tensor (one copy to the device).
    `sampling`: `device_sampling.sampling_mode` of the logit rows; `penalties`: some row is
    penalised; `logprobs`: some row asks for log-probabilities (all three part of `key`: a CUDA graph
    per bucket and mode). `real_rows`: the rows before padding."""

    FIELDS = ("tokens_N", "positions_N", "real_N", "write_block_N", "write_offset_N", "write_source_N",
              "cell_of_row_N", "grid_row_GT", "key_limit_GT", "blocks_GM", "logit_rows_R", "count_slot_R",
              "logprob_target_R", "sampling_FR")

    def __init__(self, rows: int, groups: int, per_group: int, blocks: int, logit_rows: int, sampling: int = 0,
                 penalties: bool = False, logprobs: bool = False, real_rows: int | None = None):
        self.shape = (rows, groups, per_group, blocks, logit_rows)
        self.sampling, self.penalties, self.logprobs = sampling, penalties, logprobs
        self.key = (*self.shape, sampling, penalties, logprobs)
        self.real_rows = rows if real_rows is None else real_rows
        n, cells, r = rows, groups * per_group, logit_rows
        self.sizes = (n, n, n, n, n, n, n, cells, cells, groups * blocks, r, r, r, FIELDS * r)
        self.decode = per_group == 1

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        _, groups, per_group, blocks, _ = self.shape
        fields = dict(zip(self.FIELDS, flat.split(self.sizes)))
        for name, width in (("grid_row_GT", per_group), ("key_limit_GT", per_group), ("blocks_GM", blocks)):
            fields[name] = fields[name].view(groups, width)
        fields["sampling_FR"] = fields["sampling_FR"].view(FIELDS, self.shape[4])
        return fields


class DeviceStep:
    """`ModelStep` for any torch device, for one model over a paged cache: see the module doc.
    `graphs`: capture decode buckets as CUDA graphs (default: on CUDA, on one process).
    `logits_source`: under torchrun (a model `distribute`d over the ranks), the rank whose chosen
    tokens and log-probabilities every rank takes, so a last-bit difference never makes ranks diverge."""

    name = "device"

    def __init__(self, model: GPT, cache: PagedKVCache, max_rows: int, graphs: bool | None = None,
                 logits_source: int | None = None):
        reason = device_step_unsupported(model, cache)
        if reason is not None:
            raise ValueError(f"device step: {reason}")
        self.model, self.cache, self.max_rows, self.logits_source = model, cache, max_rows, logits_source
        self.device = next(model.parameters()).device
        spread = any(block.is_moe and spread_over_processes(block.ffn) for block in model.blocks)
        # A spread MoE layer's exchange takes its row splits on the host: not a graph's fixed shapes.
        self.graphs = self.device.type == "cuda" and logits_source is None and not spread if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("device step: graphs are captured on CUDA only")
        if self.graphs and (spread or logits_source is not None):
            raise ValueError("device step: graphs are not captured for a model spread over processes")
        self._moe = {i: _moe_runner(block.ffn) for i, block in enumerate(model.blocks) if block.is_moe}
        self._count_row = {layer: row for row, layer in enumerate(self._moe)}
        experts = max((block.ffn.num_experts for block in model.blocks if block.is_moe), default=1)
        self._counts = torch.zeros(len(self._moe), experts, dtype=torch.int64, device=self.device)
        # Each slot's request's generated tokens, counted (penalties): set at the request's first
        # penalised step in the slot (`set_output_counts`), then counted inside every step.
        self.vocab = model.config.vocab_size
        self._output_counts = torch.zeros(cache.slots, self.vocab, dtype=torch.int32, device=self.device)
        self.logprobs: list[Logprob | None] | None = None  # the last forward's, where asked (`forward`)
        if model.rope is not None:  # its frequencies on the device: moved once, not by every step
            model.rope.inv_freq = model.rope.inv_freq.to(self.device)
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.samples = True  # the engine may hand it rows to sample (`sampling_R`)
        self._pool = None
        self._host: torch.Tensor | None = None  # pinned on CUDA: the plan's copy runs asynchronously

    @torch.no_grad()
    def forward(
        self, tokens_N: Sequence[int], slots_N: Sequence[int], positions_N: Sequence[int], logit_rows_R: Sequence[int],
        sampling_R: Sequence[RowSampling | None] | None = None, logprobs_R: Sequence[int | None] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """As `ModelStep.forward`; the ids returned are each logit row's argmax, or its draw where
        `sampling_R` (one entry per logit row, None: greedy) asks for one, after the row's presence
        and frequency penalties where its settings have them (counted from `set_output_counts` on).
        `logprobs_R` (one entry per logit row; None: not wanted): the token whose log-probability
        the row gives (-1: the token chosen), computed on the device with the `MAX_LOGPROBS`
        likeliest alternatives; they are in `self.logprobs` after the call (None where not asked)."""
        check_rows(tokens_N, slots_N, positions_N, logit_rows_R, self.max_rows)
        if max(positions_N) >= self.cache.max_len:
            raise ValueError(f"step: position {max(positions_N)} is outside the cache ({self.cache.max_len} positions)")
        for name, rows in (("sampling", sampling_R), ("logprobs", logprobs_R)):
            if rows is not None and len(rows) != len(logit_rows_R):
                raise ValueError(f"step: {len(rows)} {name} rows for {len(logit_rows_R)} logit rows")
        plan, host = self._plan(tokens_N, slots_N, positions_N, logit_rows_R, sampling_R, logprobs_R)
        logits_RV, out_RC = self._device_forward(plan, host)
        picks = len(logit_rows_R)
        out_RC = out_RC[:picks].cpu()  # the step's one sync: the chosen tokens (and log-probabilities)
        self.logprobs = _logprobs(out_RC, logprobs_R) if plan.logprobs else None
        return logits_RV[:picks], out_RC[:, 0].tolist()

    def set_output_counts(self, slot: int, output_ids: Sequence[int]) -> None:
        """Count `output_ids` as the tokens slot `slot`'s request has generated (its penalties'
        counts): once when a penalised request starts in a slot (or again after a preemption), one
        copy outside any step; the steps count the tokens they choose for it from then on."""
        counts_V = self._output_counts[slot]
        counts_V.zero_()
        if output_ids:
            ids = torch.tensor(list(output_ids), dtype=torch.int64, device="cpu").to(self.device)
            counts_V.index_add_(0, ids, torch.ones(ids.shape, dtype=counts_V.dtype, device=self.device))

    def _device_forward(self, plan: StepPlan, host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The plan's one copy to the device, the forward (a graph replay for decode buckets on CUDA)
        and the tokens' choice: logits [R bucket, V] and `_run`'s [R bucket, C] choices, both on the
        device."""
        if self.graphs and plan.decode:
            return self._replay(plan, host)
        flat = host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)
        return self._run(plan, flat)

    def expert_counts(self) -> torch.Tensor:
        return self._counts.cpu()

    # -- planning (host) ---------------------------------------------------------------------------

    def _plan(self, tokens_N: Sequence[int], slots_N: Sequence[int], positions_N: Sequence[int],
              logit_rows_R: Sequence[int], sampling_R: Sequence[RowSampling | None] | None = None,
              logprobs_R: Sequence[int | None] | None = None) -> tuple[StepPlan, torch.Tensor]:
        rows = len(tokens_N)
        runs = _runs(slots_N, positions_N)  # (first row, length) per group
        longest = max(length for _, length in runs)
        bs = self.cache.block_size
        blocks_needed = max(positions_N) // bs + 1
        held = self.cache._blocks
        if any(p // bs >= len(held[s]) for s, p in zip(slots_N, positions_N)):
            raise ValueError("step: a row's position is past the blocks its slot holds (reserve or extend first)")
        plan = StepPlan(bucket(rows, self.max_rows), bucket(len(runs), self.max_rows), bucket(longest, self.max_rows),
                        bucket(blocks_needed, self.cache.max_blocks), bucket(len(logit_rows_R), self.max_rows),
                        sampling_mode(sampling_R or []), penalty_mode(sampling_R or []),
                        any(t is not None for t in logprobs_R or []), rows)
        n_pad, g_pad, t_pad, m_pad, r_pad = plan.shape
        pad = lambda values, size: list(values) + [values[0]] * (size - len(values))  # noqa: E731
        table = self.cache.block_table
        slot_G = [slots_N[first] for first, _ in runs]
        write_block = [held[s][p // bs] for s, p in zip(slots_N, positions_N)]
        grid_row = [first + min(t, length - 1) for first, length in runs for t in range(t_pad)]
        cell_of_row = [g * t_pad + t for g, (_, length) in enumerate(runs) for t in range(length)]
        fields = (
            pad(list(tokens_N), n_pad), pad(list(positions_N), n_pad), [1] * rows + [0] * (n_pad - rows),
            pad(write_block, n_pad), pad([p % bs for p in positions_N], n_pad), pad(list(range(rows)), n_pad),
            pad(cell_of_row, n_pad), pad(grid_row, g_pad * t_pad),
            pad([positions_N[r] for r in grid_row], g_pad * t_pad),
        )
        # The plan is built on the host, in one (pinned on CUDA) buffer copied to the device once per step.
        host = self._host_buffer(plan.numel)
        offset = 0
        for values in fields:
            host[offset : offset + len(values)] = torch.tensor(values, dtype=torch.int64, device="cpu")
            offset += len(values)
        blocks_GM = table[pad(slot_G, g_pad), :m_pad]  # entries past a slot's blocks are masked out
        host[offset : offset + blocks_GM.numel()] = blocks_GM.reshape(-1)
        offset += blocks_GM.numel()
        # A prompt chunk short of its prompt's end asks for no logits: row 0 stands in, never returned.
        logit_rows = list(logit_rows_R) or [0]
        targets = [-1 if t is None else t for t in logprobs_R or [None] * len(logit_rows)]
        for values in (logit_rows, [slots_N[r] for r in logit_rows], targets):
            host[offset : offset + r_pad] = torch.tensor(pad(values, r_pad), dtype=torch.int64, device="cpu")
            offset += r_pad
        # Padding rows sample greedily: their tokens are never read.
        sampling = list(sampling_R or [None] * len(logit_rows_R)) + [None] * (r_pad - len(logit_rows_R))
        host[offset : offset + FIELDS * r_pad] = torch.tensor(sampling_fields(sampling), dtype=torch.int64,
                                                              device="cpu").view(-1)
        return plan, host[: plan.numel]

    def _host_buffer(self, numel: int) -> torch.Tensor:
        if self._host is None or self._host.numel() < numel:
            pinned = self.device.type == "cuda"
            self._host = torch.empty(max(numel, 4096), dtype=torch.int64, device="cpu", pin_memory=pinned)
        return self._host

    # -- the forward (device) ----------------------------------------------------------------------

    def _run(self, plan: StepPlan, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward on the plan's fields (a device tensor); logits [R bucket, V] fp32 and each
        row's choice (`_choose`)."""
        f = plan.views(flat)
        model, cache = self.model, self.cache
        rows = PagedRows(f["write_block_N"], f["write_offset_N"], f["write_source_N"], f["grid_row_GT"],
                         f["key_limit_GT"], f["cell_of_row_N"], f["blocks_GM"], cache.block_size)
        x_ND = model.tok_emb(f["tokens_N"])
        rope = None
        if model.rope is None:
            x_ND = x_ND + model.pos_emb(f["positions_N"])
        else:
            rope = model.rope.cos_sin(f["positions_N"].unsqueeze(0), x_ND.dtype)
        real_N = f["real_N"].bool()
        for i, block in enumerate(model.blocks):
            attend = paged_latent_attention if isinstance(block.attn, LatentAttention) else paged_attention
            x_ND = x_ND + attend(block.attn, block.ln_attn(x_ND), rope, cache.keys[i], cache.values[i], rows)
            h_ND = block.ln_ffn(x_ND)
            if block.is_moe:
                moe = self._moe[i]
                h_ND, routed_E = moe(h_ND, real_N) if isinstance(moe, DeviceMoE) else moe(h_ND, plan.real_rows)
                self._counts[self._count_row[i], : routed_E.numel()] += routed_E
            else:
                h_ND = block.ffn(h_ND)
            x_ND = x_ND + h_ND
        hidden_RD = model.ln_f(x_ND.index_select(0, f["logit_rows_R"]))
        logits_RV = model.lm_head(hidden_RD).float()
        return logits_RV, self._choose(plan, f, logits_RV)

    def _choose(self, plan: StepPlan, f: dict[str, torch.Tensor], logits_RV: torch.Tensor) -> torch.Tensor:
        """Each logit row's token and, where the plan asks, log-probabilities, as one int64 tensor
        [R bucket, C] (the step's one read-back): column 0 the token; with `plan.logprobs`, then the
        target's log-probability, the MAX_LOGPROBS likeliest ids and their log-probabilities (fp32
        bit patterns). Penalties apply to the choice only (log-probabilities are the model's)."""
        batch = SamplingBatch.from_fields(f["sampling_FR"], truncates=plan.sampling == 2)
        scored_RV = logits_RV
        if plan.penalties:
            scored_RV = penalise(logits_RV, self._output_counts.index_select(0, f["count_slot_R"]), batch)
        tokens_R = scored_RV.argmax(-1) if plan.sampling == 0 else sample(scored_RV, batch)
        out_RC = tokens_R.unsqueeze(1)
        if plan.logprobs:
            logp_RV = torch.log_softmax(logits_RV, dim=-1)
            target_R = torch.where(f["logprob_target_R"] < 0, tokens_R, f["logprob_target_R"])
            top_RK, ids_RK = torch.topk(logp_RV, min(MAX_LOGPROBS, logp_RV.shape[1]))
            out_RC = torch.cat([out_RC, _bits(logp_RV.gather(1, target_R.unsqueeze(1))), ids_RK, _bits(top_RK)], dim=1)
        if self.logits_source is not None:  # every rank takes the source's choices
            dist.broadcast(out_RC, src=self.logits_source)
        if plan.penalties:  # the chosen tokens counted for the penalised rows' next steps
            counted_R = ((batch.presence_R != 0) | (batch.frequency_R != 0)).to(self._output_counts.dtype)
            self._output_counts.view(-1).index_add_(0, f["count_slot_R"] * self.vocab + out_RC[:, 0], counted_R)
        return out_RC

    def _replay(self, plan: StepPlan, host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode bucket (and sampling mode): captured at its first step, replayed after (CUDA)."""
        graph = self._graphs.get(plan.key)
        if graph is None:
            graph = self._capture(plan, host)
            self._graphs[plan.key] = graph
        cuda_graph, flat, logits_RV, out_RC = graph
        flat.copy_(host, non_blocking=True)
        cuda_graph.replay()
        return logits_RV, out_RC

    def _capture(self, plan: StepPlan, host: torch.Tensor) -> tuple:
        """Warm up on a side stream (lazy allocations, kernel choice), then capture. The warm-up
        runs the step's own rows (its cache writes are the ones the replay makes again) and its
        expert and output token counts are taken back."""
        flat = host.to(self.device)
        counts, output_counts = self._counts.clone(), self._output_counts.clone()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(plan, flat)
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph, pool=self._pool):
            logits_RV, out_RC = self._run(plan, flat)
        self._counts.copy_(counts)
        self._output_counts.copy_(output_counts)
        return cuda_graph, flat, logits_RV, out_RC


def _moe_runner(layer: MoELayer) -> DeviceMoE | _SpreadMoE | _SplitDeviceMoE:
    """How the step runs a MoE layer: `DeviceMoE` on one process; split over TP ranks with local
    experts, `DeviceMoE` on this rank's share (no host sync); with its experts over EP ranks or
    sliced over TP ranks, the layer's own forward."""
    if not spread_over_processes(layer):
        return DeviceMoE(layer)
    if layer.token_split is not None and device_moe_unsupported(layer, token_split=True) is None:
        return _SplitDeviceMoE(layer)
    return _SpreadMoE(layer)


class _SpreadMoE:
    """A MoE layer with experts spread over processes (EP, or sliced over TP), run by its own
    forward on the real rows (every rank of the job runs the same rows in lockstep: each exchange
    sees the tokens the PyTorch step routes). Its all-to-all takes the row splits on the host: one
    sync per layer (`AllToAllDispatcher.dispatch`). Padding rows repeat row 0, so they get row 0's
    output."""

    def __init__(self, layer: MoELayer):
        self.layer = layer

    def __call__(self, h_ND: torch.Tensor, real_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        y_ND, stats = self.layer(h_ND[:real_rows])
        return _pad_rows(y_ND, h_ND.shape[0]), stats.routed_per_expert


class _SplitDeviceMoE:
    """A MoE layer whose tokens split over a TP group, its experts local (TP without EP): this rank's
    share of the real rows (as the layer's `token_split` cuts it) through `DeviceMoE`, then every
    share all-gathered: collectives only, no host sync. Counts are this rank's share's, as the
    layer's own forward counts them."""

    def __init__(self, layer: MoELayer):
        self.moe, self.split = DeviceMoE(layer, token_split=True), layer.token_split

    def __call__(self, h_ND: torch.Tensor, real_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        real_ND = h_ND[:real_rows]
        if not self.split.splits(real_rows):  # fewer tokens than ranks: every rank routes them all
            y_ND, routed_E = self.moe(real_ND)
        else:
            y_ND, routed_E = self.moe(self.split.split(real_ND))
            y_ND = self.split.gather(y_ND, real_rows)
        return _pad_rows(y_ND, h_ND.shape[0]), routed_E


def _pad_rows(y_ND: torch.Tensor, rows: int) -> torch.Tensor:
    """The real rows' outputs, then row 0's again for each padding row (padding repeats row 0)."""
    return torch.cat([y_ND, y_ND[:1].expand(rows - y_ND.shape[0], -1)])


def _bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 values as their bit patterns in int64 (exact): they ride in the step's int64 read-back."""
    return x.float().contiguous().view(torch.int32).to(torch.int64)


def _logprobs(out_RC: torch.Tensor, logprobs_R: Sequence[int | None]) -> list[Logprob | None]:
    """`_choose`'s log-probability columns (a host tensor) as each asked row's (log-probability,
    [(id, log-probability)] of the likeliest), None for the others."""
    top = (out_RC.shape[1] - 2) // 2
    values_RK = out_RC[:, [1, *range(2 + top, 2 + 2 * top)]].to(torch.int32).view(torch.float32).tolist()
    ids_RK = out_RC[:, 2 : 2 + top].tolist()
    return [None if target is None else (values[0], list(zip(ids, values[1:])))
            for target, values, ids in zip(logprobs_R, values_RK, ids_RK)]


def _runs(slots_N: Sequence[int], positions_N: Sequence[int]) -> list[tuple[int, int]]:
    """(first row, length) of each run of one slot at consecutive positions."""
    runs: list[tuple[int, int]] = []
    seen: set[int] = set()
    for row, (slot, position) in enumerate(zip(slots_N, positions_N)):
        if runs:
            first, length = runs[-1]
            if slots_N[first] == slot and positions_N[first] + length == position:
                runs[-1] = (first, length + 1)
                continue
        if slot in seen:
            raise ValueError(f"step: rows of slot {slot} must be consecutive, at consecutive positions")
        seen.add(slot)
        runs.append((row, 1))
    return runs
