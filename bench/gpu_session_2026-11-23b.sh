#!/usr/bin/env bash
# Bench runs of 2026-11-23 (second GPU call): bench side by side with the baseline, 1024², regional
# compile, and the memory cost of validation during training. Logs go to $1 (default /tmp/bench).
set -uo pipefail
out=${1:-/tmp/bench}; mkdir -p "$out"
run() { local name=$1; shift; echo "== $name: $*"; timeout 240 "$@" 2>&1 | grep -v "^train:" | tee "$out/$name.log" | tail -16; }
run bench512_baseline python3 pipeline.py bench --baseline --steps 8
run bench1024 python3 pipeline.py bench --resolution 1024 --steps 6
run bench512_regional python3 pipeline.py bench --compile regional --optimizer adamw --steps 10 --warmup 3
python3 -c "from stages.bench import write_synthetic_cache as w; w('/tmp/valcache', num_samples=32, resolution=512, validation_prompts=2)"
run validation python3 pipeline.py train --cache /tmp/valcache --output /tmp/valrun --max-steps 10 --checkpoint-every 0 --validate-every 5 --validation-steps 10
cp /tmp/valrun/metrics.jsonl "$out/validation_metrics.jsonl" 2>/dev/null; cp /tmp/valrun/samples/step-00010.png "$out/" 2>/dev/null
