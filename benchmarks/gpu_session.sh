#!/bin/bash
# One prepared GPU session (device tool, nvidia-h200): correctness of every method on CUDA against the CPU,
# OOM halving, and the GPU rows of docs/benchmarks.md (inference ViT-L/14@336 at 240 px, training).
#
# Here, once (network for pip; writes the ignored folder .gpu/ with wheels for Python 3.12 and the two
# real BraTS cases, ~35 MB):        bash benchmarks/gpu_session.sh --prepare
# Then one device call:             run(command="bash benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=590)
# Results come back as $OUT/*.json and $OUT/log.txt (about 8 minutes on an H200; random weights throughout).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    mkdir -p .gpu/whl .gpu/data
    for wheel in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 nibabel==5.4.2 nilearn==0.14.1; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .gpu/whl "$wheel" || exit 1
    done
    cp -r ../shared/data/brats2023 .gpu/data/
    du -sh .gpu
    exit 0
fi

OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log="$OUT/log.txt"
step() { echo "== $(date +%T) $*" | tee -a "$log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1

step "correctness, tiny-test, every method, CUDA bf16 (default) and CUDA fp32 against CPU fp32"
timeout 150 python3 benchmarks/gpu_check.py --backbone tiny-test --precisions default,fp32 > "$OUT/gpu_check_tiny.json" 2>> "$log"
step "correctness, ViT-L-14-336 (vand, anomalyclip, adaclip): CUDA bf16 vs CPU fp32 maps, auto batch, OOM halving"
timeout 150 python3 benchmarks/gpu_check.py --backbone random:ViT-L-14-336 --methods vand,anomalyclip,adaclip \
    --slices 16 --precisions default > "$OUT/gpu_check_vitl.json" 2>> "$log"
step "inference, ViT-L-14-336, 155 slices (engine: bf16 backbone, fp32 heads, auto batch; plain loop: fp32, batch 1)"
for method in vand anomalyclip adaclip; do
    timeout 100 python3 benchmarks/infer_bench.py --method "$method" --backbone random:ViT-L-14-336 --device cuda \
        --repeats 5 --compare-batches 1,8,32,64 >> "$OUT/infer_vitl.json" 2>> "$log"
done
step "inference, ViT-B-16-plus-240 (anovl, winclip), 155 slices"
for method in anovl winclip; do
    timeout 60 python3 benchmarks/infer_bench.py --method "$method" --backbone random:ViT-B-16-plus-240 --device cuda \
        --repeats 2 --compare-batches 1,8 >> "$OUT/infer_vitb.json" 2>> "$log"
done
step "training, ViT-L-14-336, 64 slices"
timeout 150 python3 benchmarks/train_bench.py --backbone random:ViT-L-14-336 --device cuda --slices 64 --epochs 2 \
    --data .gpu/data/brats2023 > "$OUT/train_vitl.json" 2>> "$log"
step "done"
