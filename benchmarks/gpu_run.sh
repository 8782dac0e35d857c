#!/usr/bin/env bash
# The GPU session's checks in one prepared command (issue 16): run from the repository root on a CUDA
# machine, with OUT set to a folder for the results (at most 8 files come back from the device tool).
#   OUT=runs/gpu bash benchmarks/gpu_run.sh
# 1. benchmarks/gpu_check.py --device cuda: every method through every stage, resume, export, benchmark,
#    in fp32 and again with train.amp=fp16;
# 2. benchmarks/mtp_step.py: one MTP iteration of DeepLabv3-R101 at the paper's VOC sizes, fp32/bf16/fp16;
# 3. segprune run benchmarks/gpu_r101_synthetic.yaml: Algorithm 1 end to end on R101 (bf16; R101_AMP='bf16 off'),
#    each followed by segprune benchmark --device cuda (eager latency from CUDA events, batch 1 and 8).
# Every step has its own time limit, so that one hang leaves the others' results.
set -u
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
W=${WORK:-/tmp/segprune_gpu}
DEV=${DEV:-cuda}      # DEV=cpu AMP2=bf16 with small T_* limits: a dry run of this script's logic on a CPU
AMP2=${AMP2:-fp16}
mkdir -p "$W"
log() { echo "=== $(date +%T) $*"; }
{
log env
nvidia-smi -L 2>&1; python3 -c "import torch, torch_pruning as tp; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'tp', tp.__version__)"
nproc
log "gpu_check, fp32 and --amp $AMP2 side by side (tiny models: pass/fail, not speed)"
timeout ${T_CHECK:-180} python3 benchmarks/gpu_check.py --device $DEV --amp $AMP2 --out "$W/gc_$AMP2" --quiet \
  > "$W/gc_$AMP2.log" 2>&1 &
timeout ${T_CHECK:-180} python3 benchmarks/gpu_check.py --device $DEV --out "$W/gc" --quiet; echo "rc=$?"
wait; cat "$W/gc_$AMP2.log"
cp "$W/gc/gpu_check.json" "$OUT/" 2>/dev/null; cp "$W/gc/errors.log" "$OUT/gc_errors.log" 2>/dev/null
cp "$W/gc_$AMP2/gpu_check.json" "$OUT/gpu_check_$AMP2.json" 2>/dev/null
cp "$W/gc_$AMP2/errors.log" "$OUT/gc_${AMP2}_errors.log" 2>/dev/null
S="--model deeplabv3_resnet101 --width 1 --output-stride 16 --seg-size 513 513 --seg-batch 16 --cls-size 224 224 --cls-batch 64 --classes 21 --cls-classes 1000 --repeats 3 --steps 2 --threads 8 --device $DEV"
for v in "--amp off" "--amp bf16" "--amp fp16" "--amp bf16 --channels-last"; do
  log "mtp_step $v"
  timeout ${T_STEP:-60} python3 benchmarks/mtp_step.py $S $v --json "$W/step.json" && cat "$W/step.json" >> "$OUT/mtp_step.jsonl"
  echo "rc=$?"
done
for amp in ${R101_AMP:-bf16}; do
  log "r101 pipeline amp=$amp"
  timeout ${T_RUN:-150} python3 -m segprune.cli run benchmarks/gpu_r101_synthetic.yaml --out "$W/r101_$amp" --set train.amp=$amp --set threads=8; echo "rc=$?"
  log "r101 benchmark amp=$amp"
  timeout ${T_BENCH:-60} python3 -m segprune.cli benchmark "$W/r101_$amp" --device $DEV --batch 1 --batch 8 \
    --runs ${RUNS:-50} --warmup 10 --no-onnx; echo "rc=$?"
  tar czf "$OUT/r101_$amp.tgz" --exclude='*.safetensors' --exclude='*.pt' -C "$W" "r101_$amp" 2>/dev/null
done
log end
} 2>&1 | tee "$OUT/log.txt"
