"""Named model presets: tiny CPU models and the DeepSpeed-MoE paper's real sizes.

Paper presets assume a GPT-2 vocabulary (50257 tokens), sequence length 2048, learned positions,
tied input/output embeddings and biases everywhere (GPT-3 style), FFN width 4*d_model, MoE on every
other layer (DeepSpeed's default). PR-MoE uses Residual-MoE with 32/64 (350M) or 64/128 (1.3B)
experts: the first 10 MoE layers take the smaller count and the last 2 the larger, the layout of
DeepSpeed's PR-MoE examples. MoS students drop 12.5% of layers (24 -> 21): 10 MoE layers, the last
2 with the larger count. `tiny-mos` is the student `pyramoe distill` derives from `tiny-prmoe`
(pyramoe/models/student.py): 0.875 of 4 blocks rounds down to 3, so block 2 (dense) is dropped and
blocks 0, 1, 3 are kept - 75% of the depth, the MoE blocks with 4 and 8 experts both kept.

`tiny-llama-moe` is the Llama-family block at the tiny size, shaped like Qwen3-MoE (so `pyramoe
export` writes it as one): RoPE, RMSNorm, grouped-query attention (4 query / 2 key-value heads),
per-head q/k RMSNorm, no biases, untied head, SwiGLU; block 0 dense (the "dense first layers" of
DeepSeek/GLM-style models), blocks 1-3 with 8 top-2 experts of SwiGLU width 256 (the dense block's is 512).
"""

from __future__ import annotations

from collections.abc import Callable

from pyramoe.config import ModelConfig, build_layers, pyramid

PAPER_VOCAB = 50257
PAPER_SEQ_LEN = 2048
TINY_VOCAB = 8192
TINY_SEQ_LEN = 256

_BASES = {  # name: (layers, d_model, heads)
    "350m": (24, 1024, 16),
    "1.3b": (24, 2048, 16),
    "6.7b": (32, 4096, 32),
}


def _paper(base: str, experts: int | list[int] | None = None, residual: bool = False, layers: int | None = None):
    n_layers, d_model, n_heads = _BASES[base]
    n_layers = layers or n_layers
    placement = "none" if experts is None else "every_other"
    return ModelConfig(
        vocab_size=PAPER_VOCAB,
        max_seq_len=PAPER_SEQ_LEN,
        d_model=d_model,
        n_heads=n_heads,
        layers=build_layers(n_layers, placement, experts or 1, use_residual=residual),
    )


def _tiny(placement: str | list[int] = "none", experts: int | list[int] = 8, n_layers: int = 4, **moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=TINY_VOCAB,
        max_seq_len=TINY_SEQ_LEN,
        d_model=256,
        n_heads=4,
        layers=build_layers(n_layers, placement, experts, **moe),
    )


def _tiny_llama() -> ModelConfig:
    layers = build_layers(4, [1, 2, 3], 8, top_k=2, expert_d_ff=256, capacity_factor=1.25, eval_capacity_factor=2.0)
    return ModelConfig(
        vocab_size=TINY_VOCAB,
        max_seq_len=TINY_SEQ_LEN,
        d_model=256,
        n_heads=4,
        n_kv_heads=2,
        d_ff=512,
        activation="swiglu",
        bias=False,
        tie_embeddings=False,
        position="rope",
        rope_theta=10000.0,
        norm="rmsnorm",
        layer_norm_eps=1e-6,
        qk_norm="head",
        layers=layers,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    # Tiny CPU models (4 layers, width 256): the same active parameters per token, dense or MoE.
    "tiny-dense": lambda: _tiny(),
    "tiny-moe": lambda: _tiny("every_other", 8, capacity_factor=1.25, eval_capacity_factor=2.0),
    "tiny-moe-top2": lambda: _tiny("every_other", 8, top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0),
    "tiny-prmoe": lambda: _tiny(
        "every_other", [4, 8], use_residual=True, capacity_factor=1.25, eval_capacity_factor=2.0
    ),
    # The Mixture-of-Students student of tiny-prmoe (its blocks 0, 1, 3).
    "tiny-mos": lambda: _tiny(
        [1, 2], [4, 8], n_layers=3, use_residual=True, capacity_factor=1.25, eval_capacity_factor=2.0
    ),
    # The Llama-family block (Qwen3-MoE-shaped; see the module docstring).
    "tiny-llama-moe": _tiny_llama,
    # The paper's sizes (build on the meta device: torch.device("meta")).
    "350m": lambda: _paper("350m"),
    "1.3b": lambda: _paper("1.3b"),
    "6.7b": lambda: _paper("6.7b"),
    "350m-moe-128": lambda: _paper("350m", 128),
    "1.3b-moe-128": lambda: _paper("1.3b", 128),
    "350m-prmoe-32-64": lambda: _paper("350m", pyramid(12, (32, 64), (2,)), residual=True),
    "1.3b-prmoe-64-128": lambda: _paper("1.3b", pyramid(12, (64, 128), (2,)), residual=True),
    "350m-mos-32-64": lambda: _paper("350m", pyramid(10, (32, 64), (2,)), residual=True, layers=21),
    "1.3b-mos-64-128": lambda: _paper("1.3b", pyramid(10, (64, 128), (2,)), residual=True, layers=21),
}

# Total parameters the paper reports (Table 3 and Section 4), for the preset test and `pyramoe presets`.
PAPER_PARAMETERS = {
    "350m": 350e6,
    "1.3b": 1.3e9,
    "6.7b": 6.7e9,
    "350m-moe-128": 13e9,
    "1.3b-moe-128": 52e9,
    "350m-prmoe-32-64": 4e9,
    "1.3b-prmoe-64-128": 31e9,
    "350m-mos-32-64": 3.5e9,
    "1.3b-mos-64-128": 27e9,
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()
