#!/usr/bin/env bash
# The GPU checks of issue 4 in one call of the device machine (about 5 minutes on an H100; the
# step limits below add up to 540 s, so that one call fits the 600 s a command may run and a
# session's 15 minutes of device time leave room for the machine's start):
#   1. the GPU tests (pytest -m gpu);
#   2. the solver alone over ResNet-50's 54 layers, one by one and stacked (FastOBQ, GPTQ), as it
#      is and with common.GPU_RECURSIVE_MIN_COLS = 1024 (inverse factors by halves);
#      and FastOBQ with --group-size 128 (the plain CuPy sweep: the fused kernel takes one
#      scale per row);
#   3. the float32 scaling table, d_col 256..8192 by d_row 256..4096, with its fitted cost model;
#   4. end to end, ResNet-50 W4 on 2,048 random images in batches of 64, BN off (FastOBQ).
# Each step's output goes to $OUT/NAME.log (and JSON where the script writes some), and
# $OUT/summary.txt holds the machine and each step's exit status and seconds: 8 files, the
# most the device tool brings back.
#
# The device machine has CuPy, onnx, onnxruntime (CPU build), numpy, click and pytest, and no
# registry, so onnx-graphsurgeon and threadpoolctl travel as wheels. Once, here, in the
# repository root:
#   echo /.whl/ >> .git/info/exclude     (already ignored by .gitignore)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl onnx_graphsurgeon threadpoolctl
# then call the device tool's run with command "bash scripts/gpu_checks.sh", carry [".whl"]
# and timeout_s 560.
#
# On a machine without a GPU, `DEVICE=cpu SMALL=1 bash scripts/gpu_checks.sh` runs the same
# steps on small sizes (the GPU tests skip), to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_checks}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import onnx_graphsurgeon, threadpoolctl" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "no onnx_graphsurgeon or threadpoolctl: see the header of $0"; exit 2; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

if [ -n "${SMALL:-}" ]; then
    COLS=256,512,1024; ROWS=256,1024; SAMPLES=32; BATCH=8; RESNET="--layers n4,n10,n12"
else
    COLS=256,512,1024,2048,4096,8192; ROWS=256,1024,4096; SAMPLES=2048; BATCH=64; RESNET=""
fi

step() {   # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; nproc;
  python3 -c "import numpy, onnxruntime; print('numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)";
  python3 -c "import cupy; print('cupy', cupy.__version__)" 2>&1; } > "$OUT/summary.txt"

step tests 100 python3 -m pytest -q -m gpu tests/test_gpu.py
# (and, in the same log, FastOBQ with groups of 128: the step's files stay within the 8 that come back)
step solve_resnet50 120 bash -c "python3 scripts/solve_bench.py --device $DEVICE --resnet50 $RESNET \
    --methods fastobq,gptq --repeat 3 --stacked && python3 scripts/solve_bench.py --device $DEVICE \
    --resnet50 $RESNET --methods fastobq --repeat 3 --stacked --group-size 128"
# the same with the inverse Cholesky factors of layers of 1,024+ columns built by halves
step solve_resnet50_rec 80 python3 scripts/solve_bench.py --device "$DEVICE" --resnet50 $RESNET \
    --methods fastobq,gptq --repeat 3 --stacked --gpu-recursive-min-cols 1024
step scaling 110 python3 scripts/solve_bench.py --device "$DEVICE" --cols "$COLS" --rows "$ROWS" \
    --methods fastobq,gptq --repeat 2 --json "$OUT/scaling.json"
step e2e_resnet50 130 python3 scripts/speed_bench.py --models resnet50 --methods fastobq \
    --devices "$DEVICE" --samples "$SAMPLES" --batch-size "$BATCH" --bits 4 --out /tmp/gpu_checks_e2e
cp /tmp/gpu_checks_e2e/speed.json "$OUT/speed.json" 2>/dev/null || true
cat "$OUT/summary.txt"
