"""Running misp2defender as users do, against the stand-ins (its ``tool`` fixture is registered by conftest.py).

``tool.run("--dry-run", defender_action="Block")`` writes a config.py with the stand-ins' URLs
plus the overrides, calls ``misp2defender.main([...])`` in-process with stdout/stderr captured,
and returns the exit code, the output and the ``--report`` JSON. ``tool.spawn`` does the same in
a child process, for tests that need signals, locks or a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.util import (
    DEFENDER_TIME_SCALE,
    MISP_KEY,
    ROOT,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_TENANT,
    WRITES,
    m2d,
    write_config,
)

# Sample events carry fixed 2026 timestamps: tests read them without a time window and let the
# expiry start at the run's date, so they keep passing in later years.
TEST_FILTERS = {"published": True, "tags": ['workflow:state="complete"'], "enforceWarninglist": True}


@dataclass
class RunResult:
    code: int
    stdout: str
    stderr: str
    report: dict[str, Any]

    @property
    def counts(self) -> dict[str, int]:
        return self.report.get("counts", {})


class Tool:
    def __init__(self, tmp_path: Path, entra: Any, defender: Any, misp: Any, ca_path: Path):
        self.tmp = tmp_path
        self.entra, self.defender, self.misp = entra, defender, misp
        self.ca_path = ca_path
        self.runs = 0
        self.defaults: dict[str, Any] = {
            "graph_auth": {"tenant": TEST_TENANT, "client_id": TEST_CLIENT_ID, "client_secret": TEST_CLIENT_SECRET,
                           "authority": entra.url},
            "defender_api_url": defender.url,
            "misp_domain": misp.url + "/",
            "misp_key": MISP_KEY,
            "misp_verifycert": False,
            "misp_event_filters": TEST_FILTERS,
            "days_to_expire_start": "current_date",
            "log_file": str(tmp_path / "misp2defender.log"),
            "log_json_file": str(tmp_path / "defender.jsonl"),
            "max_retries": 3,
            "request_timeout": 10,
        }

    def config(self, **overrides: Any) -> Path:
        self.runs += 1
        return write_config(self.tmp / f"config{self.runs}.py", {**self.defaults, **overrides})

    def argv(self, args: tuple[str, ...], overrides: dict[str, Any]) -> tuple[list[str], Path]:
        report = self.tmp / f"report{self.runs + 1}.json"
        return ["--config", str(self.config(**overrides)), "--report", str(report), *args], report

    def run(self, *args: str, **overrides: Any) -> RunResult:
        argv, report = self.argv(args, overrides)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = m2d.main(argv)
        return RunResult(code, out.getvalue(), err.getvalue(), _read_json(report))

    def spawn(self, *args: str, **overrides: Any) -> tuple[subprocess.Popen, Path]:
        """Start the script in a child process (the caller waits on it)."""
        argv, report = self.argv(args, overrides)
        child = subprocess.Popen([sys.executable, str(ROOT / "misp2defender.py"), *argv], cwd=self.tmp,
                                 env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return child, report

    # What Defender ends up holding, from the stand-in's own state.
    def run_in_terminal(self, *args: str, **overrides: Any) -> tuple[int, str]:
        """The script under a pseudo-terminal, as an admin runs it by hand: (exit code, what the terminal showed)."""
        leader, follower = pty.openpty()
        child = subprocess.Popen(
            [sys.executable, str(ROOT / "misp2defender.py"), "--config", str(self.config(**overrides)), *args],
            stdout=follower, stderr=subprocess.DEVNULL, cwd=self.tmp, env=dict(os.environ))
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closes when the child exits
                break
            if not chunk:
                break
            output += chunk
        os.close(leader)
        return child.wait(timeout=60), output.decode(errors="replace")

    def held(self, owned_only: bool = True) -> set[tuple[str, str, str]]:
        return {(i["indicatorType"], i["indicatorValue"], i["action"]) for i in self.defender.active()
                if not owned_only or i.get("createdBy") == TEST_CLIENT_ID}

    def owned_keys(self) -> set[tuple[str, str]]:
        """(type, value) of every active indicator this tool owns in the Defender stand-in."""
        return {(t, v) for t, v, _ in self.held()}

    def writes(self) -> list:
        """Every write call the Defender stand-in received."""
        return [c for c in self.defender.calls() if c.endpoint in WRITES]

    def written_files(self) -> list[Path]:
        return [p for p in self.tmp.rglob("*") if p.is_file()]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture
def tool(tmp_path: Path, ca_env: Path, entra: Any, defender: Any, misp: Any,
         monkeypatch: pytest.MonkeyPatch) -> Tool:
    """The tool wired to fresh stand-ins, with quota windows on the stand-in's time scale."""
    monkeypatch.setenv("MISP2DEFENDER_TIME_SCALE", str(DEFENDER_TIME_SCALE))
    monkeypatch.chdir(tmp_path)
    return Tool(tmp_path, entra, defender, misp, ca_env)
