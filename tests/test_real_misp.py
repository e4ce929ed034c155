"""Behave right on a real MISP 2.5 (issue 15): --check on the default config, edited events, 5xx output.

The MISP stand-in models what a real MISP 2.5.1 does differently from a naive server: a 500 for
``metadata`` with the warninglist flags when an event matches, an unpublish on every edit, a fresh
session cookie on every answer (which PyMISP logs on a 5xx), and normalisation on insert.
"""

from __future__ import annotations

import time

import pytest

from tests.harness import TEST_FILTERS, Tool
from tests.util import ATTR_40103_IP, EVENT_01, EVENT_03, EVENT_03_ONLY

# --- 1. --check on the default config ---------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["enforceWarninglist", "enforce_warninglist"])  # MISP's and PyMISP's
def test_check_passes_on_a_healthy_misp_2_5_with_the_default_filters(tool: Tool, spelling: str) -> None:
    assert tool.misp.warninglist_metadata_bug  # the stand-in answers metadata + enforceWarninglist with 500
    assert TEST_FILTERS["enforceWarninglist"] is True
    filters = {**{k: v for k, v in TEST_FILTERS.items() if k != "enforceWarninglist"}, spelling: True}
    result = tool.run("--check", misp_event_filters=filters)
    assert result.code == 0, result.stdout
    assert "✓ MISP: 5 events match misp_event_filters" in result.stdout
    counted = [c.body for c in tool.misp.calls("events") if c.body.get("metadata")]
    assert counted and all("enforceWarninglist" not in body or not body["enforceWarninglist"] for body in counted)


def test_a_misp_server_error_in_check_is_named_as_such(tool: Tool) -> None:
    tool.misp.inject("events", status=500, times=100,
                     body={"name": "Internal Error", "message": "SQLSTATE[HY000]: General error", "url": "/x"})
    result = tool.run("--check")
    assert result.code == 2
    [line] = [line for line in result.stdout.splitlines() if line.startswith("  ✗ MISP")]
    assert "MISP server error" in line and "SQLSTATE[HY000]" in line
    assert "MISP itself failed" in result.stdout  # the fix points at MISP's log, not at the network
    assert "network path" not in result.stdout


# --- 2. Editing an event unpublishes it -------------------------------------------------------------

def test_an_event_being_edited_keeps_its_indicators_until_it_is_deleted(tool: Tool) -> None:
    assert tool.run().code == 0
    before = tool.owned_keys()
    tool.misp.tag_event(EVENT_03, "analyst:note")  # any edit unpublishes the event
    assert tool.misp.events() and not next(e for e in tool.misp.events() if e["uuid"] == EVENT_03)["published"]
    edited = tool.run("--full-sync")
    assert edited.code == 0, edited.stderr
    assert tool.owned_keys() == before and edited.counts["deleted"] == 0
    assert "kept as last published" in " ".join(edited.report["kept_by_reason"])
    tool.misp.remove_event(EVENT_03)
    gone = tool.run("--full-sync")
    assert gone.code == 0 and tool.owned_keys() == before - EVENT_03_ONLY


@pytest.mark.parametrize("edit", ["a typo fixed in the value", "the selecting tag removed"])
def test_an_edit_that_takes_a_value_out_keeps_the_published_one_until_the_republish(tool: Tool, edit: str) -> None:
    assert tool.run().code == 0
    published = ("IpAddress", "46.101.155.38")
    assert published in tool.owned_keys()
    if edit == "a typo fixed in the value":
        tool.misp.set_attribute(ATTR_40103_IP, value="46.101.155.39")
    else:
        tool.misp.untag_event(EVENT_01, 'workflow:state="complete"')
    assert not next(e for e in tool.misp.events() if e["uuid"] == EVENT_01)["published"]
    editing = tool.run("--full-sync")
    assert editing.code == 0, editing.stderr
    assert published in tool.owned_keys() and editing.counts["deleted"] == 0
    tool.misp.publish(EVENT_01)  # the new content counts from now on
    republished = tool.run("--full-sync")
    assert republished.code == 0, republished.stderr
    assert published not in tool.owned_keys()
    assert (("IpAddress", "46.101.155.39") in tool.owned_keys()) == (edit == "a typo fixed in the value")


