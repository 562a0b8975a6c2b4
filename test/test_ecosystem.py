"""The tools around training: pretrained weights, ONNX export, predict.py, metrics.jsonl, plots, TensorBoard.

One small real training run (module fixture `trained`: densenet121 on solid-colour classes, 2 epochs) feeds
the predict, export, metrics and plot tests. DenseNet-201 tests use torchvision's randomly initialised
weights (no download), saved in the spellings users meet: raw, legacy 'norm.1' keys, {'model': 'module.'...}.
"""
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torchvision
from PIL import Image

from conftest import REPO, SMALL_RUN, assert_one_line_error, run_main, write_image_folder


import weights  # noqa: E402
import densenet  # noqa: E402
import export_onnx  # noqa: E402
import main  # noqa: E402
import plot_metrics  # noqa: E402
import predict  # noqa: E402
from cli import UserError  # noqa: E402

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Enough to separate 3 solid colours with eval-mode BatchNorm on every seed tried (7/7 at 100% val):
# 64 px crops (so the last BN layers see 2x2 maps, not 1x1), a small lr, 2 epochs x 10 steps.
TRAIN_RECIPE = SMALL_RUN + ["--model", "densenet121", "--train-crop-size", "64", "--val-resize-size", "64",
                            "--val-crop-size", "64", "--print-freq", "5", "--epochs", "2", "-b", "6",
                            "--lr", "0.001"]
