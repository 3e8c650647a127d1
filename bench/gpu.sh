#!/usr/bin/env bash
# Every GPU speed target in one command, one table (bench/RESULTS.md, "GPU").
#
#   bash bench/gpu.sh [OUT_DIR]             # on a machine with CUDA
#   DEVICE=cpu SMOKE=1 bash bench/gpu.sh    # tiny sizes on the CPU: checks the script, measures nothing
#
# Rows (each a ratio to its baselines measured in the same bench/speed.py run):
#   A. inference, bf16 autocast, channels_last, batch 256, eager and torch.compile (target GC/body <= 1.02)
#   B. inference, bf16, channels_last, batch 1, torch.compile mode reduce-overhead (target <= 1.10)
#   C. training step, bf16, channels_last, batch 128, eager (target <= 1.05)
#   D. detection latency against mmdetection: bench/detection.py --device (zoo alone, on random
#      weights, where the mmdetection oracle is not installed)
# Each part runs under `timeout` (PART_TIMEOUT seconds, default 240) so one slow compile cannot
# take the others' time; a part that fails or times out says so in the table file.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench_gpu_out}}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python}
PART_TIMEOUT=${PART_TIMEOUT:-$([ "${SMOKE:-0}" = 1 ] && echo 900 || echo 240)}
mkdir -p "$OUT_DIR"
TABLE="$OUT_DIR/gpu_table.md"
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-33554432}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}

if [ "${SMOKE:-0}" = 1 ]; then
  BIG=(--batch 2 --size 32 --rounds 2 --warmup 1); ONE=(--batch 1 --size 32 --rounds 2 --warmup 1)
  TRAIN=(--batch 2 --size 32 --rounds 2 --warmup 1); RO=default
  BIG+=(--compile-backend eager); ONE+=(--compile-backend eager)
  DET=(--rows maskrcnn_resnet50_fpn_gc_r16 --sizes 40x56 --rounds 1 --warmup 0 --oracle-dir "$OUT_DIR/no-oracle"
       --zoo-kwargs '{"layers": [1, 1, 1, 1], "min_size": 48, "max_size": 64}')
else
  BIG=(--batch 256 --rounds 30); ONE=(--batch 1 --rounds 50 --iters 10)
  TRAIN=(--batch 128 --rounds 20); RO=reduce-overhead
  DET=(--rounds 5)
fi
COMMON=(--device "$DEVICE" --amp bf16 --channels-last --models gczoo_body resnet50_gc_r16)

part() {  # part LABEL LOGNAME speed.py-args...
  local label=$1 log="$OUT_DIR/$2.log"; shift 2
  echo "== $label: $PYTHON bench/speed.py $*" | tee "$log"
  if timeout "$PART_TIMEOUT" "$PYTHON" bench/speed.py "$@" >>"$log" 2>&1; then
    grep -E '^\| (infer|train) ' "$log" | sed "s/^| /| $label | /" >>"$TABLE.rows"
    [ -s "$TABLE.env" ] || sed -n '/^command:/,/^load average/p' "$log" | grep -v '^command:' >"$TABLE.env"
  else
    echo "| $label | FAILED or timed out (rc $?), see $log | | | | | | |" >>"$TABLE.rows"
  fi
  grep -E '^load average' "$log" | sed "s/^/$label: /" >>"$TABLE.load"
}

rm -f "$TABLE" "$TABLE.rows" "$TABLE.env" "$TABLE.load"
part "A bs256 eager+compiled" a_bs256 "${COMMON[@]}" "${BIG[@]}" --compile both
part "B bs1 compiled $RO" b_bs1 "${COMMON[@]}" "${ONE[@]}" --compile yes --compile-mode "$RO"
part "C train bs128" c_train "${COMMON[@]}" "${TRAIN[@]}" --mode train

{
  echo "# GPU table (bash bench/gpu.sh; DEVICE=$DEVICE SMOKE=${SMOKE:-0}), $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  cat "$TABLE.env" 2>/dev/null
  cat "$TABLE.load" 2>/dev/null
  echo
  echo "| part | mode | graph | model | median ms | ratio to resnet50 (median) | ratio 25-75% | ratio to gczoo_body (median) |"
  echo "|---|---|---|---|---:|---:|---|---:|"
  cat "$TABLE.rows" 2>/dev/null
  echo
  echo "D detection (bench/detection.py --device $DEVICE ${DET[*]}):"
  if timeout "$PART_TIMEOUT" "$PYTHON" bench/detection.py --device "$DEVICE" "${DET[@]}" >"$OUT_DIR/d_detection.log" 2>&1; then
    grep -E '^(oracle|versions):' "$OUT_DIR/d_detection.log"
    sed -n '/^| model/,$p' "$OUT_DIR/d_detection.log" | grep '^|'
  else
    echo "FAILED or timed out, see $OUT_DIR/d_detection.log"
  fi
} >"$TABLE"
rm -f "$TABLE.rows" "$TABLE.env" "$TABLE.load"
cat "$TABLE"
