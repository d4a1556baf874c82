#!/usr/bin/env bash
# One prepared pass of GPU checks for a lent CUDA machine (CI has none): the CUDA/CPU agreement
# checks, a short CUDA training run launched through torchrun (NCCL, sharded checkpoint), that
# checkpoint served by the engine on CUDA, and the MoE layer benchmark on CUDA.
#   bash benchmarks/gpu_session.sh OUT_DIR
set -u
out=${1:?OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step() { echo "== $*"; "$@"; echo "== exit $?"; }
step timeout 180 python benchmarks/gpu_check.py --out "$out/gpu_check.json"
step timeout 240 python -m pyramoe train --preset tiny-moe --steps 100 --device cuda --nproc-per-node 1 \
    --run-dir "$out/run" --quiet --no-plot
ls -R "$out/run/checkpoints" | head -20
step timeout 120 python -m pyramoe generate "$out/run" --device cuda --prompt "def parse(" --max-new-tokens 48
step timeout 120 python -m pyramoe bench moe-layer --device cuda --out "$out/moe_layer.json"
