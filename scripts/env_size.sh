#!/usr/bin/env bash
# Installed size of cupyllm with everything it needs to serve on a GPU: a fresh virtual environment in a temporary
# directory, `pip install '.[EXTRA]'` (the runtime dependencies and the CUDA extra, from the package index), then its
# size on disk, the size of the wheels it came from, and the largest packages. Nothing is left behind.
#
# Usage: scripts/env_size.sh [EXTRA]       EXTRA: cuda13 (default), cuda12, or none (the CPU install)
# Settings from the environment: PYTHON [python3]  TOP [12] (packages listed)  KEEP=1 (keep the temporary directory)
#   RECORD=1: append the figures to perf/history.jsonl (bench env_size, card cpu: a disk size, not a GPU figure)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extra=${1:-cuda13}
spec=.
[[ $extra == none ]] || spec=".[$extra]"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cupyllm-env-size.XXXXXX")
[[ ${KEEP:-0} == 1 ]] && echo "keeping $tmp" || trap 'rm -rf "$tmp"' EXIT

"$PYTHON" -m venv "$tmp/venv"
py=$tmp/venv/bin/python
# Wheels first (the project's own built from this checkout), so that their download sizes can be shown too.
"$py" -m pip wheel -q --disable-pip-version-check --no-cache-dir -w "$tmp/wheels" "$spec" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)  # a local index setting's noise
"$py" -m pip install -q --disable-pip-version-check --no-cache-dir --no-index --find-links "$tmp/wheels" \
  "cupyllm${spec#.}"
"$py" -m pip check --disable-pip-version-check
# Who pulls in what the extra does not name (cupy's own needs, say).
"$py" - <<'EOF'
import importlib.metadata as md
for name in ("cupyllm", "cupy-cuda13x", "cupy-cuda12x", "nvidia-cublas", "nvidia-cublas-cu12", "tokenizers"):
    try:
        needs = [r.split(";")[0].strip() for r in md.requires(name) or () if "extra ==" not in r]
    except md.PackageNotFoundError:
        continue
    print(f"{name} needs: {', '.join(needs) or 'nothing'}")
EOF

"$py" - "$tmp/venv" "$tmp/wheels" "$extra" "${TOP:-12}" "scripts/env_size.sh $extra" "${RECORD:-0}" <<'EOF'
"""Sizes: the whole environment (du), each installed distribution (its RECORD's files), each wheel."""
import datetime, importlib.metadata as md, json, os, subprocess, sys

venv, wheels, extra, top, command, record = sys.argv[1:]
MiB = 2 ** 20


def tree_bytes(root):
    """Bytes of the files under root, each counted once (st_blocks: what the disk holds, as du says)."""
    total, seen = 0, set()
    for base, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(base, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


rows = []
for dist in md.distributions(path=[p for p in sys.path if p.startswith(venv)]):
    size = 0
    for f in dist.files or ():
        try:
            size += os.path.getsize(dist.locate_file(f))
        except OSError:
            pass
    rows.append((size, dist.metadata["Name"], dist.version))
rows.sort(reverse=True)
venv_bytes = tree_bytes(venv)
bootstrap = sum(s for s, name, _ in rows if name.lower() in ("pip", "setuptools", "wheel"))
wheel_sizes = sorted(((os.path.getsize(os.path.join(wheels, w)), w) for w in os.listdir(wheels)), reverse=True)
py = f"{sys.version_info.major}.{sys.version_info.minor}"

print(f"cupyllm[{extra}] in a fresh virtual environment (Python {py}, {sys.platform}):")
print(f"  on disk: {venv_bytes / MiB:,.0f} MiB ({venv_bytes / 1e9:.2f} GB), of which pip and setuptools "
      f"{bootstrap / MiB:,.0f} MiB; {len(rows)} distributions")
print(f"  downloaded: {sum(s for s, _ in wheel_sizes) / MiB:,.0f} MiB in {len(wheel_sizes)} wheels")
print(f"\n  {'installed (MiB)':>15}  distribution")
for size, name, version in rows[:int(top)]:
    print(f"  {size / MiB:>15,.1f}  {name} {version}")
rest = rows[int(top):]
if rest:
    print(f"  {sum(s for s, _, _ in rest) / MiB:>15,.1f}  the other {len(rest)}")
print(f"\n  {'wheel (MiB)':>15}  largest downloads")
for size, name in wheel_sizes[:5]:
    print(f"  {size / MiB:>15,.1f}  {name}")

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
entry = {"bench": "env_size", "date": datetime.date.today().isoformat(), "commit": commit or "unknown",
         "card": "cpu", "command": command.strip(), "extra": extra, "python": py,
         "venv_mib": round(venv_bytes / MiB, 1), "wheels_mib": round(sum(s for s, _ in wheel_sizes) / MiB, 1),
         "note": "largest installed (MiB): " + ", ".join(f"{n} {v} {s / MiB:.0f}" for s, n, v in rows[:6])}
print("\nhistory line: " + json.dumps(entry, sort_keys=True))
if record == "1":
    with open(os.path.join("perf", "history.jsonl"), "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    print("appended to perf/history.jsonl")
EOF
