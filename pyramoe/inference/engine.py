"""The generation engine: continuous batching over a slot KV cache.

Requests wait in a queue; each `step()` admits waiting ones while slots are free (their prompt is
prefilled in chunks and their first token sampled), then runs one decode step for every active
request together, each at its own position. Finished requests leave between steps and their slot
is reused, so a server can add and drop requests while the batch runs. Each request samples with
its own generator and stops on EOS, stop token ids, stop strings or max tokens; `step()` returns
the new tokens and text deltas (streaming). MoE layers run dropless unless asked otherwise, so a
token's output never depends on which other tokens share its batch.

Legend: B active requests, L key positions, V vocabulary.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyramoe.data import Tokenizer
from pyramoe.inference.kv_cache import SlotKVCache
from pyramoe.inference.native import NativeDecoder, blockable, unsupported_reason
from pyramoe.inference.packing import pack_model
from pyramoe.inference.sampling import SamplingParams, sample_token
from pyramoe.models import GPT
from pyramoe.runtime import cpu_has_native_bf16

# Rows of one native prefill call (prompt positions of one or more requests): enough to share each
# weight read among many tokens; the bench model's workspace for them is 25 MB.
NATIVE_PREFILL_ROWS = 256


@dataclass
class TokenEvent:
    """One new token of one request (the streaming unit)."""

    request_id: str
    token_id: int | None  # None when a request ends without a new token (stop string, abort)
    text: str  # text delta: what the request's text gained with this token (held back mid-character)
    finished: bool = False
    finish_reason: str | None = None  # "length", "stop" (EOS, stop token or string), "abort"


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent in events
    # Incremental detokenization: output_ids[prefix_offset:read_offset] decode to the end of `text`
    # (context for the next token's text); None: decode the whole output every step.
    prefix_offset: int | None = 0
    read_offset: int = 0
    cached: int = 0  # tokens in the KV cache
    slot: int | None = None
    finish_reason: str | None = None
    stop_ids: frozenset[int] | None = None  # token ids that end it (set at its first token)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


class Engine:
    """Batched generation with requests joining and leaving a running batch.

    `max_batch` requests decode together; `max_len` bounds prompt + generated tokens per request
    (the KV cache is max_batch x max_len per layer); prompts are prefilled `prefill_chunk` tokens
    per forward. On the CPU, prefill and decode run natively (`native`, `pyramoe.inference.native`:
    a whole forward in one compiled call) where the machine can build it and the model is one it
    computes, with bf16 weights blocked for its AVX512-BF16 kernels at the first step (`pack_weights`);
    otherwise the weights are prepacked for oneDNN at the first step (`pack_weights`,
    `pyramoe.inference.packing`) and the model runs in PyTorch. Packed either way, the model still
    runs in PyTorch but serves this engine only (no training, no state_dict). `decode_path` says which
    ran ("native" or "pytorch", with `native_unavailable` giving why not).
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 8,
        max_len: int | None = None,
        prefill_chunk: int = 512,
        eos_id: int | None = None,
        dropless: bool = True,
        pack_weights: bool = True,
        native: bool = True,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: must be >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = eos_id if eos_id is not None else (tokenizer.eos_id if tokenizer is not None else None)
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.prefill_chunk = prefill_chunk
        if dropless:
            for block in model.blocks:
                if block.is_moe:
                    block.ffn.config.dropless = True
        self.device = next(model.parameters()).device
        self.cache = SlotKVCache.for_model(model, max_batch, self.max_len)
        self.logits_source: int | None = None  # set by `distribute`: the rank whose logits all follow
        # CPU weights are packed at the first step (after any `distribute`): blocked for the native
        # step, else for oneDNN.
        self.pack_weights = pack_weights and self.device.type == "cpu"
        self.packed_weights: int | None = None  # how many weights the first step packed
        self.native = native and self.device.type == "cpu"
        self.native_decoder: NativeDecoder | None = None
        self.native_unavailable: str | None = None if self.native else "native=False or not on the CPU"
        self._prepared = False
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # active[i] owns slot i
        self._ids = itertools.count()

    # -- loading -----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, dtype: str = "auto", device: str = "cpu", **kwargs) -> Engine:
        """From a pyramoe checkpoint or run directory, or a Hugging Face model directory."""
        path = Path(path)
        torch_dtype = resolve_dtype(dtype, device)
        if is_hf_directory(path):
            from pyramoe.hf import load_hf_model

            hf = load_hf_model(path, dtype=torch_dtype, dropless=True)
            tokenizer = Tokenizer.from_file(hf.tokenizer_path) if hf.tokenizer_path else None
            eos = hf.hf_config.get("eos_token_id")
            kwargs.setdefault("eos_id", eos[0] if isinstance(eos, list) else eos)
            return cls(hf.model.to(device), tokenizer, **kwargs)
        from pyramoe.checkpoint import build_model, load_checkpoint

        ckpt = load_checkpoint(path)
        model = build_model(ckpt, dropless=True).to(device=device, dtype=torch_dtype)
        return cls(model, Tokenizer.from_file(ckpt.tokenizer_path), **kwargs)

    def distribute(self, ep: int, tp: int = 1, timeout_s: float = 60.0, expert_slicing: bool = False) -> object:
        """Join the torchrun job in the environment and spread the model over it: each MoE layer's
        experts over min(ep, experts) ranks, heads and MoE tokens over `tp` (`pyramoe.parallel`).
        Every rank must add the same requests in the same order; rank 0's logits decide."""
        from pyramoe.parallel.launch import Launch, apply_parallelism, init_distributed

        if self._prepared:
            raise ValueError("engine: distribute() must come before the first step (the weights are prepared)")
        launch = Launch(device=str(self.device), ep=ep, tp=tp, timeout_s=timeout_s)
        run = init_distributed(launch, self.device)
        if run is not None:
            apply_parallelism(run, self.model, ep, expert_slicing=expert_slicing)
            self.logits_source = 0
            if tp > 1:  # each rank caches only its key/value heads
                self.cache = SlotKVCache([k[:, : k.shape[1] // tp].contiguous() for k in self.cache.keys],
                                         [v[:, : v.shape[1] // tp].contiguous() for v in self.cache.values],
                                         self.cache.max_len)
        return run

    # -- requests ------------------------------------------------------------------------------------------

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; it joins the batch at the next step with a free slot."""
        params = params or SamplingParams()
        params.validate()
        prompt_ids = self._encode(prompt)
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens leave no room in max_len={self.max_len}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        generator = None
        if params.temperature > 0:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        self.waiting.append(Request(request_id, prompt_ids, params, generator))
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request; True if it was there."""
        for request in list(self.waiting):
            if request.id == request_id:
                self.waiting.remove(request)
                return True
        for request in self.active:
            if request.id == request_id:
                request.finish_reason = "abort"
                self._release(request)
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.active)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt) if prompt else [self.eos_id]
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not ids or any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt: needs at least one token, each in [0, {vocab})")
        return ids

    # -- the loop ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests into free slots, then one decode step for every active request."""
        if not self._prepared:
            self._prepare()
        events: list[TokenEvent] = []
        decoding = list(self.active)
        admitted = []
        while self.waiting and len(self.active) < self.max_batch:
            request = self.waiting.popleft()
            request.slot = len(self.active)
            self.active.append(request)
            admitted.append(request)
        for group in _same_length_runs(admitted):
            logits_BV, greedy_B = self._prefill(group)
            for i, request in enumerate(group):
                events.append(self._accept(request, logits_BV, greedy_B[i], row=i))
        if decoding:
            logits_BV, greedy_B = self._decode(decoding)
            for i, request in enumerate(decoding):
                events.append(self._accept(request, logits_BV, greedy_B[i], row=i))
        for request in [r for r in self.active if r.finished]:
            self._release(request)
        return events

    def _prepare(self) -> None:
        """At the first step (after any `distribute`): the native decode step where it applies, else
        weights packed for oneDNN."""
        self._prepared = True
        if self.native:
            self.native_unavailable = unsupported_reason(self.model, self.cache)
            if self.native_unavailable is None:
                if self.pack_weights and blockable(self.model):  # bf16 with AVX512-BF16: the blocked layout
                    self.packed_weights = pack_model(self.model, layout="blocked")
                # Rows for a decode step of every slot, and for prefill chunks.
                rows = max(self.cache.slots, NATIVE_PREFILL_ROWS)
                self.native_decoder = NativeDecoder(self.model, self.cache, rows)
                return
        if self.pack_weights:
            self.packed_weights = pack_model(self.model)

    @property
    def decode_path(self) -> str:
        return "native" if self.native_decoder is not None else "pytorch"

    def _prefill(self, requests: list[Request]) -> tuple[torch.Tensor, list[int]]:
        """Prompts of one length in consecutive slots, together, `prefill_chunk` tokens per forward;
        returns each one's last logits and their argmax."""
        if self.native_decoder is not None:
            return self._prefill_native(requests)
        ids = torch.tensor([r.prompt_ids for r in requests], device=self.device)
        for start in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, start : start + self.prefill_chunk]
            logits = self.model(chunk, kv_cache=self.cache.prefill(requests[0].slot), start_pos=start).logits
        for request in requests:
            request.cached = ids.shape[1]
        logits_BV = self._agreed(logits[:, -1].float())
        return logits_BV, logits_BV.argmax(-1).tolist()

    def _prefill_native(self, requests: list[Request]) -> tuple[torch.Tensor, list[int]]:
        """The same with the native forward: every prompt's next positions as rows of one call (as
        many as its workspace holds), logits of the last positions only."""
        ids_BP = torch.tensor([r.prompt_ids for r in requests])
        batch, length = ids_BP.shape
        per_call = max(1, min(self.prefill_chunk, self.native_decoder.max_rows // batch))
        slots_B = torch.arange(requests[0].slot, requests[0].slot + batch)
        for start in range(0, length, per_call):
            n = min(per_call, length - start)
            positions_BN = torch.arange(start, start + n).expand(batch, n)
            last_rows = torch.arange(batch) * n + n - 1 if start + n == length else torch.empty(0, dtype=torch.int64)
            logits_BV, greedy_B = self.native_decoder.forward(
                ids_BP[:, start : start + n].reshape(-1), slots_B.repeat_interleave(n), positions_BN.reshape(-1),
                last_rows)
        for request in requests:
            request.cached = length
        return logits_BV, greedy_B

    def _decode(self, requests: list[Request]) -> tuple[torch.Tensor, list[int]]:
        """One token per request: row b feeds its last token at position `cached`, and sees its own
        key slots [0, cached] only."""
        assert [r.slot for r in requests] == list(range(len(requests)))
        if self.native_decoder is not None:
            logits_BV, greedy_B = self.native_decoder.step([r.output_ids[-1] for r in requests],
                                                           [r.cached for r in requests])
            for request in requests:
                request.cached += 1
            return logits_BV, greedy_B
        positions_B = torch.tensor([r.cached for r in requests], device=self.device)
        length = int(positions_B.max()) + 1
        visible_BL = torch.arange(length, device=self.device) <= positions_B[:, None]
        # Additive (0 / -inf, the model's dtype): SDPA would otherwise convert a bool mask in every layer.
        mask_B11L = torch.zeros(visible_BL.shape, dtype=self.cache.keys[0].dtype, device=self.device)
        mask_B11L = mask_B11L.masked_fill_(~visible_BL, float("-inf"))[:, None, None, :]
        tokens_B1 = torch.tensor([[r.output_ids[-1]] for r in requests], device=self.device)
        out = self.model(tokens_B1, kv_cache=self.cache.decode(positions_B, length), start_pos=length - 1,
                         key_mask_BL=mask_B11L, positions_BT=positions_B[:, None])
        for request in requests:
            request.cached += 1
        logits_BV = self._agreed(out.logits[:, -1].float())
        return logits_BV, logits_BV.argmax(-1).tolist()  # one op for every greedy request of the step

    def _agreed(self, logits: torch.Tensor) -> torch.Tensor:
        """Under torchrun every rank runs the same requests in lockstep (experts spread over them);
        rank 0's logits decide for all, so a last-bit difference can never make ranks diverge."""
        if self.logits_source is not None:
            logits = logits.contiguous()
            torch.distributed.broadcast(logits, src=self.logits_source)
        return logits

    def _accept(self, request: Request, logits_BV: torch.Tensor, greedy: int | None, row: int) -> TokenEvent:
        """Sample the request's next token from row `row` of the logits (`greedy`: its argmax),
        update its text, decide whether it is done."""
        params = request.params
        if params.temperature == 0:
            token = greedy if greedy is not None else int(logits_BV[row].argmax())
        else:
            token = sample_token(logits_BV[row].float(), params, request.generator)
        if request.stop_ids is None:
            eos = set() if params.ignore_eos or self.eos_id is None else {self.eos_id}
            request.stop_ids = frozenset(params.stop_token_ids) | eos
        if token in request.stop_ids:
            request.finish_reason = "stop"
            if self.tokenizer is not None and request.read_offset < len(request.output_ids):
                request.text = self.tokenizer.decode(request.output_ids)  # with a pending partial character
            return self._event(request, token)
        request.output_ids.append(token)
        if self.tokenizer is not None:
            self._extend_text(request)
            if _cut_at_stop(request, params.stop):
                request.finish_reason = "stop"
        # The new token is fed (and cached) at position `cached` by the next step: no room, no step.
        if not request.finished and (len(request.output_ids) >= params.max_tokens or request.cached >= self.max_len):
            request.finish_reason = "length"
            if self.tokenizer is not None and request.read_offset < len(request.output_ids):
                request.text = self.tokenizer.decode(request.output_ids)  # with a pending partial character
        return self._event(request, token)

    def _extend_text(self, request: Request) -> None:
        """Add the new token's text to `request.text` by decoding a short window (the last complete
        piece as context, then what follows), not the whole output: decoding everything each step
        cost 0.18 ms per request at 2,000 tokens. Text of a token that ends inside a character waits
        until the character is complete. A tokenizer whose window does not extend its context's text
        gets whole-output decoding."""
        ids, decode = request.output_ids, self.tokenizer.decode
        if request.prefix_offset is None:
            request.text = decode(ids)
            return
        context = decode(ids[request.prefix_offset : request.read_offset])
        window = decode(ids[request.prefix_offset :])
        if not window.startswith(context):
            request.prefix_offset = None
            request.text = decode(ids)
        elif len(window) > len(context) and not window.endswith("\ufffd"):
            request.text += window[len(context) :]
            request.prefix_offset, request.read_offset = request.read_offset, len(ids)

    def _event(self, request: Request, token: int | None) -> TokenEvent:
        end = len(request.text)
        if not request.finished:
            # Hold back a character split across tokens, and what could still become a stop string.
            end = len(request.text.rstrip("\ufffd"))
            end -= max((len(s) for s in request.params.stop), default=1) - 1
        delta = request.text[request.emitted : end] if end > request.emitted else ""
        request.emitted = max(request.emitted, end)
        return TokenEvent(request.id, token, delta, request.finished, request.finish_reason)

    def _release(self, request: Request) -> None:
        """Free the request's slot; the last active request moves into it so slots stay 0..B-1."""
        slot = request.slot
        last = self.active.pop()
        if last is not request:
            self.active[slot] = last
            self.cache.move(last.slot, slot, last.cached)
            last.slot = slot
        request.slot = None

    # -- conveniences ----------------------------------------------------------------------------------

    def stream(self) -> Iterator[TokenEvent]:
        """Events until every queued request has finished."""
        while self.has_unfinished():
            yield from self.step()

    def generate(
        self, prompts: Iterable[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run prompts to completion (batched, `max_batch` at a time); results in prompt order."""
        prompts = list(prompts)
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, q) for p, q in zip(prompts, per_prompt)]
        requests = {r.id: r for r in self.waiting}
        for _ in self.stream():
            pass
        out = []
        for request_id in ids:
            r = requests[request_id]
            out.append(Completion(r.id, r.prompt_ids, r.output_ids, r.text, r.finish_reason or "length"))
        return out


def _same_length_runs(requests: list[Request]) -> list[list[Request]]:
    """Consecutive requests (hence consecutive slots) whose prompts have one length: each run is
    prefilled as one batch, with no padding."""
    runs: list[list[Request]] = []
    for request in requests:
        if runs and len(runs[-1][0].prompt_ids) == len(request.prompt_ids):
            runs[-1].append(request)
        else:
            runs.append([request])
    return runs


def _cut_at_stop(request: Request, stops: tuple[str, ...]) -> bool:
    """Cut the request's text before the first stop string it now contains."""
    hits = [i for i in (request.text.find(s, request.emitted) for s in stops) if i >= 0]
    if not hits:
        return False
    request.text = request.text[: min(hits)]
    return True


def is_hf_directory(path: Path) -> bool:
    """A Hugging Face model directory: config.json, and neither a pyramoe checkpoint (state.json) nor
    a run directory (checkpoints/)."""
    pyramoe_markers = (path / "state.json", path / "checkpoints")
    return (path / "config.json").is_file() and not any(p.exists() for p in pyramoe_markers)


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """"auto": bf16 on CUDA and on CPUs with native bf16 matmul (AVX512-BF16/AMX), else fp32."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        native = str(device).startswith("cuda") or cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    if dtype not in table:
        raise ValueError(f"dtype: must be auto, fp32 or bf16, got {dtype!r}")
    return table[dtype]
