#!/usr/bin/env bash
# One prepared pass of distributed-training checks for a machine with 2 or more GPUs (CI has none):
# expert-parallel training on NCCL at EP=2 (flat) and, with 4 GPUs, EP=4 over two emulated nodes
# (hierarchical all-to-all), the same run resumed on another process count (global batch kept),
# FSDP2 sharding (--zero) at EP=2, the host-sync count of the MoE layer's exchanges, the MoE
# all-to-all benchmark (flat / hierarchical / coordinated, bf16 rows on NCCL; its table in the log,
# OUT_DIR/all_to_all.json) and one table of what each step did (final loss, tokens/s, exit status)
# in OUT_DIR/multi.json.
#   bash benchmarks/gpu_multi.sh OUT_DIR
# GPU_MULTI_DEVICE=cpu runs the same steps on gloo CPU processes (a dry run of the script itself);
# GPU_MULTI_STEPS sets the training steps (default 60). On one GPU only what one rank can run runs.
set -u
out=${1:?OUT_DIR}
mkdir -p "$out"
: > "$out/steps.tsv"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
device=${GPU_MULTI_DEVICE:-cuda}
steps=${GPU_MULTI_STEPS:-60}
if [ "$device" = cuda ]; then
    gpus=$(python -c "import torch; print(torch.cuda.device_count())")
else
    gpus=4  # gloo processes stand in for GPUs
fi
echo "device $device, $gpus ranks available"
step() {  # step NAME LIMIT_S COMMAND...: run it, record its exit status
    local name=$1 limit=$2; shift 2
    echo "== $name (${limit} s): $*"; timeout "$limit" "$@"; local code=$?
    echo "== exit $code"; printf '%s\t%s\n' "$name" "$code" >> "$out/steps.tsv"
}
train=(python -m pyramoe train --preset tiny-moe --device "$device" --quiet --no-plot --dist-timeout 120)
if ((gpus >= 2)); then
    step ep2-flat 300 "${train[@]}" --steps "$steps" --nproc-per-node 2 --ep 2 --run-dir "$out/ep2"
    # A copy of that run resumed on one process: the global batch is kept (micro-batches follow the
    # new count).
    cp -r "$out/ep2" "$out/ep2-resumed" && rm -f "$out/ep2-resumed/.lock"
    step ep2-resume-on-1 300 "${train[@]}" --steps $((steps + 20)) --nproc-per-node 1 --resume \
        --run-dir "$out/ep2-resumed"
    step ep2-zero 300 "${train[@]}" --steps "$steps" --nproc-per-node 2 --ep 2 --zero --run-dir "$out/ep2-zero"
else
    step ep1 300 "${train[@]}" --steps "$steps" --nproc-per-node 1 --run-dir "$out/ep1"
fi
if ((gpus >= 4)); then
    step ep4-hierarchical 300 "${train[@]}" --steps "$steps" --nproc-per-node 4 --ep 4 \
        --all-to-all hierarchical --ranks-per-node 2 --run-dir "$out/ep4-hier"
fi
# The MoE layer's all-to-all on the same ranks: with 4 GPUs two emulated nodes of 2 (hierarchical
# and TP=2 coordinated), with 2 one GPU per emulated node; three small sizes, seconds on GPUs.
a2a=(python -m pyramoe bench all-to-all --device "$device" --sizes 8x1024,256x1024,2048x1024 --repeats 5 --warmup 2
     --timeout 60 --wall-timeout 170 --out "$out/all_to_all.json")
if ((gpus >= 4)); then
    step all-to-all 180 "${a2a[@]}" --nproc 4 --ranks-per-node 2 --tp 2 \
        --schemes flat,hierarchical,coordinated,coordinated-hierarchical
elif ((gpus >= 2)); then
    step all-to-all 180 "${a2a[@]}" --nproc 2 --ranks-per-node 1 --schemes flat,hierarchical
fi
# Host syncs per MoE layer forward, flat and hierarchical (counted on gloo CPU ranks by wrapping the
# sync points; on CUDA a replayed decode step is checked with set_sync_debug_mode in gpu_session.sh).
step host-syncs 300 python -m pytest -q -p no:cacheprovider tests/test_host_syncs.py
python - "$out" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status = line.split("\t")
    row = {"step": name, "exit": int(status)}
    directories = {"ep2-flat": "ep2", "ep2-resume-on-1": "ep2-resumed", "ep4-hierarchical": "ep4-hier"}
    run = out / directories.get(name, name)
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        train = [r for r in records if r.get("type") == "train"]
        evals = [r for r in records if r.get("type") == "eval"]
        if train:
            row["last_step"], row["loss"] = train[-1]["step"], round(train[-1]["loss"], 4)
            speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
            row["tokens_per_s"] = round(sum(speeds[-10:]) / len(speeds[-10:]), 1) if speeds else None
        if evals:
            row["val_loss"] = round(evals[-1]["val_loss"], 4)
    rows.append(row)
a2a = out / "all_to_all.json"
if a2a.is_file():  # the largest size's median per scheme, next to its step's exit status
    results = json.loads(a2a.read_text())["results"]
    largest = max(r["bytes_per_rank"] for r in results)
    medians = {r["scheme"]: round(r["median_ms"], 3) for r in results if r["bytes_per_rank"] == largest}
    for row in rows:
        if row["step"] == "all-to-all":
            row["largest_size_median_ms"] = medians
(out / "multi.json").write_text(json.dumps(rows, indent=2))
keys = ["step", "exit", "last_step", "loss", "val_loss", "tokens_per_s"]
print("  ".join(f"{k:>16}" for k in keys))
for row in rows:
    print("  ".join(f"{str(row.get(k, '')):>16}" for k in keys))
    if "largest_size_median_ms" in row:
        print(f"{'':>16}  all-to-all median ms at the largest size: {row['largest_size_median_ms']}")
EOF
