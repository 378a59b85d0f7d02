"""--base-weights: fp8 against full precision, LoRA training on a quantized base, the saved LoRA in an
ordinary pipeline, peft's key names on bitsandbytes layers, and the clear errors."""
from __future__ import annotations

import sys

import pytest
import torch

from stages.errors import UserError
from stages.lora import attach_lora, lora_state_dict, save_lora
from stages.quantize import Float8Linear, check_base_weights, convert_linears, dequantize_fp8, quantize_base
from stages.sdxl import ModelSource, load_unet

CPU = torch.device("cpu")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]


def unet_inputs(unet, seed: int = 0):
    """A batch of 2 at 8x8 latents, with SDXL's text and time conditioning."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": time_ids}
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 100]),
            torch.randn(2, 77, c.cross_attention_dim, generator=g)), {"added_cond_kwargs": added}


def linears(unet) -> list[torch.nn.Linear]:
    return [m for m in unet.modules() if type(m) is torch.nn.Linear]


def test_fp8_base_is_within_fp8_rounding_of_full_precision_and_a_quarter_of_its_linear_bytes(tiny_model):
    ref = load_unet(ModelSource(str(tiny_model))).eval()
    unet = load_unet(ModelSource(str(tiny_model))).eval()
    full = {n: m.weight.detach().clone() for n, m in unet.named_modules() if type(m) is torch.nn.Linear}
    weight_numel = sum(w.numel() for w in full.values())
    out_channels = sum(w.shape[0] for w in full.values())

    info = quantize_base(unet, "fp8", None, CPU)

    assert info["converted_layers"] == len(full) > 0
    assert all(isinstance(unet.get_submodule(n), Float8Linear) for n in full) and not linears(unet)
    # fp32 weights (4 bytes) -> fp8 (1 byte) plus one fp32 scale per output channel; everything else unchanged
    assert info["base_bytes_before"] - info["base_bytes_after"] == 3 * weight_numel - 4 * out_channels
    assert unet.dtype == torch.float32  # compute_loss casts inputs to unet.dtype: it must stay the compute dtype
    # each weight within half a step of e4m3's 3-bit mantissa (2^-4 relative), or of its smallest subnormal step
    for name, before in full.items():
        layer = unet.get_submodule(name)
        error = (dequantize_fp8(layer.weight, layer.weight_scale) - before).abs()
        assert bool((error <= before.abs() * 2**-4 + layer.weight_scale * 2**-10).all()), name
        assert error.max() > 0  # really rounded
    # The whole UNet: weights are off by ~2.7% RMS (at most 6.25%), independently, so each output's error averages
    # down; 1.8% here, where nf4 gives 7.6% and a missing bias 19%.
    args, kw = unet_inputs(ref)
    with torch.no_grad():
        expected, got = ref(*args, **kw).sample, unet(*args, **kw).sample
    relative = ((got - expected).norm() / expected.norm()).item()
    assert 1e-4 < relative < 0.04
    assert quantize_base(ref, "auto", None, CPU) == {"base_weights": "fp32", "converted_layers": 0,
                                                      "base_bytes_before": info["base_bytes_before"],
                                                      "base_bytes_after": info["base_bytes_before"]}


def test_fp8_backward_upcasts_the_weight_again_instead_of_keeping_it():
    """Without gradient checkpointing, autograd would otherwise keep every layer's upcast weight until backward."""
    layer = Float8Linear(torch.nn.Linear(64, 32), torch.float32, CPU)
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    weight = dequantize_fp8(layer.weight, layer.weight_scale)  # (32, 64)
    assert torch.allclose(y, torch.nn.functional.linear(x, weight, layer.bias))
    assert torch.allclose(x.grad, grad @ weight)
    assert saved and not [t for t in saved if t.dtype == torch.float32 and t.numel() >= weight.numel()]


