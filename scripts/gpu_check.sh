#!/usr/bin/env bash
# Every GPU test and benchmark in one call on the H100: logs and JSON under $OUT, a short table last.
# Usage: scripts/gpu_check.sh [all|tests|bench] [pytest -k expression]
# Record the figures afterwards with: python scripts/record_history.py <files_at>/bench.jsonl --card ...
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
what=${1:-all}
filter=${2:-}
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import cupy, numpy, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

if [[ $what == all || $what == tests ]]; then
  timeout 420 python3 -m pytest tests/gpu -q -rs -x ${filter:+-k "$filter"} \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi

if [[ $what == all || $what == bench ]]; then
  : > "$OUT/bench.jsonl"
  for bench in perf/gpu_*.py; do
    echo "== $bench"
    timeout 150 python3 "$bench" --json "$OUT/bench.jsonl" 2>&1 | tail -30 | tee -a "$OUT/bench.log"
  done
fi

python3 scripts/gpu_summary.py "$OUT" || true
exit $status
