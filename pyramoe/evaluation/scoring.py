"""Batched log-likelihoods and greedy generation with a pyramoe GPT (no lm-eval needed here).

Scoring pads each batch on the right to its longest row: under the causal mask a real token never
sees the padding after it, positions start at 0 in every row, and dropless MoE layers route each
token on its own, so a row's log-likelihoods do not depend on its batch. Generation pads on the
left, masks the padding out of attention and gives every row its own positions (one prefill, then
one token per step through the KV cache).

Legend: B batch rows, T positions, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyramoe.models import GPT
from pyramoe.runtime import cpu_has_native_bf16

TokenPair = tuple[list[int], list[int]]  # (context ids, continuation ids)
logger = logging.getLogger(__name__)


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """fp32, bf16 (autocast; refused on a CPU without native bf16) or auto (bf16 where native)."""
    native = str(device).startswith("cuda") or cpu_has_native_bf16()
    if name in ("fp32", "float32"):
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if native else torch.float32
    if name in ("bf16", "bfloat16"):
        if not native:
            raise ValueError("dtype=bf16: this CPU has no native bf16 (AVX512-BF16/AMX); use dtype=fp32")
        return torch.bfloat16
    raise ValueError(f"dtype: must be fp32, bf16 or auto, got {name!r}")


def trained_seq_len(state: dict) -> int | None:
    """The seq_len a pyramoe checkpoint's run trained with (its state.json), when recorded."""
    value = (state.get("run_config") or {}).get("train", {}).get("seq_len")
    return value if isinstance(value, int) and value > 0 else None


