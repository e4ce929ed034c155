"""Mapping: MISP attribute → Defender indicator, as pure functions. Expected values written by hand."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.util import m2d, make_settings

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc).timestamp()
DAY = 86400.0
EVENT = m2d.EventContext(id="12", uuid="5f0c2a3e-1111-4a2b-9c3d-000000000012", info="Emotet C2 update",
                         tags=frozenset({'workflow:state="complete"'}), timestamp=NOW - 3600)


def attribute(type_: str, value: object, **extra: object) -> dict:
    return {"uuid": "a-1", "type": type_, "value": value, "to_ids": True, "deleted": False,
            "category": "Network activity", "comment": "", "timestamp": str(int(NOW - 7200)), **extra}


def outcomes(attr: object, event: m2d.EventContext = EVENT, **config: object) -> list[m2d.Outcome]:
    return m2d.map_attribute(attr, event, make_settings(**config), NOW)


def kind(result: object) -> str:
    """What mapping made of a value: "candidate", or the Outcome's kind."""
    return "candidate" if isinstance(result, m2d.Candidate) else result.kind  # type: ignore[attr-defined]


def only_key(attr: dict, **config: object) -> tuple[str, str]:
    [result] = outcomes(attr, **config)
    assert isinstance(result, m2d.Candidate), result
    return result.key


@pytest.mark.parametrize("misp_type, value, expected", [
    ("md5", "D41D8CD98F00B204E9800998ECF8427E", ("FileMd5", "d41d8cd98f00b204e9800998ecf8427e")),
    ("sha1", " da39a3ee5e6b4b0d3255bfef95601890afd80709 ", ("FileSha1", "da39a3ee5e6b4b0d3255bfef95601890afd80709")),
    ("sha256", "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
     ("FileSha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")),
    ("filename|md5", "invoice.exe|d41d8cd98f00b204e9800998ecf8427e", ("FileMd5", "d41d8cd98f00b204e9800998ecf8427e")),
    ("filename|sha256", "a|b.exe|e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", None),
    ("malware-sample", "x.zip|d41d8cd98f00b204e9800998ecf8427e", ("FileMd5", "d41d8cd98f00b204e9800998ecf8427e")),
    ("ip-dst", "185.220.101.4", ("IpAddress", "185.220.101.4")),
    ("ip-src", "45.9.148[.]99", ("IpAddress", "45.9.148.99")),
    ("ip-dst|port", "91.215.85.14|443", ("IpAddress", "91.215.85.14")),
    ("ip-dst|port", "2a03:2880:f12f:83:face:b00c::25de|443",
     ("IpAddress", "2a03:2880:f12f:83:face:b00c:0:25de")),
    ("ip-dst", "2001:4860:4860::8888", ("IpAddress", "2001:4860:4860:0:0:0:0:8888")),
    ("domain", "EVIL-Domain.top.", ("DomainName", "evil-domain.top")),
    ("domain", "bad[.]site", ("DomainName", "bad.site")),
    ("domain", "*.tracker-cdn.top", ("DomainName", "tracker-cdn.top")),
    ("hostname", "bücher-update.top", ("DomainName", "xn--bcher-update-dlb.top")),  # checked with the idna package
    ("hostname|port", "mail.login-verify.xyz|8443", ("DomainName", "mail.login-verify.xyz")),
    ("url", "hxxp://bad[.]site/path?q=1", ("Url", "http://bad.site/path?q=1")),
    ("url", "HTTPS://Login-Verify.XYZ/Account/Reset", ("Url", "https://login-verify.xyz/Account/Reset")),
    ("url", "cdn-update-check.top/dl/payload.bin", ("Url", "cdn-update-check.top/dl/payload.bin")),
    ("url", "https://admin:hunter2@Panel.Bad.Site:8443/x#frag", ("Url", "https://panel.bad.site:8443/x#frag")),
    ("url", "http://[2001:4860:4860::8888]:80/a", ("Url", "http://[2001:4860:4860:0:0:0:0:8888]:80/a")),
    ("url", "http://185.220.101.4/gate.php", ("Url", "http://185.220.101.4/gate.php")),
    ("x509-fingerprint-sha1", "DA:39:A3:EE:5E:6B:4B:0D:32:55:BF:EF:95:60:18:90:AF:D8:07:09",
     ("CertificateThumbprint", "da39a3ee5e6b4b0d3255bfef95601890afd80709")),
])
def test_type_and_value_normalisation(misp_type: str, value: str, expected: tuple[str, str] | None) -> None:
    if expected is None:  # a composite with two pipes is refused, not guessed at
        [result] = outcomes(attribute(misp_type, value), defender_action="Block")
        assert result.kind == "rejected" and "exactly one" in result.reason
        return
    assert only_key(attribute(misp_type, value), defender_action="Block") == expected


