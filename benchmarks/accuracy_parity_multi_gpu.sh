#!/bin/bash
# Accuracy parity of the detectors on the GPUs of one machine, all runs (plain and ENACT of each
# detector) at once, then one report over them (benchmarks/results/accuracy_parity_<gpu>.*).
#   as many GPUs as runs: one run per GPU.
#   all three detectors on 4 or 5 GPUs: Anchor DETR plain / ENACT alone on GPUs 2 / 3; DETR and
#   Conditional DETR share GPUs 0 and 1 in crossed pairs (each of these GPUs holds one plain and
#   one ENACT run, so both variants of a detector have the same kind of neighbour).
#   otherwise: each detector's plain and ENACT runs share one GPU (detector i on GPU i mod
#   GPUS), so the two variants always train side by side under the same load.
# Each run gets MINUTES of its own training loop (start-up and evaluation excluded).
#
#   MINUTES=6 STOP=7.8 bash benchmarks/accuracy_parity_multi_gpu.sh   # fits a 10-minute limit
#
# STOP: wall-clock minutes from this script's start after which no run starts another epoch
# (the build and the data generation count; allow about two minutes more for the epochs in
# flight and the report, e.g. STOP=7.8 in a 10-minute limit). OUT: folder of the runs.
# RESULTS: folder of the report (default benchmarks/results). EXTRA: main.py flags of every
# run (set but empty: none). ENACT_EXTRA: more main.py flags of the ENACT runs only (e.g.
# --enact_row_breaks). DETECTORS: which detectors (default all three, e.g. "anchor_detr" or
# "detr,conditional_detr"). NAME: the report's file stem (default accuracy_parity_<gpu>).
# PARITY_FLAGS: more accuracy_parity.py flags (e.g. "--tiny
# --device cpu" for a smoke run). GPUS: how many GPUs to use (default: all that torch sees).
# WORKERS: data-loading workers per run (default: the cores / (2 x detectors), 1 to 8).
# PRETRAIN_MINUTES: first train a backbone, and start every run from it (--backbone_weights):
# plain Anchor DETR for this many minutes of training loop on a second shapes set (data seed
# 1), with PRETRAIN_EXTRA as its main.py flags (default: ResNet-18 from scratch, every layer
# trained). If STOP ends the pretraining before its minutes are done, the script says so and
# stops; the same command again continues it, then trains the runs.
set -u
START=$(date +%s)
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-6}
STOP=${STOP:-60}
OUT=${OUT:-outputs/accuracy_parity_multi_gpu}
RESULTS=${RESULTS:-benchmarks/results}
EXTRA=${EXTRA---backbone resnet18 --backbone_train_all --batch_size 16 --lr 1e-4 --lr_backbone 1e-4}
ENACT_EXTRA=${ENACT_EXTRA:-}
IFS=, read -r -a DETS <<< "${DETECTORS:-detr,conditional_detr,anchor_detr}"
DETECTOR_LIST=$(IFS=,; echo "${DETS[*]}")
NAME_FLAG=(); [ -n "${NAME:-}" ] && NAME_FLAG=(--name "$NAME")
read -r -a PARITY <<< "${PARITY_FLAGS:-}"
GPUS=${GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}
if [ "$GPUS" -lt 1 ]; then
  echo "accuracy_parity_multi_gpu.sh: needs a GPU, found none" \
       "(CPU smoke run: GPUS=1 PARITY_FLAGS='--tiny --device cpu')" >&2
  exit 2
fi
mkdir -p "$OUT"
if python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  python -m enact_cuda.build | tail -n 1  # compile once, not in six processes at once
fi
# data-loading workers per run: the machine's cores shared by the runs (at most 8 each)
RUNS=$((2 * ${#DETS[@]}))
WORKERS=${WORKERS:-$(python -c "import os; print(max(1, min(8, os.cpu_count() // $RUNS)))")}
stop_left() {  # minutes of STOP left now (at least 0.05)
  python -c "import time; print(max(0.05, $STOP - (time.time() - $START) / 60))"
}
BACKBONE=()
if [ -n "${PRETRAIN_MINUTES:-}" ]; then
  PRETRAIN_EXTRA=${PRETRAIN_EXTRA---backbone resnet18 --backbone_train_all --batch_size 16 --lr 1e-4 --lr_backbone 1e-4}
  PRETRAIN_RUN="$OUT/pretrain/anchor_detr_plain"
  python benchmarks/accuracy_parity.py --detectors anchor_detr --variants plain \
      --minutes "$PRETRAIN_MINUTES" --data_seed 1 --out "$OUT/pretrain" --num_workers "$WORKERS" \
      --extra="$PRETRAIN_EXTRA" "${PARITY[@]}" --stop_after "$(stop_left)" \
      --results "$OUT/pretrain" --name pretrain > "$OUT/pretrain.out" 2>&1 || {
    echo "accuracy_parity_multi_gpu.sh: the backbone pretraining failed, see $OUT/pretrain.out" >&2
    exit 2; }
  if ! python -c "import json, sys
sys.exit(json.load(open('$PRETRAIN_RUN/parity_run.json'))['stopped_by'] not in ('budget', 'max_epochs'))"; then
    echo "accuracy_parity_multi_gpu.sh: STOP came before the backbone pretraining's" \
         "$PRETRAIN_MINUTES minutes were done; run the same command again to continue it"
    exit 0
  fi
  BACKBONE=(--backbone_weights "$PRETRAIN_RUN/checkpoint.pth")
fi
COMMON=(--minutes "$MINUTES" --out "$OUT" --num_workers "$WORKERS" --extra="$EXTRA"
        --enact_extra="$ENACT_EXTRA" "${BACKBONE[@]}" "${PARITY[@]}")
# the shapes data, once (and an unknown name in DETECTORS stops the script here)
python benchmarks/accuracy_parity.py "${COMMON[@]}" --detectors "$DETECTOR_LIST" --prepare_only \
    || exit 2
# what is left of STOP once the build and the data are done
STOP_RUNS=$(stop_left)
run() {  # gpu detector variant
  CUDA_VISIBLE_DEVICES=$1 python benchmarks/accuracy_parity.py "${COMMON[@]}" --detectors "$2" \
      --variants "$3" --stop_after "$STOP_RUNS" --results "$OUT/parts" --name "part_$2_$3" \
      > "$OUT/$2_$3.out" 2>&1
}
if [ "$GPUS" -ge "$RUNS" ]; then
  gpu=0
  for detector in "${DETS[@]}"; do
    run $gpu "$detector" plain & run $((gpu + 1)) "$detector" enact &
    gpu=$((gpu + 2))
  done
  wait
elif [ "$GPUS" -ge 4 ] && [ "${#DETS[@]}" -eq 3 ]; then
  run 0 detr plain & run 1 detr enact & run 1 conditional_detr plain &
  run 0 conditional_detr enact & run 2 anchor_detr plain & run 3 anchor_detr enact & wait
else
  i=0
  for detector in "${DETS[@]}"; do
    gpu=$((i % GPUS)); i=$((i + 1))
    run $gpu "$detector" plain & run $gpu "$detector" enact &
  done
  wait
fi
python benchmarks/accuracy_parity.py "${COMMON[@]}" --detectors "$DETECTOR_LIST" --report_only \
    --results "$RESULTS" "${NAME_FLAG[@]}"