def test_an_edited_event_the_edited_read_misses_still_holds_its_values(tool: Tool) -> None:
    # The read of events being edited pages by offset like any other: an event may slide out of it.
    # Before deleting, each indicator's own event is asked about by uuid.
    assert tool.run().code == 0
    before = tool.owned_keys()
    tool.misp.tag_event(EVENT_03, "analyst:note")  # unpublished by the edit
    tool.misp.inject("events", status=200, body=[], times=10, match=lambda rec: rec.body.get("published") is False)
    result = tool.run("--full-sync")
    assert result.code == 0, result.stderr
    assert tool.owned_keys() == before and result.counts["deleted"] == 0
    assert any("uuid" in c.body for c in tool.misp.calls("events")), "asked about the event by uuid"


def indicators(tool: Tool) -> set[tuple]:
    return {(i["indicatorType"], i["indicatorValue"], i["action"], i["severity"], i["title"])
            for i in tool.defender.active()}


def shared_domain_event(uuid: str, tags: list[str], info: str = "") -> dict:
    return {"Event": {"uuid": uuid, "info": info or f"event {uuid[:8]}", "published": True,
                      "Tag": [{"name": 'workflow:state="complete"'}, *({"name": t} for t in tags)],
                      "Attribute": [{"uuid": uuid[:-1] + "9", "type": "domain", "category": "Network activity",
                                     "to_ids": True, "value": "shared-c2.top"}]}}


def test_when_misp_cannot_say_whether_an_event_is_edited_its_indicators_stay_as_they_are(tool: Tool) -> None:
    high, medium = "73000000-0000-4000-8000-000000000001", "74000000-0000-4000-8000-000000000001"
    tool.misp.add_event(shared_domain_event(high, ['misp:threat-level="high-risk"']))
    tool.misp.add_event(shared_domain_event(medium, []))
    assert tool.run().code == 0
    before = indicators(tool)
    assert ("DomainName", "shared-c2.top", "Audit", "High") in {i[:4] for i in before}
    tool.misp.set_attribute(high[:-1] + "9", value="shared-c3.top")  # the high-risk event is being edited
    tool.misp.inject("events", status=500, times=20, match=lambda rec: "uuid" in rec.body)
    result = tool.run("--full-sync")
    assert result.code == 1 and "being edited" in result.stderr
    assert before <= indicators(tool)  # not downgraded to the other event's Medium while MISP could not say


def test_an_indicator_names_the_event_that_gives_it_now_so_an_unrelated_edit_holds_nothing(tool: Tool) -> None:
    one, two = "75000000-0000-4000-8000-000000000001", "76000000-0000-4000-8000-000000000001"
    tool.misp.add_event(shared_domain_event(one, [], info="the same campaign"))  # the same title: only the
    tool.misp.add_event(shared_domain_event(two, [], info="the same campaign"))  # description tells them apart
    assert tool.run("--full-sync").code == 0

    def description() -> str:
        return next(i["description"] for i in tool.defender.active() if i["indicatorValue"] == "shared-c2.top")
    named, other = (one, two) if one in description() else (two, one)
    tool.misp.set_attribute(named[:-1] + "9", to_ids=False)
    tool.misp.publish(named)  # published without the value: the other event gives it now
    moved = tool.run("--full-sync")
    assert moved.code == 0 and moved.counts["updated"] == 1 and other in description()
    tool.misp.tag_event(named, "analyst:note")  # an edit that has nothing to do with the value
    tool.misp.remove_event(other)
    gone = tool.run("--full-sync")
    assert gone.code == 0, gone.stderr
    assert ("DomainName", "shared-c2.top") not in tool.owned_keys()


def test_pushing_one_event_never_changes_what_an_edited_event_holds(tool: Tool) -> None:
    assert tool.run().code == 0
    before = indicators(tool)
    tool.misp.tag_event(EVENT_01, "analyst:note")  # event 01 is being edited
    result = tool.run("--event", EVENT_03)
    assert result.code == 0, result.stderr
    assert indicators(tool) == before
    assert (result.counts["created"], result.counts["updated"], result.counts["deleted"]) == (0, 0, 0)


