#!/bin/bash
# The embedded demo: DenseNet-201 on scikit-learn's bundled handwritten digits (1,797 real 8x8 scans,
# upscaled to 32x32 PNGs), trained through the same train_full_1p.sh path as ImageNet, at 32x32.
#   bash test/demo.sh                    # any extra flags go to main.py, e.g. --device cpu
set -e
test_path_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
data_dir=${DEMO_DATA:-$test_path_dir/output/digits_data}
if [ ! -d "$data_dir/train" ]; then
    "${PYTHON:-python3}" "$test_path_dir/../make_digits.py" "$data_dir" --size 32 --seed 0
fi
# Its own flags, not the reference recipe's: batch 64, lr 0.02, cosine updated every step after a 1-epoch
# warm-up. It keeps checkpoint.pth and model_best.pth (hard links of one ~146 MB file while the last epoch is
# the best), as every run does by default.
exec bash "$test_path_dir/train_full_1p.sh" --data_path="$data_dir" --epochs=10 \
    --batch-size 64 --lr 0.02 --lr-scheduler cosine --lr-update step --lr-warmup-epochs 1 \
    --train-crop-size 32 --val-resize-size 32 --val-crop-size 32 --crop-scale 0.35 1 --hflip-prob 0 \
    --print-freq 10 "$@"
