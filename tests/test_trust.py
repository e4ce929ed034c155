"""Trust (issue 9): no wrong delete, no foreign write, no hang, a plan that settles, honest exit codes.

Each test reproduces one way the sync could betray an unattended cron job, end to end against the
stand-ins, and shows that it no longer does.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness import TEST_FILTERS, Tool
from tests.standins.misp import MispStandIn
from tests.standins.otx import OtxStandIn
from tests.util import (
    ATTR_40103_IP,
    EVENT_01,
    MISP_KEY,
    OTX_KEY,
    SAMPLE_KEYS,
    TEST_CLIENT_ID,
    m2d,
    make_candidate,
    serving,
    wait_for,
)

SAMPLE_COUNT = 36  # keys the sample events give under the default config (tests/data/README.md)


def deletes(tool: Tool) -> list:
    return tool.defender.calls("batch_delete") + tool.defender.calls("delete")


def snapshot(tool: Tool, ids: list[str]) -> dict[str, dict]:
    return {i: json.loads(json.dumps(tool.defender.indicators[i])) for i in ids}


# --- 1. A MISP answer that is not a list of events is not an empty page -------------------------

ODD_SHAPES = [{"response": {}}, {}, {"response": None}, {"message": "Internal error, try later"}]


@pytest.mark.parametrize("body", ODD_SHAPES, ids=["response-empty-object", "empty-object", "response-null",
                                                  "message"])
def test_an_odd_misp_answer_deletes_nothing_even_with_force(tool: Tool, body: dict) -> None:
    assert tool.run().code == 0
    before = tool.owned_keys()
    assert len(before) == SAMPLE_COUNT
    tool.misp.inject("events", status=200, body=body, times=100)
    result = tool.run("--full-sync", "--force", remove_guard_percent=100)
    assert result.code == 1
    assert deletes(tool) == [] and tool.owned_keys() == before
    assert "not a list of events" in result.report["misp_error"]
    assert "nothing will be deleted" in result.stderr


def test_an_odd_page_in_the_middle_of_a_read_deletes_nothing(tool: Tool) -> None:
    assert tool.run().code == 0

    def page_2(rec) -> bool:
        return isinstance(rec.body, dict) and rec.body.get("page") == 2

    tool.misp.inject("events", status=200, body={"response": {}}, times=100, match=page_2)
    result = tool.run("--full-sync", misp_event_limit_per_page=1, remove_guard_percent=100)
    assert result.code == 1
    assert deletes(tool) == [] and len(tool.owned_keys()) == SAMPLE_COUNT
    assert "page 2" in result.report["misp_error"] and "an empty object" in result.report["misp_error"]


def test_an_odd_answer_to_the_value_check_means_unknown_never_not_carried(tool: Tool) -> None:
    assert tool.run().code == 0
    tool.misp.set_attribute(ATTR_40103_IP, to_ids=False)  # a retraction: a delete is due...
    tool.misp.publish_event_of(ATTR_40103_IP)
    tool.misp.inject("attributes", status=200, body={"response": None}, times=100)  # ...if MISP confirms
    result = tool.run(misp_event_filters={**TEST_FILTERS, "timestamp": "1h"})
    assert result.code == 1
    assert deletes(tool) == [] and ("IpAddress", "46.101.155.38") in tool.owned_keys()
    assert "value check" in result.report["misp_error"]
    assert "not a list of attributes" in result.report["misp_error"]


# --- 2. Paging must not lose events that move between pages ---------------------------------------

def test_an_event_sliding_to_an_earlier_page_during_a_full_sync_keeps_its_indicators(tool: Tool) -> None:
    assert tool.run().code == 0
    before = tool.owned_keys()
    # After the second page has been served, event 01 (page 1, already read) is deleted: every later
    # event slides one page back, so one of them is never read in this run.
    tool.misp.after("events", 2, lambda: tool.misp.remove_event(EVENT_01))
    result = tool.run("--full-sync", misp_event_limit_per_page=1, remove_guard_percent=100)
    assert result.code == 0, result.stderr
    assert result.counts["events"] == 4  # five selected at the start; one of them slid past the reader
    assert deletes(tool) == [] and tool.owned_keys() == before  # the unread event's values were confirmed
    assert result.report["kept_by_reason"]["still carried by a selected MISP attribute"] >= 1
    # Event 01 was read before it left; the next full sync sees it gone and removes its own values.
    event_01_only = {("IpAddress", "185.225.17.88"), ("IpAddress", "46.101.155.38"),
                     ("IpAddress", "2a01:4f8:c17:2b1:0:0:0:3"), ("DomainName", "mail.cdn-update-check.top"),
                     ("Url", "http://cdn-update-check.top/wp-content/plugins/wpx-cache/loader.php"),
                     ("FileSha256", "bb9008e38301becb5406cdbd3f88f5f789ad9c82b43a750cfc2592a783fc3d92"),
                     ("IpAddress", "194.87.31.12")}
    assert tool.run("--full-sync", remove_guard_percent=100).code == 0
    assert tool.owned_keys() == before - event_01_only


# --- 3. A replacement never lands on a foreign indicator -----------------------------------------

def test_an_action_change_never_writes_onto_an_analysts_indicator(tool: Tool) -> None:
    assert tool.run(defender_action="Audit").code == 0
    [ours] = [i for i in tool.defender.owned_by(TEST_CLIENT_ID) if i["indicatorValue"] == "194.87.31.12"]
    analyst = {"indicatorType": "IpAddress", "indicatorValue": "194.87.31.12", "action": "Block",
               "title": "blocked by the SOC", "description": "manual", "severity": "High", "expirationTime": None}
    [analyst_id] = tool.defender.seed([analyst], created_by="soc-analyst-app", application="Portal")
    theirs = snapshot(tool, [analyst_id])
    result = tool.run(defender_action="Block")
    assert result.code == 0, result.stderr
    assert snapshot(tool, [analyst_id]) == theirs  # byte for byte, "never expires" included
    assert tool.defender.indicators[ours["id"]]["action"] == "Audit"  # ours kept as it was
    sent = [i for call in tool.defender.calls("import") for i in call.body["Indicators"]]
    assert not [i for i in sent if i["indicatorValue"] == "194.87.31.12" and i["action"] == "Block"]
    again = tool.run(defender_action="Block")
    assert again.code == 0 and again.counts["created"] == again.counts["deleted"] == 0
    assert snapshot(tool, [analyst_id]) == theirs


def test_an_update_never_lands_on_a_foreign_indicator_with_the_same_upsert_key(tool: Tool) -> None:
    # Another application holds exactly our upsert key (type, value, action), listed before ours.
    shared = {"indicatorType": "DomainName", "indicatorValue": "office-docs-share.xyz", "action": "Audit",
              "title": "theirs", "description": "theirs", "generateAlert": True, "severity": "Low"}
    [their_id] = tool.defender.seed([shared], created_by="another-app", application="OpenCTI")
    theirs = snapshot(tool, [their_id])
    tool.defender.seed([{**shared, "title": "an old title of ours", "severity": "Medium"}],
                       created_by=TEST_CLIENT_ID, application="MISP")  # ours: its title needs an update
    result = tool.run()
    assert result.code == 0, result.stderr
    assert snapshot(tool, [their_id]) == theirs
    sent = [i["indicatorValue"] for call in tool.defender.calls("import") for i in call.body["Indicators"]]
    assert "office-docs-share.xyz" not in sent


# --- 4. The retraction check honours vetting --------------------------------------------------------

def vetted_event() -> dict:
    """A vetted-only event holding one value twice: vetted once, and once not vetted."""
    return {"Event": {
        "uuid": "70000000-0000-4000-8000-000000000001", "info": "vetted feed", "published": True,
        "Tag": [{"name": 'workflow:state="complete"'}, {"name": 'curation:source="MISP-TEST"'}],
        "Attribute": [
            {"uuid": "70000000-0000-4000-8000-000000000011", "type": "domain", "category": "Network activity",
             "to_ids": True, "value": "vetted-copy.top", "Tag": [{"name": 'course-of-action:active="deny"'}]},
            {"uuid": "70000000-0000-4000-8000-000000000012", "type": "hostname", "category": "Network activity",
             "to_ids": True, "value": "vetted-copy.top", "Tag": []}]}}


def test_a_retracted_vetted_value_goes_although_an_unvetted_copy_remains(tool: Tool) -> None:
    tool.misp.add_event(vetted_event())
    assert tool.run().code == 0
    assert ("DomainName", "vetted-copy.top") in tool.owned_keys()
    tool.misp.set_attribute("70000000-0000-4000-8000-000000000011", to_ids=False)
    tool.misp.publish_event_of("70000000-0000-4000-8000-000000000011")
    result = tool.run(misp_event_filters={**TEST_FILTERS, "timestamp": "1h"})
    assert result.code == 0, result.stderr
    assert tool.misp.calls("attributes"), "the value was checked with MISP"
    assert ("DomainName", "vetted-copy.top") not in tool.owned_keys()  # the unvetted copy does not count


# --- 5. The helper reader never outlives its parent ---------------------------------------------

def children_of(pid: int) -> list[int]:
    """The Python processes ``pid`` started (not a short-lived tool a library may run, such as uname)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status and b"python" in command:
                found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("when,how", [("listing", signal.SIGKILL), ("listing", signal.SIGTERM),
                                      ("reading", signal.SIGKILL), ("reading", signal.SIGTERM)])
