#!/usr/bin/env bash
# Benchmarks for one GPU machine: issue 3's per-lens comparison (flow, flow + feedback and
# emcee on the GPU, lenstronomy + emcee on one core of the same host, all on one lens in one
# run) and issue 7's feedback cost (bench_sampling.py, eager and with the simulator
# compiled). docs/benchmarks.md has the results and how to read them.
#
# Usage (repository root, lensflow importable, one CUDA GPU):
#     STAGE=mcmc OUT=runs/gpu_bench bash scripts/gpu_bench.sh
#     STAGE=sampling OUT=runs/gpu_bench bash scripts/gpu_bench.sh
#
# Options (environment):
#     LENS=demo_01   the demo lens of the mcmc stage
#     SET=...        lensflow bench --set sizes of the mcmc stage (default below: emcee
#                    1,500 + 24,000 steps, 55 tau at demo_01's tau of 435; lenstronomy
#                    PSO 100 x 100 and emcee 500 + 3,000 steps, a capped chain whose time
#                    to 10,000 samples is a lower bound)
#     MCMC_S=440     time limit of the mcmc stage's runs, seconds
#     MERGE_S=140    time limit of its merge (C2ST, report)
#     PRESETS="euclid hst"  models of the sampling stage
#     SAMPLING_EXTRA=...    more bench_sampling.py flags (smaller sizes for a CPU dry run)
#     DEVICE=cuda
set -u
STAGE=${STAGE:-mcmc}
OUT=${OUT:-runs/gpu_bench}
DEVICE=${DEVICE:-cuda}
LENS=${LENS:-demo_01}
SET=${SET:-emcee_burn=1500,emcee_steps=24000,lt_particles=100,lt_iterations=100,lt_burn=500,lt_steps=3000}
MCMC_S=${MCMC_S:-440}
MERGE_S=${MERGE_S:-140}
PRESETS=${PRESETS:-"euclid hst"}
SAMPLING_EXTRA=${SAMPLING_EXTRA:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*"; }
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
python -c "import torch, caustics, platform, os; print('torch', torch.__version__, 'caustics',
caustics.__version__, platform.processor() or platform.machine(), os.cpu_count(), 'cores')" \
    | tee -a "$OUT/gpu.txt"

if [ "$STAGE" = mcmc ]; then
    B="python -m lensflow.cli bench --config full --lenses $LENS --set $SET --quiet"
    log "lenstronomy on one host core, in the background"
    timeout "$MCMC_S" $B --methods lenstronomy --device cpu --threads 1 --out "$OUT/bench" \
        >"$OUT/bench-lenstronomy.log" 2>&1 &
    LT=$!
    log "flow, flow+feedback and emcee on $DEVICE"
    timeout "$MCMC_S" $B --methods flow,flow+feedback,emcee --device "$DEVICE" --threads 4 \
        --out "$OUT/bench" >"$OUT/bench-gpu.log" 2>&1
    log "gpu run rc $?"
    wait $LT
    log "lenstronomy rc $?"
    # Merge: every run is reused (--resume); the C2ST, coverage and report are recomputed.
    timeout "$MERGE_S" $B --methods flow,flow+feedback,emcee,lenstronomy --device "$DEVICE" \
        --threads 4 --resume --out "$OUT/bench" >"$OUT/bench-merge.log" 2>&1
    log "merge rc $?"
    tail -n 5 "$OUT"/bench-*.log
fi

if [ "$STAGE" = sampling ]; then
    log "gpu tests of the feedback path"
    timeout 150 python -m pytest -q -m gpu tests/test_gpu.py -k feedback -p no:cacheprovider \
        2>&1 | tail -5 | tee "$OUT/gpu-tests.txt"
    S="python scripts/bench_sampling.py --device $DEVICE --threads 4 --repeats 1"
    S="$S --feedback gradient --feedback-lenses 100 --batch-lenses 1000 $SAMPLING_EXTRA"
    for p in $PRESETS; do
        log "$p: eager simulator"
        timeout 120 $S --model "$p" 2>&1 | tee "$OUT/sampling-$p-eager.md"
        log "$p: compiled simulator"
        timeout 200 $S --model "$p" --compile 2>&1 | tee "$OUT/sampling-$p-compile.md"
    done
fi
log done
