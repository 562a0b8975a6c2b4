"""Classify images with a trained DenseNet: the top-k classes and their probabilities for each image.

    python predict.py --weights output/model_best.pth photo.jpg holiday/          # files and/or folders
    python predict.py --weights output/model_best.pth --output preds.csv val/     # also write CSV (or .json)
    python predict.py --weights densenet201-c1103571.pth --class-index imagenet_class_index.json cat.jpg

Weights: our checkpoints (class names from their 'classes', preprocessing from their args: --val-resize-size,
--val-crop-size, --interpolation) or a raw torchvision state_dict (preprocessing 256 / 224 / bilinear; classes
are indices unless --class-index names them). Images are decoded and cropped exactly as main.py's validation
does (data.eval_transform + data.DeviceNormalize), batched, on whichever device --device picks.

Folders are searched recursively for image files (.jpg, .png, ...; hidden files skipped). A file that is
not a readable image is skipped with a one-line 'warning:' naming it; if no file is a readable image the
run stops with a one-line 'error:' (exit 2) before the model is loaded.
Output: one line per image on stdout ("PATH: name (97.12%), name (1.50%), ..."); notes go to stderr.
"""
import argparse
import csv
import json
import os
import sys

import torch
import torch.utils.data
from PIL import Image

import cli
cli.check_torchvision()  # before `import data`: a torchvision built for another torch is one line, not a traceback

import data as data_lib
import launch
import lifecycle
import layout as layout_lib
import densenet
import checkpoint
import weights
from device import DEVICE_TYPES, place_model, resolve_device
from cli import UserError, run_tool
RAW_WEIGHTS_PREPROCESSING = {"val_resize_size": 256, "val_crop_size": 224, "interpolation": "bilinear"}


def get_args_parser():
    p = argparse.ArgumentParser(description="Top-k predictions of a DenseNet checkpoint for image files/folders")
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    p.add_argument("--weights", required=True, help="our checkpoint (model_best.pth, ...) or a torchvision .pth")
    p.add_argument("--model", default=None, choices=sorted(densenet.MODELS),
                   help="architecture (default: the checkpoint's, else whichever DenseNet the weights fit)")
    p.add_argument("--device", default="auto", choices=DEVICE_TYPES,
                   help="default auto: npu, else cuda, else cpu")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--topk", type=int, default=5, help="how many classes to report per image (default 5)")
    p.add_argument("--output", default=None, help="also write the predictions to this .csv or .json file")
    p.add_argument("--class-index", default=None,
                   help="JSON naming the classes: {\"0\": [\"n01440764\", \"tench\"], ...} (torchvision/Keras "
                        "imagenet_class_index.json), {\"0\": \"tench\", ...} or [\"tench\", ...]; overrides the "
                        "checkpoint's class names")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="decoding processes (default: 0 for a single batch, else from the CPU count)")
    return p


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def collect_files(paths):
    """Files named on the command line (whatever their extension) plus the image files inside folders."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .ipynb_checkpoints, ...
                found.extend(os.path.join(root, n) for n in names if layout_lib.is_image_file(n))
            found.sort()
            if not found:
                print(f"warning: no image files in folder {path}", file=sys.stderr, flush=True)
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    return files


def header_problem(path):
    """Why `path` is not an image, from its header alone (cheap), or None. Full decoding comes later."""
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018
        return None
    except Exception as e:
        reason = (str(e).splitlines()[0] if str(e) else type(e).__name__).replace(f" {path!r}", "")
        return f"not a readable image ({reason})"


class ImageFiles(torch.utils.data.Dataset):
    """(uint8 CHW tensor, index) per file, or data.BadSample if decoding fails (reported, not fatal)."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        try:
            return self.transform(data_lib.load_rgb(path)), index
        except Exception as e:
            return data_lib.BadSample(path, f"not a readable image ({type(e).__name__}: {e})")


def load_class_names(path, num_classes):
    try:
        with open(path) as f:
            table = json.load(f)
    except OSError as e:
        raise UserError(f"--class-index {path}: {e.strerror}")
    except ValueError as e:
        raise UserError(f"--class-index {path}: not JSON ({e})")
    if isinstance(table, dict):
        try:
            table = {int(k): v for k, v in table.items()}
        except ValueError:
            raise UserError(f"--class-index {path}: keys must be class indices \"0\", \"1\", ...")
        if sorted(table) != list(range(len(table))):
            raise UserError(f"--class-index {path}: keys must be the indices 0..{len(table) - 1}")
        table = [table[i] for i in range(len(table))]
    if not isinstance(table, list):
        raise UserError(f"--class-index {path}: expected a JSON object or list")
    names = [str(v[-1]) if isinstance(v, list) and v else str(v) for v in table]
    if len(names) != num_classes:
        raise UserError(f"--class-index {path} names {len(names)} classes, the model has {num_classes}")
    return names


# ----------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------

def format_line(result):
    return f"{result['path']}: " + ", ".join(f"{t['class_name']} ({100 * t['probability']:.2f}%)"
                                              for t in result["top"])


def write_output(path, results, skipped, meta):
    try:
        _write_output(path, results, skipped, meta)
    except OSError as e:  # checked before the work, but the disk can fill or the folder go since
        raise UserError(f"--output {path}: could not write it ({cli.describe_os_error(e)})") from None


