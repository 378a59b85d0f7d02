"""Where SDXL parts come from: a hub id, a local diffusers folder, or one single-file checkpoint.

Also the bundled full-size architecture configs (for `bench` and parameter counts without a
download) and the tiny SDXL-shaped model used by the tests and the demo.
"""
from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from cache.files import default_mode
from stages.config import DEFAULT_MODEL, DEMO_MODEL, RANDOM_SDXL
from stages.errors import UserError
from stages.paths import did_you_mean, looks_like_path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"  # what --model demo names (model card: README.md)

# SDXL base 1.0 UNet architecture (unet/config.json of the hub model), so that full-size memory and
# speed can be measured with random weights and no download.
SDXL_UNET_CONFIG = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
    center_input_sample=False, cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)
# SDXL base 1.0 vae/config.json (architecture only).
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
# SDXL base 1.0 text_encoder/ (CLIP ViT-L) and text_encoder_2/ (OpenCLIP bigG) architectures.
SDXL_TEXT_ENCODER_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                projection_dim=768)
SDXL_TEXT_ENCODER_2_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                                  projection_dim=1280)
# SDXL base 1.0 scheduler/scheduler_config.json: the noise schedule training uses.
SDXL_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", clip_sample=False,
    sample_max_value=1.0, set_alpha_to_one=False,
)


@dataclass
class ModelSource:
    """A model reference resolved to one of the three kinds of source."""
    model: str                 # hub id, local diffusers folder, or single-file checkpoint path
    revision: str | None = None
    variant: str | None = None
    model_config: str | None = None  # single file only: diffusers folder / hub id describing its configs

    def __post_init__(self):
        if self.model == DEMO_MODEL:  # the one place `demo` becomes the shipped model's folder
            self.model = str(DEMO_MODEL_DIR)

    @property
    def kind(self) -> str:
        if self.model == RANDOM_SDXL:
            return "random"
        if os.path.isfile(self.model):
            return "single_file"
        if os.path.isdir(self.model):
            return "folder"
        if self.model.endswith(SINGLE_FILE_SUFFIXES) or looks_like_path(self.model):
            raise UserError(f"model path not found: {self.model}{did_you_mean(self.model)}"
                            + (" (a hub id has the form namespace/name)"
                               if "/" in self.model and not self.model.startswith(("/", ".", "~")) else ""))
        return "hub"

    def check(self) -> "ModelSource":
        """Refuse, before anything loads, a model path that is not there (see `kind`) or is no model (a folder
        without model_index.json or unet/, a file that is no .safetensors / .ckpt checkpoint), a --variant a
        local folder does not have, and a --model-config path that is not there."""
        if self.model == str(DEMO_MODEL_DIR) and not (DEMO_MODEL_DIR / "model_index.json").is_file():
            raise UserError(f"--model demo: the demo model is not in {DEMO_MODEL_DIR} (this installation lacks its "
                            "weights; bench/pretrain_demo_model.py makes them)")
        kind = self.kind  # raises for a path that is not there
        folder = Path(self.model)
        if kind == "folder" and not ((folder / "model_index.json").is_file() or (folder / "unet").is_dir()):
            raise UserError(f"--model {self.model} is not a diffusers model folder (no model_index.json or unet/); "
                            "a single-file checkpoint is given as its .safetensors or .ckpt file")
        if kind == "single_file" and not self.model.endswith(SINGLE_FILE_SUFFIXES):
            raise UserError(f"--model {self.model} is a file but not a single-file checkpoint (.safetensors or .ckpt)")
        if kind == "folder" and self.variant:
            names = [p.name.split(".") for p in Path(self.model).rglob("*.*")]
            variants = sorted({n[-2] for n in names if len(n) > 2 and n[-1] in ("safetensors", "bin")})
            if self.variant not in variants:
                raise UserError(f"--variant {self.variant}: {self.model} holds no weights of that variant"
                                + (f" (it has {', '.join(variants)})" if variants else "; leave --variant out"))
        if kind != "random" and self.model_config and looks_like_path(self.model_config) and not os.path.isdir(self.model_config):
            raise UserError(f"--model-config {self.model_config}: folder not found{did_you_mean(self.model_config)}")
        return self

    def describe(self) -> dict:
        return {"model": self.model, "revision": self.revision, "variant": self.variant,
                "model_config": self.model_config, "kind": self.kind}

    def resolved(self) -> "ModelSource":
        """The same source with local paths made absolute: what a cache records, so that `train` run from
        another folder, or from a moved cache, finds this very model (a relative path would find another one)."""
        return ModelSource(absolute_path(self.model), self.revision, self.variant, absolute_path(self.model_config))


