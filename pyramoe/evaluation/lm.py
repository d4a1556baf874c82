"""lm-evaluation-harness model "pyramoe": a pyramoe checkpoint behind the harness's LM interface.

Importing this module registers the class in the harness's own registry (`register_model`). The
harness scans no entry points for models, so it must be imported before the harness looks the name
up: `python -m pyramoe.evaluation.lm_eval_cli ...` (the `lm_eval` command line with this import and
the local tasks' --include_path added), `pyramoe eval CKPT --tasks ...`, or `import
pyramoe.evaluation.lm` before `lm_eval.simple_evaluate(model="pyramoe", ...)`.

    --model pyramoe --model_args checkpoint=RUN_OR_CKPT_OR_HF_DIR[,dtype=fp32|bf16|auto][,device=cpu|cuda]
                                 [,max_length=N] [,quantize=int8|int4[-g64][-asym]]

A pyramoe checkpoint (or a run directory: its latest) or a Hugging Face MoE directory that
`pyramoe.hf` reads (with a tokenizer.json). The model's own tokenizer, and MoE layers dropless: a
token's log-likelihood never depends on the other requests in its batch. Requests are scored in at
most max_length tokens: by default the length a pyramoe checkpoint trained on (its run's seq_len: a
learned-position model never trained the positions beyond), a Hugging Face directory's max positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from pyramoe.checkpoint import build_model, load_checkpoint
from pyramoe.data import Tokenizer
from pyramoe.evaluation.scoring import Scorer, resolve_dtype, trained_seq_len
from pyramoe.inference.loading import is_hf_directory
from pyramoe.inference.packing import check_quantize, quantize_model
from pyramoe.models import GPT

logger = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def parse_batch_size(value: Any) -> int:
    """An int >= 1; lm-eval's "auto" (no memory probing here) means DEFAULT_BATCH_SIZE."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size: expected an integer or auto, got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {size}")
    return size


def resolve_device(device: str | None) -> str:
    """cpu unless CUDA is asked for and present: the harness's CLI passes device=cuda by default, and
    falls back to the CPU the same way for its own models."""
    if device is None or str(device) in ("auto", "cpu"):
        return "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device=%s: CUDA is not available; running on the CPU", device)
        return "cpu"
    return str(device)


@dataclass
class Source:
    """A model to evaluate, its tokenizer and end-of-text id, where it came from."""

    path: Path
    model: GPT
    tokenizer: Tokenizer
    eos_id: int
    step: int | None  # None for a Hugging Face directory
    trained_len: int | None = None  # the sequence length it trained on, when known

    @property
    def default_max_length(self) -> int:
        """The trained length, within the model's max_seq_len (which alone a Hugging Face directory knows)."""
        limit = self.model.config.max_seq_len
        return min(self.trained_len, limit) if self.trained_len else limit


def load_source(path: str | Path) -> Source:
    """A pyramoe checkpoint or run directory, or a Hugging Face model directory with a tokenizer.json;
    MoE layers dropless either way."""
    path = Path(path).expanduser()
    if is_hf_directory(path):
        from pyramoe.hf import load_hf_model

        hf = load_hf_model(path, dtype=torch.float32, dropless=True)
        if hf.tokenizer_path is None:
            raise ValueError(f"{path}: no tokenizer.json (the harness needs the model's tokenizer)")
        tokenizer = Tokenizer.from_file(hf.tokenizer_path)
        eos = hf.hf_config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        return Source(path, hf.model.eval(), tokenizer, eos if isinstance(eos, int) else tokenizer.eos_id, None)
    ckpt = load_checkpoint(path)
    if not ckpt.tokenizer_path.is_file():
        raise ValueError(f"{ckpt.path}: incomplete checkpoint ({ckpt.tokenizer_path.name} missing)")
    tokenizer = Tokenizer.from_file(ckpt.tokenizer_path)
    return Source(ckpt.path, build_model(ckpt, dropless=True), tokenizer, tokenizer.eos_id, ckpt.step,
                  trained_seq_len(ckpt.state))


