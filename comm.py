"""Talking to the other ranks: joining the process group (and the gloo control group for small host-side
messages), the collectives the trainer uses (the per-boundary agreement, barriers after saves, metric sums, the
resume checkpoint, RNG states, checks that ranks agree), and a lost peer as one line (PeerLost).

Collectives wait in short sleeps or in a helper thread, never in one blocking C++ call, so that the main thread
stays able to run a signal handler (stop.py) while a peer is slow. Where this process sits in its job (torchrun,
srun, the original's RANK_ID) is launch.py."""
import contextlib
import datetime
import os
import socket
import threading
import time

import torch
import torch.distributed as dist

from cli import UserError

# Small host-side messages (stop requests, skipped steps, resume state, RNG states) go over a gloo group of
# their own: on GPU/NPU they then cost no device synchronisation and never queue behind DDP's all-reduces.
_control_group = None


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def init_distributed(launch, device, backend, dist_url="env://", timeout_s=600, control_timeout_s=None):
    """Join the process group of `launch` and create the gloo control group (its collectives time out after
    `control_timeout_s`, default `timeout_s`: a peer waiting for a slow batch must not look lost). The join
    runs interruptibly: a signal during the rendezvous stops the process at once, not after --dist-timeout.

    The rendezvous: torchrun's store under torchrun; otherwise init_method `dist_url`, where env:// means
    MASTER_ADDR/MASTER_PORT, or what the launch implies when they are unset (the original's fixed
    127.0.0.1:29688 for RANK_ID launches; the first node and a port from the job id for Slurm)."""
    addr = launch.master_addr or os.environ.get("MASTER_ADDR")
    port = launch.master_port or os.environ.get("MASTER_PORT")
    if dist_url == "env://":
        if not (addr and port) and launch.style == "torchrun":
            # torchrun always sets both (and TORCHELASTIC_RUN_ID): RANK/WORLD_SIZE without them are left over in
            # the shell from another launch, and joining would only wait --dist-timeout for peers that never come.
            raise UserError(f"RANK={launch.rank} and WORLD_SIZE={launch.world_size} are set but MASTER_ADDR/"
                            f"MASTER_PORT are not, so this is no torchrun launch: unset RANK and WORLD_SIZE to run "
                            f"one process (they look left over from another launch), or start with torchrun")
        if not (addr and port):
            raise UserError("an srun task without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST or SLURM_JOB_ID: set "
                            "MASTER_ADDR (the first node's address) and MASTER_PORT")
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    timeout = datetime.timedelta(seconds=timeout_s)
    init_kwargs = {}
    if device.is_accelerator and backend == "nccl":
        # Binds the communicator eagerly to our GPU. Only for NCCL: a default group bound to an NPU makes every
        # later group (our gloo control group included) look for a backend for "npu", and gloo has none.
        init_kwargs["device_id"] = device.torch_device
    where = f"{addr}:{port}" if dist_url == "env://" else dist_url
    if launch.rank == 0 or launch.style != "torchrun":
        # Before a join that can wait for --dist-timeout: a launch missing its peers must not look hung.
        print(f"Joining the process group: rank {launch.rank} of {launch.world_size}, {backend}, rendezvous at "
              f"{where} (waiting up to {timeout_s} s for all {launch.world_size} processes)", flush=True)
    try:
        if dist_url == "env://" and "TORCHELASTIC_RESTART_COUNT" in os.environ:  # under torchrun
            init_kwargs["store"] = elastic_attempt_store(launch.rank, launch.world_size, timeout)
        else:
            init_kwargs["init_method"] = dist_url
        interruptibly(dist.init_process_group, backend=backend, rank=launch.rank, world_size=launch.world_size,
                      timeout=timeout, **init_kwargs)
        global _control_group
        _control_group = interruptibly(dist.new_group, backend="gloo", timeout=datetime.timedelta(
            seconds=control_timeout_s or timeout_s))
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "EADDRINUSE" in message or "address already in use" in message.lower():  # rank 0 hosts the store
            port = port if dist_url == "env://" else dist_url.rsplit(":", 1)[-1]
            raise PortInUse(port, f"the rendezvous port {port} is already in use on this machine (another job, or a "
                                  f"run still exiting): set MASTER_PORT to a free port") from None
        raise UserError(f"could not join the process group ({backend}, {where}, rank {launch.rank}/"
                        f"{launch.world_size}): {message}") from None