def check_vae(vae: str | None) -> None:
    """Refuse a --vae path that is not there before anything loads (a hub id is looked up when it loads)."""
    if vae and looks_like_path(vae) and not os.path.exists(vae):
        raise UserError(f"--vae {vae}: file or folder not found{did_you_mean(vae)}")


def absolute_path(path: str | None) -> str | None:
    """An existing local path made absolute; anything else (a hub id, None) as it is."""
    return str(Path(path).expanduser().resolve()) if path and os.path.exists(path) else path


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's config and every weight's bytes: identifies the encoder exactly."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    location = ("_name_or_path", "_commit_hash", "_diffusers_version", "transformers_version")  # not the model
    config = {k: v for k, v in config.items() if k not in location}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_model_source(encoder: dict, model: str | None = None, revision: str | None = None,
                       variant: str | None = None, model_config: str | None = None,
                       allow_other: bool = False) -> ModelSource:
    """The model `train` uses with a cache whose manifest records `encoder`: --model if given, else the recorded one.

    A recorded local model that is not where the cache says (moved, deleted, or recorded as a relative path by
    an older version) is never looked for: the user points --model at it, and it must then hold the encoder
    weights the cache was made with (the weight hashes the cache stores). A --model other than the recorded one
    while that is in place (a fine-tune, a UNet-only folder) is refused unless `allow_other` (--allow-other-model):
    the cache's latents and embeddings come from the recorded model's VAE and text encoders."""
    recorded = ModelSource(encoder["model"], encoder.get("revision"), encoder.get("variant"), encoder.get("model_config"))
    missing = encoder.get("kind") in ("folder", "single_file") and not (
        os.path.isabs(recorded.model) and os.path.exists(recorded.model))
    if model is None:
        if missing:
            raise UserError(f"the cache's model {recorded.model} is not there (moved or deleted, or a relative path "
                            "of an older cache): pass --model with its location; it is checked against the encoder "
                            "weights the cache was made with")
        return ModelSource(recorded.model, revision or recorded.revision, variant or recorded.variant,
                           model_config or recorded.model_config).check()
    source = ModelSource(model, revision, variant, model_config).check()
    same = absolute_path(source.model) == absolute_path(recorded.model) and (revision or recorded.revision) == recorded.revision
    if missing and not allow_other:
        check_same_encoders(source, encoder)
    elif not (same or missing or allow_other):
        raise UserError(f"--model {model} is not the model the cache was encoded with ({recorded.model}"
                        + (f", revision {recorded.revision}" if recorded.revision else "") + "): its latents and text "
                        "embeddings come from that model's VAE and text encoders; leave --model out, encode a cache "
                        "with this model, or pass --allow-other-model (e.g. a fine-tune of it with the same encoders)")
    return source


def unet_layers(source: ModelSource) -> dict[str, str]:
    """Every module of the source's UNet (path -> class name), built from its config on the meta device: no
    weights are read. Where the config cannot be read without a download, SDXL base's bundled one."""
    from diffusers import UNet2DConditionModel
    try:
        config = unet_config(source)
    except UserError:
        config = dict(SDXL_UNET_CONFIG)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return {name: type(module).__name__ for name, module in unet.named_modules()}


def check_target_modules(source: ModelSource, targets: list[str], rank_pattern: dict[str, int]) -> None:
    """Refuse, before the UNet loads, a --target-modules name that ends no Linear / Conv2d layer's path (peft would
    fail, or skip it silently when other names match) and a --rank-pattern key that matches no adapted layer."""
    from peft.utils.other import get_pattern_key
    adaptable = [name for name, kind in unet_layers(source).items() if kind in ("Linear", "Conv2d")]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in adaptable)]
    if unknown:
        short = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in adaptable})
        raise UserError(f"--target-modules {','.join(unknown)}: no Linear or Conv2d layer of the UNet ends with that "
                        f"name; it has {', '.join(short)}; or use a preset: attn, attn-ff, all-linear, all")
    adapted = [n for n in adaptable if any(n == t or n.endswith("." + t) for t in targets)]
    for key in rank_pattern:
        if not any(get_pattern_key([key], name) == key for name in adapted):
            raise UserError(f"--rank-pattern {key}: matches no module of --target-modules {','.join(targets)}")


