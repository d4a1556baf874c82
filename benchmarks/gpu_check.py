"""GPU checks, run by hand on a CUDA machine (CI has none): the MoE layer and a GPT training step on
CUDA agree with the CPU, in fp32 (the per-expert path) and bf16 (torch._grouped_mm).

    python benchmarks/gpu_check.py [--out FILE.json]

Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from pyramoe.config import ModelConfig, MoEConfig, build_layers
from pyramoe.layers import MoELayer
from pyramoe.layers.experts import use_device_grouped_mm
from pyramoe.models import GPT


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().cpu() - want.float().cpu()).norm() / want.float().norm().clamp_min(1e-12))


def moe_case(activation: str, bias: bool, top_k: int, dropless: bool, bf16: bool) -> dict:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=top_k, capacity_factor=1.25, dropless=dropless)
    cpu = MoELayer(256, 512, config, activation=activation, bias=bias)
    gpu = MoELayer(256, 512, config, activation=activation, bias=bias)
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(1024, 256)
    x_cpu, x_gpu = x.clone().requires_grad_(), x.cuda().requires_grad_()
    y_cpu, _ = cpu(x_cpu)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        y_gpu, _ = gpu(x_gpu)
    y_cpu.square().mean().backward()
    y_gpu.float().square().mean().backward()
    errors = {"out": relative_error(y_gpu, y_cpu), "grad_x": relative_error(x_gpu.grad, x_cpu.grad)}
    for name, p in cpu.named_parameters():
        errors[f"grad_{name}"] = relative_error(dict(gpu.named_parameters())[name].grad, p.grad)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        grouped = use_device_grouped_mm(x_gpu)
    tolerance = 3e-2 if bf16 else 1e-4
    worst = max(errors.values())
    return {
        "case": f"moe {activation} bias={bias} top{top_k} {'dropless' if dropless else 'cf1.25'} "
        f"{'bf16' if bf16 else 'fp32'}",
        "grouped_mm": grouped, "worst_rel_error": worst, "ok": worst < tolerance, "tolerance": tolerance,
    }


def gpt_train_case(bf16: bool) -> dict:
    config = ModelConfig(vocab_size=512, max_seq_len=64, d_model=128, n_heads=4,
                         layers=build_layers(4, "every_other", 8, capacity_factor=1.25))
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = GPT(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = torch.randint(0, 512, (8, 65), generator=torch.Generator().manual_seed(1)).to(device)
        run = []
        for _ in range(5):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16 and device == "cuda"):
                out = model(data[:, :-1])
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), data[:, 1:].flatten()) + out.aux_loss.float()
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses[device] = run
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses["cuda"], losses["cpu"]))
    tolerance = 2e-2 if bf16 else 1e-4
    return {"case": f"gpt 5 AdamW steps {'bf16' if bf16 else 'fp32'}", "losses": losses,
            "worst_rel_error": gap, "ok": gap < tolerance, "tolerance": tolerance}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "checks": []}
    for bf16 in (False, True):
        for activation, bias in (("gelu", True), ("swiglu", False)):
            for top_k, dropless in ((1, False), (2, True)):
                results["checks"].append(moe_case(activation, bias, top_k, dropless, bf16))
        results["checks"].append(gpt_train_case(bf16))
    for check in results["checks"]:
        extra = f" grouped_mm={check['grouped_mm']}" if "grouped_mm" in check else ""
        print(f"{'ok  ' if check['ok'] else 'FAIL'} {check['case']}: worst relative error "
              f"{check['worst_rel_error']:.2e} (tolerance {check['tolerance']:.0e}){extra}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0 if all(c["ok"] for c in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
