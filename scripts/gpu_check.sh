#!/usr/bin/env bash
# Every GPU test and benchmark in one call on the H100: logs and JSON under $OUT, a short table last.
# Usage: scripts/gpu_check.sh MODE[,MODE...] [pytest -k expression]   (modes below; all = tests,bench,serve)
#   tests  tests/gpu but test_serve_gpu.py (serve runs it) -> $OUT/gpu_tests.{log,xml}
#   bench  perf/gpu_*.py -> $OUT/bench.{jsonl,log}
#   serve  the HTTP server on the GPU: installs the server's wheels carried in .whl/ (sanic, orjson, openai and
#          their small dependencies: cp ../shared/device-wheels/*.whl .whl/, and carry .whl), runs
#          tests/gpu/test_serve_gpu.py, then the serving benchmark (scripts/compare_vllm.sh) on Qwen2.5-7B's shape
#          with dummy weights -> $OUT/serve/{summary.txt,cupyllm.json,cupyllm.log}, its history line appended to
#          $OUT/bench.jsonl. About 3-4 minutes on an H100.
#   all    tests, bench, then serve
#   jit    issue #12 in one call: the engine benchmark on a fresh machine (Qwen2.5-7B shape, fp16, 32 in / 512 out,
#          N = 1..256) -> $OUT/engine.{jsonl,log}; a warm restart (everything cached) -> $OUT/engine_warm.jsonl;
#          the JIT kernels against the hand ones -> $OUT/kernels.{jsonl,log}; then tests/gpu -> $OUT/gpu_tests.log.
#          About 6 minutes on an H100.
#   spec   issue #14: tests/gpu/test_spec_gpu.py, eager verify steps then verify graphs -> $OUT/spec_tests.log
#   specbench  issue #14: the acceptance-controlled benchmark and the verify cost curve -> $OUT/spec.{jsonl,log}
#   structured  issue #16: tests/gpu/test_token_mask.py, the host's mask cost and the engine benchmark at N = 1, 16
#          plain and with a JSON schema on every request (7B shape, stand-in 152K tokenizer) -> $OUT/structured.*
#   moe    issue #18's mixtures of experts: tests/gpu/test_moe_gpu.py, the MoE checkpoints of test_engine_gpu.py, then
#          the engine benchmark on Qwen3-30B-A3B's shape (dummy weights, bf16, 32 in / 128 out, N = 1, 16, 64)
#          -> $OUT/moe_tests.log, $OUT/moe.{jsonl,log}. About 4 minutes.
#   newgpu tests/gpu written without a GPU: sliding-window attention and engine parity, NCCL -> $OUT/newgpu_tests.log
#   fp8bench  issues #13, #12: the engine benchmark (N = 1..256, 32 in / 512 out) fp16, fp8 weights, fp8 weights and
#          KV, then the KV blocks at a 32K context fp16 and fp8 -> $OUT/engine.{jsonl,log}. About 5 minutes.
#   fp8    issue #13: cuBLASLt's FP8 enums against the machine's headers, tests/gpu/test_fp8_gpu.py and the FP8-cache
#          attention tests -> $OUT/fp8_tests.log, perf/fp8_quality.py, the engine benchmark fp16, fp8 weights, fp8 KV
#          cache, both -> $OUT/engine.{jsonl,log}, then the rest of tests/gpu in the time left -> $OUT/gpu_tests.log.
# At most 8 files come back from $OUT: `all` writes exactly 8 (env.txt, gpu_tests.log, gpu_tests.xml, bench.jsonl,
# bench.log, serve/summary.txt, serve/cupyllm.json, serve/cupyllm.log).
# Record the figures afterwards with: python scripts/record_history.py <files_at>/bench.jsonl --card ...
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
what=${1:-all}
filter=${2:-}
status=0
[[ $what == all ]] && what=tests,bench,serve
for mode in ${what//,/ }; do
  case $mode in
    tests | bench | serve | jit | fp8 | fp8bench | spec | specbench | structured | newgpu | moe) ;;
    *) echo "usage: $0 [all|tests|bench|serve|jit|fp8|fp8bench|spec|specbench|structured|newgpu|moe][,more modes] [pytest -k expression]" >&2
       exit 2 ;;
  esac
done
want() { [[ ",$what," == *",$1,"* ]]; }  # modes run in this file's order, whatever order they are named in

