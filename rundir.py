"""The run's folder: where it is (--output-dir, or a new output/train/<time>-<model>), its lock (one run at a
time, and never another run's files), and what a run writes there besides checkpoints: metrics.jsonl (one row
per evaluated epoch) and run.json (what the run is). Rank 0 alone creates, locks and writes it.
Every write failure is a one-line UserError."""
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import stat
import time

import comm
import launch
import utils
from checkpoint import replacing, resumable_checkpoint_files
from cli import UserError, describe_os_error


def remove_stale_temp_files(folder):
    """Delete temporary checkpoint files left by a process killed mid-write (they are never valid checkpoints)."""
    if not folder or not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp") and (".pth." in name or name.startswith(".run.json.")):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


# ----------------------------------------------------------------------------
# The output folder: one run at a time, and never another run's files
# ----------------------------------------------------------------------------

RUN_FILES = ("checkpoint.pth", "model_best.pth", "metrics.jsonl")

# Where a run without --output-dir goes (relative to the current folder), one new folder per run, as timm's
# output/train/<time>-<model>: a plain `python main.py` never fills the folder it is started from.
DEFAULT_OUTPUT_ROOT = os.path.join("output", "train")


def resolve_output_dir(output_dir, model, resume_auto, is_rank0, root=DEFAULT_OUTPUT_ROOT):
    """(the run's output folder, a line saying where it is or None): --output-dir as given, else a folder of
    its own under `root`: in a job that torchrun or Slurm started again, the folder this job chose at its first
    start (its lock file names the job: own_run); with --resume auto the newest run of `model` there that holds a
    checkpoint; else a new <YYYYmmdd-HHMMSS>-<model> (-1, -2, ... when that exists). Nothing is created here.

    Only rank 0 decides (main.setup sends its folder to the other ranks)."""
    if output_dir is not None:
        return output_dir, None
    if not is_rank0:
        return root, None
    job = job_identity()
    if job and launch.restart_count():
        found = own_run(root, model, job)
        if found:
            return found, f"Output: {found} (this job's run, restarted: {job})"
    elif resume_auto:
        found = newest_run(root, model)
        if found:
            return found, f"Output: {found} (--resume auto: the newest {model} run under {root})"
    base = os.path.join(root, time.strftime("%Y%m%d-%H%M%S") + f"-{model}")
    path, n = base, 0
    while os.path.lexists(path):
        n += 1
        path = f"{base}-{n}"
    return path, (f"Output: {path} (no --output-dir given: a new folder for this run" +
                  ("; --resume auto found no earlier run of " + model if resume_auto else "") + ")")


