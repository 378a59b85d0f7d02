"""Every path a user takes ends in one clear line. Every command × a table of bad values for each of its options
(missing path, file for folder, folder for file, unreadable, unwritable, read-only, bad name, negative / zero /
non-numbers, empty string, non-UTF-8 bytes, combinations this CPU cannot run) is refused with a non-zero exit code,
no traceback, at most 3 lines of stderr that name the option or the value, and before any model loads (the loaders
record a call and fail). Then a full disk (ENOSPC), a permission error and a read-only file system injected at each
write site of each writing command, Ctrl-C, and --debug."""
from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import traceback
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stages.config import BenchConfig, EncodeConfig, ExportConfig, SampleConfig, TrainConfig, flag_name
from tests.conftest import RESOLUTION

CONFIGS = {"encode": EncodeConfig, "train": TrainConfig, "bench": BenchConfig, "sample": SampleConfig,
           "export": ExportConfig}
NON_UTF8 = "caf\udce9"  # the bytes b"caf\xe9" (Latin-1) as Python receives them in argv
ON_CPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_model) -> Path:
    """A LoRA folder as train writes it (rank 4, attention), with the train_config.json that names its base model."""
    from stages.lora import attach_lora, save_lora
    from stages.sdxl import ModelSource, load_unet
    folder = tmp_path_factory.mktemp("lora") / "lora"
    unet = load_unet(ModelSource(str(tiny_model)))
    attach_lora(unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    save_lora(unet, folder)
    (folder / "train_config.json").write_text(json.dumps(
        {"resolved": {"model": ModelSource(str(tiny_model)).describe()}}))
    return folder


class World:
    """The files and folders the good and bad arguments point at, and the injected permission problems."""

    def __init__(self, tmp: Path, monkeypatch, tiny_model, image_folder, fp32_cache, lora):
        self.tmp, self.monkeypatch = tmp, monkeypatch
        self.tiny_model, self.image_folder, self.cache, self.lora = tiny_model, image_folder, fp32_cache, lora
        self.file = tmp / "a-file.txt"
        self.file.write_text("not what the option wants\n")
        self.empty = tmp / "empty-folder"
        self.empty.mkdir()
        self.latin1 = tmp / "latin1.txt"
        self.latin1.write_bytes("caf\xe9\n".encode("latin-1"))
        self.denied: list[str] = []
        self.read_only: list[str] = []
        real_access, real_statvfs = os.access, os.statvfs

        def access(path, mode, *a, **k):  # tests run as root, whom chmod does not stop: deny by path instead
            return not self._under(path, self.denied) and real_access(path, mode, *a, **k)

        def statvfs(path):
            result = real_statvfs(path)
            if self._under(path, self.read_only):
                return os.statvfs_result((*result[:8], result.f_flag | os.ST_RDONLY, *result[9:]))
            return result
        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(os, "statvfs", statvfs)

    @staticmethod
    def _under(path, roots: list[str]) -> bool:
        p = os.path.abspath(os.fsdecode(path))
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def denied_folder(self, name: str, child: str | None = None) -> str:
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        self.denied.append(str(folder))
        return str(folder / child) if child else str(folder)

    def read_only_folder(self, name: str) -> str:
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        self.read_only.append(str(folder))
        return str(folder / "new")


# The kinds of path each option names, and what is wrong with a path of that kind.
OUT_FOLDER = [("file for folder", lambda w: str(w.file)), ("under a file", lambda w: str(w.file / "sub")),
              ("unwritable", lambda w: w.denied_folder("no-write", "new")),
              ("read-only", lambda w: w.read_only_folder("read-only"))]
IN_FOLDER = [("missing", lambda w: str(w.tmp / "nowhere")), ("file for folder", lambda w: str(w.file)),
             ("unreadable", lambda w: w.denied_folder("no-read"))]
MODEL = [("missing", lambda w: str(w.tmp / "nowhere")), ("typo", lambda w: str(w.tiny_model)[:-1]),
         ("path-like, not a hub id", lambda w: "w/demo/tiny-sdx"), ("not a model folder", lambda w: str(w.empty)),
         ("not a checkpoint file", lambda w: str(w.file))]
LORA = [("missing", lambda w: str(w.tmp / "nowhere")), ("folder without a LoRA", lambda w: str(w.empty)),
        ("not safetensors", lambda w: str(w.file))]
PATHS = {
    ("encode", "model"): MODEL, ("train", "model"): MODEL, ("bench", "model"): MODEL, ("sample", "model"): MODEL,
    ("encode", "vae"): [("missing", lambda w: str(w.tmp / "nowhere" / "vae.safetensors"))],
    ("encode", "model_config"): [("missing", lambda w: str(w.tmp / "nowhere"))],
    ("train", "model_config"): [("missing", lambda w: str(w.tmp / "nowhere"))],
    ("encode", "dataset"): [("missing", lambda w: str(w.tmp / "nowhere")), ("a file", lambda w: str(w.file)),
                            ("path-like, not a hub id", lambda w: "./data/kohya"),
                            ("unreadable", lambda w: w.denied_folder("no-read"))],
    ("encode", "cache"): OUT_FOLDER + [("not a cache", lambda w: str(w.image_folder))],
    ("train", "cache"): IN_FOLDER + [("not a cache", lambda w: str(w.empty))],
    ("info", "cache"): IN_FOLDER + [("not a cache", lambda w: str(w.empty))],
    ("train", "output"): OUT_FOLDER,
    ("train", "resume"): [("typo", lambda w: "lastest"), ("a file", lambda w: str(w.file)),
                          ("no checkpoint", lambda w: "latest")],
    ("sample", "lora"): LORA, ("export", "lora"): LORA,
    ("sample", "out"): OUT_FOLDER, ("demo", "workdir"): OUT_FOLDER + [("not the demo's", lambda w: str(w.image_folder))],
    ("export", "out"): [("folder for file", lambda w: str(w.empty)), ("not .safetensors", lambda w: str(w.file)),
                        ("under a file", lambda w: str(w.file / "x.safetensors")),
                        ("unwritable", lambda w: w.denied_folder("no-write", "x.safetensors"))],
    ("sample", "prompts_file"): [("missing", lambda w: str(w.tmp / "nowhere.txt")), ("folder for file", lambda w: str(w.empty)),
                                 ("not UTF-8 inside", lambda w: str(w.latin1))],
}
# Names and values that only the stage can refuse (not click): each must still be refused before a model loads.
VALUES = {
    ("encode", "resolution"): ["100", "0", "512,x"], ("encode", "caption_column"): ["nope"],
    ("encode", "variant"): ["bogus"], ("train", "variant"): ["bogus"],
    ("train", "target_modules"): ["foo", "to_q,down_blocks"], ("bench", "target_modules"): ["foo"],
    ("train", "rank_pattern"): ["to_k", "zzz=4"], ("train", "resolution_schedule"): ["999", "64:x"],
    ("train", "vram_budget"): ["lots", "8GiB"], ("bench", "vram_budget"): ["lots", "8GiB"],
    ("train", "validate_every"): ["1"],  # the cache holds no validation prompts
    ("bench", "resolution"): ["100"], ("sample", "resolution"): ["100"],
}
# What this CPU cannot run (a CUDA machine runs them: skipped there).
ON_THIS_DEVICE = {"device": ["cuda"], "cuda_graphs": ["on"], "compile": ["regional", "regional-graphs"],
                  "attention": ["xformers"], "base_weights": ["int8", "nf4"], "mixed_precision": ["fp16", "bf16"]}
NUMBERS = {"positive": ["0", "-1", "x"], "non_negative": ["-1", "x"], "probability": ["-0.1", "1.5"], None: ["x"]}


def good_args(w: World, tmp: Path) -> dict[str, dict[str, str]]:
    """Arguments with which each command would run (and load a model): one option at a time is made bad."""
    return {
        "encode": {"model": str(w.tiny_model), "dataset": str(w.image_folder), "cache": str(tmp / "new-cache"),
                   "resolution": str(RESOLUTION), "cache_dtype": "fp32", "num_workers": "0", "device": "cpu"},
        "info": {"cache": str(w.cache)},
        "train": {"cache": str(w.cache), "output": str(tmp / "out"), "max_steps": "1", "num_workers": "0",
                  "device": "cpu", "checkpoint_every": "0"},
        "bench": {"model": str(w.tiny_model), "resolution": str(RESOLUTION), "steps": "1", "warmup": "0", "device": "cpu"},
        "sample": {"lora": str(w.lora), "prompt": "a red circle", "out": str(tmp / "samples"), "steps": "1",
                   "resolution": str(RESOLUTION), "device": "cpu"},
        "demo": {"workdir": str(tmp / "demo"), "steps": "1"},
        "export": {"lora": str(w.lora), "out": str(tmp / "lora.safetensors")},
    }


def bad_values(command: str, param) -> list[tuple[str, object]]:
    """(label, value or a function of the World) for one option."""
    name = param.name
    if getattr(param, "is_flag", False):
        return []
    values = [("empty", ""), ("non-UTF-8", NON_UTF8)]
    values += PATHS.get((command, name), [])
    values += [(f"value {v}", v) for v in VALUES.get((command, name), [])]
    if ON_CPU:
        values += [(f"{v} on a CPU", v) for v in ON_THIS_DEVICE.get(name, [])]
    choices = getattr(param.type, "choices", None)
    if choices:
        values.append(("bad name", "bogus"))
    elif type(param.type).__name__ in ("IntParamType", "FloatParamType"):
        fields = {f.name: f for f in dataclasses.fields(CONFIGS[command])} if command in CONFIGS else {}
        check = fields[name].metadata.get("check") if name in fields else "positive"  # demo --steps
        values += [(f"number {v}", v) for v in NUMBERS[check]]
    return values


def cases():
    from pipeline import cli
    for command, cmd in cli.commands.items():
        for param in cmd.params:
            for label, value in bad_values(command, param):
                yield pytest.param(command, param.name, value, id=f"{command}-{param.name}-{label}")


LOADERS = [("stages.sdxl", "load_encoders"), ("stages.sdxl", "load_unet"), ("stages.sdxl", "load_vae"),
           ("stages.sdxl", "load_decoder_vae"), ("stages.sdxl", "random_encoders"), ("stages.encode", "load_encoders"),
           ("stages.train", "load_unet"), ("stages.bench", "load_encoders"), ("stages.bench", "run_one"),
           ("stages.sample", "load_pipeline"), ("datasets", "load_dataset"),
           ("diffusers", "DiffusionPipeline.from_pretrained"), ("diffusers", "StableDiffusionXLPipeline.from_single_file"),
           ("diffusers", "UNet2DConditionModel.from_single_file"), ("diffusers", "AutoencoderKL.from_single_file"),
           ("diffusers", "ModelMixin.from_pretrained"), ("transformers", "PreTrainedModel.from_pretrained")]


def forbid_loading(monkeypatch) -> list[str]:
    """Make every model loader (and a hub dataset lookup) record its call and fail; returns the record."""
    import importlib
    calls = []
    for module, _ in LOADERS:  # every module first: one imported later would bind an already patched loader for good
        importlib.import_module(module)
    for module, attr in LOADERS:
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)

        def loader(*a, _name=f"{module}.{attr}", **k):
            calls.append(_name)
            raise RuntimeError(f"{_name} was called before the refusal")
        monkeypatch.setattr(owner, name, loader if not path else classmethod(loader))
    return calls


