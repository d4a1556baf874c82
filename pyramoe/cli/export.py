"""`pyramoe export RUN_OR_CKPT OUT_DIR`: write a checkpoint as a Hugging Face model directory.

RUN_OR_CKPT is a checkpoint directory or a run directory (its latest checkpoint). OUT_DIR gets
config.json, model.safetensors (per-expert hub layout) and the tokenizer (tokenizer.json,
tokenizer_config.json), loadable with transformers' AutoModelForCausalLM / AutoTokenizer. The
architecture follows from the model's features (e.g. tiny-llama-moe -> Qwen3-MoE); a model with a
feature no HF MoE architecture has (the GPT-2 block's learned positions, Residual-MoE, a PR-MoE
pyramid, ...) is refused with one line naming it. HF MoE layers are dropless: the exported model
computes what `pyramoe generate` (dropless by default) computes.

--dtype: the tensors' dtype, named in config.json (`dtype`, `torch_dtype`) so that transformers'
`dtype="auto"` loads them as written. fp32 (the default) is lossless: checkpoints hold fp32 weights
whatever the training precision. bf16 halves the files. auto: the precision the run trained in
(train.precision: bf16 -> bf16, else fp32), not the exporting machine's, so one run exports alike
everywhere.
"""

from __future__ import annotations

import argparse

import torch

from pyramoe.data import Tokenizer
from pyramoe.hf.export import export_hf
from pyramoe.train import build_model, load_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="RUN_OR_CKPT", help="checkpoint directory or run directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) directory to write")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "auto"), default="fp32",
                        help="tensor dtype: fp32 (default, lossless), bf16, or auto = the run's training "
                             "precision (train.precision)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    model = build_model(ckpt, dropless=True)
    tokenizer_path = ckpt.tokenizer_path if ckpt.tokenizer_path.is_file() else None
    eos = Tokenizer.from_file(tokenizer_path).eos_token if tokenizer_path else None
    dtype = export_dtype(args.dtype, ckpt.state["run_config"]["train"].get("precision", "fp32"))
    arch = export_hf(model, args.out_dir, tokenizer_path, eos, dtype=dtype)
    print(f"{args.out_dir}: {arch.hf_class}, {str(dtype).removeprefix('torch.')} ({ckpt.path}, step {ckpt.step})")
    return 0


def export_dtype(choice: str, train_precision: str) -> torch.dtype:
    """--dtype's tensor dtype; "auto" follows the run's training precision."""
    if choice == "auto":
        choice = "bf16" if train_precision == "bf16" else "fp32"
    return torch.bfloat16 if choice == "bf16" else torch.float32
