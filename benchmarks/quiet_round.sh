#!/usr/bin/env bash
# The benchmarks behind the "Current results" table of benchmarks/README.md, one after another.
# Run on an otherwise idle machine (about 10 minutes on 2 vCPUs); logs go to benchmarks/out/quiet/.
set -u
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
PY=${PY:-.venv/bin/python}
LOGS=benchmarks/out/quiet
mkdir -p "$LOGS"
run() {
    local name=$1; shift
    echo "== $name $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOGS/index.txt"
    timeout 900 "$@" > "$LOGS/$name.log" 2>&1
    echo "   rc=$? end $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOGS/index.txt"
}
run neuron  $PY benchmarks/analysis_scaling.py --sections neuron --rounds 3 --variants ray,inproc,inproc1
run pca     $PY benchmarks/analysis_scaling.py --sections pca --pca-rounds 3
run s3      $PY benchmarks/s3_read.py --rounds 3
run capture $PY benchmarks/capture_overhead.py --variants a,b,c,g
run writes  $PY benchmarks/write_throughput.py --modes raw-local,thread-local,ray-local,thread-local-sha256,ray-local-sha256
run serve   $PY benchmarks/serve_latency.py --clients 32 --seconds 10
run cli     $PY benchmarks/cli_startup.py
run causal  $PY benchmarks/causal_tokens.py --variants c,d --skip-runner
run sae     $PY benchmarks/sae_vs_saelens.py --speed-only
