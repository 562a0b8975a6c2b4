#!/bin/bash
# Shared body of the four launchers (train_{full,performance}_{1,8}p.sh), which only set defaults.
#
# Contract (as the Ascend reference):  --data_path=DIR  (required; perf launchers accept --synthetic instead)
#                                      --epochs=N       (optional)
#                                      --device_id=N    (1p) device N, output in output/N/ (else ASCEND_DEVICE_ID, 0)
#                                      --recipe=NAME    (optional) flags from recipes/NAME.txt, applied after
#                                                       the launcher's defaults and before the user's flags
#                                      (each also as --data-path, --device-id, and with its value as the next
#                                      argument: --data_path DIR, as main.py takes its flags)
#                                      --key=value      the ModelZoo harness's (list below): ignored, with a note;
#                                      --key[=value]    any other flag that main.py does not take: refused (a typo
#                                                       such as --epoch=1 must not start the 60-epoch run)
#                                      anything else    passed through to main.py, after our defaults,
#                                                       so it overrides them (argparse: last one wins)
# Everything the launcher can check is checked before anything is moved or started: the flags, the recipe, the
# data set's layout (layout.py, main.py's own check and message) and that no running run holds the output folder.
# A previous run's output folder is then moved aside (output/0 -> output/0.prev-<the time that run started>),
# unless --resume is given; when the launch then writes nothing of a run (main.py refused its arguments, or it
# was stopped before training), the previous run is moved back and this launch's log is kept beside it as
# output/<rank>.failed-<time>.log.
# The trainer runs as the launcher's child: SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 sent to the launcher
# are passed on to it, and the launcher waits for it to save and stop (exit 75 with a checkpoint).
# The summary (<CaseName>.log) is made by run_summary.py from rank 0's run.json and metrics.jsonl.
# A closed stdout or stderr (`| head`) never stops the launcher: its own lines are written by say/say_err, which
# ignore a failed write, so the summary and the curves are still made and the exit status is the trainer's.
# Inputs from the calling launcher: MODE (full|perf), DEFAULT_RANK_SIZE, DEFAULT_RECIPE, DEFAULT_ARGS (array).
# Order of main.py flags (last wins): launcher defaults < recipe < perf mode (1 epoch, 100 steps) < --epochs= < user.
# Multi-node (8p): NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, as torchrun uses them.
# MAX_RESTARTS=N (8p): torchrun restarts the ranks up to N times after a failure; each restart resumes
# from the newest checkpoint in the output folder.
set -o pipefail
trap '' PIPE  # a write to a closed pipe fails (EPIPE) instead of killing the launcher; Python ignores it anyway

say() { printf '%s\n' "$*" 2>/dev/null; }          # stdout; a failed write is not an error
say_err() { printf '%s\n' "$*" 1>&2 2>/dev/null; }  # stderr; likewise
fail() { say_err "error: $*"; exit 2; }

test_path_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$test_path_dir")

# The command that continues this launch after a signal stopped it: the variables the user set, the same
# launcher and arguments, plus --resume auto (printed then, ready to paste).
resume_vars=(OUTPUT_ROOT PYTHON ASCEND_DEVICE_ID)
[ "$DEFAULT_RANK_SIZE" != 1 ] && resume_vars=(OUTPUT_ROOT PYTHON RANK_SIZE NNODES NODE_RANK MASTER_ADDR MASTER_PORT
                                              MAX_RESTARTS)
resume_cmd=""
for var in "${resume_vars[@]}"; do [ -n "${!var}" ] && resume_cmd+="$var=$(printf %q "${!var}") "; done
resume_cmd+="bash$(printf ' %q' "$0" "$@")"
case " $* " in *" --resume auto "*|*" --resume=auto "*) ;; *) resume_cmd+=" --resume auto" ;; esac

