#!/bin/bash
# RANK_SIZE-device (default 8) throughput run: 1 epoch of at most 100 steps, global FPS.
#   bash test/train_performance_8p.sh --data_path=/data/imagenet     (or --synthetic)
MODE=perf
DEFAULT_RANK_SIZE=8
EPOCHS=1
DEFAULT_ARGS=(--batch-size 1024 --lr 0.8 --seed 1234 --amp --apex-opt-level O2 --loss_scale_value 1024
              --max-steps 100 --print-freq 10)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