def check_same_encoders(source: ModelSource, encoder: dict) -> None:
    """Refuse `source` unless its text encoders (and VAE, without a VAE override) hash to what the cache recorded."""
    recorded = encoder.get("weights", {})
    try:
        parts = load_encoders(source)
    except UserError as e:
        raise UserError(f"cannot check --model {source.model} against the cache's model {encoder['model']}: {e}") from e
    names = [n for n in ("text_encoder", "text_encoder_2", "vae") if n in recorded and not (n == "vae" and encoder.get("vae"))]
    differ = [n for n in names if weights_hash(parts[n]) != recorded[n]]
    if differ:
        raise UserError(f"--model {source.model} is not the cache's model {encoder['model']}: its "
                        f"{', '.join(differ)} weights differ from the ones the cache was encoded with; point --model "
                        "at that model, or encode a cache for this one")



def _pretrained_kwargs(src: ModelSource) -> dict:
    kw = {}
    if src.kind == "hub":
        kw["revision"] = src.revision
    if src.variant and src.kind != "single_file":
        kw["variant"] = src.variant
    return kw


def _load_errors():
    """Errors that mean 'this part is not there' rather than a bug."""
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    return (OSError, EnvironmentError, LocalEntryNotFoundError, HFValidationError, ValueError)


def load_encoders(src: ModelSource, vae: str | None = None) -> dict:
    """Load the VAE (FP32), both tokenizers and both text encoders; never the UNet.

    Returns a dict with keys vae, tokenizer, tokenizer_2, text_encoder, text_encoder_2.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = {}
    if src.kind == "random":  # benchmarks: full-size encoders, random weights, a character-level tokenizer
        import tempfile
        parts = random_encoders(torch.device("cpu"))
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_tokenizer(Path(tmp))
            for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
                parts[name] = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                            model_max_length=77, pad_token=pad)
    elif src.kind == "single_file":
        try:
            pipe = StableDiffusionXLPipeline.from_single_file(
                src.model, config=src.model_config, unet=None, torch_dtype=torch.float32)
        except _load_errors() as e:
            raise UserError(f"cannot load single-file checkpoint {src.model}: {_first_line(e)}") from e
        parts = {k: getattr(pipe, k) for k in ("vae", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")}
        for k, v in parts.items():
            if v is None:
                raise UserError(f"single-file checkpoint {src.model} has no {k}")
    else:
        loaders = {"tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer, "text_encoder": CLIPTextModel,
                   "text_encoder_2": CLIPTextModelWithProjection, "vae": AutoencoderKL}
        for name, cls in loaders.items():
            if name == "vae" and vae:
                continue
            kw = _pretrained_kwargs(src)
            if cls is CLIPTokenizer:
                kw.pop("variant", None)
            try:
                parts[name] = cls.from_pretrained(src.model, subfolder=name, **kw)
            except _load_errors() as e:
                raise UserError(f"model {src.model} has no usable '{name}' part: {_first_line(e)}") from e
    if vae:
        parts["vae"] = load_vae(vae)
    parts["vae"] = parts["vae"].to(torch.float32)
    for m in ("vae", "text_encoder", "text_encoder_2"):
        parts[m].requires_grad_(False).eval()
    return parts


def load_vae(vae: str):
    """A VAE override: a diffusers folder / hub id (e.g. madebyollin/sdxl-vae-fp16-fix) or a single file."""
    from diffusers import AutoencoderKL
    try:
        if os.path.isfile(vae):
            return AutoencoderKL.from_single_file(vae, torch_dtype=torch.float32)
        if os.path.isdir(os.path.join(vae, "vae")):
            return AutoencoderKL.from_pretrained(vae, subfolder="vae")
        return AutoencoderKL.from_pretrained(vae)
    except _load_errors() as e:
        raise UserError(f"cannot load VAE {vae}: {_first_line(e)}") from e


def load_unet(src: ModelSource, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
    """Load the UNet alone, in `dtype` (random:sdxl is built directly on `device`, in `dtype`)."""
    from diffusers import UNet2DConditionModel
    if src.kind == "random":
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device or "cpu"):
                return UNet2DConditionModel(**SDXL_UNET_CONFIG)
        finally:
            torch.set_default_dtype(default)
    try:
        if src.kind == "single_file":
            return UNet2DConditionModel.from_single_file(
                src.model, config=src.model_config, subfolder="unet", torch_dtype=dtype)
        return UNet2DConditionModel.from_pretrained(
            src.model, subfolder="unet", torch_dtype=dtype, **_pretrained_kwargs(src))
    except _load_errors() as e:
        raise UserError(f"model {src.model} has no usable 'unet' part: {_first_line(e)}") from e


def unet_config(src: ModelSource) -> dict:
    """The UNet's config without loading weights (bundled for random:sdxl)."""
    from diffusers import UNet2DConditionModel
    if src.kind == "random":
        return dict(SDXL_UNET_CONFIG)
    try:
        if src.kind == "single_file":
            return dict(UNet2DConditionModel.load_config(src.model_config or DEFAULT_MODEL, subfolder="unet"))
        return dict(UNet2DConditionModel.load_config(src.model, subfolder="unet", **_pretrained_kwargs(src)))
    except _load_errors() as e:
        raise UserError(f"model {src.model} has no usable 'unet' part: {_first_line(e)}") from e