METRIC_KEYS = {"epoch", "lr", "train_loss", "train_acc1", "train_acc5", "fps", "epoch_time", "images",
               "unreadable_images", "val_acc1", "val_acc5", "val_loss", "val_images", "val_time"}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def run_tool(script, args, timeout=600):
    env = {**os.environ, **ONE_THREAD}
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def call_tool(module, args, capsys):
    """module.run(args) in this process (no torch import per call): CompletedProcess-like result."""
    capsys.readouterr()
    code = module.run([str(a) for a in args])
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def to_legacy(state_dict):
    """Modern '...denselayerN.norm1.weight' -> the published files' '...denselayerN.norm.1.weight'."""
    return OrderedDict((re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", k), v)
                       for k, v in state_dict.items())


@pytest.fixture(scope="module")
def tv201(tmp_path_factory):
    """torchvision's DenseNet-201 (random init, eval) and its weights saved three ways."""
    torch.manual_seed(0)
    tv = torchvision.models.densenet201(weights=None).eval()
    sd = tv.state_dict()
    folder = tmp_path_factory.mktemp("weights")
    files = {"raw": folder / "densenet201.pth", "legacy": folder / "densenet201-legacy.pth",
             "module": folder / "densenet201-ddp.pth"}
    torch.save(sd, files["raw"])
    legacy = to_legacy(sd)
    assert any(".norm.1." in k for k in legacy)
    torch.save(legacy, files["legacy"])
    torch.save({"model": OrderedDict(("module." + k, v) for k, v in sd.items()), "epoch": 89}, files["module"])
    return tv, files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A densenet121 trained by main.py for 2 epochs on 3 solid-colour classes: (output_dir, stdout)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_image_folder(root / "data", classes=3, train_per_class=20, val_per_class=4)
    out = root / "out"
    extra = ["--tensorboard"] if HAS_TENSORBOARD else []
    proc = run_main(["--data-path", data, "--output-dir", str(out), *TRAIN_RECIPE, *extra], env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def new_images(tmp_path_factory):
    """Unseen images of the same colours (another seed): {class name: [paths]}."""
    root = write_image_folder(tmp_path_factory.mktemp("new") / "data", classes=3, train_per_class=1,
                              val_per_class=3, seed=5)
    val = os.path.join(root, "val")
    return {c: sorted(os.path.join(val, c, f) for f in os.listdir(os.path.join(val, c))) for c in os.listdir(val)}


# ----------------------------------------------------------------------------
# (a) pretrained weights through weights.load_pretrained
# ----------------------------------------------------------------------------

def pretrained_args(path, *extra):
    return main.get_args_parser().parse_args(["--synthetic", "--model", "densenet201", "--pretrained",
                                                 "--pretrained_weight_path", str(path), *extra])


def load_pretrained(model, args):
    """What main.py does with --pretrained (trainer.build_trainer): the weights named by the parsed flags."""
    weights.load_pretrained(model, args.model, args.pretrained_weight_path)


@pytest.mark.parametrize("spelling", ["raw", "legacy", "module"])
def test_load_pretrained_matches_torchvision(tv201, spelling):
    tv, files = tv201
    model = densenet.build_model("densenet201", num_classes=1000)
    load_pretrained(model, pretrained_args(files[spelling]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tv(x), rtol=0, atol=0)


def test_load_pretrained_reinitialises_other_classifier(tv201, capsys):
    tv, files = tv201
    model = densenet.build_model("densenet201", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.")}
    load_pretrained(model, pretrained_args(files["raw"], "--num_classes", "3"))
    assert "Classifier re-initialised for 3 classes" in capsys.readouterr().out
    reference = tv.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith("classifier."):
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # left as initialised
        else:
            torch.testing.assert_close(v, reference[k], rtol=0, atol=0, msg=k)


def test_pretrained_without_weights_names_expected_path(tmp_path, monkeypatch):
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    args = main.get_args_parser().parse_args(["--synthetic", "--model", "densenet121", "--pretrained"])
    with pytest.raises(UserError) as e:
        load_pretrained(densenet.build_model("densenet121"), args)
    expected = os.path.join(str(torch_home), "hub", "checkpoints", "densenet121-a639ec97.pth")
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_load_pretrained_wrong_architecture_is_user_error(tv201):
    _, files = tv201
    args = pretrained_args(files["raw"])
    args.model = "densenet121"
    with pytest.raises(UserError, match="does not fit --model densenet121"):
        load_pretrained(densenet.build_model("densenet121"), args)


# ----------------------------------------------------------------------------
# (b) ONNX export
# ----------------------------------------------------------------------------

def onnx_diffs(proc):
    """{batch size: max abs diff} from export_onnx.py's output."""
    found = re.findall(r"batch (\d+): max abs diff (\S+)", proc.stdout)
    return {int(b): float(d) for b, d in found}


def check_onnx_graph(path, num_classes, image_size, opset=17):
    import onnx
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "output")
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [3, image_size, image_size], in_dims  # dynamic batch
    assert isinstance(out_dims[0], str) and out_dims[1] == num_classes, out_dims
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]


def test_export_onnx_our_checkpoint(trained, tmp_path, capsys):
    out_dir, _ = trained
    onnx_path = tmp_path / "tiny.onnx"
    proc = call_tool(export_onnx, ["--weights", out_dir / "checkpoint.pth", "--output", onnx_path], capsys)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    diffs = onnx_diffs(proc)
    with capsys.disabled():
        print(f"\ntiny densenet121 (3 classes, 64 px): {diffs}")
    assert sorted(diffs) == [1, 4], proc.stdout
    assert all(d <= 1e-4 for d in diffs.values()), diffs
    assert "densenet121, 3 classes" in proc.stdout
    check_onnx_graph(onnx_path, num_classes=3, image_size=64)  # image size from the checkpoint's val crop

    # the same comparison with an impossible tolerance: exit 1 and a one-line error
    strict = call_tool(export_onnx, ["--weights", out_dir / "checkpoint.pth", "--output", onnx_path,
                                     "--atol", "1e-30", "--check-batch-sizes", "2", "3"], capsys)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert sorted(onnx_diffs(strict)) == [2, 3]
    assert_one_line_error(strict, "--atol")


def test_export_onnx_densenet201_legacy_keys(tv201, tmp_path):
    _, files = tv201
    onnx_path = tmp_path / "densenet201.onnx"
    proc = run_tool("export_onnx.py", ["--weights", files["legacy"], "--image-size", "64", "--output", onnx_path])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    diffs = onnx_diffs(proc)
    print(f"\ndensenet201 (1000 classes, 64 px): {diffs}")
    assert sorted(diffs) == [1, 4] and all(d <= 1e-4 for d in diffs.values()), proc.stdout
    assert "densenet201, 1000 classes" in proc.stdout
    check_onnx_graph(onnx_path, num_classes=1000, image_size=64)


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint"])
def test_export_onnx_bad_input(tmp_path, case, capsys):
    path = tmp_path / "weights.pth"
    if case == "not_a_checkpoint":
        path.write_text("definitely not a checkpoint\n")
    proc = call_tool(export_onnx, ["--weights", path, "--output", tmp_path / "x.onnx"], capsys)
    assert proc.returncode == 2
    assert_one_line_error(proc, str(path))
    assert not (tmp_path / "x.onnx").exists()


def test_export_onnx_help():
    text = export_onnx.get_args_parser().format_help()
    assert all(flag in text for flag in ("--weights", "--model", "--num-classes", "--image-size", "--opset",
                                         "--output", "--atol"))


# ----------------------------------------------------------------------------
# (c) predict.py
# ----------------------------------------------------------------------------

def test_predict_names_the_right_classes_csv(trained, new_images, tmp_path):
    out_dir, _ = trained
    folder = os.path.dirname(os.path.dirname(new_images["class_0"][0]))
    text_file = tmp_path / "x.jpg"
    text_file.write_text("this is text, not a JPEG\n")
    csv_path = tmp_path / "preds.csv"
    proc = run_tool("predict.py", ["--weights", out_dir / "checkpoint.pth", "--device", "cpu", "-b", "4",
                                   "--output", csv_path, folder, text_file])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and str(text_file) in warnings[0] and "not a readable image" in warnings[0]
    lines = proc.stdout.splitlines()
    assert len(lines) == 9
    for cls, paths in new_images.items():
        for p in paths:
            (line,) = [l for l in lines if l.startswith(p + ":")]
            assert line.split(": ", 1)[1].startswith(cls + " ("), line  # top-1 is the right colour
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 * 3  # top-5 capped at 3 classes
    for cls, paths in new_images.items():
        for p in paths:
            mine = [r for r in rows if r["path"] == p]
            assert [int(r["rank"]) for r in mine] == [1, 2, 3]
            assert mine[0]["class_name"] == cls and int(mine[0]["class_index"]) == int(cls[-1])
            probs = [float(r["probability"]) for r in mine]
            assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4


def test_predict_into_a_closed_pipe_still_writes_its_output_file(trained, new_images, tmp_path):
    # `predict.py ... --output preds.csv | head -3`: head gone, the rest of the printing fails with EPIPE. Before:
    # a BrokenPipeError traceback, exit 1, and no preds.csv. (A pipe nobody reads: head that has exited.)
    out_dir, _ = trained
    csv_path = tmp_path / "preds.csv"
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, os.path.join(REPO, "predict.py"), "--weights",
                               str(out_dir / "checkpoint.pth"), "--device", "cpu", "-b", "1", "--output",
                               str(csv_path), *new_images["class_0"]], cwd=REPO, env={**os.environ, **ONE_THREAD},
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(w)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert [l for l in proc.stderr.splitlines() if "cannot be written" in l] == [
        "warning: stdout cannot be written (Broken pipe): its output is dropped from now on"], proc.stderr
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == len(new_images["class_0"]) * 3


def test_predict_json(trained, new_images, tmp_path, capsys):
    out_dir, _ = trained
    json_path = tmp_path / "preds.json"
    images = [new_images["class_1"][0], new_images["class_2"][0]]
    proc = call_tool(predict, ["--weights", out_dir / "checkpoint.pth", "--topk", "2", "--output", json_path,
                               *images], capsys)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(json_path) as f:
        result = json.load(f)
    assert result["model"] == "densenet121" and result["num_classes"] == 3
    assert result["preprocessing"] == {"val_resize_size": 64, "val_crop_size": 64, "interpolation": "bilinear"}
    assert [p["path"] for p in result["predictions"]] == images
    assert [p["top"][0]["class_name"] for p in result["predictions"]] == ["class_1", "class_2"]
    assert all(len(p["top"]) == 2 for p in result["predictions"])
    assert result["skipped"] == []


def test_predict_only_non_images_is_one_line_error(trained, tmp_path, capsys):
    out_dir, _ = trained
    text_file = tmp_path / "x.jpg"
    text_file.write_text("hello\n")
    proc = call_tool(predict, ["--weights", out_dir / "checkpoint.pth", text_file], capsys)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"{text_file}: not a readable image")


