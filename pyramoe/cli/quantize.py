"""`pyramoe quantize RUN_OR_CKPT --quantize FORMAT --out DIR`: write a checkpoint's model quantized.

DIR gets the model's int8 or int4 matrices in the native kernels' layouts with their scales, the
rest of its tensors (in --dtype) and its tokenizer (`pyramoe.inference.quantized_checkpoint`):
`pyramoe generate DIR`, `pyramoe serve DIR` and `Engine.load(DIR)` run it without quantizing again,
and compute what `--quantize FORMAT` on the checkpoint computes.
"""

from __future__ import annotations

import argparse
import json

from pyramoe.inference import resolve_dtype
from pyramoe.inference.packing import QUANTIZE_HELP, check_quantize
from pyramoe.inference.quantized_checkpoint import META_FILE, TENSOR_FILE, save_quantized
from pyramoe.train import build_model, load_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("quantize", help="write a checkpoint's model with int8 or int4 weights",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="RUN_OR_CKPT", help="checkpoint directory or run directory")
    parser.add_argument("--quantize", required=True, metavar="FORMAT", help=QUANTIZE_HELP)
    parser.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory to write")
    parser.add_argument("--dtype", default="auto",
                        help="the tensors left unquantized (embedding, norms, routers): auto (bf16 on CPUs with "
                             "native bf16 matmul), bf16 or fp32")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    check_quantize(args.quantize, "--quantize")
    dtype = resolve_dtype(args.dtype)
    ckpt = load_checkpoint(args.checkpoint)
    model = build_model(ckpt, dropless=True).to(dtype)
    tokenizer = ckpt.tokenizer_path if ckpt.tokenizer_path.is_file() else None
    out = save_quantized(model, args.quantize, args.out, tokenizer, {"checkpoint": str(ckpt.path), "step": ckpt.step})
    matrices = len(json.loads((out / META_FILE).read_text(encoding="utf-8"))["matrices"])
    print(f"{out}: {args.quantize}, {matrices} quantized modules, {(out / TENSOR_FILE).stat().st_size / 1e6:.1f} MB "
          f"({ckpt.path}, step {ckpt.step})")
    return 0
