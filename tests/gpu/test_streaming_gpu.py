"""--stream-blocks on CUDA: copies on a side stream from pinned memory, every base format. The LoRA trained with
the tiny model's blocks streamed (2 resident) equals the unstreamed run's within 1e-6, or within twice the
difference between two unstreamed runs where the GPU's kernels are not deterministic (attention backward); the run
says it trains eagerly, and bench reports host -> device bytes per step."""
from __future__ import annotations

import json

import pytest

from tests.gpu.conftest import load_lora, read_metrics, run_pipeline, run_pipelines

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_model):
    from stages.bench import write_synthetic_cache
    from stages.sdxl import ModelSource, unet_config
    uc = unet_config(ModelSource(str(tiny_model)))
    folder = tmp_path_factory.mktemp("stream") / "cache"
    write_synthetic_cache(folder, num_samples=8, resolution=64, text_width=uc["cross_attention_dim"], model=str(tiny_model),
                          pooled_width=uc["projection_class_embeddings_input_dim"] - 6 * uc["addition_time_embed_dim"],
                          validation_prompts=1)
    return folder


@pytest.mark.parametrize("base_weights, checkpointing", [
    ("bf16", "--gradient-checkpointing"), ("bf16", "--no-gradient-checkpointing"), ("fp8", "--no-gradient-checkpointing"),
    ("int8", "--gradient-checkpointing"), ("nf4", "--gradient-checkpointing")])
def test_streamed_lora_equals_unstreamed_on_cuda(tiny_cache, tmp_path, base_weights, checkpointing):
    names = ("off", "again", "2")  # three processes at once on the GPU
    procs = run_pipelines(*[("train", "--cache", tiny_cache, "--output", tmp_path / name, "--device", "cuda",
                             "--max-steps", "4", "--warmup-steps", "0", "--checkpoint-every", "0", "--num-workers", "0",
                             "--cuda-graphs", "auto" if name == "2" else "off", "--base-weights", base_weights,
                             "--stream-blocks", "2" if name == "2" else "off", checkpointing, "--validate-every", "2",
                             "--validation-steps", "2") for name in names])
    loras = {name: load_lora(tmp_path / name) for name in names}
    assert "--stream-blocks trains eagerly" in procs[2].stdout + procs[2].stderr
    assert json.loads((tmp_path / "2" / "train_config.json").read_text())["resolved"]["stream_blocks"] == 2
    assert all("peak_reserved_gib" in r for r in read_metrics(tmp_path / "2"))
    a, b, noise = loras["off"], loras["2"], loras["again"]
    floor = max((a[k] - noise[k]).abs().max().item() for k in a)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= max(1e-6, 2 * floor), floor


@pytest.mark.parametrize("base_weights", ["bf16", "nf4", "int8"])
def test_a_streamed_step_captured_as_a_cuda_graph_trains_like_the_eager_streamed_one(tiny_cache, tmp_path, base_weights):
    """--cuda-graphs on with --stream-blocks: the block copies are captured in the graph (every unit evicted around
    the capture); losses and LoRA as the eager streamed run's, within the CUDA-graph tests' bounds (nondeterministic
    attention backward); validation (eager, streamed) between replays. int8's outlier check syncs with the host, so
    its capture fails: the blocks that capture "fetched" are dropped and training goes on eagerly, the same."""
    procs = run_pipelines(*[("train", "--cache", tiny_cache, "--output", tmp_path / mode, "--device", "cuda",
                             "--max-steps", "6", "--warmup-steps", "0", "--checkpoint-every", "0", "--num-workers", "0",
                             "--learning-rate", "1e-3", "--cuda-graphs", mode, "--base-weights", base_weights,
                             "--stream-blocks", "2", "--gradient-checkpointing", "--validate-every", "3",
                             "--validation-steps", "2") for mode in ("off", "on")])
    said = procs[1].stdout + procs[1].stderr
    assert ("capture failed" in said) == (base_weights == "int8") and "CUDA graphs" in said, said[-2000:]
    eager, graph = ([r["loss"] for r in read_metrics(tmp_path / mode)] for mode in ("off", "on"))
    assert len(graph) == len(eager) == 6 and max(abs(a - b) for a, b in zip(graph, eager)) <= 1e-3, (graph, eager)
    a, b = load_lora(tmp_path / "off"), load_lora(tmp_path / "on")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 5e-3
    assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 0  # it trained


