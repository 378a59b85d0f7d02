#!/usr/bin/env bash
# The reference recipe (defaults: 512², r16/alpha32, batch 1 x grad-accum 4, 8-bit AdamW, checkpointing,
# mixed precision auto) on the full-size SDXL UNet architecture with random weights, from a synthetic
# cache shaped like SDXL's. Usage: bash bench/train_reference.sh OUTDIR [STEPS] [extra train flags...]
set -euo pipefail
out=${1:?output folder}; steps=${2:-50}; shift $(( $# >= 2 ? 2 : $# ))
mkdir -p "$out"
python3 -c "import torch, diffusers, peft, bitsandbytes; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__); print(torch.cuda.get_device_name(0))"
python3 -c "from stages.bench import write_synthetic_cache as w; w('$out/cache', num_samples=256, resolution=512)"
python3 pipeline.py train --cache "$out/cache" --output "$out/lora" --max-steps "$steps" --checkpoint-every 25 "$@"
python3 - "$out/lora/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steady = rows[5:] or rows
print(f"steps {len(rows)}  median img/s (steps 6+) {statistics.median(r['images_per_s'] for r in steady):.3f}  "
      f"median s/step {statistics.median(r['seconds'] for r in steady):.3f}  peak GiB {max(r.get('peak_gib', 0) for r in rows):.3f}  "
      f"first loss {rows[0]['loss']:.4f}  last loss {rows[-1]['loss']:.4f}")
PY
