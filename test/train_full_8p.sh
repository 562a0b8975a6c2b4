#!/bin/bash
# Data-parallel training on RANK_SIZE devices (default 8) through torchrun, reference recipe with the
# reference's 8p global batch 1024 and lr 0.8, 40 epochs.
#   bash test/train_full_8p.sh --data_path=/data/imagenet [--epochs=N] [--recipe=NAME] [main.py flags ...]
#   RANK_SIZE=2 bash test/train_full_8p.sh ...                                  # 2 processes
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=29500 bash test/train_full_8p.sh ...  # 2 machines
#   MAX_RESTARTS=3 bash test/train_full_8p.sh ...       # torchrun restarts failed ranks; they resume by themselves
MODE=full
DEFAULT_RANK_SIZE=8
DEFAULT_RECIPE=reference
DEFAULT_ARGS=(--epochs 40 --batch-size 1024 --lr 0.8 --seed 1234 --print-freq 10)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
