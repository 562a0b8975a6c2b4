#!/bin/bash
# Shared body of the four launchers (train_{full,performance}_{1,8}p.sh), which only set defaults.
#
# Contract (as the Ascend reference):  --data_path=DIR  (required; perf launchers accept --synthetic instead)
#                                      --epochs=N       (optional)
#                                      --device_id=N    (1p) device N, output in output/N/ (else ASCEND_DEVICE_ID, 0)
#                                      --recipe=NAME    (optional) flags from recipes/NAME.txt, applied after
#                                                       the launcher's defaults and before the user's flags
#                                      --key=value      the ModelZoo harness's (list below): ignored, with a note;
#                                                       any other that main.py does not take: refused (a typo such
#                                                       as --epoch=1 must not start the 60-epoch run)
#                                      anything else    passed through to main.py, after our defaults,
#                                                       so it overrides them (argparse: last one wins)
# A previous run's output folder is moved aside (output/0 -> output/0.prev-<time>), unless --resume is given.
# The summary (<CaseName>.log) is made by run_summary.py from rank 0's run.json and metrics.jsonl.
# Inputs from the calling launcher: MODE (full|perf), DEFAULT_RANK_SIZE, DEFAULT_RECIPE, DEFAULT_ARGS (array).
# Order of main.py flags (last wins): launcher defaults < recipe < perf mode (1 epoch, 100 steps) < --epochs= < user.
# Multi-node (8p): NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, as torchrun uses them.
# MAX_RESTARTS=N (8p): torchrun restarts the ranks up to N times after a failure; each restart resumes
# from the newest checkpoint in the output folder.
set -o pipefail

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
for para in "$@"; do
    case "$para" in
        --data_path=*) data_path="${para#*=}" ;;
        --epochs=*) user_epochs=(--epochs "${para#*=}") ;;
        --recipe=*) recipe="${para#*=}" ;;
        --device_id=*) device_id="${para#*=}" ;;
        --synthetic) synthetic=1; passthrough+=("--synthetic") ;;
        --resume|--resume=*) resuming=1; passthrough+=("$para") ;;
        --*=*)
            flag=${para%%=*}
            if [[ "$main_options" == *" $flag "* ]]; then passthrough+=("$para")
            elif [[ "$harness_options" == *" $flag "* ]]; then ignored+=("$para")
            else
                case "$flag" in  # siblings' names for our settings, then the nearest real flag (difflib)
                    --learning_rate) near="--lr ${para#*=}" ;;
                    --train_epochs) near="--epochs=${para#*=}" ;;
                    --train_steps) near="--max-steps ${para#*=}" ;;
                    *) near=$("$PYTHON" -c "$closest_py" "$repo_dir" "$flag" --data_path --epochs --recipe --device_id \
                                 $main_options)
                       case "$near" in "") ;; --data_path|--epochs|--recipe|--device_id) near="$near=${para#*=}" ;;
                                       *) near="$near ${para#*=}" ;; esac ;;
                esac
                echo "error: $(basename "$0") does not take $para${near:+: did you mean $near?}" >&2
                exit 2
            fi ;;
        *) passthrough+=("$para") ;;
    esac
done
[ "${#ignored[@]}" -gt 0 ] && echo "note: ignored the ModelZoo harness's ${ignored[*]}, as the original does" >&2
if [ -z "$data_path" ] && { [ "$MODE" != perf ] || [ "$synthetic" = 0 ]; }; then
    hint="--data_path=/path/to/imagenet"; [ "$MODE" = perf ] && hint="$hint (or --synthetic)"
    echo "error: $(basename "$0") needs $hint" >&2
    exit 2
fi
if [ -n "$data_path" ] && [ ! -d "$data_path" ]; then   # before starting Python: a typo costs nothing
    echo "error: --data_path=$data_path: no such directory" >&2
    exit 2
fi
[ -n "$data_path" ] && data_path=$(cd "$data_path" && pwd)  # absolute: main.py gets no relative surprises
data_args=(); [ -n "$data_path" ] && data_args=(--data-path "$data_path")
if [ -n "$device_id" ] && ! [[ "$device_id" =~ ^[0-9]+$ ]]; then
    echo "error: --device_id=$device_id: expected a device index" >&2
    exit 2
fi

