"""stages/config.py: the one place options are checked, torch-free; and the layout's rules (no import circle)."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys

import pytest

from stages.config import LR_SCHEDULERS, BenchConfig, EncodeConfig, TrainConfig, parse_size
from stages.errors import UserError
from tests.conftest import REPO


def test_lr_scheduler_choices_are_diffusers_own():
    from diffusers.optimization import SchedulerType
    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


@pytest.mark.parametrize("command", [[], ["train"], ["encode"], ["bench"], ["sample"], ["export"], ["info"]])
def test_help_never_imports_torch(command):
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "pipeline.py"), *command, "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "Usage:" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "stages.config" in imported


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "--rank 0: must be > 0"),
    ({"lora_type": "lycoris"}, "unknown --lora-type lycoris: choose one of lora, dora, loha, lokr"),
    ({"lr_scheduler": "cosinee"}, "unknown --lr-scheduler cosinee: choose one of linear, cosine"),
    ({"caption_dropout": 1.5}, "--caption-dropout 1.5: must be in the range"),
    ({"rank_pattern": "to_k"}, "--rank-pattern 'to_k': expected name=rank"),
    ({"target_modules": " , "}, "--target-modules: name at least one module"),
    ({"vram_budget": "lots"}, "--vram-budget lots: give a size"),
    ({"compile": "regional-graphs", "cuda_graphs": "on"}, "--compile regional-graphs makes each block its own CUDA graph"),
    ({"stream_blocks": "0"}, "--stream-blocks 0: expected auto, off or a number of blocks >= 1"),
    ({"stream_blocks": "4", "compile": "regional"}, "--stream-blocks 4 with --compile regional"),
    ({"stream_blocks": "4", "cuda_graphs": "on", "vram_budget": "4GiB"}, "--vram-budget does not plan --stream-blocks 4"),
])
def test_train_options_are_checked_where_the_config_is_made(kwargs, message):
    with pytest.raises(UserError) as e:
        TrainConfig(**kwargs)
    assert str(e.value).startswith(message)


def test_encode_options_are_checked_where_the_config_is_made():
    assert EncodeConfig(resolution="512,1024,512").resolutions == [512, 1024]
    with pytest.raises(UserError, match="positive multiple of 8"):
        EncodeConfig(resolution=100)
    with pytest.raises(UserError, match="--bucket-step 48"):
        EncodeConfig(resolution=512, buckets=True, bucket_step=48)


def test_bench_shares_train_fields():
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(BenchConfig):
        if f.name in train and f.name not in ("model", "vram_budget", "sweep"):  # bench: other default, other meaning
            assert f.metadata == train[f.name].metadata and f.default == train[f.name].default, f.name
    assert parse_size("12GiB") == 12 * 2**30 and parse_size("1500MB") == 1_500_000_000


def imports_of(path) -> set[str]:
    """Project modules that a file imports, anywhere in it (lazy imports inside functions too)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in ("stages", "cache", "pipeline")}
    return found


def test_no_module_imports_a_module_that_imports_it_back():
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts): p
               for p in [*REPO.glob("stages/*.py"), *REPO.glob("cache/*.py"), REPO / "pipeline.py"]}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    graph = {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph[start])
    circles = sorted(a for a in graph if reaches(a, a))
    assert not circles, f"import circles through {circles}"
