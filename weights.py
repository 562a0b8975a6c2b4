"""Reading weight files, whoever wrote them: safely (torch.load(weights_only=True): tensors and plain data
only, so a file's code never runs; the one class allowed besides is argparse.Namespace, which the Ascend
original's and torchvision's reference train.py store as 'args'), in every layout we meet (our checkpoints,
the original's, torchvision's reference and published files, other trainers' {'state_dict': ...}, raw
state_dicts, 'module.' prefixes, legacy 'norm.1' keys, apex O2's fp16 weights), for --pretrained, --resume,
predict.py and export_onnx.py. Every problem is a one-line UserError."""
import argparse
import os
import pickle
import zipfile
from collections import OrderedDict

import torch

import densenet
from cli import UserError, describe_os_error

# torchvision's published weights, as they sit in the torch hub cache (nothing is downloaded here).
TORCHVISION_WEIGHT_FILES = {
    "densenet121": "densenet121-a639ec97.pth",
    "densenet161": "densenet161-8d451a50.pth",
    "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth",
}


def load_safe(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain data only, no code from the file ever runs.
    argparse.Namespace is allowed (a plain attribute bag; the original's and torchvision's 'args')."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: {_why_unloadable(path, e)}") from None


def _why_unloadable(path, error):
    """Why torch.load(weights_only=True) failed, in the user's terms."""
    if not _looks_like_torch_save(path):
        return "not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)"
    if isinstance(error, pickle.UnpicklingError) and "global" in str(error).lower():
        # The file names a Python callable to import and call while loading: that is how a pickle runs code.
        return ("refused to load: it needs arbitrary unpickling, which could run code (only tensors and plain "
                "data are accepted)")
    if isinstance(error, OSError):
        return f"cannot read it ({describe_os_error(error)})"
    return "not a readable PyTorch checkpoint (truncated, corrupt or another file type)"


def _looks_like_torch_save(path):
    """torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle (PROTO opcode first)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
    except OSError:
        return True  # unreadable: let the caller's error speak


def extract_state_dict(checkpoint):
    """A model state_dict from our checkpoints ({'model': ...}), the Ascend original's and torchvision's
    ({'model': ...}), other trainers' ({'state_dict': ...}) or a raw state_dict, with any DataParallel/DDP
    'module.' prefix removed and fp16 weights (apex O2 saves its fp16 model) made fp32."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise UserError("file holds no model state_dict (expected a dict of tensors, or {'model': ...})")
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k,
                        v.float() if v.dtype in (torch.float16, torch.bfloat16) else v) for k, v in checkpoint.items())


def describe_mismatch(model, state_dict, limit=4):
    """One line saying which keys/shapes differ between a model and a state_dict (None if they match)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:limit])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:limit])})")
    return "; ".join(parts) or None


def read_weights(path, checkpoint=None):
    """(state_dict, checkpoint) from any weights file we accept -- our checkpoints, other trainers'
    ({'state_dict': ...}) or a raw torchvision state_dict -- with 'module.' prefixes removed and legacy
    'norm.1'-style keys renamed. `checkpoint` is the whole dict (classes, args, ...), {} for a raw state_dict.
    Pass `checkpoint` when the file is loaded already. Shared by main.py (--pretrained, --resume),
    export_onnx.py and predict.py."""
    if checkpoint is None:
        checkpoint = load_safe(path)
    try:
        state_dict = extract_state_dict(checkpoint)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    is_raw = all(torch.is_tensor(v) for v in checkpoint.values())
    return densenet.convert_legacy_keys(state_dict), ({} if is_raw else checkpoint)


def build_model_from_weights(path, model_name=None, num_classes=None):
    """The model a weights file holds, in eval mode on the CPU: (model, checkpoint, model_name).

    Architecture: `model_name` if given, else the checkpoint's args['model'], else whichever DenseNet the
    keys and shapes fit (densenet201 first). Classes: from the classifier's shape (`num_classes`, if given,
    must agree). Raises UserError with a one-line reason when the file does not fit."""
    state_dict, checkpoint = read_weights(path)
    if "classifier.weight" not in state_dict:
        raise UserError(f"{path}: no classifier.weight in the weights: not a DenseNet state_dict")
    weight_classes = state_dict["classifier.weight"].shape[0]
    if num_classes is not None and num_classes != weight_classes:
        raise UserError(f"{path}: the classifier has {weight_classes} classes, not --num-classes {num_classes}")
    recorded = saved_config(checkpoint).get("model")
    recorded = recorded if recorded in densenet.MODELS else None
    first = model_name or recorded or "densenet201"
    candidates = [first] + ([] if model_name else [n for n in sorted(densenet.MODELS) if n != first])
    mismatch = None
    for name in candidates:
        with torch.device("meta"):  # no memory, no init: the weights are assigned below
            model = densenet.build_model(name, num_classes=weight_classes)
        problem = describe_mismatch(model, state_dict)
        if problem is None:
            model.load_state_dict(state_dict, strict=True, assign=True)
            return model.float().eval(), checkpoint, name  # float(): weights saved in fp16 run in fp32 here
        mismatch = mismatch or problem
    raise UserError(f"{path} does not fit " + (f"--model {model_name}: {mismatch}" if model_name else
                                                f"any of {', '.join(sorted(densenet.MODELS))} ({first}: {mismatch})"))


def saved_config(checkpoint):
    """A checkpoint's 'args' as a dict: ours store a dict, the original's and torchvision's a Namespace."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def load_pretrained(model, model_name, path=None, log=print):
    """Load `path`, else torchvision's file from the hub cache; re-init a classifier that does not fit the
    model's classes. Everything else must match exactly."""
    if not path:
        filename = TORCHVISION_WEIGHT_FILES[model_name]
        path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
        if not os.path.isfile(path):
            raise UserError(f"--pretrained: no weights on disk; download https://download.pytorch.org/models/"
                            f"{filename} to {path} (or pass --pretrained_weight_path FILE)")
    state_dict, _ = read_weights(path)
    own = model.state_dict()
    skipped = [k for k in ("classifier.weight", "classifier.bias")
               if k in state_dict and k in own and state_dict[k].shape != own[k].shape]
    weight_classes = state_dict["classifier.weight"].shape[0] if skipped else None
    for k in skipped:
        del state_dict[k]
    mismatch = describe_mismatch(model, {**state_dict, **{k: own[k] for k in skipped}})
    if mismatch:
        raise UserError(f"{path} does not fit --model {model_name}: {mismatch}")
    model.load_state_dict(state_dict, strict=not skipped)
    log(f"Loaded pretrained weights from {path}")
    if skipped:
        log(f"Classifier re-initialised for {own['classifier.weight'].shape[0]} classes (the weights have "
            f"{weight_classes}); not loaded: {', '.join(skipped)}")
