"""Operations (issue 5): --check, --report, OTX exclusion, certificate credentials, device groups."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import Tool
from tests.standins.otx import OtxStandIn
from tests.util import OTX_KEY, SAMPLE_KEYS, TEST_CLIENT_ID, distinct_sha256_events, serving


def test_check_passes_on_a_healthy_setup_and_writes_nothing(tool: Tool) -> None:
    result = tool.run("--check")
    assert result.code == 0, result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("  ✓ MISP: ") and "accepts the API key" in line for line in lines)
    assert "  ✓ MISP: 5 events match misp_event_filters" in lines
    assert any(line.startswith("  ✓ Entra: token issued") and "Ti.ReadWrite.All" in line for line in lines)
    assert any(line.startswith("  ✓ Defender: ") for line in lines)
    assert "✗" not in result.stdout and tool.writes() == []
    assert [c.query.get("$top") for c in tool.defender.calls("list")] == ["1"]


@pytest.mark.parametrize("breakage, stage, fix_part", [
    ("bad MISP key", "MISP", "misp_key"),
    ("unreachable MISP", "MISP", "misp_domain"),
    ("bad secret", "Entra", "client_secret = the secret *value*"),
    ("missing permission", "Defender", "Ti.ReadWrite.All, then 'Grant admin consent'"),
])
def test_check_names_the_fix_for_each_broken_piece(tool: Tool, breakage: str, stage: str, fix_part: str) -> None:
    overrides: dict = {}
    if breakage == "bad MISP key":
        overrides["misp_key"] = "wrong"
    elif breakage == "unreachable MISP":
        overrides["misp_domain"] = "http://127.0.0.1:9/"
    elif breakage == "bad secret":
        overrides["graph_auth"] = {**tool.defaults["graph_auth"], "client_secret": "wrong"}
    else:
        tool.defender.forbid(TEST_CLIENT_ID)
    result = tool.run("--check", **overrides)
    assert result.code == 2
    failed = [line for line in result.stdout.splitlines() if line.startswith("  ✗")]
    assert failed and failed[0].startswith(f"  ✗ {stage}:")
    assert fix_part in result.stdout
    assert tool.writes() == []


def test_report_counts_match_what_defender_saw(tool: Tool) -> None:
    tool.defender.seed([{"indicatorType": "DomainName", "indicatorValue": "evil-domain.top", "action": "Audit",
                         "title": "x", "description": "x", "generateAlert": True}], created_by="someone-else")
    first = tool.run()
    assert first.code == 0
    tool.misp.remove_event("37018e28-4d6a-4ace-9e41-009656db4192")  # event 03
    result = tool.run("--full-sync")
    assert result.code == 0
    report = result.report
    imported = [item for c in tool.defender.calls("import") for item in c.body["Indicators"]]
    deleted = [i for c in tool.defender.calls("batch_delete") for i in c.body["IndicatorIds"]]
    assert first.counts["created"] + result.counts["created"] + result.counts["updated"] == len(imported)
    assert result.counts["deleted"] == len(deleted) == 7
    assert report["deleted_by_reason"] == {"not selected in MISP any more": 7}
    assert first.counts["kept"] == 1 and result.counts["kept"] == 28 + 1  # ours, plus the one held by another app
    calls = Counter(c.endpoint for c in tool.defender.calls())
    defender_calls = [run.report["api"][name]["calls"] for run in (first, result) for name in calls]
    assert sum(defender_calls) == sum(calls.values())
    # One token from Entra per run (the stand-in's log agrees), none from MSAL's cache counted.
    assert first.report["api"]["token"]["calls"] == result.report["api"]["token"]["calls"] == 1
    assert len(tool.entra.calls("token")) == 2
    assert report["exit_code"] == 0 and report["duration_seconds"] >= 0
    assert report["rejected_by_reason"]["CIDR ranges are not supported by Defender"] == 1
    assert {item["value"] for item in report["rejected_items"]} >= {"10.1.2.3", "45.133.1.0/24"}
    json.dumps(report)


def otx_config(otx: OtxStandIn, **extra: object) -> dict:
    return {"exclude_if_in_alienvault": True, "otx_alienvault_api": OTX_KEY, "otx_alienvault_url": otx.url, **extra}


def test_values_known_to_otx_are_not_pushed(tool: Tool, pki) -> None:
    known = {"185.225.17.88", "evil-domain.top", "d2f1da0889b90a130e36f0da535bd9b6fd299e2f9573e6a627a5c540997ab424",
             "http://cdn-update-check.top/wp-content/plugins/wpx-cache/loader.php"}
    with serving(OtxStandIn(pki, key=OTX_KEY, known=known)) as otx:
        result = tool.run(**otx_config(otx))
        assert result.code == 0, result.stderr
        held = {v for _, v, _ in tool.held()}
        assert held == {v for _, v in SAMPLE_KEYS} - known
        assert result.report["skipped_by_reason"]["known in AlienVault OTX"] == 4
        assert len(otx.calls("lookup")) == 36  # only what the plan would create is looked up
        again = tool.run(**otx_config(otx))
        assert len(otx.calls("lookup")) == 36 + 4 and again.counts["created"] == 0


@pytest.mark.parametrize("fault", [{"status": 500, "times": 1000}, {"delay": 3.0, "times": 1000}])
def test_a_failing_or_stalling_otx_does_not_stop_the_run(tool: Tool, pki, fault: dict) -> None:
    with serving(OtxStandIn(pki, key=OTX_KEY, known={"185.225.17.88"})) as otx:
        otx.inject("lookup", **fault)
        result = tool.run(**otx_config(otx), request_timeout=1)
        assert result.code == 0, result.stderr
        assert {(t, v) for t, v, _ in tool.held()} == SAMPLE_KEYS  # unknown answers mean: push
        assert result.report["otx_errors"] == 36


def test_500_otx_lookups_run_concurrently(tool: Tool, pki) -> None:
    """The speed itself is measured by the OTX benchmark; here, that lookups overlap."""
    for event in distinct_sha256_events(500 - 36):
        tool.misp.add_event(event)
    with serving(OtxStandIn(pki, key=OTX_KEY, latency=0.05)) as otx:
        result = tool.run(**otx_config(otx), otx_max_workers=16)
        assert result.code == 0 and len(otx.calls("lookup")) == 500
        arrivals = [c.t for c in otx.calls("lookup")]
        # One at a time, no two lookups could arrive within the 50 ms each one takes.
        most_in_flight = max(sum(1 for t in arrivals if start <= t < start + 0.05) for start in arrivals)
        assert most_in_flight >= 4


def test_certificate_credentials_get_a_token_and_sync(tool: Tool, client_certificate: tuple[Path, str]) -> None:
    pem, thumbprint = client_certificate
    tool.entra.register_certificate(TEST_CLIENT_ID, pem)
    graph_auth = {k: v for k, v in tool.defaults["graph_auth"].items() if k != "client_secret"}
    result = tool.run(graph_auth={**graph_auth, "client_certificate": str(pem),
                                  "client_certificate_thumbprint": thumbprint})
    assert result.code == 0, result.stderr
    [token_call] = tool.entra.calls("token")
    assert "client_assertion" in token_call.body and "client_secret" not in token_call.body
    assert {(t, v) for t, v, _ in tool.held()} == SAMPLE_KEYS


def test_device_groups_are_applied(tool: Tool) -> None:
    assert tool.run(defender_rbac_group_names=["Servers", "Finance laptops"]).code == 0
    items = [item for c in tool.defender.calls("import") for item in c.body["Indicators"]]
    assert len(items) == 36 and all(i["rbacGroupNames"] == ["Servers", "Finance laptops"] for i in items)
    assert all(i["rbacGroupNames"] == ["Servers", "Finance laptops"] for i in tool.defender.active())


@pytest.mark.parametrize("how", ["environment", "config"])
def test_every_call_goes_through_the_proxy(tool: Tool, monkeypatch, how: str) -> None:
    from tests.standins.proxy import ProxyStandIn

    monkeypatch.delenv("NO_PROXY")
    monkeypatch.delenv("no_proxy")
    with ProxyStandIn() as proxy:
        if how == "environment":
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            result = tool.run()
        else:
            result = tool.run(proxies={"https": proxy.url, "http": proxy.url})
        assert result.code == 0, result.stderr
        assert {(t, v) for t, v, _ in tool.held()} == SAMPLE_KEYS
    entra_host, defender_host = tool.entra.url.split("//")[1], tool.defender.url.split("//")[1]
    assert f"CONNECT {entra_host}" in proxy.targets and f"CONNECT {defender_host}" in proxy.targets
    assert f"POST {tool.misp.url}" in proxy.targets  # MISP over plain http: absolute-form requests


def test_no_proxy_is_honoured(tool: Tool, monkeypatch) -> None:
    from tests.standins.proxy import ProxyStandIn

    with ProxyStandIn() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)  # NO_PROXY=127.0.0.1 from the fixture still applies
        assert tool.run().code == 0
    assert proxy.targets == []


def test_check_tests_the_otx_key_when_otx_is_on(tool: Tool, pki) -> None:
    with serving(OtxStandIn(pki, key=OTX_KEY)) as otx:
        good = tool.run("--check", **otx_config(otx))
        assert good.code == 0 and "  ✓ OTX: the API key works" in good.stdout
        bad = tool.run("--check", **otx_config(otx, otx_alienvault_api="wrong-key"))
        assert bad.code == 2
        assert "  ✗ OTX: OTX rejected the API key (otx_alienvault_api)" in bad.stdout
        assert "fix: check otx_alienvault_api" in bad.stdout


def test_a_terminal_gets_a_summary_table(tool: Tool) -> None:
    code, text = tool.run_in_terminal()
    assert code == 0
    assert "  created        36\r\n" in text and "  rejected       15\r\n" in text
    assert "    rejected: 7 private or reserved" in text
    piped = tool.run()
    assert "  created  " not in piped.stdout  # cron's log gets the one summary line only
