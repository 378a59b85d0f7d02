#!/usr/bin/env bash
# Re-measure the tables of bench/RESULTS.md on a CUDA GPU, one section (table) per call:
#
#     bash bench/reproduce.sh SECTION          # no SECTION, or an unknown one: the list, exit 2
#
# Each section runs `python3 pipeline.py ...` (its inputs: a synthetic SDXL-shaped cache from
# stages.bench.write_synthetic_cache, or generated JPEGs for encode) and prints what its table needs; a section
# takes under ~9 minutes on an H200. Full-size SDXL architecture with random weights (--model random:sdxl):
# memory and speed do not depend on weight values. Outputs and logs: $OUT/SECTION (default /tmp/reproduce/SECTION),
# emptied first. This records measurements only; the GPU pass/fail checks are tests: python -m pytest -m gpu tests/gpu
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: bash bench/reproduce.sh SECTION     (on a CUDA GPU, from any folder; outputs in $OUT/SECTION, default /tmp/reproduce)
sections (RESULTS.md names the section next to each heading):
  reference    train, the reference recipe: 50 steps (bf16) and 12 steps --mixed-precision fp16; resume from checkpoint-25
  bench        bench --baseline at 512², defaults at 1024², --compile regional (b1 x ga4 and b4 x ga1), eager b4 x ga1
  validation   train --validate-every 5: training-step peak vs validation peak
  compile      train eager vs --compile regional (checkpoint at 6) vs its resume vs regional-graphs: losses, speed, peaks
  graphs       bench --baseline --compile regional-graphs at 512² b4, and 1024² b8 (the CUDA graphs speed table)
  plan         train --vram-budget 12GiB and 6GiB (the planner's choice and its fit); bench of its ckpt b4 x ga1 prediction
  t4           bench --vram-budget 15GiB --mixed-precision fp16 at 512²/1024², the 4GiB refusal; train under 15GiB fp16, 40 steps
  quantized    bench --base-weights nf4/fp8/int8/auto at 512² (b1 x ga2) and nf4/fp8 at 1024²
  quantized-q  the quantized table's rows marked (q): nf4 b1 x ga4, nf4/fp8/int8 b4 x ga1, fp8 at 1024²
  encode       encode --model random:sdxl of 512 generated JPEGs: defaults, and 12 workers x batch 16
  buckets      encode --resolution 1024 --buckets of 64 generated JPEGs, info, and 6 steps of train on them
  stream       --stream-blocks 2 for nf4/fp8/int8/bf16 at 512², nf4 unstreamed eager beside it
  stream-1024  --stream-blocks 2 for nf4/fp8/int8/bf16 at 1024² (b1 x ga2); validation's peak at 1024² (nf4 with
               CUDA graphs, bf16 streamed)
  stream-graphs  --stream-blocks 2 --cuda-graphs on (the copies inside the step's CUDA graph): nf4 / bf16 at 512², fp8
               at 1024² (b1 x ga2)
  stream-budget  train --vram-budget 4GiB / 2.5GiB at 1024² with validation every 3 steps: the choice, measured peaks
  speed        CUDA graphs by default (2026-12-01): the defaults beside the baseline, fused AdamW, b4 ckpt, the best
               at 512² and 1024², 1024² b1 x ga4, nf4 b1 x ga4 and b4: speed, memory, host vs GPU time per step
  sweep        bench --sweep 4 (a 4-learning-rate sweep beside one run, defaults), and --sweep 4 --sweep-ranks
               4,8,16,32 (16 members at 512², checkpointing) under --vram-budget 24GiB
Sections measured before 2026-12-01 ran eagerly; since then train and bench capture CUDA graphs by default:
set EXTRA="--cuda-graphs off" to re-measure them as they were.
EOF
}

section=${1:-}
case $section in
  reference|bench|validation|compile|graphs|plan|t4|quantized|quantized-q|encode|buckets|speed|stream|stream-1024|stream-graphs|stream-budget|sweep) ;;
  *) [ -n "$section" ] && echo "unknown section: $section" >&2; usage >&2; exit 2;;
