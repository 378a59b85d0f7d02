"""What `train` leaves next to the LoRA for people: a model card (README.md), a loss curve (loss.png),
and optionally TensorBoard logs (--report-to tensorboard).

matplotlib and tensorboard are optional (`pip install -e ".[report]"`): without matplotlib the plot is
skipped with one note; asking for tensorboard without it installed is refused before training starts.
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from cache.files import atomic_path, write_bytes_atomic
from stages.config import LORA_TYPES, RUN_RECORD_EXTRAS, flag_name
from stages.errors import UserError

CARD_MARKER = "<!-- written by sdxl-lora-cache -->"
CARD_NAME, FALLBACK_CARD_NAME = "README.md", "MODEL_CARD.md"
REPORT_TO = ("none", "tensorboard")
NO_MATPLOTLIB = "note: matplotlib is not installed; skipped loss.png (pip install matplotlib)"
NO_TENSORBOARD = ("--report-to tensorboard: tensorboard is not installed "
                  "(pip install tensorboard, or pip install -e \".[report]\")")
EXAMPLE_PROMPTS = 3
# Settings that do not change what is learned (where data and outputs are, how often to save or render, how it is
# computed: the model card's other tables cover the rest); every other setting of train_config.json is listed.
NOT_LEARNING = ("cache", "output", "model", "revision", "variant", "model_config", "allow_other_model", "device",
                "num_workers", "overwrite", "resume", "verify_cache", "report_to", "checkpoint_every",
                "checkpoints_total_limit", "validate_every", "validation_steps", "validation_guidance", "max_bad_steps",
                "vram_budget", "stream_blocks", "cuda_graphs", "compile", "scale_lr", "output_name", "kohya_file", "save_dtype",
                "ema_device")


def plural(n: int, noun: str) -> str:
    """'1 step', '6 steps'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ------------------------------------------------------------------------------------- model card
def _get(obj, name: str, default=None):
    """A Manifest field, whether given the dataclass or its JSON dict."""
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _caption(sample) -> str:
    return " ".join(str(_get(sample, "caption", "")).split())


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:g}"
    return str(value)


