"""How a trained checkpoint's MoE blocks route validation tokens: drop rate at the training capacity
factor, load imbalance, and how much the first-choice expert is a function of the token id alone.

`python -m pyramoe.experiments.routing RUN_OR_CKPT [...]` prints one row per MoE block. Token
determinism is, over token ids that occur at least twice, the fraction of occurrences routed to
that id's most common expert (1.0: every copy of a token goes to one expert; 1/E for routing
unrelated to the id).
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from typing import Any

import torch

from pyramoe.tables import format_table


def token_determinism(token_ids: list[int], experts: list[int]) -> float:
    """Fraction of occurrences of repeated token ids sent to their id's most common expert."""
    by_token: dict[int, Counter] = defaultdict(Counter)
    for token, expert in zip(token_ids, experts):
        by_token[token][expert] += 1
    repeated = [c for c in by_token.values() if sum(c.values()) >= 2]
    total = sum(sum(c.values()) for c in repeated)
    return sum(max(c.values()) for c in repeated) / total if total else float("nan")


def _capture_first_choices(model: torch.nn.Module) -> tuple[dict[int, list[torch.Tensor]], list[Any]]:
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        if block.is_moe:
            captured[i] = []
            hook = (lambda store: lambda module, args, out: store.append(out.expert_idx_TK[:, 0].clone()))(captured[i])
            handles.append(block.ffn.router.register_forward_hook(hook))
    return captured, handles


def routing_report(checkpoint: str, batches: int = 8, training_capacity: bool = True) -> dict[int, dict[str, float]]:
    """Per MoE block: dropped fraction, max expert load / mean, token determinism (validation batches)."""
    from pyramoe.train import build_model, load_checkpoint
    from pyramoe.train.config import run_config_from_dict
    from pyramoe.train.evaluate import autocast
    from pyramoe.train.session import load_data

    ckpt = load_checkpoint(checkpoint)
    run = run_config_from_dict(ckpt.state["run_config"])
    model = build_model(ckpt).train(training_capacity)  # train(): the training capacity factor (no dropout here)
    data = load_data(run, ckpt, progress=False)
    captured, handles = _capture_first_choices(model)
    tokens: list[int] = []
    dropped: dict[int, list[float]] = defaultdict(list)
    routed: dict[int, torch.Tensor] = {}
    cfg = run.train
    with torch.no_grad():
        for x, _ in data.val_dataset().iter_eval_batches(cfg.batch_size, cfg.seq_len, batches):
            with autocast(cfg.precision):
                out = model(x)
            tokens += x.reshape(-1).tolist()
            for i, stats in out.moe_stats.items():
                dropped[i].append(float(stats.dropped_fraction))
                routed[i] = routed.get(i, 0) + stats.routed_per_expert
    for handle in handles:
        handle.remove()
    report = {}
    for i, choices in captured.items():
        load = routed[i].float()
        report[i] = {
            "experts": len(load), "drop_rate": sum(dropped[i]) / len(dropped[i]),
            "max_load": float(load.max() / load.mean()),
            "token_determinism": token_determinism(tokens, torch.cat(choices).tolist()),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint or run directories")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--eval-capacity", action="store_true", help="the eval capacity factor instead")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches: must be >= 1, got {args.batches}")
    rows = []
    for path in args.checkpoints:
        for block, r in routing_report(path, args.batches, not args.eval_capacity).items():
            rows.append([path, block, r["experts"], f"{r['drop_rate']:.1%}", f"{r['max_load']:.2f}",
                         f"{r['token_determinism']:.2f}"])
    print(format_table(["run", "block", "experts", "dropped", "max load / mean", "token determinism"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
