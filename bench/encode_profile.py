"""Where encode's time goes on a GPU: the FP32 VAE alone, the text encoders alone, and image decoding +
preprocessing alone (DataLoader workers), each in images/s, with full-size random-weight SDXL encoders.
    python3 bench/encode_profile.py IMAGE_FOLDER   (a folder made by bench/encode_speed.sh)"""
import sys
import time

import torch
from torch.utils.data import DataLoader

from stages.data import open_source
from stages.encode import EncodeConfig, PreprocessDataset, encode_latents, encode_prompts
from stages.sdxl import RANDOM_SDXL, ModelSource, load_encoders


def rate(fn, images: int, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return images * repeat / (time.perf_counter() - t)


folder = sys.argv[1]
print("cudnn.allow_tf32", torch.backends.cudnn.allow_tf32, "matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32)
parts = load_encoders(ModelSource(RANDOM_SDXL))
vae = parts["vae"].cuda()
tes = (parts["text_encoder"].cuda(), parts["text_encoder_2"].cuda())
toks = (parts["tokenizer"], parts["tokenizer_2"])
for b in (8, 16):
    x = torch.rand(2 * b, 3, 512, 512, device="cuda") * 2 - 1  # b images + their mirrors
    print(f"VAE fp32, {b} images + mirrors per pass: {rate(lambda: encode_latents(vae, x), b):.1f} images/s")
    ref = encode_latents(vae, x)[0]
    vae_cl = vae.to(memory_format=torch.channels_last)
    r = rate(lambda: encode_latents(vae_cl, x.contiguous(memory_format=torch.channels_last)), b)
    diff = (encode_latents(vae_cl, x.contiguous(memory_format=torch.channels_last))[0] - ref).abs().max().item()
    vae = vae.to(memory_format=torch.contiguous_format)
    print(f"  channels_last: {r:.1f} images/s, max |d mean| {diff:.2e}")
    caps = [f"a generated picture number {i}, naruto style" for i in range(b)]
    print(f"text encoders fp32, {b} captions: {rate(lambda: encode_prompts(toks, tes, caps), b):.1f} captions/s")
    x_cpu = torch.rand(b, 3, 512, 512)
    print(f"host->GPU copy of {b} images + CPU flip: "
          f"{rate(lambda: torch.cat([x_cpu, x_cpu.flip(-1)]).to('cuda'), b):.1f} images/s")
source = open_source(folder)
for workers in (2, 12):
    cfg = EncodeConfig(dataset=folder, resolution=512, num_workers=workers)
    loader = DataLoader(PreprocessDataset(source, source.records, cfg), batch_size=16, num_workers=workers, collate_fn=list)
    t = time.perf_counter()
    n = sum(len(b) for b in loader)
    print(f"decode + preprocess, {workers} workers: {n / (time.perf_counter() - t):.1f} images/s")
