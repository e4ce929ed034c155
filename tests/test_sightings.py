"""Close the loop (issue 12): Defender alerts on owned values become MISP sightings; --event pushes one event.

The Defender stand-in serves the Alerts API (Alert.Read.All, $filter on lastUpdateTime, $expand=evidence);
the MISP stand-in keeps sightings as MISP does (one row per matching attribute, no de-duplication).
"""

from __future__ import annotations

import os
import signal

import pytest
import requests

from tests.harness import TEST_FILTERS, Tool
from tests.util import MISP_KEY, SAMPLE_KEYS, TEST_CLIENT_ID

SOURCE = "Microsoft Defender for Endpoint"
FIRST_EVENT = "2026-12-01T08:30:15.1234567Z"
FIRST_EVENT_EPOCH = 1796113815  # by hand: 2026-12-01 08:30:15 UTC
# Five owned values, written as an alert's evidence may carry them, and what they are in Defender.
OWNED_HITS = {
    ("url", "https://evil-domain.top/login?next=/"): ("DomainName", "evil-domain.top"),  # host = owned domain
    ("ipAddress", "2a01:04f8:0c17:02b1:0000:0000:0000:0003"): ("IpAddress", "2a01:4f8:c17:2b1:0:0:0:3"),
    ("sha256", "D2F1DA0889B90A130E36F0DA535BD9B6FD299E2F9573E6A627A5C540997AB424"):
        ("FileSha256", "d2f1da0889b90a130e36f0da535bd9b6fd299e2f9573e6a627a5c540997ab424"),
    ("ipAddress", "185.225.17.88"): ("IpAddress", "185.225.17.88"),
    ("sha1", "bbf3f14daad62c6cbba660465fdbc6f11d75d5a8"): ("FileSha1", "bbf3f14daad62c6cbba660465fdbc6f11d75d5a8"),
}
UNRELATED = [("ipAddress", "8.8.4.4"), ("sha256", "a" * 64), ("url", "https://unrelated.example/x")]


@pytest.fixture
def sightings_on(tool: Tool) -> dict:
    """Sightings enabled: the app may read alerts, the MISP key may add sightings."""
    tool.entra.set_roles(TEST_CLIENT_ID, ("Ti.ReadWrite.All", "Alert.Read.All"))
    tool.misp.sighting_keys.add(MISP_KEY)
    return {"misp_sightings": True}


def alert_with(tool: Tool, hits: list[tuple[str, str]], **fields) -> dict:
    evidence = [tool.defender.evidence(entityType="Url" if name == "url" else "Ip" if name == "ipAddress" else "File",
                                       **{name: value}) for name, value in hits]
    return tool.defender.add_alert(evidence=evidence, firstEventTime=FIRST_EVENT, **fields)


def sighting_rows(tool: Tool) -> list[dict]:
    """Every sighting MISP holds, with the value of its attribute (as sightings/restSearch gives them)."""
    answer = requests.post(f"{tool.misp.url}/sightings/restSearch", json={"last": 0}, timeout=10,
                           headers={"Authorization": MISP_KEY, "Accept": "application/json"}).json()
    return [item["Sighting"] for item in answer["response"]]


def sightings_by_source(tool: Tool) -> dict[tuple[str, str], set[str]]:
    """(source, type) → the values MISP holds sightings on (a value in two attributes is one value here)."""
    found: dict[tuple[str, str], set[str]] = {}
    for row in sighting_rows(tool):
        found.setdefault((row["source"], row["type"]), set()).add(row["value"].lower())
    return found


def test_alerts_on_owned_values_become_sightings_exactly_once(tool: Tool, sightings_on: dict) -> None:
    assert tool.run(**sightings_on).code == 0  # the indicators land; no alert yet
    alert = alert_with(tool, [*OWNED_HITS, *UNRELATED])
    result = tool.run(**sightings_on)
    assert result.code == 0, result.stderr
    counts = result.report["sightings"]
    assert (counts["alerts_read"], counts["matched"], counts["added"], counts["failed"]) == (1, 5, 5, 0)
    assert {row["source"] for row in tool.misp.sightings} == {f"{SOURCE} alert {alert['id']}"}
    assert {row["type"] for row in tool.misp.sightings} == {"0"}
    assert {row["date_sighting"] for row in tool.misp.sightings} == {str(FIRST_EVENT_EPOCH)}
    # MISP gives each matching attribute a row, and an ip-dst|port attribute holds "ip|port".
    sighted = {part for row in sighting_rows(tool) for part in row["value"].lower().split("|")}
    assert sighted - {"443", "8080"} == {"evil-domain.top", "2a01:4f8:c17:2b1::3", "185.225.17.88",
                                         "d2f1da0889b90a130e36f0da535bd9b6fd299e2f9573e6a627a5c540997ab424",
                                         "bbf3f14daad62c6cbba660465fdbc6f11d75d5a8"}
    rows = len(tool.misp.sightings)
    again = tool.run(**sightings_on)
    assert again.code == 0 and again.report["sightings"]["added"] == 0
    assert len(tool.misp.sightings) == rows
    assert "sightings 0 added" in again.stdout


