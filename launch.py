"""Where this process sits in its job: the launcher's environment (torchrun, srun, the Ascend original's
RANK_ID/RANK_SIZE) read into a Launch, with every variable checked; the Slurm specifics (host lists, ports,
tasks per node); restarts; and setup(), which binds the device, gives the rank its CPU share and joins the
process group (comm.py), into the Run that main.py works with.

Nothing here logs through utils (utils imports comm): what must be said before the process group exists is
printed directly."""
import itertools
import os
import re
from dataclasses import dataclass
from typing import Optional


import comm
from cli import UserError

@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, as its launcher described it."""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    style: str  # "torchrun" | "rank_id" (the Ascend original's RANK_ID/RANK_SIZE) | "slurm" (srun) | "single"
    # The rendezvous for init_method env://: MASTER_ADDR/MASTER_PORT when set, else what the launch implies
    # (the original's fixed address for RANK_ID, the job's first node and a port from the job id for Slurm).
    master_addr: Optional[str] = None
    master_port: Optional[str] = None


# The Ascend original's train.py rendezvous, used when RANK_ID/RANK_SIZE launches set no MASTER_ADDR/PORT.
ORIGINAL_MASTER_ADDR, ORIGINAL_MASTER_PORT = "127.0.0.1", "29688"


def launcher_env(distributed_flag=False, node_rank=0, nodes=1, env=None):
    """This process's Launch, from the environment (`env`, default os.environ) alone: no side effects.

    In this order:
    - torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). It comes
      first, so torchrun started by srun or inside an sbatch script is a torchrun launch.
    - The Ascend original starts one process per device by hand with RANK_ID (the device's index on its
      node) and RANK_SIZE (processes per node) and --distributed; on several machines it adds --dist_rank
      (this node's index) and --world-size (the number of nodes), which are `node_rank` and `nodes` here. As
      in the original, RANK_ID/RANK_SIZE count only with --distributed (`distributed_flag`): a RANK_SIZE
      left in the environment of a 1-device run changes nothing.
    - Slurm: a task that srun started (srun sets SLURM_STEP_NUM_TASKS and SLURM_PROCID for each task of a job
      step). The allocation alone never counts: an salloc shell or an sbatch script also has SLURM_NTASKS=8
      (and a batch script even SLURM_PROCID=0), but only one process runs there, so it is a 1-process run.
      For the same reason the world size is the step's SLURM_STEP_NUM_TASKS, the number of tasks srun
      started (SLURM_NTASKS, the same number inside a step, is the allocation's outside one).

    Every variable read must be a whole number in its range (a rank below its world size, ...): anything else
    is a UserError naming the variable and its value, raised before any work -- not a traceback, and not a
    rendezvous that waits --dist-timeout for a rank that cannot exist."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        hint = "torchrun sets it for each process; a value left over in the shell? unset it"
        world = _env_int(env, "WORLD_SIZE", 1, hint=hint)
        rank = _env_int(env, "RANK", 0, world, "WORLD_SIZE", hint)
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", 1, hint=hint) if "LOCAL_WORLD_SIZE" in env else world
        if local_world > world:
            raise UserError(f"LOCAL_WORLD_SIZE={local_world} is more than WORLD_SIZE={world} ({hint})")
        local_rank = _env_int(env, "LOCAL_RANK", 0, local_world,
                              "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else "WORLD_SIZE", hint) \
            if "LOCAL_RANK" in env else rank
        return Launch(rank, local_rank, world, local_world, "torchrun", env.get("MASTER_ADDR"),
                      env.get("MASTER_PORT"))
    if distributed_flag and "RANK_ID" in env and "RANK_SIZE" in env:
        hint = "the original's launch: RANK_SIZE processes per node, RANK_ID this one's device index, from 0"
        per_node = _env_int(env, "RANK_SIZE", 1, hint=hint)
        local_rank = _env_int(env, "RANK_ID", 0, per_node, "RANK_SIZE", hint)
        nodes = nodes or 1
        if not 0 <= node_rank < nodes:
            raise UserError(f"--dist_rank {node_rank} is not a node of --world-size {nodes} (nodes are numbered "
                            f"0..{nodes - 1})")
        return Launch(node_rank * per_node + local_rank, local_rank, nodes * per_node, per_node, "rank_id",
                      env.get("MASTER_ADDR", ORIGINAL_MASTER_ADDR), env.get("MASTER_PORT", ORIGINAL_MASTER_PORT))
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return slurm_launch(env)
    return Launch(0, 0, 1, 1, "single")


def _env_int(env, name, low, high=None, high_name=None, hint=""):
    """env[name] as an integer in [low, high): else a UserError naming the variable, its value and the range,
    e.g. "SLURM_PROCID=2 is out of range for SLURM_STEP_NUM_TASKS=2: it must be 0..1 (srun sets it ...)"."""
    text = env[name]
    try:
        value = int(text.strip())
    except ValueError:
        raise UserError(f"{name}={text!r} is not a whole number ({hint})") from None
    if value < low:
        raise UserError(f"{name}={text.strip()} must be {low} or more ({hint})")
    if high is not None and value >= high:
        limit = f"{high_name}={env[high_name].strip()}" if high_name in env else f"{high_name} {high}"
        raise UserError(f"{name}={value} is out of range for {limit}: it must be {low}..{high - 1} ({hint})")
    return value


def job_of(args):
    """This process's place in its job: launcher_env with the original's --distributed/--dist_rank/--world-size."""
    return launcher_env(args.distributed, args.dist_rank, args.world_size)


def slurm_launch(env):
    """The Launch of an srun task. Rank, local rank and world size are Slurm's; the rendezvous is
    MASTER_ADDR/MASTER_PORT when set, else the step's first node (where srun starts task 0) and
    slurm_port(job id, step id). Every variable read is checked (_env_int)."""
    hint = "srun sets it for each task; set by hand, or left over from another job? unset it, or start with srun"
    world = _env_int(env, "SLURM_STEP_NUM_TASKS", 1, hint=hint)
    rank = _env_int(env, "SLURM_PROCID", 0, world, "SLURM_STEP_NUM_TASKS", hint)
    node_list = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    addr = env.get("MASTER_ADDR")
    if addr is None and node_list:
        addr = expand_hostlist(node_list)[0]
    port = env.get("MASTER_PORT")
    if port is None and "SLURM_JOB_ID" in env:
        step = _env_int(env, "SLURM_STEP_ID", 0, hint=hint) if "SLURM_STEP_ID" in env else 0
        port = str(slurm_port(_env_int(env, "SLURM_JOB_ID", 0, hint=hint), step))
    per_node_name = "SLURM_STEP_TASKS_PER_NODE" if env.get("SLURM_STEP_TASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
    per_node = tasks_per_node(env.get(per_node_name, ""))
    node = _env_int(env, "SLURM_NODEID", 0, hint=hint) if "SLURM_NODEID" in env else 0
    if per_node and node >= len(per_node):
        raise UserError(f"SLURM_NODEID={node} is out of range for {per_node_name}={env[per_node_name]}: it must be "
                        f"0..{len(per_node) - 1} ({hint})")
    local_world = per_node[node] if per_node else world
    local_rank = _env_int(env, "SLURM_LOCALID", 0, local_world, per_node_name if per_node else
                          "SLURM_STEP_NUM_TASKS", hint) if "SLURM_LOCALID" in env else 0
    return Launch(rank, local_rank, world, local_world, "slurm", addr, port)


# Steps of one job are spread over the port range by this prime: step s of job j never takes the port of step 0
# of a job less than ~400 ids away (job arrays and a user's consecutive jobs share nodes), for s < 10.
STEP_PORT_STRIDE = 7919


def slurm_port(job_id, step_id=0):
    """The rendezvous port of a Slurm job step without MASTER_PORT: 10000 + (job id + 7919 x step id) % 20000,
    so 10000-29999. Every task of the step computes the same one; two steps of one job (two sruns running
    side by side in one allocation) differ; two jobs sharing a node differ unless their ids are 20000 apart
    (for step 0, the usual one, the port is 10000 + job id % 20000); and it stays below Linux's ephemeral
    ports (32768 and up), which outgoing connections take."""
    return 10000 + (job_id + STEP_PORT_STRIDE * step_id) % 20000


def tasks_per_node(text):
    """Slurm's SLURM_STEP_TASKS_PER_NODE, one entry per node: "8(x2),4" -> [8, 8, 4]."""
    counts = []
    for item in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            return []  # not Slurm's form: the caller falls back to the world size
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


# One host name of a Slurm node list: text and bracketed ranges ("gpu[01-04,07]", "rack[0-1]_blade[0-1]").
_HOST = r"(?:[^,\s\[\]]|\[[^\[\]]*\])+"


def expand_hostlist(text):
    """Slurm's compressed host list as host names, in Slurm's order.

    Slurm writes node lists (SLURM_JOB_NODELIST, SLURM_STEP_NODELIST) as host names or bracketed ranges
    separated by commas (or white space): "gpu[01-04,07]" is gpu01..gpu04 and gpu07 (zero padding kept: the
    width of a range is its first number's), "n[8-10]" is n8, n9, n10, and a name may hold several bracketed
    groups ("rack[0-1]_blade[0-1]": rack0_blade0, rack0_blade1, rack1_blade0, rack1_blade1) or text after one
    ("gpu[1-2]-ib"). `scontrol show hostnames` does the same on a node with Slurm installed."""
    if not re.fullmatch(rf"[\s,]*(?:{_HOST}[\s,]*)+", text):
        raise UserError(f"cannot read the Slurm node list {text!r}; set MASTER_ADDR to the first node's address")
    hosts = []
    for name in re.findall(_HOST, text):
        choices = [_expand_ranges(part[1:-1], text) if part.startswith("[") else [part]
                   for part in re.split(r"(\[[^\]]*\])", name) if part]
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    return hosts


def _expand_ranges(ranges, text):
    """"01-04,07" -> ["01", "02", "03", "04", "07"]."""
    values = []
    for item in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise UserError(f"cannot read the Slurm node list {text!r} (at [{ranges}]); set MASTER_ADDR to the "
                            f"first node's address")
        low, high = m.group(1), m.group(2) or m.group(1)
        values += [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]
    return values


def restart_count():
    """How many times the launcher has started this job again: torchrun --max-restarts
    (TORCHELASTIC_RESTART_COUNT) or a Slurm requeue (SLURM_RESTART_COUNT); 0 for a first start. A restarted job
    resumes by itself (--resume auto) in the folder its first start chose (rundir.own_run)."""
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


# ----------------------------------------------------------------------------
# This process's place: the Run
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """What this process is, worked out once from the arguments and the launcher; never changes."""
    device: object                # device.Device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    local_batch: int = 128
    workers: int = 0
    workers_from: str = ""        # where `workers` came from, for the log: "SLURM_CPUS_PER_TASK=12", "--workers 8"
    channels_last: bool = False
    resume: str = ""              # --resume, or "auto" in a job its launcher started again

    @property
    def distributed(self):
        return self.world_size > 1


def setup(args, job, log=print):
    """Join the launcher's job, bind this process's device and configure it; the Run. The output folder rank 0
    chose (main.preflight) is sent to the other ranks (they need it only to save after losing rank 0)."""
    import device as device_lib  # (device.py imports nothing of ours but cli; here to keep launch's imports light)
    if args.distributed and job.style == "single":
        raise UserError("--distributed needs a launcher: torchrun (sets RANK, LOCAL_RANK, WORLD_SIZE), srun (one "
                        "task per device), the original's RANK_ID and RANK_SIZE per process, or "
                        "test/train_full_8p.sh")
    slurm_tasks = os.environ.get("SLURM_NTASKS", "")
    if job.style == "single" and slurm_tasks.isdigit() and int(slurm_tasks) > 1:  # salloc/sbatch: srun starts tasks
        log(f"Note: this Slurm allocation has SLURM_NTASKS={slurm_tasks}, but this process was not started by srun: "
            f"running as 1 process (`srun python main.py ...` runs {slurm_tasks} together)")
    distributed = job.world_size > 1
    device_ids = device_lib.parse_device_ids(args.device_ids)
    if not distributed and args.device_id is not None:
        device_ids = [args.device_id]
    device = device_lib.resolve_device(args.device, job.local_rank, device_ids)
    device_lib.configure_backends(device, args.deterministic)
    share = default_workers(job.local_world_size, launcher=job.style)  # (workers, where that number came from)
    device_lib.set_threads_per_rank(device, share[0] + 1)  # this rank's CPUs: the node's, or the srun task's own
    if distributed:
        if args.sync_bn:
            device_lib.check_sync_bn(device)
        backend = args.dist_backend or device.dist_backend
        device_lib.prepare_collectives(backend)
        join(job, device, backend, args)
        args.output_dir = comm.broadcast_from_main(args.output_dir)
    # --workers is per machine, shared among its ranks (the original's rule: ceil(workers / ranks per node)).
    workers, workers_from = share if args.workers is None else \
        (-(-args.workers // job.local_world_size), f"--workers {args.workers}" + (
            f" / {job.local_world_size} ranks on this node" if job.local_world_size > 1 else ""))
    return Run(device=device, rank=job.rank, local_rank=job.local_rank, world_size=job.world_size,
               local_world_size=job.local_world_size, local_batch=args.batch_size // job.world_size,
               workers=workers, workers_from=workers_from, resume=args.resume or ("auto" if restart_count() else ""),
               channels_last=device.channels_last_default if args.channels_last is None else args.channels_last)


def join(job, device, backend, args):
    """comm.init_distributed for this job; a taken rendezvous port of a Slurm task is worded for Slurm."""
    try:
        # The control group waits as long as a peer may wait for a batch, plus the usual timeout.
        comm.init_distributed(job, device, backend, args.dist_url, args.dist_timeout,
                              control_timeout_s=args.dist_timeout + (args.data_timeout or 0))
    except comm.PortInUse as e:
        if job.style != "slurm":
            raise
        # Rank 0 hosts the rendezvous: besides another job, a second task that also says it is rank 0 (a
        # SLURM_PROCID set by hand in the command srun runs, or a task of another step given the same variables)
        # finds the port taken by the first.
        raise UserError(f"the rendezvous port {e.port} is already in use on this machine, and this task "
                        f"(SLURM_PROCID={job.rank}) must host it: another task claims rank {job.rank} too and holds "
                        f"the rendezvous (is SLURM_PROCID set by hand? srun gives each task its own), or another "
                        f"job or a run still exiting holds the port; otherwise set MASTER_PORT to a free port "
                        f"(Slurm launches without it use 10000 + (SLURM_JOB_ID + {STEP_PORT_STRIDE} x "
                        f"SLURM_STEP_ID) % 20000)") from None


def default_workers(local_world_size=1, env=None, launcher="single"):
    """(loader workers for this process, where that number came from): the CPUs that are this process's
    share, minus one for the trainer itself. No fixed cap: a 16-core single-GPU box needs ~15 decoders to feed
    DenseNet-201 at bf16.

    The share depends on who started the process (`launcher`, a Launch.style):
    - an srun task ("slurm") has a share of its own: SLURM_CPUS_PER_TASK when set (--cpus-per-task: what
      Slurm allocated to each task), else its CPU affinity when srun bound it to fewer CPUs than the node
      has for the job (SLURM_CPUS_ON_NODE, else the machine's); never more than its affinity. A task that
      srun did not bind (it sees all the job's CPUs on the node, as with a cgroup alone) shares them with the
      other tasks on its node;
    - ranks that one launcher started (torchrun, the original's RANK_ID, a single process) inherit one
      affinity: its CPUs are shared by the local_world_size ranks on the machine. (SLURM_CPUS_PER_TASK is
      then the launcher's task's share, which the affinity already reflects, and not this process's.)
    Dividing the node's CPUs by its ranks under srun gave 8 tasks bound to 12 CPUs each 12 // 8 - 1 = 0
    workers. `env`: default os.environ; a SLURM_CPUS_PER_TASK or SLURM_CPUS_ON_NODE that is no positive
    integer is a UserError."""
    env = os.environ if env is None else env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = max(1, local_world_size)
    shared = (max(0, cores // ranks - 1), f"{_cpus(cores)} / {ranks} {'tasks' if launcher == 'slurm' else 'ranks'} "
                                          f"on this node" if ranks > 1 else _cpus(cores))
    if launcher != "slurm":
        return shared
    if "SLURM_CPUS_PER_TASK" in env:
        per_task = _env_int(env, "SLURM_CPUS_PER_TASK", 1, hint="srun's --cpus-per-task: the CPUs of each task")
        if per_task <= cores:
            return per_task - 1, f"SLURM_CPUS_PER_TASK={per_task}"
        return cores - 1, f"SLURM_CPUS_PER_TASK={per_task}, but this task is bound to {_cpus(cores)}"
    if "SLURM_CPUS_ON_NODE" in env:
        node = _env_int(env, "SLURM_CPUS_ON_NODE", 1, hint="Slurm's CPUs for the job on this node")
        of = f"{node} for the job on this node"
    else:
        node = os.cpu_count() or cores
        of = f"{node}"
    if cores < node:
        return cores - 1, f"this task is bound to {_cpus(cores)} of {of}"
    return shared


def _cpus(n):
    return f"{n} CPU{'s' if n != 1 else ''}"