@pytest.mark.parametrize("misp_type, value, reason_part", [
    ("ip-dst", "10.1.2.3", "private"),
    ("ip-dst", "127.0.0.1", "private"),
    ("ip-dst", "169.254.1.1", "private"),
    ("ip-dst", "224.0.0.5", "private"),
    ("ip-dst", "192.0.2.10", "private"),  # documentation range: not global
    ("ip-src", "185.220.101.0/24", "CIDR"),
    ("ip-src", "1.2.3.4-1.2.3.9", "range"),
    ("ip-dst", "999.1.1.1", "not a valid IP"),
    ("ip-dst|port", "10.0.0.1|80", "private"),
    ("ip-dst|port", "91.215.85.14", "exactly one"),
    ("md5", "d41d8cd98f00b204e9800998ecf8427", "32 hex"),
    ("md5", "z41d8cd98f00b204e9800998ecf8427e", "32 hex"),
    ("sha1", "da39a3ee 5e6b4b0d3255bfef95601890afd80709", "40 hex"),
    ("sha256", "", "empty"),
    ("domain", "   ", "empty"),
    ("domain", "185.220.101.4", "IP address"),
    ("domain", "localhost", "valid domain"),
    ("domain", "-bad-.top", "valid domain"),
    ("url", "http://bad site/x", "spaces"),
    ("url", "javascript://alert(1)", "scheme"),
    ("url", "http://10.0.0.8/admin", "private"),
    ("url", "http://bad.site:99999/", "bad port"),
    ("url", "http:///path-only", "empty domain"),
    ("ip-dst", "01.2.3.4", "not a valid IP"),
])
def test_values_defender_would_refuse_are_rejected_with_a_reason(misp_type: str, value: str,
                                                                 reason_part: str) -> None:
    [result] = outcomes(attribute(misp_type, value))
    assert result.kind == "rejected"
    assert reason_part.lower() in result.reason.lower()
    assert result.detail["value"] == value


def test_domain_ip_yields_both_indicators_and_keeps_the_good_half() -> None:
    both = outcomes(attribute("domain|ip", "c2.cdn-update-check.top|91.215.85.14"))
    assert [o.key for o in both] == [("DomainName", "c2.cdn-update-check.top"),
                                               ("IpAddress", "91.215.85.14")]
    half = outcomes(attribute("domain|ip", "c2.cdn-update-check.top|10.0.0.1"))
    assert [kind(o) for o in half] == ["candidate", "rejected"]


@pytest.mark.parametrize("attr, reason", [
    (attribute("md5", "d41d8cd98f00b204e9800998ecf8427e", to_ids=None), "to_ids is not set"),
    (attribute("filename", "invoice.exe"), "type filename has no Defender indicator type"),
    (attribute("sha512", "ab" * 64), "type sha512 has no Defender indicator type"),
    ({"value": "x"}, "attribute has no type"),
    ("not a dict", "attribute is not an object"),
])
def test_skips_carry_a_reason(attr: object, reason: str) -> None:
    [result] = outcomes(attr)
    assert (result.kind, result.reason) == ("skipped", reason)