def test_an_alert_reclassified_false_positive_adds_one_false_positive_sighting(tool: Tool,
                                                                              sightings_on: dict) -> None:
    assert tool.run(**sightings_on).code == 0
    alert = alert_with(tool, [("ipAddress", "185.225.17.88")])
    assert tool.run(**sightings_on).report["sightings"]["added"] == 1
    tool.defender.update_alert(alert["id"], classification="FalsePositive", determination="Clean")
    result = tool.run(**sightings_on)
    assert result.report["sightings"]["false_positive"] == 1
    assert set(sightings_by_source(tool)) == {(f"{SOURCE} alert {alert['id']}", "0"),
                                              (f"{SOURCE} alert {alert['id']}", "1")}
    again = tool.run(**sightings_on)
    assert again.report["sightings"]["added"] == 0
    assert sum(1 for row in tool.misp.sightings if row["type"] == "1") == 1


def test_a_run_killed_before_saving_its_state_adds_nothing_twice(tool: Tool, sightings_on: dict) -> None:
    assert tool.run(**sightings_on).code == 0
    alert_with(tool, list(OWNED_HITS))
    child, _ = tool.spawn("--sightings-only", **sightings_on)
    tool.misp.after("sightings_add", 3, lambda: os.kill(child.pid, signal.SIGKILL))
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not (tool.tmp / "misp2defender_sightings.json").exists()  # killed before the state was saved
    partial = {(row["source"], row["value"].lower()) for row in sighting_rows(tool)}
    assert 3 <= len({v for _, v in partial}) < 5
    result = tool.run("--sightings-only", **sightings_on)
    assert result.code == 0, result.stderr
    assert result.report["sightings"]["already_present"] >= 3 and result.report["sightings"]["added"] <= 2
    values = [row["value"].lower() for row in sighting_rows(tool)]
    assert len({v for v in values}) == 5
    assert tool.defender.calls("import") and len(tool.defender.calls("import")) == 1  # no sync in those runs


@pytest.mark.parametrize("status,fix", [(500, "alerts"), (403, "Alert.Read.All")])
def test_an_alerts_api_failure_never_undoes_the_sync(tool: Tool, sightings_on: dict, status: int, fix: str) -> None:
    tool.defender.inject("alerts", status=status, times=100)
    result = tool.run(**sightings_on, max_retries=1)
    assert result.code == 1
    assert {(t, v) for t, v, _ in tool.held()} == SAMPLE_KEYS  # the sync landed as usual
    assert fix in result.report["sightings_error"] and fix in result.stdout


def test_misp_refusing_sightings_never_undoes_the_sync(tool: Tool, sightings_on: dict) -> None:
    tool.misp.sighting_keys.discard(MISP_KEY)  # the key's role may not add sightings: MISP answers 403
    assert tool.run(**sightings_on).code == 0  # no alert yet: nothing to add, nothing refused
    alert_with(tool, [("ipAddress", "185.225.17.88")])
    result = tool.run(**sightings_on)
    assert result.code == 1
    assert {(t, v) for t, v, _ in tool.held()} == SAMPLE_KEYS
    assert "perm_sighting" in result.report["sightings_error"] and "sightings_misp_key" in result.stdout
    check = tool.run("--check", **sightings_on)
    assert "may not add sightings" in check.stdout