# Every mode needs tqdm (weights upload, graph capture); serve and structured more: install what .whl/ carries
# (cp ../shared/device-wheels/*.whl .whl/ and the wheels the device README says how to fetch; carry .whl).
if compgen -G ".whl/*.whl" >/dev/null; then
  timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

# The serving benchmark (issue #6). 16 clients in a closed loop, 128 output tokens after prompts of 512 tokens
# (compare_vllm.sh's default: every request brings prefill work into the running batch, as real traffic does, and
# contexts stay short of where attention would dominate a 7B decode step). 320 requests are 20 waves of 16, so
# that the p95 latencies are not just the first wave's, whose 16 prefills all land in one step.
# --max-model-len 1024 covers 512 + 128 with room; the decode graphs are captured for it.
SERVE_CONFIG=${SERVE_CONFIG:-perf/configs/qwen2.5-7b}
SERVE_ARGS=${SERVE_ARGS:---load-format dummy --dtype float16 --max-model-len 1024}
SERVE_CONCURRENCY=${SERVE_CONCURRENCY:-16}
SERVE_NUM_PROMPTS=${SERVE_NUM_PROMPTS:-320}
SERVE_INPUT_LEN=${SERVE_INPUT_LEN:-512}
SERVE_OUTPUT_LEN=${SERVE_OUTPUT_LEN:-128}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import cupy, numpy, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

if want jit; then
  ENGINE_ARGS="--model perf/configs/qwen2.5-7b --load-format dummy --dtype float16 --input-len 32"
  echo "== engine benchmark, nothing cached on this machine yet"
  timeout 240 python3 -m api.cli benchmark $ENGINE_ARGS --output-len 512 --n 1,16,64,128,256 \
    --json "$OUT/engine.jsonl" 2>&1 | tail -60 | tee "$OUT/engine.log"
  echo "== warm restart: kernels, GEMM choices and autotune picks on disk"
  timeout 90 python3 -m api.cli benchmark $ENGINE_ARGS --output-len 64 --n 1 --json "$OUT/engine_warm.jsonl" 2>&1 \
    | tail -25 | tee -a "$OUT/engine.log"
  echo "== JIT kernels against the hand-written ones"
  timeout 120 python3 perf/gpu_kernels.py --impl jit,hand --tokens 1,64,256 --json "$OUT/kernels.jsonl" 2>&1 \
    | tail -40 | tee "$OUT/kernels.log"
  echo "== host cost of an eager prefill: JIT launchers against the hand ones"
  timeout 120 python3 perf/eager_profile.py perf/configs/qwen2.5-7b --json "$OUT/kernels.jsonl" 2>&1 | tail -45 \
    | tee "$OUT/eager.log"
  left=$(( ${JIT_BUDGET_S:-570} - SECONDS ))  # the tests get what the call has left, so their log comes back whole
  echo "== tests/gpu (${left} s left)"
  timeout $(( left > 30 ? left : 30 )) python3 -m pytest tests/gpu -q -rs ${filter:+-k "$filter"} \
    --ignore=tests/gpu/test_serve_gpu.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi

# Issue #14 on the 7B shape: tok/s with an acceptance-controlled proposer (K = 4) against plain decoding, then the
# verify step's cost curve (K = 1..8, every step verified, nothing accepted) -> $OUT/spec.{jsonl,log}
spec() {
  local args="--model perf/configs/qwen2.5-7b --load-format dummy --dtype float16 --input-len 32 --output-len 256"
  timeout 90 python3 -m api.cli benchmark $args --n 1,16,64 --spec-acceptance 0,0.5,0.8,1 \
    --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}' --json "$OUT/spec.jsonl" 2>&1 \
    | grep -E "^N=|speculation|verify" | tee "$OUT/spec.log"
  for k in ${SPEC_COST_K:-1 2 4 8}; do
    timeout 60 python3 -m api.cli benchmark $args --output-len 64 --n 1,16,64 --spec-acceptance 0 --spec-gate off \
      --speculative-config "{\"method\": \"ngram\", \"num_speculative_tokens\": $k}" --json "$OUT/spec.jsonl" 2>&1 \
      | grep -E "^N=|speculation" | tee -a "$OUT/spec.log"
  done
}

