"""The generation engine: continuous batching over a paged KV cache.

Requests wait in a queue; each `step()` admits waiting ones while slots are free, then runs one
forward of the engine's step (`pyramoe.inference.steps`: native CPU or PyTorch) over rows of
(token, slot, position): one decode row per running request and, within a token budget
(`max_step_tokens`), the next chunk of each prompt still being read, so a long prompt arriving
does not freeze the running streams (chunked prefill). Finished requests leave between steps and
their slot is reused. Each request samples with its own seed (a CPU generator; on the device step,
a counter-hashed draw on the device, `pyramoe.inference.device_sampling`) and stops on EOS, stop
token ids, stop strings or max tokens; `step()` returns the new tokens and text deltas (streaming), with
log-probabilities when asked. A request that fails (bad logits, a sampling error, a failed forward)
ends with an "error" event; the others go on. MoE layers run dropless unless asked otherwise, so a
token's output never depends on which other tokens share its batch.

One thread owns an engine: `step`, `add_request` and `abort` are not thread-safe (a server puts a
command queue in front of it: `pyramoe.inference.loop`).

Legend: B running requests, R rows with logits, V vocabulary.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from pyramoe.data import Tokenizer
from pyramoe.inference.device_sampling import RowSampling, penalised
from pyramoe.inference.device_step import DeviceStep, device_step_unsupported
from pyramoe.inference.kv_cache import PagedKVCache, check_kv_cache_dtype
from pyramoe.inference.loading import load_model
from pyramoe.inference.model_view import inference_view
from pyramoe.inference.native import NativeForward, blockable, unsupported_reason
from pyramoe.inference.packing import check_quantize, pack_model, quantize_model
from pyramoe.inference.requests import Completion, Logprob, Request, TokenEvent
from pyramoe.inference.sampling import SamplingParams, apply_penalties, sample_token, token_logprobs
from pyramoe.inference.steps import ModelStep, NativeStep, TorchStep
from pyramoe.models import GPT

# Prompt rows of one step when decode rows fill the budget: a prompt always advances.
MIN_PREFILL_ROWS = 16
# The engine's `step` choices: "auto" (CPU: native, else pytorch; CUDA: device where it applies,
# else pytorch) or one by name.
STEPS = ("auto", "pytorch", "device")


class Engine:
    """Batched generation with requests joining and leaving a running batch.

    `max_batch` requests run together (one KV-cache slot each); `max_len` bounds prompt + generated
    tokens per request. The KV cache is paged (`PagedKVCache`): `kv_blocks` blocks of `block_size`
    positions (or as many as `kv_cache_bytes` hold; default: max_batch x max_len positions); a
    request is admitted when its prompt's blocks are there, takes a block whenever it reaches a new
    one, returns them when it leaves, and shares the full blocks of a prompt prefix already cached
    and a running request's partial last prompt block of the same prompt, copied on first write
    (`prefix_caching`; not for requests asking prompt log-probabilities, whose every position must
    be computed). When a running request needs a block and none is left, the request admitted last
    is preempted: its blocks go back and it is read again later (`preemptions` counts them). One step
    feeds at most `max_step_tokens` rows (decode rows, then prompt chunks; at least
    `MIN_PREFILL_ROWS` prompt rows). On the CPU, steps run natively (`native`,
    `pyramoe.inference.native`: a whole forward in one compiled call) where the machine can build it
    and the model is one it computes, with bf16 weights blocked for its AVX512-BF16 kernels at the
    first step (`pack_weights`); otherwise the weights are prepacked for oneDNN at the first step
    (`pack_weights`, `pyramoe.inference.packing`) and the model runs in PyTorch. `step="device"` (the
    default on CUDA, on one process, where it applies; after `distribute` when asked for) runs
    `DeviceStep` instead: fixed-shape steps with no host sync inside, decode captured as CUDA graphs
    on CUDA (one process), sampled requests drawn, penalties applied and log-probabilities computed
    on the device; `step="pytorch"` the PyTorch step. `quantize="int8"` or
    `"int4"` (CPU; options in `pyramoe.inference.packing.parse_quantize`) quantizes the linear layers
    and experts at the first step, before the step is built (`pyramoe.inference.packing.quantize_model`:
    int8 per-output-channel or int4 group-wise scales, rows of activations quantized on the fly), so
    the native and PyTorch steps compute the same quantized model. The engine runs its own view of
    the caller's model (`engine.model`, `inference_view`: its
    own modules and configs over the caller's weight tensors, none copied): eval mode, dropless,
    packing and quantizing change the view only, and the caller's model may go on training; the
    engine is for the weights as they were at its first step (packed and native steps copy some), so
    make a new one after they change. Packed weights are copies: while the caller holds its model,
    they take memory of their own. `decode_path` says which step ran ("native", "pytorch" or
    "device", with `native_unavailable` giving why not native). `kv_cache_dtype="int8"` keeps the KV
    cache as int8 rows with an fp32 scale each (`PagedKVCache`; about half the bytes of bf16 per
    position, so long contexts read less); "auto" (default) and "bf16" keep it in the model's dtype.
    The device step does not read an int8 cache (the PyTorch step runs instead).
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 8,
        max_len: int | None = None,
        max_step_tokens: int = 256,
        eos_id: int | None = None,
        dropless: bool = True,
        pack_weights: bool = True,
        native: bool = True,
        kv_blocks: int | None = None,
        block_size: int = 16,
        prefix_caching: bool = True,
        kv_cache_bytes: int | None = None,
        step: str = "auto",
        quantize: str | None = None,
        kv_cache_dtype: str = "auto",
    ):
        if step not in STEPS:
            raise ValueError(f"step: must be one of {', '.join(STEPS)}, got {step!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens: must be >= 1, got {max_step_tokens}")
        check_quantize(quantize)
        check_kv_cache_dtype(kv_cache_dtype, model.tok_emb.weight.dtype)
        # The engine's own view (modules and configs, the caller's weight tensors): eval mode,
        # dropless, packing and `distribute` never reach the caller's model, which may go on training.
        self.model = inference_view(model, dropless)
        self.tokenizer = tokenizer
        self.eos_id = eos_id if eos_id is not None else (tokenizer.eos_id if tokenizer is not None else None)
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.max_step_tokens = max_step_tokens
        self.device = next(model.parameters()).device
        if kv_cache_bytes is not None:
            one_block = PagedKVCache.for_model(model, 1, block_size, 1, block_size, kv_cache_dtype)
            kv_blocks = kv_cache_bytes // one_block.bytes()
            if kv_blocks < 1:
                raise ValueError(f"kv_cache_bytes: {kv_cache_bytes} bytes hold no {block_size}-position block")
        if block_size < 1 or (kv_blocks is not None and kv_blocks < 1):
            raise ValueError(f"block_size, kv_blocks: must be >= 1, got {block_size}, {kv_blocks}")
        self.cache = PagedKVCache.for_model(model, max_batch, self.max_len, kv_blocks, block_size, kv_cache_dtype)
        self.prefix_caching = prefix_caching
        self.logits_source: int | None = None  # set by `distribute`: the rank whose logits all follow
        # CPU weights are packed at the first step (after any `distribute`): blocked for the native
        # step, else for oneDNN.
        self.pack_weights = pack_weights and self.device.type == "cpu"
        if quantize is not None and self.device.type != "cpu":
            raise ValueError(f"quantize: {quantize} weights run on the CPU only, the model is on {self.device}")
        self.quantize = quantize
        self.quantized_weights: int | None = None  # how many matrices the first step quantized
        self.packed_weights: int | None = None  # how many weights the first step packed
        self.step_choice = step
        self.native = native and self.device.type == "cpu" and step == "auto"
        self.native_forward: NativeForward | None = None
        self.native_unavailable: str | None = None if self.native else "native=False, step chosen or not on the CPU"
        self.runner: ModelStep | None = None  # the step implementation, chosen at the first step
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # running, in admission order; each holds a slot
        self._free_slots = list(range(max_batch))
        self._pending: list[TokenEvent] = []  # events of aborts, sent by the next step
        self._ids = itertools.count()
        self._live_ids: set[str] = set()
        self.preemptions = 0  # requests that gave their blocks back to let older ones go on

    # -- loading -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, dtype: str = "auto", device: str = "cpu", **kwargs) -> Engine:
        """From a pyramoe checkpoint or run directory, a quantized model directory (`pyramoe quantize`:
        its weights as saved, `quantize` set to their format), a llama.cpp GGUF file (`pyramoe.
        inference.gguf`), or a Hugging Face model directory (`pyramoe.inference.loading`)."""
        model, tokenizer, kwargs = load_model(path, dtype, device, kwargs)
        return cls(model, tokenizer, **kwargs)

    def distribute(self, ep: int, tp: int = 1, timeout_s: float = 60.0, expert_slicing: bool = False) -> object:
        """Join the torchrun job in the environment and spread the model over it: each MoE layer's
        experts over min(ep, experts) ranks, heads and MoE tokens over `tp` (`pyramoe.parallel`).
        Every rank must add the same requests in the same order; rank 0's logits decide."""
        from pyramoe.parallel.launch import Launch, apply_parallelism, init_distributed

        if self.runner is not None:
            raise ValueError("engine: distribute() must come before the first step (the weights are prepared)")
        launch = Launch(device=str(self.device), ep=ep, tp=tp, timeout_s=timeout_s)
        run = init_distributed(launch, self.device)
        if run is not None:
            apply_parallelism(run, self.model, ep, expert_slicing=expert_slicing)
            self.logits_source = 0
            if tp > 1:  # each rank caches only its key/value heads
                self.cache = self.cache.with_keys([k[:, : k.shape[1] // tp].contiguous() for k in self.cache.keys],
                                                  [v[:, : v.shape[1] // tp].contiguous() for v in self.cache.values])
        return run

    # -- requests ------------------------------------------------------------------------------------------

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; it joins the batch at the next step with a free slot."""
        params = params or SamplingParams()
        params.validate()
        prompt_ids = self._encode(prompt)
        self.check_fits(len(prompt_ids), params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._live_ids:
            raise ValueError(f"request_id: {request_id!r} is already queued or running")
        generator = seed = None
        if not params.greedy:
            # Unseeded: a seed from the OS's entropy (torch.seed() would reseed the global generator).
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator = torch.Generator().manual_seed(seed)
        self.waiting.append(Request(request_id, prompt_ids, params, generator, seed))
        self._live_ids.add(request_id)
        return request_id

    def check_fits(self, prompt_tokens: int, params: SamplingParams) -> None:
        """ValueError naming the prompt if it cannot run here: no room in max_len, or more KV-cache
        blocks than the cache has. Reads only settings: any thread may call it."""
        if prompt_tokens >= self.max_len and not (params.max_tokens == 0 and prompt_tokens <= self.max_len):
            raise ValueError(f"prompt: {prompt_tokens} tokens leave no room in max_len={self.max_len}")
        blocks = self.cache.blocks_for(self._positions(prompt_tokens, params))
        if blocks > self.cache.allocator.num_blocks:
            raise ValueError(f"prompt: {prompt_tokens} tokens + max_tokens need {blocks} KV-cache blocks, the cache "
                             f"has {self.cache.allocator.num_blocks}")

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request (its "abort" event comes with the next step); True if
        it was there."""
        request = next((r for r in itertools.chain(self.waiting, self.active) if r.id == request_id), None)
        if request is None:
            return False
        request.finish_reason = "abort"
        self._pending.append(request.event(None))
        self._retire(request)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.active or self._pending)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

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
        """Admit waiting requests into free slots, then one forward: a decode row for every running
        request past its prompt, and the next prompt chunks within the step's token budget."""
        self.prepare()
        events, self._pending = self._pending, []
        self._admit()
        self._grow()
        plan, rows = self._plan()
        if self.cache.pending_copies:
            self.cache.copy_on_write(rows[1])
        if plan:
            try:
                if isinstance(self.runner, DeviceStep):
                    logits_RV, greedy_R = self.runner.forward(*rows, sampling_R=self._device_draws(plan, rows[3]),
                                                              logprobs_R=self._device_logprobs(plan, rows[3]))
                else:
                    logits_RV, greedy_R = self.runner.forward(*rows)
            except Exception as exc:  # noqa: BLE001 - a failed forward fails its requests, not the engine
                events += [self._fail(request, exc) for request, _, _ in plan]
            else:
                for request, fed, picks in plan:
                    try:
                        event = self._advance(request, fed, picks, logits_RV, greedy_R)
                    except Exception as exc:  # noqa: BLE001 - one request's failure (NaN logits, ...) is its own
                        event = self._fail(request, exc)
                    if event is not None:
                        events.append(event)
        for request in [r for r in self.active if r.finished]:
            self._retire(request)
        return events

    def _admit(self) -> None:
        """Waiting requests take free slots in order while the cache has the blocks of their prompt
        and one spare block per running request (room to grow, so that a request admitted now is not
        preempted at the next step); a request whose prompt begins with full blocks already cached
        starts after them, and one whose first block another request is still writing (n choices of
        one prompt) waits for it."""
        deferred = []
        while self.waiting and self._free_slots:
            request, slot = self.waiting[0], self._free_slots[0]
            share = self.prefix_caching and not request.scoring_prompt
            context = request.context_ids
            if share and self.cache.being_written(context):
                deferred.append(self.waiting.popleft())
                continue
            cached = self.cache.reserve(slot, context, len(context), share, spare=len(self.active))
            if cached is None:
                break  # until a running request returns blocks
            self.waiting.popleft()
            self._free_slots.pop(0)
            request.slot, request.cached = slot, cached
            self.active.append(request)
        self.waiting.extendleft(reversed(deferred))

    def _grow(self) -> None:
        """Each decoding request gets the block its next position needs, oldest first; when none is
        left, the request admitted last gives its blocks back and waits to be read again
        (preemption by recomputation, as vLLM does: cheaper than keeping every request's whole
        budget reserved from the start)."""
        for request in [r for r in self.active if not r.reading_prompt]:
            while request.slot is not None and not self.cache.extend(request.slot, request.cached + 1):
                self._preempt(self.active[-1])

    def _preempt(self, request: Request) -> None:
        """Back to the head of the queue, its blocks and slot returned; it keeps its output and
        sampler state, and reads its prompt and output again when it is admitted."""
        self._release(request)
        request.cached = 0
        request.recompute_ids = request.prompt_ids + request.output_ids if request.output_ids else None
        request.prompt_logprobs = None  # not sent yet (a request that sent them has output): computed again
        self.waiting.appendleft(request)
        self.preemptions += 1

    def _positions(self, prompt_tokens: int, params: SamplingParams) -> int:
        """KV positions a request may fill: its prompt and what it may generate, within max_len."""
        return min(prompt_tokens + params.max_tokens, self.max_len)

    def _plan(self) -> tuple[list[tuple[Request, int, list[int]]], tuple[list[int], ...]]:
        """The step's rows: (request, rows fed, indices of its logit rows) per request, and the
        rows' tokens, slots, positions and logit rows."""
        tokens, slots, positions, logit_rows = [], [], [], []
        plan = []
        decoding = [r for r in self.active if not r.reading_prompt]
        for request in decoding:
            plan.append((request, 1, [len(logit_rows)]))
            logit_rows.append(len(tokens))
            tokens.append(request.output_ids[-1])
            slots.append(request.slot)
            positions.append(request.cached)
        budget = min(max(self.max_step_tokens - len(decoding), MIN_PREFILL_ROWS), self.runner.max_rows - len(tokens))
        for request in (r for r in self.active if r.reading_prompt):
            context = request.context_ids
            n = min(len(context) - request.cached, budget)
            if n <= 0:
                break
            budget -= n
            first = len(tokens)
            tokens += context[request.cached : request.cached + n]
            slots += [request.slot] * n
            positions += range(request.cached, request.cached + n)
            # Prompt log-probabilities need every row's logits; otherwise only the last context row's.
            wanted = range(first, first + n) if request.scoring_prompt else (
                [first + n - 1] if request.cached + n == len(context) else [])
            plan.append((request, n, list(range(len(logit_rows), len(logit_rows) + len(wanted)))))
            logit_rows += wanted
        return plan, (tokens, slots, positions, logit_rows)

    def _advance(self, request: Request, fed: int, picks: list[int], logits_RV: torch.Tensor,
                 greedy_R: list[int]) -> TokenEvent | None:
        """After the forward: record the prompt's log-probabilities, and once the prompt is read,
        take the next token from the request's last logit row."""
        start, prompt = request.cached, request.prompt_ids
        request.cached += fed
        if start < len(request.context_ids):
            self.cache.written(request.slot, request.cached)
        if start < len(prompt) and request.scoring_prompt:
            if request.prompt_logprobs is None:
                request.prompt_logprobs = [None]
            for pick, position in zip(picks, range(start, start + fed)):
                if position + 1 < len(prompt):  # row `position` predicts the next prompt token
                    request.prompt_logprobs.append(
                        self._logprob(logits_RV, pick, prompt[position + 1], request.params.prompt_logprobs))
        if request.reading_prompt:
            return None
        if request.params.max_tokens == 0:
            request.finish_reason = "length"
            return request.event(None)
        return self._accept(request, logits_RV, greedy_R, picks[-1])

    def _fail(self, request: Request, exc: BaseException) -> TokenEvent:
        request.finish_reason = "error"
        request.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        return request.event(None)

    def prepare(self) -> None:
        """Choose and build the step, at the first step unless called before (after any
        `distribute`): the native step where it applies, else the PyTorch step with weights packed
        for oneDNN."""
        if self.runner is not None:
            return
        rows = self.max_step_tokens + self.max_batch
        if self.quantize is not None:  # 0 where the model came quantized (a quantized directory)
            self.quantized_weights = quantize_model(self.model, self.quantize)
        if self._use_device_step():
            self.runner = DeviceStep(self.model, self.cache, rows, logits_source=self.logits_source)
            return
        if self.native:
            self.native_unavailable = unsupported_reason(self.model, self.cache)
            if self.native_unavailable is None:
                if self.pack_weights and blockable(self.model):  # bf16 with AVX512-BF16: the blocked layout
                    self.packed_weights = pack_model(self.model, layout="blocked")
                self.native_forward = NativeForward(self.model, self.cache, rows)
                moe_layers = [i for i, block in enumerate(self.model.blocks) if block.is_moe]
                self.runner = NativeStep(self.native_forward, moe_layers)
                return
        if self.pack_weights:
            self.packed_weights = pack_model(self.model)
        self.runner = TorchStep(self.model, self.cache, rows, self.logits_source)

    def _use_device_step(self) -> bool:
        """The device step when asked for; by default on CUDA, on one process, where it applies."""
        if self.step_choice == "device":
            return True
        return (self.step_choice == "auto" and self.device.type == "cuda" and self.logits_source is None
                and device_step_unsupported(self.model, self.cache) is None)

    @property
    def decode_path(self) -> str:
        """The step every forward runs on, prompt chunks and decode rows alike: "native", "pytorch" or "device"."""
        return self.runner.name if self.runner is not None else "pytorch"

    @property
    def native_products(self) -> str | None:
        """Which kernels the native step's products run on (AMX tiles from some rows, or why not);
        None off the native step or for fp32 weights."""
        if self.decode_path != "native" or next(self.model.parameters()).dtype != torch.bfloat16:
            return None
        from pyramoe.kernels.blocked import native_products

        return native_products()

    def expert_counts(self) -> torch.Tensor:
        """Tokens routed to each expert of each MoE layer since the engine started: [MoE layers,
        max experts] int64 (zeros before the first step)."""
        if self.runner is None:
            layers = [b.ffn.config.num_experts for b in self.model.blocks if b.is_moe]
            return torch.zeros(len(layers), max(layers, default=1), dtype=torch.int64, device="cpu")  # a CPU copy
        return self.runner.expert_counts()

    def _samples_on_device(self, request: Request) -> bool:
        """The device step draws this request's tokens (sampled) or penalises its logits first
        (penalised, greedy or not): it needs the request's settings, not only the argmax."""
        return isinstance(self.runner, DeviceStep) and (not request.params.greedy or penalised(request.params))

    def _device_draws(self, plan: list[tuple[Request, int, list[int]]], logit_rows: list[int]
                      ) -> list[RowSampling | None] | None:
        """Per logit row, how the device step draws its token: the last row of each request that
        samples its next token this step (seed, and the token's index as the counter, so a
        preempted request draws the same again); None elsewhere (argmax), or no list when no row
        samples."""
        draws: list[RowSampling | None] = [None] * len(logit_rows)
        for request, fed, picks in plan:
            done_reading = request.cached + fed >= len(request.context_ids)
            if picks and done_reading and self._samples_on_device(request):
                if penalised(request.params) and request.counts_slot != request.slot:
                    # Its counts on the device start from its output so far (after a preemption, not 0).
                    self.runner.set_output_counts(request.slot, request.output_ids)
                    request.counts_slot = request.slot
                draws[picks[-1]] = RowSampling(request.params, request.seed or 0, len(request.output_ids))
        return draws if any(d is not None for d in draws) else None

    def _device_logprobs(self, plan: list[tuple[Request, int, list[int]]], logit_rows: list[int]
                         ) -> list[int | None] | None:
        """Per logit row, the token whose log-probability the device step computes: the next prompt
        token of a prompt row being scored, -1 (the token chosen) for the row that picks a token of
        a request asking `logprobs`; None elsewhere, or no list when no row asks."""
        targets: list[int | None] = [None] * len(logit_rows)
        for request, fed, picks in plan:
            prompt, start = request.prompt_ids, request.cached
            if start < len(prompt) and request.scoring_prompt:
                for pick, position in zip(picks, range(start, start + fed)):
                    if position + 1 < len(prompt):
                        targets[pick] = prompt[position + 1]
            if picks and request.cached + fed >= len(request.context_ids) and request.params.logprobs is not None:
                targets[picks[-1]] = -1
        return targets if any(t is not None for t in targets) else None

    def _logprob(self, logits_RV: torch.Tensor, pick: int, token: int, top: int) -> Logprob:
        """Logit row `pick`'s log-probability of `token` and its `top` likeliest: the device step's
        (computed in the step) where it has them, else from the row's logits on the host."""
        computed = self.runner.logprobs if isinstance(self.runner, DeviceStep) else None
        if computed is not None and computed[pick] is not None:
            logprob, alternatives = computed[pick]
            return logprob, alternatives[:top]
        return token_logprobs(logits_RV[pick], token, top)

    def _accept(self, request: Request, logits_RV: torch.Tensor, greedy_R: list[int], pick: int) -> TokenEvent:
        """Choose the request's next token from logit row `pick` (`greedy_R[pick]`: its argmax, or
        the device step's draw for it), update its text, decide whether it is done. Penalties and
        log-probabilities are computed here, on the host, from the row's logits, except on the device
        step, which computes both."""
        params = request.params
        if (params.greedy and not penalised(params)) or self._samples_on_device(request):
            token = greedy_R[pick]  # no row indexed: a few microseconds per request and step
        else:
            scored_V = apply_penalties(logits_RV[pick], request.output_ids, params)
            token = int(scored_V.argmax()) if params.greedy else sample_token(scored_V, params, request.generator)
        if request.stop_ids is None:
            eos = set() if params.ignore_eos or self.eos_id is None else {self.eos_id}
            request.stop_ids = frozenset(params.stop_token_ids) | eos
        if token in request.stop_ids:
            request.finish_reason = "stop"
            if self.tokenizer is not None and request.read_offset < len(request.output_ids):
                request.text = self.tokenizer.decode(request.output_ids)  # with a pending partial character
            return request.event(None)  # the stop token is not part of the output
        logprob = self._logprob(logits_RV, pick, token, params.logprobs) if params.logprobs is not None else None
        request.output_ids.append(token)
        if self.tokenizer is not None:
            request.extend_text(self.tokenizer.decode)
            if request.cut_at_stop():
                request.finish_reason = "stop"
        # The new token is fed (and cached) at position `cached` by the next step: no room, no step.
        if not request.finished and (len(request.output_ids) >= params.max_tokens or request.cached >= self.max_len):
            request.finish_reason = "length"
            if self.tokenizer is not None and request.read_offset < len(request.output_ids):
                request.text = self.tokenizer.decode(request.output_ids)  # with a pending partial character
        return request.event(token, logprob)

    def _retire(self, request: Request) -> None:
        """A finished request leaves: its slot is free for the next (nothing is copied)."""
        if request.slot is not None:
            self._release(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._live_ids.discard(request.id)

    def _release(self, request: Request) -> None:
        self.active.remove(request)
        request.counts_slot = None  # another request may count in the slot before it comes back
        self.cache.free(request.slot)
        self._free_slots.append(request.slot)
        self._free_slots.sort()  # lowest first: requests admitted together get consecutive slots
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
            out.append(Completion(r.id, r.prompt_ids, r.output_ids, r.text, r.finish_reason or "length", r.error))
        return out
