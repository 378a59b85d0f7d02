#!/usr/bin/env bash
# GPU runs of 2026-11-23 (third session): encode throughput, regional compile vs eager in `train` (losses,
# checkpoint + resume), the --vram-budget planner, a T4-class fp16 run under a 15 GiB cap, and the
# planner's untested prediction (checkpointing, micro-batch 4 × grad-accum 1). Logs go to $1; $2 picks
# the part (compile | encode | plan; default all), each well under the device tool's 10 minutes.
set -uo pipefail
out=${1:-/tmp/gpu_c}; mkdir -p "$out"
run() { local name=$1; shift; echo "== $name: $*"; timeout "${T:-300}" "$@" > "$out/$name.log" 2>&1; echo "rc=$?"; grep -v "^train:\|^encode:\|Warning\|warn(" "$out/$name.log" | tail -${TAIL:-8}; }
python3 -c "from stages.bench import write_synthetic_cache as w; w('/tmp/syn512', num_samples=64, resolution=512)"
common="--cache /tmp/syn512 --model random:sdxl --num-workers 2 --warmup-steps 0"
last_losses() { python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print([round(x['loss'],5) for x in r]); print('peak', max(x.get('peak_gib',0) for x in r), 'img/s median', sorted(x['images_per_s'] for x in r)[len(r)//2])" "$1"; }

part=${2:-all}
compile_part() {
# 1. regional compile vs eager: same losses within bf16 tolerance; compiled checkpoint + resume
TAIL=3 run eager python3 pipeline.py train $common --output /tmp/t_eager --max-steps 12 --checkpoint-every 0 --optimizer adamw --no-gradient-checkpointing --batch-size 4 --grad-accum 1
last_losses /tmp/t_eager/metrics.jsonl
TAIL=3 run compiled python3 pipeline.py train $common --output /tmp/t_comp --max-steps 12 --checkpoint-every 6 --optimizer adamw --no-gradient-checkpointing --batch-size 4 --grad-accum 1 --compile regional
last_losses /tmp/t_comp/metrics.jsonl
mkdir -p /tmp/t_res && cp -r /tmp/t_comp/checkpoint-6 /tmp/t_res/
TAIL=3 run compiled_resume python3 pipeline.py train $common --output /tmp/t_res --max-steps 12 --checkpoint-every 6 --optimizer adamw --no-gradient-checkpointing --batch-size 4 --grad-accum 1 --compile regional --resume latest
python3 - <<'PY'
import json
from safetensors.torch import load_file
a = load_file("/tmp/t_comp/pytorch_lora_weights.safetensors"); b = load_file("/tmp/t_res/pytorch_lora_weights.safetensors")
e = load_file("/tmp/t_eager/pytorch_lora_weights.safetensors")
d = lambda x, y: max((x[k].float() - y[k].float()).abs().max().item() for k in x)
print("compiled resumed vs uninterrupted: max |dLoRA|", d(a, b), "; compiled vs eager:", d(a, e),
      "; LoRA B max", max(v.abs().max().item() for k, v in a.items() if "lora_B" in k))
ea = [json.loads(l)["loss"] for l in open("/tmp/t_eager/metrics.jsonl")]; ca = [json.loads(l)["loss"] for l in open("/tmp/t_comp/metrics.jsonl")]
print("loss max |eager - compiled| over 12 steps:", max(abs(x - y) for x, y in zip(ea, ca)))
PY

TAIL=3 run graphs python3 pipeline.py train $common --output /tmp/t_graph --max-steps 12 --checkpoint-every 0 --optimizer adamw --no-gradient-checkpointing --batch-size 4 --grad-accum 1 --compile regional-graphs
last_losses /tmp/t_graph/metrics.jsonl
python3 -c "
import json; ea=[json.loads(l)['loss'] for l in open('/tmp/t_eager/metrics.jsonl')]; ga=[json.loads(l)['loss'] for l in open('/tmp/t_graph/metrics.jsonl')]
print('loss max |eager - regional-graphs|:', max(abs(x-y) for x,y in zip(ea,ga)))"
TAIL=16 run bench_graphs_b4 python3 pipeline.py bench --compile regional-graphs --no-gradient-checkpointing --batch-size 4 --grad-accum 1 --optimizer adamw --steps 10 --warmup 3
TAIL=16 run bench_graphs_b8_1024 python3 pipeline.py bench --resolution 1024 --compile regional-graphs --no-gradient-checkpointing --batch-size 8 --grad-accum 1 --optimizer adamw --steps 6 --warmup 3

}
encode_part() {
# 2. encode throughput (512 JPEGs 1024x768 / 768x1024, flips), default workers vs more workers and batch 16
T=400 TAIL=3 run encode_default bash bench/encode_speed.sh 512 /tmp/es1
T=400 TAIL=3 run encode_w12_b16 bash bench/encode_speed.sh 512 /tmp/es2 --num-workers 12 --batch-size 16

T=330 TAIL=6 run t4_fp16_15g python3 pipeline.py train $common --output /tmp/t4 --max-steps 40 --checkpoint-every 20 --vram-budget 15GiB --mixed-precision fp16
last_losses /tmp/t4/metrics.jsonl; ls /tmp/t4
}
plan_part() {
# 3. the planner: 12 GiB and 6 GiB budgets (bf16), and a T4-class fp16 run under 15 GiB with checkpoints
TAIL=6 run plan12 python3 pipeline.py train $common --output /tmp/p12 --max-steps 16 --checkpoint-every 0 --vram-budget 12GiB
last_losses /tmp/p12/metrics.jsonl
TAIL=6 run plan6 python3 pipeline.py train $common --output /tmp/p6 --max-steps 12 --checkpoint-every 0 --vram-budget 6GiB
last_losses /tmp/p6/metrics.jsonl

# 4. the planner's prediction: checkpointing, micro-batch 4 x grad-accum 1 (estimated ~4.7 img/s)
TAIL=16 run bench_ckpt_b4 python3 pipeline.py bench --batch-size 4 --grad-accum 1 --optimizer adamw --steps 8
cp -r /tmp/p12/train_config.json "$out/p12_train_config.json" 2>/dev/null
}
quant_part() {
# 5. quantized bases toward the targets (<= 2.5 GiB at 512², <= 3.0 at 1024², >= 5 img/s at 512²), and the 6 GiB plan
T=240 bash bench/quantize_check.sh "$out/qc" tiny 2>&1 | grep -E "^OK|^FAIL|check:|Error" 
b() { echo "== bench $*"; timeout 240 python3 pipeline.py bench "$@" > "$out/bench_$(echo "$*" | tr -c 'a-z0-9' _).log" 2>&1; grep -h '^{' "$out/bench_$(echo "$*" | tr -c 'a-z0-9' _).log" | python3 -c "
import json, sys
for r in map(json.loads, sys.stdin):
    print('  {resolution} {base_weights} b{micro_batch}x{grad_accum} ckpt={checkpointing} {optimizer}: peak {peak_allocated_gib} GiB (reserved {peak_reserved_gib}), {images_per_s} img/s, first step {time_to_first_step_s} s'.format(**r))"; }
b --base-weights nf4 --steps 6
b --base-weights nf4 --batch-size 4 --grad-accum 1 --steps 6
b --base-weights nf4 --batch-size 4 --grad-accum 1 --no-gradient-checkpointing --steps 6
b --base-weights fp8 --batch-size 4 --grad-accum 1 --optimizer adamw --steps 6
b --base-weights fp8 --resolution 1024 --steps 4 --grad-accum 2
b --base-weights int8 --batch-size 4 --grad-accum 1 --steps 6
TAIL=8 run plan6 python3 pipeline.py train $common --output /tmp/p6 --max-steps 12 --checkpoint-every 0 --vram-budget 6GiB
last_losses /tmp/p6/metrics.jsonl
}
case $part in quant) quant_part;;  compile) compile_part;; encode) encode_part;; plan) plan_part;; *) compile_part; encode_part; plan_part;; esac
