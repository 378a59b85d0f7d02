#!/usr/bin/env bash
# Encode throughput on a GPU: full-size SDXL VAE + both text encoders with random weights (--model random:sdxl,
# no download) over N generated JPEGs, flips on (the reference preprocessing). Usage:
#   bash bench/encode_speed.sh [N=512] [OUT=/tmp/encode_speed] [extra encode flags...]
set -euo pipefail
n=${1:-512}; out=${2:-/tmp/encode_speed}; shift 2 || true
mkdir -p "$out"
python3 - "$n" "$out/images" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
n, folder = int(sys.argv[1]), Path(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
rows = []
for i in range(n):  # smooth colour fields plus grain, 1024x768 or 768x1024 (JPEG, like the Naruto set's 1280x1280 scale)
    w, h = (1024, 768) if i % 2 else (768, 1024)
    small = rng.integers(0, 256, (h // 64, w // 64, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)
    rows.append(json.dumps({"file_name": f"{i:05d}.jpg", "text": f"a generated picture number {i}, naruto style"}))
(folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
PY
rm -rf "$out/cache"
python3 pipeline.py encode --model random:sdxl --dataset "$out/images" --cache "$out/cache" "$@" 2>&1 | grep -v "^encode:" | tail -5