# --recipe=NAME: one flag file per recipe (comments and blank lines ignored)
recipe_args=()
if [ -n "$recipe" ]; then
    recipe_file="$repo_dir/recipes/$recipe.txt"
    if [ ! -f "$recipe_file" ]; then
        echo "error: no recipe '$recipe' (have: $(cd "$repo_dir/recipes" && ls *.txt | sed 's/\.txt$//' | tr '\n' ' '))" >&2
        exit 2
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
torchrun_py='
import logging, os, signal, socket, sys
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

# A new run never destroys the previous one: its folders are moved aside (a rename, nothing copied).
# With --resume the run continues in its own folder and its log grows.
if [ "$resuming" = 0 ]; then
    stamp=$(date +%Y%m%d-%H%M%S)
    for r in $node_ranks; do
        if [ -d "$OUTPUT_ROOT/$r" ] && [ -n "$(ls -A "$OUTPUT_ROOT/$r" 2>/dev/null)" ]; then
            kept="$OUTPUT_ROOT/$r.prev-$stamp"
            n=1; while [ -e "$kept" ]; do kept="$OUTPUT_ROOT/$r.prev-$stamp-$n"; n=$((n + 1)); done
            mv "$OUTPUT_ROOT/$r" "$kept" && echo "note: the previous run in $OUTPUT_ROOT/$r was moved to $kept"
        fi
    done
fi
mkdir -p "$output_dir"

start_time=$(date +%s)
# main.py runs from the caller's directory, so relative paths in any flag mean what the user meant.
mode_args=(); [ "$MODE" = perf ] && mode_args=(--epochs 1 --max-steps 100)
"${launch[@]}" "$repo_dir/main.py" "${data_args[@]}" --output-dir "$output_dir" "${log_file_arg[@]}" \
    "${DEFAULT_ARGS[@]}" "${recipe_args[@]}" "${mode_args[@]}" "${user_epochs[@]}" "${passthrough[@]}"
status=$?
e2e_time=$(( $(date +%s) - start_time ))
case "$status" in
    0) ;;
    75|129|130|143)  # preempted (checkpoint saved), or stopped by SIGHUP, SIGINT or SIGTERM
        if [ -f "$output_dir/checkpoint.pth" ] || [ "$log_rank" != 0 ]; then  # (rank 0's node holds the checkpoint)
            echo "stopped by a signal; to continue from the last checkpoint: $resume_cmd" >&2
            exit 75
        fi
        echo "stopped by a signal before the first checkpoint: nothing to resume" >&2
        exit "$status" ;;
    2|3) exit "$status" ;;  # a user error or a non-finite loss: main.py has said which, in one line
    *)  if [ -f "$log" ]; then
            echo "error: training exited with status $status; see $log" >&2
        else  # it stopped before main.py opened its log: never point to a file that does not exist
            echo "error: training exited with status $status before it wrote a log" >&2
        fi
        exit "$status" ;;
esac
if [ ! -f "$output_dir/run.json" ]; then  # torchrun on a node without rank 0, or --test-only
    echo "(no run.json from rank 0 in $output_dir: the summary is written on the node with NODE_RANK=0)"
    exit 0
fi

# ---- summary, from the data rank 0 wrote (run.json + metrics.jsonl), not from the log's wording ----------
suffix=acc; [ "$MODE" = perf ] && suffix=perf
summary=$("$PYTHON" "$repo_dir/run_summary.py" "$output_dir" --mode "$suffix" --e2e-seconds "$e2e_time") || exit $?
echo "$summary"
CaseName=$(basename "$(echo "$summary" | sed -n 's/^Summary: //p')" .log)

# ---- training curves next to the summary (optional: a missing matplotlib never fails the run) -----------
if [ ! -f "$output_dir/metrics.jsonl" ]; then
    echo "note: no $output_dir/metrics.jsonl (no epoch finished), so no curves"
elif ! "$PYTHON" -c "import matplotlib" 2>/dev/null; then
    echo "note: matplotlib is not installed, so no curves (pip install matplotlib; then" \
         "python plot_metrics.py $output_dir/metrics.jsonl)"
else
    # titled by plot_metrics.py itself, as the README shows: "<Network>_bs<B>_<N>p: <E> epochs (<first>-<last>)"
    "$PYTHON" "$repo_dir/plot_metrics.py" "$output_dir/metrics.jsonl" -o "$output_dir/${CaseName}_curves.png" \
        || echo "note: plot_metrics.py failed; the run itself succeeded"
fi