def test_killing_a_run_leaves_no_helper_and_the_next_run_starts(tool: Tool, when: str, how: int) -> None:
    if when == "listing":
        tool.defender.inject("list", delay=3.0)
    else:
        def later_pages(rec) -> bool:
            return isinstance(rec.body, dict) and (rec.body.get("page") or 1) >= 3

        tool.misp.inject("events", delay=10.0, times=10, match=later_pages)  # the helper waits on MISP
    child, _ = tool.spawn(misp_event_limit_per_page=1)
    assert wait_for(lambda: len(tool.misp.calls("me")) >= 2), "the helper reader did not start"
    helpers = children_of(child.pid)
    assert helpers, "no helper process found"
    lock = str(tool.tmp / "misp2defender.lock")

    def holds_nothing_of_its_parents(helper: int) -> bool:
        try:
            targets = {os.readlink(fd) for fd in Path(f"/proc/{helper}/fd").iterdir() if fd.name.isdigit()}
            return lock not in targets and os.readlink(f"/proc/{helper}/fd/1") == os.devnull == os.readlink(
                f"/proc/{helper}/fd/2")
        except FileNotFoundError:
            return False
    for helper in helpers:  # (a helper just forked closes what it must at once: give it that moment)
        assert wait_for(functools.partial(holds_nothing_of_its_parents, helper), seconds=3), \
            f"process {helper} holds its parent's lock or output"
    child.send_signal(how)
    out, err = child.communicate(timeout=15)  # whoever reads the output sees it end
    # At once, whatever it was doing: not when its MISP read ends.
    assert wait_for(lambda: all(gone(h) for h in helpers), seconds=3), "a helper reader outlived its parent"
    if how == signal.SIGTERM:
        assert child.returncode == 1 and "interrupted" in err
    tool.defender._faults.clear()
    tool.misp._faults.clear()
    started = time.monotonic()
    result = tool.run()
    assert result.code == 0, result.stderr
    assert time.monotonic() - started < 10
    assert len(tool.owned_keys()) == SAMPLE_COUNT


