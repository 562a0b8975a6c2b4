"""The launchers' summary of a finished run, from what main.py's rank 0 wrote as data: run.json (world size,
batch, device, model) and metrics.jsonl (one record per epoch). Nothing is grepped from the human log.

    python run_summary.py OUTPUT_DIR --mode acc|perf --e2e-seconds N

Prints the reference's "Final ..." lines and writes OUTPUT_DIR/<CaseName>.log with its "Key = value" lines
(Network, RankSize, BatchSize, DeviceType, CaseName, ActualFPS, TrainingTime, TrainAccuracy, ActualLoss,
E2ETrainingTime, and CompileTime for performance runs), then our FPSWindow: "steady state", or "whole epoch,
warm-up included" when the last epoch was too short for a steady state. The file is read by grep, one line per
key: no key of ours contains another key's name (`grep ActualFPS` finds one line). No torch import: it runs in
a blink.
"""
import json
import os
import sys

import lifecycle
from cli import ArgumentParser, UserError, run_tool
from plot_metrics import read_metrics  # one reader of metrics.jsonl: the last record of each epoch


def fmt(value, digits=3):
    return "" if value is None else f"{value:.{digits}f}"


def summarize(run, records, mode, e2e_seconds):
    """The summary's key/value pairs, in the reference's order."""
    last = records[-1] if records else {}
    # The steady-state rate; an epoch of no more than --warmup-steps steps has none, and then the whole
    # epoch's rate (all its images over its wall time, warm-up included) is reported, and said to be, rather
    # than an empty field that the original's greps and a user's tooling would read as nothing.
    fps, fps_window = last.get("fps"), "steady state"
    if fps is None and last.get("epoch_fps"):
        fps, fps_window = last["epoch_fps"], "whole epoch, warm-up included"
    accuracy = last.get("val_acc1")
    case = f"{run['network']}_bs{run['batch_size']}_{run['world_size']}p_{mode}"
    summary = {
        "Network": run["network"],
        "RankSize": run["world_size"],
        "BatchSize": run["batch_size"],
        "DeviceType": run["device"],
        "CaseName": case,
        "ActualFPS": fmt(fps, 2),                                               # all ranks
        "TrainingTime": fmt(run["batch_size"] * 1000 / fps, 2) if fps else "",  # ms per global batch
        "TrainAccuracy": fmt(accuracy),                                         # last validation Acc@1
        "ActualLoss": fmt(last.get("last_loss"), 4),                            # last step's training loss
        "E2ETrainingTime": e2e_seconds,
    }
    if mode == "perf":
        summary["CompileTime"] = fmt(records[0].get("first_step_time"), 4) if records else ""  # 1st step, s
    summary["FPSWindow"] = fps_window if fps else ""  # ours, after the original's keys (a name none of them is in)
    return summary


def get_args_parser():
    p = ArgumentParser(description="Write the launchers' summary file from run.json + metrics.jsonl")
    p.add_argument("output_dir", help="main.py's --output-dir (holds run.json and metrics.jsonl)")
    p.add_argument("--mode", choices=["acc", "perf"], default="acc", help="the CaseName suffix")
    p.add_argument("--e2e-seconds", type=int, default=0, help="launcher start to end, in seconds")
    return p


def main(args):
    run_file = os.path.join(args.output_dir, "run.json")
    if not os.path.isfile(run_file):
        raise UserError(f"{run_file}: no such file (the run stopped before training started)")
    with open(run_file) as f:
        run = json.load(f)
    metrics = os.path.join(args.output_dir, "metrics.jsonl")
    records = read_metrics(metrics) if os.path.isfile(metrics) else []
    summary = summarize(run, records, args.mode, args.e2e_seconds)
    print("------------------ Final result ------------------")
    # The original's three lines, exactly (its greps read them), each followed by what its figure is here.
    print(f"Final Performance images/sec : {summary['ActualFPS']}")
    if summary["FPSWindow"] == "steady state":
        print("  (ours: the last epoch's steady-state images/sec over all ranks, data loading included, the summary's "
              "ActualFPS; not the original's formula, and not the run summary's mean FPS over the epochs)")
    elif summary["FPSWindow"]:
        print(f"  (ours: the images/sec of the {summary['FPSWindow']}, over all ranks: the last epoch had no more "
              f"steps than --warmup-steps, so no steady-state figure; not the original's formula)")
    print(f"Final Train Accuracy : {summary['TrainAccuracy']}")
    print("  (the original's name for the last epoch's validation Acc@1)")
    print(f"E2E Training Duration sec : {args.e2e_seconds}")
    path = os.path.join(args.output_dir, f"{summary['CaseName']}.log")
    with open(path, "w") as f:
        f.writelines(f"{key} = {value}\n" for key, value in summary.items())
    print(f"Summary: {path}")
    return 0


if __name__ == "__main__":
    lifecycle.guard_streams()  # `| head`: a closed stdout is one warning, not a traceback; files still written
    sys.exit(run_tool(main, get_args_parser().parse_args(), expected=(OSError, ValueError, KeyError)))