def random_encoders(device: torch.device) -> dict:
    """Full-size SDXL VAE and text encoders with random weights, FP32, built on `device` (baselines)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device(device):
        parts = {"vae": AutoencoderKL(**SDXL_VAE_CONFIG),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG)),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))}
    for m in parts.values():
        m.requires_grad_(False).eval()
    return parts


def load_decoder_vae(src: ModelSource, vae: str | None = None):
    """The FP32 VAE, for decoding validation images during training (the cache's VAE override wins)."""
    from diffusers import AutoencoderKL
    if vae:
        return load_vae(vae)
    try:
        if src.kind == "random":
            return AutoencoderKL(**SDXL_VAE_CONFIG)
        if src.kind == "single_file":
            return AutoencoderKL.from_single_file(src.model, config=src.model_config, subfolder="vae",
                                                  torch_dtype=torch.float32)
        kw = {k: v for k, v in _pretrained_kwargs(src).items() if k != "variant"}
        return AutoencoderKL.from_pretrained(src.model, subfolder="vae", **kw)
    except _load_errors() as e:
        raise UserError(f"--validate-every needs the model's VAE to decode: {_first_line(e)}") from e


def load_noise_scheduler(src: ModelSource):
    """The model's own training noise schedule (DDPM with its betas and prediction type).

    A single-file checkpoint carries no scheduler config: use --model-config's, else SDXL base's.
    """
    from diffusers import DDPMScheduler
    folder = {"single_file": src.model_config, "random": None}.get(src.kind, src.model)
    if folder is None:
        return DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    try:
        kw = {"revision": src.revision} if src.kind == "hub" else {}
        return DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
    except _load_errors() as e:
        raise UserError(f"model {folder} has no usable 'scheduler' part: {_first_line(e)}") from e


def check_cache_fits(c, sample: dict, cache) -> None:
    """Stop early, with the mismatch named, when the cache (`sample`: one of its samples) was encoded for another
    architecture than the UNet of config `c`."""
    problems = []
    if sample["latent_mean"].shape[0] != c.in_channels:
        problems.append(f"latent channels {sample['latent_mean'].shape[0]} vs UNet in_channels {c.in_channels}")
    if sample["prompt_embeds"].shape[-1] != c.cross_attention_dim:
        problems.append(f"prompt_embeds width {sample['prompt_embeds'].shape[-1]} vs cross_attention_dim {c.cross_attention_dim}")
    if c.addition_embed_type != "text_time":
        problems.append("the UNet has no SDXL text_time conditioning")
    elif sample["pooled_prompt_embeds"].shape[-1] + 6 * c.addition_time_embed_dim != c.projection_class_embeddings_input_dim:
        problems.append(f"pooled + time_ids width {sample['pooled_prompt_embeds'].shape[-1] + 6 * c.addition_time_embed_dim} "
                        f"vs UNet's {c.projection_class_embeddings_input_dim}")
    if problems:
        raise UserError(f"cache {cache} does not fit this UNet: " + "; ".join(problems))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------
# The tiny SDXL-shaped model: real diffusers/transformers classes, tiny widths, random weights.
# Same structure as SDXL (two CLIP encoders, penultimate hidden states, pooled projection,
# text_time micro-conditioning, VAE downsampling by 8) so every code path is the real one.

TINY_TEXT_1 = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                   projection_dim=32, hidden_act="quick_gelu")
TINY_TEXT_2 = dict(hidden_size=64, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                   projection_dim=32, hidden_act="gelu")
TINY_TIME_EMBED_DIM = 8
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 16, 16],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.13025)


