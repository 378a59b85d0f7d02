"""Command line: one command per stage. Flags map 1:1 onto each stage's config dataclass, whose
fields hold the defaults and help texts. No logic here beyond wiring."""
from __future__ import annotations

import dataclasses
import functools
import os
import sys

import click

from stages.config import (CHECKS, DEMO_STEPS, RUN_RECORD_EXTRAS, BenchConfig, EncodeConfig, ExportConfig,
                           SampleConfig, TrainConfig, flag_name)

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
    """A click option for dataclass field `name`: default, help, choices and range check come from the field
    (stages/config.py), so an option is described and validated in one place."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if kw.get("multiple") and isinstance(default, str):  # a repeatable option whose field holds one value by default
        default = (default,)
    if not flags:
        flags = (flag_name(name),)
    if isinstance(default, bool) and "/" not in flags[0] and "is_flag" not in kw:
        kw["is_flag"] = True
    if "choices" in f.metadata and "type" not in kw:
        kw["type"] = click.Choice(f.metadata["choices"])
    if "check" in f.metadata and "callback" not in kw:
        kw["callback"] = range_check(f.metadata["check"])
        if default is None and "type" not in kw:
            kw["type"] = float if "float" in str(f.type) else int
    return click.option(*flags, name, default=default, show_default=default is not None,
                        help=f.metadata.get("help"), **kw)


def range_check(check: str):
    passes, message = CHECKS[check]

    def callback(ctx, param, value):
        if value is not None and not passes(value):
            raise click.BadParameter(message)
        return value
    return callback


CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def read_config_file(path: str) -> dict:
    """A TOML, YAML or JSON file of flag values -> a dict (its top level must be a table / mapping)."""
    import json
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in CONFIG_SUFFIXES:
        raise click.BadParameter(f"{path}: expected a {', '.join(CONFIG_SUFFIXES)} file")
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif suffix == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            import yaml
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
    except Exception as e:  # a syntax error of any of the three parsers, or an unreadable file
        raise click.BadParameter(f"{path}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a table of flag = value at the top level")
    return data


def config_defaults(command: click.Command, data: dict, path: str) -> dict:
    """A config file's keys (flag names: learning-rate, learning_rate or --learning-rate; no-flip = true for a
    negative flag) -> click's default_map for `command`: the file's values become the defaults, so flags on the
    command line override them. Unknown keys are an error that names them."""
    names = {}  # spelling -> (parameter name, negated)
    for param in command.params:
        if param.name == "config":
            continue
        names[param.name] = (param.name, False)
        for opt in getattr(param, "opts", []):
            names[opt.lstrip("-").replace("-", "_")] = (param.name, False)
        for opt in getattr(param, "secondary_opts", []):
            names[opt.lstrip("-").replace("-", "_")] = (param.name, True)
    ignored = RUN_RECORD_EXTRAS if command.name == "train" else ()
    unknown = [k for k in data if str(k).lstrip("-").replace("-", "_") not in names and k not in ignored]
    if unknown:
        raise click.BadParameter(f"{path}: unknown key(s) {', '.join(map(str, unknown))} for `{command.name}` "
                                 f"(keys are its flag names, see {command.name} --help)")
    defaults = {}
    for key, value in data.items():
        if key in ignored or value is None:  # None: the flag's own default
            continue
        name, negated = names[str(key).lstrip("-").replace("-", "_")]
        param = next(p for p in command.params if p.name == name)
        if negated:
            value = not value
        if getattr(param, "multiple", False):
            value = list(value) if isinstance(value, (list, tuple)) else [value]
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))  # e.g. resolution = [512, 768] -> "512,768"
        defaults[name] = value
    return defaults


def config_file(command):
    """`--config FILE` for a command: TOML, YAML or JSON whose keys are the command's flag names."""
    def callback(ctx, param, value):
        if value is not None:
            ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx.command, read_config_file(value), value)}
    return click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                        callback=callback, help="A TOML, YAML or JSON file whose keys are this command's flag names "
                        "(e.g. learning-rate = 1e-4); flags given on the command line override it. train also reads "
                        "its own OUTPUT/train_config.json.")(command)


def run_stage(fn):
    """The one error boundary: an expected failure (stages/errors.py: a UserError or CacheError, a full disk, a path
    that cannot be written, out of memory, Ctrl-C) ends in one line and a non-zero exit; `--debug` shows the
    traceback instead. Anything else is a bug, and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from stages.errors import failure_message, interrupted_message
        _quiet_libraries()
        debug = click.get_current_context().find_root().params.get("debug")
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            if debug:
                raise
            _end_progress_bars()
            click.echo(interrupted_message(fn.__name__, kwargs), err=True)
            sys.exit(130)
        except Exception as e:
            message = failure_message(e, fn.__name__, kwargs)
            if message is None or debug:
                raise
            _end_progress_bars()
            raise click.ClickException(message) from None
    return wrapper


def _end_progress_bars() -> None:
    """Close a progress bar left open by the failure, so that the message starts on a line of its own."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class Commands(click.Group):
    def parse_args(self, ctx, args):
        """Refuse an argument holding bytes that are not UTF-8 (the shell passes them through as surrogates)."""
        for arg in args:
            if any("\udc80" <= ch <= "\udcff" for ch in arg):
                raise click.UsageError(f"argument {ascii(arg)} holds bytes that are not UTF-8: use UTF-8 file names "
                                       "and text")
        return super().parse_args(ctx, args)