def test_to_ids_off_and_soft_deleted_attributes_become_retractions() -> None:
    [off] = outcomes(attribute("domain", "Evil-Domain.top", to_ids=False))
    [gone] = outcomes(attribute("domain", "evil-domain.top", deleted=True))
    assert (off.kind, off.key, off.reason) == ("retraction", ("DomainName", "evil-domain.top"), "to_ids turned off")
    assert (gone.kind, gone.reason) == ("retraction", "deleted in MISP")


def test_indicator_json_fields() -> None:
    attr = attribute("ip-dst", "185.220.101.4", comment="beacon every 60 s", category="Network activity")
    [result] = outcomes(attr)
    settings = make_settings(defender_rbac_group_names=["Servers"])
    assert m2d.indicator_json(result, settings) == {
        "indicatorValue": "185.220.101.4",
        "indicatorType": "IpAddress",
        "action": "Audit",
        "application": "MISP",
        "title": "Emotet C2 update",
        "description": "MISP event 12 (5f0c2a3e-1111-4a2b-9c3d-000000000012), attribute ip-dst/Network activity: "
                       "beacon every 60 s",
        "severity": "Medium",
        "recommendedActions": "Block",
        "generateAlert": True,
        # valid_from = attribute timestamp (NOW - 2 h) + 90 days for IpAddress
        "expirationTime": "2027-02-26T10:00:00Z",
        "rbacGroupNames": ["Servers"],
    }


@pytest.mark.parametrize("config, misp_type, expected_days", [
    ({}, "ip-dst", 90),
    ({}, "sha256", 99999),
    ({}, "url", 365),
    ({"days_to_expire_mapping": {}}, "url", 50),
    ({"days_to_expire": 20, "days_to_expire_mapping": {"IpAddress": 10}}, "domain", 20),
])
def test_expiry_per_type_from_valid_from(config: dict, misp_type: str, expected_days: int) -> None:
    value = {"ip-dst": "185.220.101.4", "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
             "url": "http://bad.site/x", "domain": "bad.site"}[misp_type]
    [result] = outcomes(attribute(misp_type, value), **config)
    assert result.expiration == (NOW - 7200) + expected_days * DAY


def test_expiry_starts_at_first_seen_or_now() -> None:
    attr = attribute("ip-dst", "185.220.101.4", first_seen="2026-11-01T00:00:00.000000+00:00")
    [from_first_seen] = outcomes(attr)
    first_seen = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc).timestamp()
    assert from_first_seen.expiration == first_seen + 90 * DAY
    [from_now] = outcomes(attr, days_to_expire_start="current_date")
    assert from_now.expiration == NOW + 90 * DAY


def test_tlp_clear_or_white_on_event_or_attribute_expires_sooner() -> None:
    tagged = attribute("ip-dst", "185.220.101.4", Tag=[{"name": "tlp:clear"}])
    [on_attribute] = outcomes(tagged, days_to_expire_start="current_date")
    assert on_attribute.expiration == NOW + 7 * DAY
    white_event = m2d.EventContext("1", "u", "info", frozenset({"tlp:white"}), NOW)
    [on_event] = m2d.map_attribute(attribute("ip-dst", "185.220.101.4"), white_event,
                                   make_settings(days_to_expire_start="current_date"), NOW)
    assert on_event.expiration == NOW + 7 * DAY


def test_last_seen_sets_expiry_unless_ignored() -> None:
    attr = attribute("ip-dst", "185.220.101.4", last_seen="2026-12-24T00:00:00+00:00")
    christmas = dt.datetime(2026, 12, 24, tzinfo=dt.timezone.utc).timestamp()
    [honoured] = outcomes(attr, days_to_expire_ignore_misp_last_seen=False)
    assert honoured.expiration == christmas
    [ignored] = outcomes(attr)
    assert ignored.expiration == (NOW - 7200) + 90 * DAY
    stale = attribute("ip-dst", "185.220.101.4", last_seen="2026-01-01T00:00:00+00:00")
    [expired] = outcomes(stale, days_to_expire_ignore_misp_last_seen=False)
    assert (expired.kind, expired.reason) == ("skipped", "already expired")