def invoke(args: list[str], cwd: Path):
    from pipeline import cli
    before = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        os.chdir(before)
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    stderr = result.stderr + ("".join(traceback.format_exception(*result.exc_info)) if crashed else "")
    return result, stderr


def command_line(command: str, options: dict[str, str]) -> list[str]:
    args = [command]
    for name, value in options.items():
        args += [value] if command == "info" else [flag_name(name), value]
    return args


@pytest.mark.parametrize("command, option, value", list(cases()))
def test_a_bad_value_is_refused_in_one_line_before_any_model_loads(command, option, value, tmp_path, monkeypatch,
                                                                  tiny_model, image_folder, fp32_cache, lora):
    world = World(tmp_path, monkeypatch, tiny_model, image_folder, fp32_cache, lora)
    options = good_args(world, tmp_path)[command]
    options[option] = value(world) if callable(value) else value
    calls = forbid_loading(monkeypatch)
    result, stderr = invoke(command_line(command, options), tmp_path)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result.exit_code != 0, f"accepted: {result.output[-500:]}"
    assert "Traceback" not in stderr and not calls, stderr[-3000:] or calls
    assert 1 <= len(lines) <= 3, stderr
    named = [flag_name(option), option.upper(), options[option], ascii(options[option])[1:-1], "argument"]
    assert any(n and n in stderr for n in named), stderr  # the message says which option or value is wrong
    assert "None" not in stderr and " object at 0x" not in stderr, stderr


