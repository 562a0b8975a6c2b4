"""The benchmark's sections that spawn ranks on this host: scaling (ours by batch size, resolution, and 1 vs N
processes under DDP) and control (the per-boundary stop agreement of the epoch loop, stop.Stop.agreement, against
a DDP step). See benchmark.py's docstring."""
import json
import os
import socket
import statistics
import tempfile
import time

import torch

import device as device_lib
import comm
import launch as launch_lib
from bench_core import Config, OursSpec, fmt_mib, fmt_rates, ints, measure, ours_step_fn, out, record, synthetic_batch
from stop import Stop


def _join_job(rank, world, port, args):
    """A spawned rank joins a `world`-rank job on this host as main.py joins its job; returns its device."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    device = device_lib.resolve_device(args.device, rank)
    device_lib.configure_backends(device, deterministic=False)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.parent_threads // world))  # the same cores, split between ranks
    comm.init_distributed(launch_lib.launcher_env(), device, device.dist_backend)
    return device


def _ddp_step_fn(rank, world, device, args):
    """One DDP training step of ours, at the global batch -b split over the ranks."""
    local = args.batch_size // world
    spec = OursSpec(device, args, local, distributed=True, world_size=world)
    return ours_step_fn(spec.build(), spec.args, synthetic_batch(local, args.image_size, seed=args.seed + rank,
                                                                  pin_memory=device.is_accelerator))


def _ddp_step_rates(rank, world, device, args, step=None):
    """Global img/s of each timed window of ours under DDP, at the global batch -b split over the ranks."""
    import torch.distributed as dist
    step = step or _ddp_step_fn(rank, world, device, args)
    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.windows):
        device.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        device.synchronize()
        dist.barrier()
        rates.append(args.batch_size * args.steps / (time.perf_counter() - start))  # global img/s
    return rates


def _scaling_worker(rank, world, port, args, result_path):
    device = _join_job(rank, world, port, args)
    rates = _ddp_step_rates(rank, world, device, args)
    if rank == 0:
        with open(result_path, "w") as f:
            f.write(",".join(str(r) for r in rates))
    comm.cleanup_distributed()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_scaling(args, device, memory):
    out(f"== scaling: ours, {args.model}, synthetic, {device.describe()} ==")
    results = {}
    pin = device.is_accelerator
    groups = [(f"batch size (at {args.image_size}px)", [(f"batch {b:<4}", b, args.image_size)
                                                         for b in ints(args.scaling_batches)]),
              (f"resolution (batch {args.batch_size})", [(f"{r}px    ", args.batch_size, r)
                                                       for r in ints(args.scaling_sizes)])]
    for title, cases in groups:
        out(f"  {title}:")
        configs = []
        for label, b, size in cases:
            spec = OursSpec(device, args, b)
            batch = synthetic_batch(b, size, seed=args.seed, pin_memory=pin)
            configs.append(Config(label, lambda spec=spec, batch=batch: ours_step_fn(spec.build(), spec.args, batch),
                                  b, dict(batch=b, image_size=size, precision=spec.precision, layout=spec.layout)))
        rates = measure(configs, device, memory, args.warmup, args.steps, args.windows)
        for c in configs:
            if c.label in rates:
                results[(title, c.label)] = rates[c.label]
                out(f"    {c.label} {fmt_rates(rates[c.label])}{fmt_mib(c.peak_mib)}")
                record(f"scaling {title}: {c.label.strip()}", "scaling", rates[c.label], kind="ours",
                       peak_memory_mib=None if c.peak_mib is None else round(c.peak_mib, 1), **c.fields)
            c.step = None
        del configs, c
        memory.release()
    out(f"  processes (global batch {args.batch_size}, {args.image_size}px; DDP, {device.dist_backend}; "
        f"CPU threads split between processes):")
    args.parent_threads = torch.get_num_threads()
    for world in ints(args.scaling_procs):
        text = _run_ranks(_scaling_worker, world, args, device, f"    {world} processes")
        if text is None:
            continue
        rates = [float(x) for x in text.split(",")]
        results[("procs", world)] = rates
        out(f"    {world} process{'es' if world > 1 else '  '} {fmt_rates(rates)}  (global)")
        record(f"scaling processes: {world}", "scaling", rates, kind="ours", processes=world,
               batch=args.batch_size, image_size=args.image_size)
    return results


def _run_ranks(worker, world, args, device, label):
    """worker(rank, world, port, args, result_path) on `world` spawned ranks of this host; the text rank 0
    wrote to result_path, or None (said after `label`) when the batch or the devices do not allow `world`."""
    if args.batch_size % world:
        out(f"{label}: skipped (batch {args.batch_size} does not divide)")
        return None
    if device.is_accelerator and device.module().device_count() < world:
        out(f"{label}: skipped (only {device.module().device_count()} {device.type} devices)")
        return None
    import torch.multiprocessing as mp
    with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as f:
        path = f.name
    try:
        mp.spawn(worker, args=(world, free_port(), args, path), nprocs=world, join=True)
        with open(path) as f:
            return f.read()
    finally:
        os.unlink(path)


def _control_worker(rank, world, port, args, result_path):
    device = _join_job(rank, world, port, args)
    local = args.batch_size // world  # what each rank brings to a boundary: its batch
    stop = Stop()  # installs the training run's signal handlers: put back below
    try:
        with stop.running():
            calls = agreement_latencies(stop, local, args.batch_size, args.control_calls)
            step = _ddp_step_fn(rank, world, device, args)  # the training step it is paid on
            rates = _ddp_step_rates(rank, world, device, args, step)
            blocking, overlapped = agreement_costs(stop, local, step, max(args.steps, 5))
    finally:
        stop.restore()
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"calls_s": calls, "rates": rates, "blocking_s": blocking, "overlapped_s": overlapped}, f)
    comm.cleanup_distributed()


def agreement_latencies(stop, local, global_batch, calls):
    """Seconds of each of `calls` agreements, started and waited for back to back after a warm-up: the
    collective's own latency (comm.sum_async of the Stop's five int64 on the gloo control group, and
    comm.wait's polling for it)."""
    for _ in range(50):
        agreed = stop.agreement(local)()
    if (agreed.skip, agreed.images, agreed.code) != (False, global_batch, None):
        raise RuntimeError(f"the agreement summed to {agreed}, expected {global_batch} images, no skip, no stop")
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        stop.agreement(local)()
        seconds.append(time.perf_counter() - start)
    return seconds


