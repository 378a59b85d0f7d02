"""notebooks/colab_t4.ipynb: a valid nbformat-4 notebook whose every code cell (but the pip install) runs,
in order, against the tiny model on CPU once its parameters cell is overridden, as papermill would."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "colab_t4.ipynb"


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def tagged(nb: dict, tag: str) -> list[dict]:
    return [c for c in nb["cells"] if tag in c.get("metadata", {}).get("tags", [])]


def to_python(src: str) -> str:
    """IPython's line transforms, minimally: `!cmd` -> _shell("cmd"), `%cd dir` -> _cd("dir"), at any indent."""
    out = []
    for line in src.splitlines():
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if stripped.startswith("!"):
            out.append(f"{indent}_shell({stripped[1:]!r})")
        elif stripped.startswith("%cd "):
            out.append(f"{indent}_cd({stripped[4:].strip()!r})")
        elif stripped.startswith("%"):
            raise AssertionError(f"the test runner does not know this magic: {line}")
        else:
            out.append(line)
    return "\n".join(out)


class NotebookRunner:
    """One shared namespace; shell lines through subprocess with IPython's {NAME} interpolation."""

    def __init__(self):
        self.ns: dict = {"__name__": "__main__", "_shell": self.shell, "_cd": self.cd}
        self.commands: list[str] = []
        self.env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}

    def expand(self, text: str) -> str:
        def value(m):
            assert m.group(1) in self.ns, f"{{{m.group(1)}}} is not a notebook variable"
            return str(self.ns[m.group(1)])
        return re.sub(r"\{(\w+)\}", value, text)

    def shell(self, cmd: str) -> None:
        cmd = self.expand(cmd)
        self.commands.append(cmd)
        proc = subprocess.run(cmd, shell=True, env=self.env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"!{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    def cd(self, path: str) -> None:
        os.chdir(self.expand(path))

    def run(self, cell: dict) -> None:
        exec(compile(to_python(source(cell)), f"<cell {cell.get('id', '?')}>", "exec"), self.ns)


def fake_ipython_display(monkeypatch) -> list:
    """IPython.display with Image/Markdown/display that record what the notebook shows."""
    shown = []
    ipython, display = types.ModuleType("IPython"), types.ModuleType("IPython.display")

    class Image:
        def __init__(self, filename):
            assert Path(filename).is_file(), f"{filename} does not exist"
            self.filename = str(filename)

    class Markdown:
        def __init__(self, data):
            self.data = data

    display.Image, display.Markdown, display.display = Image, Markdown, shown.append
    ipython.display = display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    return shown


def test_notebook_is_a_clean_nbformat4_colab_notebook_for_a_t4():
    nb = load_notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["name"] == "python3" and nb["metadata"]["accelerator"] == "GPU"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":  # committed without outputs
            assert cell["outputs"] == [] and cell["execution_count"] is None
    params = tagged(nb, "parameters")
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert len(params) == 1 and params[0] is first_code  # the variables come first: REPO_URL at the top
    ns: dict = {}
    exec(source(params[0]), ns)  # plain assignments only: runs anywhere
    assert ns["REPO_URL"].endswith(".git") and ns["MIXED_PRECISION"] == "fp16"
    assert ns["MODEL"] == "stabilityai/stable-diffusion-xl-base-1.0" and ns["DATASET"] == "lambdalabs/naruto-blip-captions"
    assert ns["RESOLUTION"] == 512 and ns["MAX_STEPS"] == 1000
    install = tagged(nb, "install")
    assert len(install) == 1 and "!pip install -q -e ." in source(install[0]) and "{REPO_URL}" in source(install[0])
    code = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "code")
    for command in ("pipeline.py encode", "pipeline.py train", "--mixed-precision {MIXED_PRECISION}",
                    "pipeline.py sample --lora {OUTPUT}", "--compare", "compare.png"):
        assert command in code


def test_every_code_cell_runs_against_the_tiny_model_on_cpu(tmp_path, tiny_model, image_folder, monkeypatch):
    nb = load_notebook()
    shown = fake_ipython_display(monkeypatch)
    monkeypatch.chdir(tmp_path)
    overrides = dict(
        REPO_DIR=str(REPO), MODEL=str(tiny_model), DATASET=str(image_folder), CACHE=str(tmp_path / "cache"),
        OUTPUT=str(tmp_path / "lora"), SAMPLES=str(tmp_path / "samples"), RESOLUTION=64, MAX_STEPS=2,
        MIXED_PRECISION="no", SAMPLE_RESOLUTION=64, SAMPLE_STEPS=2,
        EXTRA_ENCODE_FLAGS="--num-workers 0 --device cpu",
        EXTRA_TRAIN_FLAGS="--num-workers 0 --device cpu --grad-accum 1 --warmup-steps 1 --checkpoint-every 0",
        EXTRA_SAMPLE_FLAGS="--device cpu",
    )
    runner = NotebookRunner()
    ran = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        tags = cell.get("metadata", {}).get("tags", [])
        if "install" in tags:
            continue
        runner.run(cell)
        ran.append(cell["id"])
        if "parameters" in tags:  # papermill's way: the test values override the notebook's
            assert set(overrides) <= set(runner.ns), set(overrides) - set(runner.ns)
            runner.ns.update(overrides)

    assert Path.cwd() == REPO  # the %cd ran
    assert [c.split(" --")[0] for c in runner.commands] == [
        "python pipeline.py encode", f"python pipeline.py info {tmp_path / 'cache'}", "python pipeline.py train",
        "python pipeline.py sample"]
    assert (tmp_path / "cache" / "manifest.json").is_file()
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "samples" / "compare.png").is_file()
    images = [s.filename for s in shown if hasattr(s, "filename")]
    assert images[0] == str(tmp_path / "samples" / "compare.png")
    cards = [s.data for s in shown if hasattr(s, "data")]
    assert len(cards) == 1 and cards[0].startswith("<!-- written by sdxl-lora-cache -->")