# ------------------------------------------------------------------- failures while writing, after models load
def _full(path="the file", code=errno.ENOSPC):
    return OSError(code, os.strerror(code), str(path))


def inject(monkeypatch, site: str, code: int) -> None:
    """Make one write site fail as a full disk (ENOSPC), a denied permission (EACCES) or a read-only file system."""
    import safetensors.torch
    from PIL import Image

    import cache.writer
    import stages.checkpoint
    import stages.sweep
    from cache.lock import LOCK_NAME
    if site == "rename":  # every atomic file: cache shards and manifest, train_config.json, checkpoints, LoRA
        monkeypatch.setattr(os, "replace", lambda src, dst, **k: (_ for _ in ()).throw(_full(dst, code)))
    elif site == "safetensors":  # the Rust writer reports the OS error inside a SafetensorError
        from safetensors import SafetensorError

        def save_file(tensors, filename, metadata=None):
            raise SafetensorError(f'Error while serializing: IoError(Os {{ code: {code}, kind: StorageFull, '
                                  f'message: "{os.strerror(code)}" }})')
        for owner in (safetensors.torch, cache.writer, stages.checkpoint):
            monkeypatch.setattr(owner, "save_file", save_file)
    elif site == "image":
        monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: (_ for _ in ()).throw(_full(fp, code)))
    elif site == "metrics":
        class Full(io.StringIO):
            def write(self, text):
                raise _full("metrics.jsonl", code)
        monkeypatch.setattr(stages.sweep, "open", lambda *a, **k: Full(), raising=False)
    elif site == "lock":
        real = os.open
        monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: (_ for _ in ()).throw(_full(path, code))
                            if str(path).endswith(LOCK_NAME) else real(path, flags, *a, **k))


