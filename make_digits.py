"""Write scikit-learn's bundled handwritten digits as an ImageNet-layout folder of PNG files.

1,797 real 8x8 scans (UCI optdigits) ship inside scikit-learn, so the demo needs no
download. Each scan is upscaled (bicubic) to --size pixels and written to
<out>/{train,val}/<digit>/<n>.png; the split is stratified and fixed by --seed.

    python make_digits.py test/output/digits
"""
import argparse
import os

import numpy as np
from PIL import Image


def write_digits(out_dir, size=32, val_fraction=0.2, seed=0):
    from sklearn.datasets import load_digits  # imported here: only the demo needs scikit-learn

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        n_val = int(round(len(indices) * val_fraction))
        for split, chosen in (("val", indices[:n_val]), ("train", indices[n_val:])):
            folder = os.path.join(out_dir, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # scans are 0..16
                Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).save(
                    os.path.join(folder, f"{i:04d}.png"))
                counts[split] += 1
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--size", type=int, default=32, help="side of the written images in pixels")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    counts = write_digits(args.out_dir, args.size, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out_dir}")


if __name__ == "__main__":
    main()
