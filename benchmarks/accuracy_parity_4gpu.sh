#!/bin/bash
# Accuracy parity of the three detectors on one 4-GPU machine, all six runs at once:
#   Anchor DETR plain / ENACT alone on GPUs 2 / 3; DETR and Conditional DETR share GPUs 0 and 1
#   in crossed pairs (each of these GPUs holds one plain and one ENACT run, so both variants of a
#   detector have the same kind of neighbour). Each run gets MINUTES of its own training loop.
# Then one report over the six runs (benchmarks/results/accuracy_parity_<gpu>.*).
#
#   MINUTES=5.5 STOP=7.5 bash benchmarks/accuracy_parity_4gpu.sh   # what the committed run used
#
# STOP: wall-clock minutes after which no run starts another epoch (keeps the whole command
# inside a time limit); OUT: folder of the runs; EXTRA: main.py flags of every run.
set -u
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-5.5}
STOP=${STOP:-60}
OUT=${OUT:-outputs/accuracy_parity_4gpu}
EXTRA=${EXTRA:---backbone resnet18 --batch_size 4 --lr 1e-4 --lr_backbone 1e-4}
python -m enact_cuda.build | tail -n 1  # compile once, not in six processes at once
COMMON=(--minutes "$MINUTES" --out "$OUT" --num_workers 6 --extra "$EXTRA")
# the shapes data once (accuracy_parity.py's default sizes and folder name)
python tools/make_shapes_coco.py --out "$OUT/shapes_1200x256-384_val200" --num_train 1200 \
    --num_val 200 --min_size 256 --max_size 384 --seed 0 > /dev/null 2>&1
run() {  # gpu detector variant
  CUDA_VISIBLE_DEVICES=$1 python benchmarks/accuracy_parity.py "${COMMON[@]}" --detectors "$2" \
      --variants "$3" --stop_after "$STOP" --results "$OUT/parts" --name "part_$2_$3" \
      > "$OUT/$2_$3.out" 2>&1
}
run 0 detr plain & run 1 detr enact & run 1 conditional_detr plain &
run 0 conditional_detr enact & run 2 anchor_detr plain & run 3 anchor_detr enact & wait
python benchmarks/accuracy_parity.py "${COMMON[@]}" --stop_after 0.001
