"""bench/reproduce.sh: the sections RESULTS.md names exist, and the script runs the CLI only (it runs on a GPU;
here only its listing and its text are checked)."""
from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "reproduce.sh"


def listed_sections() -> set[str]:
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    return set(re.findall(r"^  ([a-z0-9-]+)  ", proc.stderr, re.M))


@pytest.mark.parametrize("args", [[], ["no-such-section"]])
def test_no_or_unknown_section_lists_the_sections_and_exits_2(args):
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage: bash bench/reproduce.sh SECTION" in proc.stderr
    assert {"reference", "bench", "compile", "quantized", "encode"} <= listed_sections()


def test_every_section_results_names_is_one_the_script_runs():
    named = set(re.findall(r"`reproduce\.sh ([a-z0-9-]+)`", (REPO / "bench" / "RESULTS.md").read_text()))
    assert named and named <= listed_sections()
    text = SCRIPT.read_text()
    for section in listed_sections():
        assert re.search(rf"^{re.escape(section)}\)", text, re.M), f"no case branch for {section}"


def test_the_script_calls_the_cli_and_small_python_snippets_only():
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text
    calls = re.findall(r"\bpython3 (\S+)", text)
    assert calls and set(calls) <= {"pipeline.py", "-c"}, set(calls)