def model_card(train_config: dict, manifest, summary: dict) -> str:
    """The model card (Markdown) of a finished run.

    train_config: what train_config.json holds (every TrainConfig field, "resolved", "cache_fingerprint");
    manifest: the cache's Manifest (or its JSON dict); summary: what `train()` returns.
    """
    cfg = train_config
    resolved = cfg.get("resolved", {})
    base = resolved.get("model") or {"model": cfg.get("model")}
    out = str(summary.get("output") or cfg.get("output"))
    dataset = _get(manifest, "dataset", {}) or {}
    preprocessing = _get(manifest, "preprocessing", {}) or {}
    samples = _get(manifest, "samples", []) or []
    prompts = [c for c in (_caption(s) for s in samples[:EXAMPLE_PROMPTS]) if c]
    fingerprint = cfg.get("cache_fingerprint") or _get(manifest, "fingerprint", "")

    base_line = f"`{base.get('model')}`"
    extras = [f"{k} `{base[k]}`" for k in ("revision", "variant", "model_config") if base.get(k)]
    if extras:
        base_line += " (" + ", ".join(extras) + ")"
    precision = resolved.get("mixed_precision", cfg.get("mixed_precision"))
    if cfg.get("mixed_precision") not in (None, precision):
        precision = f"{precision} (--mixed-precision {cfg.get('mixed_precision')})"
    optimizer = resolved.get("optimizer", cfg.get("optimizer"))
    if cfg.get("optimizer") not in (None, optimizer):
        optimizer = f"{optimizer} (asked for {cfg.get('optimizer')})"
    rank, alpha = cfg.get("rank"), cfg.get("alpha")
    lr = cfg["learning_rate"] if cfg.get("learning_rate") is not None else resolved.get("learning_rate")  # the optimizer's default
    hyper = [
        ("LoRA rank / alpha", f"{rank} / {alpha:g} (scale alpha/rank = {alpha / rank:g})" if rank and alpha else f"{rank} / {alpha}"),
        ("target modules", f"`{cfg.get('target_modules')}`"),
        ("trainable parameters", f"{resolved['trainable_parameters']:,}" if "trainable_parameters" in resolved else "?"),
        ("learning rate", f"{lr:g}" if lr is not None else "?"),
        ("LR scheduler", f"{cfg.get('lr_scheduler')}, {cfg.get('warmup_steps')} warmup steps"),
        ("steps", str(cfg.get("max_steps"))),
        ("batch", f"{cfg.get('batch_size')} × grad-accum {cfg.get('grad_accum')} = "
                  f"{resolved.get('effective_batch', (cfg.get('batch_size') or 0) * (cfg.get('grad_accum') or 0))}"),
        ("precision", str(precision)),
        ("optimizer", f"{optimizer}, weight decay {cfg.get('weight_decay'):g}" if cfg.get("weight_decay") is not None else str(optimizer)),
        ("max grad norm", f"{cfg.get('max_grad_norm'):g}" if cfg.get("max_grad_norm") is not None else "?"),
        ("gradient checkpointing", "on" if cfg.get("gradient_checkpointing") else "off"),
        ("attention", str(resolved.get("attention", cfg.get("attention")))),
        ("seed", str(cfg.get("seed"))),
        *_recipe_rows(cfg, resolved),
    ]
    steps, trained = summary.get("steps", cfg.get("max_steps")), summary.get("trained_steps")
    trained_line = f"{steps}" + (f" ({trained} in the last run, resumed from step {steps - trained})"
                                 if trained is not None and steps is not None and trained != steps else "")
    skipped = summary.get("skipped_steps")
    name = Path(out).name or "lora"

    lines = [
        CARD_MARKER,
        f"# SDXL LoRA: {name}",
        "",
        f"A LoRA for the UNet of {base_line}, trained with sdxl-lora-cache from a cache of pre-encoded latents "
        "and text embeddings.",
        "",
        "## Training data",
        "",
        f"- dataset: `{dataset.get('name', '?')}`" + (f", split `{dataset['split']}`" if dataset.get("split") else ""),
        f"- samples: {len({_get(s, 'key', i) for i, s in enumerate(samples)})}" + _resolution_text(preprocessing, cfg)
        + (", center crop" if preprocessing.get("center_crop") else ", random crop" if "center_crop" in preprocessing else "")
        + (", random flips" if preprocessing.get("flip") else ""),
        f"- cache fingerprint: `{fingerprint}` (the encoders, preprocessing and dtype the cache was made with; "
        "not the images)",
        *([f"- data digest: `{cfg['cache_samples']}` (sha256 of every sample's key, caption and image hash, in "
           "order: equal digests, equal data)"] if cfg.get("cache_samples") else []),
        "",
        "## Hyperparameters",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v.replace('|', '/')} |" for k, v in hyper],
        "",
        "## Result",
        "",
        f"- steps trained: {trained_line}",
        f"- final loss: {_fmt(summary.get('final_loss', float('nan')))} (mean of the last "
        f"{min(10, trained) if trained else 10} steps)",
    ]
    for resume in cfg.get("resumes", []):
        if resume.get("changes"):
            lines.append(f"- resumed at step {resume['step']} with changed settings: "
                         + ", ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in resume["changes"].items()))
    if skipped:
        lines.append(f"- non-finite steps skipped: {skipped}")
    if summary.get("peak_gib") is not None:
        lines.append(f"- peak GPU memory: {summary['peak_gib']:.2f} GiB")
    lines += ["- per-step metrics: `metrics.jsonl` (loss curve: `loss.png` when matplotlib is installed); "
              "every setting: `train_config.json`", ""]
    if prompts:
        lines += ["## Example prompts", "", "Captions of the training data, so prompts in this style work:", "",
                  *[f"- {p}" for p in prompts], ""]
    example = prompts[0] if prompts else "a photo"
    diffusers_base = base.get("model_config") if base.get("kind") == "single_file" else base.get("model")
    load_kwargs = "".join(f", {k}={json.dumps(base[k])}" for k in ("revision", "variant")
                          if base.get(k) and base.get("kind") != "single_file")
    lines += [
        "## Use it",
        "",
        "### diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionXLPipeline",
        "",
        f"pipe = StableDiffusionXLPipeline.from_pretrained({json.dumps(str(diffusers_base or base.get('model')))}{load_kwargs},",
        "                                                 torch_dtype=torch.float16).to(\"cuda\")",
        f"pipe.load_lora_weights({json.dumps(out)})  # or a checkpoint-N folder in it",
        f"image = pipe({json.dumps(example)}, num_inference_steps=30).images[0]",
        "```",
        "",
        "The file holds the adapter's rank and alpha, so it loads at the strength it was trained with.",
        "Or render base vs base + LoRA with the same seeds:",
        "",
        "```bash",
        f"python pipeline.py sample --lora {shlex.quote(out)} --prompt {shlex.quote(example)} --compare --out ./samples",
        "```",
        "",
        "### ComfyUI / A1111 / Forge",
        "",
        "Convert it to one kohya-format file first, then put that file into the LoRA folder of the UI "
        "(ComfyUI: `models/loras/`, A1111 / Forge: `models/Lora/`):",
        "",
        "```bash",
        f"python pipeline.py export --lora {shlex.quote(out)} --format kohya --out {shlex.quote(name + '.safetensors')}",
        "```",
        "",
    ]
    return "\n".join(lines)


def _recipe_rows(cfg: dict, resolved: dict) -> list[tuple[str, str]]:
    """The adapter and recipe settings, then every other recorded setting that changes what is learned (so that
    an option added later is listed too), as `--flag value`."""
    off = lambda v, text="off": text if v in (None, 0, 0.0, False, "") else f"{v:g}"  # noqa: E731
    rows = [
        ("adapter", f"{LORA_TYPES.get(cfg.get('lora_type'), cfg.get('lora_type') or 'LoRA')}"
                    + (f", rank pattern `{cfg['rank_pattern']}`" if cfg.get("rank_pattern") else ", no rank pattern")),
        ("base weights", str(resolved.get("base_weights", cfg.get("base_weights")))),
        ("prediction type", str(resolved.get("prediction_type") or cfg.get("prediction_type") or "the model's")),
        ("zero terminal SNR", "on" if cfg.get("rescale_betas_zero_snr") else "off"),
        ("timestep sampling", str(cfg.get("timestep_sampling", "uniform"))),
        ("noise offset", off(cfg.get("noise_offset"))),
        ("min-SNR γ", off(cfg.get("min_snr_gamma"), "off (plain MSE)")),
        ("caption dropout", off(cfg.get("caption_dropout"))),
    ]
    shown = {"rank", "alpha", "target_modules", "learning_rate", "lr_scheduler", "warmup_steps", "max_steps",
             "batch_size", "grad_accum", "mixed_precision", "optimizer", "weight_decay", "max_grad_norm",
             "gradient_checkpointing", "attention", "seed", "resolution_schedule", "lora_type", "rank_pattern",
             "base_weights", "prediction_type", "rescale_betas_zero_snr", "timestep_sampling", "noise_offset",
             "min_snr_gamma", "caption_dropout"}
    rows += [(flag_name(k), "off" if v is None else f"`{v}`") for k, v in cfg.items()
             if k not in shown and k not in NOT_LEARNING and k not in RUN_RECORD_EXTRAS]
    return rows


def is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip() == CARD_MARKER
    except OSError:
        return False


def card_path(out_dir: str | Path) -> Path:
    """README.md, unless a README.md we did not write is there: then MODEL_CARD.md."""
    readme = Path(out_dir) / CARD_NAME
    return readme if not readme.exists() or is_ours(readme) else Path(out_dir) / FALLBACK_CARD_NAME


def write_model_card(out_dir: str | Path, train_config: dict, manifest, summary: dict) -> Path:
    """Write the model card into `out_dir` (atomically) and return its path; never replaces a foreign README.md."""
    path = card_path(out_dir)
    write_bytes_atomic(path, model_card(train_config, manifest, summary).encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------- loss curve
def read_losses(metrics_path: str | Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of metrics.jsonl, non-finite losses left out."""
    steps, losses = [], []
    path = Path(metrics_path)
    if not path.exists():
        return steps, losses
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        loss = row.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            steps.append(int(row["step"]))
            losses.append(float(loss))
    return steps, losses


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(metrics_path: str | Path | dict, out_png: str | Path, log=print) -> bool:
    """Plot loss per step and its moving average into `out_png` (Agg, atomic). False if skipped. `metrics_path`
    may be {label: metrics_path} (a sweep's members): one colour per curve, overlaid."""
    try:  # the object API with the Agg canvas: no pyplot, no change of the global backend (notebooks)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log(NO_MATPLOTLIB)
        return False
    curves = {label: read_losses(path) for label, path in
              (metrics_path.items() if isinstance(metrics_path, dict) else [(None, metrics_path)])}
    curves = {label: curve for label, curve in curves.items() if curve[1]}
    if not curves:
        log(f"note: no finite loss in {metrics_path}; skipped {Path(out_png).name}")
        return False
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, (steps, losses)) in enumerate(curves.items()):
        window, color = max(1, min(50, len(losses) // 10)), f"C{i % 10}"
        ax.plot(steps, losses, color=color, alpha=0.35, linewidth=1, label="loss" if label is None else None)
        ax.plot(steps, moving_average(losses, window), color=color, linewidth=2,
                label=f"moving average ({window} steps)" if label is None else label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("training loss: " + (Path(metrics_path).resolve().parent.name if not isinstance(metrics_path, dict)
                                      else f"sweep of {len(metrics_path)} (moving averages)"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small" if len(curves) > 4 else None)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return True


# ------------------------------------------------------------------------------------- trackers
def check_report_to(report_to: str) -> None:
    """Refuse an unknown tracker, or tensorboard when it is not installed (before anything is loaded)."""
    if report_to not in REPORT_TO:
        raise UserError(f"--report-to {report_to}: choose one of {', '.join(REPORT_TO)}")
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UserError(NO_TENSORBOARD) from None


class MetricsLogger:
    """Mirrors each metrics.jsonl row to a tracker: TensorBoard event files in OUT/logs, or nothing.

    `first_step` is the step a resumed run continues after: TensorBoard drops the interrupted run's
    events from there on (purge_step), so the curves match metrics.jsonl.
    """

    SCALARS = ("loss", "lr", "grad_norm")

    def __init__(self, report_to: str, out_dir: str | Path, first_step: int = 0):
        check_report_to(report_to)
        self.writer = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(out_dir) / "logs"), purge_step=first_step + 1)

    def log(self, step: int, row: dict) -> None:
        if self.writer is None:
            return
        for name in self.SCALARS:
            value = row.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _resolution_text(preprocessing: dict, cfg: dict) -> str:
    """' at 512²', ' at 512-1024² (schedule 512:500,1024)', plus ', aspect-ratio buckets'."""
    r = preprocessing.get("resolution")
    if not r:
        return ""
    text = f" at {r}²" if isinstance(r, int) else f" at {'/'.join(map(str, r))}²"
    if cfg.get("resolution_schedule"):
        text += f" (--resolution-schedule {cfg['resolution_schedule']})"
    return text + (", aspect-ratio buckets" if preprocessing.get("buckets") else "")