esac
dir=${OUT:-/tmp/reproduce}/$section
rm -rf "$dir"; mkdir -p "$dir"
echo "== $section: outputs and logs in $dir"

# run NAME ARGS...: python3 pipeline.py ARGS > $dir/NAME.log; show the log's last $TAIL lines (progress bars and
# bench's JSON lines left out; all of it on failure, which stops the section)
run() {
  local name=$1 rc=0; shift
  case $1 in train|bench) set -- "$@" ${EXTRA:-};; esac
  echo "-- $name: python3 pipeline.py $*"
  python3 pipeline.py "$@" > "$dir/$name.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then tr '\r' '\n' < "$dir/$name.log" | grep -v '%|' | tail -n 40 || true; echo "-- $name: exit $rc"; return "$rc"; fi
  tr '\r' '\n' < "$dir/$name.log" | grep -v '%|' | grep -v '^{' | tail -n "${TAIL:-4}" || true
}

# cache FOLDER N RESOLUTION [VALIDATION_PROMPTS]: a synthetic cache with SDXL's shapes, made for random:sdxl
cache() {
  python3 -c "from stages.bench import write_synthetic_cache as w; w('$1', num_samples=$2, resolution=$3, validation_prompts=${4:-0})"
}

# metrics OUTPUT: what the train tables need from OUTPUT/metrics.jsonl
metrics() {
  python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
steady = rows[5:] or rows
first, last = rows[0], rows[-1]
img_all = statistics.median(r["images_per_s"] for r in rows)
img_steady = statistics.median(r["images_per_s"] for r in steady)
img_mean = statistics.mean(r["images_per_s"] for r in steady)
s_steady = statistics.median(r["seconds"] for r in steady)
peak = max(r.get("peak_gib", 0) for r in rows)
skipped = sum(r["skipped"] for r in rows)
losses = [round(r["loss"], 5) for r in rows]
print("   steps %d-%d: median img/s %.3f (steps 6+: %.3f, mean %.3f), median s/step %.3f (steps 6+), first step %.1f s, "
      "peak GiB %.3f, skipped %d" % (first["step"], last["step"], img_all, img_steady, img_mean, s_steady, first["seconds"],
                                    peak, skipped))
print("   loss first %.4f last %.4f; losses %s" % (first["loss"], last["loss"], losses))
' "$1"
}

# plan_config OUTPUT: the configuration train ran with (after --vram-budget's choice)
plan_config() {
  python3 -c '
import json, sys
c = json.load(open(sys.argv[1] + "/train_config.json"))
keys = ("base_weights", "gradient_checkpointing", "optimizer", "compile", "batch_size", "grad_accum", "mixed_precision")
print("   ran with: " + ", ".join("%s %s" % (k, c[k]) for k in keys) + "; resolved precision " + c["resolved"]["mixed_precision"])
' "$1"
}

# bench NAME ARGS...: python3 pipeline.py bench ARGS, then one line per configuration measured
bench() {
  local name=$1; shift
  TAIL=0 run "$name" bench "$@"
  python3 -c '
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print("   {recipe}: {resolution}px {precision}, base {base_weights} ({base_gib} GiB), b{micro_batch} x ga{grad_accum}, "
              "ckpt {checkpointing}, compile {compile}, stream {stream_blocks} ({h2d_gib_per_step} GiB/step in), {optimizer}: peak alloc {peak_allocated_gib} / reserved "
              "{peak_reserved_gib} GiB, {images_per_s} img/s, {median_step_s} s/step, first step {time_to_first_step_s} s, "
              "UNet fwd {unet_forward_tflop_per_image} TFLOP/img, MFU {mfu} (matmul peak {matmul_peak_tflops} TFLOP/s), "
              "last loss {last_loss}; CUDA graphs {cuda_graphs}: per step {profile_step_ms} ms, host {host_ms_per_step} ms, "
              "GPU busy {gpu_busy_ms_per_step} ms; {adapters} adapter(s): {adapter_images_per_s} adapter-img/s; validation "
              "{validation_s} s, peak alloc / reserved {validation_peak_gib} / {validation_reserved_gib} GiB".format_map({
                                                              "validation_s": None, "validation_peak_gib": None,
                                                              "validation_reserved_gib": None,
                                                              "cuda_graphs": None, "profile_step_ms": None,
                                                              "stream_blocks": None, "h2d_gib_per_step": None,
                                                              "adapters": 1, "adapter_images_per_s": None,
                                                              "host_ms_per_step": None, "gpu_busy_ms_per_step": None,
                                                              **{"mfu": None, "matmul_peak_tflops": None, "peak_allocated_gib": None,
                                                  "peak_reserved_gib": None, **r}}))
    elif line.startswith("speed-up vs baseline") or line.startswith("sweep of "):
        print("   " + " ".join(line.split()))
' "$dir/$name.log"
}