def test_dry_run_lists_the_sightings_it_would_add(tool: Tool, sightings_on: dict) -> None:
    assert tool.run(**sightings_on).code == 0
    alert = alert_with(tool, [("ipAddress", "185.225.17.88")])
    result = tool.run("--dry-run", **sightings_on)
    assert result.code == 0
    assert f"+ sighting IpAddress 185.225.17.88 at 2026-12-01T08:30:15Z — {SOURCE} alert {alert['id']}" in result.stdout
    assert "Sightings: 1 to add" in result.stdout and tool.misp.sightings == []


def test_hostile_alerts_never_crash_and_every_skipped_item_is_counted(tool: Tool, sightings_on: dict) -> None:
    assert tool.run(**sightings_on).code == 0
    odd = ["not an object", None, 42, {"sha1": 12345}, {"ipAddress": None}, {"url": ["x"]},
           {"domainName": "CONTOSO", "entityType": "User"}, {"sha256": "zz"}, {"url": "[evil"},
           {"url": "http://[not-an-ip]/x"}]
    tool.defender.add_alert(evidence=odd, firstEventTime=FIRST_EVENT)
    tool.defender.add_alert(evidence=None, firstEventTime=None)
    tool.defender.add_alert(evidence=[{"ipAddress": "185.225.17.88"}] * 5000, firstEventTime=FIRST_EVENT)
    result = tool.run(**sightings_on)
    assert result.code == 0, result.stderr
    counts = result.report["sightings"]
    assert counts["alerts_read"] == 3 and counts["added"] == 1
    assert counts["evidence_skipped"] == len(odd)


def test_check_tests_the_alerts_permission_and_names_the_right_one(tool: Tool, sightings_on: dict) -> None:
    granted = tool.run("--check", **sightings_on)
    assert "✓ Defender: this app may read alerts (Alert.Read.All)" in granted.stdout, granted.stdout
    tool.entra.set_roles(TEST_CLIENT_ID, ("Ti.ReadWrite.All",))
    refused = tool.run("--check", **sightings_on)
    assert refused.code == 2
    lines = refused.stdout.splitlines()
    [at] = [n for n, line in enumerate(lines) if "✗ Defender" in line and "alerts" in line]
    assert "Alert.Read.All" in lines[at + 1] and "Ti.ReadWrite.All" not in lines[at + 1]  # the fix line


def test_a_network_destination_written_as_a_bare_host_hits_its_owned_domain(tool: Tool, sightings_on: dict) -> None:
    assert tool.run(**sightings_on).code == 0
    alert_with(tool, [("url", "www.evil-domain.top:443")])  # no scheme: how Defender often writes it
    result = tool.run(**sightings_on)
    assert result.report["sightings"]["added"] == 1
    assert sightings_by_source(tool) and all(v == {"evil-domain.top"} for v in sightings_by_source(tool).values())


@pytest.mark.parametrize("source", ["  Defender, with spaces around  ", "D" * 250])
def test_a_source_misp_would_trim_or_cut_still_adds_each_sighting_once(tool: Tool, sightings_on: dict,
                                                                       source: str) -> None:
    assert tool.run(**sightings_on).code == 0
    alert_with(tool, [("ipAddress", "185.225.17.88")])
    assert tool.run(sightings_source=source, **sightings_on).report["sightings"]["added"] == 1
    again = tool.run(sightings_source=source, **sightings_on)
    assert again.report["sightings"]["added"] == 0 and len(tool.misp.sightings) == 1


def test_an_alert_updated_in_the_future_never_stops_later_sightings(tool: Tool, sightings_on: dict) -> None:
    assert tool.run(**sightings_on).code == 0
    alert_with(tool, [("sha1", "bbf3f14daad62c6cbba660465fdbc6f11d75d5a8")], lastUpdateTime="2099-01-01T00:00:00Z")
    assert tool.run(**sightings_on).report["sightings"]["added"] == 1
    alert_with(tool, [("ipAddress", "185.225.17.88")])  # a real alert, updated now
    assert tool.run(**sightings_on).report["sightings"]["added"] == 1


