"""What `train` leaves for people: the model card, loss.png (matplotlib optional), --report-to tensorboard
(optional). Neither matplotlib nor tensorboard needs to be installed: both are faked or blocked here."""
from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import stages.train as train_module
from stages.errors import UserError
from stages.report import (CARD_MARKER, NO_MATPLOTLIB, MetricsLogger, model_card, moving_average, plot_losses,
                           write_model_card)
from stages.config import TrainConfig
from stages.train import train

CAPTIONS = ["a red circle on a blue background", "a green square | on yellow", "a purple triangle", "the fourth one"]
METRICS = [{"step": 1, "loss": 0.5, "lr": 1e-4, "grad_norm": 0.3}, {"step": 2, "loss": float("nan"), "lr": 1e-4,
           "grad_norm": float("inf"), "skipped": True}, {"step": 3, "loss": 0.25, "lr": 2e-4, "grad_norm": 0.2},
           {"step": 4, "loss": 0.125, "lr": 2e-4, "grad_norm": 0.1}]


def card_inputs(out="runs/my-lora"):
    cfg = {**asdict(TrainConfig(output=out, rank=8, alpha=4.0, target_modules="to_q,to_v", learning_rate=3e-5,
                                lr_scheduler="cosine", warmup_steps=7, max_steps=123, batch_size=2, grad_accum=3,
                                mixed_precision="fp16", optimizer="adamw8bit")),
           "resolved": {"model": {"model": "stabilityai/stable-diffusion-xl-base-1.0", "revision": "abc123",
                                  "variant": "fp16", "model_config": None, "kind": "hub"},
                        "mixed_precision": "float16", "optimizer": "adamw8bit", "attention": "sdpa",
                        "trainable_parameters": 5_806_080, "effective_batch": 6, "device": "cuda"},
           "cache_fingerprint": "f" * 64}
    manifest = {"fingerprint": "f" * 64, "dataset": {"name": "lambdalabs/naruto-blip-captions", "split": "train"},
                "preprocessing": {"resolution": 512, "center_crop": True, "flip": True},
                "samples": [{"key": str(i), "caption": c} for i, c in enumerate(CAPTIONS)]}
    summary = {"output": out, "steps": 123, "trained_steps": 23, "final_loss": 0.0812345, "skipped_steps": 2,
               "peak_gib": 5.36}
    return cfg, manifest, summary


def test_model_card_holds_data_hyperparameters_result_prompts_and_how_to_load():
    card = model_card(*card_inputs())
    assert card.splitlines()[0] == CARD_MARKER
    for text in ("`stabilityai/stable-diffusion-xl-base-1.0` (revision `abc123`, variant `fp16`)",
                 "dataset: `lambdalabs/naruto-blip-captions`, split `train`", "samples: 4 at 512²",
                 f"cache fingerprint: `{'f' * 64}`",
                 "| LoRA rank / alpha | 8 / 4 (scale alpha/rank = 0.5) |", "| target modules | `to_q,to_v` |",
                 "| trainable parameters | 5,806,080 |", "| learning rate | 3e-05 |",
                 "| LR scheduler | cosine, 7 warmup steps |", "| steps | 123 |", "| batch | 2 × grad-accum 3 = 6 |",
                 "| precision | float16 (--mixed-precision fp16) |", "| optimizer | adamw8bit, weight decay 0.01 |",
                 "steps trained: 123 (23 in the last run, resumed from step 100)", "final loss: 0.0812",
                 "non-finite steps skipped: 2", "peak GPU memory: 5.36 GiB",
                 "- a red circle on a blue background", "- a green square | on yellow", "- a purple triangle",
                 'from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", revision="abc123", variant="fp16",',
                 'pipe.load_lora_weights("runs/my-lora")',
                 "python pipeline.py export --lora runs/my-lora --format kohya --out my-lora.safetensors"):
        assert text in card, text
    assert "the fourth one" not in card  # only the first 3 captions


def test_model_card_lists_every_setting_that_changes_training_and_says_what_the_fingerprint_is():
    from stages.report import NOT_LEARNING
    cfg, manifest, summary = card_inputs()
    cfg.update(lora_type="dora", rank_pattern="to_k=4", noise_offset=0.05, min_snr_gamma=5.0, caption_dropout=0.1,
               timestep_sampling="logit-normal", rescale_betas_zero_snr=True, cache_samples="d" * 64,
               some_new_option=3)  # an option added later is listed without touching the card
    card = model_card(cfg, manifest, summary)
    for text in ("| adapter | DoRA, rank pattern `to_k=4` |", "| noise offset | 0.05 |", "| min-SNR γ | 5 |",
                 "| caption dropout | 0.1 |", "| timestep sampling | logit-normal |", "| zero terminal SNR | on |",
                 "| --some-new-option | `3` |", "| prediction type | the model's |",
                 f"cache fingerprint: `{'f' * 64}` (the encoders, preprocessing and dtype the cache was made with; not "
                 "the images)", f"data digest: `{'d' * 64}`"):
        assert text in card, text
    plain = model_card(*card_inputs())
    assert "| noise offset | off |" in plain and "| min-SNR γ | off (plain MSE) |" in plain and "None" not in plain
    assert not set(NOT_LEARNING) & {"noise_offset", "min_snr_gamma", "caption_dropout", "lora_type", "rank_pattern"}


