"""The native forward (`pyramoe/kernels/native.cpp`) bound to a model and a KV cache.

`unsupported_reason(model, cache)` says why the native step cannot compute a model (None: it can:
standard or grouped-query attention, RMSNorm or LayerNorm, SwiGLU or GELU, dense, MoE, shared-expert
and Residual-MoE blocks, softmax or sigmoid routers with DeepSeek-V3 selection, fp32 or bf16 on one
CPU process, dropless, matrices all plain or all blocked, any of them int8 or int4); the engine then keeps
the PyTorch step. `NativeForward` reads the matrices and the KV cache where the model and cache keep
them (no copy; a quantized matrix with a descriptor of its format and scales); norm gains, biases
and router weights get fp32 copies. `NativeForward.expert_counts` counts the rows
routed to each expert of each MoE layer over its forwards (what `MoEStats.routed_per_expert` counts).

Legend: B rows, D width, V vocabulary.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import nn

from pyramoe.inference.packing import MIN_BLOCKED_OUTPUTS
from pyramoe.kernels import (
    BlockedWeight,
    Int4Weight,
    Int8Weight,
    blocking_available,
    build_error,
    can_block,
    load_library,
)
from pyramoe.kernels.quantized import FORMAT_INT8
from pyramoe.kernels.quantized4 import FORMAT_INT4
from pyramoe.layers.attention import CausalSelfAttention
from pyramoe.layers.dispatch import LocalDispatcher
from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.mlp import MLP
from pyramoe.layers.moe import MoELayer
from pyramoe.layers.norms import RMSNorm
from pyramoe.layers.packed import PackedLinear

_P = ctypes.c_void_p
_I = ctypes.c_int64

QUANTIZED_LAYOUTS = {"int8", "int4"}
# The tensors of a quantized expert stack the native step addresses from expert 0's.
_STACKED_PARTS = {Int8Weight: ("data", "scales", "sums"), Int4Weight: ("data", "scales", "mins")}


class _Quant(ctypes.Structure):  # PmQuant: a matrix's own format
    _fields_ = [("format", _I), ("scales", _P), ("sums", _P), ("group", _I), ("group_scales", _P),
                ("group_mins", _P)]


class _Mlp(ctypes.Structure):
    _fields_ = [("in_w", _P), ("out_w", _P), ("in_b", _P), ("out_b", _P), ("ff", _I), ("in_q", _P), ("out_q", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm_w", _P), ("attn_norm_b", _P), ("qkv_w", _P), ("o_w", _P), ("qkv_b", _P), ("o_b", _P),
        ("q_norm_w", _P), ("k_norm_w", _P), ("k_cache", _P), ("v_cache", _P), ("ffn_norm_w", _P),
        ("ffn_norm_b", _P), ("is_moe", _I), ("mlp", _Mlp), ("num_experts", _I), ("top_k", _I),
        ("expert_ff", _I), ("router_w", _P), ("score_bias", _P), ("router_sigmoid", _I),
        ("plain_selection", _I), ("groups", _I), ("topk_groups", _I), ("renormalize", _I),
        ("routed_scale", ctypes.c_double), ("exp_in_w", _P), ("exp_out_w", _P), ("exp_in_b", _P),
        ("exp_out_b", _P), ("shared", _Mlp), ("shared_gate_w", _P), ("coef_w", _P), ("coef_b", _P),
        ("expert_counts", _P), ("qkv_q", _P), ("o_q", _P), ("exp_in_q", _P), ("exp_out_q", _P),
        ("k_scales", _P), ("v_scales", _P),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", _I), ("d_model", _I), ("n_heads", _I), ("n_kv_heads", _I), ("head_dim", _I),
        ("rot_dim", _I), ("vocab", _I), ("slots", _I), ("max_len", _I), ("bf16", _I), ("blocked", _I), ("rmsnorm", _I),
        ("swiglu", _I), ("qk_norm", _I), ("eps", ctypes.c_double), ("qkv_clip", ctypes.c_double),
        ("final_norm_w", _P), ("final_norm_b", _P), ("head_w", _P), ("layers", ctypes.POINTER(_Layer)),
        ("threads", _I), ("max_rows", _I), ("max_ff", _I), ("max_experts", _I), ("tok_emb", _P), ("pos_emb", _P),
        ("inv_freq", _P), ("rope_factor", ctypes.c_double), ("block_table", _P), ("block_size", _I),
        ("block_shift", _I), ("max_blocks", _I), ("num_blocks", _I), ("head_q", _P), ("kv_int8", _I),
    ]


# The C struct each ctypes struct mirrors field by field (native.cpp).
MIRRORS: dict[str, type[ctypes.Structure]] = {"PmModel": _Model, "PmLayer": _Layer, "PmMlp": _Mlp, "PmQuant": _Quant}


def struct_mismatch(library: ctypes.CDLL) -> str | None:
    """Where a ctypes struct's size differs from its C struct's in the built library (a field added
    on one side only): then every pointer the native step reads would be misplaced. None: all agree."""
    library.pm_sizeof.restype = _I
    library.pm_sizeof.argtypes = [ctypes.c_char_p]
    for c_name, mirror in MIRRORS.items():
        ours, theirs = ctypes.sizeof(mirror), library.pm_sizeof(c_name.encode())
        if ours != theirs:
            return (f"native library: struct {c_name} is {theirs} bytes in native.cpp, {ours} in its ctypes "
                    f"mirror {mirror.__name__} ({__name__}); the two must list the same fields")
    return None


def unsupported_reason(model: nn.Module, cache: object) -> str | None:
    """Why the native step cannot run this model and cache (None: it can)."""
    library = load_library()
    if library is None:
        return f"native library unavailable: {build_error()}"
    mismatch = struct_mismatch(library)
    if mismatch:
        return mismatch
    cfg = model.config
    dtype = model.tok_emb.weight.dtype
    if model.tok_emb.weight.device.type != "cpu":
        return "not on the CPU"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {dtype}"
    if cfg.attention == "latent":
        return "latent attention"
    if cfg.norm not in ("rmsnorm", "layernorm") or cfg.activation not in ("swiglu", "gelu"):
        return f"norm {cfg.norm} / activation {cfg.activation}"
    int8 = getattr(cache, "key_scales", None) is not None
    scales = [*cache.key_scales, *cache.value_scales] if int8 else []
    if any(k.dtype != (torch.int8 if int8 else dtype) or not k.is_contiguous() for k in [*cache.keys, *cache.values]):
        return "KV cache layout"
    if any(s.dtype != torch.float32 or not s.is_contiguous() for s in scales):
        return "KV cache scales layout"
    for block in model.blocks:
        attn = block.attn
        if type(attn) is not CausalSelfAttention:
            return "attention is parallelised"
        if attn.n_heads % attn.n_kv_heads or attn.n_heads // attn.n_kv_heads > 64:
            return "query heads not a multiple of key/value heads, or more than 64 per key/value head"
        if block.is_moe:
            reason = _moe_unsupported(block.ffn)
            if reason:
                return reason
        elif type(block.ffn) is not MLP:
            return "dense FFN is parallelised"
    layouts = {layout_of(m) for m in native_matrices(model)}
    if None in layouts:
        return "weights packed for oneDNN or split over processes"
    if len(layouts - QUANTIZED_LAYOUTS) > 1:  # quantized matrices carry their own format; the others share one
        return "some weights blocked, others not"
    if "blocked" in layouts and not blocking_available():
        return "blocked weights on a CPU without AVX512-BF16"
    if any(p.dtype != dtype for p in model.parameters() if p.dim() >= 2):
        return "mixed weight dtypes"
    return None


def native_matrices(model: nn.Module) -> list[nn.Module]:
    """The modules whose matrices the native step multiplies with (all plain, or all blocked, but
    for int8 ones)."""
    matrices: list[nn.Module] = [model.lm_head]
    for block in model.blocks:
        matrices += [block.attn.qkv, block.attn.proj]
        mlps = [block.ffn] if not block.is_moe else [block.ffn.residual_mlp, block.ffn.shared_expert]
        if block.is_moe:
            matrices.append(block.ffn.experts)
        matrices += [linear for mlp in mlps if mlp is not None for linear in (mlp.fc_in, mlp.fc_out)]
    return matrices


def blockable(model: nn.Module) -> bool:
    """Every matrix of the native step can take the blocked layout (bf16, even input widths, at
    least 16 outputs, AVX512-BF16): `pack_model(model, "blocked")` then blocks them all."""
    for module in native_matrices(model):
        if layout_of(module) in QUANTIZED_LAYOUTS:
            continue
        if type(module) is nn.Linear:
            if module.out_features < MIN_BLOCKED_OUTPUTS or not can_block(module.weight):
                return False
        elif type(module) is not GroupedExperts or module.w_in is None or not (
                can_block(module.w_in) and can_block(module.w_out)):
            return False
    return True


def layout_of(module: nn.Module) -> str | None:
    """"plain" (nn.Linear, GroupedExperts' stacked weights), "blocked" (the native kernels' layout,
    `pyramoe.inference.packing.pack_model(layout="blocked")`), "int8" or "int4" (`pyramoe.inference.
    packing.quantize_model`), or None (anything else)."""
    if type(module) is nn.Linear:
        return "plain"
    if type(module) is PackedLinear:
        return _packed_layout(module.packed_weight)
    if type(module) is GroupedExperts:
        if module.packed is None:
            return "plain" if module.w_in is not None else None
        return _packed_layout(module.packed[0][0])
    return None


def _packed_layout(weight: object) -> str | None:
    if isinstance(weight, BlockedWeight):
        return "blocked"
    return "int8" if isinstance(weight, Int8Weight) else "int4" if isinstance(weight, Int4Weight) else None


def _moe_unsupported(moe: MoELayer) -> str | None:
    if type(moe.dispatcher) is not LocalDispatcher or moe.token_split is not None:
        return "experts are spread over processes"
    if type(moe.experts) is not GroupedExperts:
        return "experts are sharded"
    if not moe.config.dropless:
        return "MoE layers with a capacity (the native step is dropless)"
    return None


def block_table_of(cache: object) -> tuple[torch.Tensor, int]:
    """The cache's block table [slots, max blocks] (int64, CPU; read in place, so the cache's later
    assignments reach the native step) and block size. A slot cache is one block of max_len per slot."""
    table = getattr(cache, "block_table", None)
    if table is not None:
        return table, cache.block_size
    slots, max_len = cache.keys[0].shape[0], cache.keys[0].shape[2]
    return torch.arange(slots, dtype=torch.int64, device="cpu").view(slots, 1), max_len


class NativeForward:
    """Runs forwards of `model` natively over `cache` (a PagedKVCache, SlotKVCache or KVCache): rows