def test_already_expired_indicators_are_not_pushed() -> None:
    old = attribute("ip-dst", "185.220.101.4", timestamp=str(int(NOW - 100 * DAY)))
    [result] = outcomes(old)
    assert (result.kind, result.reason) == ("skipped", "already expired")


@pytest.mark.parametrize("attribute_tags, event_tags, expected", [
    ([], [], ("Audit", "Medium")),
    (['course-of-action:active="deny"'], [], ("Block", "Medium")),
    (['course-of-action:passive="detect"'], ['course-of-action:active="deny"'], ("Audit", "Medium")),
    ([], ['course-of-action:active="disrupt"'], ("Block", "Medium")),
    (['misp:threat-level="high-risk"'], [], ("Audit", "High")),
    ([], ['misp:threat-level="low-risk"'], ("Audit", "Low")),
    (['misp:threat-level="no-risk"'], ['misp:threat-level="high-risk"'], ("Audit", "Informational")),
])
def test_tags_override_action_and_severity(attribute_tags: list, event_tags: list, expected: tuple) -> None:
    event = m2d.EventContext("1", "u", "info", frozenset(event_tags), NOW)
    attr = attribute("domain", "bad.site", Tag=[{"name": t} for t in attribute_tags])
    [result] = m2d.map_attribute(attr, event, make_settings(), NOW)
    assert (result.action, result.severity) == expected


@pytest.mark.parametrize("indicator_type, wanted, expected", [
    ("DomainName", "BlockAndRemediate", ("Block", False)),
    ("FileSha256", "BlockAndRemediate", ("BlockAndRemediate", False)),
    ("FileSha256", "Alert", ("Audit", True)),
    ("Url", "AlertAndBlock", ("Block", True)),
    ("IpAddress", "Audit", ("Audit", True)),
    ("CertificateThumbprint", "Block", ("BlockAndRemediate", False)),
    ("CertificateThumbprint", "Allowed", ("Allowed", False)),
])
def test_actions_valid_for_each_type(indicator_type: str, wanted: str, expected: tuple) -> None:
    assert m2d.action_for(indicator_type, wanted) == expected


def test_audit_certificate_is_rejected_rather_than_turned_into_a_block() -> None:
    [result] = outcomes(attribute("x509-fingerprint-sha1", "da39a3ee5e6b4b0d3255bfef95601890afd80709"))
    assert result.kind == "rejected" and "Allowed or BlockAndRemediate" in result.reason


def test_audit_always_generates_an_alert() -> None:
    [result] = outcomes(attribute("domain", "bad.site"))
    item = m2d.indicator_json(result, make_settings(defender_generate_alert=False))
    assert (item["action"], item["generateAlert"]) == ("Audit", True)


def test_vetted_only_events_keep_only_vetted_attributes() -> None:
    event = m2d.EventContext("4", "u", "vetted feed", frozenset({'curation:source="MISP-TEST"'}), NOW)
    vetted = attribute("domain", "bad.site", Tag=[{"name": 'course-of-action:active="deny"'}])
    unvetted = attribute("domain", "other-bad.site")
    settings = make_settings()
    [kept] = m2d.map_attribute(vetted, event, settings, NOW)
    [dropped] = m2d.map_attribute(unvetted, event, settings, NOW)
    assert kind(kept) == "candidate" and kept.action == "Block"
    assert (dropped.kind, dropped.reason) == ("skipped", "event needs vetted attributes; attribute not vetted")
    # The same unvetted attribute in an ordinary event is taken.
    [ordinary] = m2d.map_attribute(unvetted, EVENT, settings, NOW)
    assert kind(ordinary) == "candidate"


def test_duplicates_keep_strongest_severity_then_latest_expiry() -> None:
    low = m2d.EventContext("1", "u1", "low", frozenset({'misp:threat-level="low-risk"'}), NOW)
    high = m2d.EventContext("2", "u2", "high", frozenset({'misp:threat-level="high-risk"'}), NOW)
    sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    events = [{"id": "2", "uuid": "u2", "info": "high", "Tag": [{"name": t} for t in high.tags],
               "Attribute": [attribute("sha256", sha)]},
              {"id": "1", "uuid": "u1", "info": "low", "Tag": [{"name": t} for t in low.tags],
               "Attribute": [attribute("sha256", sha.upper())]}]
    desired = m2d.collect(events, make_settings(), NOW)
    assert desired.duplicates == 1
    [(key, chosen)] = desired.candidates.items()
    assert key == ("FileSha256", sha) and (chosen.severity, chosen.event_id) == ("High", "2")


