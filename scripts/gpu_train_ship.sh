#!/usr/bin/env bash
# The one-GPU run that trains the shipped `hst` and `euclid` models and their control nets
# (docs/training.md, "Shipped models"), evaluates them on 1,000 held-out lenses each and
# times sampling, all inside one fixed wall-clock budget.
#
# Usage (repository root, lensflow importable, one CUDA GPU):
#     OUT=runs/gpu bash scripts/gpu_train_ship.sh [TRAIN_S] [FINETUNE_S]
#     PRESETS=euclid OUT=runs/gpu bash scripts/gpu_train_ship.sh 420 90   # one preset
#     TRAIN_EXTRA="--normalize-flux --rms-range-factor 3" PRESETS=euclid OUT=runs/gpu \
#         bash scripts/gpu_train_ship.sh 420 90          # flux-normalized, wider amplitude/noise
#     TRAIN_EXTRA="--prior broad" EVAL_EXTRA="--test-prior default" OUT=runs/gpu \
#         bash scripts/gpu_train_ship.sh 420 90          # the broad training prior, evaluated
#                                                        # on the shipped models' test lenses
#
# Both presets train at once on the one GPU, each for TRAIN_S seconds (default 300) with
# the cosine schedule spread over that time (TrainConfig.time_limit_s); then the control
# nets (gradient for both presets, learned for euclid, and a t_start 0.6 gradient variant
# for euclid) finetune at once for FINETUNE_S seconds (default 90) while the base models
# are evaluated. Models go to ship/, logs and tables to runs/gpu_logs; $OUT receives
# only the bundles base.tgz.* (the base models, split in 15 MB parts), nets.tgz (the
# control nets and the logs so far) and rest.tgz (all logs).
#
# Options (environment):
#     HST_CONTINUE_S=S  also continue the shipped hst gradient net (lensflow/models/
#                       hst-gradient) on the GPU for S seconds while the base trains, into
#                       ship_hst/ beside a copy of the shipped hst base; benchmarked at the end
#     T06=0             skip the t_start 0.6 euclid variant
# The sampling benchmarks run one after another so that their timings are not shared.
set -u
T=${1:-300}
F=${2:-90}
OUT=${OUT:-runs/gpu}
L=runs/gpu_logs
PRESETS=${PRESETS:-"hst euclid"}
TRAIN_EXTRA=${TRAIN_EXTRA:-}  # more train_preset.py flags, e.g. --normalize-flux
EVAL_EXTRA=${EVAL_EXTRA:-}  # more evaluate_model.py flags, e.g. --test-prior default
HST_CONTINUE_S=${HST_CONTINUE_S:-0}
T06=${T06:-1}
has() { case " $PRESETS " in *" $1 "*) return 0 ;; esac; return 1; }
mkdir -p "$OUT" "$L" ship
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$L/gpu.txt"
python -c "import torch, caustics; print('torch', torch.__version__, 'caustics',
caustics.__version__, torch.cuda.get_device_name(0))" | tee -a "$L/gpu.txt"

ARCH="--base-channels 40 --width 512 --n-blocks 4 --embed-dim 256"
log "training $PRESETS for $T s each"
for p in $PRESETS; do
    timeout $((T + 120)) python scripts/train_preset.py --preset "$p" --device cuda \
        --time-limit "$T" --steps 1000000 --batch-size 256 --lr 1e-3 --warmup 200 \
        --n-val 1024 --val-every 250 --checkpoint-every 1000 --times-per-example 4 \
        --mask-probability 0.3 --tf32 --threads 4 $ARCH $TRAIN_EXTRA --out "runs/${p}_gpu" \
        >"$L/train_$p.log" 2>&1 &
done
if [ "$HST_CONTINUE_S" -gt 0 ]; then
    mkdir -p ship_hst && cp lensflow/models/hst.json lensflow/models/hst.safetensors ship_hst/
    timeout $((HST_CONTINUE_S + 90)) python -m lensflow.cli finetune --model ship_hst/hst.json \
        --signal gradient --init lensflow/models/hst-gradient.json --out ship_hst \
        --steps 1000000 --batch-size 64 --lr 1e-3 --seed 9 --device cuda \
        --time-limit "$HST_CONTINUE_S" --quiet \
        --status "CPU-trained 3,000 steps, continued on the GPU for $HST_CONTINUE_S s" \
        >"$L/ft_hst_continue.log" 2>&1 &
fi
timeout 240 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
    tests/test_simulator.py >"$L/pytest_gpu.log" 2>&1 &
wait
tail -c 600 "$L/pytest_gpu.log"
for p in $PRESETS; do
    tail -n 1 "$L/train_$p.log"
    cp "runs/${p}_gpu/model.safetensors" "ship/$p.safetensors"
    cp "runs/${p}_gpu/model.json" "ship/$p.json"
done
# The base models first, so they come back even if a later stage runs out of time.
tar czf - ship | split -b 15M - "$OUT/base.tgz."
ls -la "$OUT"

log "finetuning control nets for $F s; evaluating the base models"
ft() {  # preset signal t_start outdir
    timeout $((F + 90)) python -m lensflow.cli finetune --model "ship/$1.json" --signal "$2" \
        --t-start "$3" --out "$4" --steps 1000000 --batch-size 64 --lr 2e-3 --seed 1 \
        --device cuda --time-limit "$F" --quiet --status "GPU-trained" \
        >"$L/ft_$1_$2_$3.log" 2>&1
}
mkdir -p ship_t06
if has hst; then ft hst gradient 0.8 ship & fi
if has euclid; then
    ft euclid gradient 0.8 ship &
    ft euclid learned 0.8 ship &
    if [ "$T06" != 0 ]; then (cp ship/euclid.* ship_t06/ && ft euclid gradient 0.6 ship_t06) & fi
fi
for p in $PRESETS; do
    timeout 240 python scripts/evaluate_model.py --model "ship/$p.json" --device cuda \
        --threads 4 --n-lenses 1000 --n-samples 200 --lens-chunk 250 --test-data "$p" $EVAL_EXTRA \
        --json "$L/eval_$p.json" >"$L/eval_$p.txt" 2>&1 &
done
wait
cat "$L"/ft_*.log | grep -v "^\s*$" | tail -n 8
grep -h "^| all\|^## " "$L"/eval_*.txt

# The control nets next, before the benchmarks that might run out of time.
tar czf "$OUT/nets.tgz" --exclude='ship_hst/hst.*' ship/*-* ship_t06 ship_hst "$L"
log "sampling benchmarks"
bench() {  # model-json name
    timeout 90 python scripts/bench_sampling.py --model "$1" --device cuda \
        --threads 4 --repeats 2 --feedback gradient --feedback-lenses 100 \
        >"$L/bench_$2.txt" 2>&1
    cat "$L/bench_$2.txt"
}
for p in $PRESETS; do bench "ship/$p.json" "$p"; done
if [ "$HST_CONTINUE_S" -gt 0 ]; then bench ship_hst/hst.json hst_continued; fi
rm -f ship_t06/euclid.safetensors ship_t06/euclid.json
tar czf "$OUT/rest.tgz" "$L" runs/*_gpu/train_state.json
log "done"
ls -la "$OUT"
