#!/usr/bin/env python3
"""Load test of an OpenAI-compatible server with vLLM's serving metrics; the same as `cupyllm bench-serve`.

    python scripts/loadtest.py --concurrency 16 --num-prompts 200 --input-len 512 --max-tokens 128 --ignore-eos
    python scripts/loadtest.py --launch "cupyllm serve --port 8000" --duration 30 --json run.json
    python scripts/loadtest.py --compare cupyllm.json vllm.json

The code lives in api/bench_serve.py (client and metrics), api/bench_target.py (the server process:
cold start, memory, exact-length prompts) and api/bench_report.py (tables); see docs/performance.md.
"""
import sys

from api.bench_serve import main

if __name__ == "__main__":
    sys.exit(main())
