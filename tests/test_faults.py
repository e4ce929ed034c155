"""Resilience (issue 4): every run ends with the full expected set, whatever the APIs throw at it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness import Tool
from tests.standins.defender import DefenderStandIn
from tests.standins.misp import MispStandIn
from tests.util import MISP_KEY, OTX_KEY, SAMPLE_KEYS, TEST_CLIENT_SECRET, distinct_sha256_events, serving


def test_import_429_three_times_honours_retry_after_and_lands_everything(tool: Tool) -> None:
    tool.defender.inject("import", status=429, retry_after=1, times=3)
    result = tool.run()
    assert result.code == 0, result.stderr
    assert tool.owned_keys() == SAMPLE_KEYS
    assert len(tool.defender.calls("import", status=429)) == 3
    assert tool.defender.early_retries == []
    attempts = [c.t for c in tool.defender.calls("import")]
    assert all(later - earlier >= 0.95 for earlier, later in zip(attempts, attempts[1:], strict=False))
    assert result.report["api"]["import"]["throttled"] == 3


def test_5xx_on_import_and_listing_are_retried(tool: Tool) -> None:
    tool.defender.inject("import", status=503, times=2)
    tool.defender.inject("list", status=500, times=1)
    result = tool.run()
    assert result.code == 0, result.stderr
    assert tool.owned_keys() == SAMPLE_KEYS
    assert result.report["api"]["import"]["retries"] == 2 and result.report["api"]["list"]["retries"] == 1


def test_dropped_connections_are_retried_without_duplicates(tool: Tool) -> None:
    tool.defender.inject("import", drop=True, times=1)
    result = tool.run(max_indicators_per_query=10)
    assert result.code == 0, result.stderr
    assert tool.owned_keys() == SAMPLE_KEYS
    assert len(tool.defender.owned_by(tool.defaults["graph_auth"]["client_id"])) == 36


def test_errors_that_outlast_the_retries_are_reported_and_the_next_run_finishes(tool: Tool) -> None:
    tool.defender.inject("import", status=503, times=4)  # two attempts in the first run, two in the next
    failed = tool.run(max_retries=1)
    assert failed.code == 1 and failed.counts["failed"] == 36 and tool.owned_keys() == set()
    assert "Defender import failed after 2 attempts" in failed.stderr
    again = tool.run(max_retries=3)
    assert again.code == 0 and tool.owned_keys() == SAMPLE_KEYS


def test_tokens_expiring_mid_run_are_renewed(tool: Tool) -> None:
    tool.defender.after("import", 1, tool.entra.expire_all_tokens)
    result = tool.run(max_indicators_per_query=10)
    assert result.code == 0, result.stderr
    assert tool.owned_keys() == SAMPLE_KEYS
    assert len(tool.defender.calls("import", status=401)) == 1
    assert tool.entra.issued == 2


def test_real_quotas_and_2000_new_indicators_meet_no_429(tool: Tool, pki, entra, monkeypatch) -> None:
    monkeypatch.setenv("MISP2DEFENDER_TIME_SCALE", "1")
    with serving(DefenderStandIn(pki, entra, time_scale=1.0)) as real_quota:
        tool.defaults["defender_api_url"] = real_quota.url
        for event in distinct_sha256_events(2000):
            tool.misp.add_event(event)
        result = tool.run(max_indicators_per_query=500, quota_requests=30)
        assert result.code == 0, result.stderr
        assert real_quota.calls(status=429) == []
        assert len(real_quota.active()) == 2036


def test_sigkill_mid_run_then_a_normal_run_converges(tool: Tool) -> None:
    child, _ = tool.spawn(max_indicators_per_query=10)
    tool.defender.after("import", 1, lambda: os.kill(child.pid, signal.SIGKILL))
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert 0 < len(tool.owned_keys()) < 36
    assert tool.run().code == 0
    assert tool.owned_keys() == SAMPLE_KEYS and len(tool.held()) == 36


def test_sigkill_during_an_action_change_leaves_no_duplicates_after_the_next_run(tool: Tool) -> None:
    assert tool.run(defender_action="Audit").code == 0
    child, _ = tool.spawn(defender_action="Block", max_indicators_per_query=5)
    tool.defender.after("import", 2, lambda: os.kill(child.pid, signal.SIGKILL))
    child.wait(timeout=60)
    result = tool.run(defender_action="Block")
    assert result.code == 0, result.stderr
    held = tool.held()
    assert len({(t, v) for t, v, _ in held}) == len(held)


def test_two_runs_started_together_one_works_the_other_exits_2_at_once(tool: Tool) -> None:
    tool.defender.inject("list", delay=2.0)  # keep the first run busy while the second starts
    first, _ = tool.spawn()
    time.sleep(0.8)
    writes_before = len(tool.writes())
    second, _ = tool.spawn()
    out, err = second.communicate(timeout=30)
    assert second.returncode == 2 and first.poll() is None  # it did not wait for the first run
    assert f"pid {first.pid}" in err
    assert "fix: nothing, if that run is still working" in err + out and "edit the named key" not in err + out
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert writes_before == 0 and len(tool.defender.calls("import")) == 1  # all from the first run


def test_a_lock_file_left_by_a_dead_process_does_not_block(tool: Tool) -> None:
    (tool.tmp / "misp2defender.lock").write_text("424242\n")
    assert tool.run().code == 0


def test_no_secret_or_token_is_written_anywhere(tool: Tool, otx, capfd) -> None:
    tool.defender.after("import", 1, tool.entra.expire_all_tokens)  # exercise the 401 path too
    result = tool.run("-vv", verbose_log=True, write_parsed_indicators=True, max_indicators_per_query=10,
                      exclude_if_in_alienvault=True, otx_alienvault_api=OTX_KEY, otx_alienvault_url=otx.url)
    assert result.code == 0, result.stderr
    dry = tool.run("--dry-run", "-vv")
    bad = tool.run(graph_auth={**tool.defaults["graph_auth"], "client_secret": TEST_CLIENT_SECRET + "x"})
    assert bad.code == 2
    tokens = {c.headers["authorization"].split()[1] for c in tool.defender.calls() if "authorization" in c.headers}
    assert len(tokens) >= 2
    secrets = {TEST_CLIENT_SECRET, MISP_KEY, OTX_KEY, *tokens}
    outputs = {"stdout/stderr": result.stdout + result.stderr + dry.stdout + dry.stderr + bad.stdout + bad.stderr}
    for path in tool.written_files():
        if not path.name.startswith("config"):  # the config the user wrote holds them by design
            outputs[path.name] = path.read_text(errors="replace")
    assert {"misp2defender.log", "defender.jsonl", "misp2defender_indicators.json"} <= set(outputs)
    for name, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {name}"


def test_secrets_from_the_environment_and_a_warning_for_a_readable_config(tool: Tool, monkeypatch) -> None:
    monkeypatch.setenv("MISP2DEFENDER_CLIENT_SECRET", TEST_CLIENT_SECRET)
    monkeypatch.setenv("MISP2DEFENDER_MISP_KEY", MISP_KEY)
    graph_auth = {k: v for k, v in tool.defaults["graph_auth"].items() if k != "client_secret"}
    result = tool.run(graph_auth=graph_auth, misp_key="")
    assert result.code == 0 and tool.owned_keys() == SAMPLE_KEYS
    assert "readable by other users" not in result.stderr  # no secret in this config
    warned = tool.run()  # the harness writes configs with the usual umask: readable by all
    assert "readable by other users" in warned.stderr and "chmod 600" in warned.stderr
    only_sightings_key = tool.run("--check", graph_auth=graph_auth, misp_key="", sightings_misp_key="s3cr3t-key")
    assert "⚠ config:" in only_sightings_key.stdout and "readable by other users" in only_sightings_key.stdout


def test_microsoft_certificates_are_always_verified(tool: Tool, monkeypatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")  # the test CA is no longer trusted
    result = tool.run()
    assert result.code == 2
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr or "SSLError" in result.stderr
    assert tool.defender.calls() == []


def test_misp_verifycert_false_warns_once_per_run(tool: Tool, pki) -> None:
    events = MispStandIn.from_directory(Path(__file__).parent / "data", recursive=False, key=MISP_KEY, pki=pki)
    with serving(events) as https_misp:
        tool.defaults["misp_domain"] = https_misp.url + "/"
        result = tool.run(misp_verifycert=False, misp_event_limit_per_page=1)
        assert result.code == 0, result.stderr
        assert result.stderr.count("not verified") == 1
        assert "InsecureRequestWarning" not in result.stderr
        trusted = tool.run(misp_verifycert=str(pki.ca_path))
        assert trusted.code == 0 and "not verified" not in trusted.stderr


@pytest.mark.parametrize("fault", [{"status": 500, "times": 2}, {"drop": True, "times": 2}])
def test_misp_page_errors_are_retried(tool: Tool, fault: dict) -> None:
    tool.misp.inject("events", **fault)
    result = tool.run(misp_event_limit_per_page=2)
    assert result.code == 0, result.stderr
    assert tool.owned_keys() == SAMPLE_KEYS


def test_a_run_that_fails_after_its_helper_reader_started_leaves_no_process_behind(tool: Tool) -> None:
    import multiprocessing

    tool.defender.forbid(tool.defaults["graph_auth"]["client_id"])  # the listing fails with 403
    result = tool.run(misp_event_limit_per_page=1)  # page 1 is full: the helper starts first
    assert result.code == 2 and "Ti.ReadWrite.All" in result.stderr
    assert len(tool.misp.calls("me")) == 2  # the helper had connected
    assert multiprocessing.active_children() == []