@dataclass
class Scorer:
    """`max_length`: the longest sequence scored or generated (default and upper bound: the model's
    max_seq_len). Give a checkpoint its trained seq_len: a learned-position model never trained the
    positions beyond it."""

    model: GPT
    pad_id: int
    batch_size: int = 8
    dtype: torch.dtype = torch.float32
    max_length: int | None = None
    shortened_generations: int = 0  # prompts whose generation budget was cut to fit max_length

    def __post_init__(self) -> None:
        limit = self.model.config.max_seq_len
        if self.max_length is None:
            self.max_length = limit
        if not 2 <= self.max_length <= limit:
            raise ValueError(f"max_length: must be between 2 and the model's max_seq_len={limit}, "
                             f"got {self.max_length}")

    @property
    def max_len(self) -> int:
        return self.max_length

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def logits(self, idx_BT: torch.Tensor, **kwargs) -> torch.Tensor:
        with self._autocast():
            return self.model(idx_BT.to(self.device), **kwargs).logits.float()

    def loglikelihood(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per
        pair. A pair longer than max_length + 1 keeps its last max_length + 1 tokens (context cut on
        the left); a continuation longer than max_length is scored in windows of max_length tokens,
        each after the max_length tokens before it, as a rolling log-likelihood is."""
        rows, owner = [], []
        for i, (context, continuation) in enumerate(pairs):
            for row in self._rows(context, continuation):
                rows.append(row)
                owner.append(i)
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))  # similar lengths share a batch
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for r, (logp, greedy) in zip(batch, self._score_batch([rows[r] for r in batch])):
                total, all_greedy = out[owner[r]]
                out[owner[r]] = (total + logp, all_greedy and greedy)
        return out

    def _rows(self, context: list[int], continuation: list[int]) -> list[tuple[list[int], list[int]]]:
        """(input ids, the continuation ids its last positions predict), one per window."""
        if not context:
            raise ValueError("loglikelihood: the context needs at least one token (a prefix token)")
        if not continuation:
            return [(context[-self.max_len :], [])]
        rows = []
        for a in range(0, len(continuation), self.max_len):
            target = continuation[a : a + self.max_len]
            whole = (context + continuation[: a + len(target)])[-(self.max_len + 1) :]
            rows.append((whole[:-1], target))
        return rows

    @torch.no_grad()
    def _continuation_logits(self, idx_BT: torch.Tensor, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Logits [C, V] of the positions that predict the rows' continuation tokens, in row order: the
        LM head multiplies only those (a continuation is ~10% of a scored row, and the head is ~40% of
        a small model's forward)."""
        with self._autocast():
            h_BTD, _ = self.model.final_hidden(idx_BT.to(self.device))
            picks = [(b, len(inp) - len(cont), len(inp)) for b, (inp, cont) in enumerate(rows) if cont]
            if not picks:
                return h_BTD.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32)
            h_CD = torch.cat([h_BTD[b, start:end] for b, start, end in picks])
            return self.model.lm_head(h_CD).float()

    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        longest = max(len(inp) for inp, _ in rows)
        idx_BT = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        for b, (inp, _) in enumerate(rows):
            idx_BT[b, : len(inp)] = torch.tensor(inp)
        logits_CV = self._continuation_logits(idx_BT, rows)
        results, at = [], 0
        for _, cont in rows:
            if not cont:
                results.append((0.0, True))
                continue
            logp_TV = F.log_softmax(logits_CV[at : at + len(cont)], dim=-1)
            at += len(cont)
            target_T = torch.tensor(cont, device=logp_TV.device)
            total = float(logp_TV.gather(-1, target_T[:, None]).sum())
            results.append((total, bool((logp_TV.argmax(-1) == target_T).all())))
        return results

    def rolling_pairs(self, tokens: list[int], prefix_id: int) -> list[TokenPair]:
        """Pairs that score every token of `tokens` once, each with as much context as fits: chunks of
        max_length tokens, each after (at most) the max_length tokens before it."""
        full = [prefix_id, *tokens]
        n = self.max_len
        return [(full[max(0, a - n) : a], full[a : a + n]) for a in range(1, len(full), n)]

    def loglikelihood_rolling(self, docs: Sequence[list[int]], prefix_id: int) -> list[float]:
        pairs, owner = [], []
        for d, tokens in enumerate(docs):
            chunk = self.rolling_pairs(tokens, prefix_id)
            pairs += chunk
            owner += [d] * len(chunk)
        totals = [0.0] * len(docs)
        for d, (logp, _) in zip(owner, self.loglikelihood(pairs)):
            totals[d] += logp
        return totals

    @torch.no_grad()
    def greedy(
        self, prompts: Sequence[list[int]], max_new_tokens: int, stop: Callable[[list[int]], bool], eos_id: int
    ) -> list[list[int]]:
        """Greedy continuations of a batch of prompts; a row ends at `eos_id` (not kept), once `stop(its
        new ids)` holds, or at its budget. The prompt is kept (only one longer than max_len - 1 tokens
        loses its start) and the budget shrinks to what fits after it, with a warning: cutting the prompt
        to make room for a large max_new_tokens would leave a short model nothing to condition on."""
        if any(not p for p in prompts):
            raise ValueError("generate: a prompt needs at least one token")
        prompts = [list(p)[-(self.max_len - 1) :] for p in prompts]
        budgets = [min(max_new_tokens, self.max_len - len(p)) for p in prompts]
        if min(budgets) < max_new_tokens:
            self.shortened_generations += sum(budget < max_new_tokens for budget in budgets)
            logger.warning("generate_until: max_gen_toks=%d does not fit after prompts of up to %d tokens in "
                           "max_length=%d; generating at most %d token(s) after such a prompt instead",
                           max_new_tokens, max(len(p) for p in prompts), self.max_len, min(budgets))
        steps = max(budgets)
        longest = max(len(p) for p in prompts)
        idx_BT = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros(len(prompts), longest, dtype=torch.bool)
        for b, p in enumerate(prompts):
            idx_BT[b, longest - len(p) :] = torch.tensor(p)
            mask_BL[b, longest - len(p) :] = True
        positions_BT = (mask_BL.long().cumsum(-1) - 1).clamp_min(0)
        cache = self.model.new_kv_cache(len(prompts), longest + steps)
        dev = self.device
        logits_BV = self.logits(idx_BT, kv_cache=cache, key_mask_BL=mask_BL.to(dev),
                                positions_BT=positions_BT.to(dev))[:, -1]
        position_B1 = positions_BT[:, -1:]
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in range(steps):
            token_B1 = logits_BV.argmax(-1, keepdim=True).cpu()
            for b, token in enumerate(token_B1[:, 0].tolist()):
                if not done[b]:
                    if token == eos_id:
                        done[b] = True
                    else:
                        outputs[b].append(token)
                        done[b] = stop(outputs[b]) or len(outputs[b]) == budgets[b]
            if all(done) or step + 1 == steps:
                break
            mask_BL = torch.cat([mask_BL, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
            position_B1 = position_B1 + 1
            logits_BV = self.logits(token_B1, kv_cache=cache, start_pos=longest + step, key_mask_BL=mask_BL.to(dev),
                                    positions_BT=position_B1.to(dev))[:, -1]
        return outputs