# lora_diff A B: max |element difference| between two runs' LoRA files
lora_diff() {
  python3 -c '
import sys
from safetensors.torch import load_file
a, b = (load_file(p + "/pytorch_lora_weights.safetensors") for p in sys.argv[1:3])
print(max((a[k].float() - b[k].float()).abs().max().item() for k in a))
' "$1" "$2"
}

# loss_diff A B [FIRST_STEP]: max |loss difference| between two runs over the steps both logged (from FIRST_STEP)
loss_diff() {
  python3 -c '
import json, sys
a, b = ({r["step"]: r["loss"] for r in map(json.loads, open(p + "/metrics.jsonl"))} for p in sys.argv[1:3])
first = int(sys.argv[3]) if len(sys.argv) > 3 else 1
print(max(abs(a[s] - b[s]) for s in a.keys() & b.keys() if s >= first))
' "$@"
}

# jpegs FOLDER N: N generated JPEGs, 1024x768 and 768x1024 (smooth colour fields plus grain, at the scale of the
# Naruto set's 1280x1280 JPEGs), with captions in metadata.jsonl
jpegs() {
  python3 -c '
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
folder, n = Path(sys.argv[1]), int(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
rows = []
for i in range(n):
    w, h = (1024, 768) if i % 2 else (768, 1024)
    small = rng.integers(0, 256, (h // 64, w // 64, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)
    rows.append(json.dumps({"file_name": f"{i:05d}.jpg", "text": f"a generated picture number {i}, naruto style"}))
(folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
' "$1" "$2"
}

device() {
  python3 -c 'import torch, diffusers, peft, bitsandbytes; print("  ", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| diffusers", diffusers.__version__, "| peft", peft.__version__, "| bitsandbytes", bitsandbytes.__version__)'
}

device
syn="$dir/syn512"
# the GPU sessions' train runs: 64 samples at 512², micro-batch 4 x grad-accum 1 unless said
common=(--cache "$syn" --model random:sdxl --num-workers 2 --warmup-steps 0)
fast=(--optimizer adamw --no-gradient-checkpointing --batch-size 4 --grad-accum 1)

case $section in
reference)  # the reference recipe (every other setting at its default), 256 samples at 512²
  cache "$dir/cache" 256 512
  TAIL=2 run ref train --cache "$dir/cache" --output "$dir/ref" --max-steps 50 --checkpoint-every 25
  metrics "$dir/ref"
  TAIL=2 run fp16 train --cache "$dir/cache" --output "$dir/fp16" --max-steps 12 --checkpoint-every 25 --mixed-precision fp16
  metrics "$dir/fp16"
  # resume: the 50-step run from its checkpoint-25
  cp -r "$dir/ref" "$dir/res"; rm -rf "$dir/res/checkpoint-50" "$dir/res/pytorch_lora_weights.safetensors"
  TAIL=2 run resume train --cache "$dir/cache" --output "$dir/res" --max-steps 50 --checkpoint-every 25 --resume latest
  echo "   resumed vs uninterrupted: max |loss diff| steps 26-50 $(loss_diff "$dir/ref" "$dir/res" 26), max |dLoRA| $(lora_diff "$dir/ref" "$dir/res")"
  ;;
bench)  # 'bench side by side with the baseline' and 'regional compilation and micro-batch 4'
  bench baseline512 --baseline --steps 8
  bench defaults1024 --resolution 1024 --steps 6
  bench regional --compile regional --optimizer adamw --steps 10 --warmup 3
  bench regional_b4 --compile regional --optimizer adamw --no-gradient-checkpointing --batch-size 4 --grad-accum 1 --steps 10 --warmup 3
  bench eager_b4 --optimizer adamw --no-gradient-checkpointing --batch-size 4 --grad-accum 1 --steps 8
  ;;
validation)  # 2 validation prompts at 512², 10 Euler steps, every 5 steps of the default recipe
  cache "$dir/valcache" 32 512 2
  TAIL=2 run validation train --cache "$dir/valcache" --output "$dir/valrun" --max-steps 10 --checkpoint-every 0 --validate-every 5 --validation-steps 10
  python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
val = [r for r in rows if "validation_peak_gib" in r]
train_peak = max(r["peak_gib"] for r in rows)
val_peaks = [r["validation_peak_gib"] for r in val]
print("   training steps peak %.3f GiB; validation peaks %s GiB (+%.2f)" % (train_peak, val_peaks, max(val_peaks) - train_peak))
print("   seconds of the steps with a validation %s; of the others %s"
      % ([r["seconds"] for r in val], sorted(r["seconds"] for r in rows if r not in val)))
' "$dir/valrun"
  ls "$dir/valrun/samples"
  ;;
compile)  # 'Fast path = eager, and it checkpoints and resumes': 12 steps of train, same seed
  cache "$syn" 64 512
  TAIL=1 run eager train "${common[@]}" "${fast[@]}" --output "$dir/eager" --max-steps 12 --checkpoint-every 0
  metrics "$dir/eager"
  TAIL=1 run regional train "${common[@]}" "${fast[@]}" --output "$dir/regional" --max-steps 12 --checkpoint-every 6 --compile regional
  metrics "$dir/regional"
  mkdir -p "$dir/resumed"; cp -r "$dir/regional/checkpoint-6" "$dir/resumed/"
  TAIL=1 run resumed train "${common[@]}" "${fast[@]}" --output "$dir/resumed" --max-steps 12 --checkpoint-every 6 --compile regional --resume latest
  metrics "$dir/resumed"
  TAIL=1 run graphs train "${common[@]}" "${fast[@]}" --output "$dir/graphs" --max-steps 12 --checkpoint-every 0 --compile regional-graphs
  metrics "$dir/graphs"
  echo "   max |loss - eager loss| over 12 steps: regional $(loss_diff "$dir/eager" "$dir/regional"), regional-graphs $(loss_diff "$dir/eager" "$dir/graphs")"
  echo "   regional resumed from checkpoint-6 vs uninterrupted: max |dLoRA| $(lora_diff "$dir/regional" "$dir/resumed"), max |loss diff| steps 7-12 $(loss_diff "$dir/regional" "$dir/resumed" 7)"
  echo "   regional vs eager final LoRA: max |d| $(lora_diff "$dir/regional" "$dir/eager")"
  python3 -c 'import sys; from safetensors.torch import load_file; print("   LoRA B max |entry| (regional)", max(v.abs().max().item() for k, v in load_file(sys.argv[1] + "/pytorch_lora_weights.safetensors").items() if "lora_B" in k))' "$dir/regional"
  ;;
