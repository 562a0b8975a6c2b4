#!/bin/bash
# 1-device throughput run: 1 epoch of at most 100 steps, FPS from the steady-state window.
#   bash test/train_performance_1p.sh --data_path=/data/imagenet     (or --synthetic)
MODE=perf
DEFAULT_RANK_SIZE=1
EPOCHS=1
DEFAULT_ARGS=(--batch-size 128 --lr 0.1 --seed 1234 --amp --apex-opt-level O2 --loss_scale_value 1024
              --max-steps 100 --print-freq 10)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