def test_predict_raw_torchvision_weights_with_class_index(tv201, new_images, tmp_path, capsys):
    _, files = tv201
    index = tmp_path / "imagenet_class_index.json"
    index.write_text(json.dumps({str(i): [f"n{i:08d}", f"thing_{i}"] for i in range(1000)}))
    proc = call_tool(predict, ["--weights", files["module"], "--class-index", index, new_images["class_0"][0]],
                     capsys)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resize 256, centre crop 224, bilinear" in proc.stderr  # torchvision's eval preset for raw weights
    (line,) = proc.stdout.splitlines()
    assert len(re.findall(r"thing_\d+ \(\d+\.\d\d%\)", line)) == 5


# ----------------------------------------------------------------------------
# (d) metrics.jsonl, plot_metrics.py, --tensorboard
# ----------------------------------------------------------------------------

def test_metrics_jsonl(trained):
    out_dir, stdout = trained
    with open(out_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
        assert r["images"] == 60 and r["val_images"] == 12 and r["unreadable_images"] == 0
        assert r["lr"] == pytest.approx(0.001) and r["train_loss"] > 0 and r["epoch_time"] > 0
        assert 0 <= r["val_acc1"] <= r["val_acc5"] <= 100
    assert records[-1]["val_acc1"] == 100.0, stdout[-2000:]  # the colours are separable after 2 epochs


def test_plot_metrics_writes_png(trained, tmp_path):
    out_dir, _ = trained
    png = tmp_path / "plots" / "curves.png"
    proc = run_tool("plot_metrics.py", [out_dir / "metrics.jsonl", "-o", png])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.load()
        assert img.size == (1500, 450)
        assert len(img.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # curves, text: not a blank canvas


def test_plot_metrics_tolerates_resume_and_torn_line(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"epoch": 0, "lr": 0.1, "train_loss": 2.0, "train_acc1": 10.0},
             {"epoch": 1, "lr": 0.1, "train_loss": 9.9, "train_acc1": 0.0},
             {"epoch": 1, "lr": 0.01, "train_loss": 1.5, "train_acc1": 20.0}]  # epoch 1 redone after a crash
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 2, "lr"')
    proc = call_tool(plot_metrics, [metrics], capsys)
    assert proc.returncode == 0, proc.stderr
    assert "2 epochs" in proc.stdout and "half-written" in proc.stderr
    assert (tmp_path / "metrics_curves.png").is_file()
    bad = call_tool(plot_metrics, [tmp_path / "nope.jsonl"], capsys)
    assert bad.returncode == 2
    assert_one_line_error(bad, "nope.jsonl")


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed")
def test_tensorboard_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out_dir, _ = trained
    acc = EventAccumulator(str(out_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc1", "val/acc1", "val/acc5", "val/loss", "lr", "fps"} <= tags, tags
    assert [e.step for e in acc.Scalars("val/acc1")] == [0, 1]


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_missing_is_reported_before_training(image_folder, tmp_path):
    args = main.get_args_parser().parse_args(["--data-path", image_folder, "--output-dir", str(tmp_path / "out"),
                                                 "--tensorboard", *SMALL_RUN])
    with pytest.raises(UserError, match="pip install tensorboard"):
        main.preflight(args, main.launch.job_of(args))  # before any model, data or device is touched