PYTHON=${PYTHON:-python3}
OUTPUT_ROOT=${OUTPUT_ROOT:-$test_path_dir/output}   # per-rank folders <root>/<rank>/
case "$OUTPUT_ROOT" in /*) ;; *) OUTPUT_ROOT="$PWD/$OUTPUT_ROOT" ;; esac   # the same folder whatever main.py's cwd

# main.py's own options (its parser is config.py's): a --key=value among them goes to main.py.
main_options=" $(grep -o '"--[A-Za-z0-9_-]*"' "$repo_dir/config.py" | tr -d '"' | tr '\n' ' ') "
# The arguments ModelZoo's test harness passes to a model's launchers, which the original's launchers ignore
# (DenseNet201_ID0453_for_PyTorch/test/train_*.sh read only --data_path, --epochs and --device_id): so do we,
# with a one-line note. Found in Ascend/ModelZoo-PyTorch (commit 6a2804a, 2023-12), whose 1,509
# test/train_{full,performance}_{1,8}p.sh read, besides --data_path (1,309 of them): --precision_mode (458),
# --batch_size (332), --profiling (292), --over_dump, --data_dump_flag, --data_dump_step (~285 each, the
# template's debugging switches), --conda_name (75, the harness's conda environment), --fp32 (62), --hf32 (52),
# --ckpt_path (19) and --bin_mode (17). Siblings' spellings of our own settings are refused with ours instead:
# --learning_rate= (--lr), --train_epochs= (--epochs=), --train_steps= (--max-steps).
harness_list=(--precision_mode --batch_size --profiling --over_dump --data_dump_flag --data_dump_step --conda_name
              --fp32 --hf32 --ckpt_path --bin_mode)
harness_options=" ${harness_list[*]} "
closest_py='import sys; sys.path.insert(0, sys.argv[1]); import cli; print(cli.closest(sys.argv[2], sys.argv[3:]) or "")'

data_path=""
recipe="$DEFAULT_RECIPE"
user_epochs=()
device_id=""
synthetic=0
resuming=0
passthrough=()
ignored=()
args=("$@")
i=0
while [ "$i" -lt "${#args[@]}" ]; do
    para=${args[i]}
    i=$((i + 1))
    # The launcher's own settings, in either spelling (--data_path, --data-path) and either form (=value, or
    # the value as the next argument), as main.py takes its flags.
    case "$para" in
        --data_path=*|--data-path=*|--epochs=*|--recipe=*|--device_id=*|--device-id=*)
            own=${para%%=*}; value=${para#*=}; given=$para ;;
        --data_path|--data-path|--epochs|--recipe|--device_id|--device-id)
            own=$para
            if [ "$i" -ge "${#args[@]}" ] || [[ "${args[i]}" == --* ]]; then
                case "$own" in --data_path|--data-path) hint=/path/to/imagenet ;; --recipe) hint=NAME ;; *) hint=N ;; esac
                fail "$para needs a value: $para=$hint or $para $hint"
            fi
            value=${args[i]}; given="$para $value"; i=$((i + 1)) ;;
        *) own="" ;;
    esac
    case "$own" in
        --data_path|--data-path) data_path=$value; continue ;;
        --epochs) [[ "$value" =~ ^[0-9]+$ ]] || fail "$given: expected a whole number of epochs"
                  user_epochs=(--epochs "$value"); continue ;;
        --recipe) recipe=$value; continue ;;
        --device_id|--device-id) device_id=$value; continue ;;
    esac
    case "$para" in
        --synthetic) synthetic=1; passthrough+=("--synthetic") ;;
        --resume|--resume=*) resuming=1; passthrough+=("$para") ;;
        --) passthrough+=("$para") ;;
        --*)
            flag=${para%%=*}
            if [[ "$main_options" == *" $flag "* || "$main_options" == *" --${flag#--no-} "* || "$flag" == --help ]]
            then passthrough+=("$para")  # (--no-X: main.py's BooleanOptionalAction flags; it refuses other ones)
            elif [[ "$harness_options" == *" $flag "* ]]; then
                ignored+=("$para")
                if [ "$flag" = "$para" ] && [ "$i" -lt "${#args[@]}" ] && [[ "${args[i]}" != -* ]]; then
                    ignored+=("${args[i]}"); i=$((i + 1))   # --key value: its value goes too
                fi
            else
                value=""; [[ "$para" == *=* ]] && value=${para#*=}
                case "$flag" in  # siblings' names for our settings, then the nearest real flag (difflib)
                    --learning_rate) near="--lr" ;;
                    --train_epochs) near="--epochs" ;;
                    --train_steps) near="--max-steps" ;;
                    *) near=$("$PYTHON" -c "$closest_py" "$repo_dir" "$flag" --data_path --epochs --recipe --device_id \
                                 $main_options) ;;
                esac
                if [ -n "$near" ] && [ -n "$value" ]; then  # the same value, in the form that flag takes
                    case "$near" in --data_path|--epochs|--recipe|--device_id) near="$near=$value" ;;
                                    *) near="$near $value" ;; esac
                fi
                fail "$(basename "$0") does not take $para${near:+: did you mean $near?}"
            fi ;;
        *) passthrough+=("$para") ;;
    esac
done
[ "${#ignored[@]}" -gt 0 ] && say_err "note: ignored the ModelZoo harness's ${ignored[*]}, as the original does"
if [ -z "$data_path" ] && { [ "$MODE" != perf ] || [ "$synthetic" = 0 ]; }; then
    hint="--data_path=/path/to/imagenet"; [ "$MODE" = perf ] && hint="$hint (or --synthetic)"
    fail "$(basename "$0") needs $hint"
fi
if [ -n "$data_path" ] && [ ! -d "$data_path" ]; then   # before starting Python: a typo costs nothing
    fail "--data_path=$data_path: no such directory"
fi
[ -n "$data_path" ] && data_path=$(cd "$data_path" && pwd)  # absolute: main.py gets no relative surprises
data_args=(); [ -n "$data_path" ] && data_args=(--data-path "$data_path")
if [ -n "$device_id" ] && ! [[ "$device_id" =~ ^[0-9]+$ ]]; then
    fail "--device_id=$device_id: expected a device index"
fi

# --recipe=NAME: one flag file per recipe (comments and blank lines ignored)
recipe_args=()
if [ -n "$recipe" ]; then
    recipe_file="$repo_dir/recipes/$recipe.txt"
    if [ ! -f "$recipe_file" ]; then
        fail "no recipe '$recipe' (have: $(cd "$repo_dir/recipes" && ls *.txt | sed 's/\.txt$//' | tr '\n' ' '))"
    fi
    read -r -a recipe_args <<< "$(sed 's/#.*//' "$recipe_file" | tr '\n' ' ')"
