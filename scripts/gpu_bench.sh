#!/usr/bin/env bash
# Benchmarks for one GPU machine: issue 3's per-lens comparison (flow, flow + feedback and
# emcee on the GPU, lenstronomy + emcee on one core of the same host, all on one lens in one
# run) and issue 7's feedback cost (bench_sampling.py). docs/benchmarks.md has the results and how to read them.
#
# Usage (repository root, lensflow importable, one CUDA GPU):
#     STAGE=mcmc OUT=runs/gpu_bench bash scripts/gpu_bench.sh
#     STAGE=sampling OUT=runs/gpu_bench bash scripts/gpu_bench.sh
#     STAGE=feedback OUT=runs/gpu_bench bash scripts/gpu_bench.sh
#
# Options (environment):
#     LENS=demo_01   the demo lens(es) of the mcmc stage; a comma list (demo_02,demo_03,...)
#                    runs one emcee process and one lenstronomy process per lens at the
#                    same time (the GPU is shared: emcee's 64-walker steps leave it mostly
#                    idle), the flows in one process over all of them
#     SET=...        lensflow bench --set sizes of the mcmc stage (default below: emcee
#                    1,000 burn-in + up to 30,000 steps, cut by emcee_max_wall_s=EMCEE_WALL
#                    seconds (69 tau at demo_01's tau of 435 if it runs to the end);
#                    lenstronomy PSO 100 x 100 and emcee 500 + 3,000 steps, a capped chain
#                    whose time to 10,000 samples is a lower bound). Every process of the
#                    stage gets the same SET; a stored run's key holds only its own
#                    method's sizes, so a later merge passes the union of the SETs.
#     EMCEE_WALL=280 wall-time limit of the emcee chain (burn-in plus sampling), seconds
#     EMCEE_THREADS=4  torch threads of each emcee process (with several lenses, keep
#                    lenses x threads within the host's cores)
#     FLOWS="flow,flow+feedback,flow+smc"   the flow methods of the mcmc stage
#     MCMC_S=440     time limit of the lenstronomy run (in parallel with the rest), seconds;
#                    0 skips lenstronomy (its 50-tau chain takes 1-1.5 h of a host core per
#                    lens, more than a lease: run it on a CPU and merge, docs/benchmarks.md)
#     FLOWS_S=150    time limit of the flows' run
#     EMCEE_S=       time limit of the emcee run (default EMCEE_WALL + 120: the optimizer
#                    start and the process's start-up come on top of the chain)
#     MERGE_S=140    time limit of its merge (C2ST, report); 0 skips it: merge the stored
#                    runs elsewhere with the same command plus --resume (each run's record
#                    keeps the machine it was timed on, and the merged report names it)
#     DEADLINE_S=    optional: the mcmc stage's whole budget from the script's start,
#                    seconds; the lenstronomy and emcee limits shrink so that the merge
#                    and the archive still fit (for a device lease with little time left)
#     PRESETS="euclid hst"  models of the sampling stage
#     SAMPLING_EXTRA=...    more bench_sampling.py flags (smaller sizes for a CPU dry run)
#     DEVICE=cuda
#     RUNS="hst:midpoint:40:4 ..."   feedback stage: PRESET:SOLVER:N_STEPS:CONTROL_STEPS of
#                    gradient feedback on N_LENSES held-out lenses (seed 20261125, 100
#                    samples each, as docs/feedback.md), drawn on the GPU and stored in
#                    OUT/fb-*.npz; score them on any machine with the same command plus
#                    --samples-npz FILE (no --device). "time:PRESET" rows time
#                    bench_sampling.py's feedback cases for every sampler of SAMPLERS.
#     N_LENSES=500, SAMPLERS="euler:40:8 midpoint:40:4 midpoint:20:2 rk4:10:1"
#     BUDGET_S=480   the feedback stage skips what would start after this many seconds
set -u
STAGE=${STAGE:-mcmc}
OUT=${OUT:-runs/gpu_bench}
DEVICE=${DEVICE:-cuda}
LENS=${LENS:-demo_01}
EMCEE_WALL=${EMCEE_WALL:-280}
SET=${SET:-emcee_burn=1000,emcee_steps=30000,emcee_max_wall_s=$EMCEE_WALL,lt_particles=100,lt_iterations=100,lt_burn=500,lt_steps=3000}
FLOWS=${FLOWS:-flow,flow+feedback,flow+smc}
MCMC_S=${MCMC_S:-440}
FLOWS_S=${FLOWS_S:-150}
EMCEE_S=${EMCEE_S:-$((EMCEE_WALL + 120))}
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
    # Each method in its own process, so that a run cut by its time limit costs only
    # itself; every finished run is stored (OUT/bench/runs/<lens>/<method>/) and bundled
    # into OUT/bench-runs.tgz at the end. Progress bars go to the logs (emcee's shows the
    # steps per second).
    B="python -m lensflow.cli bench --config full --lenses $LENS --set $SET"
    if [ -n "${DEADLINE_S:-}" ]; then  # leave the merge and the archive their time
        cap=$((DEADLINE_S - MERGE_S - 20 - SECONDS))
        MCMC_S=$((MCMC_S < cap ? MCMC_S : cap))
    fi
    LT=
    if [ "$MCMC_S" -gt 0 ]; then
        for L in ${LENS//,/ }; do
            log "lenstronomy on $L, one host core, in the background"
            timeout "$MCMC_S" python -m lensflow.cli bench --config full --lenses "$L" \
                --set "$SET" --methods lenstronomy --device cpu --threads 1 \
                --out "$OUT/bench" >"$OUT/bench-lenstronomy-$L.log" 2>&1 &
            LT="$LT $!"
        done
    fi
    log "$FLOWS on $DEVICE"
    timeout "$FLOWS_S" $B --methods "$FLOWS" --device "$DEVICE" --threads 4 --quiet \
        --out "$OUT/bench" >"$OUT/bench-flows.log" 2>&1
    log "flows rc $?"
    if [ -n "${DEADLINE_S:-}" ]; then
        cap=$((DEADLINE_S - MERGE_S - 20 - SECONDS))
        EMCEE_S=$((EMCEE_S < cap ? EMCEE_S : cap))
    fi
    EM=
    for L in ${LENS//,/ }; do
        log "emcee on $L, $DEVICE (limit $EMCEE_S s)"
        timeout "$EMCEE_S" python -m lensflow.cli bench --config full --lenses "$L" \
            --set "$SET" --methods emcee --device "$DEVICE" --threads "${EMCEE_THREADS:-4}" \
            --out "$OUT/bench" >"$OUT/bench-emcee-$L.log" 2>&1 &
        EM="$EM $!"
    done
    for pid in $EM; do
        wait "$pid"
        log "emcee process $pid rc $?"
    done
    for pid in $LT; do
        wait "$pid"
        log "lenstronomy process $pid rc $?"
    done
    # Merge the finished runs (--resume reuses them); C2ST, coverage and report recomputed.
    DONE=$(python -c "import json, pathlib, sys
print(','.join(json.loads(p.read_text())['method'] for p in
      sorted(pathlib.Path(sys.argv[1]).glob('runs/*/*/record.json'))))" "$OUT/bench")
    log "finished runs: ${DONE:-none}"
    if [ -n "$DONE" ] && [ "$MERGE_S" -gt 0 ]; then
        timeout "$MERGE_S" $B --methods "$DONE" --device "$DEVICE" --threads 4 --resume \
            --quiet --out "$OUT/bench" >"$OUT/bench-merge.log" 2>&1
        log "merge rc $?"
    fi
    # One archive (runs, report, figures): the device tool returns only a few files.
    tar czf "$OUT/bench-runs.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
    for f in "$OUT"/bench-emcee-*.log; do  # steps per second of each chain, for the docs
        [ -f "$f" ] && echo "$f: $(tr '\r' '\n' <"$f" | grep -E 'it/s|s/it' | tail -n 1)"
    done
    tail -n 3 "$OUT"/bench-*.log
fi

if [ "$STAGE" = sampling ]; then
    log "gpu tests of the feedback path"
    timeout 150 python -m pytest -q -m gpu tests/test_gpu.py -k feedback -p no:cacheprovider \
        2>&1 | tail -5 | tee "$OUT/gpu-tests.txt"
    S="python scripts/bench_sampling.py --device $DEVICE --threads 4 --repeats 1"
    S="$S --feedback gradient --feedback-lenses 100 --batch-lenses 1000 $SAMPLING_EXTRA"
    for p in $PRESETS; do
        log "$p"
        timeout 120 $S --model "$p" 2>&1 | tee "$OUT/sampling-$p.md"
    done
fi
if [ "$STAGE" = feedback ]; then
    N_LENSES=${N_LENSES:-500}
    SAMPLERS=${SAMPLERS:-"euler:40:8 midpoint:40:4 midpoint:20:2 rk4:10:1"}
    RUNS=${RUNS:-"hst:midpoint:40:4 time:hst euclid:euler:40:8 euclid:midpoint:40:4
          hst:midpoint:20:2 euclid:midpoint:20:2 time:euclid hst:rk4:10:1 euclid:rk4:10:1"}
    END=$((SECONDS + ${BUDGET_S:-480}))
    for r in $RUNS; do
        left=$((END - SECONDS))
        if [ "$left" -lt 20 ]; then log "skipped (budget): $r"; continue; fi
        IFS=: read -r p solver n cs <<<"$r"
        if [ "$p" = time ]; then
            log "timing $solver"
            timeout "$left" python scripts/bench_sampling.py --model "$solver" \
                --device "$DEVICE" --threads 4 --repeats 1 --batch-lenses 1000 \
                --feedback gradient --feedback-lenses 100 --feedback-samplers $SAMPLERS \
                $SAMPLING_EXTRA 2>&1 | tee "$OUT/sampling-$solver.md"
            continue
        fi
        log "$r"
        timeout "$left" python scripts/feedback_experiment.py --evaluate --model "$p" \
            --n-lenses "$N_LENSES" --n-samples 100 --lens-chunk 100 --device "$DEVICE" \
            --threads 4 --variants "gradient=lensflow/models/$p-gradient.json" \
            --solver "$solver" --n-steps "$n" --control-steps "$cs" --sample-only \
            --samples-npz "$OUT/fb-$p-$solver$n-cs$cs.npz" 2>&1 | tail -n 2
    done
fi
log done