def test_model_card_of_a_single_file_model_loads_through_its_config_folder():
    cfg, manifest, summary = card_inputs(out="out dir")
    cfg["resolved"]["model"] = {"model": "/ckpt/sdxl.safetensors", "kind": "single_file", "variant": "fp16",
                                "model_config": "stabilityai/stable-diffusion-xl-base-1.0"}
    summary.update(trained_steps=123, final_loss=float("nan"), peak_gib=None, skipped_steps=0)
    card = model_card(cfg, manifest, summary)
    assert 'from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",\n' in card  # no variant= for the config repo
    assert "steps trained: 123\n" in card and "final loss: nan" in card and "peak GPU" not in card
    assert "export --lora 'out dir' --format kohya --out 'out dir.safetensors'" in card  # shell-quoted


def test_write_model_card_replaces_its_own_card_atomically(tmp_path):
    first = write_model_card(tmp_path, *card_inputs())
    assert first == tmp_path / "README.md"
    cfg, manifest, summary = card_inputs()
    summary["final_loss"] = 0.5
    assert write_model_card(tmp_path, cfg, manifest, summary) == first
    assert "final loss: 0.5000" in first.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary file left


def test_a_foreign_readme_is_never_overwritten(tmp_path):
    foreign = "# my notes\n\nkeep me\n"
    (tmp_path / "README.md").write_text(foreign)
    path = write_model_card(tmp_path, *card_inputs())
    assert path == tmp_path / "MODEL_CARD.md" and path.read_text().startswith(CARD_MARKER + "\n")
    assert (tmp_path / "README.md").read_text() == foreign
    assert write_model_card(tmp_path, *card_inputs()) == path  # and again, still beside it