if want spec; then  # issue #14: the GPU tests, then spec() (SPEC_COST_K picks the cost curve's K)
  for g in 0 1; do  # eager verify steps, then the verify graphs (CUPYLLM_VERIFY_GRAPHS=1)
    CUPYLLM_VERIFY_GRAPHS=$g timeout 90 python3 -m pytest -q -rfE -s --tb=short tests/gpu/test_spec_gpu.py \
      >> "$OUT/spec_tests.log" 2>&1 || status=1
  done
  grep -E "drafts|^FAILED|^E |passed|failed" "$OUT/spec_tests.log" | tail -20
fi
if want specbench; then  # issue #14's benchmarks, with the verify graphs
  CUPYLLM_VERIFY_GRAPHS=1 spec
fi

if want newgpu; then  # this session's new GPU tests: sliding-window kernels and engine, the NCCL communicator
  timeout 300 python3 -m pytest -q -rfE --tb=short tests/gpu/test_attention.py tests/gpu/test_engine_gpu.py \
    tests/gpu/test_nccl.py -k "sliding or window or nccl or single_rank" > "$OUT/newgpu_tests.log" 2>&1 || status=1
  grep -E "^FAILED|^E |passed|failed" "$OUT/newgpu_tests.log" | tail -20
  # tensor parallelism over two GPUs (skips on one); a hung NCCL call ends at the timeout
  timeout 600 python3 -m pytest -q -rfEs --tb=short tests/gpu/test_tp_gpu.py > "$OUT/tp_gpu_tests.log" 2>&1 || status=1
  grep -E "^FAILED|^E |^SKIPPED|passed|failed|skipped" "$OUT/tp_gpu_tests.log" | tail -20
fi

if want moe; then  # issue #18: the MoE kernels and checkpoints, then Qwen3-30B-A3B's shape
  timeout 200 python3 -m pytest -q -rfE -s --tb=short tests/gpu/test_moe_gpu.py > "$OUT/moe_tests.log" 2>&1 || status=1
  timeout 200 python3 -m pytest -q -rfE --tb=short tests/gpu/test_engine_gpu.py -k "moe or mixtral" \
    >> "$OUT/moe_tests.log" 2>&1 || status=1
  grep -E "^FAILED|^E |passed|failed|tiles of" "$OUT/moe_tests.log" | tail -30
  timeout 240 python3 -m api.cli benchmark --model perf/configs/qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
    --input-len 32 --output-len 128 --max-model-len 1024 --n 1,16,64 --json "$OUT/moe.jsonl" 2>&1 | grep -E "^N=|weights|ready|memory|KV" \
    | tee "$OUT/moe.log"
fi

if want structured; then  # issue #16: the mask kernel's tests, then N = 1, 16 with a JSON schema each
  # needs llguidance and orjson: cp ../shared/device-wheels/*.whl .whl/, pip download llguidance into .whl/ (see
  # the device README), and carry .whl
  for t in tests/gpu/test_token_mask.py tests/gpu/test_structured_gpu.py; do  # apart: one's import error spares the other
    timeout 120 python3 -m pytest -q -rfE -s --tb=short $t >> "$OUT/structured_tests.log" 2>&1 || status=1
  done
  grep -E "^FAILED|^E |passed|failed|mask cost|masked late" "$OUT/structured_tests.log" | tail -20
  model=/tmp/structured-model  # the 7B shape with a 152K stand-in tokenizer (llguidance's masks cost by vocabulary)
  mkdir -p $model && cp perf/configs/qwen2.5-7b/config.json $model/ && python3 perf/synthetic_tokenizer.py $model
  timeout 100 python3 perf/structured_mask_cost.py $model --n 1,16,64 --json "$OUT/structured.jsonl" 2>&1 \
    | tee "$OUT/structured.log"
  timeout 240 python3 -m api.cli benchmark --model $model --load-format dummy --dtype float16 --input-len 32 \
    --output-len 256 --n 1,16 --structured --json "$OUT/structured.jsonl" 2>&1 | grep -E "^N=|structured|ready" \
    | tee -a "$OUT/structured.log"
fi