def resolutions(ctx, param, value):
    """'512' -> 512, '512,768,1024' -> (512, 768, 1024)."""
    try:
        values = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("expected a number or a comma-separated list such as 512,768,1024") from None
    if not values or min(values) <= 0:
        raise click.BadParameter("must be > 0")
    return values[0] if len(values) == 1 else values


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show the full traceback of a failure instead of its one-line message.")
def cli(debug):
    """Two-stage SDXL LoRA training: encode a dataset once into a cache, then train from it."""


# ------------------------------------------------------------------------------------------ encode


@cli.command()
@config_file
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
@from_config(EncodeConfig, "bucket_step")
@from_config(EncodeConfig, "bucket_max_aspect")
@from_config(EncodeConfig, "center_crop", "--center-crop/--random-crop")
@from_config(EncodeConfig, "flip", "--flip/--no-flip")
@from_config(EncodeConfig, "cache_dtype")
@from_config(EncodeConfig, "batch_size")
@from_config(EncodeConfig, "shard_size")
@from_config(EncodeConfig, "device")
@from_config(EncodeConfig, "num_workers")
@from_config(EncodeConfig, "seed")
@from_config(EncodeConfig, "overwrite")
@from_config(EncodeConfig, "caption_variants")
@from_config(EncodeConfig, "shuffle_tags")
@from_config(EncodeConfig, "keep_tokens")
@from_config(EncodeConfig, "tag_separator")
@from_config(EncodeConfig, "tag_dropout")
@from_config(EncodeConfig, "masks")
@from_config(EncodeConfig, "alpha_mask")
@from_config(EncodeConfig, "validation_prompt", multiple=True)
@from_config(EncodeConfig, "dry_run")
@run_stage
def encode(**kwargs):
    """Stage 1: encode images and captions once into a shard cache (VAE and text encoders only)."""
    from stages.encode import encode as run
    run(EncodeConfig(**kwargs), log=click.echo)


@cli.command()
@config_file
@click.argument("cache", type=click.Path(exists=True, file_okay=False, readable=True))
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


@cli.command()
@config_file
@from_config(TrainConfig, "cache", multiple=True)
@from_config(TrainConfig, "output")
@from_config(TrainConfig, "output_name")
@from_config(TrainConfig, "kohya_file", "--kohya-file/--no-kohya-file")
@from_config(TrainConfig, "save_dtype")
@from_config(TrainConfig, "model")
@from_config(TrainConfig, "revision")
@from_config(TrainConfig, "variant")
@from_config(TrainConfig, "model_config")
@from_config(TrainConfig, "allow_other_model")
@from_config(TrainConfig, "resolution_schedule")
@from_config(TrainConfig, "rank")
@from_config(TrainConfig, "alpha")
@from_config(TrainConfig, "target_modules")
@from_config(TrainConfig, "lora_type")
@from_config(TrainConfig, "rank_pattern")
@from_config(TrainConfig, "gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing")
@from_config(TrainConfig, "cuda_graphs")
@from_config(TrainConfig, "compile")
@from_config(TrainConfig, "vram_budget")
@from_config(TrainConfig, "stream_blocks")
@from_config(TrainConfig, "batch_size")
@from_config(TrainConfig, "grad_accum")
@from_config(TrainConfig, "learning_rate")
@from_config(TrainConfig, "loraplus_lr_ratio")
@from_config(TrainConfig, "block_lr")
@from_config(TrainConfig, "scale_lr")
@from_config(TrainConfig, "lr_scheduler")
@from_config(TrainConfig, "warmup_steps")
@from_config(TrainConfig, "max_steps")
@from_config(TrainConfig, "max_grad_norm")
@from_config(TrainConfig, "noise_offset")
@from_config(TrainConfig, "min_snr_gamma", type=float)
@from_config(TrainConfig, "timestep_sampling")
@from_config(TrainConfig, "prediction_type")
@from_config(TrainConfig, "rescale_betas_zero_snr")
@from_config(TrainConfig, "masked_loss")
@from_config(TrainConfig, "caption_dropout")
@from_config(TrainConfig, "loss")
@from_config(TrainConfig, "huber_c")
@from_config(TrainConfig, "huber_schedule")
@from_config(TrainConfig, "debiased_estimation")
@from_config(TrainConfig, "optimizer")
@from_config(TrainConfig, "weight_decay")
@from_config(TrainConfig, "ema_decay", type=float)
@from_config(TrainConfig, "ema_device")
@from_config(TrainConfig, "mixed_precision")
@from_config(TrainConfig, "base_weights")
@from_config(TrainConfig, "attention")
@from_config(TrainConfig, "seed")
@from_config(TrainConfig, "checkpoint_every")
@from_config(TrainConfig, "max_bad_steps")
@from_config(TrainConfig, "validate_every")
@from_config(TrainConfig, "validation_steps")
@from_config(TrainConfig, "validation_guidance")
@from_config(TrainConfig, "checkpoints_total_limit", type=int)
@from_config(TrainConfig, "report_to")
@from_config(TrainConfig, "resume")
@from_config(TrainConfig, "verify_cache", "--verify-cache/--no-verify-cache")
@from_config(TrainConfig, "device")
@from_config(TrainConfig, "num_workers")
@from_config(TrainConfig, "overwrite")
@from_config(TrainConfig, "sweep", multiple=True)
@run_stage
def train(**kwargs):
    """Stage 2: train a UNet LoRA from the cache (loads the UNet only)."""
    from stages.train import train as run
    run(TrainConfig(**kwargs), log=click.echo)


