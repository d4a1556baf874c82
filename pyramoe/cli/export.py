"""`pyramoe export RUN_OR_CKPT OUT_DIR`: write a checkpoint as a Hugging Face model directory.

RUN_OR_CKPT is a checkpoint directory or a run directory (its latest checkpoint). OUT_DIR gets
config.json, model.safetensors (per-expert hub layout) and the tokenizer (tokenizer.json,
tokenizer_config.json), loadable with transformers' AutoModelForCausalLM / AutoTokenizer. The
architecture follows from the model's features (e.g. tiny-llama-moe -> Qwen3-MoE); a model with a
feature no HF MoE architecture has (the GPT-2 block's learned positions, Residual-MoE, a PR-MoE
pyramid, ...) is refused with one line naming it. HF MoE layers are dropless: the exported model
computes what `pyramoe generate` (dropless by default) computes.
"""

from __future__ import annotations

import argparse

from pyramoe.data import Tokenizer
from pyramoe.hf.export import export_hf
from pyramoe.train import build_model, load_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="RUN_OR_CKPT", help="checkpoint directory or run directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) directory to write")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    model = build_model(ckpt, dropless=True)
    tokenizer_path = ckpt.tokenizer_path if ckpt.tokenizer_path.is_file() else None
    eos = Tokenizer.from_file(tokenizer_path).eos_token if tokenizer_path else None
    arch = export_hf(model, args.out_dir, tokenizer_path, eos)
    print(f"{args.out_dir}: {arch.hf_class} ({ckpt.path}, step {ckpt.step})")
    return 0
