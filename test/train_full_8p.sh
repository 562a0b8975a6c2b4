#!/bin/bash
# Data-parallel training on RANK_SIZE devices (default 8) with the reference's 8p recipe
# (global batch 1024, lr 0.8, 40 epochs, AMP O2, loss scale 1024), launched with torchrun.
#   bash test/train_full_8p.sh --data_path=/data/imagenet [--epochs=N] [main.py flags ...]
#   RANK_SIZE=2 bash test/train_full_8p.sh ...            # 2 processes (e.g. on a CPU machine)
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 bash test/train_full_8p.sh ...   # two machines
MODE=full
DEFAULT_RANK_SIZE=8
EPOCHS=40
DEFAULT_ARGS=(--batch-size 1024 --lr 0.8 --momentum 0.9 --weight-decay 1e-4 --seed 1234
              --amp --apex-opt-level O2 --loss_scale_value 1024 --print-freq 10)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