# ------------------------------------------------------------------------------------------- bench


@cli.command()
@config_file
@from_config(BenchConfig, "model")
@from_config(BenchConfig, "resolution")
@from_config(BenchConfig, "batch_size")
@from_config(BenchConfig, "grad_accum")
@from_config(BenchConfig, "mixed_precision")
@from_config(BenchConfig, "base_weights")
@from_config(BenchConfig, "gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing")
@from_config(BenchConfig, "cuda_graphs")
@from_config(BenchConfig, "optimizer")
@from_config(BenchConfig, "rank")
@from_config(BenchConfig, "alpha")
@from_config(BenchConfig, "target_modules")
@from_config(BenchConfig, "compile")
@from_config(BenchConfig, "stream_blocks")
@from_config(BenchConfig, "steps")
@from_config(BenchConfig, "warmup")
@from_config(BenchConfig, "profile_steps")
@from_config(BenchConfig, "validate_steps")
@from_config(BenchConfig, "sweep")
@from_config(BenchConfig, "sweep_ranks")
@from_config(BenchConfig, "baseline")
@from_config(BenchConfig, "vram_budget")
@from_config(BenchConfig, "device")
@from_config(BenchConfig, "seed")
@run_stage
def bench(**kwargs):
    """Measure a training configuration: peak memory, images/s, time to first step, MFU (same step as train)."""
    from stages.bench import bench as run
    run(BenchConfig(**kwargs), log=click.echo)


# -------------------------------------------------------------------------------- sample and demo


@cli.command()
@config_file
@from_config(SampleConfig, "lora")
@from_config(SampleConfig, "model")
@from_config(SampleConfig, "prompt", multiple=True)
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), help="A file with one prompt per line.")
@from_config(SampleConfig, "negative_prompt")
@from_config(SampleConfig, "steps")
@from_config(SampleConfig, "guidance")
@from_config(SampleConfig, "seed")
@from_config(SampleConfig, "resolution")
@from_config(SampleConfig, "lora_scale")
@from_config(SampleConfig, "compare")
@from_config(SampleConfig, "out")
@from_config(SampleConfig, "device")
@from_config(SampleConfig, "overwrite")
@run_stage
def sample(prompts_file, **kwargs):
    """Render prompts with base + LoRA; with --compare, also the base model and a labelled grid."""
    from stages.sample import sample as run
    if prompts_file:
        try:
            lines = [line.strip() for line in open(prompts_file, encoding="utf-8-sig") if line.strip()]
        except UnicodeDecodeError:
            raise click.UsageError(f"--prompts-file {prompts_file} is not UTF-8 text") from None
        if not lines:
            raise click.UsageError(f"--prompts-file {prompts_file} holds no prompt")
        kwargs["prompt"] = tuple(kwargs["prompt"]) + tuple(lines)
    run(SampleConfig(**kwargs), log=click.echo)


@cli.command()
@config_file
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to put the demo's style images, cache, LoRA and samples: a new or empty folder, or an earlier "
                   "demo's, whose outputs it replaces (default: sdxl-lora-demo-USER in the system's temporary folder).")
@click.option("--steps", default=DEMO_STEPS, show_default=True, callback=range_check("positive"),
              help="Training steps of the demo's LoRA.")
@run_stage
def demo(workdir, steps):
    """The demo model learns a style, on CPU in about two minutes: style set, encode, train, base vs + LoRA, scores."""
    from stages.demo import run_demo
    run_demo(workdir, steps=steps, log=click.echo)


# ------------------------------------------------------------------------------------------ export


@cli.command()
@config_file
@from_config(ExportConfig, "lora", required=True)
@from_config(ExportConfig, "format")
@from_config(ExportConfig, "out", required=True)
@from_config(ExportConfig, "overwrite")
@run_stage
def export(**kwargs):
    """Write a LoRA for A1111 / ComfyUI / Forge (kohya format), or import a kohya file back (diffusers)."""
    from stages.export import export as run
    run(ExportConfig(**kwargs), log=click.echo)


if __name__ == "__main__":
    cli()
