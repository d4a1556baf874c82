"""The training loop: seeded batches, AdamW, warmup + cosine LR, accumulation, clipping, periodic
evaluation and checkpoints, metrics.jsonl, a progress bar, and a clean stop on SIGINT/SIGTERM.

Everything that decides the next loss - weights, optimizer moments, step, the batch generator and the
global torch RNG (dropout, router noise) - is checkpointed, so a resumed run reproduces an
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import pyramoe.train.checkpoint as ckpt_io
from pyramoe.config import ModelConfig
from pyramoe.data import PreparedData
from pyramoe.models import GPT, GPTOutput
from pyramoe.parallel import ParallelState
from pyramoe.parallel.launch import DistRun, apply_parallelism
from pyramoe.train.config import RunConfig
from pyramoe.train.distributed import (
    clean_stale_once,
    fsdp_shards,
    model_parts,
    optimizer_parts,
    optimizer_rank_parts,
    rank_parts,
)
from pyramoe.train.evaluate import EvalResult, RankShare, autocast, evaluate
from pyramoe.train.metrics import METRICS_FILE, MetricsLog
from pyramoe.train.optim import LRPlan, apply_settings, make_optimizer, resume_plan, set_lr
from pyramoe.train.run_lock import RunLock

Batch = tuple[torch.Tensor, torch.Tensor]
# A loss hook turns the model's output on one micro-batch (x, y) into the objective to minimise - the
# trainer adds the MoE aux loss - and named scalars to log, "ce" among them. Distillation plugs in here.
LossFn = Callable[[GPTOutput, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def cross_entropy_loss(
    out: GPTOutput, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The default objective: next-token cross-entropy in fp32, averaged over tokens."""
    logits = out.logits.float()
    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
    return ce, {"ce": ce.detach()}


@dataclass
class StepStats:
    loss: float  # the hook's objective + aux losses, what was optimised
    ce: float
    aux: float
    grad_norm: float
    drop_rate: float  # mean over MoE layers and micro-batches
    terms: dict[str, float] = field(default_factory=dict)  # the hook's other logged scalars (e.g. kd)
    routed: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> assignments per expert, this rank
    # From the end of the last backward to the optimizer step: the gradient reduction the backward
    # did not hide, and clipping.
    after_backward_s: float = 0.0


def train_step(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    grad_clip: float = 0.0,
    precision: str = "fp32",
    loss_fn: LossFn = cross_entropy_loss,
    parallel: ParallelState | None = None,
) -> StepStats:
    """One optimizer step over the micro-batches (gradient accumulation: their mean loss). With
    `parallel`, gradients are reduced over the ranks and the norm is the global one."""
    batches = list(batches)
    device = next(model.parameters()).device
    n = len(batches)
    loss_sum = aux_sum = drop_sum = 0.0
    drop_count = 0
    routed: dict[int, torch.Tensor] = {}
    term_sums: dict[str, float] = {}
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        with autocast(precision, device.type):
            out = model(x)
        loss, terms = loss_fn(out, x, y)
        aux = out.aux_loss.float()
        if parallel is not None:
            parallel.before_backward(model, last=i == n - 1)
        ((loss + aux) / n).backward()
        loss_sum += loss.item()
        # Logged: the aux losses' value, not this rank's weighted term of the objective (1/TP of it
        # under tensor parallelism).
        aux_sum += (out.aux_value if out.aux_value is not None else aux).item()
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + float(value)
        for index, stats in out.moe_stats.items():
            drop_sum += stats.dropped_fraction.item()
            drop_count += 1
            routed[index] = routed[index] + stats.routed_per_expert if index in routed else stats.routed_per_expert
    backward_end = time.perf_counter()
    if parallel is not None:
        parallel.sync_gradients(model)  # also before a raise: no reduction is left in flight
    if not math.isfinite(loss_sum + aux_sum):
        optimizer.zero_grad(set_to_none=True)
        raise ValueError("loss is not finite; lower train.lr or raise train.warmup")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else math.inf  # inf: measure the norm, never scale
    if parallel is not None:
        grad_norm = float(parallel.clip_grad_norm_(model, max_norm))
    else:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    # float(norm) above waited for the device: the gradients are reduced and clipped by now
    after_backward_s = time.perf_counter() - backward_end
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    means = {name: total / n for name, total in term_sums.items()}
    return StepStats(
        loss=(loss_sum + aux_sum) / n,
        ce=means.pop("ce", math.nan),
        aux=aux_sum / n,
        grad_norm=grad_norm,
        drop_rate=drop_sum / drop_count if drop_count else 0.0,
        terms=means,
        routed=routed,
        after_backward_s=after_backward_s,
    )


