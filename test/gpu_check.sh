#!/usr/bin/env bash
# gpu_check.sh -- the project's one-command check on an NVIDIA GPU machine.
#
#   bash test/gpu_check.sh                       # logs under test/output/gpu_check_<timestamp>/
#   GPU_CHECK_DIR=/tmp/gc bash test/gpu_check.sh # logs there instead
#
# Without a CUDA GPU (torch.cuda.is_available() false) it prints one line and exits 0, running nothing else.
# With one, in about 8 minutes on a single modern GPU (every step has its own `timeout`; the sum of the limits
# is the worst case), from the repository root:
#
#  (a) smoke tests of the CUDA path, end to end, on scikit-learn's real handwritten digits written as an
#      ImageNet-layout folder of 32x32 PNGs (make_digits.py; 1,438 train / 359 val images), DenseNet-121:
#        data           make_digits.py writes the folder
#        perf_synth     main.py --synthetic, DenseNet-201, --amp, batch 128: the "Train [0] FPS:" line
#        bf16           --amp --amp-dtype bf16 --keep-checkpoints all: training, evaluation, checkpoint.pth, model_0.pth
#        fp16_static    --amp --amp-dtype fp16 --loss_scale_value 1024
#        fp16_dynamic   --amp --amp-dtype fp16 --loss_scale_value dynamic
#        resume_auto    bf16 again with --epochs 2 --resume auto: continues bf16's run at epoch 1
#        test_only      --test-only --resume bf16/checkpoint.pth
#        determ_a/_b    --deterministic, run twice: must finish; identical last losses reported as a note
#        ema_mixup      --model-ema --mixup-alpha 0.2: the EMA model evaluated too
#        predict_cpu    predict.py --device cpu on the CUDA-trained checkpoint
#        ddp_gloo       torchrun, 2 ranks on the one GPU (--device_ids 0,0) over gloo (NCCL refuses two ranks
#                       on one GPU): DDP, the gloo control group, sharded evaluation
#        nccl_1rank     a 1-rank NCCL process group (bound to the GPU) + DDP via trainer.build_trainer(
#                       distributed=True) -> device.wrap_ddp, a few Trainer.steps and an all_reduce
#      Each prints PASS or FAIL with its log file; a step that fails does not stop the others.
#  (b) throughput, benchmark.py (the training step main.py runs, Trainer.step, against the plain eager
#      torchvision loop in the same process, both fed a pinned uint8 batch normalised on the GPU), DenseNet-201
#      at 224 px, medians of timed windows, peak GPU memory per configuration, results as JSON:
#        bench_bf16     -b 128,256, bf16: reference fp32, reference AMP (bf16 autocast), ours channels_last
#                       and NCHW
#        bench_fp16     -b 128,256, fp16: reference AMP (fp16 autocast + GradScaler), ours channels_last and
#                       NCHW (static loss scale 1024, main.py's default)
#        bench_e2e      end to end on 2,000 generated ImageNet-sized JPEGs (~500x375) with the default number of
#                       loader workers vs synthetic data and the loader alone, batch 256, bf16:
#                       "is one GPU input-bound?"
#        bench_compile  -b 256, bf16: ours channels_last with and without torch.compile (compile time apart)
#      GPU_CHECK_FULL=1: benchmark.py's own GPU defaults (10 warm-up steps, 5 windows of 20 steps instead of
#      5 / 3 x 10) and torch.compile at both batch sizes in both dtypes -- expect 20-30 minutes.
#  (c) prints one table (throughput, ratios, memory, compile time, the e2e verdict, then every step's
#      PASS/FAIL) and leaves every log, checkpoint and JSON under the folder it names.
#
# Exit status: 0 when every smoke step and every benchmark run passed (a benchmark that only ran out of time
# is reported, not failed), 1 otherwise. Environment: GPU_CHECK_DIR, GPU_CHECK_FULL, PYTHON (default python).
set -u

PY=${PYTHON:-python}
cd "$(dirname "$0")/.." || exit 1

if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU visible; nothing to check"
    exit 0
fi