if want fp8bench; then  # issues #13 and #12: the engine benchmark fp16, fp8 weights, fp8 weights + fp8 KV, one machine
  ENGINE_ARGS="--model perf/configs/qwen2.5-7b --load-format dummy --dtype float16 --input-len 32 --output-len 512"
  for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8"; do
    echo "== engine benchmark ${q:-fp16}"
    timeout 130 python3 -m api.cli benchmark $ENGINE_ARGS $q --n 1,16,64,128,256 --json "$OUT/engine.jsonl" 2>&1 \
      | grep -E "^N=|weights|KV blocks|ready|memory" | tee -a "$OUT/engine.log"
  done
  echo "== KV blocks at a 32K context, 256 sequences (memory decides): fp16, then fp8"
  for kv in auto fp8; do
    timeout 60 python3 -m api.cli benchmark $ENGINE_ARGS --kv-cache-dtype $kv --max-model-len 32768 --n 256 \
      --output-len 8 --no-history 2>&1 | grep -E "KV blocks|memory:" | tee -a "$OUT/engine.log"
  done
  # the GEMM choices these runs measured (fp16 and fp8 shapes): ship them as ops/tuned/ (ops/autotune.SHIPPED_DIR)
  cp "${CUPYLLM_CACHE:-$HOME/.cache/cupyllm}"/autotune/*.json "$OUT"/ 2>/dev/null || echo "no autotune table to copy"
fi

if want fp8; then
  ENGINE_ARGS="--model perf/configs/qwen2.5-7b --load-format dummy --dtype float16 --input-len 32 --output-len 512"
  grep -nE "SCALE_MODE|SCALE_POINTER|OUTER_VEC|CUDA_R_8F_E4M3" /usr/local/cuda/include/cublasLt.h \
    /usr/local/cuda/include/library_types.h 2>&1 | head -20 | tee -a "$OUT/env.txt"
  timeout 60 python3 -m pytest -q tests/test_cublaslt_cpu.py 2>&1 | tail -3 | tee -a "$OUT/env.txt"
  echo "== tests/gpu/test_fp8_gpu.py, the FP8-cache attention tests"
  timeout 200 python3 -m pytest -q -rfEs -s --tb=short tests/gpu/test_fp8_gpu.py tests/gpu/test_attention.py \
    -k "fp8 or Fp8" > "$OUT/fp8_tests.log" 2>&1
  status=$?
  grep -E "^(FAILED|ERROR|SKIPPED)|cosine|passed|failed" "$OUT/fp8_tests.log" | tail -40
  echo "== KV blocks at a 32K context, 256 sequences (memory decides, not the 4-per-slot cap): fp16, then fp8"
  for kv in auto fp8; do
    timeout 60 python3 -m api.cli benchmark $ENGINE_ARGS --kv-cache-dtype $kv --max-model-len 32768 --n 256 \
      --output-len 8 --no-history 2>&1 | grep -E "KV blocks|memory:" | tee -a "$OUT/engine.log"
  done
  if [[ ${FP8_QUICK:-0} == 1 ]]; then  # then the W8A16 GEMV, and the JIT kernels against the hand ones (#12)
    timeout 120 python3 -m pytest -q -rfE --tb=short tests/gpu/test_gemv_fp8.py 2>&1 | tail -15 | tee "$OUT/gemv.log"
    timeout 150 python3 perf/gpu_gemv_fp8.py --json "$OUT/kernels.jsonl" 2>&1 | tail -22 | tee -a "$OUT/gemv.log"
    for w in 0 8; do
      echo "== engine benchmark, fp8 weights, W8A16 GEMV up to $w tokens"
      CUPYLLM_W8A16_MAX_TOKENS=$w timeout 90 python3 -m api.cli benchmark $ENGINE_ARGS --quantization fp8 \
        --n 1,8,16,128 --output-len 256 --no-history --json "$OUT/engine.jsonl" 2>&1 | tail -7 | tee -a "$OUT/gemv.log"
    done
    CUPYLLM_W8A16_MAX_TOKENS=8 timeout 100 python3 -m pytest -q -rfE --tb=short tests/gpu/test_fp8_gpu.py \
      -k engine 2>&1 | tail -6 | tee -a "$OUT/gemv.log"
    timeout 120 python3 perf/gpu_kernels.py --impl jit,hand --tokens 1,64,256 --json "$OUT/kernels.jsonl" 2>&1 \
      | tail -40 | tee "$OUT/kernels.log"
    exit $status
  fi
  echo "== fp8 quality on the 7B shape (dummy weights), and weight bytes"
  timeout 90 python3 perf/fp8_quality.py perf/configs/qwen2.5-7b --json "$OUT/engine.jsonl" 2>&1 | tail -5 \
    | tee "$OUT/engine.log"
  for q in "" "--quantization fp8" "--kv-cache-dtype fp8" "--quantization fp8 --kv-cache-dtype fp8"; do
    echo "== engine benchmark ${q:-fp16}"
    timeout 120 python3 -m api.cli benchmark $ENGINE_ARGS $q --n 1,16,64,128,256 --json "$OUT/engine.jsonl" 2>&1 \
      | tail -25 | tee -a "$OUT/engine.log"
  done
  left=$(( ${JIT_BUDGET_S:-570} - SECONDS ))
  echo "== tests/gpu but fp8 and serve (${left} s left)"
  timeout $(( left > 30 ? left : 30 )) python3 -m pytest tests/gpu -q -rs ${filter:+-k "$filter"} \
    --ignore=tests/gpu/test_serve_gpu.py --ignore=tests/gpu/test_fp8_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi

if want tests; then
  timeout 420 python3 -m pytest tests/gpu -q -rs -x ${filter:+-k "$filter"} --ignore=tests/gpu/test_serve_gpu.py \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi

if want bench; then
  : > "$OUT/bench.jsonl"
  for bench in perf/gpu_*.py; do
    echo "== $bench"
    timeout 150 python3 "$bench" --json "$OUT/bench.jsonl" 2>&1 | tail -30 | tee -a "$OUT/bench.log"
  done
fi

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Each step under its own timeout, so that one hang leaves time for the rest; a killed load test still stops the
# server it launched (api/bench_serve.py handles SIGTERM).
serve() {
  local dir=$OUT/serve model=/tmp/serve-bench-model rc=0 port
  mkdir -p "$dir"
  if python3 -c 'import sanic, orjson, openai' 2>/dev/null; then
    echo "== sanic, orjson and openai are installed already"
  elif compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing the server's wheels from .whl/ into /tmp/site"
    timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "serve: installing the wheels failed"; return 1; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    python3 -c 'import sanic, orjson, openai' || { echo "serve: the server's packages do not import"; return 1; }
  else
    echo "serve: sanic, orjson or openai is missing and .whl/ holds no wheels: cp ../shared/device-wheels/*.whl .whl/" \
         "here, and name .whl in the call's carry"
    return 1
  fi

  echo "== tests/gpu/test_serve_gpu.py"
  # The -k expression filters this test in `serve` mode only: in `all` it is meant for tests/gpu.
  [[ $what == serve ]] || filter=
  timeout -k 30 180 python3 -m pytest tests/gpu/test_serve_gpu.py -q -rs ${filter:+-k "$filter"}
  case $? in
    0) ;;
    5) command -v nvidia-smi >/dev/null && rc=1; echo "(the test was skipped: see why above)" ;;
    *) rc=1 ;;
  esac

  echo "== benchmark model directory: $SERVE_CONFIG's config.json and a synthetic tokenizer"
  timeout 60 python3 -m api.bench_model "$model" --config "$SERVE_CONFIG" || return 1

  # A fresh machine's first start compiles the kernels and tunes the GEMMs; later starts read both from disk.
  # The benchmark below measures such a later start; this one, the first.
  echo "== first start on this machine (nothing cached yet), one short request"
  port=$(free_port)
  timeout -k 60 150 python3 scripts/loadtest.py --base-url "http://127.0.0.1:$port" --model bench \
    --launch "python3 -m api.cli serve $model --host 127.0.0.1 --port $port --served-model-name bench $SERVE_ARGS" \
    --launch-timeout 120 --launch-log /tmp/serve-first-start.log --num-prompts 1 --warmup 0 --concurrency 1 \
    --input-len 16 --max-tokens 8 --ignore-eos --json /tmp/serve-first-start.json \
    | grep -E "^(start-up|server CPU|GPU memory|successful)" \
    || { rc=1; echo "first start failed; its log ends:"; tail -20 /tmp/serve-first-start.log; }

  echo "== serving benchmark: $SERVE_CONFIG, $SERVE_ARGS; $SERVE_CONCURRENCY clients, $SERVE_NUM_PROMPTS requests," \
       "$SERVE_INPUT_LEN prompt + $SERVE_OUTPUT_LEN output tokens"
  rm -f /tmp/serve-bench.jsonl
  OUT=$dir VLLM=skip PYTHON=python3 CONCURRENCY=$SERVE_CONCURRENCY NUM_PROMPTS=$SERVE_NUM_PROMPTS \
    INPUT_LEN=$SERVE_INPUT_LEN OUTPUT_LEN=$SERVE_OUTPUT_LEN LAUNCH_TIMEOUT=180 BENCH_JSONL=/tmp/serve-bench.jsonl \
    CUPYLLM_ARGS=$SERVE_ARGS timeout -k 60 300 scripts/compare_vllm.sh "$model" || rc=1
  # vLLM is not on the device (VLLM=skip saves the probe); its published H100 figures are in ../shared/GPU.md.

  python3 - "$dir/cupyllm.json" /tmp/serve-bench.jsonl /tmp/serve-first-start.json "$SERVE_CONFIG" "$SERVE_ARGS" \
    "$OUT/bench.jsonl" <<'EOF' || rc=1
"""Issue #6's targets from the benchmark's JSON; its history line, with what identifies the model, to bench.jsonl."""
import json, os, shlex, subprocess, sys

result_path, line_path, first_path, config, server_args, bench_jsonl = sys.argv[1:]
if not os.path.exists(result_path):
    sys.exit(f"no benchmark result ({result_path}): see the output above")
r = json.load(open(result_path))
first = json.load(open(first_path)) if os.path.exists(first_path) else {}
mb = 1e6 / 2 ** 20  # MiB per MB
args = shlex.split(server_args)
dtype = args[args.index("--dtype") + 1] if "--dtype" in args else "auto"
print(f"\n== issue #6 figures ({os.path.basename(os.path.normpath(config))}, {dtype}, {r['completed']} requests,"
      f" {r['failed']} failed)")
for title, value, unit, target in (
        ("output throughput", r["output_throughput"], "tok/s", None),
        ("TTFT median / p99", f"{r['median_ttft_ms']:.1f} / {r['p99_ttft_ms']:.1f}", "ms", None),
        ("TPOT median / p99", f"{r['median_tpot_ms']:.2f} / {r['p99_tpot_ms']:.2f}", "ms", None),
        ("E2E latency median / p95", f"{r['median_e2el_ms']:.0f} / {r['p95_e2el_ms']:.0f}", "ms", None),
        ("E2E p95 spread (% of p50)", r["p95_spread_e2el_pct"], "%", 1.5),
        ("start-up to first token, first start", first.get("cold_start_first_token_s"), "s", None),
        ("start-up to first token", r["cold_start_first_token_s"], "s", None),
        ("CPU RSS under load", r["server_rss_mib"] and r["server_rss_mib"] / mb, "MB", 400),
        ("CPU RSS peak", r["server_rss_peak_mib"] and r["server_rss_peak_mib"] / mb, "MB", None),
        ("GPU memory peak", r["gpu_memory_peak_mib"], f"MiB ({r['gpu_memory_source']})", None)):
    shown = "n/a" if value is None else value if isinstance(value, str) else f"{value:,.2f}"
    verdict = "" if target is None or value is None else f"  target < {target}: {'met' if value < target else 'MISSED'}"
    print(f"{title:<40}{shown:>16} {unit}{verdict}")
print("installed size: scripts/env_size.sh (on the CPU machine; perf/history.jsonl, bench env_size)")
if os.path.exists(line_path):
    try:
        card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.splitlines()
    except OSError:  # no nvidia-smi: a CPU dry run
        card = []
    with open(bench_jsonl, "a") as out:
        for line in open(line_path):
            entry = {**json.loads(line), "model": os.path.basename(os.path.normpath(config)), "dtype": dtype}
            if card:
                entry["card"] = card[0].strip()
            out.write(json.dumps(entry) + "\n")
EOF
  echo "== GPU processes left running: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null \
    | tr '\n' ' ')(none expected)"
  return $rc
}

if want serve; then
  mkdir -p "$OUT/serve"
  serve 2>&1 | tee "$OUT/serve/summary.txt"
  serve_status=${PIPESTATUS[0]}
  ((status == 0)) && status=$serve_status
fi

python3 scripts/gpu_summary.py "$OUT" || true
exit $status