def job_identity():
    """What names this job across its restarts, or None for a process started by hand: torchrun's agent (its
    host, pid and start time: the agent lives for the whole job while it restarts the workers), or the Slurm
    job id (a requeued job keeps it)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        agent = os.getppid()
        try:
            with open(f"/proc/{agent}/stat") as f:
                started = f.read().rsplit(")", 1)[1].split()[19]  # field 22, starttime
        except (OSError, IndexError):
            started = "?"
        return f"torchrun agent {socket.gethostname()}:{agent}:{started}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm job {env['SLURM_JOB_ID']}"
    return None


def own_run(root, model, job):
    """The <time>-<model>[-n] folder under `root` whose lock file names `job`, or None."""
    for name in sorted(os.listdir(root) if os.path.isdir(root) else [], reverse=True):
        if RUN_NAME.match(name) and name.split("-", 2)[2].startswith(model):
            with contextlib.suppress(OSError), open(os.path.join(root, name, ".lock")) as f:
                if f"job: {job}" in f.read().splitlines():
                    return os.path.join(root, name)
    return None


RUN_NAME = re.compile(r"^\d{8}-\d{6}-")


def newest_run(root, model):
    """The newest <time>-<model>[-n] folder under `root` holding a checkpoint to resume, or None."""
    pattern = re.compile(rf"^(\d{{8}}-\d{{6}})-{re.escape(model)}(?:-(\d+))?$")
    runs = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = pattern.match(name)
        if m and resumable_checkpoint_files(os.path.join(root, name)):
            runs.append((m.group(1), int(m.group(2) or 0), name))
    return os.path.join(root, max(runs)[2]) if runs else None


def prepare_output_dir(output_dir, overwrite, resume, test_only, restarted):
    """Rank 0, before any work (the dataset scan, the model): the output folder exists, is writable, is not
    in use by another run (its lock is taken here and held for the whole run), and holds no other run's files
    that this run would replace. --test-only writes nothing: it only needs the folder to read from."""
    if test_only:
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {output_dir}: cannot create ({describe_os_error(e)})") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"--output-dir {output_dir}: not writable")
    refuse_if_busy(output_dir)  # first: a running run's folder is "in use", whatever files it holds
    if not restarted:  # (a job torchrun started again: the folder is this job's own)
        if not resume:
            check_fresh_output_dir(output_dir, overwrite)
        elif resume == "auto" and not resumable_checkpoint_files(output_dir):
            check_fresh_output_dir(output_dir, overwrite, nothing_to_resume=True)
    lock_output_dir(output_dir)  # after the checks: a refused run changes nothing in the folder


class OutputLock:
    """An exclusive lock on --output-dir for the whole run (flock: the kernel drops it when the process
    dies, however it dies, so no stale lock is ever left behind). Take it with lock_output_dir().

    The locked descriptor is read-only (flock needs no write access): no file of the run stays open for
    writing between writes, so an administrator can still remount the folder's file system read-only. A flock
    belongs to the open file, which forked children (the loader's workers) would share and keep locked after
    the trainer is killed, so that a restart right after it would be refused: children close it at once."""

    def __init__(self, output_dir, wait=False):
        self.path = os.path.join(output_dir, ".lock")
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"--output-dir {output_dir}: cannot create its lock file .lock "
                            f"({describe_os_error(e)})") from None
        try:
            _flock_or_refuse(self.fd, output_dir, wait)
        except UserError:
            os.close(self.fd)
            raise
        _locked_fds.add(self.fd)
        job = job_identity()
        try:
            with open(self.path, "w") as f:  # who holds it, for the message above; and which job (own_run)
                f.write(f"pid {os.getpid()} on {socket.gethostname()}\n" + (f"job: {job}\n" if job else ""))
        except OSError as e:
            self.release()
            raise UserError(f"--output-dir {output_dir}: cannot write its lock file .lock "
                            f"({describe_os_error(e)})") from None

    def release(self):
        if self.fd is not None:
            _locked_fds.discard(self.fd)
            os.close(self.fd)
            self.fd = None
        for key, lock in list(_held_locks.items()):
            if lock is self:
                del _held_locks[key]


_locked_fds = set()


def _close_locks_in_child():
    for fd in _locked_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _locked_fds.clear()
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


def _flock_or_refuse(fd, output_dir, wait=False):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        lines = os.read(fd, 200).decode(errors="replace").splitlines()
        holder = lines[0].strip() if lines else "another process"
        raise UserError(f"--output-dir {output_dir} is in use by another run ({holder}); wait for it to "
                        f"finish or use another --output-dir") from None


def refuse_if_busy(output_dir):
    """One line if another run holds `output_dir`'s lock; creates and changes nothing."""
    if os.path.realpath(output_dir) in _held_locks:
        return  # our own
    try:
        fd = os.open(os.path.join(output_dir, ".lock"), os.O_RDONLY)
    except OSError:
        return  # no lock file: no run holds the folder
    try:
        _flock_or_refuse(fd, output_dir)
    finally:
        os.close(fd)  # and with it the lock just taken


# This process's locks. flock locks belong to an open file: a second OutputLock on the same folder in the same
# process would refuse its own run, so validate_args' lock and the one main() releases are the same object.
_held_locks = {}


def lock_output_dir(output_dir):
    """This process's OutputLock on `output_dir`, taken on the first call and returned on the next ones."""
    key = os.path.realpath(output_dir)
    if key not in _held_locks:
        _held_locks[key] = OutputLock(output_dir)
    return _held_locks[key]


def claim(output_dir, resume, overwrite, resuming):
    """Rank 0's lock on the output folder (taken by prepare_output_dir, before the dataset scan; held until the
    process ends) and a clean start there: a fresh run starts a fresh metrics.jsonl."""
    if not comm.is_main_process() or not output_dir:
        return None
    lock = lock_output_dir(output_dir)
    if not resuming:
        if resume == "auto" and not launch.restart_count():
            # Checkpoints were there by name (prepare_output_dir) but none loaded: still another run's files.
            check_fresh_output_dir(output_dir, overwrite, nothing_to_resume=True)
        start_fresh_metrics(output_dir)  # checked before: nothing of another run's is lost
    remove_stale_temp_files(output_dir)
    return lock


def survivor_turn(output_dir, rank, wait_s=60, grace_s=10):
    """After a lost peer, on each surviving rank: whether it is the one to save the step the survivors reached.
    The folder's lock decides, so that exactly one does: rank 0 holds it already when it survived; else the
    survivors go in rank order, the lowest first: a rank tries the lock once no lower rank on this machine is
    still running (it is then the lowest survivor, or a lower one has saved and exited), or after `grace_s`
    (a lower rank that hangs); ranks on other machines cannot be seen and only get a head start of 0.2 s per
    rank. A rank that does not get the lock waits (at most `wait_s`) until the saver has released it -- it has
    then saved and exited -- so that no rank exits, and makes srun or torchrun stop the job, while the save is
    under way. A rank that cannot see the folder (on another machine) does not save."""
    if os.path.realpath(output_dir) in _held_locks:
        return True
    if not os.path.isdir(output_dir):
        return False
    start = time.monotonic()
    time.sleep(0.2 * rank)
    while comm.living_ranks_below(rank) and time.monotonic() - start < grace_s:
        time.sleep(0.1)
    try:
        lock_output_dir(output_dir)
        return True
    except UserError:
        pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            OutputLock(output_dir).release()  # free: the saver is done
            break
        except UserError:
            continue
    return False


def previous_run_files(output_dir):
    """Our files in `output_dir` that belong to a run: checkpoints and the metrics file."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n in RUN_FILES or (n.startswith("model_") and n.endswith(".pth")))


def check_fresh_output_dir(output_dir, overwrite, nothing_to_resume=False):
    """A fresh run (nothing to resume) must not replace another run's checkpoints or curve: one line, before
    any work starts, unless --overwrite. nothing_to_resume: --resume auto found no checkpoint there."""
    files = previous_run_files(output_dir)
    if files and not overwrite:
        shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        if nothing_to_resume:
            raise UserError(f"--resume auto: --output-dir {output_dir} holds no checkpoint to resume, but another "
                            f"run's files ({shown}) that a fresh start would replace; resume a file with --resume "
                            f"FILE, choose another --output-dir, or pass --overwrite to replace them")
        raise UserError(f"--output-dir {output_dir} holds another run ({shown}); continue it with --resume auto, "
                        f"choose another --output-dir, or pass --overwrite to replace it")


def start_fresh_metrics(output_dir):
    """--overwrite (or --resume auto with nothing to resume): a fresh run starts a fresh curve."""
    metrics = os.path.join(output_dir, "metrics.jsonl")
    try:
        if os.path.exists(metrics):
            os.remove(metrics)
    except OSError as e:
        raise UserError(f"could not remove the previous {metrics}: {describe_os_error(e)}") from None


# ----------------------------------------------------------------------------
# The run's other files: metrics.jsonl and run.json (rank 0)
# ----------------------------------------------------------------------------

def append_metrics(output_dir, record):
    """One JSON object per epoch in <output-dir>/metrics.jsonl (rank 0 only): easy to plot, grep or load.
    Once per epoch: rows an earlier attempt wrote for this epoch or a later one (it was stopped after its row
    and before its checkpoint, and the resumed run evaluated the epoch again) are dropped first. A write that
    fails (a full disk) leaves no half line behind and is one line; the checkpoints are untouched."""
    if not output_dir or not comm.is_main_process():
        return
    path = os.path.join(output_dir, "metrics.jsonl")
    line = (json.dumps(record) + "\n").encode()
    try:
        earlier = _rows_before(path, record["epoch"])
        if earlier is not None:  # rows to drop: the file is rewritten, atomically
            with replacing(path) as tmp, open(tmp, "wb") as f:
                f.writelines(earlier + [line])
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies, as to open()
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # the file stays whole JSON lines
                raise
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"could not write {path}: {describe_os_error(e)}; the checkpoints written so far are "
                        f"intact") from None


def _rows_before(path, epoch):
    """The lines of metrics.jsonl for epochs before `epoch`, or None when no line is for `epoch` or later
    (the common case: a plain append)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # not a file to rewrite (a device: the append below says what happens)
        with open(path, "rb") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return None
    keep = []
    for line in lines:
        try:
            row_epoch = json.loads(line).get("epoch", -1)
        except ValueError:
            row_epoch = -1  # not ours to judge: kept
        if row_epoch < epoch:
            keep.append(line)
    return keep if len(keep) < len(lines) else None


def write_run_description(output_dir, description):
    """<output-dir>/run.json (rank 0): what the launchers' summary needs besides metrics.jsonl (world size,
    batch, device, model), as data rather than as words to grep from the log. Replaced atomically."""
    if not output_dir or not comm.is_main_process():
        return
    path = os.path.join(output_dir, "run.json")
    try:
        with replacing(path) as tmp, open(tmp, "w") as f:
            json.dump(description, f, indent=1)
            f.write("\n")
    except OSError as e:
        raise UserError(f"could not write {path}: {describe_os_error(e)}") from None


# ----------------------------------------------------------------------------
# The run's record
# ----------------------------------------------------------------------------

class RunRecord:
    """The run's evaluated epochs: metrics.jsonl rows (rank 0), TensorBoard scalars, the best Acc@1."""

    def __init__(self, output_dir, best_acc1, tensorboard=False):
        self.output_dir = output_dir
        self.best_acc1 = best_acc1
        self.best_epoch = None
        self.history = []
        self.start_time = time.time()
        self.tensorboard = utils.TensorBoardLogger(output_dir) if tensorboard and comm.is_main_process() else None

    def add(self, epoch, train_stats, val_stats):
        """The row of an evaluated epoch (written by write_row); True if it is the best so far."""
        is_best = val_stats.get("acc1", 0.0) > self.best_acc1
        if is_best:
            self.best_acc1, self.best_epoch = val_stats["acc1"], epoch
        self.history.append({"epoch": epoch, **train_stats, **{f"val_{k}": v for k, v in val_stats.items()}})
        return is_best

    def write_row(self):
        """metrics.jsonl's row (and TensorBoard's scalars) of the epoch added last."""
        append_metrics(self.output_dir, self.history[-1])
        if self.tensorboard:
            self.tensorboard.log(self.history[-1])

    def eta(self, epochs_left):
        """'about H:MM:SS to go', from the mean time of this run's epochs (training and evaluation)."""
        per_epoch = (time.time() - self.start_time) / max(len(self.history), 1)
        return utils.format_eta(per_epoch * epochs_left)

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        # Each epoch's steady-state img/s, or its whole-epoch rate when it was too short to have one.
        fps = [h.get("fps") or h.get("epoch_fps") for h in self.history if h.get("fps") or h.get("epoch_fps")]
        utils.log("Run summary")
        utils.log(f"  epochs trained : {len(self.history)}")
        utils.log(f"  best Acc@1     : {self.best_acc1:.3f}" + (f" (epoch {self.best_epoch})"
                                                                 if self.best_epoch is not None else ""))
        utils.log(f"  total time     : {utils.format_eta(time.time() - self.start_time)}")
        utils.log(f"  mean FPS       : {sum(fps) / len(fps):.2f} img/s (the mean of the epochs' figures)" if fps
                  else "  mean FPS       : n/a")
