"""Plot a run's training curves from the metrics.jsonl that main.py writes in --output-dir.

    python plot_metrics.py output/metrics.jsonl                 # writes output/metrics_curves.png
    python plot_metrics.py output/metrics.jsonl -o curves.png

One PNG, three panels against the epoch: loss (train, val), accuracy (train Acc@1, val Acc@1 and Acc@5,
EMA val Acc@1 when present) and the learning rate (log scale when it spans a decade or more). A record
repeated for the same epoch (a run resumed after a crash redoes an epoch) is plotted once, the latest
one; a half-written last line (a run killed mid-write) is skipped with a warning.
Needs matplotlib (non-interactive Agg backend: no display needed).
"""
import argparse
import json
import os
import sys

import lifecycle
from cli import UserError, run_tool


def get_args_parser():
    p = argparse.ArgumentParser(description="Plot loss / accuracy / lr curves from main.py's metrics.jsonl")
    p.add_argument("metrics", metavar="METRICS_JSONL", help="<output-dir>/metrics.jsonl of a main.py run")
    p.add_argument("-o", "--output", default=None, help="PNG to write (default: <metrics folder>/metrics_curves.png)")
    p.add_argument("--title", default=None,
                   help="figure title (default: the run's model, batch and ranks from run.json, else its folder)")
    return p


def read_metrics(path):
    """The per-epoch records, one per epoch (the last written wins), sorted by epoch."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    by_epoch = {}
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if n == len(lines):  # the run was killed while writing its last line
                print(f"warning: {path}:{n}: skipped a half-written line", file=sys.stderr)
                continue
            raise UserError(f"{path}:{n}: not a JSON line (is this main.py's metrics.jsonl?)")
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise UserError(f"{path}:{n}: no 'epoch' in the record (is this main.py's metrics.jsonl?)")
        by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise UserError(f"{path}: no epochs recorded yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def series(records, key):
    """(epochs, values) of `key`, leaving out epochs where it is missing or null."""
    points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot(records, output, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marker = "o" if len(records) <= 30 else None
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        (ax_loss, "loss", [("train_loss", "train", "-"), ("val_loss", "val", "-")]),
        (ax_acc, "accuracy (%)", [("train_acc1", "train Acc@1", "-"), ("val_acc1", "val Acc@1", "-"),
                                  ("val_acc5", "val Acc@5", "--"), ("val_ema_acc1", "val Acc@1 (EMA)", ":")]),
        (ax_lr, "learning rate", [("lr", "lr (end of epoch)", "-")]),
    ]
    for ax, ylabel, curves in panels:
        drawn = 0
        for key, label, style in curves:
            x, y = series(records, key)
            if x:
                ax.plot(x, y, linestyle=style, marker=marker, markersize=4, label=label)
                drawn += 1
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
    # Log scales where values span decades: epoch 0's val loss of a fresh model (60 and more) would flatten
    # every later epoch on a linear axis; step decays divide the LR by 10.
    for ax, keys in ((ax_loss, ("train_loss", "val_loss")), (ax_lr, ("lr",))):
        values = [v for key in keys for v in series(records, key)[1]]
        if values and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_yscale("log")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def run_name(metrics_path):
    """What the run is called: from run.json beside the metrics (model, batch, ranks), else its folder; a
    launcher's rank folder ("0") is named with its parent ("output/0")."""
    folder = os.path.dirname(os.path.abspath(metrics_path))
    try:
        with open(os.path.join(folder, "run.json")) as f:
            run = json.load(f)
        return f"{run['network']}_bs{run['batch_size']}_{run['world_size']}p"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    name = os.path.basename(folder)
    return os.path.join(os.path.basename(os.path.dirname(folder)), name) if name.isdigit() else name


def main(args):
    records = read_metrics(args.metrics)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plot_metrics.py needs matplotlib: pip install matplotlib")
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "metrics_curves.png")
    title = args.title or f"{run_name(args.metrics)}: {len(records)} epochs " \
                          f"({records[0]['epoch']}-{records[-1]['epoch']})"
    plot(records, output, title)
    print(f"Wrote {output} ({len(records)} epochs)")
    return 0


def run(argv=None):
    return run_tool(main, get_args_parser().parse_args(argv), expected=(OSError,))


if __name__ == "__main__":
    lifecycle.guard_streams()  # `| head`: a closed stdout is one warning, not a traceback; files still written
    sys.exit(run())