graphs)  # 'Speed: regional compile + CUDA graphs'
  bench graphs_b4 --baseline --compile regional-graphs --no-gradient-checkpointing --batch-size 4 --grad-accum 1 --optimizer adamw --steps 12 --warmup 4
  bench graphs_b8_1024 --resolution 1024 --compile regional-graphs --no-gradient-checkpointing --batch-size 8 --grad-accum 1 --optimizer adamw --steps 6 --warmup 4
  ;;
plan)  # 'The --vram-budget planner in train': 12 GiB and 6 GiB (bf16), and the bench of its ckpt b4 x ga1 prediction
  cache "$syn" 64 512
  TAIL=20 run plan12 train "${common[@]}" --output "$dir/p12" --max-steps 16 --checkpoint-every 0 --vram-budget 12GiB
  plan_config "$dir/p12"; metrics "$dir/p12"
  TAIL=20 run plan6 train "${common[@]}" --output "$dir/p6" --max-steps 12 --checkpoint-every 0 --vram-budget 6GiB
  plan_config "$dir/p6"; metrics "$dir/p6"
  bench ckpt_b4 --batch-size 4 --grad-accum 1 --optimizer adamw --steps 8
  ;;
t4)  # 'T4-class budget' (bench under a 15 GiB cap, the 4 GiB refusal) and the planner table's 15 GiB fp16 row
  bench fp16_512 --vram-budget 15GiB --mixed-precision fp16 --resolution 512 --steps 6
  bench fp16_1024 --vram-budget 15GiB --mixed-precision fp16 --resolution 1024 --steps 6
  echo "-- cap4: python3 pipeline.py bench --vram-budget 4GiB --steps 2   (RESULTS.md recorded a one-line refusal)"
  if python3 pipeline.py bench --vram-budget 4GiB --steps 2 > "$dir/cap4.log" 2>&1; then echo "   it fit in 4GiB"
  else echo "   $(grep '^Error' "$dir/cap4.log" || echo "failed without the one-line message: see $dir/cap4.log")"; fi
  cache "$syn" 64 512
  TAIL=20 run t4_fp16_15g train "${common[@]}" --output "$dir/t4" --max-steps 40 --checkpoint-every 20 --vram-budget 15GiB --mixed-precision fp16
  plan_config "$dir/t4"; metrics "$dir/t4"
  ls "$dir/t4"
  ;;