def agreement_costs(stop, local, step, steps):
    """What a training step pays for the agreement, both ways, between training steps as in the loop: blocking
    (started and waited for after the step) and as engine.train_one_epoch runs it, started a step ahead and read
    after the step computed -- the start plus the wait for a result that is (nearly always) already there.
    Returns ([blocking seconds], [overlapped seconds]), one per step."""
    blocking, overlapped = [], []
    for _ in range(steps):
        step()
        start = time.perf_counter()
        stop.agreement(local)()
        blocking.append(time.perf_counter() - start)
    for _ in range(steps):
        start = time.perf_counter()
        agreed = stop.agreement(local)
        launched = time.perf_counter() - start
        step()
        start = time.perf_counter()
        agreed()
        overlapped.append(launched + time.perf_counter() - start)
    return blocking, overlapped


def section_control(args, device):
    out(f"== control: stop.Stop.agreement (the per-step stop/small-batch agreement) vs a DDP step of ours, "
        f"{args.model} {args.image_size}px, global batch {args.batch_size}, {device.describe()} ==")
    if device.is_accelerator:
        out("  (the collective runs on the gloo side group, over the host, whatever the device)")
    args.parent_threads = torch.get_num_threads()
    results = {}
    for world in ints(args.control_procs):
        text = _run_ranks(_control_worker, world, args, device, f"  {world} ranks")
        if text is not None:
            results[world] = report_control(args, world, json.loads(text))
    return results


def report_control(args, world, measured):
    """Print and record one rank count's control measurements; (median agreement us, step s)."""
    calls = sorted(measured["calls_s"])
    median_us = statistics.median(calls) * 1e6
    p90_us = calls[int(0.9 * (len(calls) - 1))] * 1e6
    step_s = args.batch_size / statistics.median(measured["rates"])
    share = median_us * 1e-6 / step_s
    blocking_us = statistics.median(measured["blocking_s"]) * 1e6
    overlapped_us = statistics.median(measured["overlapped_s"]) * 1e6
    out(f"  {world} ranks: agreement median {median_us:8.1f} us, p90 {p90_us:8.1f} us ({len(calls)} calls); "
        f"step {step_s * 1e3:9.1f} ms (median of {len(measured['rates'])} windows); "
        f"one call per step = {100 * share:.4f}% of the step")
    out(f"    between steps (median of {len(measured['blocking_s'])} steps): blocking {blocking_us:.1f} us "
        f"({100 * blocking_us * 1e-6 / step_s:.4f}% of a step); started a step ahead, as the epoch loop runs it: "
        f"{overlapped_us:.1f} us ({100 * overlapped_us * 1e-6 / step_s:.4f}%)")
    record(f"control: agreement, {world} ranks", "control", measured["rates"], kind="ours", processes=world,
           batch=args.batch_size, image_size=args.image_size, agreement_median_us=round(median_us, 2),
           agreement_p90_us=round(p90_us, 2), agreement_calls=len(calls), step_s=round(step_s, 6),
           blocking_between_steps_median_us=round(blocking_us, 2), overlapped_median_us=round(overlapped_us, 2),
           agreement_share_of_step=share)
    return median_us, step_s
