"""The short table gpu_check.sh prints last: test counts from the junit XML and one line per benchmark."""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(out: str) -> None:
    out_dir = Path(out)
    xml = out_dir / "gpu_tests.xml"
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        a = suite.attrib
        print(f"GPU tests: {a.get('tests')} run, {a.get('failures')} failed, {a.get('errors')} errors, "
              f"{a.get('skipped')} skipped, {float(a.get('time', 0)):.0f} s")
    bench = out_dir / "bench.jsonl"
    if bench.exists():
        print(f"{'bench':<28} {'shape':<34} {'dtype':<9} {'us':>9} {'figure':>16}")
        for line in bench.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            figure = (f"{r['gbps']:.0f} GB/s" if "gbps" in r else
                      f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else "")
            print(f"{r.get('bench', '?'):<28} {str(r.get('shape', ''))[:34]:<34} {str(r.get('dtype', '')):<9} "
                  f"{r.get('us', float('nan')):>9.1f} {figure:>16}")


if __name__ == "__main__":
    main(sys.argv[1])
