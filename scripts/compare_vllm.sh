#!/usr/bin/env bash
# The same streamed load against cupyllm and, when it is installed, vLLM, serving the same model one after
# the other (same GPU, never both at once); then a side-by-side table with ratios and a winner per metric,
# start-up to first token, CPU RSS and GPU memory. Without vLLM it says so and measures cupyllm alone.
#
# Usage: scripts/compare_vllm.sh [MODEL]      MODEL: a directory or HF name; default: cupyllm's demo model
# Settings from the environment (defaults in brackets):
#   CONCURRENCY [16]  NUM_PROMPTS [256]  INPUT_LEN [512]  OUTPUT_LEN [128]  ENDPOINT [/v1/completions]
#   OUT [compare-out]  PORT [a free one]  PYTHON [python3]  CUPYLLM_ARGS, VLLM_ARGS [extra serve flags]
#   VLLM [auto]: auto runs vLLM when `vllm` is installed, skip never does
#   LAUNCH_TIMEOUT [1800]: seconds each server may take to answer /health
#   BENCH_JSONL: append cupyllm's headline figures to this file, as one line for scripts/record_history.py
# On the CPU, short: CONCURRENCY=4 NUM_PROMPTS=16 INPUT_LEN=32 OUTPUT_LEN=16 scripts/compare_vllm.sh
# A model without weights or tokenizer (a config.json alone): build a directory for it with
#   python -m api.bench_model DIR --config perf/configs/qwen2.5-7b   and pass CUPYLLM_ARGS='--load-format dummy'
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODEL=${1:-}
OUT=${OUT:-compare-out}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$OUT"
URL=http://127.0.0.1:$PORT
LOAD=(--base-url "$URL" --model bench --endpoint "${ENDPOINT:-/v1/completions}"
      --concurrency "${CONCURRENCY:-16}" --num-prompts "${NUM_PROMPTS:-256}" --input-len "${INPUT_LEN:-512}"
      --max-tokens "${OUTPUT_LEN:-128}" --ignore-eos --seed 0 --warmup 2 --launch-timeout "${LAUNCH_TIMEOUT:-1800}")

# vLLM needs the model's path; cupyllm's demo model lives in its cache once built.
MODEL_PATH=$MODEL
if [[ -z $MODEL ]]; then
  MODEL_PATH=$("$PYTHON" -c 'from engine.demo import demo_model_dir; print(demo_model_dir())')
fi

echo "== cupyllm: ${MODEL:-the demo model} on $URL"
"$PYTHON" scripts/loadtest.py "${LOAD[@]}" --label cupyllm --json "$OUT/cupyllm.json" --launch-log "$OUT/cupyllm.log" \
  ${BENCH_JSONL:+--bench-jsonl "$BENCH_JSONL"} \
  --launch "$PYTHON -m api.cli serve $MODEL_PATH --host 127.0.0.1 --port $PORT --served-model-name bench ${CUPYLLM_ARGS:-}"
results=("$OUT/cupyllm.json")

VLLM_BIN=$(command -v vllm || true)
if [[ ${VLLM:-auto} == skip ]]; then
  echo "== vLLM: skipped (VLLM=skip): measuring cupyllm alone"
elif [[ -z $VLLM_BIN ]] && ! "$PYTHON" -c 'import vllm' 2>/dev/null; then
  echo "== vLLM is not installed (no 'vllm' command or module for $PYTHON): measuring cupyllm alone"
else
  VLLM_CMD=${VLLM_BIN:-$PYTHON -m vllm.entrypoints.cli.main}
  echo "== vLLM ($VLLM_CMD): $MODEL_PATH on $URL"
  "$PYTHON" scripts/loadtest.py "${LOAD[@]}" --label vllm --json "$OUT/vllm.json" --launch-log "$OUT/vllm.log" \
    --launch "$VLLM_CMD serve $MODEL_PATH --host 127.0.0.1 --port $PORT --served-model-name bench ${VLLM_ARGS:-}"
  results+=("$OUT/vllm.json")
fi

echo
"$PYTHON" scripts/loadtest.py --compare "${results[@]}"
prefix=$("$PYTHON" -c 'import sys; print(sys.prefix)')
if "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  echo "python environment $prefix: $(du -sm "$prefix" 2>/dev/null | cut -f1) MiB on disk (everything installed in it)"
else  # the system's Python: its prefix (/usr, say) holds the whole system, not what serving needs
  echo "python environment $prefix: not a virtual environment, its size is not measured (scripts/env_size.sh" \
       "measures a fresh one)"
fi
echo "JSON and server logs: $OUT/"
