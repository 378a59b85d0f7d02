#!/usr/bin/env bash
# --base-weights on a CUDA GPU (PYTHONPATH = the repo): first, on the tiny model, nf4 / int8 / fp8 bases train a
# few steps and each saved LoRA loads into an ordinary fp32 UNet (diffusers' load_lora_weights) with the same
# tensors and the same effect; then full-size bench rows (memory, speed) at 512² (with auto alongside) and
# 1024². About 3-4 minutes. Logs go to $1 (default /tmp/quantize_check); $2 = tiny: the first part only.
set -uo pipefail
out=${1:-/tmp/quantize_check}; mkdir -p "$out"

echo "== tiny model: train on a quantized base, load the LoRA into an ordinary pipeline"
timeout 240 python3 - cuda nf4:lora nf4:dora int8:lora int8:dora fp8:lora fp8:lokr <<'EOF' 2>&1 | tr '\r' '\n' | grep -v "^train:" | tee "$out/tiny.log"
import sys, tempfile
import diffusers
import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from stages.bench import write_synthetic_cache
from stages.lora import LORA_WEIGHTS_NAME, load_into_pipeline
from stages.sdxl import ModelSource, build_tiny_sdxl, unet_config
from stages.train import TrainConfig, train

diffusers.utils.logging.set_verbosity_error()
device, runs = sys.argv[1], [r.split(":") for r in sys.argv[2:]]
tmp = tempfile.mkdtemp()
model = str(build_tiny_sdxl(f"{tmp}/tiny"))
uc = unet_config(ModelSource(model))
pooled = uc["projection_class_embeddings_input_dim"] - 6 * uc["addition_time_embed_dim"]
write_synthetic_cache(f"{tmp}/cache", num_samples=8, resolution=64, text_width=uc["cross_attention_dim"],
                      pooled_width=pooled, model=model)
g = torch.Generator().manual_seed(0)
x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, uc["cross_attention_dim"], generator=g)
added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}


def lora_effect(unet, dtype):
    """UNet output with the adapter minus without it, in fp32."""
    args = [x.to(unet.device, dtype), torch.tensor([500, 100], device=unet.device), e.to(unet.device, dtype)]
    kw = {"added_cond_kwargs": {k: v.to(unet.device, dtype) for k, v in added.items()}}
    with torch.no_grad():
        with_lora = unet(*args, **kw).sample.float()
        unet.disable_adapters()
        without = unet(*args, **kw).sample.float()
        unet.enable_adapters()
    return with_lora - without


failures = 0
for mode, lora_type in runs:
    outdir = f"{tmp}/{mode}-{lora_type}"
    summary = train(TrainConfig(cache=f"{tmp}/cache", output=outdir, model=model, base_weights=mode, lora_type=lora_type,
                                rank=4, alpha=8.0, max_steps=4, batch_size=2, grad_accum=1, warmup_steps=0,
                                learning_rate=1e-2, checkpoint_every=0, num_workers=0, device=device), log=lambda *a: None)
    unet = summary["unet"]
    bases = {type(m.base_layer).__name__ for m in unet.modules() if hasattr(m, "base_layer")}
    trainable = {p.dtype for p in unet.parameters() if p.requires_grad}
    saved = {k.removeprefix("unet."): v for k, v in load_file(f"{outdir}/{LORA_WEIGHTS_NAME}").items()}
    pipe = StableDiffusionXLPipeline.from_pretrained(model).to(device)  # fp32, ordinary nn.Linear
    load_into_pipeline(pipe, outdir, adapter_name="check")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="check")
    same = loaded.keys() == saved.keys() and all(torch.equal(loaded[k].cpu(), saved[k]) for k in saved)
    ours, ordinary = lora_effect(unet, unet.dtype), lora_effect(pipe.unet, torch.float32)
    relative = ((ours - ordinary).norm() / ordinary.norm()).item()
    ok = same and trainable == {torch.float32} and relative < 0.3 and ordinary.norm() > 0
    failures += not ok
    print(f"{'OK  ' if ok else 'FAIL'} {mode}/{lora_type}: base layers {sorted(bases)}, trainable {trainable}, "
          f"{len(saved)} tensors loaded identically: {same}, LoRA effect vs ordinary base: {relative:.3f} relative "
          "(< 0.3)")
print("tiny-model check:", "all OK" if not failures else f"{failures} FAILED")
EOF

[ "${2:-all}" = tiny ] && exit 0
run() { local name=$1; shift; echo "== $name: $*"; timeout 150 "$@" 2>&1 | grep -v "^train:" | tee "$out/$name.log" | tail -18; }
common=(--grad-accum 2 --warmup 2)
for mode in nf4 fp8 int8 auto; do
  run "bench512_$mode" python3 pipeline.py bench --base-weights "$mode" --steps 6 "${common[@]}"
done
for mode in nf4 fp8; do  # auto at 1024²: 5.837 GiB peak in RESULTS.md (2026-11-23)
  run "bench1024_$mode" python3 pipeline.py bench --resolution 1024 --base-weights "$mode" --steps 4 "${common[@]}"
done
echo "== summary"
grep -h '^{' "$out"/bench*.log | python3 -c "
import json, sys
for r in map(json.loads, sys.stdin):
    print('{resolution:>5} {base_weights:>5}: base {base_gib} GiB, peak {peak} GiB, {images_per_s} img/s, '
          'first step {time_to_first_step_s} s, loss {last_loss}'.format(peak=r.get('peak_allocated_gib'), **r))"
