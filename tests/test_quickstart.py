"""The README's quick start: the sandbox demo works, and CI runs the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.util import ROOT


def test_the_sandbox_demo_runs_end_to_end() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISP2DEFENDER_")}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "sandbox.py")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Exit codes: dry run 0, first run 0, second run 0; Defender write calls in total: 1" in done.stdout
    assert "What Defender holds now (36 indicators)" in done.stdout


def test_ci_runs_the_test_command_the_readme_gives() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "venv/bin/python -m pytest -q" in readme
    assert '"$venv/bin/python" -m pytest -q' in ci
    assert ("python3 -m venv venv && venv/bin/pip install -r requirements.txt -r tests/requirements.txt "
            "&& venv/bin/python tests/sandbox.py") in readme


def test_every_readme_section_a_message_points_to_exists() -> None:
    source = (ROOT / "misp2defender.py").read_text()
    headings = {line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("## ")}
    named = re.findall(r"see '([^']+)'", source) + re.findall(r"see the (.+?) section of the README", source)
    assert len(named) >= 3
    for name in named:
        assert name in headings or f"The {name}" in headings, f"a message points to a README section {name!r}"