fi

# Ascend only: the CANN environment; elsewhere main.py runs on cuda or cpu.
if [ -d "${CANN_INSTALL_PATH:-/usr/local/Ascend}" ]; then source "$test_path_dir/env_npu.sh"; fi

# torchrun is torch.distributed.run's own main, called from these few lines so that what it raises becomes one
# line: a port in use (checked first on the node that hosts the rendezvous, before any rank starts, and
# DistNetworkError if it is taken in between), a Ctrl-C or SIGTERM (SignalException: torchrun has passed the
# signal on to the ranks, which run in their own sessions, and waited for them to save and stop; the launcher
# then says how to resume), a failed rank (ChildFailedError: the rank has said why, torchrun would repeat it
# in 30 lines; only a rank killed by a signal is named here). torchrun's own log lines (LOGLEVEL, torchrun's
# variable) are kept to errors, and only with MAX_RESTARTS, where they tell what was restarted.
# Signals: torchrun passes SIGTERM, SIGINT and SIGHUP on to the ranks; SIGUSR1 and SIGUSR2 (preemption notices)
# would end torchrun itself and leave the ranks running, so they become a SIGTERM to this process, which torchrun
# passes on. Before torchrun has started the ranks, a signal ends this process in one line (nothing to save).
torchrun_py='
import logging, os, signal, socket, sys
def stopped_at_start(signum, frame):
    os.write(2, f"stopped by {signal.Signals(signum).name} during start-up (nothing to save)\n".encode())
    os._exit(128 + signum)
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(signum) != signal.SIG_IGN:  # (a SIGHUP ignored under nohup stays ignored)
        signal.signal(signum, stopped_at_start)
