#!/usr/bin/env bash
# The DAT-light PTQ grid (x4 and x2; MinMax, DOBI, DOBI + transforms (+GPTQ), 2DQuant, 2DQuant + transforms;
# W4A4 / W3A3 / W2A2; Set5, Set14, B100) on a lent GPU, every cell through benchmarks/ptq_grid.py, i.e. the
# user-facing `2dq-calibrate` and `2dq-eval` with `--device cuda`, 20 grid processes side by side.
#
# Run from the repository root on the GPU machine, with two ignored folders carried beside the tree:
#   .whl/      wheels the machine lacks (spandrel, spandrel_extra_arches, polygraphy; pure Python)
#   .gpudata/  data.tar.xz: models/DAT-light/DAT_light_x{2,4}.pth and datasets/{Set5,Set14,B100} (HR, X2, X4)
#              and datasets/train/DIV2K_valid_256, as laid out in ../shared (made by `tar cf - ... | xz`)
# The DQC budget is the paper's batch (16 LR patches of 64x64) for as many steps as fit before DEADLINE
# (seconds after start): a 20-step probe times one step, then every 2DQuant cell runs the same
# number of steps. Results come back under $OUT: results.tgz (one ptq_grid JSON per process, logs) and
# artifacts.tgz (every artifact with its sidecar); run.json says what the script chose.
# Measured on the first run: one DQC process holds 17.8 GB of GPU memory, so more than 7 at once exhaust the
# H200's 140 GB (that run lost five 2DQuant + transforms rows so); keep DQC processes <= 7 per run.
set -uo pipefail
START=$(date +%s)
DEADLINE=${DEADLINE:-540}
OUT=${OUT:-/tmp/device-out}
W=/tmp/grid/work; RES=/tmp/grid/results; LOGS=/tmp/grid/logs; S=/tmp/shared
mkdir -p "$OUT" "$W" "$RES" "$LOGS" /tmp/bin "$S"
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[$(elapsed) s] $*" | tee -a "$OUT/driver.log"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
for pair in 2dq-calibrate:calib.cli 2dq-eval:toolchain.cli.eval; do
  printf '#!/bin/sh\nexec python3 -m %s "$@"\n' "${pair#*:}" > "/tmp/bin/${pair%%:*}"
  chmod +x "/tmp/bin/${pair%%:*}"
done
export PATH=/tmp/bin:$PATH
tar xJf .gpudata/data.tar.xz -C "$S" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/driver.log"
log "torch $(python3 -c 'import torch; print(torch.__version__)')"

GPU="--device cuda"
DQC="--dqc-batch 16 --dqc-patch-size 64 --val-every 50 --checkpoint-every 50"
X4=$S/models/DAT-light/DAT_light_x4.pth
TRAIN=$S/datasets/train

# MPS lets the small kernels of the 20 processes share the GPU instead of taking turns
MPS=0
if command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p /tmp/mps /tmp/mps-log
  nvidia-cuda-mps-control -d && MPS=1
fi
log "MPS=$MPS"

smoke() {
  local t0 t1 t2
  t0=$(date +%s.%N)
  timeout 150 2dq-calibrate --weights "$X4" --calib-images "$TRAIN" --bits 4 --method dobi $GPU --no-progress \
    --out $W/smoke_dobi.safetensors >> "$OUT/smoke.log" 2>&1 || return 1
  t1=$(date +%s.%N)
  timeout 150 2dq-calibrate --weights "$X4" --calib-images "$TRAIN" --bits 4 --method 2dquant --dqc-iters 20 $DQC \
    $GPU --no-progress --out $W/smoke_dqc.safetensors >> "$OUT/smoke.log" 2>&1 || return 1
  t2=$(date +%s.%N)
  timeout 120 2dq-eval --weights "$X4" --calib $W/smoke_dqc.safetensors --data $S/datasets --sets Set5 $GPU \
    --no-progress >> "$OUT/smoke.log" 2>&1 || return 1
  DOBI_S=$(python3 -c "print(round($t1 - $t0, 1))")
  STEP_S=$(python3 -c "print(max(0.01, ($t2 - $t1 - ($t1 - $t0)) / 20))")
}
if ! smoke; then
  log "smoke failed (MPS=$MPS)"
  if [ "$MPS" = 1 ]; then
    echo quit | nvidia-cuda-mps-control; MPS=0; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    smoke || { log "smoke failed without MPS"; exit 3; }
  else
    exit 3
  fi
fi
# one step of one process, times a slowdown for 12 DQC processes at once (guessed; MPS overlaps them)
FACTOR=$([ "$MPS" = 1 ] && echo 8 || echo 12)
ITERS=$(python3 -c "print(int(max(50, min(4000, ($DEADLINE - $(elapsed) - 170) / ($STEP_S * $FACTOR))) // 10 * 10))")
log "DOBI ${DOBI_S}s, one DQC step ${STEP_S}s, factor $FACTOR -> $ITERS DQC steps"
printf '{"mps": %s, "dobi_s": %s, "step_s": %s, "factor": %s, "dqc_iters": %s, "start_unix": %s}\n' \
  "$MPS" "$DOBI_S" "$STEP_S" "$FACTOR" "$ITERS" "$START" > "$OUT/run.json"

grid() {  # label scale methods bits extra-calibrate-options [--fp]
  timeout $(( DEADLINE - $(elapsed) )) python3 benchmarks/ptq_grid.py \
    --weights "$S/models/DAT-light/DAT_light_x{scale}.pth" --scales "$2" --methods "$3" --bits "$4" \
    --sets Set5,Set14,B100 --data $S/datasets --calib-images "$TRAIN" --calib-extra "$GPU $5" --eval-extra "$GPU" \
    --threads 1 --work "$W/$1" --out "$RES/$1.json" ${6:-} > "$LOGS/$1.log" 2>&1 &
}
TRANSFORMS="--granularity per-channel --smooth all --shifts"
for scale in 4 2; do
  for bits in 4 3 2; do
    grid "x${scale}_2dquant_w$bits" $scale 2dquant $bits "--dqc-iters $ITERS $DQC"
    grid "x${scale}_2dquant_all_w$bits" $scale "2dquant+pc+smooth+shifts=--method 2dquant $TRANSFORMS" $bits \
      "--dqc-iters $ITERS $DQC"
  done
  grid "x${scale}_minmax" $scale minmax 4,3,2 "" --fp
  grid "x${scale}_dobi" $scale dobi 4,3,2 ""
  grid "x${scale}_dobi_all" $scale "dobi+pc+smooth+shifts=--method dobi $TRANSFORMS" 4,3,2 ""
  grid "x${scale}_dobi_all_gptq" $scale "dobi+pc+smooth+shifts+gptq=--method dobi $TRANSFORMS --gptq" 4,3,2 ""
done
log "20 grid processes started"
wait
log "all grid processes ended"
[ "$MPS" = 1 ] && echo quit | nvidia-cuda-mps-control
tar czf "$OUT/results.tgz" -C /tmp/grid results logs
(cd $W && find . -name '*.safetensors' ! -name '*dqc-checkpoint*' ! -name 'smoke*' -o -name '*.json' ! -name '*.eval.json' \
  | tar czf "$OUT/artifacts.tgz" -T -)
log "done"