of (token, slot, position), prompt chunks and decode rows alike, at most `max_rows` per call
(`forward`); `step` is the decode-only form, row b in slot b.

    `expert_counts` (int64 [n_layers, max_experts], max_experts the most experts of any MoE layer, 1
    without any): entry [l, e] is the number of rows (tokens) routed to expert e of block l over every
    `step`/`forward` since construction or `reset_expert_counts()`, each row counting once for each of
    its top-k experts (after DeepSeek-V3 group selection: the experts whose outputs are combined).
    Rows of dense blocks, and columns beyond a layer's experts, stay 0. The forward adds to it in
    place (never reallocated: read it, or copy it, between calls)."""

    def __init__(self, model: nn.Module, cache: object, max_rows: int, library: ctypes.CDLL | None = None):
        # `library`: another build of the kernels (a benchmark's baseline); by default this machine's.
        self.library = library if library is not None else load_library()
        if self.library is None:
            raise RuntimeError(f"native forward: the native library is unavailable ({build_error()})")
        mismatch = struct_mismatch(self.library)
        if mismatch:
            raise RuntimeError(mismatch)
        self.model, self.cache, self.max_rows = model, cache, max_rows
        self._keep: list[torch.Tensor] = []  # fp32 copies the structs point into
        self._formats: list[_Quant] = []  # the int8 matrices' descriptors the structs point to
        blocks = list(model.blocks)
        max_experts = max([b.ffn.num_experts for b in blocks if b.is_moe] or [1])
        self.expert_counts = torch.zeros(len(blocks), max_experts, dtype=torch.int64, device="cpu")
        self.struct = self._describe()
        # Addresses the structs hold. `_keep` keeps those tensors alive, so a model or cache moved
        # afterwards (model.to(...), new tensors) leaves them stale, not dangling: the step would read
        # the old weights and write a cache nobody reads. _call refuses it.
        self._watched = [(t, t.data_ptr()) for t in (model.tok_emb.weight, cache.keys[0], cache.values[-1],
                                                      self._table)]
        self.library.pm_workspace_bytes.restype = _I
        self.library.pm_forward.restype = _I
        size = self.library.pm_workspace_bytes(ctypes.byref(self.struct), _I(max_rows))
        self._struct_ref = ctypes.byref(self.struct)
        self._sized_threads = self.struct.threads
        # step()'s buffers: rows' tokens and positions, rows 0..max_rows-1 as slots and logit rows.
        self._tokens, self._positions, self._argmax = ((_I * max_rows)() for _ in range(3))
        self._row_ids = (_I * max_rows)(*range(max_rows))
        self._logits = torch.empty(max_rows, model.config.vocab_size)
        self.workspace = torch.empty(size, dtype=torch.uint8)

    def _ptr(self, tensor: torch.Tensor | None, fp32: bool = False) -> int | None:
        if tensor is None:
            return None
        tensor = tensor.detach()
        if fp32:
            tensor = tensor.float().contiguous().clone()
        else:
            assert tensor.is_contiguous()
        self._keep.append(tensor)
        return tensor.data_ptr()

    def _matrix(self, linear: nn.Module) -> int:
        """The weight's address: nn.Linear's [out, in], or a PackedLinear's blocked or int8 data."""
        if isinstance(linear, PackedLinear):
            return self._ptr(linear.packed_weight.data)
        return self._ptr(linear.weight)

    def _format(self, weight: object) -> int | None:
        """The address of a PmQuant for an int8 matrix (or the first of a stack: its scales and sums
        run on, matrix after matrix), None for the model's own format."""
        if isinstance(weight, PackedLinear):
            weight = weight.packed_weight
        if isinstance(weight, Int4Weight):
            described = _Quant(FORMAT_INT4, None, None, weight.group, self._ptr(weight.scales), self._ptr(weight.mins))
        elif isinstance(weight, Int8Weight):
            described = _Quant(FORMAT_INT8, self._ptr(weight.scales), self._ptr(weight.sums))
        else:
            return None
        self._formats.append(described)
        return ctypes.addressof(described)

    def _experts(self, experts: GroupedExperts) -> tuple[int, int, int]:
        """Addresses of the stacked first and second projections, and the expert hidden width."""
        if experts.packed is None:
            return self._ptr(experts.w_in), self._ptr(experts.w_out), experts.w_out.shape[2]
        firsts = []
        for per_expert in experts.packed:  # views of one stacked tensor, expert after expert
            for name in _STACKED_PARTS.get(type(per_expert[0]), ("data",)):
                parts = [getattr(w, name) for w in per_expert]
                if parts[0] is None:  # symmetric int4: no mins
                    continue
                step = parts[0].numel() * parts[0].element_size()
                assert all(d.data_ptr() == parts[0].data_ptr() + e * step for e, d in enumerate(parts))
            firsts.append(per_expert[0].data)
        return self._ptr(firsts[0]), self._ptr(firsts[1]), experts.packed[1][0].in_features

    def _mlp(self, mlp: MLP | None) -> _Mlp:
        if mlp is None:
            return _Mlp()
        fc_in, fc_out = mlp.fc_in, mlp.fc_out
        return _Mlp(self._matrix(fc_in), self._matrix(fc_out), self._ptr(fc_in.bias, True),
                    self._ptr(fc_out.bias, True), fc_out.in_features, self._format(fc_in), self._format(fc_out))

    def _norm(self, norm: nn.Module) -> tuple[int | None, int | None]:
        return self._ptr(norm.weight, True), self._ptr(getattr(norm, "bias", None), True)

    def _layer(self, index: int, block: nn.Module) -> _Layer:
        attn = block.attn
        layer = _Layer()
        layer.attn_norm_w, layer.attn_norm_b = self._norm(block.ln_attn)
        layer.ffn_norm_w, layer.ffn_norm_b = self._norm(block.ln_ffn)
        layer.qkv_w, layer.qkv_b = self._matrix(attn.qkv), self._ptr(attn.qkv.bias, True)
        layer.o_w, layer.o_b = self._matrix(attn.proj), self._ptr(attn.proj.bias, True)
        layer.qkv_q, layer.o_q = self._format(attn.qkv), self._format(attn.proj)
        if attn.qk_norm != "off":
            layer.q_norm_w, layer.k_norm_w = self._ptr(attn.q_norm.weight, True), self._ptr(attn.k_norm.weight, True)
        layer.k_cache, layer.v_cache = self._ptr(self.cache.keys[index]), self._ptr(self.cache.values[index])
        if getattr(self.cache, "key_scales", None) is not None:
            layer.k_scales = self._ptr(self.cache.key_scales[index])
            layer.v_scales = self._ptr(self.cache.value_scales[index])
        if not block.is_moe:
            layer.mlp = self._mlp(block.ffn)
            return layer
        moe, cfg = block.ffn, block.ffn.config
        experts = moe.experts
        layer.is_moe = 1
        layer.mlp = self._mlp(moe.residual_mlp)
        layer.exp_in_w, layer.exp_out_w, layer.expert_ff = self._experts(experts)
        if experts.packed is not None:
            layer.exp_in_q, layer.exp_out_q = (self._format(per_expert[0]) for per_expert in experts.packed)
        layer.num_experts, layer.top_k = experts.num_experts, cfg.top_k
        layer.router_w = self._ptr(moe.router.weight, True)
        layer.score_bias = self._ptr(getattr(moe.router, "score_bias", None), True)
        layer.router_sigmoid = int(cfg.router_score == "sigmoid")
        layer.plain_selection = int(cfg.plain_selection)
        layer.groups, layer.topk_groups = cfg.expert_groups, cfg.topk_groups
        # Dropless: "before_drop" and "after_drop" both divide the k weights by their sum.
        layer.renormalize = int(cfg.top_k > 1 and moe.router.rules.gate_norm in ("before_drop", "after_drop"))
        layer.routed_scale = cfg.routed_scaling
        if experts.b_in is not None:
            layer.exp_in_b = self._ptr(experts.b_in.squeeze(1), True)
            layer.exp_out_b = self._ptr(experts.b_out.squeeze(1), True)
        layer.expert_counts = self.expert_counts[index].data_ptr()
        layer.shared = self._mlp(moe.shared_expert)
        if moe.shared_expert_gate is not None:
            layer.shared_gate_w = self._ptr(moe.shared_expert_gate.weight.reshape(-1), True)
        if moe.coefficient is not None:
            layer.coef_w, layer.coef_b = self._ptr(moe.coefficient.weight, True), self._ptr(moe.coefficient.bias, True)
        return layer

    def _describe(self) -> _Model:
        model, cfg = self.model, self.model.config
        table, block_size = block_table_of(self.cache)
        # The positions the native step accepts (it refuses others): the cache's, fewer where a
        # learned position table is shorter (a cache longer than the model's context), since past the
        # table the embedding would read beyond it.
        self.learned_positions = None if model.rope is not None else model.pos_emb.num_embeddings
        self.max_positions = min(self.cache.max_len, self.learned_positions or self.cache.max_len)
        self._table = table
        blocks = list(model.blocks)
        layers = (_Layer * len(blocks))(*(self._layer(i, b) for i, b in enumerate(blocks)))
        self._layers = layers
        attn = blocks[0].attn
        ffs = [1]
        for block in blocks:
            ffn = block.ffn
            mlps = [ffn] if not block.is_moe else [ffn.residual_mlp, ffn.shared_expert]
            ffs += [m.fc_out.in_features for m in mlps if m is not None]
            if block.is_moe:
                experts = ffn.experts
                ffs.append(experts.w_out.shape[2] if experts.packed is None else experts.packed[1][0].in_features)
        experts = [b.ffn.num_experts for b in blocks if b.is_moe] or [1]
        struct = _Model(
            n_layers=len(blocks), d_model=cfg.d_model, n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads,
            head_dim=attn.head_dim, rot_dim=cfg.rope_dim if model.rope is not None else 0,
            vocab=cfg.vocab_size, slots=table.shape[0], max_len=self.max_positions,
            bf16=int(model.tok_emb.weight.dtype == torch.bfloat16),
            blocked=int("blocked" in {layout_of(m) for m in native_matrices(model)}),
            rmsnorm=int(isinstance(blocks[0].ln_attn, RMSNorm)),
            swiglu=int(cfg.activation == "swiglu"), qk_norm={"off": 0, "head": 1, "full": 2}[attn.qk_norm],
            eps=cfg.layer_norm_eps, qkv_clip=attn.qkv_clip or 0.0,
            threads=torch.get_num_threads(), max_rows=self.max_rows, max_ff=max(ffs), max_experts=max(experts),
        )
        struct.final_norm_w, struct.final_norm_b = self._norm(model.ln_f)
        struct.head_w = self._matrix(model.lm_head)
        struct.head_q = self._format(model.lm_head)
        struct.tok_emb = self._ptr(model.tok_emb.weight)
        if model.rope is None:
            struct.pos_emb = self._ptr(model.pos_emb.weight)
        else:
            struct.inv_freq = self._ptr(model.rope.inv_freq, True)
            struct.rope_factor = model.rope.attention_factor
        struct.layers = ctypes.cast(layers, ctypes.POINTER(_Layer))
        struct.block_table = self._ptr(table)
        struct.block_size = block_size
        struct.block_shift = block_size.bit_length() - 1 if block_size & (block_size - 1) == 0 else -1
        struct.max_blocks, struct.num_blocks = table.shape[1], self.cache.keys[0].shape[0]
        struct.kv_int8 = int(getattr(self.cache, "key_scales", None) is not None)
        return struct

    def reset_expert_counts(self) -> None:
        """Zero `expert_counts` (in place: the native forward keeps its address)."""
        self.expert_counts.zero_()

    def step(self, tokens_B: Sequence[int], positions_B: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """A decode step: row b (cache slot b) feeds tokens_B[b] at position positions_B[b] and
        attends to its slot's positions [0, positions_B[b]]. Returns logits [B, V] (fp32; a view of
        a buffer the next step overwrites) and their argmax per row. Lists in, preallocated buffers
        out: a batch-1 step spent ~0.1 ms of its ~2 ms making small tensors."""
        rows = len(tokens_B)
        if not 1 <= rows <= self.max_rows or len(positions_B) != rows:
            raise ValueError(f"native forward: {rows} rows, sized for 1..{self.max_rows}")
        self._tokens[:rows] = [int(t) for t in tokens_B]
        self._positions[:rows] = [int(p) for p in positions_B]
        self._call(self._tokens, self._row_ids, self._positions, rows, self._row_ids, rows, self._logits, self._argmax)
        return self._logits[:rows], self._argmax[:rows]

    def forward(
        self, tokens_N: torch.Tensor, slots_N: torch.Tensor, positions_N: torch.Tensor, logit_rows: torch.Tensor
    ) -> tuple[torch.Tensor, list[int]]:
        """Rows are tokens: row n feeds tokens_N[n] at position positions_N[n] of the sequence in cache
        slot slots_N[n] (a prefill chunk: consecutive positions; rows of one forward see the keys of
        the earlier positions of their slot, those written by this forward included). Returns the
        logits of the rows in `logit_rows` [R, V] (fp32) and their argmax."""
        rows = tokens_N.shape[0]
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"native forward: {rows} rows, sized for 1..{self.max_rows}")
        tokens, slots, positions, picks = (t.to(torch.int64).contiguous()
                                           for t in (tokens_N, slots_N, positions_N, logit_rows))
        logits_RV = torch.empty(picks.numel(), self.model.config.vocab_size)
        argmax_R = torch.empty(picks.numel(), dtype=torch.int64)
        pointers = [_P(t.data_ptr()) for t in (tokens, slots, positions)]
        self._call(*pointers, rows, _P(picks.data_ptr()), picks.numel(), logits_RV, _P(argmax_R.data_ptr()))
        return logits_RV, argmax_R.tolist()

    def _call(self, tokens: object, slots: object, positions: object, rows: int, picks: object, n_picks: int,
              logits: torch.Tensor, argmax: object) -> None:
        if any(t.data_ptr() != address for t, address in self._watched):
            raise ValueError("native forward: the model or its KV cache moved since the engine's first step")
        # The workspace holds per-thread scratch for the threads it was sized for: never more.
        self.struct.threads = max(1, min(torch.get_num_threads(), self._sized_threads))
        status = self.library.pm_forward(self._struct_ref, tokens, slots, positions, _I(rows), picks, _I(n_picks),
                                         _P(logits.data_ptr()), argmax, _P(self.workspace.data_ptr()))
        if status == 2:
            learned = (f"; the model learned {self.learned_positions} positions"
                       if self.max_positions < self.cache.max_len else "")
            raise ValueError(f"native forward: a slot or position outside the cache ({self.struct.slots} slots "
                             f"x {self.cache.max_len} positions{learned})")
        if status != 0:
            raise ValueError(f"native forward: bad rows, tokens or logit rows (status {status})")