# --- 6. Bounded waits ------------------------------------------------------------------------------

@pytest.mark.parametrize("retry_after", ["86400", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_a_retry_after_of_a_day_is_never_slept(tool: Tool, retry_after: str) -> None:
    tool.defender.inject("import", status=429, retry_after=retry_after, times=1)
    started = time.monotonic()
    result = tool.run(max_retry_wait=60)
    assert time.monotonic() - started < 20
    assert result.code == 1
    assert "max_retry_wait" in result.stderr and "left for the next run" in result.stderr
    assert len(tool.defender.calls("import")) == 1  # the endpoint was left alone after that answer
    assert result.counts["failed"] == SAMPLE_COUNT
    assert tool.run().code == 0 and len(tool.owned_keys()) == SAMPLE_COUNT  # the next run does the work


def test_a_5xx_with_a_long_retry_after_is_not_waited_either(tool: Tool) -> None:
    tool.defender.inject("list", status=503, retry_after=3600, times=100)
    started = time.monotonic()
    result = tool.run()
    assert time.monotonic() - started < 20
    assert result.code == 1 and "max_retry_wait" in result.stderr
    assert tool.defender.calls("import") == []


def test_no_write_starts_after_max_run_seconds(tool: Tool) -> None:
    tool.defender.inject("list", delay=2.5)
    result = tool.run(max_run_seconds=2)
    assert result.code == 1
    assert tool.defender.calls("import") == []
    assert result.counts["failed"] == SAMPLE_COUNT
    assert all("max_run_seconds" in f["reason"] for f in result.report["failed"])


# --- 7. Over the cap, the same duplicate always wins ---------------------------------------------

def duplicate_events(count: int) -> list[dict]:
    """Each value twice: Block with the earlier expiry (event A), Audit with the later one (event B)."""
    def event(name: str, coa: str, first_seen: str) -> dict:
        return {"Event": {
            "uuid": f"80000000-0000-4000-8000-00000000000{name}", "info": f"duplicates {name}", "published": True,
            "Tag": [{"name": "dup-test"}],
            "Attribute": [{"uuid": f"8{name}000000-0000-4000-8000-{n:012d}", "type": "domain", "to_ids": True,
                           "category": "Network activity", "value": f"dup-{n:02d}.top", "first_seen": first_seen,
                           "Tag": [{"name": f'course-of-action:{coa}="deny"'}]} for n in range(count)]}}
    return [event("a", "active", "2026-11-01T00:00:00+00:00"), event("b", "passive", "2026-11-20T00:00:00+00:00")]


def test_over_the_cap_the_plan_settles_and_the_exit_code_is_only_about_what_is_left_out(tool: Tool) -> None:
    for event in duplicate_events(30):
        tool.misp.add_event(event)
    config = {"misp_event_filters": {"published": True, "tags": ["dup-test"]}, "defender_max_indicators": 20,
              "days_to_expire_start": "valid_from", "misp_event_limit_per_page": 1}
    first = tool.run("--full-sync", **config)
    assert first.code == 1 and first.counts["created"] == 20 and first.counts["left_out"] == 10
    assert {a for _, _, a in tool.held()} == {"Block"}  # Block outranks a later expiry, every time
    second = tool.run("--full-sync", **config)
    assert second.code == 1  # over the cap, and nothing else
    assert second.counts["created"] == second.counts["updated"] == second.counts["deleted"] == 0
    assert second.counts["failed"] == 0 and second.counts["left_out"] == 10
    assert {a for _, _, a in tool.held()} == {"Block"}


def test_the_duplicate_rule_does_not_depend_on_what_defender_holds() -> None:
    block = make_candidate("x.top", action="Block", expiration=1.0e9, event_id="1", generate_alert=False)
    audit = make_candidate("x.top", action="Audit", expiration=2.0e9, event_id="2", generate_alert=True)
    filler = [make_candidate(f"f{n}.top", action="Block", severity="High", expiration=1.0e9, event_id="3")
              for n in range(3)]
    for interesting in (frozenset(), frozenset({("DomainName", "x.top")})):
        for order in ([block, audit, *filler], [audit, *filler, block], [*filler, audit, block]):
            desired = m2d.Desired(interesting=interesting, room=3)
            for candidate in order:
                desired.add(candidate)
            desired.finish()
            kept = desired.candidates.get(("DomainName", "x.top"))
            assert kept is None or kept.action == "Block", (interesting, [c.action for c in order])
    assert m2d.stronger(block, audit) is block and m2d.stronger(audit, block) is block


# --- 8. Action changes at the cap land ----------------------------------------------------------

def test_action_changes_at_the_cap_land_and_take_precedence_over_new_values(tool: Tool) -> None:
    assert tool.run(defender_action="Audit", defender_max_indicators=38).code == 0
    assert len(tool.owned_keys()) == SAMPLE_COUNT  # 2 slots free
    result = tool.run(defender_action="Block", defender_max_indicators=38)
    assert result.counts["failed"] == 0, result.report["failed"]
    assert result.code == 1  # the two certificates Block admits find no room: left out, nothing failed
    assert result.counts["left_out"] == 2
    assert {item["type"] for item in result.report["left_out_items"]} == {"CertificateThumbprint"}
    held = tool.held()
    passive = {("FileSha1", "bbf3f14daad62c6cbba660465fdbc6f11d75d5a8"), ("IpAddress", "179.43.187.30")}
    assert {(t, v) for t, v, _ in held} == tool.owned_keys() and len(held) == SAMPLE_COUNT  # one per value
    assert {(t, v) for t, v, a in held if a != "Block"} == passive
    # 28 values change action; the 6 tagged course-of-action:active were Block already. Two
    # replacements took the two free slots; the other 26 deleted their old indicator first.
    assert result.counts["created"] == result.counts["deleted"] == 28
    assert "delete first, no room to replace in place (26)" in (tool.tmp / "misp2defender.log").read_text()
    # The slots are free again once the old indicators are gone: the certificates land next time.
    again = tool.run(defender_action="Block", defender_max_indicators=38)
    assert again.code == 0 and again.counts["created"] == 2 and again.counts["deleted"] == 0
    settled = tool.run(defender_action="Block", defender_max_indicators=38)
    assert settled.code == 0 and settled.counts["created"] == settled.counts["deleted"] == 0


# --- 9. OTX exclusion before the cap --------------------------------------------------------------

def test_values_known_to_otx_give_their_slots_to_the_next_in_line(tool: Tool, pki) -> None:
    known = {"46.101.155.38", "evil-domain.top", "194.87.31.12"}  # event 01: High, first in line
    with serving(OtxStandIn(pki, key="otx-key-for-the-cap-test", known=known)) as otx:
        result = tool.run(defender_max_indicators=30, exclude_if_in_alienvault=True,
                          otx_alienvault_api="otx-key-for-the-cap-test", otx_alienvault_url=otx.url)
    assert result.counts["created"] == 30  # the room is filled in this run
    assert not known & {v for _, v, _ in tool.held()}
    assert result.report["skipped_by_reason"]["known in AlienVault OTX"] == 3
    assert result.counts["left_out"] == SAMPLE_COUNT - 3 - 30


# --- 10. File-system errors are config errors ------------------------------------------------------

@pytest.mark.parametrize("key", ["log_file", "lock_file", "log_json_file"])
def test_a_path_in_a_missing_directory_stops_the_run_before_any_call(tool: Tool, key: str) -> None:
    result = tool.run(**{key: str(tool.tmp / "missing" / "file")})
    assert result.code == 2
    assert f"config key {key}" in result.stderr and "does not exist" in result.stderr
    assert result.stderr.count("Traceback") == 0
    assert tool.misp.calls() == [] and tool.entra.calls() == [] and tool.defender.calls() == []


def test_a_report_path_that_is_a_directory_stops_the_run_before_any_call(tool: Tool) -> None:
    config = tool.config()
    code = m2d.main(["--config", str(config), "--report", str(tool.tmp)])
    assert code == 2
    assert tool.misp.calls() == [] and tool.defender.calls() == []


def test_check_reports_an_unwritable_log_path(tool: Tool) -> None:
    result = tool.run("--check", log_file=str(tool.tmp / "nowhere" / "m2d.log"))
    assert result.code == 2
    assert "✗ files: config key log_file" in result.stdout


# --- 11. Exit 2 means nothing changed -----------------------------------------------------------

def test_a_run_that_fails_after_writing_exits_1_not_2(tool: Tool) -> None:
    def entra_goes_down() -> None:
        tool.entra.expire_all_tokens()
        tool.entra.inject("token", status=503, times=1000)

    tool.defender.after("import", 1, entra_goes_down)
    result = tool.run(max_indicators_per_query=10, max_retries=1)
    assert result.counts["created"] == 10
    assert result.report["fatal"] and result.code == 1


# --- 12. Errors are classified by type, not by text ----------------------------------------------

def test_a_misp_error_mentioning_403_is_not_taken_for_a_rejected_key(tool: Tool) -> None:
    tool.misp.inject("me", status=500, body={"name": "Error 403 in module 4031", "message": "upstream 401/403",
                                             "url": "/users/view/me"}, times=1000)
    result = tool.run(max_retries=2)
    assert result.code == 2
    assert "rejected the API key" not in result.stderr
    assert "failed after 3 attempts" in result.stderr
    assert len(tool.misp.calls("me")) >= 3  # retried, as a server error is


# --- 13. Certificate failures are not "unreachable" ----------------------------------------------

def test_an_untrusted_misp_certificate_says_how_to_trust_it(tool: Tool, pki, monkeypatch) -> None:
    events = MispStandIn.from_directory(Path(__file__).parent / "data", recursive=False, key=MISP_KEY, pki=pki)
    with serving(events) as https_misp:
        tool.defaults["misp_domain"] = https_misp.url + "/"
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        result = tool.run(misp_verifycert=True)
        assert result.code == 2
        assert "CERTIFICATE_VERIFY_FAILED" in result.stderr and "misp_verifycert" in result.stderr
        assert "unreachable" not in result.stderr
        check = tool.run("--check", misp_verifycert=True)
        assert "✗ MISP: the TLS certificate" in check.stdout and "misp_verifycert" in check.stdout


def test_an_untrusted_microsoft_certificate_points_at_requests_ca_bundle(tool: Tool, monkeypatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    result = tool.run()
    assert result.code == 2
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr and "REQUESTS_CA_BUNDLE" in result.stderr
    assert tool.entra.calls() == [] and tool.defender.calls() == []


# --- 14. Redaction never mangles output ---------------------------------------------------------------

def test_a_short_secret_is_a_warning_and_every_json_output_stays_valid(tool: Tool, pki) -> None:
    with serving(OtxStandIn(pki, key="true", known=set())) as otx:
        result = tool.run("-v", exclude_if_in_alienvault=True, otx_alienvault_api="true", otx_alienvault_url=otx.url,
                          write_parsed_indicators=True)
    assert result.code == 0, result.stderr
    assert "otx_alienvault_api is shorter than 8 characters" in result.stderr
    report = json.loads((tool.tmp / f"report{tool.runs}.json").read_text())
    assert report["dry_run"] is False  # "false"/"true" inside the JSON are not touched
    parsed = json.loads((tool.tmp / "misp2defender_indicators.json").read_text())
    assert all(item["generateAlert"] is True for item in parsed)
    for line in (tool.tmp / "defender.jsonl").read_text().splitlines():
        json.loads(line)


def test_redaction_units() -> None:
    secrets = ["s3cr3t-value-long", "ab1", 'quo"te\\back-long']
    assert m2d.redact("x s3cr3t-value-long y", secrets) == "x [REDACTED] y"
    assert m2d.redact("ab1 tab1e ab12", secrets) == "[REDACTED] tab1e ab12"  # short: whole words only
    assert m2d.redact("Cookie: MISP-7a=deadbeef; path=/", []) == "Cookie: [REDACTED]"
    assert m2d.redact("{'Cookie': 'MISP-7a=deadbeef'}", []) == "{'Cookie': '[REDACTED]'}"
    document = {"note": 'has quo"te\\back-long inside', "flag": True, "ab1": ["ab1", "xab1"]}
    text = json.dumps(m2d.redact_data(document, secrets))
    assert json.loads(text) == {"note": "has [REDACTED] inside", "flag": True, "[REDACTED]": ["[REDACTED]", "xab1"]}


# --- 15. Timestamps as Defender writes them -----------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("2026-12-02T10:00:00Z", 1796205600.0),
    ("2026-12-02T10:00:00.5Z", 1796205600.5),
    ("2026-12-02T10:00:00.1234567Z", 1796205600.1234567),
    ("2026-12-02T10:00:00.123+00:00", 1796205600.123),
    ("2026-12-02T12:00:00.1234567+02:00", 1796205600.1234567),
    ("2026-12-02T10:00:00", 1796205600.0),
    ("2026-12-02 10:00:00.12Z", 1796205600.12),
    ("2026-12-02T05:30:00-0430", 1796205600.0),
])
def test_times_parse_with_any_fraction_and_zone(text: str, expected: float) -> None:
    assert m2d.parse_time(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01T00:00:00Z", "2026-12-02T25:00:00Z", None, 5])
def test_non_times_are_none(text) -> None:
    assert m2d.parse_time(text) is None


@pytest.mark.parametrize("digits,offset", [(7, "Z"), (1, "+00:00"), (7, "+02:00"), (3, "-04:30")])
def test_expiry_refresh_works_whatever_fraction_and_zone_defender_prints(tool: Tool, digits: int,
                                                                         offset: str) -> None:
    from tests.standins.defender import TimestampStyle

    tool.defender.timestamp_style = TimestampStyle(digits=digits, offset=offset)
    assert tool.run().code == 0
    steady = tool.run()
    assert steady.code == 0 and steady.counts["updated"] == 0  # the times read back as written
    [target] = [i for i in tool.defender.owned_by(TEST_CLIENT_ID) if i["indicatorValue"] == "185.225.17.88"]
    tomorrow = time.time() + 86400
    target["expirationTime"] = time.strftime("%Y-%m-%dT%H:%M:%S.1234567Z", time.gmtime(tomorrow))
    result = tool.run()
    assert result.code == 0 and result.counts["updated"] == 1


def test_times_parse_on_python_3_10_too() -> None:
    """Python 3.10's fromisoformat rejects 7 digits, 1 digit and Z: the script must not depend on it."""
    import shutil
    import subprocess

    candidates = [shutil.which("python3.10"), *map(str, Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))]
    working = [c for c in candidates if c and subprocess.run([c, "-c", "pass"], capture_output=True).returncode == 0]
    if not working:
        pytest.skip("no python3.10 on this machine")
    python310 = working[0]
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import misp2defender as m; "
              "print([m.parse_time(t) for t in sys.argv[2:]])")
    texts = ["2026-12-02T10:00:00.1234567Z", "2026-12-02T10:00:00.5Z", "2026-12-02T12:00:00.12+02:00"]
    done = subprocess.run([python310, "-c", script, str(Path(m2d.__file__).parent), *texts],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [round(v, 4) for v in eval(done.stdout)] == [1796205600.1235, 1796205600.5, 1796205600.12]


# --- Found in review: partial views, case, doubled listings, deadlines, odd filters ------------------

SHARED_C2 = ("DomainName", "shared-c2.top")


def c2_event(uuid: str, tags: list[str], when: int | None = None) -> dict:
    stamps = {} if when is None else {"timestamp": str(when), "publish_timestamp": str(when)}
    return {"Event": {"uuid": uuid, "info": f"event {uuid[:8]}", "published": True, **stamps,
                      "Tag": [{"name": 'workflow:state="complete"'}, *({"name": t} for t in tags)],
                      "Attribute": [{"uuid": uuid[:-1] + "9", "type": "domain", "category": "Network activity",
                                     "to_ids": True, "value": SHARED_C2[1], **({"timestamp": str(when)} if when
                                                                              else {})}]}}


DENY, ALERT_ONLY = "71000000-0000-4000-8000-000000000001", "72000000-0000-4000-8000-000000000001"


@pytest.mark.parametrize("partial_view", ["time window", "--event"])
def test_a_partial_view_never_downgrades_what_an_unread_event_still_asks_for(tool: Tool, partial_view: str) -> None:
    now = int(time.time())
    tool.misp.add_event(c2_event(DENY, ['course-of-action:active="deny"'], now - 10 * 86400))  # Block, old
    tool.misp.add_event(c2_event(ALERT_ONLY, [], now - 60))  # Audit, just published
    assert tool.run("--full-sync").code == 0
    assert (*SHARED_C2, "Block") in tool.held()
    if partial_view == "time window":  # the deny event is outside the window: only the Audit one is read
        result = tool.run(misp_event_filters={**TEST_FILTERS, "publish_timestamp": "2d"})
    else:
        result = tool.run("--event", ALERT_ONLY)
    assert result.code == 0, result.stderr
    assert {h for h in tool.held() if h[1] == SHARED_C2[1]} == {(*SHARED_C2, "Block")}
    assert tool.defender.calls("batch_delete") == [] and tool.defender.calls("delete") == []
    assert tool.misp.calls("attributes"), "the whole selection was asked about the value"
    tool.misp.untag_event(DENY, 'course-of-action:active="deny"')  # now the whole selection says Audit
    tool.misp.publish(DENY)
    assert tool.run("--event", DENY).code == 0
    assert {h for h in tool.held() if h[1] == SHARED_C2[1]} == {(*SHARED_C2, "Audit")}


def test_an_expiry_refresh_from_a_partial_view_needs_no_question_to_misp(tool: Tool) -> None:
    # Only the action, severity and title depend on which events say so; a later expiry only extends.
    lifetimes = {"days_to_expire_mapping": {}, "days_to_expire_start": "current_date"}
    assert tool.run("--full-sync", days_to_expire=2, **lifetimes).code == 0
    windowed = {**TEST_FILTERS, "publish_timestamp": "36500d"}
    result = tool.run(days_to_expire=60, misp_event_filters=windowed, **lifetimes)
    assert result.code == 0, result.stderr
    assert result.counts["updated"] == SAMPLE_COUNT
    assert tool.misp.calls("attributes") == []


def test_a_run_without_a_time_window_sees_the_whole_selection(tool: Tool) -> None:
    # The filters select the same events as a full sync: a change needs no question to MISP.
    assert tool.run().code == 0
    result = tool.run(defender_severity="High")
    assert result.code == 0, result.stderr
    assert result.counts["updated"] > 0
    assert tool.misp.calls("attributes") == []
    windowed = tool.run(defender_severity="Low", misp_event_filters={**TEST_FILTERS, "publish_timestamp": "36500d"})
    assert windowed.code == 0 and windowed.counts["updated"] > 0
    assert tool.misp.calls("attributes"), "a time window sees the selection in part: MISP is asked"


def test_an_action_change_waits_for_a_complete_read(tool: Tool) -> None:
    assert tool.run("--full-sync").code == 0
    before = tool.held()
    assert {a for _, _, a in before} >= {"Audit"}
    tool.misp.fail_page(2, status=500, times=20)
    result = tool.run("--full-sync", defender_action="Block", misp_event_limit_per_page=2)
    assert result.code == 1
    assert tool.defender.calls("batch_delete") == [] and tool.defender.calls("delete") == []
    assert before <= tool.held()  # nothing replaced from a partial read (new values may come)
    assert result.report["kept_by_reason"]["action change withheld: MISP was read only in part"] > 0


def test_a_create_never_lands_on_a_foreign_url_that_differs_only_in_case(tool: Tool) -> None:
    upper = "http://cdn-update-check.top/WP-CONTENT/plugins/wpx-cache/loader.php"  # ours is lower-case
    ids = tool.defender.seed([{"indicatorType": "Url", "indicatorValue": upper, "action": action, "title": "theirs",
                               "description": "theirs", "severity": "Low", "expirationTime": None}
                              for action in ("Audit", "Block")], created_by="another-app", application="OpenCTI")
    theirs = snapshot(tool, ids)
    result = tool.run()
    assert result.code == 0, result.stderr
    assert snapshot(tool, ids) == theirs
    sent = [i["indicatorValue"].lower() for c in tool.defender.calls("import") for i in c.body["Indicators"]]
    assert upper.lower() not in sent


def test_an_indicator_listed_twice_is_neither_deleted_nor_doubled(tool: Tool) -> None:
    assert tool.run().code == 0
    held = tool.defender.active()
    tool.defender.inject("list", status=200, body={"value": [*held, held[0]]})  # $skip paging over a list that moved
    result = tool.run("--full-sync")
    assert result.code == 0, result.stderr
    assert tool.defender.calls("batch_delete") == [] and tool.defender.calls("delete") == []
    assert tool.owned_keys() == SAMPLE_KEYS


def test_otx_lookups_stop_at_max_run_seconds(tool: Tool, otx: OtxStandIn) -> None:
    otx.latency = 0.4
    started = time.monotonic()
    result = tool.run(exclude_if_in_alienvault=True, otx_alienvault_api=OTX_KEY, otx_alienvault_url=otx.url,
                      otx_max_workers=1, max_run_seconds=2)
    assert result.code == 1
    assert len(otx.calls("lookup")) < 10  # 36 to look up at 0.4 s each: the deadline stopped them
    assert time.monotonic() - started < 30  # (a generous bound: without the deadline this takes 15 s or more)


def test_a_to_ids_filter_does_not_break_the_value_check(tool: Tool) -> None:
    filters = {**TEST_FILTERS, "to_ids": 1}
    assert tool.run(misp_event_filters=filters).code == 0
    tool.misp.remove_event(EVENT_01)  # event 01 gone: its values are stale
    result = tool.run("--full-sync", misp_event_filters=filters, remove_guard_percent=100)
    assert result.code == 0, result.stderr
    assert result.counts["deleted"] > 0


def test_without_check_if_already_in_defender_no_foreign_indicator_is_overwritten(tool: Tool) -> None:
    theirs_item = {"indicatorType": "DomainName", "indicatorValue": "office-docs-share.xyz", "action": "Audit",
                   "title": "theirs", "description": "theirs", "severity": "Low", "expirationTime": None}
    [their_id] = tool.defender.seed([theirs_item], created_by="another-app", application="OpenCTI")
    theirs = snapshot(tool, [their_id])
    assert tool.run(check_if_already_in_defender=False).code == 0
    assert snapshot(tool, [their_id]) == theirs
    assert tool.owned_keys() == SAMPLE_KEYS - {("DomainName", "office-docs-share.xyz")}
    again = tool.run("--full-sync", check_if_already_in_defender=False, defender_severity="High")
    assert again.code == 0 and again.counts["updated"] == again.counts["deleted"] == 0


def domain_event(uuid: str, value: str, in_object: bool) -> dict:
    attribute = {"uuid": uuid[:-1] + "9", "type": "domain", "category": "Network activity", "to_ids": True,
                 "value": value}
    where = ({"Object": [{"name": "domain-ip", "meta-category": "network", "template_version": "9",
                          "template_uuid": "43b3b146-77eb-4931-b4cc-b66c60f28734",
                          "Attribute": [{**attribute, "object_relation": "domain"}]}], "Attribute": []}
             if in_object else {"Attribute": [attribute]})
    return {"Event": {"uuid": uuid, "info": f"event {uuid[:8]}", "published": True,
                      "Tag": [{"name": 'workflow:state="complete"'}], **where}}


def test_the_value_check_reads_objects_only_when_the_read_does(tool: Tool) -> None:
    loose, boxed = "90000000-0000-4000-8000-000000000001", "91000000-0000-4000-8000-000000000001"
    tool.misp.add_event(domain_event(loose, "only-in-object.top", in_object=False))
    tool.misp.add_event(domain_event(boxed, "only-in-object.top", in_object=True))
    assert tool.run("--full-sync", misp_flatten_attributes=False).code == 0
    assert ("DomainName", "only-in-object.top") in tool.owned_keys()
    tool.misp.remove_event(loose)  # what is left is inside an object, which this config does not read
    result = tool.run("--full-sync", misp_flatten_attributes=False)
    assert result.code == 0, result.stderr
    assert ("DomainName", "only-in-object.top") not in tool.owned_keys()


def test_a_write_whose_answer_was_lost_still_means_something_changed(tool: Tool) -> None:
    assert tool.run().code == 0
    tool.misp.remove_event(EVENT_01)
    tool.defender.inject("batch_delete", delay=2.0, times=1)  # lands after the client gave up waiting
    tool.defender.inject("import", status=401, times=1)  # a new token is needed, and Entra is down
    tool.entra.inject("token", status=503, times=1000, skip=1)
    result = tool.run("--full-sync", remove_guard_percent=100, defender_severity="High", max_retries=0,
                      request_timeout=1)
    assert result.report["fatal"] and result.report["counts"]["deleted"] == 0
    assert wait_for(lambda: len(tool.owned_keys()) < SAMPLE_COUNT), "the BatchDelete landed"
    assert result.code == 1, "a BatchDelete was sent: Defender may have changed, so not 2"


def test_a_write_defender_refused_outright_still_means_nothing_changed(tool: Tool) -> None:
    tool.defender.inject("import", status=403, times=10)  # an app that may read but not write
    result = tool.run()
    assert result.report["fatal"] and result.counts["created"] == 0
    assert result.code == 2, "Defender refused every write: nothing changed"


def test_check_names_an_untrusted_otx_certificate(tool: Tool, tmp_path: Path) -> None:
    from tests.standins.tls import make_test_pki

    with serving(OtxStandIn(make_test_pki(tmp_path / "other-ca"), key=OTX_KEY)) as otx:
        check = tool.run("--check", exclude_if_in_alienvault=True, otx_alienvault_api=OTX_KEY,
                         otx_alienvault_url=otx.url)
    [line] = [line for line in check.stdout.splitlines() if "✗ OTX" in line]
    assert "CERTIFICATE_VERIFY_FAILED" in line and "unreachable" not in line
    assert "REQUESTS_CA_BUNDLE" in check.stdout


def test_a_short_sightings_key_is_a_config_warning(tool: Tool) -> None:
    settings = m2d.build_settings({"misp_domain": "https://misp.example", "misp_key": "k" * 40,
                                   "sightings_misp_key": "abc", "dry_run": True}, environ={})
    assert any("sightings_misp_key is shorter than" in note for note in settings.notes)