def test_a_value_retracted_in_one_attribute_but_carried_by_another_is_not_retracted() -> None:
    events = [{"id": "1", "uuid": "u", "info": "i", "Attribute": [
        attribute("domain", "bad.site", to_ids=False), attribute("hostname", "BAD.site"),
        attribute("domain", "gone.site", deleted=True)]}]
    desired = m2d.collect(events, make_settings(), NOW)
    assert set(desired.candidates) == {("DomainName", "bad.site")}
    assert desired.retractions == {("DomainName", "gone.site"): "deleted in MISP"}


def test_object_attributes_are_flattened_only_when_configured() -> None:
    event = {"id": "1", "uuid": "u", "info": "i", "Attribute": [attribute("domain", "bad.site")],
             "Object": [{"name": "file", "Attribute": [attribute("md5", "d41d8cd98f00b204e9800998ecf8427e")]}]}
    assert len(m2d.collect([event], make_settings(), NOW).candidates) == 2
    assert len(m2d.collect([event], make_settings(misp_flatten_attributes=False), NOW).candidates) == 1


def test_the_fast_ipv4_table_agrees_with_ipaddress() -> None:
    import ipaddress
    import random

    def reference(number: int) -> bool:
        address = ipaddress.IPv4Address(number)
        return address.is_global and not address.is_multicast

    edges = {0, 2**32 - 1}
    for start, end in m2d._NOT_GLOBAL_V4:
        edges |= {start - 1, start, start + 1, end - 1, end, end + 1}
    samples = [n for n in edges if 0 <= n < 2**32] + [random.Random(7).getrandbits(32) for _ in range(50_000)]
    disagreements = [str(ipaddress.IPv4Address(n)) for n in samples if m2d.ipv4_is_public(n) != reference(n)]
    assert disagreements == []


@pytest.mark.parametrize("wanted, expected", [
    ("AlertAndBlock", ("Block", True)), ("Alert", ("Audit", True)), ("Audit", ("Audit", True)),
    ("Block", ("Block", False)), ("Warn", ("Warn", False)),
])
def test_legacy_alert_actions_keep_their_alert_even_when_alerts_are_off(wanted: str, expected: tuple) -> None:
    settings = make_settings(defender_action=wanted, defender_generate_alert=False)
    [result] = m2d.map_attribute(attribute("domain", "bad.site"), EVENT, settings, NOW)
    item = m2d.indicator_json(result, settings)
    assert (item["action"], item["generateAlert"]) == expected


@pytest.mark.parametrize("key, expected", [
    (("FileMd5", "d41d8cd98f00b204e9800998ecf8427e"),
     {"d41d8cd98f00b204e9800998ecf8427e", "D41D8CD98F00B204E9800998ECF8427E"}),
    (("IpAddress", "2a01:4f8:c17:2b1:0:0:0:3"), {"2a01:4f8:c17:2b1:0:0:0:3", "2a01:4f8:c17:2b1::3"}),
    (("IpAddress", "185.220.101.4"), {"185.220.101.4"}),
    (("DomainName", "bad.site"), {"bad.site", "bad.site.", "bad[.]site"}),
    (("Url", "http://bad.site/x.php"), {"http://bad.site/x.php", "http://bad[.]site/x.php",
                                        "hxxp://bad.site/x.php", "hxxp://bad[.]site/x.php"}),
    (("Url", "bad.site/x"), {"bad.site/x", "bad[.]site/x"}),
])
def test_misp_spellings_of_a_value(key: tuple[str, str], expected: set[str]) -> None:
    assert m2d.misp_spellings(*key) == expected