DIR=${GPU_CHECK_DIR:-test/output/gpu_check_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$DIR" || exit 1
DIR=$(cd "$DIR" && pwd)
FULL=${GPU_CHECK_FULL:-0}
T0=$SECONDS
SUMMARY=()      # one line per step
FAILED=0        # smoke or benchmark steps that failed
echo "gpu_check: logs in $DIR"

# Environment, for the record.
{
    date
    timeout 30 nvidia-smi 2>&1 || true
    "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__); \
print(torch.cuda.get_device_name(0), 'bf16:', torch.cuda.is_bf16_supported(including_emulation=False))" 2>&1
    echo "CPUs: $(nproc)"
} >"$DIR/env.log" 2>&1

# step NAME TIMEOUT_S [CHECK ...] -- COMMAND [ARG ...]
#   Runs COMMAND with a time limit, its output in $DIR/NAME.log. PASS when it exits 0 and every CHECK holds:
#   a CHECK is an extended regular expression the log must match, or file:PATH, a file that must exist.
#   Sets STEP_RC (124 on a timeout) and STEP_WHY (empty when passed).
step() {
    local name=$1 secs=$2 log="$DIR/$1.log" start=$SECONDS check checks=()
    shift 2
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do checks+=("$1"); shift; done
    shift
    printf '$ %s\n' "$*" >"$log"
    timeout -k 15 "$secs" "$@" >>"$log" 2>&1
    STEP_RC=$?
    STEP_WHY=""
    if [ "$STEP_RC" -eq 124 ] || [ "$STEP_RC" -eq 137 ]; then
        STEP_RC=124
        STEP_WHY="timed out after ${secs} s"
    elif [ "$STEP_RC" -ne 0 ]; then
        STEP_WHY="exit code $STEP_RC: $(grep -E 'Error|error|FAIL' "$log" | tail -n 1 | cut -c1-160)"
    else
        for check in ${checks[@]+"${checks[@]}"}; do
            if [ "${check#file:}" != "$check" ]; then
                [ -f "${check#file:}" ] || { STEP_WHY="missing file ${check#file:}"; break; }
            elif ! grep -Eq -- "$check" "$log"; then
                STEP_WHY="log lacks /$check/"
                break
            fi
        done
    fi
    local took=$((SECONDS - start)) line
    if [ -z "$STEP_WHY" ]; then
        line=$(printf 'PASS  %-14s %4ds  %s' "$name" "$took" "$log")
    elif [ "$STEP_RC" -eq 124 ] && [ "$TIMEOUT_FAILS" = 0 ]; then
        line=$(printf 'TIME  %-14s %4ds  %s  (%s; partial results kept)' "$name" "$took" "$log" "$STEP_WHY")
    else
        line=$(printf 'FAIL  %-14s %4ds  %s  (%s)' "$name" "$took" "$log" "$STEP_WHY")
    fi
    echo "$line"
    SUMMARY+=("$line")
}

# A smoke step: any failure counts.
smoke() {
    TIMEOUT_FAILS=1 step "$@"
    [ -z "$STEP_WHY" ] || FAILED=$((FAILED + 1))
}

# A benchmark run: running out of time is reported (the partial JSON is kept), not failed.
bench() {
    TIMEOUT_FAILS=0 step "$@"
    if [ -n "$STEP_WHY" ] && [ "$STEP_RC" -ne 124 ]; then
        FAILED=$((FAILED + 1))
    fi
}

note() {
    echo "      $1"
    SUMMARY+=("      $1")
}

# ---------------------------------------------------------------------------------------------------------------
# (a) smoke tests
# ---------------------------------------------------------------------------------------------------------------
DATA="$DIR/digits"
TRAIN=(main.py --device cuda --data-path "$DATA" --model densenet121 --train-crop-size 32 --val-resize-size 32
       --val-crop-size 32 -b 64 -j 4 --lr 0.05 --print-freq 10 --warmup-steps 2)

echo "== (a) smoke tests (DenseNet-121 on 32x32 digits; each step's log named) =="
smoke data 120 "wrote [0-9]+ train" -- "$PY" make_digits.py "$DATA" --size 32 --seed 0

smoke perf_synth 150 "Train \[0\] FPS: [0-9]" "precision: native torch.autocast" -- \
    "$PY" main.py --device cuda --synthetic --model densenet201 --amp -b 128 --epochs 1 --max-steps 40 \
    --warmup-steps 10 --print-freq 10 -j 2 --overwrite --output-dir "$DIR/perf_synth"

smoke bf16 150 "torch.autocast\(cuda, bf16\)" "Train \[0\] done" " \* Acc@1" \
    "file:$DIR/bf16/checkpoint.pth" "file:$DIR/bf16/model_0.pth" -- \
    "$PY" "${TRAIN[@]}" --amp --amp-dtype bf16 --epochs 1 --keep-checkpoints all --overwrite --output-dir "$DIR/bf16"

smoke fp16_static 150 "torch.autocast\(cuda, fp16\), static loss scale 1024" " \* Acc@1" \
    "file:$DIR/fp16_static/checkpoint.pth" -- \
    "$PY" "${TRAIN[@]}" --amp --amp-dtype fp16 --loss_scale_value 1024 --epochs 1 --overwrite \
    --output-dir "$DIR/fp16_static"

smoke fp16_dynamic 150 "torch.autocast\(cuda, fp16\), dynamic loss scale" " \* Acc@1" \
    "file:$DIR/fp16_dynamic/checkpoint.pth" -- \
    "$PY" "${TRAIN[@]}" --amp --amp-dtype fp16 --loss_scale_value dynamic --epochs 1 --overwrite \
    --output-dir "$DIR/fp16_dynamic"

smoke resume_auto 150 "Resumed from .*checkpoint\.pth: weights after epoch 0; continuing at epoch 1" \
    "Train \[1\] done" " \* Acc@1" "file:$DIR/bf16/model_1.pth" -- \
    "$PY" "${TRAIN[@]}" --amp --amp-dtype bf16 --epochs 2 --keep-checkpoints all --resume auto --output-dir "$DIR/bf16"

smoke test_only 120 "Evaluating .*checkpoint\.pth: weights after epoch" " \* Acc@1" -- \
    "$PY" "${TRAIN[@]}" --amp --amp-dtype bf16 --test-only --resume "$DIR/bf16/checkpoint.pth" \
    --output-dir "$DIR/test_only"

for run in a b; do
    smoke "determ_$run" 150 "Train \[0\] done" "file:$DIR/determ_$run/metrics.jsonl" -- \
        "$PY" "${TRAIN[@]}" --deterministic --epochs 1 --max-steps 8 --overwrite \
        --output-dir "$DIR/determ_$run"
    if [ -n "$STEP_WHY" ] && grep -q CUBLAS_WORKSPACE_CONFIG "$DIR/determ_$run.log"; then
        note "(cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment for deterministic algorithms)"
    fi
done
if [ -f "$DIR/determ_a/metrics.jsonl" ] && [ -f "$DIR/determ_b/metrics.jsonl" ]; then
    note "--deterministic twice: last losses $("$PY" -c "
import json, sys
a, b = (json.loads(open(p).read().splitlines()[-1]).get('last_loss') for p in sys.argv[1:])
print(f'{a!r} vs {b!r}:', 'identical' if a == b else 'DIFFERENT')" "$DIR/determ_a/metrics.jsonl" \
        "$DIR/determ_b/metrics.jsonl" 2>&1)"
fi

smoke ema_mixup 150 "Model EMA: decay" " \* EMA Acc@1" "file:$DIR/ema_mixup/checkpoint.pth" -- \
    "$PY" "${TRAIN[@]}" --amp --model-ema --model-ema-steps 4 --mixup-alpha 0.2 --epochs 1 --overwrite \
    --output-dir "$DIR/ema_mixup"

smoke predict_cpu 120 "\.png: [^ ]+ \([0-9.]+%\)" -- \
    "$PY" predict.py --weights "$DIR/bf16/checkpoint.pth" --device cpu -b 32 "$DATA/val/3"

smoke ddp_gloo 200 "world size 2; global batch 64 = 2 x 32" "Train \[0\] done" " \* Acc@1" \
    "file:$DIR/ddp_gloo/checkpoint.pth" -- \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 "${TRAIN[@]}" --amp --dist-backend gloo \
    --device_ids 0,0 --epochs 1 --overwrite --output-dir "$DIR/ddp_gloo"

smoke nccl_1rank 120 "nccl 1-rank DDP: OK" -- "$PY" -c '
import math, os, socket, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.getcwd())
import config, data as data_lib, device as device_lib, trainer as trainer_lib
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dev = device_lib.resolve_device("cuda")
device_lib.configure_backends(dev)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev.torch_device)
args = config.get_args_parser().parse_args(["--synthetic", "--device", "cuda", "--model", "densenet121", "--amp",
                                            "-b", "32", "--num_classes", "10"])
