#!/usr/bin/env bash
# Entrypoint of the ENACT image. Commands:
#   auto                      (default) train DETR+ENACT on COCO when $COCO_DIR holds COCO,
#                             else run the shapes demo
#   demo                      synthetic shapes data -> DETR with ENACT and plain DETR, a few
#                             epochs -> curves, predictions and entropy maps in $OUTPUT_DIR/demo
#   train DETECTOR [FLAGS]    DETECTOR = detr | conditional_detr | anchor_detr: its main.py on
#                             $COCO_DIR, output in $OUTPUT_DIR/DETECTOR, on all visible GPUs
#                             (torchrun when there are several); FLAGS go to main.py
#   predict|entropy|plot ARGS tools/predict.py, tools/visualize_entropy.py, tools/plot_logs.py
#   info                      versions, GPUs and the ENACT backend
#   anything else             executed as is (bash, python ..., make test)
# Environment: COCO_DIR (/data/coco), OUTPUT_DIR (/outputs), NPROC (GPUs to use; default all),
# DEMO_EPOCHS (8), DEMO_NUM_TRAIN (240), DEMO_NUM_VAL (60), ENACT_REPO (/workspace/enact).
set -euo pipefail

REPO=${ENACT_REPO:-/workspace/enact}
COCO_DIR=${COCO_DIR:-/data/coco}
OUTPUT_DIR=${OUTPUT_DIR:-/outputs}
PYTHON=${PYTHON:-python}

die() {
    echo "error: $*" >&2
    exit 2
}

folder_of() {
    case "$1" in
        detr) echo "DETR-ENACT" ;;
        conditional_detr | conditional) echo "Conditional-DETR-ENACT" ;;
        anchor_detr | anchor) echo "Anchor-DETR-ENACT" ;;
        *) die "unknown detector '$1' (expected detr, conditional_detr or anchor_detr)" ;;
    esac
}

gpu_count() {
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

have_coco() {
    [[ -f "$COCO_DIR/annotations/instances_train2017.json" &&
        -f "$COCO_DIR/annotations/instances_val2017.json" ]]
}

info() {
    "$PYTHON" - <<'EOF'
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPUs: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)} "
          f"(sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})")
import enact_cuda
print("enact_cuda backend:", enact_cuda.backend_info())
EOF
}

train() {
    local detector=${1:-detr}
    [[ $# -gt 0 ]] && shift
    local folder
    folder=$(folder_of "$detector")
    have_coco || die "no COCO at $COCO_DIR (expected annotations/instances_{train,val}2017.json; set COCO_PATH on the host)"
    local n=${NPROC:-$(gpu_count)}
    local out="$OUTPUT_DIR/$detector"
    mkdir -p "$out"
    if [[ "$n" -gt 1 ]]; then
        exec torchrun --standalone --nproc_per_node="$n" "$REPO/$folder/main.py" \
            --coco_path "$COCO_DIR" --output_dir "$out" "$@"
    elif [[ "$n" -eq 1 ]]; then
        exec "$PYTHON" "$REPO/$folder/main.py" --coco_path "$COCO_DIR" --output_dir "$out" "$@"
    else
        echo "warning: no GPU visible, training on the CPU (slow)" >&2
        exec "$PYTHON" "$REPO/$folder/main.py" --coco_path "$COCO_DIR" --output_dir "$out" \
            --device cpu "$@"
    fi
}

demo() {
    local data="$OUTPUT_DIR/shapes_data" run="$OUTPUT_DIR/demo" device=cpu workers=2
    [[ "$(gpu_count)" -gt 0 ]] && device=cuda
    if [[ ! -f "$data/annotations/instances_val2017.json" ]]; then
        "$PYTHON" "$REPO/tools/make_shapes_coco.py" --out "$data" \
            --num_train "${DEMO_NUM_TRAIN:-240}" --num_val "${DEMO_NUM_VAL:-60}" \
            --min_size 96 --max_size 160 --seed 0
    fi
    local common=(--coco_path "$data" --device "$device" --backbone resnet18
        --backbone_weights none --hidden_dim 64 --nheads 4 --enc_layers 2 --dec_layers 2
        --dim_feedforward 128 --dropout 0.0 --num_queries 20 --train_sizes 128
        --eval_size 128 --max_size 160 --batch_size 8 --lr 2e-4 --lr_backbone 2e-5
        --epochs "${DEMO_EPOCHS:-8}" --lr_drop 100 --smoothing_sigma 1
        --num_workers "$workers")
    rm -rf "$run/detr_enact" "$run/detr_plain"  # a fresh demo each time (main.py refuses to
                                                # train afresh over an earlier run)
    echo "== demo: DETR with ENACT on shapes ($device)"
    "$PYTHON" "$REPO/DETR-ENACT/main.py" "${common[@]}" --output_dir "$run/detr_enact"
    echo "== demo: plain DETR on shapes ($device)"
    "$PYTHON" "$REPO/DETR-ENACT/main.py" "${common[@]}" --no_enact --output_dir "$run/detr_plain"
    "$PYTHON" "$REPO/tools/plot_logs.py" "$run/detr_enact" "$run/detr_plain" \
        --labels "DETR + ENACT" "DETR" --output "$run/curves.png"
    "$PYTHON" "$REPO/tools/predict.py" --checkpoint "$run/detr_enact/checkpoint.pth" \
        --input "$data/val2017" --max_images 8 --output "$run/predictions" --threshold 0.3 \
        --device "$device"
    "$PYTHON" "$REPO/tools/visualize_entropy.py" --checkpoint "$run/detr_enact/checkpoint.pth" \
        --input "$data/val2017" --max_images 4 --output "$run/entropy" --eval_size 256 \
        --max_size 320 --device "$device"
    echo "== demo done: $run (curves.png, predictions/, entropy/)"
}

cd "$REPO"
cmd=${1:-auto}
[[ $# -gt 0 ]] && shift
case "$cmd" in
    auto)
        if have_coco; then
            echo "COCO found at $COCO_DIR: training DETR with ENACT (paper settings)"
            train detr "$@"
        else
            echo "no COCO at $COCO_DIR (mount it with COCO_PATH=/path/to/coco): running the shapes demo"
            demo
        fi
        ;;
    demo) demo ;;
    train) train "$@" ;;
    predict) exec "$PYTHON" "$REPO/tools/predict.py" "$@" ;;
    entropy) exec "$PYTHON" "$REPO/tools/visualize_entropy.py" "$@" ;;
    plot) exec "$PYTHON" "$REPO/tools/plot_logs.py" "$@" ;;
    info) info ;;
    *) exec "$cmd" "$@" ;;
esac
