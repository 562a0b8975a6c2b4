#!/bin/bash
# 1-device training, reference recipe (recipes/reference.txt: cosine per epoch, AMP O2, loss scale 1024), 60 epochs
# with the reference's 1p batch 128 and lr 0.1.
#   bash test/train_full_1p.sh --data_path=/data/imagenet [--epochs=N] [--recipe=NAME] [main.py flags ...]
MODE=full
DEFAULT_RANK_SIZE=1
DEFAULT_RECIPE=reference
DEFAULT_ARGS=(--epochs 60 --batch-size 128 --lr 0.1 --seed 1234 --print-freq 10)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
