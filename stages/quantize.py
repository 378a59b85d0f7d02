"""`--base-weights`: how the frozen UNet is stored while the LoRA trains on top of it, in fp32.

    auto   the compute dtype: the --mixed-precision autocast dtype on a GPU, fp32 on CPU (no conversion)
    bf16   the base cast to bf16 / fp16, autocast doing the rest; CUDA only, as CPU training runs in fp32
    fp16
    fp8    each Linear weight stored as float8_e4m3fn with one scale per output channel, upcast to the
           compute dtype inside that layer's forward (Float8Linear, below; any device)
    int8   bitsandbytes Linear8bitLt (LLM.int8; outlier threshold 6.0, as diffusers' BitsAndBytesConfig)
    nf4    bitsandbytes Linear4bit: NF4 with double quantization, computing in the compute dtype (QLoRA)

int8 and nf4 need CUDA here: bitsandbytes 0.50 also runs them on the CPU, but slowly, and CPU training is
for tests. Only the UNet's nn.Linear layers are converted (attention, feed-forward, proj_in/out, time
embeddings: 2.23 of SDXL's 2.57 B weights); convolutions, norms and biases stay in the compute dtype, so
`unet.dtype` (its first weight, conv_in's) still names the compute dtype.

Conversion comes before the adapter: peft wraps a converted layer as it wraps an nn.Linear (int8 / nf4 in
its bitsandbytes LoRA classes, as QLoRA does), with the same key names, so the saved file loads into an
ordinary pipeline with load_lora_weights. Each Linear is converted on `device`, one at a time: a UNet
loaded on the CPU reaches the GPU already quantized, never whole in the compute dtype (a streamed one, fp8 or
nf4, goes back to the host layer by layer: never whole on the GPU at all); in training, only
the layer being computed holds an upcast copy, in forward and again in backward.
"""
from __future__ import annotations

import torch
from torch import nn

from stages.config import BASE_WEIGHTS
from stages.errors import UserError

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_BNB_LAYERS = {"int8": "bitsandbytes 8-bit (LLM.int8) layers", "nf4": "bitsandbytes 4-bit NF4 layers"}
# adapters that cannot sit on a base: peft's DoRA reads the fp8 weight without its scale (dequantize_module_weight
# in peft/utils/integrations.py); LoHa / LoKr reshape their update to the packed 4-bit weight's shape; on an int8
# base a trained LoHa's effect differed by 43% from its effect on the ordinary base (GPU check, bench/RESULTS.md),
# against 4% for LoRA: refused until understood
_UNSUPPORTED = {("fp8", "dora"): "auto, int8 or nf4", ("nf4", "loha"): "auto or fp8", ("nf4", "lokr"): "auto or fp8",
                ("int8", "loha"): "auto or fp8", ("int8", "lokr"): "auto or fp8"}


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(out, in) float8 weight times its (out, 1) scale, in the scale's dtype (the compute dtype)."""
    return weight.to(scale.dtype) * scale


class _Float8Matmul(torch.autograd.Function):
    """F.linear with a frozen fp8 weight, upcast again in backward instead of kept from forward: the fp8 saving
    holds without gradient checkpointing too (as bitsandbytes' 4-bit matmul keeps the quantized weight)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)  # (out, in) fp8 and (out, 1): the layer's own tensors, no copies
        ctx.x_dtype = x.dtype
        return nn.functional.linear(x.to(scale.dtype), dequantize_fp8(weight, scale), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors  # frozen: only the input's gradient
        return (grad_out.to(scale.dtype) @ dequantize_fp8(weight, scale)).to(ctx.x_dtype), None, None, None


class Float8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is float8_e4m3fn times one scale per output channel, upcast to
    `compute_dtype` for each forward. Still an nn.Linear, so peft wraps it like any other; peft casts new
    adapters to a base layer's `compute_dtype` attribute, as for bitsandbytes' Linear4bit."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        weight = linear.weight.detach().to(device, torch.float32)  # (out, in)
        # (out, 1): the row's absmax / 448, held in the compute dtype (at least its smallest normal number)
        scale = (weight.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(compute_dtype).tiny)
        scale = scale.to(compute_dtype)
        self.weight = nn.Parameter((weight / scale.float()).to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("weight_scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(device, compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Matmul.apply(x, self.weight, self.weight_scale, self.bias)


def _bnb_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Linear:
    """bitsandbytes' documented recipe: the full-precision weight in the layer, quantized by `.to(device)`."""
    import bitsandbytes as bnb
    has_bias, weight = linear.bias is not None, linear.weight.detach()
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        # Int8Params quantizes only on a move that starts on the CPU (bitsandbytes nn/modules.py, Int8Params.to)
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         module=layer)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer.to(device)  # quantization happens here


