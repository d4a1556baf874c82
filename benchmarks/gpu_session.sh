#!/usr/bin/env bash
# One prepared pass of GPU checks for a lent CUDA machine (CI has none), under 10 minutes on one GPU:
# the CUDA tests (the device step's graphs against eager and the CPU, no host sync in a replayed
# decode step, device sampling's uniforms equal the CPU's), the CUDA/CPU agreement checks, a short
# CUDA training run launched through torchrun (NCCL, sharded checkpoint), that checkpoint served by
# the engine on CUDA, the MoE layer benchmark and `bench generate --device cuda` (the device step
# against the PyTorch step and transformers); everything gathered in OUT_DIR/session.json.
#   bash benchmarks/gpu_session.sh OUT_DIR
set -u
out=${1:?OUT_DIR}
mkdir -p "$out"
: > "$out/steps.tsv"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step() {  # step NAME COMMAND...: run it, record its exit status
    local name=$1; shift
    echo "== $name: $*"; "$@"; local code=$?
    echo "== exit $code"; printf '%s\t%s\n' "$name" "$code" >> "$out/steps.tsv"
}
step cuda-tests timeout 100 python -m pytest -q -p no:cacheprovider --junitxml "$out/cuda_tests.xml" \
    tests/test_device_step.py tests/test_device_moe.py tests/test_device_sampling.py -k "cuda or no_host_sync"
step gpu-check timeout 90 python benchmarks/gpu_check.py --out "$out/gpu_check.json"
step train timeout 120 python -m pyramoe train --preset tiny-moe --steps 100 --device cuda --nproc-per-node 1 \
    --run-dir "$out/run" --quiet --no-plot
ls -R "$out/run/checkpoints" | head -20
step serve-checkpoint timeout 45 python -m pyramoe generate "$out/run" --device cuda --prompt "def parse(" \
    --max-new-tokens 48
step moe-layer timeout 45 python -m pyramoe bench moe-layer --device cuda --out "$out/moe_layer.json"
step bench-generate timeout 180 python -m pyramoe bench generate --device cuda --dtype bf16 --batches 1,16,64 \
    --new-tokens 32 --rounds 2 --out "$out/generate.json"
rm -rf "$out/run"  # the checkpoint: not a result
python benchmarks/gpu_session_summary.py "$out"
