"""Export a DenseNet checkpoint to ONNX and check it against PyTorch with onnxruntime.

    python export_onnx.py --weights output/model_best.pth --output densenet201.onnx
    python export_onnx.py --weights densenet201-c1103571.pth            # torchvision's published file

The counterpart of the Ascend reference's pthtar2onnx.py. Accepts our checkpoints ({'model': ...,
'args': ..., 'classes': ...}), other trainers' ({'state_dict': ...}, 'module.' prefixes) and raw
torchvision state_dicts (legacy 'norm.1' keys included); the architecture and the number of classes
are read from the file. The graph has one input 'input' (N x 3 x H x W, float32, ImageNet-normalised)
and one output 'output' (N x classes, logits), with a dynamic batch axis N. --reference-names writes the
Ascend original's graph instead (pthtar2onnx.py): input 'actual_input_1', output 'output1', a static
1 x 3 x H x W shape and opset 11, which its infer/convert/onnx2om.sh (atc --input_shape="actual_input_1:1,3,224,224")
takes unchanged.

Exporter: the TorchScript-based one (torch.onnx.export(dynamo=False)). DenseNet has no data-dependent
control flow, so tracing captures it exactly; that exporter needs nothing beyond torch and onnx (the
torch.export-based one, the default since torch 2.9, also needs the onnxscript package), takes seconds
instead of about a minute for DenseNet-201 on a CPU, and writes exactly the opset asked for (the new one
builds opset 18 and then tries to convert down). --exporter dynamo selects the new exporter.

Verification: the same random batch goes through the PyTorch model and onnxruntime (CPUExecutionProvider)
at two batch sizes; the largest absolute difference of the logits is printed for each, and the exit code
is 1 if either exceeds --atol. Bad input (missing file, not a checkpoint) is a one-line 'error:', exit 2.
"""
import argparse
import os
import sys
import time
import warnings

import torch

import densenet
import lifecycle
import checkpoint
import weights
from cli import UserError, describe_os_error, run_tool
EXIT_MISMATCH = 1


def get_args_parser():
    p = argparse.ArgumentParser(description="Export a DenseNet checkpoint to ONNX and verify it with onnxruntime")
    p.add_argument("--weights", required=True,
                   help="our checkpoint (model_best.pth, checkpoint.pth, ...) or a raw torchvision state_dict")
    p.add_argument("--model", default=None, choices=sorted(densenet.MODELS),
                   help="architecture (default: the checkpoint's, else whichever DenseNet the weights fit)")
    p.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int, default=None,
                   help="expected number of classes (default: from the classifier in the weights)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input height and width (default: the checkpoint's --val-crop-size, else 224)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset version (default 17, or 11 with --reference-names; for an older CANN's ATC try 11)")
    p.add_argument("--reference-names", action="store_true",
                   help="the Ascend original's graph: input 'actual_input_1', output 'output1', static batch 1, "
                        "so its onnx2om.sh works unchanged")
    p.add_argument("--output", default=None, help="the .onnx file to write (default: <model>.onnx)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest allowed absolute difference between PyTorch and onnxruntime logits "
                        "(default 1e-4)")
    p.add_argument("--check-batch-sizes", type=int, nargs=2, default=(1, 4), metavar=("B1", "B2"),
                   help="the two batch sizes run through both PyTorch and onnxruntime (default 1 4)")
    p.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"],
                   help="torch.onnx exporter: torchscript (default; no extra packages) "
                        "or dynamo (needs onnxscript)")
    p.add_argument("--no-check", action="store_true", help="export only; skip the onnxruntime comparison")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check batches (default 0)")
    return p


REFERENCE_NAMES = ("actual_input_1", "output1")  # the original's pthtar2onnx.py