config.resolve_from_checkpoint(args)
amp = device_lib.build_mixed_precision(args, dev)
tr = trainer_lib.build_trainer(args, dev, 10, amp, channels_last=True, distributed=True, local_batch=32, world_size=1)
assert isinstance(tr.model, torch.nn.parallel.DistributedDataParallel), type(tr.model)
batch = data_lib.SyntheticLoader(32, 64, 10, 1, pin_memory=True).batch
losses = [float(tr.step(batch.images, batch.targets, 0.05)[1]) for _ in range(5)]
x = torch.full((1,), 3.0, device=dev.torch_device)
dist.all_reduce(x)
assert all(math.isfinite(v) for v in losses) and x.item() == 3.0, (losses, x)
print("backend", dist.get_backend(), "precision", amp.describe(), "losses", [round(v, 4) for v in losses])
print("nccl 1-rank DDP: OK")
dist.destroy_process_group()
'

# ---------------------------------------------------------------------------------------------------------------
# (b) throughput
# ---------------------------------------------------------------------------------------------------------------
if [ "$FULL" = 1 ]; then
    COUNTS=()                       # benchmark.py's GPU defaults: 10 warm-up, 5 windows x 20 steps
    COMPILE_FLAGS=(--compile)       # compile inside the bf16 and fp16 runs, at both batch sizes
else
    COUNTS=(--warmup 5 --steps 10 --windows 3)
    COMPILE_FLAGS=()