def parse_max_length(value: Any) -> int | None:
    """model_args max_length: an int, or None (unset: the source's default)."""
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_length: expected an integer, got {value!r}") from None


@register_model("pyramoe")
class PyramoeLM(TemplateLM):
    def __init__(
        self,
        checkpoint: str | None = None,
        dtype: str = "fp32",
        batch_size: int | str | None = None,
        device: str | None = None,
        max_length: int | str | None = None,
        max_batch_size: int | None = None,  # noqa: ARG002 - passed by the harness; unused
        quantize: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not checkpoint:
            raise ValueError("model_args: checkpoint=RUN_OR_CKPT is required")
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise ValueError(f"model_args: unknown argument {unknown[0]!r} "
                             "(known: checkpoint, dtype, batch_size, device, max_length, quantize)")
        check_quantize(quantize, "model_args: quantize")
        device = resolve_device(device)
        self.source = load_source(checkpoint)
        if quantize is not None:
            if device != "cpu":
                raise ValueError(f"model_args: quantize={quantize} runs on the CPU only, device is {device}")
            quantize_model(self.source.model, quantize)
        self.pyramoe_tokenizer = self.source.tokenizer
        self.pyramoe_tokenizer.encode_specials_as_text(True)  # as the corpus was tokenized
        length = parse_max_length(max_length) or self.source.default_max_length
        self.scorer = Scorer(self.source.model.to(device), self.source.eos_id, parse_batch_size(batch_size),
                             resolve_dtype(str(dtype), device), length)
        self._device = torch.device(device)

    # -- what the harness asks of a model --------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.source.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_len

    @property
    def tokenizer_name(self) -> str:
        return f"pyramoe-{self.pyramoe_tokenizer.sha}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.pyramoe_tokenizer.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.pyramoe_tokenizer.decode(ids)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_checkpoint": str(self.source.path), "model_step": self.source.step,
                "model_dtype": str(self.scorer.dtype).removeprefix("torch.")}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """`requests`: ((context, continuation), context ids, continuation ids), from TemplateLM."""
        results = []
        size = self.scorer.batch_size * 8  # progress granularity; the scorer batches inside
        quiet = disable_tqdm or len(requests) <= size
        for start in tqdm(range(0, len(requests), size), desc="loglikelihood", disable=quiet):
            chunk = requests[start : start + size]
            scored = self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in chunk])
            for (key, _, _), result in zip(chunk, scored):
                self.cache_hook.add_partial("loglikelihood", key, result)
            results += scored
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0]) for req in requests]
        totals = self.scorer.loglikelihood_rolling(docs, self.prefix_token_id)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy; requests with the same stop strings and token budget share batches."""
        groups: dict[tuple, list[int]] = {}
        parsed = [_generation_settings(req.args[1], self.eot_token_id, self.tok_decode) for req in requests]
        for i, settings in enumerate(parsed):
            groups.setdefault(settings, []).append(i)
        out = [""] * len(requests)
        for (until, max_new), members in groups.items():
            size = self.scorer.batch_size
            for start in range(0, len(members), size):
                batch = members[start : start + size]
                prompts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in batch]
                stop = _stop_check(until, self.tok_decode)
                for i, ids in zip(batch, self.scorer.greedy(prompts, max_new, stop, self.eot_token_id)):
                    out[i] = _cut(self.tok_decode(ids), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def _generation_settings(gen_kwargs: dict[str, Any], eot_id: int, decode) -> tuple[tuple[str, ...], int]:
    """(stop strings, max new tokens) from a request's generation kwargs; sampling is refused."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    if isinstance(until, str):
        until = [until]
    until = [*until, decode([eot_id])]
    max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
        raise ValueError("generate_until: pyramoe decodes greedily; do_sample/temperature > 0 is not supported")
    return tuple(dict.fromkeys(until)), max_new


def _stop_check(until: tuple[str, ...], decode):
    def stop(ids: list[int]) -> bool:
        text = decode(ids)
        return any(s in text for s in until)

    return stop


def _cut(text: str, until: tuple[str, ...]) -> str:
    """Text up to the first stop string."""
    cut = min((text.find(s) for s in until if s in text), default=len(text))
    return text[:cut]