def export(model, path, image_size, opset, exporter, reference_names=False):
    names = REFERENCE_NAMES if reference_names else ("input", "output")
    example = torch.randn(1 if reference_names else 2, 3, image_size, image_size)
    kwargs = dict(input_names=[names[0]], output_names=[names[1]], opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        if exporter == "dynamo":
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise UserError("--exporter dynamo needs the onnxscript package: pip install onnxscript "
                                "(or use the default --exporter torchscript)")
            shapes = None if reference_names else ({0: torch.export.Dim("batch", min=1)},)
            torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, dynamic_shapes=shapes,
                              **kwargs)
        else:
            axes = None if reference_names else {names[0]: {0: "batch"}, names[1]: {0: "batch"}}
            torch.onnx.export(model, (example,), path, dynamo=False, do_constant_folding=True, dynamic_axes=axes,
                              **kwargs)


def opset_of(path):
    import onnx
    model = onnx.load(path, load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def check_with_onnxruntime(model, path, image_size, batch_sizes, seed):
    """[(batch_size, max_abs_diff), ...] between PyTorch and onnxruntime on the same random batches."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    g = torch.Generator().manual_seed(seed)
    results = []
    for n in batch_sizes:
        x = torch.randn(n, 3, image_size, image_size, generator=g)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run([session.get_outputs()[0].name], {input_name: x.numpy()})[0]
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        results.append((n, diff))
    return results


def main(args):
    if args.image_size is not None and args.image_size < 32:
        raise UserError(f"--image-size must be >= 32 (DenseNet downsamples 32x), got {args.image_size}")
    opset = args.opset or (11 if args.reference_names else 17)
    if opset < 11:
        raise UserError(f"--opset must be >= 11, got {opset}")
    if args.output:  # before loading and exporting (the default name needs the model: checked below)
        checkpoint.check_writable_file(args.output, "--output")
    model, saved, name = weights.build_model_from_weights(args.weights, args.model, args.num_classes)
    num_classes = model.classifier.out_features
    ckpt_args = weights.saved_config(saved)
    image_size = args.image_size or ckpt_args.get("val_crop_size") or 224
    output = args.output or f"{name}.onnx"
    checkpoint.check_writable_file(output, "--output")
    print(f"Loaded {args.weights}: {name}, {num_classes} classes"
          + (f", epoch {saved['epoch']}" if "epoch" in saved else ""), flush=True)

    start = time.time()
    try:
        export(model, output, image_size, opset, args.exporter, args.reference_names)
    except OSError as e:  # checked before, but the disk can fill while the file is written
        raise UserError(f"--output {output}: could not write it ({describe_os_error(e)})") from None
    size_mb = os.path.getsize(output) / 2 ** 20
    written = opset_of(output)
    if written != opset:
        print(f"warning: the {args.exporter} exporter wrote opset {written}, not --opset {opset}", file=sys.stderr)
    names, batch = (REFERENCE_NAMES, "1") if args.reference_names else (("input", "output"), "batch")
    print(f"Exported {output} ({size_mb:.1f} MiB, opset {written}, {args.exporter} exporter, "
          f"{time.time() - start:.1f} s): input '{names[0]}' [{batch}, 3, {image_size}, {image_size}] float32 "
          f"(ImageNet-normalised), output '{names[1]}' [{batch}, {num_classes}] logits", flush=True)
    if args.no_check:
        return 0

    batch_sizes = (1,) if args.reference_names else args.check_batch_sizes  # a static graph takes batch 1 only
    results = check_with_onnxruntime(model, output, image_size, batch_sizes, args.seed)
    for n, diff in results:
        print(f"onnxruntime vs PyTorch, batch {n}: max abs diff {diff:.3e}", flush=True)
    worst = max((d for _, d in results), key=lambda d: (d != d, d))  # NaN counts as the worst
    if not all(d <= args.atol for _, d in results):  # False for NaN too
        print(f"error: onnxruntime differs from PyTorch by {worst:.3e} > --atol {args.atol:g}", file=sys.stderr)
        return EXIT_MISMATCH
    print(f"OK: max abs diff {worst:.3e} <= --atol {args.atol:g}")
    return 0


def run(argv=None):
    return run_tool(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    lifecycle.guard_streams()  # `| head`: a closed stdout is one warning, not a traceback; files still written
    sys.exit(run())