class PortInUse(UserError):
    """The rendezvous port is taken (rank 0 hosts the store there); launch.setup words it for its launcher."""

    def __init__(self, port, message):
        super().__init__(message)
        self.port = port


def elastic_attempt_store(rank, world_size, timeout):
    """The rendezvous store for this torchrun attempt, with its own key namespace.

    torchrun's static rendezvous (--master_addr/--master_port) keeps one TCPStore for the whole job. After
    a --max-restarts restart, the keys that init_process_group wrote in the failed attempt (each rank's
    address, barrier counters) are still there: the new ranks would read a dead peer's address and fail to
    connect, or pass a barrier early. Prefixing the keys with the attempt number gives every attempt a clean
    store, whichever rendezvous torchrun used."""
    env = os.environ
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    agent_hosts_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves it
    store = dist.TCPStore(host, port, world_size, is_master=not agent_hosts_store and rank == 0,
                          timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"/attempt_{env['TORCHELASTIC_RESTART_COUNT']}/", store)


def cleanup_distributed():
    global _control_group
    if is_dist():
        dist.destroy_process_group()
    _control_group = None


class PeerLost(Exception):
    """A collective failed: a peer died, hung past the timeout, or the network dropped. str() is one line that
    names the lost rank when it can be told (a rank on this machine whose process is gone). position: (epoch,
    steps done) when it happened during training (set by engine.train_one_epoch), else None."""
    position = None


# Words of the errors gloo, NCCL and HCCL raise when a peer is gone (DistError is torch's own type for them).
PEER_FAILURE_WORDS = ("connection reset", "connection closed", "broken pipe", "connection refused", "timed out",
                      "timeout", "nccl", "hccl", "gloo")


def is_peer_failure(error):
    """Whether an exception from a collective (or a DDP step) means a peer failed."""
    text = str(error).lower()
    return isinstance(error, (dist.DistError, PeerLost)) or any(w in text for w in PEER_FAILURE_WORDS)


def lost_peer(error, where):
    """The PeerLost for `error`, raised at `where` ("epoch 2 step 141")."""
    if isinstance(error, PeerLost):
        return error
    time.sleep(0.5)  # a peer that failed has usually exited by now, and its launcher has reaped it: it can be named
    gone = lost_peers()
    who = f"lost rank {', '.join(map(str, gone))}" if gone else "lost a peer (on another machine, or it hung)"
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return PeerLost(f"{who} at {where} ({detail})")


@contextlib.contextmanager
def collective(where, position=None):
    """Around collectives: a peer failure becomes PeerLost (one line; `position`: where training stands, when
    the state then is worth saving), anything else passes."""
    try:
        yield
    except Exception as e:
        if is_dist() and is_peer_failure(e):
            lost = lost_peer(e, where)
            lost.position = lost.position or position
            raise lost from None
        raise


def wait(work):
    """work.wait() in short sleeps rather than one call: Python runs signal handlers only between the main
    thread's bytecodes, so a gloo wait blocked in C++ would hold a SIGTERM back for as long as a peer is slow."""
    pause = 0.0001
    while not work.is_completed():
        time.sleep(pause)
        pause = min(pause * 1.5, 0.005)
    work.wait()  # raises the collective's error, if any


def sum_async(values, convert=list, where="a step boundary"):
    """Sum a list of host integers over all ranks, started now: a function that waits for the result and returns
    convert(sums). The small collective then runs while the caller works (a training step), off its critical
    path. `where`: what a PeerLost says the ranks were doing ("epoch 2 step 141")."""
    if not is_dist():
        return lambda: convert(list(values))  # (no tensor: nothing here could be a device sync)
    t = torch.tensor(values, dtype=torch.int64)
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_control_group, async_op=True)

    def result():
        with collective(where):
            wait(work)
        return convert(t.tolist())
    return result


def any_rank(*flags):
    """A tuple: for each flag, True on every rank if it is true on any rank (one small collective for all)."""
    return tuple(x > 0 for x in sum_async([int(bool(f)) for f in flags])())


