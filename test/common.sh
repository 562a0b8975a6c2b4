#!/bin/bash
# Shared body of the four launchers (train_{full,performance}_{1,8}p.sh), which only set defaults.
#
# Contract (as the Ascend reference):  --data_path=DIR  (required; perf launchers accept --synthetic instead)
#                                      --epochs=N       (optional)
#                                      --device_id=N    (1p) device N, output in output/N/ (else ASCEND_DEVICE_ID, 0)
#                                      --recipe=NAME    (optional) flags from recipes/NAME.txt, applied after
#                                                       the launcher's defaults and before the user's flags
#                                      --key=value      that main.py does not take (the original's --batch_size=,
#                                                       --ckpt_path=, ...): ignored with a warning, as the original
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
PYTHON=${PYTHON:-python3}
OUTPUT_ROOT=${OUTPUT_ROOT:-$test_path_dir/output}   # per-rank folders <root>/<rank>/
case "$OUTPUT_ROOT" in /*) ;; *) OUTPUT_ROOT="$PWD/$OUTPUT_ROOT" ;; esac   # the same folder whatever main.py's cwd

# main.py's own options: a --key=value that is none of them is one of the original's launcher-only arguments
# (--batch_size=, --ckpt_path=, --conda_name=, ...), which its launchers ignore; so do we, saying so.
main_options=" $(grep -o '"--[A-Za-z0-9_-]*"' "$repo_dir/main.py" | tr -d '"' | tr '\n' ' ') "

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
        --*=*) if [[ "$main_options" == *" ${para%%=*} "* ]]; then passthrough+=("$para"); else ignored+=("$para"); fi ;;
        *) passthrough+=("$para") ;;
    esac
done
[ "${#ignored[@]}" -gt 0 ] && echo "warning: ignored launcher argument(s) that main.py does not take: ${ignored[*]}" >&2
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
    launch=("$PYTHON" -m torch.distributed.run --nproc_per_node="$RANK_SIZE" --nnodes="$NNODES"
            --node_rank="$NODE_RANK" --master_addr="${MASTER_ADDR:-127.0.0.1}"
            --master_port="${MASTER_PORT:-29500}" --max-restarts="${MAX_RESTARTS:-0}")
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
if [ "$status" != 0 ]; then
    echo "error: training exited with status $status; see $log" >&2
    exit "$status"
fi
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
    "$PYTHON" "$repo_dir/plot_metrics.py" "$output_dir/metrics.jsonl" -o "$output_dir/${CaseName}_curves.png" \
        --title "$CaseName" || echo "note: plot_metrics.py failed; the run itself succeeded"
fi