def write_metrics(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    return path


def block_import(monkeypatch, *names):
    for name in names:  # None in sys.modules: `import name` raises ImportError, installed or not
        monkeypatch.setitem(sys.modules, name, None)


def test_plot_losses_without_matplotlib_logs_exactly_one_note(tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg")
    logs = []
    assert plot_losses(write_metrics(tmp_path / "metrics.jsonl"), tmp_path / "loss.png", logs.append) is False
    assert logs == ["note: matplotlib is not installed; skipped loss.png (pip install matplotlib)"] == [NO_MATPLOTLIB]
    assert not (tmp_path / "loss.png").exists()


def fake_matplotlib(monkeypatch) -> dict:
    """A minimal matplotlib (figure.Figure, backends.backend_agg.FigureCanvasAgg) that records the calls
    and writes a real PNG with Pillow."""
    calls = {"plot": [], "canvas": [], "savefig": []}

    class Axes:
        def plot(self, x, y, **kw):
            calls["plot"].append((list(x), list(y), kw))

        def __getattr__(self, name):  # set_xlabel, set_title, grid, legend, ...
            return lambda *a, **kw: None

    class Figure:
        def __init__(self, *a, **kw):
            self.canvas = None

        def add_subplot(self, *a, **kw):
            return Axes()

        def tight_layout(self):
            pass

        def savefig(self, path, format=None, **kw):
            assert self.canvas is not None and format == "png"
            calls["savefig"].append(str(path))
            Image.new("RGB", (8, 4), "white").save(path, format="PNG")

    class FigureCanvasAgg:
        def __init__(self, figure):
            figure.canvas = self
            calls["canvas"].append(figure)

    mpl, figure, backends, agg = (types.ModuleType(n) for n in ("matplotlib", "matplotlib.figure",
                                                                  "matplotlib.backends", "matplotlib.backends.backend_agg"))
    figure.Figure, agg.FigureCanvasAgg = Figure, FigureCanvasAgg
    mpl.figure, mpl.backends, backends.backend_agg = figure, backends, agg
    for module in (mpl, figure, backends, agg):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return calls


def test_plot_losses_plots_the_finite_losses_and_their_moving_average(tmp_path, monkeypatch):
    calls = fake_matplotlib(monkeypatch)
    logs = []
    assert plot_losses(write_metrics(tmp_path / "metrics.jsonl"), tmp_path / "loss.png", logs.append) is True
    assert logs == []
    with Image.open(tmp_path / "loss.png") as im:
        assert im.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]  # written under a temp name
    (x, y, kw), (ax, ay, akw) = calls["plot"]
    finite = [r for r in METRICS if math.isfinite(r["loss"])]
    assert x == [r["step"] for r in finite] and y == [r["loss"] for r in finite] and kw["label"] == "loss"
    assert ax == x and ay == moving_average(y, 1) and "moving average" in akw["label"]
    assert len(calls["canvas"]) == 1 and len(calls["savefig"]) == 1
    tmp = Path(calls["savefig"][0])  # a hidden temporary name of this writer's own beside the target, gone after
    assert tmp.parent == tmp_path and tmp.name.startswith(".loss.png.") and tmp.suffix == ".tmp" and not tmp.exists()


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([4.0, 2.0], 10) == [4.0, 3.0]


def fake_tensorboard(monkeypatch) -> list:
    writers = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def close(self):
            self.closed = True

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return writers


def test_metrics_logger_mirrors_loss_lr_grad_norm_to_tensorboard(tmp_path, monkeypatch):
    writers = fake_tensorboard(monkeypatch)
    with MetricsLogger("tensorboard", tmp_path, first_step=4) as tracker:
        tracker.log(5, {"step": 5, "loss": 0.5, "lr": 1e-4, "grad_norm": float("inf"), "seconds": 1.0})
    (writer,) = writers
    assert writer.log_dir == str(tmp_path / "logs") and writer.purge_step == 5 and writer.closed
    assert writer.scalars == [("train/loss", 0.5, 5), ("train/lr", 1e-4, 5)]  # non-finite values left out
    with MetricsLogger("none", tmp_path) as tracker:  # the default: nothing
        tracker.log(1, METRICS[0])
    assert len(writers) == 1


def test_report_to_tensorboard_without_tensorboard_fails_before_training(tmp_path, monkeypatch):
    block_import(monkeypatch, "torch.utils.tensorboard")
    monkeypatch.setattr(train_module, "CacheReader", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(UserError, match=r"^--report-to tensorboard: tensorboard is not installed") as e:
        train(TrainConfig(cache=str(tmp_path / "cache"), output=str(tmp_path / "out"), report_to="tensorboard"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="choose one of none, tensorboard"):
        train(TrainConfig(cache=str(tmp_path / "cache"), output=str(tmp_path / "out"), report_to="wandb"))
    from pipeline import cli
    result = CliRunner().invoke(cli, ["train", "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "out"),
                                      "--report-to", "tensorboard"])
    assert result.exit_code == 1 and result.output.startswith("Error: --report-to tensorboard: tensorboard is not "
                                                              "installed") and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_train_writes_the_model_card_loss_png_and_tensorboard_scalars(tmp_path, fp32_cache, monkeypatch):
    writers = fake_tensorboard(monkeypatch)
    plots = fake_matplotlib(monkeypatch)
    out = tmp_path / "lora"
    logs = []
    summary = train(TrainConfig(cache=str(fp32_cache), output=str(out), max_steps=3, batch_size=1, grad_accum=1,
                                warmup_steps=1, rank=4, alpha=8.0, learning_rate=1e-2, checkpoint_every=0,
                                num_workers=0, device="cpu", gradient_checkpointing=False, report_to="tensorboard"),
                    log=logs.append)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    card = (out / "README.md").read_text()
    manifest = json.loads((fp32_cache / "manifest.json").read_text())
    config = json.loads((out / "train_config.json").read_text())
    assert card.startswith(CARD_MARKER) and config["report_to"] == "tensorboard"
    for text in ("| LoRA rank / alpha | 4 / 8 (scale alpha/rank = 2) |", "| steps | 3 |", "| batch | 1 × grad-accum 1 = 1 |",
                 "| precision | fp32 (--mixed-precision auto) |",
                 f"cache fingerprint: `{manifest['fingerprint']}`",
                 f"final loss: {summary['final_loss']:.4f}", f'pipe.load_lora_weights("{out}")',
                 *[f"- {s['caption']}" for s in manifest["samples"][:3]]):
        assert text in card, text
    assert (out / "loss.png").is_file() and plots["plot"][0][1] == [r["loss"] for r in rows]
    assert logs[-1] == f"model card -> {out / 'README.md'}; loss curve -> {out / 'loss.png'}"
    (writer,) = writers
    assert writer.closed and writer.purge_step == 1
    assert [s for s in writer.scalars if s[0] == "train/loss"] == [("train/loss", r["loss"], r["step"]) for r in rows]
    assert {s[0] for s in writer.scalars} == {"train/loss", "train/lr", "train/grad_norm"}