def test_a_retraction_inside_an_edit_takes_effect_at_the_republish(tool: Tool) -> None:
    assert tool.run().code == 0
    tool.misp.set_attribute(ATTR_40103_IP, to_ids=False)  # event 01 is now unpublished
    waiting = tool.run("--full-sync")
    assert waiting.code == 0 and ("IpAddress", "46.101.155.38") in tool.owned_keys()
    tool.misp.publish(EVENT_01)
    republished = tool.run(misp_event_filters={**TEST_FILTERS, "publish_timestamp": "1h"})
    assert republished.code == 0, republished.stderr
    assert ("IpAddress", "46.101.155.38") not in tool.owned_keys()
    assert republished.report["deleted_by_reason"] == {"retracted: to_ids turned off": 1}


def test_an_edited_events_indicator_is_refreshed_in_its_published_form(tool: Tool) -> None:
    assert tool.run().code == 0
    [target] = [i for i in tool.defender.active() if i["indicatorValue"] == "46.101.155.38"]
    title = target["title"]
    target["expirationTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    tool.misp.set_attribute(ATTR_40103_IP, comment="being rewritten")
    edited = next(e for e in tool.misp.events() if e["uuid"] == EVENT_01)
    edited["info"] = "a new title nobody has published yet"
    result = tool.run("--full-sync")
    assert result.code == 0 and result.counts["updated"] == 1
    assert tool.defender.indicators[target["id"]]["title"] == title
    assert tool.defender.indicators[target["id"]]["expirationTime"] > target["creationTimeDateTimeUtc"]


def test_sites_that_want_removal_on_unpublish_can_have_it(tool: Tool) -> None:
    assert tool.run().code == 0
    tool.misp.unpublish(EVENT_03)
    result = tool.run("--full-sync", keep_unpublished_edits=False)
    assert result.code == 0 and not tool.owned_keys() & EVENT_03_ONLY


# --- 3. Server errors never leak a session cookie --------------------------------------------------

def test_no_session_cookie_in_any_output_after_a_misp_500(tool: Tool) -> None:
    tool.misp.inject("events", status=500, times=2)  # retried, then the read goes on
    result = tool.run("-vv", verbose_log=True)
    assert result.code == 0, result.stderr
    check = tool.run("--check")
    tool.misp.inject("events", status=500, times=100)
    failing = tool.run("-vv", verbose_log=True)
    assert failing.code == 1
    cookies = set(tool.misp.cookies)
    assert cookies
    outputs = {"stdout/stderr": "".join(r.stdout + r.stderr for r in (result, check, failing))}
    for path in tool.written_files():
        if not path.name.startswith("config"):
            outputs[path.name] = path.read_text(errors="replace")
    assert "misp2defender.log" in outputs
    assert "Something is broken server-side" in outputs["misp2defender.log"]  # PyMISP did log the request
    for name, text in outputs.items():
        for cookie in cookies:
            assert cookie not in text, f"a MISP session cookie leaked into {name}"


# --- Values as a real MISP stores them ----------------------------------------------------------------

def test_values_normalised_by_misp_on_insert_sync_as_expected(tool: Tool) -> None:
    event = {"Event": {"uuid": "90000000-0000-4000-8000-000000000001", "info": "inserted through the API",
                       "published": True, "Tag": [{"name": 'workflow:state="complete"'}],
                       "Attribute": [
                           {"type": "domain", "category": "Network activity", "to_ids": True,
                            "value": " Inserted-Domain[.]TOP. "},
                           {"type": "ip-dst", "category": "Network activity", "to_ids": True,
                            "value": "2a01:04f8:0000:0000:0000:0000:0000:0042"},
                           {"type": "sha256", "category": "Payload delivery", "to_ids": True, "value": "zz" * 32},
                           {"type": "domain", "category": "Network activity", "to_ids": True, "value": "*.wild.top"},
                       ]}}
    stored = tool.misp.add_event(event, normalise=True)
    assert [a["value"] for a in stored["Attribute"]] == ["inserted-domain.top", "2a01:4f8::42"]
    assert len(tool.misp.dropped_on_insert) == 2  # invalid hash and wildcard dropped silently, as MISP does
    result = tool.run()
    assert result.code == 0, result.stderr
    assert {("DomainName", "inserted-domain.top"), ("IpAddress", "2a01:4f8:0:0:0:0:0:42")} <= tool.owned_keys()