for signum in (signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(signum, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
repo, port, node_rank, restarts, torchrun_args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
sys.path.insert(0, repo)
import cli
log_level = os.environ.setdefault("LOGLEVEL", "CRITICAL" if restarts == "0" else "ERROR")
if node_rank == "0":
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            cli.fail(f"MASTER_PORT {port} is in use on this machine ({e.strerror}): set MASTER_PORT to a free port")
cli.check_torchvision()  # once here rather than once per rank
from torch.distributed import DistNetworkError, run
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
logging.getLogger("torch.distributed.elastic").setLevel(log_level)  # its modules that do not read LOGLEVEL
try:
    run.main(torchrun_args)
except KeyboardInterrupt:
    sys.exit(128 + signal.SIGINT)
except SignalException as e:
    sys.exit(128 + e.sigval)
except DistNetworkError as e:
    cli.fail(f"torchrun could not use the rendezvous port {port}: {str(e).strip().splitlines()[0]}")
except ChildFailedError as e:
    rank, failure = e.get_first_failure()
    if failure.exitcode < 0:
        cli.fail(f"rank {rank} was killed by {failure.signal_name()}", 128 - failure.exitcode)
    sys.exit(failure.exitcode)
'

# Only the 8p launchers read RANK_SIZE: a RANK_SIZE left in the environment never turns a 1p run into 8.
if [ "$DEFAULT_RANK_SIZE" = 1 ]; then RANK_SIZE=1; else RANK_SIZE=${RANK_SIZE:-$DEFAULT_RANK_SIZE}; fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
for var in RANK_SIZE NNODES NODE_RANK ${MAX_RESTARTS:+MAX_RESTARTS}; do  # before a shell test misreads them
    case "${!var}" in
        ''|*[!0-9]*) say_err "error: $var='${!var}' is not a whole number (see the header of $(basename "$0"))"; exit 2 ;;
    esac
done
if [ "$RANK_SIZE" -lt 1 ] || [ "$NNODES" -lt 1 ] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    say_err "error: RANK_SIZE=$RANK_SIZE NNODES=$NNODES NODE_RANK=$NODE_RANK: need RANK_SIZE >= 1, NNODES >= 1 and" \
            "NODE_RANK < NNODES"
    exit 2
fi
[ -n "$device_id" ] && ASCEND_DEVICE_ID=$device_id      # --device_id=N: that device, output/N/ (as the original)
ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-0}
if [ "$RANK_SIZE" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    log_rank=$((NODE_RANK * RANK_SIZE))                     # this node's first global rank
    node_ranks=$(seq "$log_rank" $((log_rank + RANK_SIZE - 1)))
    log_file_arg=(--log-file "$OUTPUT_ROOT/{rank}/train_{rank}.log")
    master_port=${MASTER_PORT:-29500}
    launch=("$PYTHON" -c "$torchrun_py" "$repo_dir" "$master_port" "$NODE_RANK" "${MAX_RESTARTS:-0}"
            --nproc_per_node="$RANK_SIZE" --nnodes="$NNODES" --node_rank="$NODE_RANK"
            --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$master_port" --max-restarts="${MAX_RESTARTS:-0}")
else
    log_rank=$ASCEND_DEVICE_ID
    node_ranks=$log_rank
    log_file_arg=(--log-file "$OUTPUT_ROOT/$log_rank/train_$log_rank.log" --device_id "$ASCEND_DEVICE_ID")
    launch=("$PYTHON")
fi
output_dir="$OUTPUT_ROOT/$log_rank"
log="$output_dir/train_$log_rank.log"
launch_stamp=$(date +%Y%m%d-%H%M%S)

# Before a previous run is moved aside: main.py's own check of the data set (layout.py: the same one-line
# error, no torch import), that no running run holds a folder to be moved (its .lock, as main.py checks it),
# and the time each such run started (its run.json's modification time, else its oldest file's), which names
# the folder it moves to. Prints one time stamp per folder.
preflight_py='
import fcntl, os, sys, time
sys.path.insert(0, sys.argv[1])
import cli, layout
def check(args):
    data_path, folders = args[0], args[1:]
    if data_path:
        layout.check_dataset_layout(data_path)
    stamps = []
    for folder in folders:
        try:
            fd = os.open(os.path.join(folder, ".lock"), os.O_RDONLY)
        except OSError:
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = (os.read(fd, 200).decode(errors="replace").splitlines() or ["another process"])[0].strip()
                raise cli.UserError(f"{folder} is in use by a running run ({holder}): wait for it to finish, or set "
                                    f"OUTPUT_ROOT to another folder") from None
            finally:
                os.close(fd)
        run_json = os.path.join(folder, "run.json")
        if os.path.isfile(run_json):
            started = os.stat(run_json).st_mtime
        else:
            times = [os.lstat(os.path.join(d, f)).st_mtime for d, _, files in os.walk(folder) for f in files]
            started = min(times) if times else os.stat(folder).st_mtime
        stamps.append(time.strftime("%Y%m%d-%H%M%S", time.localtime(started)))
    print("\n".join(stamps))
    return 0
sys.exit(cli.run_tool(check, sys.argv[2:], expected=(OSError,)))
'

# A new run never destroys the previous one: its folders are moved aside (a rename, nothing copied), after
# every check above has passed. With --resume the run continues in its own folder and its log grows.
moved_from=()
moved_to=()
put_back_previous() {  # the moved folders back where they were, for each rank whose new folder holds no run
    local j from kept leftover f failed n kept_log
    for j in "${!moved_from[@]}"; do
        from=${moved_from[j]}; kept=${moved_to[j]}
        leftover=$(ls -A "$from" 2>/dev/null | grep -v -x -e '\.lock' -e 'train_[0-9]*\.log')
        [ -z "$leftover" ] || continue   # this launch wrote something of a run there: it stays
        failed=""
        for f in "$from"/train_*.log; do
            [ -f "$f" ] || continue
            failed="$OUTPUT_ROOT/$(basename "$from").failed-$launch_stamp.log"
            n=1; while [ -e "$failed" ]; do failed="$OUTPUT_ROOT/$(basename "$from").failed-$launch_stamp-$n.log"; n=$((n + 1)); done
            mv "$f" "$failed" || continue 2
            [ "$f" = "$log" ] && log=$failed
        done
        rm -f "$from/.lock"
        if [ -d "$from" ]; then rmdir "$from" 2>/dev/null || continue; fi
        mv "$kept" "$from" || continue
        kept_log=""; [ -n "$failed" ] && kept_log=" (the log of this launch: $failed)"
        say "note: this launch wrote no run, so the previous run is back in $from$kept_log"
    done
}
if [ "$resuming" = 0 ]; then
    to_move=()
    for r in $node_ranks; do
        [ -d "$OUTPUT_ROOT/$r" ] && [ -n "$(ls -A "$OUTPUT_ROOT/$r" 2>/dev/null)" ] && to_move+=("$OUTPUT_ROOT/$r")
    done
    if [ "${#to_move[@]}" -gt 0 ]; then
        check_data=""; [ "$synthetic" = 0 ] && check_data=$data_path
        started=$("$PYTHON" -c "$preflight_py" "$repo_dir" "$check_data" "${to_move[@]}") || exit $?
        mapfile -t stamps <<< "$started"
        for j in "${!to_move[@]}"; do
            from=${to_move[j]}
            kept="$from.prev-${stamps[j]}"
            n=1; while [ -e "$kept" ]; do kept="$from.prev-${stamps[j]}-$n"; n=$((n + 1)); done
            if ! mv "$from" "$kept"; then
                put_back_previous
                fail "could not move the previous run in $from aside; move it yourself or set OUTPUT_ROOT"
            fi
            moved_from+=("$from"); moved_to+=("$kept")
            say "note: the previous run in $from was moved to $kept"
        done
    fi
fi
mkdir -p "$output_dir"

start_time=$(date +%s)
# main.py runs from the caller's directory, so relative paths in any flag mean what the user meant.
# It runs in the background so that the launcher can pass signals on (a foreground child would be left running
# when the launcher is killed): a `wait` returns when a trapped signal arrives, so the loop waits again until the
# trainer has really ended (saved and stopped), and the launcher's exit status is the trainer's. In the child,
# SIGINT and SIGQUIT get their default back (bash ignores them in background jobs) and stdin stays the
# launcher's, so Ctrl-C and a terminal behave as with a foreground child. A terminal's Ctrl-C reaches the whole
# foreground process group, the trainer (or torchrun) included: a SIGINT is not passed on when the launcher is in
# its terminal's foreground group, since a second copy would reach main.py during its set-up as a second Ctrl-C.
# (Any other duplicate, say a scheduler that signals every process: main.py takes a copy within 1 s of the first
# as the same request once training runs.)
mode_args=(); [ "$MODE" = perf ] && mode_args=(--epochs 1 --max-steps 100)
trainer=""
pending=""
from_keyboard() {  # this process group is the foreground group of a terminal (/proc/PID/stat: pgrp, tty, tpgid)
    local stat fields
    read -r stat 2>/dev/null < "/proc/$$/stat" || return 1
    read -r -a fields <<< "${stat##*) }"
    [ "${fields[4]}" != 0 ] && [ "${fields[5]}" = "${fields[2]}" ]
}
pass_on() {
    [ "$1" = INT ] && from_keyboard && return
    if [ -n "$trainer" ]; then kill -s "$1" "$trainer" 2>/dev/null; else pending=$1; fi
}
for sig in TERM INT HUP USR1 USR2; do trap "pass_on $sig" "$sig"; done
( trap - INT QUIT
  exec "${launch[@]}" "$repo_dir/main.py" "${data_args[@]}" --output-dir "$output_dir" "${log_file_arg[@]}" \
      "${DEFAULT_ARGS[@]}" "${recipe_args[@]}" "${mode_args[@]}" "${user_epochs[@]}" "${passthrough[@]}" ) <&0 &
trainer=$!
[ -n "$pending" ] && kill -s "$pending" "$trainer" 2>/dev/null
while kill -0 "$trainer" 2>/dev/null; do wait "$trainer"; done
wait "$trainer"  # its exit status (bash keeps it, also when the trainer ended while a trap ran)
status=$?
trap - TERM INT HUP USR1 USR2
e2e_time=$(( $(date +%s) - start_time ))
saved=0; [ -f "$output_dir/checkpoint.pth" ] && saved=1   # (before a previous run's may be put back there)
[ "$status" = 0 ] || put_back_previous   # a launch that wrote no run leaves the previous one where it was
case "$status" in
    0) ;;
    75|129|130|138|140|143)  # preempted (checkpoint saved), or stopped by SIGHUP, SIGINT, SIGUSR1, SIGUSR2, SIGTERM
        if [ "$saved" = 1 ] || [ "$log_rank" != 0 ]; then  # (rank 0's node holds the checkpoint)
            say_err "stopped by a signal; to continue from the last checkpoint: $resume_cmd"
            exit 75
        fi
        say_err "stopped by a signal before the first checkpoint: nothing to resume"
        exit "$status" ;;
    2|3) exit "$status" ;;  # a user error or a non-finite loss: main.py has said which, in one line
    *)  if [ -f "$log" ]; then
            say_err "error: training exited with status $status; see $log"
        else  # it stopped before main.py opened its log: never point to a file that does not exist
            say_err "error: training exited with status $status before it wrote a log"
        fi
        exit "$status" ;;