def interruptibly(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a helper thread while the main thread waits in short slices, so that a signal
    handler can run (and raise) meanwhile: a rendezvous or a collective blocked in C++ would otherwise hold a
    SIGTERM back until it returns, up to --dist-timeout when a peer never comes."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    outcome = {}

    def target():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the main thread as it is
            outcome["error"] = e

    helper = threading.Thread(target=target, name=getattr(fn, "__name__", "collective"), daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.05)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def rank0_writes(write, what, where="a save"):
    """Rank 0 runs write() (a file write that may raise UserError); then a barrier that is also the outcome:
    every rank learns whether it succeeded, so no rank goes on, or exits, before the file is durable, and a
    failed write stops every rank with one line. `where`: as for sum_async."""
    error = None
    if is_main_process():
        try:
            write()
        except UserError as e:
            error = e
    (failed,) = sum_async([int(error is not None)], where=where)()
    if error is not None:
        raise error
    if failed:
        raise UserError(f"rank 0 could not write {what} (its log says why)")


def gather_all(obj):
    """[rank 0's obj, rank 1's, ...] on every rank."""
    if not is_dist():
        return [obj]
    everyone = [None] * get_world_size()
    with collective("gathering every rank's state"):
        dist.all_gather_object(everyone, obj, group=_control_group)
    return everyone


_peers = []  # (host, pid) of every rank, to name a rank that died (lost_peers)


def record_peers():
    """Learn every rank's host and pid (one collective at start-up)."""
    global _peers
    if is_dist():
        _peers = [None] * get_world_size()
        interruptibly(dist.all_gather_object, _peers, (socket.gethostname(), os.getpid()), group=_control_group)


def lost_peers():
    """The ranks on this machine whose process is gone (after a collective failed); [] if none can be told."""
    return [rank for rank, alive in _local_peers() if not alive]


def living_ranks_below(rank):
    """The ranks below `rank` on this machine whose process still runs (ranks elsewhere cannot be seen)."""
    return [r for r, alive in _local_peers() if alive and r < rank]


def _local_peers():
    """(rank, whether its process still runs) for the other ranks on this machine (record_peers)."""
    host = socket.gethostname()
    for rank, (peer_host, pid) in enumerate(_peers):
        if peer_host == host and pid != os.getpid():
            try:
                os.kill(pid, 0)
                yield rank, True
            except ProcessLookupError:
                yield rank, False
            except OSError:
                yield rank, True  # it exists (another user's process: a pid reused)


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (a picklable object; tensors travel on the CPU)."""
    if not is_dist():
        return obj
    box = [obj if is_main_process() else None]
    with collective("receiving rank 0's state"):
        interruptibly(dist.broadcast_object_list, box, src=0, group=_control_group)
    return box[0]


def gather_to_main(obj):
    """[rank 0's obj, rank 1's, ...] on rank 0; None on the others."""
    if not is_dist():
        return [obj]
    gathered = [None] * get_world_size() if is_main_process() else None
    with collective("gathering every rank's state"):
        dist.gather_object(obj, gathered, dst=0, group=_control_group)
    return gathered


def check_ranks_agree(values):
    """Raise UserError on every rank unless every rank passed equal `values` (a dict: name -> value).

    Ranks started by hand (the original's RANK_ID launch, one command per node) can be given different
    flags or data sets; DDP would then fail with an internal traceback, or worse train on silently (another
    --batch-size). The one line names the first differing name and each rank's value, e.g.
    "ranks disagree on --batch-size: rank 0 has 16; rank 1 has 8"."""
    if not is_dist():
        return
    everyone = [None] * get_world_size()
    interruptibly(dist.all_gather_object, everyone, values, group=_control_group)
    for name in values:
        by_rank = [theirs.get(name) for theirs in everyone]
        if any(value != by_rank[0] for value in by_rank):
            raise UserError(f"ranks disagree on {name}: {_values_by_rank(by_rank)}")


def _values_by_rank(by_rank):
    """[16, 8, 16] -> "ranks 0,2 have 16; rank 1 has 8" (ranks with the same value together, first seen first)."""
    groups = {}
    for rank, value in enumerate(by_rank):
        groups.setdefault(repr(value), (value, []))[1].append(rank)
    return "; ".join(f"rank {ranks[0]} has {value}" if len(ranks) == 1 else
                     f"ranks {_rank_ranges(ranks)} have {value}" for value, ranks in groups.values())


def _rank_ranges(ranks):
    """[0, 1, 2, 5] -> "0-2,5"."""
    spans = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(values, op="sum"):
    """Sum (max, min) a list of host numbers over all ranks, in float64 on the host: image counts stay exact,
    and no device needs float64 (Ascend NPUs and HCCL have none)."""
    t = torch.tensor(values, dtype=torch.float64)
    if is_dist():
        with collective("summing metrics over the ranks"):
            wait(dist.all_reduce(t, op=REDUCE_OPS[op], group=_control_group, async_op=True))
    return t.tolist()