fi
BENCH=("$PY" benchmark.py --device cuda --model densenet201 --image-size 224 ${COUNTS[@]+"${COUNTS[@]}"})

echo "== (b) throughput: DenseNet-201, 224 px (benchmark.py; logs and JSON named) =="
bench bench_bf16 300 "speed-up vs reference AMP" "file:$DIR/bench_bf16.json" -- \
    "${BENCH[@]}" --sections compute -b 128,256 --amp-dtype bf16 --channels-last both --references fp32,amp \
    --no-ours-fp32 ${COMPILE_FLAGS[@]+"${COMPILE_FLAGS[@]}"} --json "$DIR/bench_bf16.json"
bench bench_fp16 240 "speed-up vs reference AMP" "file:$DIR/bench_fp16.json" -- \
    "${BENCH[@]}" --sections compute -b 128,256 --amp-dtype fp16 --channels-last both --references amp \
    ${COMPILE_FLAGS[@]+"${COMPILE_FLAGS[@]}"} --json "$DIR/bench_fp16.json"
bench bench_e2e 240 "input-bound: " "file:$DIR/bench_e2e.json" -- \
    "${BENCH[@]}" --sections e2e --images 2000 -b 256 --amp-dtype bf16 --no-reference --json "$DIR/bench_e2e.json"
if [ "$FULL" != 1 ]; then
    bench bench_compile 360 "torch.compile: .* first step took" "file:$DIR/bench_compile.json" -- \
        "${BENCH[@]}" --sections compute -b 256 --amp-dtype bf16 --channels-last on --references amp --compile \
        --json "$DIR/bench_compile.json"
fi

# ---------------------------------------------------------------------------------------------------------------
# (c) one table
# ---------------------------------------------------------------------------------------------------------------
echo
echo "== gpu_check summary ($((SECONDS - T0)) s; everything under $DIR) =="
"$PY" - "$DIR" <<'PYEOF'
import glob, json, os, sys
folder = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(folder, "bench_*.json"))):
    run = os.path.basename(path)[len("bench_"):-len(".json")]
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        print(f"  {path}: unreadable ({e})")
        continue
    meta = doc.get("meta", {})
    print(f"  {run}: {meta.get('device')}, torch {meta.get('torch')}, {meta.get('windows')} windows x "
          f"{meta.get('steps')} steps after {meta.get('warmup')}")
    for label, r in doc.get("results", {}).items():
        rows.append((run, label, r))


def num(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


head = f"  {'run':<8} {'batch':>5}  {'configuration':<60} {'img/s':>8} {'vs AMP ref':>10} {'vs fp32 ref':>11} " \
       f"{'peak GiB':>8} {'compile s':>9}"
print(head)
print("  " + "-" * (len(head) - 2))
for run, label, r in rows:
    if r.get("section") != "compute":
        continue
    name = label.split(": ", 1)[1] if ": " in label else label
    if r.get("error"):
        print(f"  {run:<8} {r.get('batch', ''):>5}  {name[:60]:<60} {r['error']}")
        continue
    mem = r.get("peak_memory_mib")
    print(f"  {run:<8} {r.get('batch', ''):>5}  {name[:60]:<60} {num(r.get('median'), '8.1f'):>8} "
          f"{num(r.get('vs_reference_amp'), '.2f') + ('x' if r.get('vs_reference_amp') else ''):>10} "
          f"{num(r.get('vs_reference_fp32'), '.2f') + ('x' if r.get('vs_reference_fp32') else ''):>11} "
          f"{num(mem / 1024 if mem else None, '8.2f'):>8} {num(r.get('compile_s'), '9.1f'):>9}")
for run, label, r in rows:
    if r.get("section") != "e2e":
        continue
    if label == "e2e: verdict":
        print(f"  e2e verdict (batch {r['batch']}, {r['workers']} loader workers): input-bound: "
              f"{dict(yes='YES', no='no', contention='no, but contended').get(r.get('verdict'), '?')} -- loader alone {r['loader_img_per_s']:.0f} img/s, "
              f"synthetic {r['synthetic_img_per_s']:.0f} img/s, real JPEGs {r['real_img_per_s']:.0f} img/s "
              f"({100 * r['real_over_synthetic']:.0f}% of synthetic)")
    else:
        print(f"  {run:<8} {r.get('batch', ''):>5}  {label[5:65]:<60} {num(r.get('median'), '8.1f'):>8}")
if not rows:
    print("  (no benchmark results)")
PYEOF
echo
for line in ${SUMMARY[@]+"${SUMMARY[@]}"}; do
    echo "$line"
done
if [ "$FAILED" -gt 0 ]; then
    echo "gpu_check: $FAILED step(s) FAILED; logs in $DIR"
    exit 1
fi
echo "gpu_check: all steps passed; logs in $DIR"
exit 0
