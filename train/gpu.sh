#!/usr/bin/env bash
# Training on GPUs: a check of every GPU path in minutes, then the paper's full-size runs.
#
#   bash train/gpu.sh check [OUT_DIR]                  # minutes: generated shapes at the recipes' image sizes
#   COCO=/data/coco bash train/gpu.sh coco [OUT_DIR]   # Mask R-CNN GC r16, mmdetection's 1x recipe (12 epochs)
#   CITYSCAPES=/data/cityscapes bash train/gpu.sh cityscapes [OUT_DIR]   # GCNet R50-D8, 512x1024, 40k
#   ADE20K=/data/ade20k bash train/gpu.sh ade20k [OUT_DIR]               # GCNet R50-D8, 512x512, 80k
#   DEVICE=cpu SMOKE=1 bash train/gpu.sh check         # tiny sizes on the CPU (gloo): checks the script only
#
# Every run uses all visible GPUs (NPROC, default: nvidia-smi's count) through torchrun, AMP
# (bfloat16; AMP_DTYPE=float16 for a gradient scaler) and the recipe's norms (SyncBN where the
# recipe has it, as soon as there are two processes). The recipes assume 8 (COCO: 16 images) or
# 4 GPUs (8 or 16 images); with fewer, the learning rate and iteration counts follow the linear
# scaling rule (train/common.py). `check` runs each script twice: stopped at half with
# --until, then --resume to the end (it compares the resumed losses with an uninterrupted run's),
# evaluates with the eval scripts and loads the final weights with eval/*.py --checkpoint.
# Each full run starts from the ImageNet backbone of its upstream config (--pretrained-backbone),
# as the paper did, and leaves OUT_DIR/<run>/model.safetensors and log.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-check}
OUT_DIR=${2:-${OUT:-train_gpu_out}}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python}
AMP_DTYPE=${AMP_DTYPE:-bfloat16}
if [ -z "${NPROC:-}" ]; then
  if [ "$DEVICE" = cuda ]; then NPROC=$(nvidia-smi -L | wc -l); else NPROC=2; fi
fi
AMP=(--amp --amp-dtype "$AMP_DTYPE")
[ "$DEVICE" = cuda ] || AMP=()
mkdir -p "$OUT_DIR"

launch() {  # launch SCRIPT ARGS...: the script on NPROC processes
  echo "== torchrun --nproc-per-node $NPROC $*" >&2
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$@" --device "$DEVICE" "${AMP[@]}"
}

losses() {  # losses LOG FROM: the train losses logged from iteration FROM on, one per line
  "$PYTHON" -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["event"] == "train" and r["iteration"] >= int(sys.argv[2]): print(r["iteration"], r["loss"])' "$1" "$2"
}

check_run() {  # check_run NAME SCRIPT ITERATIONS ARGS...: uninterrupted, then stopped at half and resumed
  local name=$1 script=$2 its=$3; shift 3
  local half=$((its / 2))
  launch "$script" "$@" --iterations "$its" --checkpoint-every "$half" --log-every 1 --out "$OUT_DIR/$name/full"
  launch "$script" "$@" --iterations "$its" --checkpoint-every "$half" --log-every 1 --out "$OUT_DIR/$name/resumed" \
    --until "$half"
  launch "$script" "$@" --iterations "$its" --checkpoint-every "$half" --log-every 1 --out "$OUT_DIR/$name/resumed" \
    --resume "$OUT_DIR/$name/resumed/checkpoint.pt"
  if diff <(losses "$OUT_DIR/$name/full/log.jsonl" $((half + 1))) \
          <(losses "$OUT_DIR/$name/resumed/log.jsonl" $((half + 1))) >"$OUT_DIR/$name/resume.diff"; then
    echo "$name: the resumed run logs the uninterrupted run's losses" | tee -a "$OUT_DIR/check.txt"
  else
    echo "$name: the resumed losses differ (see $OUT_DIR/$name/resume.diff)" | tee -a "$OUT_DIR/check.txt"
  fi
}

case "$MODE" in
  check)
    if [ "${SMOKE:-0}" = 1 ]; then
      SIZE=64; DET_SCALE=(64 64); SEG=(--scale 64 64 --crop-size 64 64); TEST=(--test-scale 64 64); ITS=4
      DEPTH=(--model-kwargs '{"layers": [1, 1, 1, 1]}')
      DET_DEPTH=(--model-kwargs '{"layers": [1, 1, 1, 1], "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50}')
    else
      SIZE=1024; DET_SCALE=(1333 800); SEG=(--scale 2048 1024 --crop-size 512 1024); TEST=(); ITS=40
      DEPTH=(); DET_DEPTH=()
    fi
    rm -f "$OUT_DIR/check.txt"
    "$PYTHON" train/make_shapes.py --out "$OUT_DIR/shapes" --train $((8 * NPROC)) --val 4 --size "$SIZE"
    check_run segmentation train/segmentation.py "$ITS" --model gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k \
      "${DEPTH[@]}" --data "$OUT_DIR/shapes/cityscapes" --num-classes 4 "${SEG[@]}" --workers 2 --eval-limit 4
    check_run detection train/detection.py "$ITS" --model maskrcnn_resnet50_fpn_gc_r16.mmdet_syncbn_1x_coco \
      "${DET_DEPTH[@]}" --data "$OUT_DIR/shapes/coco" --scale "${DET_SCALE[@]}" --workers 2 --eval-limit 4
    "$PYTHON" eval/segmentation.py --model gcnet_resnet50_d8 --data "$OUT_DIR/shapes/cityscapes" "${TEST[@]}" \
      --checkpoint "$OUT_DIR/segmentation/full/model.safetensors" --device "$DEVICE" | tee -a "$OUT_DIR/check.txt"
    "$PYTHON" eval/coco.py --model maskrcnn_resnet50_fpn_gc_r16 --data "$OUT_DIR/shapes/coco" \
      --checkpoint "$OUT_DIR/detection/full/model.safetensors" --device "$DEVICE" | tee -a "$OUT_DIR/check.txt"
    "$PYTHON" - "$OUT_DIR" <<'EOF' | tee -a "$OUT_DIR/check.txt"
import json, sys
from pathlib import Path
for log in sorted(Path(sys.argv[1]).glob("*/full/log.jsonl")):
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    start = next(r for r in rows if r["event"] == "start")
    steps = [r for r in rows if r["event"] == "train"]
    print(f"{log.parent.parent.name}: {start['device']}, total batch {start['total_batch']}, "
          f"loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}, {steps[-1]['seconds']:.1f} s for {steps[-1]['iteration']} iterations")
EOF
    ;;
  coco)
    launch train/detection.py --model maskrcnn_resnet50_fpn_gc_r16.mmdet_syncbn_1x_coco --pretrained-backbone \
      --data "${COCO:?set COCO=/path/to/coco}" --out "$OUT_DIR/maskrcnn_r50_gc_r16" --workers 4 ;;
  cityscapes)
    launch train/segmentation.py --model gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k --pretrained-backbone \
      --data "${CITYSCAPES:?set CITYSCAPES=/path/to/cityscapes}" --out "$OUT_DIR/gcnet_r50_cityscapes" --workers 4 ;;
  ade20k)
    launch train/segmentation.py --model gcnet_resnet50_d8.mmseg_ade20k_512x512_80k --pretrained-backbone \
      --data "${ADE20K:?set ADE20K=/path/to/ade20k}" --out "$OUT_DIR/gcnet_r50_ade20k" --workers 4 ;;
  *)
    echo "usage: bash train/gpu.sh check|coco|cityscapes|ade20k [OUT_DIR]" >&2; exit 2 ;;
esac
