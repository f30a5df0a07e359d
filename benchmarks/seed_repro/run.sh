#!/usr/bin/env bash
# Reproduces benchmarks/seed_repro: the seed article's experiment scaled to this 2-core CPU machine.
#   benchmarks/seed_repro/run.sh            # step times + the four pdserve topologies (~50 min)
#   VLLM=1 benchmarks/seed_repro/run.sh     # also vLLM's CPU build (see below; ~+12 min)
#   QUICK=1 benchmarks/seed_repro/run.sh    # 20 requests at 3 rates: a smoke test (~6 min)
# Outputs go to benchmarks/seed_repro/results/ (steps.json, results.json, summary.md, figures, logs).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/seed_repro/results}
MODEL=dummy:qwen3-cpu-bench
INPUT_LEN=112      # prefill ~120 ms on one core = 0.12 x the 1 s TTFT SLO, as in the article (README)
OUTPUT_LEN=100     # >= 100 gaps per request, so a per-request p99 ignores one outlier gap
RATES=${RATES:-0.5,1,1.5,2,2.5,3,4,5,6,7,8}
NUM_PROMPTS=${NUM_PROMPTS:-100}
HEADLINE=${HEADLINE:-8}
if [[ -n "${QUICK:-}" ]]; then RATES=1,4,8; NUM_PROMPTS=20; OUT=${OUT}-quick; fi
mkdir -p "$OUT"
COMMON=(--rates "$RATES" --num-prompts "$NUM_PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN"
        --ttft-slo 1000 --itl-slo 50 --headline-rate "$HEADLINE" --seed 0 --warmup 4)

echo "== step times on one pinned core (load avg $(cut -d' ' -f1-3 /proc/loadavg))"
"$PY" benchmarks/seed_repro/measure_steps.py --model "$MODEL" --input-len 64 "$INPUT_LEN" 256 \
    --batch 1 4 8 16 24 32 --context $((INPUT_LEN + OUTPUT_LEN / 2)) --steps 30 --repeats 9 --json "$OUT/steps.json"

echo "== pdserve: standard:1, standard:2, disagg-read, disagg-write"
"$PY" -m pdserve.cli sweep "$MODEL" --topologies standard:1,standard:2,disagg-read,disagg-write \
    "${COMMON[@]}" --engine-args "--kv-cache-memory 0.25" --out "$OUT" || echo "pdserve sweep reported errors"

if [[ -n "${VLLM:-}" ]]; then
    # vLLM's CPU build on the same weights: one instance on both cores (= standard:1), and two
    # instances on one core each behind pdserve's proxy in standard mode (= standard:2).
    VLLM_BIN=${VLLM_BIN:-/tmp/vllm-peer/bin/vllm}
    DIR=$OUT/vllm-model
    [[ -d $DIR ]] || "$PY" -m pdserve.cli export "$MODEL" "$DIR"
    PIDS=()
    cleanup() { for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; wait || true; }
    trap cleanup EXIT
    start_vllm() {  # PORT CORES LOG
        HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=$2 setsid "$VLLM_BIN" serve "$DIR" \
            --host 127.0.0.1 --port "$1" --dtype bfloat16 --max-model-len 4096 >"$3" 2>&1 &
        PIDS+=($!)
    }
    wait_up() { for _ in $(seq 600); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
    start_vllm 8301 0-1 "$OUT/vllm-1.log"; wait_up http://127.0.0.1:8301
    "$PY" -m pdserve.cli sweep "$MODEL" --topologies '' --base-url vllm-standard:1=http://127.0.0.1:8301 \
        --baseline vllm-standard:1 "${COMMON[@]}" --out "$OUT/vllm" || echo "vLLM sweep reported errors"
    cleanup; PIDS=()
    start_vllm 8302 0 "$OUT/vllm-2a.log"; start_vllm 8303 1 "$OUT/vllm-2b.log"
    wait_up http://127.0.0.1:8302; wait_up http://127.0.0.1:8303
    setsid "$PY" -m pdserve.cli proxy --port 8304 --no-registry --mode standard \
        --instance http://127.0.0.1:8302 http://127.0.0.1:8303 >"$OUT/vllm-proxy.log" 2>&1 &
    PIDS+=($!); wait_up http://127.0.0.1:8304
    "$PY" -m pdserve.cli sweep "$MODEL" --topologies '' --base-url vllm-standard:2=http://127.0.0.1:8304 \
        --baseline vllm-standard:2 "${COMMON[@]}" --out "$OUT/vllm2" || echo "vLLM sweep reported errors"
fi
