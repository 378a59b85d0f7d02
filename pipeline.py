"""Command line: one command per stage. Flags map 1:1 onto each stage's config dataclass, whose
fields hold the defaults and help texts. No logic here beyond wiring."""
from __future__ import annotations

import dataclasses
import errno
import functools
import os
import sys

import click

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_libraries() -> None:
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def from_config(cls, name: str, *flags: str, **kw):
    """A click option for dataclass field `name`: default and help come from the field."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if not flags:
        flags = ("--" + name.replace("_", "-"),)
    if isinstance(default, bool) and "/" not in flags[0] and "is_flag" not in kw:
        kw["is_flag"] = True
    return click.option(*flags, name, default=default, show_default=default is not None,
                        help=f.metadata.get("help"), **kw)


OUT_OF_MEMORY = """the GPU ran out of memory. Settings that lower memory, most effective first:
  --gradient-checkpointing (on by default), --batch-size 1 with a larger --grad-accum,
  --mixed-precision fp16 or bf16 (not no), --optimizer adamw8bit, a lower --rank,
  or a cache encoded at a lower --resolution. Checkpoints written so far are intact (--resume latest)."""


def run_stage(fn):
    """Turn the project's own errors into a one-line message and a non-zero exit, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from cache.format import CacheError
        from stages.errors import UserError
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except (UserError, CacheError) as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise click.ClickException(f"disk full while writing {e.filename or 'output'}: free space and rerun the "
                                       "same command; completed shards and earlier checkpoints are intact") from None
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if "out of memory" not in str(e).lower():
                raise
            raise click.ClickException(OUT_OF_MEMORY) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


def positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter("must be > 0")
    return value