def convert_linears(unet: nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device,
                    park: torch.device | None = None) -> int:
    """Replace every nn.Linear of `unet` by its fp8 / int8 / nf4 layer, converted on `device` and then moved to
    `park` if given (fp8 and nf4: a streamed base goes back to the host layer by layer, never whole on the GPU);
    returns how many."""
    count = 0
    for parent in list(unet.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:  # exactly: converted layers are subclasses of nn.Linear
                layer = (Float8Linear(child, compute_dtype, device) if mode == "fp8"
                         else _bnb_linear(child, mode, compute_dtype, device))
                if park is not None and mode != "int8":  # int8: its CB would stay behind (Int8Params.to)
                    layer = layer.to(park)  # nf4: the quantization state moves with it (Params4bit.to)
                setattr(parent, name, layer)
                count += 1
    # peft wraps bitsandbytes layers in its own LoRA classes (peft/tuners/lora/bnb.py, as in QLoRA) only when
    # the model carries the flag that diffusers' bitsandbytes loader sets
    if mode == "int8":
        unet.is_loaded_in_8bit = True
    if mode == "nf4":
        unet.is_loaded_in_4bit = True
    return count


def base_bytes(unet: nn.Module) -> int:
    """Bytes of the model's weights: its state dict, which holds bitsandbytes' quantization statistics too."""
    return sum(t.nbytes for t in unet.state_dict().values() if isinstance(t, torch.Tensor))


def check_base_weights(mode: str, device: torch.device, lora_type: str = "lora") -> None:
    """Stop with a one-line message when `mode` cannot run here, before anything is loaded."""
    if mode not in BASE_WEIGHTS:
        raise UserError(f"--base-weights {mode}: expected one of {', '.join(BASE_WEIGHTS)}")
    if (mode, lora_type) in _UNSUPPORTED:
        raise UserError(f"--lora-type {lora_type} does not work on --base-weights {mode}; "
                        f"use --base-weights {_UNSUPPORTED[mode, lora_type]}")
    if mode in ("bf16", "fp16", "int8", "nf4") and device.type != "cuda":
        what = _BNB_LAYERS.get(mode, f"{mode} weights under autocast")
        raise UserError(f"--base-weights {mode} needs a CUDA GPU ({what}); on {device.type} training runs in fp32: "
                        "use auto or fp8")
    if mode == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("--base-weights bf16: this GPU has no bf16 support; use fp16, fp8 or nf4")
    if mode in _BNB_LAYERS:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:
            raise UserError(f"--base-weights {mode} needs bitsandbytes ({_BNB_LAYERS[mode]}): pip install bitsandbytes "
                            f"({type(e).__name__}: {e})") from e


def quantize_base(unet: nn.Module, mode: str, compute_dtype: torch.dtype | None, device: torch.device,
                  lora_type: str = "lora", park: torch.device | None = None) -> dict:
    """Convert the frozen UNet in place to `mode` (before the adapter is attached); returns what was done.

    compute_dtype: the autocast dtype, None for fp32. park: where converted layers go (the host, for a streamed base)."""
    check_base_weights(mode, device, lora_type)
    compute_dtype = compute_dtype or torch.float32
    before = base_bytes(unet)
    converted = 0
    if mode in ("bf16", "fp16"):
        unet.to({"bf16": torch.bfloat16, "fp16": torch.float16}[mode])
    elif mode != "auto":
        try:
            converted = convert_linears(unet, mode, compute_dtype, device, park)
        except torch.cuda.OutOfMemoryError:
            raise  # the caller's "does not fit" message, not this one
        except (RuntimeError, NotImplementedError) as e:  # e.g. bitsandbytes built without kernels for this GPU
            raise UserError(f"--base-weights {mode} does not work on {device}: {type(e).__name__}: {e}") from e
    return {"base_weights": DTYPE_NAMES[compute_dtype] if mode == "auto" else mode, "converted_layers": converted,
            "base_bytes_before": before, "base_bytes_after": base_bytes(unet)}