def _write_output(path, results, skipped, meta):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".json"):
        with open(path, "w") as f:
            json.dump({**meta, "predictions": results, "skipped": skipped}, f, indent=1)
            f.write("\n")
    else:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "rank", "class_index", "class_name", "probability"])
            for r in results:
                for rank, t in enumerate(r["top"], start=1):
                    w.writerow([r["path"], rank, t["class_index"], t["class_name"], f"{t['probability']:.6f}"])


# ----------------------------------------------------------------------------

def main(args):
    check_args(args)
    files, skipped = readable_files(args.paths)  # before the model is loaded: a typo fails fast
    model, saved, name = weights.build_model_from_weights(args.weights, args.model)
    num_classes = model.classifier.out_features
    class_names = names_of_classes(args.class_index, saved.get("classes"), num_classes)
    ckpt_args = weights.saved_config(saved)
    prep = {k: ckpt_args.get(k) or default for k, default in RAW_WEIGHTS_PREPROCESSING.items()}

    device = resolve_device(args.device)
    model = place_model(model, device, device.channels_last_default)
    transform = data_lib.eval_transform(prep["val_resize_size"], prep["val_crop_size"], prep["interpolation"])
    workers = args.workers if args.workers is not None else (
        launch.default_workers(1)[0] if len(files) > args.batch_size else 0)
    loader = torch.utils.data.DataLoader(ImageFiles(files, transform), batch_size=args.batch_size,
                                         num_workers=workers, collate_fn=data_lib.collate_skip_bad,
                                         pin_memory=device.is_accelerator)
    print(f"{name}, {num_classes} classes, from {args.weights}; preprocessing: resize {prep['val_resize_size']}, "
          f"centre crop {prep['val_crop_size']}, {prep['interpolation']}; device {device.describe()}; "
          f"{len(files)} images", file=sys.stderr, flush=True)
    normalize = data_lib.DeviceNormalize(device.torch_device, device.channels_last_default)
    results = predict(model, normalize, loader, files, class_names, min(args.topk, num_classes), skipped)
    if not results:
        raise UserError(f"none of the {len(files)} images could be decoded (e.g. {skipped[-1]['path']})")
    if args.output:
        meta = {"weights": args.weights, "model": name, "num_classes": num_classes, "preprocessing": prep}
        write_output(args.output, results, skipped, meta)
        print(f"Wrote {len(results)} predictions to {args.output}", file=sys.stderr, flush=True)
    return 0


def check_args(args):
    if args.batch_size <= 0 or args.topk <= 0:
        raise UserError("--batch-size and --topk must be > 0")
    if args.output and not args.output.lower().endswith((".csv", ".json")):
        raise UserError(f"--output {args.output}: give a .csv or .json file name")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.output:  # before the work: an unwritable --output must not cost a whole set of predictions
        checkpoint.check_writable_file(args.output, "--output")


def readable_files(paths):
    """(image files, [{'path', 'reason'}] of the files skipped), from the files' headers; one line when none is
    readable."""
    files, skipped = [], []
    for path in collect_files(paths):
        problem = header_problem(path)
        if problem:
            skipped.append({"path": path, "reason": problem})
        else:
            files.append(path)
    if not files:
        if len(skipped) == 1:
            raise UserError(f"{skipped[0]['path']}: {skipped[0]['reason']}")
        raise UserError(f"no readable image among {len(skipped)} files (e.g. {skipped[0]['path']}: "
                        f"{skipped[0]['reason']})" if skipped else "no image files found")
    for s in skipped:
        print(f"warning: skipped {s['path']}: {s['reason']}", file=sys.stderr, flush=True)
    return files, skipped


def names_of_classes(class_index, saved_classes, num_classes):
    """--class-index's names, else the checkpoint's class folders, else the indices."""
    if class_index:
        return load_class_names(class_index, num_classes)
    if isinstance(saved_classes, (list, tuple)) and len(saved_classes) == num_classes:
        return [str(c) for c in saved_classes]
    return [str(i) for i in range(num_classes)]


def predict(model, normalize, loader, files, class_names, topk, skipped):
    """The top-k classes of every readable image, printed as they come; undecodable files join `skipped`."""
    results = []
    with torch.inference_mode():
        for batch in loader:
            for path, reason in batch.bad:
                print(f"warning: skipped {path}: {reason}", file=sys.stderr, flush=True)
                skipped.append({"path": path, "reason": reason})
            if not len(batch.targets):
                continue
            probs = torch.softmax(model(normalize(batch.images)).float(), dim=1)
            p, idx = probs.topk(topk, dim=1)
            for i, row_p, row_idx in zip(batch.targets.tolist(), p.cpu().tolist(), idx.cpu().tolist()):
                result = {"path": files[i], "top": [{"class_index": c, "class_name": class_names[c],
                                                     "probability": q} for q, c in zip(row_p, row_idx)]}
                results.append(result)
                print(format_line(result), flush=True)
    return results


def run(argv=None):
    return run_tool(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    lifecycle.guard_streams()  # `| head`: a closed stdout is one warning, not a traceback; files still written
    sys.exit(run())