WRITES = [("encode", "rename"), ("encode", "safetensors"), ("encode", "lock"),
          ("train", "rename"), ("train", "safetensors"), ("train", "metrics"), ("train", "lock"),
          ("export", "rename"),  # the kohya file's bytes are written by export itself, then renamed into place
          ("export-diffusers", "safetensors"), ("sample", "image")]
MESSAGES = {errno.ENOSPC: "disk full while writing", errno.EACCES: "permission denied",
            errno.EROFS: "read-only file system"}


@pytest.mark.parametrize("command, site, code", [(c, s, errno.ENOSPC) for c, s in WRITES]
                         + [("encode", "rename", errno.EACCES), ("train", "safetensors", errno.EROFS)],
                         ids=lambda v: errno.errorcode[v] if isinstance(v, int) else v)
def test_a_failing_write_ends_in_one_line_and_leaves_no_partial_file(command, site, code, tmp_path, monkeypatch,
                                                                     tiny_model, image_folder, fp32_cache, lora):
    from stages.export import export
    world = World(tmp_path, monkeypatch, tiny_model, image_folder, fp32_cache, lora)
    options = good_args(world, tmp_path)
    if command == "export-diffusers":  # a kohya file to import
        kohya = tmp_path / "kohya.safetensors"
        export(ExportConfig(lora=str(lora), out=str(kohya)), log=lambda *a: None)
        command, options["export"] = "export", {"lora": str(kohya), "format": "diffusers", "out": str(tmp_path / "imported")}
    inject(monkeypatch, site, code)
    result, stderr = invoke(command_line(command, options[command]), tmp_path)
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]  # not the progress bar
    assert result.exit_code == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and MESSAGES[code] in lines[0], stderr[-3000:]
    assert not list(tmp_path.rglob("*.tmp")), list(tmp_path.rglob("*.tmp"))  # no half-written file is left behind
    assert not (tmp_path / "new-cache" / "manifest.json").exists()