@dataclass
class FitResult:
    step: int
    checkpoint: Path | None
    stopped_by: int | None  # the signal that stopped training early, if any
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, this session
    evals: dict[int, EvalResult] = field(default_factory=dict)  # step -> validation result
    seconds: float = 0.0


class Trainer:
    """One run: model, optimizer, data and bookkeeping. Build it with `session.create_trainer`,
    which prepares the data and restores a checkpoint; `fit` trains, evaluates and saves."""

    def __init__(
        self, run: RunConfig, model_config: ModelConfig, data: PreparedData, progress: bool = True,
        device: torch.device | None = None, dist_run: DistRun | None = None, ep: int = 1,
        hierarchical: bool = False, expert_slicing: bool = False, zero: bool = False,
    ):
        self.run = run
        self.config = run.train
        self.data = data
        self.dist = dist_run
        self.is_main = dist_run is None or dist_run.is_main
        self.progress = progress and self.is_main
        self.run_dir = run.run_dir
        self.device = device or torch.device("cpu")
        torch.manual_seed(self.config.seed)  # every rank builds the same model, then keeps its shard
        self.model = GPT(model_config)
        if dist_run is not None:
            apply_parallelism(dist_run, self.model, ep, hierarchical, expert_slicing, zero)
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, self.config)
        biased = [b for b in self.model.blocks if b.is_moe and b.ffn.config.score_correction_bias]
        if self.config.router_bias_rate > 0 and not biased:
            raise ValueError("train.router_bias_rate: no MoE layer has a score bias to move; "
                             "set model.moe.score_correction_bias=true")
        self.dp = dist_run.dp if dist_run is not None else 1
        self.tokens_per_step = self.config.tokens_per_step * self.dp
        self.lr_plan = LRPlan.fresh(self.config)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.train_data = data.train_dataset()
        self.val_data = data.val_dataset()
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE, enabled=self.is_main)
        self.tokenizer_file = self.run_dir / ckpt_io.TOKENIZER_FILE
        self.step = 0
        self.tokens_seen = 0
        self.saved_step: int | None = None
        # Resumed from an earlier checkpoint of this run directory: the step after which its
        # checkpoints are an abandoned continuation, deleted by the next save.
        self.discard_after: int | None = None
        self.evaluated_step: int | None = None
        self.last_eval: EvalResult | None = None
        self.stop_signal: int | None = None
        self.run_lock: RunLock | None = None  # RUN_DIR's lock, taken by `session.create_trainer`

    def close(self) -> None:
        """Release the run directory (another run may use it then)."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def checkpoint_root(self) -> Path:
        return ckpt_io.checkpoint_root(self.run_dir)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all data-parallel ranks (kept when resuming)."""
        return self.config.batch_size * self.config.grad_accum * self.dp

    # -- state -------------------------------------------------------------------------------------------

    def restore(self, ckpt: ckpt_io.Checkpoint) -> None:
        """Continue exactly where `ckpt` stopped."""
        ckpt_io.load_model_weights(self.model, ckpt, model_parts(self.model, self.dist))
        ckpt_io.load_optimizer_state(self.optimizer, ckpt, optimizer_parts(self.model, self.optimizer, self.dist))
        apply_settings(self.optimizer, self.config)
        try:
            rng = ckpt.state["rng"]
            self.generator.set_state(ckpt_io.decode_rng(rng["batches"]))
            torch.set_rng_state(ckpt_io.decode_rng(rng["torch"]))
            if self.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(ckpt_io.decode_rng(rng["cuda"]), self.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{ckpt.path}: incompatible checkpoint (RNG state: {exc})") from None
        self.step = self.saved_step = ckpt.step
        if ckpt.path.parent.resolve() == self.checkpoint_root.resolve():
            self.discard_after = ckpt.step
        self.lr_plan = resume_plan(saved_lr_plan(ckpt), self.config, self.step)
        self.tokens_seen = int(ckpt.state.get("tokens_seen", 0))
        record = {"type": "resume", "step": self.step, "checkpoint": str(ckpt.path),
                  "global_batch": self.global_batch, "batch_size": self.config.batch_size,
                  "grad_accum": self.config.grad_accum}
        if self.discard_after is not None:
            later = [p.name for p in ckpt_io.list_checkpoints(self.checkpoint_root) if ckpt_io.step_of(p) > self.step]
            if later:
                record["discarding"] = later  # the abandoned continuation, deleted by the next save
        self.metrics.write(record)

    def save(self) -> Path:
        """Checkpoint the current step (once per step). Under torchrun every rank writes its own
        shard files (sharded layout) and rank 0 the index and state; in one process, one file each."""
        existing = ckpt_io.checkpoint_path(self.checkpoint_root, self.step)
        if self.saved_step == self.step and (existing / ckpt_io.STATE_FILE).is_file():
            return existing
        tensors = ckpt_io.model_tensors(self.model)
        opt_tensors, groups = ckpt_io.optimizer_tensors(self.optimizer)
        if self.is_main and not self.tokenizer_file.is_file():
            self.data.tokenizer.save(self.tokenizer_file)
        if self.dist is not None and self.dist.state is not None:
            parts, opt_parts = rank_parts(self.model), optimizer_rank_parts(self.model, self.optimizer)
            if self.dist.state.zero:  # each rank its FSDP shard, no gather
                tensors, parts = fsdp_shards(tensors, parts)
                opt_tensors, opt_parts = fsdp_shards(opt_tensors, opt_parts)
            path = ckpt_io.save_sharded_checkpoint(
                self.checkpoint_root, self.step, tensors, parts, (opt_tensors, groups), opt_parts,
                self._state_record(), self.tokenizer_file, self.config.keep_last, self.discard_after,
            )
            self.dist.barrier()  # no rank goes on (or exits) before older checkpoints are pruned
        else:
            path = ckpt_io.save_checkpoint(
                self.checkpoint_root, self.step, tensors, (opt_tensors, groups), self._state_record(),
                self.tokenizer_file, self.config.keep_last, self.discard_after,
            )
        self.saved_step, self.discard_after = self.step, None
        return path

    def _state_record(self) -> dict:
        rng = {
            "batches": ckpt_io.encode_rng(self.generator.get_state()),
            "torch": ckpt_io.encode_rng(torch.get_rng_state()),
        }
        if self.device.type == "cuda":
            rng["cuda"] = ckpt_io.encode_rng(torch.cuda.get_rng_state(self.device))
        return {
            "tokens_seen": self.tokens_seen,
            "global_batch": self.global_batch,
            "preset": self.run.preset,
            "run_config": self.run.to_dict(),
            "model_config": self.model.config.to_dict(),
            "lr_plan": self.lr_plan.to_dict(),
            "rng": rng,
            "data": {
                "cache_dir": str(self.data.cache_dir.resolve()),
                "tokenizer_sha": self.data.tokenizer.sha,
                "vocab_size": self.data.vocab_size,
            },
            "val_loss": self.last_eval.loss if self.last_eval else None,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    # -- loop ---------------------------------------------------------------------------------------------

    def next_batches(self) -> list[Batch]:
        """grad_accum micro-batches. Data-parallel ranks draw the same global batch (batch_size x DP
        sequences) and keep their slice, so the batch stream is the same at any DP size."""
        cfg = self.config
        batches = []
        for _ in range(cfg.grad_accum):
            x, y = self.train_data.get_batch(cfg.batch_size * self.dp, cfg.seq_len, self.generator)
            batches.append((x, y) if self.dist is None else (self.dist.rank_slice(x), self.dist.rank_slice(y)))
        return batches

    def evaluate(self) -> EvalResult:
        cfg = self.config
        # Global batches, as in training, each split over the data-parallel ranks and the sums
        # all-reduced, so the result does not depend on the layout.
        batch = cfg.batch_size * self.dp
        share = None
        if self.dist is not None:
            topology = self.dist.topology
            share = RankShare(topology.dp_index, topology.dp, topology.tp_index == 0, self.dist.device)
        result = evaluate(self.model, self.val_data, batch, cfg.seq_len, cfg.eval_batches, cfg.precision, share)
        self.last_eval, self.evaluated_step = result, self.step
        self.metrics.write({"type": "eval", "step": self.step, **result.to_record()})
        return result

    def fit(self, max_steps: int | None = None) -> FitResult:
        """Train to config.steps (or to `max_steps`, for tests and staged runs), then checkpoint."""
        cfg = self.config
        stop_at = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
        result = FitResult(step=self.step, checkpoint=None, stopped_by=None)
        start = time.perf_counter()
        self.stop_signal = None
        clean_stale_once(self.checkpoint_root, self.dist)
        with _stop_on_signals(self), self._bar() as bar:
            if self.step == 0:
                result.evals[0] = self._eval(bar)
            while self.step < stop_at and not self._stop_requested():
                loss = self._one_step(bar)
                result.losses[self.step] = loss
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.stop_signal is None:
                    result.evals[self.step] = self._eval(bar)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
            if self.step == cfg.steps and self.evaluated_step != self.step:
                result.evals[self.step] = self._eval(bar)
            result.checkpoint = self.save()
        result.step = self.step
        # A signal that arrived during the final evaluation or save did not cut the run short.
        result.stopped_by = self.stop_signal if self.step < stop_at else None
        result.seconds = time.perf_counter() - start
        return result

    def _stop_requested(self) -> bool:
        """A signal stops every rank at the same step (torchrun forwards it to each, not in step)."""
        if self.dist is None:
            return self.stop_signal is not None
        if self.dist.any(self.stop_signal is not None) and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return self.stop_signal is not None

    def step_objective(self, step: int) -> tuple[LossFn, dict[str, float | None]]:
        """The loss hook of optimizer step `step` (0-based) and per-step settings to log with it.

        Subclasses override this (distillation: CE + a scheduled KD term); the base trains on CE.
        """
        return cross_entropy_loss, {}

    def _one_step(self, bar: tqdm) -> float:
        cfg = self.config
        lr = self.lr_plan.lr_at(self.step)
        set_lr(self.optimizer, lr)
        start = time.perf_counter()
        self.model.train()
        loss_fn, settings = self.step_objective(self.step)
        parallel = self.dist.state if self.dist is not None else None
        stats = train_step(
            self.model, self.optimizer, self.next_batches(), cfg.grad_clip, cfg.precision, loss_fn, parallel
        )
        if self.dist is not None:
            stats = self._mean_over_ranks(stats)
        if cfg.router_bias_rate > 0:
            self._balance_routers(stats.routed, cfg.router_bias_rate)
        seconds = time.perf_counter() - start  # includes whatever the hook runs (a teacher's forward)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        tokens_per_s = self.tokens_per_step / seconds
        self.metrics.write({
            "type": "train", "step": self.step, "loss": stats.loss, "ce": stats.ce, "aux": stats.aux,
            **stats.terms, **settings,
            "lr": lr, "grad_norm": stats.grad_norm, "drop_rate": stats.drop_rate,
            "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s, "step_s": seconds,
        })
        extra = "".join(f" | {name} {value:.3g}" for name, value in {**stats.terms, **settings}.items()
                        if value is not None)
        bar.update(1)
        bar.set_postfix_str(
            f"loss {stats.ce:.3f}{extra} | {tokens_per_s:,.0f} tok/s | lr {lr:.2e} | drop {stats.drop_rate:.1%}",
            refresh=False,
        )
        return stats.loss

    def _balance_routers(self, routed: dict[int, torch.Tensor], rate: float) -> None:
        """Aux-loss-free balancing: each router's score bias moves toward an even load, by the step's
        routing counts over every rank (so every rank's copy moves alike)."""
        for index, load_E in routed.items():
            router = self.model.blocks[index].ffn.router
            if not router.config.score_correction_bias:
                continue
            if self.dist is not None:
                load_E = load_E.clone()
                torch.distributed.all_reduce(load_E)
            router.nudge_score_bias(load_E, rate)

    def _mean_over_ranks(self, stats: StepStats) -> StepStats:
        """Logged losses and drop rate averaged over ranks (the grad norm is already global)."""
        names = sorted(stats.terms)
        values = [stats.loss, stats.ce, stats.aux, stats.drop_rate] + [stats.terms[n] for n in names]
        mean = self.dist.mean(values)
        return StepStats(mean[0], mean[1], mean[2], stats.grad_norm, mean[3], dict(zip(names, mean[4:])), stats.routed,
                         stats.after_backward_s)

    def _eval(self, bar: tqdm) -> EvalResult:
        result = self.evaluate()
        if self.progress:
            bar.write(format_eval(self.step, result))
        return result

    def _bar(self) -> tqdm:
        return tqdm(
            total=self.config.steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
            dynamic_ncols=True, leave=True,
        )


def saved_lr_plan(ckpt: ckpt_io.Checkpoint) -> LRPlan:
    """The schedule a checkpoint was following; older checkpoints recorded only their settings."""
    try:
        if "lr_plan" in ckpt.state:
            return LRPlan.from_dict(ckpt.state["lr_plan"])
        train = ckpt.state["run_config"]["train"]
        return LRPlan(lr=train["lr"], min_lr=train["min_lr"], warmup=train["warmup"], steps=train["steps"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{ckpt.path}: incompatible checkpoint (LR schedule: {exc})") from None


def format_eval(step: int, result: EvalResult) -> str:
    """One line: validation loss, perplexity, drops and how uneven each MoE layer's load is."""
    line = f"step {step:>6d}  val loss {result.loss:.4f}  ppl {result.perplexity:9.2f}"
    if result.load:
        balance = " ".join(f"L{i}:{max(x.routed) * len(x.routed) / max(sum(x.routed), 1):.2f}"
                           for i, x in result.load.items())
        line += f"  drop {result.drop_rate:5.1%}  max/mean load {balance}"
    return line


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT/SIGTERM finish the current step, then the loop saves and returns; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if trainer.stop_signal is not None:
            raise KeyboardInterrupt
        trainer.stop_signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
