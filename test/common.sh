#!/bin/bash
# Shared body of the four launchers (train_{full,performance}_{1,8}p.sh), which only set defaults.
#
# Contract (as the Ascend reference):  --data_path=DIR  (required; perf launchers accept --synthetic instead)
#                                      --epochs=N       (optional)
#                                      anything else    passed through to main.py, after our defaults,
#                                                       so it overrides them (argparse: last one wins)
#                                      --recipe=NAME    (optional) flags from recipes/NAME.txt, applied after
#                                                       the launcher's defaults and before the user's flags
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
case "$OUTPUT_ROOT" in /*) ;; *) OUTPUT_ROOT="$PWD/$OUTPUT_ROOT" ;; esac   # main.py runs from the repo
Network="DenseNet201_for_PyTorch"

data_path=""
recipe="$DEFAULT_RECIPE"
user_epochs=()
synthetic=0
passthrough=()
for para in "$@"; do
    case "$para" in
        --data_path=*) data_path="${para#*=}" ;;
        --epochs=*) user_epochs=(--epochs "${para#*=}") ;;
        --recipe=*) recipe="${para#*=}" ;;
        --synthetic) synthetic=1; passthrough+=("--synthetic") ;;
        *) passthrough+=("$para") ;;
    esac
done
if [ -z "$data_path" ] && { [ "$MODE" != perf ] || [ "$synthetic" = 0 ]; }; then
    hint="--data_path=/path/to/imagenet"; [ "$MODE" = perf ] && hint="$hint (or --synthetic)"
    echo "error: $(basename "$0") needs $hint" >&2
    exit 2
fi
[ -d "$data_path" ] && data_path=$(cd "$data_path" && pwd)  # relative to the caller: we cd to the repo below
data_args=(); [ -n "$data_path" ] && data_args=(--data-path "$data_path")

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

RANK_SIZE=${RANK_SIZE:-$DEFAULT_RANK_SIZE}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-0}
if [ "$RANK_SIZE" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    log_rank=$((NODE_RANK * RANK_SIZE))                     # this node's first global rank
    log_file_arg=(--log-file "$OUTPUT_ROOT/{rank}/train_{rank}.log")
    launch=("$PYTHON" -m torch.distributed.run --nproc_per_node="$RANK_SIZE" --nnodes="$NNODES"
            --node_rank="$NODE_RANK" --master_addr="${MASTER_ADDR:-127.0.0.1}"
            --master_port="${MASTER_PORT:-29500}" --max-restarts="${MAX_RESTARTS:-0}")
else
    log_rank=$ASCEND_DEVICE_ID
    log_file_arg=(--log-file "$OUTPUT_ROOT/$log_rank/train_$log_rank.log" --device_id "$ASCEND_DEVICE_ID")
    launch=("$PYTHON")
fi
output_dir="$OUTPUT_ROOT/$log_rank"
log="$output_dir/train_$log_rank.log"
mkdir -p "$output_dir"
rm -f "$log"

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
if [ ! -f "$log" ] || { [ "${#launch[@]}" -gt 1 ] && [ "$log_rank" != 0 ]; }; then  # torchrun, NODE_RANK > 0
    echo "(no rank-0 log on this node: the summary is written on the node with NODE_RANK=0)"
    exit 0
fi

# ---- summary, from rank 0's log ------------------------------------------------------------------
FPS=$(grep -a ' FPS: ' "$log" | grep -v 'n/a' | tail -n 1 | awk '{print $4}')
train_accuracy=$(grep -a ' \* Acc@1' "$log" | grep -v EMA | tail -n 1 | awk -F 'Acc@1' '{print $NF}' | awk '{print $1}')
world_size=$(grep -a -o 'world size [0-9]*' "$log" | head -n 1 | awk '{print $3}')
BatchSize=$(grep -a -o 'batch [0-9]*' "$log" | head -n 1 | awk '{print $2}')
ActualLoss=$(grep -a 'Epoch: \[' "$log" | grep -a 'loss: ' | tail -n 1 | awk -F 'loss: ' '{print $2}' | awk '{print $1}')
echo "------------------ Final result ------------------"
echo "Final Performance images/sec : ${FPS}"
echo "Final Train Accuracy : ${train_accuracy}"
echo "E2E Training Duration sec : ${e2e_time}"

DeviceType=$(grep -a -o 'Device: [a-z]*' "$log" | head -n 1 | awk '{print $2}')
suffix=acc; [ "$MODE" = perf ] && suffix=perf
CaseName="${Network}_bs${BatchSize}_${world_size}p_${suffix}"
TrainingTime=$(awk -v b="$BatchSize" -v f="$FPS" 'BEGIN { if (f > 0) printf "%.2f", b * 1000 / f }')  # ms per step
{
    echo "Network = ${Network}"
    echo "RankSize = ${world_size}"
    echo "BatchSize = ${BatchSize}"
    echo "DeviceType = ${DeviceType}"
    echo "CaseName = ${CaseName}"
    echo "ActualFPS = ${FPS}"
    echo "TrainingTime = ${TrainingTime}"
    echo "TrainAccuracy = ${train_accuracy}"
    echo "ActualLoss = ${ActualLoss}"
    echo "E2ETrainingTime = ${e2e_time}"
} > "$output_dir/${CaseName}.log"
echo "Summary: $output_dir/${CaseName}.log"

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
