"""Append GPU benchmark lines (JSON, one per line) to perf/history.jsonl with date, commit, card, command."""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from pathlib import Path

HISTORY = Path(__file__).resolve().parent.parent / "perf" / "history.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bench_jsonl", help="bench.jsonl written by scripts/gpu_check.sh")
    ap.add_argument("--card", required=True, help="e.g. 'NVIDIA H100 80GB HBM3'")
    ap.add_argument("--command", default="scripts/gpu_check.sh bench")
    ap.add_argument("--commit", default=None, help="the commit the device ran (default: HEAD)")
    ap.add_argument("--reason", default=None, help="why a figure regressed, if it did")
    args = ap.parse_args()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
    date = datetime.date.today().isoformat()
    lines = []
    for line in Path(args.bench_jsonl).read_text().splitlines():
        if line.strip():
            figures = json.loads(line)
            # the bookkeeping is ours: a device copy has no git (its own "commit" is null)
            entry = {**figures, "date": date, "commit": commit, "card": figures.get("card") or args.card,
                     "command": args.command}
            if args.reason:
                entry["reason"] = args.reason
            lines.append(json.dumps(entry, sort_keys=True))
    with HISTORY.open("a") as f:
        f.write("".join(line + "\n" for line in lines))
    print(f"appended {len(lines)} entries to {HISTORY}")


if __name__ == "__main__":
    main()