esac
if [ ! -f "$output_dir/run.json" ]; then  # torchrun on a node without rank 0, or --test-only
    say "(no run.json from rank 0 in $output_dir: the summary is written on the node with NODE_RANK=0)"
    exit 0
fi

# ---- summary, from the data rank 0 wrote (run.json + metrics.jsonl), not from the log's wording ----------
suffix=acc; [ "$MODE" = perf ] && suffix=perf
summary=$("$PYTHON" "$repo_dir/run_summary.py" "$output_dir" --mode "$suffix" --e2e-seconds "$e2e_time") || exit $?
say "$summary"
CaseName=$(basename "$(printf '%s\n' "$summary" | sed -n 's/^Summary: //p')" .log)

# ---- training curves next to the summary (optional: a missing matplotlib never fails the run) -----------
if [ ! -f "$output_dir/metrics.jsonl" ]; then
    say "note: no $output_dir/metrics.jsonl (no epoch finished), so no curves"
elif ! "$PYTHON" -c "import matplotlib" 2>/dev/null; then
    say "note: matplotlib is not installed, so no curves (pip install matplotlib; then" \
        "python plot_metrics.py $output_dir/metrics.jsonl)"
else
    # titled by plot_metrics.py itself, as the README shows: "<Network>_bs<B>_<N>p: <E> epochs (<first>-<last>)"
    # (its lines are relayed by say: a closed stdout must not fail it after the picture is written)
    if plotted=$("$PYTHON" "$repo_dir/plot_metrics.py" "$output_dir/metrics.jsonl" \
                     -o "$output_dir/${CaseName}_curves.png" 2>&1); then
        say "$plotted"
    else
        say "$plotted"
        say "note: plot_metrics.py failed; the run itself succeeded"
    fi
fi

# ---- what the run left, by name (those that exist) -------------------------------------------------------
[ -f "$output_dir/checkpoint.pth" ] && say "Checkpoint: $output_dir/checkpoint.pth (the last state: continue or" \
                                           "extend the run with --resume auto)"
[ -f "$output_dir/model_best.pth" ] && say "Best model: $output_dir/model_best.pth (the best validation Acc@1's" \
                                           "checkpoint: predict.py, export_onnx.py)"
for r in $node_ranks; do
    [ -f "$OUTPUT_ROOT/$r/train_$r.log" ] && say "Log: $OUTPUT_ROOT/$r/train_$r.log"
done
exit 0
