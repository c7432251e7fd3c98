#!/usr/bin/env bash
# The performance figures of the README, on this machine: bench train (floor/lorakit/peft/full) and
# bench infer, each configuration in its own process. Results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
.venv/bin/lorakit bench train --rounds 3 --json > "$out/train_cpu.json"
.venv/bin/lorakit bench infer --json > "$out/infer_cpu.json"
.venv/bin/python - <<'PY'
import json
from lorakit.tools.bench import train_table
r = json.load(open("benchmarks/results/train_cpu.json"))
print(train_table(r["configs"]))
i = json.load(open("benchmarks/results/infer_cpu.json"))
print(json.dumps(i, indent=2))
PY
