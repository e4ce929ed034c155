"""A first hour without surprises (issue 14): --check in stages, counts that add up, the plan in the
report, progress on a terminal only, one clear error, the sandbox leaving its work, a licence."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import TEST_FILTERS, Tool
from tests.util import ROOT, TEST_CLIENT_ID, distinct_sha256_events

# --- 1. --check in stages ------------------------------------------------------------------------

def test_check_with_only_misp_configured_checks_misp_and_says_what_entra_needs(tool: Tool) -> None:
    result = tool.run("--check", graph_auth={})
    assert result.code == 2
    lines = result.stdout.splitlines()
    assert lines[1].startswith("  ✓ config:")
    assert any(line.startswith("  ✓ MISP:") and "answers" in line for line in lines)
    assert "  ✓ MISP: 5 events match misp_event_filters" in lines
    [entra] = [line for line in lines if line.startswith("  ✗ Entra:")]
    assert "graph_auth['tenant'], graph_auth['client_id'], graph_auth['client_secret']" in entra
    assert "fix: check graph_auth" in result.stdout
    assert tool.entra.calls() == [] and tool.defender.calls() == []


def test_check_fails_an_app_that_may_read_but_not_write_indicators(tool: Tool) -> None:
    tool.entra.set_roles(TEST_CLIENT_ID, ["Ti.Read.All"])
    result = tool.run("--check")
    assert result.code == 2
    [line] = [line for line in result.stdout.splitlines() if line.startswith("  ✗ Defender:")]
    assert "grants Ti.Read.All but neither of Ti.ReadWrite.All or Ti.ReadWrite" in line
    assert "Ti.ReadWrite.All, then 'Grant admin consent'" in result.stdout
    assert tool.defender.calls("list") == []  # told from the token's roles, before any call to Defender


def test_no_matching_event_is_a_warning_with_its_likely_causes(tool: Tool) -> None:
    result = tool.run("--check", misp_event_filters={**TEST_FILTERS, "tags": ["a-tag-nobody-uses"]})
    assert result.code == 0  # a warning, not a failure
    assert "  ⚠ MISP: no event matches misp_event_filters" in result.stdout
    assert "the tags filter" in result.stdout and "publish_timestamp" in result.stdout


def test_check_without_the_misp_and_otx_keys_still_checks_every_other_stage(tool: Tool) -> None:
    result = tool.run("--check", misp_key="", exclude_if_in_alienvault=True, otx_alienvault_api="")
    assert result.code == 2
    out = result.stdout
    assert "✓ config:" in out and "✗ MISP: config key misp_key is required" in out
    assert "✓ Entra:" in out and "✓ Defender:" in out  # the later stages ran
    assert "✗ OTX: config key otx_alienvault_api is required" in out
    assert tool.misp.calls() == []
    run = tool.run(misp_key="")
    assert run.code == 2 and "misp_key is required" in run.stderr  # a run still stops before any call


def test_check_warns_about_a_likely_typo_with_the_key_it_meant(tool: Tool) -> None:
    result = tool.run("--check", defender_actoin="Block")
    assert "⚠ config: config key defender_actoin is not a misp2defender setting (a typo? did you mean " \
           "defender_action?)" in result.stdout
    run = tool.run(defender_actoin="Block")
    assert "did you mean defender_action?" in run.stderr


@pytest.mark.parametrize("typo,meant", [("misp_kye", "misp_key"), ("graph_auth['tennant']", "tenant")])
def test_a_typo_that_leaves_a_required_key_missing_names_both(tool: Tool, typo: str, meant: str) -> None:
    if typo == "misp_kye":
        config = {"misp_key": "", "misp_kye": "k" * 40}
    else:
        auth = {k: v for k, v in tool.defaults["graph_auth"].items() if k != "tenant"}
        config = {"graph_auth": {**auth, "tennant": "directory-id"}}
    result = tool.run(**config)
    assert result.code == 2
    [error] = [line for line in result.stderr.splitlines() if line.startswith("misp2defender: error:")]
    assert "is required" in error and f"did you mean {meant}?" in error
    assert tool.misp.calls() == [] and tool.entra.calls() == []


# --- 2. and 3. Counts that add up, and the plan in the report --------------------------------------

def test_the_reports_plan_matches_the_printed_counts_and_what_defender_received(tool: Tool) -> None:
    tool.defender.seed([{"indicatorType": "DomainName", "indicatorValue": "gone.example-ours.top", "action": "Audit",
                         "title": "t", "description": "d", "generateAlert": True}],
                       created_by=tool.defaults["graph_auth"]["client_id"], application="MISP")
    result = tool.run("--full-sync", defender_max_indicators=30, remove_guard_percent=100)
    plan = result.report["plan"]
    assert plan["counts"] == {"create": 30, "update": 0, "delete": 1, "left_out": 6}  # the delete freed a slot
    imported = [(i["indicatorType"], i["indicatorValue"]) for c in tool.defender.calls("import")
                for i in c.body["Indicators"]]
    assert sorted(imported) == sorted((item["type"], item["value"]) for item in plan["create"])
    deleted = [i for c in tool.defender.calls("batch_delete") for i in c.body["IndicatorIds"]]
    assert [item["id"] for item in plan["delete"]] == deleted
    assert [item["priority"] for item in plan["left_out"]] == list(range(1, 7))
    log = (tool.tmp / "misp2defender.log").read_text()
    assert "Plan: 30 to create, 0 to update, 1 to delete, 0 kept, 6 left out" in log
    assert "! left out (tenant cap), best first (6):" in log
    counts = result.report["counts"]
    assert counts["candidates"] + counts["duplicates"] + counts["rejected"] + counts["skipped"] == counts["values"]


def test_the_report_keeps_the_counts_exact_when_it_lists_only_some(tool: Tool) -> None:
    result = tool.run("--dry-run", report_plan_limit=5)
    plan = result.report["plan"]
    assert plan["counts"]["create"] == 36 and len(plan["create"]) == 5 and plan["truncated"] is True


def test_a_long_left_out_list_is_the_real_next_in_line_and_says_how_much_it_holds(tool: Tool) -> None:
    for event in distinct_sha256_events(3000):
        tool.misp.add_event(event)
    wider = tool.run("--dry-run", defender_max_indicators=1200, report_plan_limit=5000)
    capped = tool.run("--dry-run", defender_max_indicators=200, report_plan_limit=5000)
    next_in_line = {i["value"] for i in wider.report["plan"]["create"]} - {
        i["value"] for i in capped.report["plan"]["create"]}
    listed = capped.report["plan"]["left_out"]
    assert len(next_in_line) == 1000 and len(listed) == 1000 < capped.report["plan"]["counts"]["left_out"]
    assert {i["value"] for i in listed} == next_in_line  # the best of those left out, not any 1,000
    assert [i["priority"] for i in listed] == list(range(1, 1001))
    assert "(use --report FILE for the first 1000)" in capped.stdout


# --- 4. Progress on a terminal, never in a pipe ---------------------------------------------------

def test_progress_shows_on_a_terminal_and_never_in_a_pipe(tool: Tool) -> None:
    code, shown = tool.run_in_terminal()
    assert code == 0
    assert "\r\x1b[KMISP: page 1 read" in shown and "Defender: listing the indicators it holds" in shown
    assert "Defender: 0 of 36 indicators written" in shown
    piped = tool.run()
    assert "\r" not in piped.stdout and "\x1b[K" not in piped.stdout and "\r" not in piped.stderr
    log = (tool.tmp / "misp2defender.log").read_text()
    assert "\x1b[K" not in log
    code, shown = tool.run_in_terminal("--dry-run")
    assert code == 0
    assert "\r\x1b[KPlan:" in shown.replace("\r\n", "\n")  # the progress line is cleared before the plan


def test_quiet_prints_only_errors_and_the_summary(tool: Tool) -> None:
    result = tool.run("-q", defender_actoin="Block")
    assert result.stderr == ""  # the typo warning is a warning: -q keeps it in the log only
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("misp2defender: 5 events")
    code, shown = tool.run_in_terminal("-q")
    assert code == 0 and "\x1b[K" not in shown


# --- 5. One clear error ------------------------------------------------------------------------------

def test_a_fatal_error_is_printed_once_with_the_fix_for_its_kind(tool: Tool) -> None:
    bad = tool.run(graph_auth={**tool.defaults["graph_auth"], "client_secret": "not-the-secret"})
    assert bad.code == 2
    assert bad.stderr.count("Entra rejected the client secret") == 1
    [error] = [line for line in bad.stderr.splitlines() if line.startswith("misp2defender: error:")]
    assert error.startswith("misp2defender: error: Entra rejected the client secret")
    assert "  fix: check graph_auth" in bad.stderr
    assert bad.stdout == ""  # no all-zero summary after a run that never started
    log = (tool.tmp / "misp2defender.log").read_text()
    assert "Entra rejected the client secret" in log and "misp2defender 1.0.0: incremental run with" in log
    assert "misp2defender finished in" in log


def test_a_rejected_misp_key_is_one_error_without_pymisps_own_lines(tool: Tool) -> None:
    bad = tool.run(misp_key="a-key-misp-does-not-know-0123456789")
    assert bad.code == 2
    assert bad.stderr.count("misp2defender: error: MISP rejected the API key") == 1
    assert " pymisp: " not in bad.stderr, bad.stderr  # PyMISP's own lines say it again, worse
    assert " pymisp: " in (tool.tmp / "misp2defender.log").read_text()  # kept in the log


def test_a_missing_config_and_a_syntax_error_get_their_own_fixes(tool: Tool) -> None:
    from tests.util import m2d

    missing = subprocess.run([sys.executable, str(ROOT / "misp2defender.py"), "--config", str(tool.tmp / "nope.py")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 2
    assert "fix: copy config.py.default to" in missing.stderr
    broken = tool.tmp / "broken.py"
    broken.write_text("misp_domain = 'https://misp.example/'\nmisp_key = 'abc\n")
    code = m2d.main(["--config", str(broken)])
    assert code == 2
    result = subprocess.run([sys.executable, str(ROOT / "misp2defender.py"), "--config", str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert "is not valid Python" in result.stderr and "fix: correct line 2 of" in result.stderr


@pytest.mark.parametrize("log_file", ["misp2defender.log", ""])
def test_files_land_beside_the_config_and_are_private(tool: Tool, tmp_path: Path, log_file: str) -> None:
    elsewhere = tmp_path / "cron-cwd"
    elsewhere.mkdir()
    config = tool.config(log_file=log_file, log_json_file="defender.jsonl", write_parsed_indicators=True)
    done = subprocess.run([sys.executable, str(ROOT / "misp2defender.py"), "--config", str(config)],
                          cwd=elsewhere, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert list(elsewhere.iterdir()) == []  # nothing in cron's working directory
    for name in (log_file, "defender.jsonl", "misp2defender_indicators.json", "misp2defender.lock"):
        if not name:
            continue
        path = config.parent / name
        assert path.is_file(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


# --- 6. and 7. The sandbox leaves its work; a licence ---------------------------------------------------

def test_the_sandbox_keeps_its_files_when_asked(tmp_path: Path) -> None:
    keep = tmp_path / "sandbox"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISP2DEFENDER_")}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "sandbox.py"), "--keep", str(keep)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("config.py", "misp2defender.log", "report.json", "misp2defender_indicators.json"):
        assert (keep / name).is_file(), name
    assert f"config:  {keep / 'config.py'}" in done.stdout


def test_the_sandbox_serves_its_stand_ins_for_the_printed_commands(tmp_path: Path) -> None:
    import shlex
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("MISP2DEFENDER_")}
    sandbox = subprocess.Popen([sys.executable, str(ROOT / "tests" / "sandbox.py"), "--serve", "--keep",
                                str(tmp_path / "sandbox")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert sandbox.stdout is not None
        printed: list[str] = []
        while not (printed and printed[-1].endswith("--dry-run") and any("stay up" in p for p in printed)):
            line = sandbox.stdout.readline()
            assert line, "the sandbox ended before printing its commands"
            printed.append(line.strip())
        [exports] = [line for line in printed if line.startswith("export ")]
        [check] = [line for line in printed if line.endswith("--check")]
        variables = dict(word.split("=", 1) for word in shlex.split(exports)[1:])
        done = subprocess.run(shlex.split(check), capture_output=True, text=True, env={**env, **variables},
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "All checks passed." in done.stdout
    finally:
        sandbox.send_signal(signal.SIGINT)
        assert sandbox.wait(timeout=30) == 0


def test_there_is_a_licence() -> None:
    licence = (ROOT / "LICENSE").read_text()
    assert "BSD 2-Clause" in licence or "Redistribution and use in source and binary forms" in licence
    assert "BSD 2-Clause" in (ROOT / "README.md").read_text()