quantized)  # the quantized table's unmarked rows: b1 x ga2, checkpointing, 8-bit AdamW
  for mode in nf4 fp8 int8 auto; do bench "q512_$mode" --base-weights "$mode" --steps 6 --grad-accum 2 --warmup 2; done
  for mode in nf4 fp8; do bench "q1024_$mode" --resolution 1024 --base-weights "$mode" --steps 4 --grad-accum 2 --warmup 2; done
  echo "   (the tiny-model load check of this table is a test: python -m pytest -m gpu tests/gpu/test_quantize_gpu.py -s)"
  ;;
quantized-q)  # the quantized table's rows marked (q)
  bench nf4_b1ga4 --base-weights nf4 --steps 6
  bench nf4_b4 --base-weights nf4 --batch-size 4 --grad-accum 1 --steps 6
  bench nf4_b4_nockpt --base-weights nf4 --batch-size 4 --grad-accum 1 --no-gradient-checkpointing --steps 6
  bench fp8_b4_fused --base-weights fp8 --batch-size 4 --grad-accum 1 --optimizer adamw --steps 6
  bench fp8_1024 --base-weights fp8 --resolution 1024 --steps 4 --grad-accum 2
  bench int8_b4 --base-weights int8 --batch-size 4 --grad-accum 1 --steps 6
  ;;
encode)  # 'Encode throughput': 512 JPEGs, 512² center crop, mirrored copies too
  jpegs "$dir/images" 512
  TAIL=0 run encode_default encode --model random:sdxl --dataset "$dir/images" --cache "$dir/cache_default"
  grep -h '^encoded' "$dir/encode_default.log" | sed 's/^/   /'
  TAIL=0 run encode_w12_b16 encode --model random:sdxl --dataset "$dir/images" --cache "$dir/cache_w12" --num-workers 12 --batch-size 16
  grep -h '^encoded' "$dir/encode_w12_b16.log" | sed 's/^/   /'
  ;;
buckets)  # 'Buckets end to end on the GPU'
  jpegs "$dir/images" 64
  TAIL=0 run encode encode --model random:sdxl --dataset "$dir/images" --cache "$dir/cache" --resolution 1024 --buckets --num-workers 8
  grep -h '^encoded' "$dir/encode.log" | sed 's/^/   /'
  TAIL=40 run info info "$dir/cache"
  TAIL=1 run train train --cache "$dir/cache" --output "$dir/train" --max-steps 6 --batch-size 2 --grad-accum 1 --checkpoint-every 0 --num-workers 2
  metrics "$dir/train"
  python3 -c 'import json, sys; print("   grad norms", [round(json.loads(l)["grad_norm"], 4) for l in open(sys.argv[1] + "/metrics.jsonl")])' "$dir/train"
  ;;
