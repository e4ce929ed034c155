"""Reconciliation (issue 3): retractions, full sync, action changes, expiry refresh, safety, the cap."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.harness import TEST_FILTERS, Tool
from tests.util import SAMPLE_KEYS, TEST_CLIENT_ID

EVENT_01, EVENT_03, EVENT_05 = ("c5e5fc6c-e9ef-4edd-b2ec-552651e2fd5e", "37018e28-4d6a-4ace-9e41-009656db4192",
                                "15afa931-ee80-4ed3-a33a-362d2912554e")
ATTR_40103_IP = "cc1317cf-5a8f-48b9-bb20-2b086aa45cde"        # 46.101.155.38, event 01
ATTR_40105_DOMAIN = "c46bbc4b-a402-453f-bc2d-4a346404f89b"    # EVIL-Domain.top, event 01 (also 40205 in event 02)
ATTR_40107_HOSTNAME = "32a2096d-0456-46d9-8152-199f2b7e9601"  # mail.cdn-update-check.top., event 01
# Event 03's keys that no other selected event carries (its sha256 d2f1da08… is also in event 01).
EVENT_03_ONLY = {
    ("FileMd5", "3e7188e69da07334aa862af04851634f"), ("FileSha1", "bbf3f14daad62c6cbba660465fdbc6f11d75d5a8"),
    ("FileMd5", "5944c615e31c1482bdcc3cbcfa769e4a"), ("FileSha1", "a9f51651341103926ed17ac5363f755beaa2cfe5"),
    ("FileMd5", "d0a9bf3ef7dc08b615e2daf165b035f8"), ("FileSha1", "4c08199ea3ef9d62d1298d97676558f2d3c7994a"),
    ("FileSha256", "b7606bb122de9d77f58125ba3052b9035b39d837277128d5d71dc49d77189dff"),
}
# Event 05's keys that no other event carries (its 91.215.85.147 is also in event 01).
EVENT_05_ONLY = {
    ("IpAddress", "179.43.187.30"), ("DomainName", "cs-teamserver.cloud-sync-status.top"),
    ("IpAddress", "2a0b:f4c2:2:0:0:0:0:1"), ("Url", "https://cloud-sync-status.top/jquery-3.3.1.min.js"),
}
FOREIGN = [
    {"indicatorType": "IpAddress", "indicatorValue": "46.101.155.38", "action": "Block", "title": "other tool",
     "description": "kept by another application"},
    {"indicatorType": "FileMd5", "indicatorValue": "3e7188e69da07334aa862af04851634f", "action": "Audit",
     "title": "other tool", "description": "kept by another application", "generateAlert": True},
]


FOREIGN_KEYS = {(f["indicatorType"], f["indicatorValue"]) for f in FOREIGN}  # covered by others: never ours


def deleted_ids(tool: Tool) -> list[str]:
    return [i for call in tool.defender.calls("batch_delete", status=204) for i in call.body["IndicatorIds"]]


def seed_foreign(tool: Tool) -> dict[str, dict]:
    ids = tool.defender.seed(FOREIGN, created_by="another-app", application="OpenCTI")
    return {i: dict(tool.defender.indicators[i]) for i in ids}


def assert_foreign_untouched(tool: Tool, before: dict[str, dict]) -> None:
    assert {i: tool.defender.indicators.get(i) for i in before} == before


def ids_of(tool: Tool, keys: set[tuple[str, str]]) -> set[str]:
    return {i["id"] for i in tool.defender.owned_by(TEST_CLIENT_ID)
            if (i["indicatorType"], i["indicatorValue"]) in keys}


def test_normal_run_removes_retracted_values_unless_another_selected_attribute_carries_them(tool: Tool) -> None:
    foreign = seed_foreign(tool)
    assert tool.run().code == 0
    retracted = {("IpAddress", "46.101.155.38"), ("DomainName", "mail.cdn-update-check.top")}
    expected_deletes = ids_of(tool, retracted)
    tool.misp.set_attribute(ATTR_40103_IP, to_ids=False)
    tool.misp.delete_attribute(ATTR_40107_HOSTNAME)
    tool.misp.set_attribute(ATTR_40105_DOMAIN, to_ids=False)  # event 02 (outside the window) still carries it
    tool.misp.publish_event_of(ATTR_40103_IP)  # the analyst's edits take effect when event 01 is republished
    result = tool.run(misp_event_filters={**TEST_FILTERS, "timestamp": "1h"})
    assert result.code == 0, result.stderr
    assert result.counts["events"] == 1  # only the edited event is in the window
    assert set(deleted_ids(tool)) == expected_deletes
    assert tool.owned_keys() == SAMPLE_KEYS - FOREIGN_KEYS - retracted
    assert tool.misp.calls("attributes"), "the still-carried value was checked with MISP"
    assert_foreign_untouched(tool, foreign)


def test_full_sync_removes_what_is_no_longer_selected(tool: Tool) -> None:
    foreign = seed_foreign(tool)
    assert tool.run().code == 0
    expected_deletes = ids_of(tool, EVENT_03_ONLY | EVENT_05_ONLY)
    tool.misp.unpublish(EVENT_03)
    tool.misp.remove_event(EVENT_05)
    incremental = tool.run(misp_event_filters={**TEST_FILTERS, "timestamp": "1h"})
    assert incremental.code == 0 and deleted_ids(tool) == []  # a normal run does not guess at absence
    # Unpublished (not deleted) event 03 would be kept as last published; this site opts out.
    result = tool.run("--full-sync", misp_event_filters={**TEST_FILTERS, "publish_timestamp": "1h"},
                      keep_unpublished_edits=False)
    assert result.code == 0, result.stderr
    assert set(deleted_ids(tool)) == expected_deletes
    assert tool.owned_keys() == SAMPLE_KEYS - FOREIGN_KEYS - EVENT_03_ONLY - EVENT_05_ONLY
    # --full-sync dropped the time window: the events outside "1h" were read.
    assert result.counts["events"] == 3  # 01, 02 and 04: 03 unpublished, 05 gone, 06 and 07 never selected
    assert "publish_timestamp" not in tool.misp.calls("events")[-1].body
    assert_foreign_untouched(tool, foreign)


def test_switching_the_action_leaves_exactly_one_owned_indicator_per_value(tool: Tool) -> None:
    foreign = seed_foreign(tool)
    assert tool.run(defender_action="Audit").code == 0
    result = tool.run(defender_action="Block")
    assert result.code == 0, result.stderr
    held = tool.held()
    # Block also admits the two certificate thumbprints that Audit had to reject.
    certificates = {("CertificateThumbprint", "969ae361c723d363db26c70f0b88142f4f46fc24"),
                    ("CertificateThumbprint", "5c55b651f4dd773e0f599ea4ba99cc869c61dd1c")}
    assert len(held) == len({(t, v) for t, v, _ in held})
    assert {(t, v) for t, v, _ in held} == SAMPLE_KEYS - FOREIGN_KEYS | certificates
    # Attributes tagged course-of-action:passive keep Audit; every other value is now Block.
    passive = {("FileSha1", "bbf3f14daad62c6cbba660465fdbc6f11d75d5a8"), ("IpAddress", "179.43.187.30")}
    assert {(t, v) for t, v, a in held if a == "Audit"} == passive
    assert {(t, v) for t, v, a in held if a == "BlockAndRemediate"} == certificates
    assert {(t, v, a) for t, v, a in held if (t, v) not in passive | certificates and a != "Block"} == set()
    assert "replaced by action Block" in tool.tmp.joinpath("misp2defender.log").read_text()
    assert_foreign_untouched(tool, foreign)
    third = tool.run(defender_action="Block")
    assert third.code == 0 and third.counts["created"] == third.counts["deleted"] == 0


def test_an_owned_indicator_expiring_tomorrow_is_extended(tool: Tool) -> None:
    assert tool.run().code == 0
    [target] = [i for i in tool.defender.owned_by(TEST_CLIENT_ID) if i["indicatorValue"] == "185.225.17.88"]
    tomorrow = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    target["expirationTime"] = tomorrow.strftime("%Y-%m-%dT%H:%M:%SZ")
    imports_before = len(tool.defender.calls("import"))
    result = tool.run()
    assert result.code == 0 and result.counts["updated"] == 1
    [call] = tool.defender.calls("import")[imports_before:]
    assert [i["indicatorValue"] for i in call.body["Indicators"]] == ["185.225.17.88"]
    expiry = tool.defender.indicators[target["id"]]["expirationTime"]
    extended = dt.datetime.fromisoformat(expiry.replace("Z", "+00:00"))
    assert extended - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=89)


def test_a_failing_misp_page_during_full_sync_deletes_nothing(tool: Tool) -> None:
    assert tool.run().code == 0
    tool.misp.unpublish(EVENT_03)  # a delete would be due...
    tool.misp.fail_page(2, status=500, times=20)  # ...but page 2 keeps failing
    result = tool.run("--full-sync", misp_event_limit_per_page=2)
    assert result.code in (1, 2)
    assert tool.defender.calls("batch_delete") == [] and tool.defender.calls("delete") == []
    assert "read only in part" in result.stderr and result.report["misp_error"]


def test_mass_delete_guard_stops_before_deleting_and_force_proceeds(tool: Tool) -> None:
    assert tool.run().code == 0
    only_event_05 = {**TEST_FILTERS, "tags": ['misp-galaxy:tool="Cobalt Strike"']}
    result = tool.run("--full-sync", misp_event_filters=only_event_05)
    assert result.code == 1
    assert tool.defender.calls("batch_delete") == []
    assert "remove_guard_percent" in result.stderr and "--force" in result.stderr
    forced = tool.run("--full-sync", "--force", misp_event_filters=only_event_05)
    assert forced.code == 0
    assert tool.owned_keys() == EVENT_05_ONLY | {("IpAddress", "91.215.85.147")}
    assert forced.counts["deleted"] == 31


def cap_events() -> tuple[list[dict], list[str]]:
    """100 new values: 25 each of High+Block, High+Audit, Medium+Block, Low+Audit; newer ids later."""
    groups = [("high-risk", "active"), ("high-risk", None), ("medium-risk", "active"), ("low-risk", None)]
    events, ranked = [], []
    for g, (risk, coa) in enumerate(groups):
        attributes = []
        for n in range(25):
            tags = [{"name": f'course-of-action:{coa}="deny"'}] if coa else []
            attributes.append({"uuid": f"20000000-0000-4000-8000-{g:04d}{n:08d}", "type": "domain",
                               "category": "Network activity", "to_ids": True, "value": f"cap-{g}-{n:02d}.top",
                               "timestamp": str(1_790_000_000 + n), "Tag": tags})
        events.append({"Event": {"uuid": f"30000000-0000-4000-8000-{g:012d}", "info": f"cap group {g}",
                                 "published": True, "Tag": [{"name": "cap-test"},
                                                            {"name": f'misp:threat-level="{risk}"'}],
                                 "Attribute": attributes}})
    # The priority rule by hand: High first, Block before Audit, then the newest attribute.
    ranked = [f"cap-0-{n:02d}.top" for n in reversed(range(25))] + [f"cap-1-{n:02d}.top" for n in reversed(range(25))]
    return events, ranked


@pytest.mark.slow
def test_tenant_cap_creates_by_priority_and_reports_the_rest(tool: Tool) -> None:
    foreign = [{"indicatorType": "FileSha256", "indicatorValue": f"{n:064x}", "action": "Audit", "title": "t",
                "description": "d", "generateAlert": True} for n in range(15_000 - 40)]
    tool.defender.seed(foreign, created_by="another-app", application="feed")
    events, ranked = cap_events()
    for event in events:
        tool.misp.add_event(event)
    result = tool.run(misp_event_filters={"published": True, "tags": ["cap-test"]})
    assert result.code == 1
    created = {v for t, v, _ in tool.held()}
    assert created == set(ranked[:40])
    assert result.counts["left_out"] == 60
    assert {item["value"] for item in result.report["left_out_items"]} == {
        f"cap-{g}-{n:02d}.top" for g in range(4) for n in range(25)} - set(ranked[:40])
    sent = [item for call in tool.defender.calls("import") for item in call.body["Indicators"]]
    assert len(sent) == 40  # nothing was sent that the cap would refuse
    assert len(tool.defender.active()) == 15_000


def test_a_failing_page_in_a_shared_read_deletes_nothing(tool: Tool) -> None:
    assert tool.run().code == 0
    tool.misp.unpublish(EVENT_03)
    tool.misp.fail_page(3, status=500, times=20)  # the parent or the helper reader meets it
    result = tool.run("--full-sync", misp_event_limit_per_page=1)
    assert result.code == 1
    assert len(tool.misp.calls("me")) == 3  # the helper did take part
    assert tool.defender.calls("batch_delete") == [] and "page 3" in result.report["misp_error"]


def test_a_retracted_value_still_carried_in_another_spelling_stays(tool: Tool) -> None:
    carrier = {"Event": {"uuid": "60000000-0000-4000-8000-000000000060", "info": "older report", "published": True,
                         "timestamp": "1793606400", "publish_timestamp": "1793606400",
                         "Tag": [{"name": 'workflow:state="complete"'}],
                         "Attribute": [
                             {"uuid": "60000000-0000-4000-8000-000000000061", "type": "ip-dst", "to_ids": True,
                              "category": "Network activity", "value": "2a01:4f8:c17:2b1::3"},  # compressed IPv6
                             {"uuid": "60000000-0000-4000-8000-000000000062", "type": "hostname", "to_ids": True,
                              "category": "Network activity", "value": "mail[.]cdn-update-check[.]top"}]}}
    tool.misp.add_event(carrier)
    assert tool.run().code == 0
    tool.misp.set_attribute("28ceaac2-0193-4679-92c4-889660dbc89f", to_ids=False)  # 40104, ip-src|port
    tool.misp.set_attribute(ATTR_40107_HOSTNAME, to_ids=False)
    tool.misp.publish_event_of(ATTR_40107_HOSTNAME)
    result = tool.run(misp_event_filters={**TEST_FILTERS, "timestamp": "1h"})
    assert result.code == 0, result.stderr
    assert result.counts["events"] == 1 and deleted_ids(tool) == []
    assert {("IpAddress", "2a01:4f8:c17:2b1:0:0:0:3"), ("DomainName", "mail.cdn-update-check.top")} <= tool.owned_keys()
