#!/bin/bash
# 1-device throughput: 1 epoch of at most 100 steps; ActualFPS from the steady-state window.
#   bash test/train_performance_1p.sh --data_path=/data/imagenet   (or --synthetic)  [main.py flags ...]
MODE=perf
DEFAULT_RANK_SIZE=1
DEFAULT_RECIPE=reference
DEFAULT_ARGS=(--epochs 60 --batch-size 128 --lr 0.1 --seed 1234 --print-freq 10)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