def test_an_alert_in_one_tenant_never_sights_a_value_only_another_holds(tool: Tool, sightings_on: dict,
                                                                         pki) -> None:
    from tests.standins.defender import DefenderStandIn
    from tests.standins.entra import EntraStandIn
    from tests.util import DEFENDER_TIME_SCALE, TEST_CLIENT_SECRET, serving

    with serving(EntraStandIn(pki, tenant="20000000-1111-4222-8333-444444444444",
                              clients={TEST_CLIENT_ID: TEST_CLIENT_SECRET})) as entra_b, \
            serving(DefenderStandIn(pki, entra_b, time_scale=DEFENDER_TIME_SCALE)) as defender_b:
        entra_b.set_roles(TEST_CLIENT_ID, ("Ti.ReadWrite.All", "Alert.Read.All"))
        tenants = [{"name": "a", "graph_auth": {"tenant": tool.entra.tenant, "authority": tool.entra.url},
                    "defender_api_url": tool.defender.url},
                   {"name": "b", "graph_auth": {"tenant": entra_b.tenant, "authority": entra_b.url},
                    "defender_api_url": defender_b.url, "include_tags": ['misp-galaxy:tool="Cobalt Strike"']}]
        assert tool.run(tenants=tenants, **sightings_on).code == 0
        # 185.225.17.88 is in event 01 only: tenant a holds it, tenant b (event 05 only) does not.
        defender_b.add_alert(evidence=[defender_b.evidence(entityType="Ip", ipAddress="185.225.17.88"),
                                       defender_b.evidence(entityType="Ip", ipAddress="179.43.187.30")],
                             firstEventTime=FIRST_EVENT)
        result = tool.run(tenants=tenants, **sightings_on)
        assert result.code == 0, result.stderr
        assert {(row["source"].split(" alert ")[0], row["value"].split("|")[0]) for row in sighting_rows(tool)} == {
            (f"{SOURCE} (b)", "179.43.187.30")}


# --- Push one event now -----------------------------------------------------------------------------

EVENT_05 = "15afa931-ee80-4ed3-a33a-362d2912554e"
EVENT_05_KEYS = {("IpAddress", "179.43.187.30"), ("DomainName", "cs-teamserver.cloud-sync-status.top"),
                 ("IpAddress", "2a0b:f4c2:2:0:0:0:0:1"), ("Url", "https://cloud-sync-status.top/jquery-3.3.1.min.js"),
                 ("IpAddress", "91.215.85.147")}


def test_one_event_outside_the_time_window_lands_now_and_nothing_is_deleted(tool: Tool) -> None:
    window = {**TEST_FILTERS, "publish_timestamp": "1h"}  # the sample events are older than that
    assert tool.run(misp_event_filters=window).counts["created"] == 0
    tool.defender.seed([{"indicatorType": "DomainName", "indicatorValue": "stale.example-ours.top",
                         "action": "Audit", "title": "t", "description": "d", "generateAlert": True}],
                       created_by=TEST_CLIENT_ID, application="MISP")  # a full sync would delete this
    result = tool.run("--event", EVENT_05, misp_event_filters=window)
    assert result.code == 0, result.stderr
    assert {(t, v) for t, v, _ in tool.held()} == EVENT_05_KEYS | {("DomainName", "stale.example-ours.top")}
    assert tool.defender.calls("batch_delete") == [] and result.counts["deleted"] == 0
    assert "Plan: 5 to create, 0 to update, 0 to delete" in (tool.tmp / "misp2defender.log").read_text()
    [read] = [c.body for c in tool.misp.calls("events") if c.body.get("eventid")]
    assert read["eventid"] == [EVENT_05] and "publish_timestamp" not in read and read["published"] is True


def test_an_unknown_event_is_not_found_and_nothing_is_written(tool: Tool) -> None:
    result = tool.run("--event", "00000000-0000-4000-8000-00000000dead")
    assert result.code == 1
    assert "event not found" in result.report["misp_error"] and "event not found" in result.stderr
    assert tool.defender.calls("import") == [] and tool.defender.calls("batch_delete") == []


def test_ignore_filters_pushes_an_event_the_filters_would_not_select(tool: Tool) -> None:
    draft = next(e["uuid"] for e in tool.misp.events() if not e.get("published"))  # event 06, unpublished
    assert tool.run("--event", draft).counts["created"] == 0  # still subject to published: True
    result = tool.run("--event", draft, "--ignore-filters")
    assert result.code == 0, result.stderr
    assert result.counts["created"] > 0


def test_sightings_wait_for_a_grant_and_event_options_are_checked(tool: Tool) -> None:
    assert tool.run("--ignore-filters").code == 2
    assert tool.run("--event", EVENT_05, "--full-sync").code == 2
    assert tool.run("--sightings-only").code == 2
    assert tool.misp.calls() == [] and tool.defender.calls() == []