def tiny_unet_config() -> dict:
    cross = TINY_TEXT_1["hidden_size"] + TINY_TEXT_2["hidden_size"]
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64, 64],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 1, 2], cross_attention_dim=cross,
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_TEXT_2["projection_dim"] + 6 * TINY_TIME_EMBED_DIM,
        norm_num_groups=8,
    )


def write_tiny_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> None:
    """A character-level CLIP BPE vocabulary (plus a few merges), written as vocab.json/merges.txt; with `words`,
    more merges that make each of them a single token (a word-level vocabulary; characters for any other word)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,!?'-:;()\"/&"
    merges = ["t h", "th e</w>", "a n", "an d</w>", "i n", "o n</w>", "e r", "r e"]
    merges += _word_merges(words, merges)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for c in chars:
        tokens += [c, c + "</w>"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _clip_bpe(word: str, ranks: dict) -> list[str]:
    """The parts CLIPTokenizer's byte-pair merging turns `word` into, given merge ranks {(left, right): rank}."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if tuple(parts[i:i + 2]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _word_merges(words: tuple[str, ...], merges: list[str]) -> list[str]:
    """Merges, after `merges`, that leave every word of `words` one token: for a word still in several parts, merge
    its first two, until every word is whole (a later merge can reopen an earlier word: look again until none is)."""
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    added = []
    while any(len(_clip_bpe(w, ranks)) > 1 for w in words):
        for w in words:
            while len(parts := _clip_bpe(w, ranks)) > 1:
                ranks[(parts[0], parts[1])] = len(ranks)
                added.append(f"{parts[0]} {parts[1]}")
    return added


def tiny_sdxl_pipeline(seed: int = 0, words: tuple[str, ...] = (), text_configs: tuple[dict, dict] = (TINY_TEXT_1, TINY_TEXT_2),
                       vae_config: dict = TINY_VAE, unet_config: dict | None = None):
    """A small random-weight SDXL pipeline (StableDiffusionXLPipeline): the tiny model's sizes unless given; `words`
    become single tokens of both tokenizers (write_tiny_tokenizer)."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        write_tiny_tokenizer(Path(tok_dir), words)
        files = (str(Path(tok_dir) / "vocab.json"), str(Path(tok_dir) / "merges.txt"))
        tokenizer = CLIPTokenizer(*files, model_max_length=77)
        tokenizer_2 = CLIPTokenizer(*files, model_max_length=77, pad_token="!")
    text_kw = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_configs[0], **text_kw))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_configs[1], **text_kw))
    vae = AutoencoderKL(**vae_config)
    unet = UNet2DConditionModel(**(unet_config or tiny_unet_config()))
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SDXL_SCHEDULER_CONFIG.items()
                                          if k not in ("clip_sample", "sample_max_value", "set_alpha_to_one")})
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def save_pipeline(pipe, folder: str | os.PathLike) -> Path:
    """pipe.save_pretrained(folder), its weight files given the default mode (safetensors writes 0600)."""
    folder = Path(folder)
    pipe.save_pretrained(folder)
    for f in folder.rglob("*.safetensors"):
        os.chmod(f, default_mode())
    return folder


def build_tiny_sdxl(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny random-weight SDXL pipeline and save it with save_pretrained; returns the folder."""
    return save_pipeline(tiny_sdxl_pipeline(seed), folder)
