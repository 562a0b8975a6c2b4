#!/bin/bash
# 1-device training with the reference's 1p recipe (batch 128, lr 0.1, 40 epochs, AMP O2, loss scale 1024).
#   bash test/train_full_1p.sh --data_path=/data/imagenet [--epochs=N] [main.py flags ...]
MODE=full
DEFAULT_RANK_SIZE=1
EPOCHS=40
DEFAULT_ARGS=(--batch-size 128 --lr 0.1 --momentum 0.9 --weight-decay 1e-4 --seed 1234
              --amp --apex-opt-level O2 --loss_scale_value 1024 --print-freq 10)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
