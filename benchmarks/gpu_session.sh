#!/usr/bin/env bash
# One prepared pass of GPU checks for a lent CUDA machine (CI has none), 10 minutes at most on one
# GPU: the CUDA tests (the device step's graphs against eager and the CPU, no host sync in a replayed
# decode step greedy or sampling, device sampling's uniforms equal the CPU's), the CUDA/CPU agreement
# checks, `bench generate --device cuda` on the small and the large Mixtral shape (the device step
# against the PyTorch step, transformers eager and compiled with its static cache), a short CUDA
# training run through torchrun (NCCL, sharded checkpoint) served by the engine, and the MoE layer
# benchmark; everything gathered in OUT_DIR/session.json.
#   bash benchmarks/gpu_session.sh OUT_DIR
# Steps run in order of importance, each under its own limit and all under one budget
# (GPU_SESSION_SECONDS, default 570: the summary's seconds left of 10 minutes); a step the budget no
# longer covers is recorded as skipped.
set -u
out=${1:?OUT_DIR}
mkdir -p "$out"
: > "$out/steps.tsv"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
budget=${GPU_SESSION_SECONDS:-570}
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step() {  # step NAME LIMIT_S COMMAND...: run it within the budget left, record its exit status
    local name=$1 limit=$2; shift 2
    local left=$((budget - SECONDS))
    if ((left < 15)); then
        echo "== $name: skipped (budget spent)"; printf '%s\tskipped\n' "$name" >> "$out/steps.tsv"; return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (${limit} s): $*"; timeout "$limit" "$@"; local code=$?
    echo "== exit $code"; printf '%s\t%s\n' "$name" "$code" >> "$out/steps.tsv"
}
step cuda-tests 90 python -m pytest -q -p no:cacheprovider --junitxml "$out/cuda_tests.xml" \
    tests/test_device_step.py tests/test_device_moe.py tests/test_device_sampling.py -k "cuda or no_host_sync"
step gpu-check 60 python benchmarks/gpu_check.py --out "$out/gpu_check.json"
step bench-generate 180 python -m pyramoe bench generate --device cuda --dtype bf16 --batches 1,16,64 \
    --new-tokens 32 --rounds 2 --out "$out/generate.json"
step bench-generate-large 150 python -m pyramoe bench generate --device cuda --dtype bf16 --shape large \
    --batches 1,16 --new-tokens 16 --rounds 1 --no-plain-moe --out "$out/generate_large.json"
step train 50 python -m pyramoe train --preset tiny-moe --steps 100 --device cuda --nproc-per-node 1 \
    --run-dir "$out/run" --quiet --no-plot
step serve-checkpoint 25 python -m pyramoe generate "$out/run" --device cuda --prompt "def parse(" \
    --max-new-tokens 48
step moe-layer 25 python -m pyramoe bench moe-layer --device cuda --out "$out/moe_layer.json"
rm -rf "$out/run"  # the checkpoint: not a result
python benchmarks/gpu_session_summary.py "$out"
