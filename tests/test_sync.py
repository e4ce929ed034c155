"""End to end: misp2defender.main() against the Entra, Defender and MISP stand-ins (issue 2)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from tests.harness import Tool
from tests.standins.misp import MispStandIn
from tests.util import SAMPLE_KEYS, SHARED_EVENTS_DIR, TEST_CLIENT_ID, distinct_sha256_events, serving


def test_sample_events_sync_and_refused_values_never_reach_defender(tool: Tool) -> None:
    result = tool.run()
    assert result.code == 0, result.stderr
    held = tool.owned_keys()
    assert held == SAMPLE_KEYS and result.counts["created"] == 36
    sent = [item["indicatorValue"] for call in tool.defender.calls("import") for item in call.body["Indicators"]]
    for refused in ("10.1.2.3", "127.0.0.1", "45.133.1.0/24", "192.168.14.7", "224.0.0.251", "::1", "",
                    "0bdc1ad4ed270a40b81c55f9c7e92d5", "969ae361c723d363db26c70f0b88142f4f46fc24"):
        assert refused not in sent
    assert result.counts["rejected"] == 15 and result.counts["failed"] == 0
    assert result.report["rejected_by_reason"]["CIDR ranges are not supported by Defender"] == 1
    # Strongest severity wins for the sha256 in two events (High in event 1201, Low in 1203).
    [sha] = [i for i in tool.defender.active() if i["indicatorValue"].startswith("d2f1da08")]
    assert (sha["severity"], sha["action"], sha["title"]) == (
        "High", "Block", "Emotet epoch 6 - C2 infrastructure and malspam loader (Nov 2026)")


def test_second_run_with_nothing_changed_writes_nothing_even_with_current_date(tool: Tool) -> None:
    assert tool.run().code == 0
    before = len(tool.writes())
    second = tool.run()
    assert second.code == 0 and len(tool.writes()) == before
    assert second.counts["kept"] == 36 and second.counts["updated"] == 0


@pytest.mark.parametrize("how", ["flag", "config"])
def test_dry_run_writes_nothing(tool: Tool, how: str) -> None:
    result = tool.run("--dry-run") if how == "flag" else tool.run(dry_run=True)
    assert result.code == 0
    assert tool.writes() == [] and tool.defender.calls("list")
    assert "+ create (36)" in result.stdout and "dry run" in result.stdout


def test_indicators_from_other_applications_are_neither_duplicated_nor_changed(tool: Tool) -> None:
    [same_action, other_action] = tool.defender.seed([
        {"indicatorType": "DomainName", "indicatorValue": "evil-domain.top", "action": "Audit", "title": "theirs",
         "description": "x", "severity": "Low", "generateAlert": True},
        {"indicatorType": "IpAddress", "indicatorValue": "185.225.17.88", "action": "Allowed", "title": "theirs",
         "description": "x"},
    ], created_by="another-app", application="Sentinel")
    before = {i: dict(tool.defender.indicators[i]) for i in (same_action, other_action)}
    assert tool.run().code == 0
    # The same-action one covers the value: no second indicator. The Allowed one is another
    # policy on the value (Allowed beats Block in Defender): it is left alone and not duplicated.
    assert tool.owned_keys() == SAMPLE_KEYS - {("DomainName", "evil-domain.top"), ("IpAddress", "185.225.17.88")}
    assert {i: tool.defender.indicators[i] for i in before} == before
    assert tool.run("--full-sync", force=True).code == 0  # not even a full sync touches them
    assert {i: tool.defender.indicators[i] for i in before} == before


def test_bad_config_exits_2_before_any_network_call_naming_the_key(tool: Tool) -> None:
    result = tool.run(defender_action="Deny")
    assert result.code == 2 and "defender_action" in result.stderr
    assert tool.misp.calls() == [] and tool.entra.calls() == [] and tool.defender.calls() == []


def test_wrong_misp_key_exits_2_naming_the_credential(tool: Tool) -> None:
    result = tool.run(misp_key="not-the-key")
    assert result.code == 2 and "misp_key" in result.stderr and "MISP rejected the API key" in result.stderr
    assert tool.writes() == []


def test_wrong_client_secret_exits_2_naming_the_credential(tool: Tool) -> None:
    graph_auth = {**tool.defaults["graph_auth"], "client_secret": "wrong"}
    result = tool.run(graph_auth=graph_auth)
    assert result.code == 2 and "client secret" in result.stderr and "AADSTS7000215" in result.stderr
    assert tool.defender.calls() == [] and tool.misp.calls("events") == []


def test_imports_never_exceed_500_items_or_quota_requests_per_minute(tool: Tool) -> None:
    for event in distinct_sha256_events(1300):
        tool.misp.add_event(event)
    result = tool.run(max_indicators_per_query=500, quota_requests=2)
    assert result.code == 0, result.stderr
    imports = tool.defender.calls("import", status=200)
    assert [len(c.body["Indicators"]) for c in imports] == [500, 500, 336]
    minute = 60 * tool.defender.time_scale
    times = [c.t for c in tool.defender.calls("import")]
    assert all(sum(1 for t in times if start <= t < start + minute) <= 2 for start in times)
    assert tool.defender.calls(status=429) == []


def test_real_misp_events_end_up_as_exactly_the_expected_indicators(tool: Tool, tmp_path: Path) -> None:
    feed = SHARED_EVENTS_DIR / "digitalside-feed"
    if not feed.is_dir():
        pytest.skip(f"{feed} is absent (real events live beside the repo, not in it)")
    real = MispStandIn.from_directory(feed, key=tool.misp.key)
    with serving(real) as misp:
        tool.defaults["misp_domain"] = misp.url + "/"
        result = tool.run(misp_event_filters={"published": True})
        assert result.code == 0, result.stderr
        # Written out by hand from two of the real events.
        by_key = {(i["indicatorType"], i["indicatorValue"]): i for i in tool.defender.owned_by(TEST_CLIENT_ID)}
        expected = {
            ("FileMd5", "00da4e95f955eaae3566d19135ceb8f2"),
            ("FileSha1", "f7cea25e5ed038fa566b23b288102451c1cab1ce"),
            ("FileSha256", "f516ee82660137a6d56f460e85a14f041eb56ffbf14c1d54d614fca5cfe5dcd0"),
            ("Url", "https://dc541.4sync.com/download/tNU3UTeE/lightshot_setup.msi?dsid=342jLuve.e2877eba77015a9ddb5f"
                    "65831cef3eb6&sbsr=f4abe47fe61ec84e030c93bee755fcebad2&bip=MTkyLjE1OC4yMjYuMTY&lgfp=40"),
            ("DomainName", "dc541.4sync.com"),
            ("FileMd5", "412e5730c32274b24f950f242a38aef4"),
            ("FileSha1", "74b1bbdb6175d7c23c34577ec96b7f1dc1895f05"),
            ("FileSha256", "8a325b54b6cc9773d03239d84af22f31df3340d9722354844182c020bfb1a775"),
            ("Url", "http://185.225.74.131/bins/sora.arm6"),
            ("IpAddress", "185.225.74.131"),
        }
        assert expected <= set(by_key)
        for key in expected:
            item = by_key[key]
            assert (item["action"], item["severity"], item["application"], item["generateAlert"]) == (
                "Audit", "Medium", "MISP", True)
            # tlp:white events: days_to_expire_tlpclear (7) from the run's date.
            expires = dt.datetime.fromisoformat(item["expirationTime"].replace("Z", "+00:00"))
            assert dt.timedelta(days=6, hours=23) < expires - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(days=7)
        assert by_key[("FileMd5", "412e5730c32274b24f950f242a38aef4")]["title"] == (
            "DigitalSide Malware report: MD5: 412e5730c32274b24f950f242a38aef4")
        # The whole feed: every to_ids md5/sha1/sha256/url/ip-dst/domain value, counted independently.
        wanted = set()
        kinds = {"md5": "FileMd5", "sha1": "FileSha1", "sha256": "FileSha256", "url": "Url", "ip-dst": "IpAddress",
                 "domain": "DomainName"}
        for path in feed.glob("*.json"):
            event = json.loads(path.read_text())["Event"]
            attributes = event.get("Attribute", []) + [a for o in event.get("Object", []) for a in o["Attribute"]]
            for a in attributes:
                if a["to_ids"] and a["type"] in kinds:
                    value = a["value"] if a["type"] == "url" else a["value"].lower()
                    wanted.add((kinds[a["type"]], value))
        assert set(by_key) == wanted
        assert result.counts["failed"] == 0


def test_all_real_events_are_accepted_by_defender(tool: Tool) -> None:
    if not SHARED_EVENTS_DIR.is_dir():
        pytest.skip(f"{SHARED_EVENTS_DIR} is absent")
    real = MispStandIn.from_directory(SHARED_EVENTS_DIR, key=tool.misp.key)
    with serving(real) as misp:
        tool.defaults["misp_domain"] = misp.url + "/"
        result = tool.run(misp_event_filters={}, defender_action="Block")
        assert result.code == 0, result.stderr
        assert result.counts["failed"] == 0 and result.counts["created"] > 500
        assert len(tool.held()) == result.counts["created"]


def test_large_reads_are_shared_with_a_helper_process_and_give_the_same_result(tool: Tool) -> None:
    single = tool.run("--dry-run")
    assert tool.misp.calls("me") and len(tool.misp.calls("me")) == 1
    shared = tool.run(misp_event_limit_per_page=1)  # five full pages: a helper reader starts
    assert shared.code == 0, shared.stderr
    assert len(tool.misp.calls("me")) == 3  # one more connection for this run's helper
    assert tool.owned_keys() == SAMPLE_KEYS
    for count in ("events", "attributes", "candidates", "duplicates", "rejected"):
        assert shared.counts[count] == single.counts[count], count
    assert shared.report["rejected_by_reason"] == single.report["rejected_by_reason"]


def test_a_forked_helper_reader_in_a_plain_process_gives_the_same_result(tool: Tool) -> None:
    child, report = tool.spawn(misp_event_limit_per_page=2)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert tool.owned_keys() == SAMPLE_KEYS
    assert json.loads(report.read_text())["counts"]["duplicates"] == 5
    assert len(tool.misp.calls("me")) == 2


def test_api_calls_are_the_minimum_for_a_fixed_scenario(tool: Tool) -> None:
    for event in distinct_sha256_events(1234 - 36):
        tool.misp.add_event(event)
    first = tool.run(max_indicators_per_query=500, quota_requests=30)
    assert first.code == 0 and first.counts["created"] == 1234
    assert len(tool.defender.calls("import")) == 3  # ceil(1234 / 500)
    assert len(tool.defender.calls("list")) == 1  # one page holds everything
    before = len(tool.writes())
    idle = tool.run(max_indicators_per_query=500)
    assert idle.code == 0 and len(tool.writes()) == before  # nothing changed: no write at all
    assert len(tool.defender.calls("list")) == 2


def test_outputs_user_agent_event_log_parsed_indicators_and_summary(tool: Tool) -> None:
    agent = "Mozilla/5.0 (X11; Linux x86_64) misp2defender-test"
    result = tool.run(custom_user_agent=agent, write_parsed_eventid=True, write_parsed_indicators=True)
    assert result.code == 0
    microsoft = tool.entra.calls() + tool.defender.calls()
    assert microsoft and {c.headers.get("user-agent") for c in microsoft} == {agent}
    log_text = (tool.tmp / "misp2defender.log").read_text()
    assert "MISP event 1201: Emotet epoch 6" in log_text and "MISP event 1205:" in log_text
    parsed = json.loads((tool.tmp / "misp2defender_indicators.json").read_text())
    imported = [item for c in tool.defender.calls("import") for item in c.body["Indicators"]]
    assert parsed == imported and len(parsed) == 36
    [summary] = [line for line in result.stdout.splitlines() if line.startswith("misp2defender: ")]
    # The counts add up: 80 attributes, one of them a domain|ip (two values): 81 values.
    assert "5 events, 80 attributes (81 values: 36 candidates, 5 duplicates, rejected 15 [" in summary
    assert "7 private or reserved IP address (Defender takes external IPs only)" in summary
    assert "], skipped 25 [5 type text has no Defender indicator type, 3 to_ids turned off, " in summary
    skipped = result.report["skipped_by_reason"]
    assert sum(skipped.values()) == 25 and skipped["to_ids turned off"] == 3
    counts = result.report["counts"]
    assert counts["candidates"] + counts["duplicates"] + counts["rejected"] + counts["skipped"] == counts["values"]
    assert summary.endswith("created 36, updated 0, deleted 0, kept 0, left out 0, failed 0, API calls 2, exit 0")
    quiet = tool.run(write_parsed_eventid=False)
    assert quiet.code == 0
    assert (tool.tmp / "misp2defender.log").read_text().count("MISP event 1201:") == 1