stream)  # 'The memory floor' (issue #21): streamed blocks, 2 resident, per base format; eager, short runs
  for w in nf4 fp8 int8 bf16; do bench "s512_$w" --base-weights $w --stream-blocks 2 --steps 3 --warmup 1 --profile-steps 0; done
  bench nf4_eager --base-weights nf4 --cuda-graphs off --steps 3 --warmup 1 --profile-steps 0
  ;;
stream-1024)  # 'The memory floor' at 1024²: streamed per base format, and validation's peak
  for w in nf4 fp8 int8 bf16; do bench "s1024_$w" --resolution 1024 --grad-accum 2 --base-weights $w --stream-blocks 2 --steps 3 --warmup 1 --profile-steps 0; done
  bench v1024_nf4 --resolution 1024 --base-weights nf4 --steps 3 --warmup 1 --profile-steps 0 --validate-steps 4
  bench v1024_s2 --resolution 1024 --stream-blocks 2 --steps 2 --warmup 1 --profile-steps 0 --validate-steps 4
  ;;
stream-graphs)  # 'The memory floor': streamed steps captured as CUDA graphs
  for w in nf4 bf16; do bench "g512_$w" --base-weights $w --stream-blocks 2 --cuda-graphs on --steps 3 --warmup 1 --profile-steps 0; done
  bench g1024_fp8 --resolution 1024 --grad-accum 2 --base-weights fp8 --stream-blocks 2 --cuda-graphs on --steps 3 --warmup 1 --profile-steps 0
  ;;
stream-budget)  # 'The memory floor': --vram-budget at 1024² with validation (2 prompts, 4 steps) every 3 steps
  cache "$dir/c1024" 16 1024 2
  for b in 4 2.5; do
    TAIL=20 run "budget$b" train --cache "$dir/c1024" --model random:sdxl --num-workers 2 --warmup-steps 0 --output "$dir/b$b" \
      --max-steps 6 --checkpoint-every 0 --validate-every 3 --validation-steps 4 --vram-budget "${b}GiB" || true
    [ -f "$dir/b$b/train_config.json" ] && python3 -c '
import json, sys
c = json.load(open(sys.argv[1] + "/train_config.json")); rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
print("   ran with:", {k: c[k] for k in ("base_weights", "stream_blocks", "gradient_checkpointing", "batch_size", "grad_accum")})
print("   peak alloc / reserved %.3f / %.3f GiB; validation reserved %s GiB; img/s %s" % (max(r["peak_gib"] for r in rows),
      max(r["peak_reserved_gib"] for r in rows), [r.get("validation_reserved_gib") for r in rows if "validation_image" in r],
      [r["images_per_s"] for r in rows]))' "$dir/b$b"
  done
  ;;
speed)  # "Fast by default" (2026-12-01): CUDA graphs (the default), flat 8-bit AdamW; one bench per row
  bench defaults --baseline --steps 10 --warmup 2
  bench fused --optimizer adamw --steps 8
  bench b4ckpt --batch-size 4 --grad-accum 1 --steps 8
  bench best512 --batch-size 4 --grad-accum 1 --no-gradient-checkpointing --optimizer adamw --compile regional --steps 8
  bench ckpt1024 --resolution 1024 --steps 8
  bench best1024 --resolution 1024 --batch-size 8 --grad-accum 1 --no-gradient-checkpointing --optimizer adamw --compile regional --steps 8
  bench nf4 --base-weights nf4 --steps 8
  bench nf4b4 --base-weights nf4 --batch-size 4 --grad-accum 1 --steps 8
  ;;
sweep)  # 'Sweeps' (issue 16): each bench runs the single run, then the sweep of the same settings
  bench lr4 --sweep 4 --steps 10 --warmup 3
  bench lr4_rank4 --sweep 4 --sweep-ranks 4,8,16,32 --steps 4 --warmup 2 --vram-budget 24GiB
  ;;
esac
echo "== $section: done ($dir)"