def non_negative(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter("must be >= 0")
    return value


def resolutions(ctx, param, value):
    """'512' -> 512, '512,768,1024' -> (512, 768, 1024)."""
    try:
        values = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("expected a number or a comma-separated list such as 512,768,1024") from None
    if not values or min(values) <= 0:
        raise click.BadParameter("must be > 0")
    return values[0] if len(values) == 1 else values


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli():
    """Two-stage SDXL LoRA training: encode a dataset once into a cache, then train from it."""


# ------------------------------------------------------------------------------------------ encode
from stages.encode import EncodeConfig  # noqa: E402  (light import: dataclass only at module level)


@cli.command()
@from_config(EncodeConfig, "model")
@from_config(EncodeConfig, "revision")
@from_config(EncodeConfig, "variant")
@from_config(EncodeConfig, "model_config")
@from_config(EncodeConfig, "vae")
@from_config(EncodeConfig, "dataset")
@from_config(EncodeConfig, "split")
@from_config(EncodeConfig, "image_column")
@from_config(EncodeConfig, "caption_column")
@from_config(EncodeConfig, "cache")
@from_config(EncodeConfig, "resolution", type=str, callback=resolutions)
@from_config(EncodeConfig, "buckets")
@from_config(EncodeConfig, "bucket_step", callback=positive)
@from_config(EncodeConfig, "bucket_max_aspect", callback=positive)
@from_config(EncodeConfig, "center_crop", "--center-crop/--random-crop")
@from_config(EncodeConfig, "flip", "--flip/--no-flip")
@from_config(EncodeConfig, "cache_dtype", type=click.Choice(["fp16", "bf16", "fp32"]))
@from_config(EncodeConfig, "batch_size", callback=positive)
@from_config(EncodeConfig, "shard_size", callback=positive)
@from_config(EncodeConfig, "device", type=click.Choice(["auto", "cpu", "cuda"]))
@from_config(EncodeConfig, "num_workers", callback=non_negative)
@from_config(EncodeConfig, "seed")
@from_config(EncodeConfig, "overwrite")
@from_config(EncodeConfig, "validation_prompt", multiple=True)
@from_config(EncodeConfig, "dry_run")
@run_stage
def encode(**kwargs):
    """Stage 1: encode images and captions once into a shard cache (VAE and text encoders only)."""
    from stages.encode import encode as run
    run(EncodeConfig(**kwargs), log=click.echo)


@cli.command()
@click.argument("cache")
@click.option("--verify", is_flag=True, help="Also check every shard's size and sha256.")
@run_stage
def info(cache, verify):
    """Print a cache's manifest for humans."""
    from cache import CacheReader
    from stages.encode import describe
    reader = CacheReader(cache)
    click.echo(describe(reader.manifest))
    if verify:
        problems = reader.verify()
        for p in problems:
            click.echo(f"corrupt          {p}")
        if problems:
            raise click.ClickException(f"{len(problems)} shard(s) failed verification")
        click.echo(f"verified         all {len(reader.manifest.shards)} shard(s) intact")


# ------------------------------------------------------------------------------------------- train
from stages.quantize import BASE_WEIGHTS  # noqa: E402
from stages.train import TrainConfig  # noqa: E402


@cli.command()
@from_config(TrainConfig, "cache")
@from_config(TrainConfig, "output")
@from_config(TrainConfig, "model")
@from_config(TrainConfig, "revision")
@from_config(TrainConfig, "variant")
@from_config(TrainConfig, "model_config")
@from_config(TrainConfig, "resolution_schedule")
@from_config(TrainConfig, "rank", callback=positive)
@from_config(TrainConfig, "alpha", callback=positive)
@from_config(TrainConfig, "target_modules")
@from_config(TrainConfig, "lora_type", type=click.Choice(["lora", "dora", "loha", "lokr"]))
@from_config(TrainConfig, "rank_pattern")
@from_config(TrainConfig, "gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing")
@from_config(TrainConfig, "compile", type=click.Choice(["none", "regional", "regional-graphs"]))
@from_config(TrainConfig, "vram_budget")
@from_config(TrainConfig, "batch_size", callback=positive)
@from_config(TrainConfig, "grad_accum", callback=positive)
@from_config(TrainConfig, "learning_rate", callback=positive)
@from_config(TrainConfig, "scale_lr")
@from_config(TrainConfig, "lr_scheduler")
@from_config(TrainConfig, "warmup_steps", callback=non_negative)
@from_config(TrainConfig, "max_steps", callback=positive)
@from_config(TrainConfig, "max_grad_norm", callback=positive)
@from_config(TrainConfig, "noise_offset", callback=non_negative)
@from_config(TrainConfig, "min_snr_gamma", type=float, callback=positive)
@from_config(TrainConfig, "timestep_sampling", type=click.Choice(["uniform", "stratified", "logit-normal"]))
@from_config(TrainConfig, "prediction_type", type=click.Choice(["epsilon", "v_prediction"]))
@from_config(TrainConfig, "rescale_betas_zero_snr")
@from_config(TrainConfig, "caption_dropout", type=click.FloatRange(0, 1))
@from_config(TrainConfig, "optimizer", type=click.Choice(["adamw8bit", "adamw"]))
@from_config(TrainConfig, "weight_decay", callback=non_negative)
@from_config(TrainConfig, "mixed_precision", type=click.Choice(["auto", "no", "fp16", "bf16"]))
@from_config(TrainConfig, "base_weights", type=click.Choice(BASE_WEIGHTS))
@from_config(TrainConfig, "attention", type=click.Choice(["auto", "sdpa", "xformers"]))
@from_config(TrainConfig, "seed")
@from_config(TrainConfig, "checkpoint_every", callback=non_negative)
@from_config(TrainConfig, "max_bad_steps", callback=positive)
@from_config(TrainConfig, "validate_every", callback=non_negative)
@from_config(TrainConfig, "validation_steps", callback=positive)
@from_config(TrainConfig, "validation_guidance", callback=non_negative)
@from_config(TrainConfig, "checkpoints_total_limit", type=int, callback=positive)
@from_config(TrainConfig, "report_to", type=click.Choice(["none", "tensorboard"]))
@from_config(TrainConfig, "resume")
@from_config(TrainConfig, "verify_cache", "--verify-cache/--no-verify-cache")
@from_config(TrainConfig, "device", type=click.Choice(["auto", "cpu", "cuda"]))
@from_config(TrainConfig, "num_workers", callback=non_negative)
@from_config(TrainConfig, "overwrite")
@run_stage
def train(**kwargs):
    """Stage 2: train a UNet LoRA from the cache (loads the UNet only)."""
    from stages.train import train as run
    run(TrainConfig(**kwargs), log=click.echo)


# ------------------------------------------------------------------------------------------- bench
from stages.bench import BenchConfig  # noqa: E402


@cli.command()
@from_config(BenchConfig, "model")
@from_config(BenchConfig, "resolution", callback=positive)
@from_config(BenchConfig, "batch_size", callback=positive)
@from_config(BenchConfig, "grad_accum", callback=positive)
@from_config(BenchConfig, "mixed_precision", type=click.Choice(["auto", "no", "fp16", "bf16"]))
@from_config(BenchConfig, "base_weights", type=click.Choice(BASE_WEIGHTS))
@from_config(BenchConfig, "gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing")
@from_config(BenchConfig, "optimizer", type=click.Choice(["adamw8bit", "adamw"]))
@from_config(BenchConfig, "rank", callback=positive)
@from_config(BenchConfig, "alpha", callback=positive)
@from_config(BenchConfig, "target_modules")
@from_config(BenchConfig, "compile", type=click.Choice(["none", "regional", "regional-graphs"]))
@from_config(BenchConfig, "steps", callback=positive)
@from_config(BenchConfig, "warmup", callback=non_negative)
@from_config(BenchConfig, "baseline")
@from_config(BenchConfig, "vram_budget")
@from_config(BenchConfig, "device", type=click.Choice(["auto", "cpu", "cuda"]))
@from_config(BenchConfig, "seed")
@run_stage
def bench(**kwargs):
    """Measure a training configuration: peak memory, images/s, time to first step, MFU (same step as train)."""
    from stages.bench import bench as run
    run(BenchConfig(**kwargs), log=click.echo)


# -------------------------------------------------------------------------------- sample and demo
from stages.sample import SampleConfig  # noqa: E402


@cli.command()
@from_config(SampleConfig, "lora")
@from_config(SampleConfig, "model")
@from_config(SampleConfig, "prompt", multiple=True)
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), help="A file with one prompt per line.")
@from_config(SampleConfig, "negative_prompt")
@from_config(SampleConfig, "steps", callback=positive)
@from_config(SampleConfig, "guidance", callback=non_negative)
@from_config(SampleConfig, "seed")
@from_config(SampleConfig, "resolution", callback=positive)
@from_config(SampleConfig, "lora_scale")
@from_config(SampleConfig, "compare")
@from_config(SampleConfig, "out")
@from_config(SampleConfig, "device", type=click.Choice(["auto", "cpu", "cuda"]))
@from_config(SampleConfig, "overwrite")
@run_stage
def sample(prompts_file, **kwargs):
    """Render prompts with base + LoRA; with --compare, also the base model and a labelled grid."""
    from stages.sample import sample as run
    if prompts_file:
        lines = [line.strip() for line in open(prompts_file, encoding="utf-8") if line.strip()]
        if not lines:
            raise click.UsageError(f"--prompts-file {prompts_file} holds no prompt")
        kwargs["prompt"] = tuple(kwargs["prompt"]) + tuple(lines)
    run(SampleConfig(**kwargs), log=click.echo)


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to put the demo's model, images, cache, LoRA and samples (default: a new temporary folder).")
@click.option("--steps", default=30, show_default=True, callback=positive, help="Training steps.")
@run_stage
def demo(workdir, steps):
    """End to end on CPU in about a minute: tiny model, generated images, encode, train, before/after."""
    import tempfile

    from stages.demo import run_demo
    run_demo(workdir or tempfile.mkdtemp(prefix="sdxl-lora-demo-"), steps=steps, log=click.echo)


# ------------------------------------------------------------------------------------------ export
from stages.export import ExportConfig  # noqa: E402


@cli.command()
@from_config(ExportConfig, "lora", required=True)
@from_config(ExportConfig, "format", type=click.Choice(["kohya", "diffusers"]))
@from_config(ExportConfig, "out", required=True)
@from_config(ExportConfig, "overwrite")
@run_stage
def export(**kwargs):
    """Write a LoRA for A1111 / ComfyUI / Forge (kohya format), or import a kohya file back (diffusers)."""
    from stages.export import export as run
    run(ExportConfig(**kwargs), log=click.echo)


if __name__ == "__main__":
    cli()