def test_bench_of_a_graph_captured_streamed_step_counts_its_copies(tiny_model):
    """Each replay copies what an eager streamed step copies, plus the first blocks that an eager step finds still
    resident from the backward before (the graph starts with none): full size, 13.064 vs 13.06 GiB."""
    procs = run_pipelines(*[("bench", "--model", tiny_model, "--device", "cuda", "--stream-blocks", "2", "--cuda-graphs", mode,
                             "--steps", "2", "--warmup", "1", "--resolution", "64", "--profile-steps", "0") for mode in ("on", "off")])
    graph, eager = (json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1]) for p in procs)
    assert graph["stream_blocks"] == 2 and graph["cuda_graphs"] is True and eager["cuda_graphs"] is False
    h2d = graph["h2d_gib_per_step"], eager["h2d_gib_per_step"]  # rounded to 0.001 GiB
    assert h2d[1] > 0 and h2d[1] - 0.001 <= h2d[0] <= 1.05 * h2d[1] + 0.001, h2d  # a double count would be 2x


def test_bench_reports_bytes_streamed_per_step(tiny_model):
    proc = run_pipeline("bench", "--model", tiny_model, "--device", "cuda", "--stream-blocks", "2", "--steps", "2",
                        "--warmup", "1", "--resolution", "64")
    row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert row["stream_blocks"] == 2 and row["h2d_gib_per_step"] > 0 and row["cuda_graphs"] is False


def test_validation_keeps_the_vae_on_the_cpu_until_it_decodes(tiny_model, tmp_path):
    """Validation inside the budget: the FP32 VAE is on the GPU only while it decodes, never beside the denoising UNet."""
    import torch

    from stages.sample import Validator
    from stages.sdxl import ModelSource, load_decoder_vae, load_noise_scheduler, load_unet
    source = ModelSource(str(tiny_model))
    unet, vae = load_unet(source, torch.float32).to("cuda"), load_decoder_vae(source)  # `device`: random:sdxl only
    where = lambda: next(vae.parameters()).device.type  # noqa: E731
    seen = []
    unet.register_forward_pre_hook(lambda *a: seen.append(("unet", where())))
    vae.decoder.register_forward_pre_hook(lambda *a: seen.append(("decode", where())))
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    embeddings = {"prompt_embeds": torch.randn(2, 77, unet.config.cross_attention_dim),
                  "pooled_prompt_embeds": torch.randn(2, pooled), "prompts": ["one", "two"]}
    row = Validator(embeddings, vae, 2, 5.0, 0)(unet, load_noise_scheduler(source), 1, tmp_path, 64)
    assert {d for w, d in seen if w == "unet"} == {"cpu"} and {d for w, d in seen if w == "decode"} == {"cuda"}
    assert where() == "cpu" and (tmp_path / row["validation_image"]).exists()


def test_bench_reports_the_validation_pass_memory(tiny_model):
    proc = run_pipeline("bench", "--model", tiny_model, "--device", "cuda", "--steps", "1", "--warmup", "1",
                        "--resolution", "64", "--validate-steps", "2", "--profile-steps", "0")
    row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert row["validation_s"] > 0 and 0 < row["validation_peak_gib"] <= row["validation_reserved_gib"]


@pytest.mark.parametrize("base_weights", ["fp8", "nf4"])
def test_a_streamed_quantized_base_is_converted_on_the_gpu_and_parked_on_the_host(tiny_model, base_weights):
    """--stream-blocks with fp8 / nf4: each Linear is quantized on the GPU and goes back to the host at once (a
    full-size fp8 base, 2.7 GiB, ran out of memory under --vram-budget 2.5GiB when it landed whole on the GPU)."""
    import torch

    from stages.quantize import quantize_base
    from stages.sdxl import ModelSource, load_unet
    peaks = {}
    for park in (None, torch.device("cpu")):  # the peak while converting: the whole base vs one layer at a time
        unet = load_unet(ModelSource(str(tiny_model)), torch.bfloat16)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        info = quantize_base(unet, base_weights, torch.bfloat16, torch.device("cuda"), park=park)
        peaks[park] = torch.cuda.max_memory_allocated()
    assert peaks[torch.device("cpu")] < peaks[None] / 2, peaks
    assert info["converted_layers"] > 0 and {t.device.type for t in (*unet.parameters(), *unet.buffers())} == {"cpu"}
    states = [m.weight.quant_state for m in unet.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    assert all(s.absmax.device.type == "cpu" for s in states) and len(states) == (info["converted_layers"] if base_weights == "nf4" else 0)
