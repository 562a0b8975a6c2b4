#!/bin/bash
# RANK_SIZE-device (default 8) throughput: 1 epoch of at most 100 steps; ActualFPS is the global img/s.
#   bash test/train_performance_8p.sh --data_path=/data/imagenet   (or --synthetic)  [main.py flags ...]
MODE=perf
DEFAULT_RANK_SIZE=8
DEFAULT_RECIPE=reference
DEFAULT_ARGS=(--epochs 40 --batch-size 1024 --lr 0.8 --seed 1234 --print-freq 10)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