@pytest.mark.parametrize("command", ["encode", "train"])
def test_ctrl_c_says_how_to_continue_on_its_own_line(command, tmp_path, monkeypatch, tiny_model, image_folder,
                                                    fp32_cache, lora):
    import cache.writer
    import stages.train
    world = World(tmp_path, monkeypatch, tiny_model, image_folder, fp32_cache, lora)
    options = good_args(world, tmp_path)[command]
    if command == "train":
        options.update(max_steps="3", checkpoint_every="1")
        real_step, steps = stages.train.training_step, []

        def step(model, micro, index, cfg):  # Ctrl-C during the second step: checkpoint-1 is on disk
            steps.append(index)
            if index == 1:
                raise KeyboardInterrupt
            return real_step(model, micro, index, cfg)
        monkeypatch.setattr(stages.train, "training_step", step)
    else:
        options.update(shard_size="2", batch_size="2")
        real_add = cache.writer.CacheWriter.add_record
        added = []

        def add_record(self, *a, **k):
            added.append(1)
            if len(added) == 4:  # after the first shard of two samples
                raise KeyboardInterrupt
            return real_add(self, *a, **k)
        monkeypatch.setattr(cache.writer.CacheWriter, "add_record", add_record)
    result, stderr = invoke(command_line(command, options), tmp_path)
    last = stderr.rstrip().splitlines()[-1]
    assert result.exit_code == 130 and "Traceback" not in stderr, stderr[-3000:]
    if command == "train":
        assert last == (f"interrupted: checkpoint-1 in {tmp_path / 'out'} is intact; rerun the same command with "
                        "--resume latest to continue from it"), stderr
    else:
        assert last.startswith("interrupted: the shards written so far are complete and kept; rerun the same "
                               "command"), stderr
    assert not (tmp_path / ("out" if command == "train" else "new-cache") / ".sdxl-lora.lock").exists()


def test_debug_shows_the_traceback(tmp_path, fp32_cache):
    (tmp_path / "a-file").write_text("")
    args = ["train", "--cache", str(fp32_cache), "--output", str(tmp_path / "a-file" / "out"), "--device", "cpu"]
    result, stderr = invoke(args, tmp_path)
    assert result.exit_code == 1 and "Traceback" not in stderr and "is a file, not a folder" in stderr
    result, stderr = invoke(["--debug", *args], tmp_path)
    assert result.exit_code == 1 and "Traceback" in stderr and "UserError" in stderr


def test_hub_ids_are_recognised_by_form_and_anything_else_is_a_path(tmp_path, monkeypatch):
    from stages.paths import looks_like_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for hub_id in ("stabilityai/stable-diffusion-xl-base-1.0", "lambdalabs/naruto-blip-captions", "gpt2", "a.b/c_d-e"):
        assert not looks_like_path(hub_id), hub_id
    for path in ("./w", "/abs", "~/x", "w/demo/tiny-sdx", "data/kohya", "a\\b", "x..y/z", "a:b", ""):
        assert looks_like_path(path), path