def test_lora_trains_on_the_fp8_base_and_loads_into_an_ordinary_pipeline(tiny_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict
    from stages.lora import load_into_pipeline

    unet = load_unet(ModelSource(str(tiny_model)))
    quantize_base(unet, "fp8", None, CPU)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    params = attach_lora(unet, rank=4, alpha=8.0, target_modules=TARGETS)
    assert {p.dtype for p in params} == {torch.float32}
    initial = {k: v.clone() for k, v in lora_state_dict(unet).items()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    unet.train()
    for step in range(2):
        args, kw = unet_inputs(unet, seed=step)
        loss = (unet(*args, **kw).sample - torch.randn(2, 4, 8, 8)).square().mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
        optimizer.zero_grad()
    trained = lora_state_dict(unet)
    assert trained.keys() == initial.keys()
    assert all(not torch.equal(trained[k], initial[k]) for k in trained)  # A and B both moved after 2 steps
    frozen = [(k, v) for k, v in unet.state_dict().items() if "lora_" not in k]
    assert len(frozen) == len(base)  # the adapter adds only lora_ tensors
    for k, v in frozen:  # peft's wrapper renames the base weights to …base_layer.…; they did not change
        assert torch.equal(v.float(), base[k.replace(".base_layer", "")].float()), k
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)

    ordinary = load_unet(ModelSource(str(tiny_model)))
    attach_lora(ordinary, rank=4, alpha=8.0, target_modules=TARGETS)
    assert lora_state_dict(ordinary).keys() == trained.keys()  # the same key names as on an ordinary base

    save_lora(unet, tmp_path)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model))
    load_into_pipeline(pipe, tmp_path, adapter_name="fp8")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="fp8")
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").scaling["fp8"] == 2.0


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_peft_wraps_bitsandbytes_layers_with_its_qlora_classes_and_the_usual_keys(tiny_model, mode):
    # bitsandbytes 0.50 also runs on the CPU, slowly: enough to check the conversion and peft's view of it here
    import bitsandbytes  # noqa: F401  (a dependency: this test must run, never skip)
    import peft.tuners.lora.bnb as peft_bnb
    unet = load_unet(ModelSource(str(tiny_model)))
    count = convert_linears(unet, mode, torch.float32, CPU)
    assert count > 0 and not linears(unet)
    attach_lora(unet, rank=4, alpha=8.0, target_modules=TARGETS)
    wrapper = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    assert type(wrapper) is {"int8": peft_bnb.Linear8bitLt, "nf4": peft_bnb.Linear4bit}[mode]
    ordinary = load_unet(ModelSource(str(tiny_model)))
    attach_lora(ordinary, rank=4, alpha=8.0, target_modules=TARGETS)
    assert lora_state_dict(unet).keys() == lora_state_dict(ordinary).keys()


def test_modes_that_cannot_run_here_stop_with_one_line(tiny_model, monkeypatch):
    for mode in ("int8", "nf4", "bf16", "fp16"):
        with pytest.raises(UserError, match=f"--base-weights {mode} needs a CUDA GPU"):
            check_base_weights(mode, CPU)
    with pytest.raises(UserError, match=r"--base-weights fp4: expected one of auto, bf16, fp16, fp8, int8, nf4"):
        check_base_weights("fp4", CPU)
    with pytest.raises(UserError, match="--lora-type dora does not work on --base-weights fp8"):
        check_base_weights("fp8", CPU, lora_type="dora")
    with pytest.raises(UserError, match="--lora-type lokr does not work on --base-weights nf4"):
        check_base_weights("nf4", torch.device("cuda"), lora_type="lokr")
    with pytest.raises(UserError, match="--lora-type loha does not work on --base-weights int8; use --base-weights auto or fp8"):
        check_base_weights("int8", torch.device("cuda"), lora_type="loha")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails as if not installed
    with pytest.raises(UserError, match="--base-weights nf4 needs bitsandbytes .*pip install bitsandbytes"):
        check_base_weights("nf4", torch.device("cuda"))
    unet = load_unet(ModelSource(str(tiny_model)))
    with pytest.raises(UserError, match="needs a CUDA GPU"):  # checked before anything is converted
        quantize_base(unet, "nf4", None, CPU)
    assert len(linears(unet)) > 0
