"""Self-tests for the Defender stand-in's Alerts API, timestamp styles and fault knobs.

Real msal + requests over TLS, as in tests/test_standins.py: the alert reader of
misp2defender will be tested against this stand-in, so each behaviour it relies
on (filter subset, paging without nextLink, evidence expansion, quotas, roles,
retention, hostile shapes served verbatim) is pinned here.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import re
import time
from typing import Any

import msal
import pytest
import requests

from tests.standins.defender import (
    EVIDENCE_KEYS,
    INDICATOR_TYPES,
    DefenderStandIn,
    TimestampStyle,
    to_ticks,
)
from tests.standins.entra import EntraStandIn
from tests.standins.tls import PKI
from tests.util import (
    DEFENDER_SCOPE,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    serving,
)

READ_ALERTS = ("Ti.ReadWrite.All", "Alert.Read.All")
ALERT_FIELDS = {
    "id",
    "incidentId",
    "investigationId",
    "assignedTo",
    "severity",
    "status",
    "classification",
    "determination",
    "investigationState",
    "detectionSource",
    "detectorId",
    "category",
    "threatFamilyName",
    "title",
    "description",
    "alertCreationTime",
    "firstEventTime",
    "lastEventTime",
    "lastUpdateTime",
    "resolvedTime",
    "machineId",
    "computerDnsName",
    "rbacGroupName",
    "aadTenantId",
    "threatName",
    "mitreTechniques",
    "relatedUser",
    "comments",
    "evidence",
}
TIME7 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{7}Z")


class Api:
    """A requests session with a real client-credentials token from the Entra stand-in."""

    def __init__(
        self, defender: DefenderStandIn, pki: PKI, client_id: str = TEST_CLIENT_ID, secret: str = TEST_CLIENT_SECRET
    ) -> None:
        app = msal.ConfidentialClientApplication(
            client_id,
            client_credential=secret,
            authority=defender.entra.authority,
            instance_discovery=False,
            verify=str(pki.ca_path),
        )
        self.token = app.acquire_token_for_client([DEFENDER_SCOPE])["access_token"]
        self.base = defender.url
        self.session = requests.Session()
        self.session.verify = str(pki.ca_path)
        self.session.headers["Authorization"] = f"Bearer {self.token}"

    def get(self, path: str = "/api/alerts", **params: Any) -> requests.Response:
        return self.session.get(self.base + path, params=params or None, timeout=10)

    def alerts(self, **params: Any) -> list[dict[str, Any]]:
        resp = self.get(**params)
        assert resp.status_code == 200, resp.text
        return resp.json()["value"]


@pytest.fixture
def api(entra: EntraStandIn, defender: DefenderStandIn, pki: PKI) -> Api:
    """The tool's client, granted the alert role next to the indicator one."""
    entra.set_roles(TEST_CLIENT_ID, READ_ALERTS)
    return Api(defender, pki)


def ago(**delta: float) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(**delta)


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in rows]


# ---------------------------------------------------------------- test API
def test_add_alert_builds_a_complete_realistic_resource(defender: DefenderStandIn) -> None:
    alert = defender.add_alert()
    assert set(alert) == ALERT_FIELDS
    assert re.fullmatch(r"da\d{18}_-?\d{1,10}", alert["id"])
    assert alert["detectionSource"] == "CustomerTI" and alert["classification"] is None
    assert alert["determination"] is None and alert["evidence"] == [] and alert["status"] == "New"
    assert alert["aadTenantId"] == defender.entra.tenant
    for name in ("alertCreationTime", "firstEventTime", "lastEventTime", "lastUpdateTime"):
        assert TIME7.fullmatch(alert[name]), name
    created, updated = to_ticks(alert["alertCreationTime"]), to_ticks(alert["lastUpdateTime"])
    assert to_ticks(alert["firstEventTime"]) < to_ticks(alert["lastEventTime"]) < created < updated
    assert abs(int(alert["id"][2:].split("_")[0]) - created) < 10  # the id carries the creation ticks
    assert updated <= to_ticks(dt.datetime.now(dt.timezone.utc))  # never in the future

    second = defender.add_alert(title="Audit hit", alertCreationTime=dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc))
    assert second["id"] != alert["id"] and second["incidentId"] != alert["incidentId"]
    assert second["alertCreationTime"] == "2026-01-02T00:00:00.0000000Z" and second["title"] == "Audit hit"
    assert to_ticks(second["lastUpdateTime"]) > to_ticks(second["alertCreationTime"])
    with pytest.raises(ValueError, match="already exists"):
        defender.add_alert(id=second["id"])

    item = defender.evidence(entityType="Url", url="evil.example.com")
    assert tuple(item) == EVIDENCE_KEYS and item["url"] == "evil.example.com"
    assert item["detectionStatus"] is None and item["sha1"] is None and TIME7.fullmatch(item["evidenceCreationTime"])
    assert DefenderStandIn.evidence(sha1="ab" * 20)["detectionStatus"] == "Detected"  # File by default


def test_update_alert_bumps_last_update_time(defender: DefenderStandIn, api: Api) -> None:
    alert = defender.add_alert(lastUpdateTime="2099-01-01T00:00:00.1234567Z")  # even when "now" is earlier
    before = alert["lastUpdateTime"]
    defender.update_alert(alert["id"], classification="FalsePositive", determination="Clean", status="Resolved")
    assert to_ticks(alert["lastUpdateTime"]) == to_ticks(before) + 1 and alert["resolvedTime"]
    changed = api.alerts(**{"$filter": f"lastUpdateTime gt {before}"})
    assert ids(changed) == [alert["id"]] and changed[0]["classification"] == "FalsePositive"

    plain = defender.add_alert()
    old = plain["lastUpdateTime"]
    time.sleep(0.01)
    defender.update_alert(plain["id"], assignedTo="soc@contoso.com")
    assert to_ticks(plain["lastUpdateTime"]) > to_ticks(old) and plain["resolvedTime"] is None
    with pytest.raises(KeyError):
        defender.update_alert("da0_0", status="Resolved")


# ----------------------------------------------------------------- listing
def test_filter_subset_on_times_and_detection_source(defender: DefenderStandIn, api: Api) -> None:
    base = ago(days=10).date()
    d = [f"{base + dt.timedelta(days=n):%Y-%m-%d}" for n in range(4)]  # inside the retention window
    old = defender.add_alert(lastUpdateTime=f"{d[1]}T00:00:00.1234567Z", alertCreationTime=f"{d[0]}T23:00:00Z")
    offset = defender.add_alert(lastUpdateTime=f"{d[2]}T02:00:00+02:00", detectionSource="WindowsDefenderAv")
    new = defender.add_alert(lastUpdateTime=f"{d[3]}T00:00:00Z", alertCreationTime=f"{d[2]}T12:00:00Z")

    def found(text: str) -> list[str]:
        return ids(api.alerts(**{"$filter": text}))

    assert ids(api.alerts()) == sorted([old["id"], offset["id"], new["id"]])
    assert found(f"lastUpdateTime ge {d[2]}T00:00:00Z") == sorted([offset["id"], new["id"]])
    assert found(f"lastUpdateTime gt {d[2]}T00:00:00Z") == [new["id"]]  # +02:00 is the same instant
    # 100 ns precision: the 7th digit counts, so a microsecond-truncated high-water mark sees the alert again.
    assert found(f"lastUpdateTime gt {d[1]}T00:00:00.123456Z") == sorted([old["id"], offset["id"], new["id"]])
    assert old["id"] not in found(f"lastUpdateTime gt {d[1]}T00:00:00.1234567Z")
    assert found(f"lastUpdateTime ge {d[1]}T01:00:00.5+01:00") == sorted([offset["id"], new["id"]])
    assert found(f"alertCreationTime ge {d[1]}T00:00:00Z and detectionSource eq 'CustomerTI'") == [new["id"]]
    assert found("detectionSource eq 'WindowsDefenderAv'") == [offset["id"]]
    assert found("detectionSource eq 'customerti'") == []  # case-sensitive

    for bad in (
        "lastUpdateTime lt 2026-01-02T00:00:00Z",
        "lastUpdateTime ge '2026-01-02T00:00:00Z'",
        "lastUpdateTime ge 2026-01-02",
        "lastUpdateTime ge 2026-01-02T00:00:00",
        "lastUpdateTime ge 2026-13-02T00:00:00Z",
        "status eq 'New'",
        "detectionSource eq CustomerTI",
        "detectionSource ne 'CustomerTI'",
        "lastUpdateTime ge 2026-01-02T00:00:00Z or detectionSource eq 'CustomerTI'",
        "startswith(title,'Custom')",
    ):
        resp = api.get(**{"$filter": bad})
        assert resp.status_code == 400, bad
        assert resp.json()["error"]["code"] == "ODataError" and set(resp.json()["error"]) == {
            "code",
            "message",
            "target",
        }
    # A raw '+' in the query string decodes to a space, as on any server: clients must percent-encode it.
    raw = api.session.get(f"{api.base}/api/alerts?$filter=lastUpdateTime ge 2026-01-02T02:00:00+02:00", timeout=10)
    assert raw.status_code == 400
    assert api.get(**{"$orderby": "lastUpdateTime"}).status_code == 400  # not a supported option


def test_paging_without_next_link_and_expand(defender: DefenderStandIn, api: Api) -> None:
    made = [defender.add_alert(evidence=[defender.evidence(sha256=f"{n:064x}")]) for n in range(5)]
    assert ids(api.alerts()) == sorted(ids(made))  # id order (documented as unordered)

    first = api.get(**{"$top": "2"}).json()
    assert len(first["value"]) == 2 and "@odata.nextLink" not in first
    assert first["@odata.context"] == f"{defender.url}/api/$metadata#Alerts"
    pages = [api.alerts(**{"$top": "2", "$skip": str(k)}) for k in (0, 2, 4)]
    assert [len(p) for p in pages] == [2, 2, 1] and sum(map(ids, pages), []) == sorted(ids(made))
    assert api.alerts(**{"$skip": "5"}) == [] and api.alerts(**{"$top": "0"}) == []
    for bad in ({"$top": "10001"}, {"$top": "-1"}, {"$skip": "x"}):
        assert api.get(**bad).json()["error"]["code"] == "ODataError", bad
    assert api.get(**{"$top": "10000"}).status_code == 200

    assert all(a["evidence"] == [] for a in api.alerts())
    expanded = api.alerts(**{"$expand": "evidence", "$top": "1"})
    assert expanded[0]["evidence"] == defender.alerts[expanded[0]["id"]]["evidence"] != []
    assert api.get(**{"$expand": "files"}).status_code == 400

    defender.next_link = True
    body = api.get(**{"$top": "2", "$filter": "detectionSource eq 'CustomerTI'"}).json()
    assert body["@odata.nextLink"].startswith(f"{defender.url}/api/alerts?") and "%24skip=2" in body["@odata.nextLink"]
    assert "@odata.nextLink" not in api.get(**{"$top": "2", "$skip": "4"}).json()


def test_single_alert_retention_and_404(defender: DefenderStandIn, api: Api) -> None:
    recent = defender.add_alert(lastUpdateTime=ago(days=179), evidence=[defender.evidence()])
    stale = defender.add_alert(lastUpdateTime=ago(days=181))
    assert ids(api.alerts()) == [recent["id"]]

    one = api.get(f"/api/alerts/{recent['id']}")
    assert one.status_code == 200 and one.json()["evidence"] == recent["evidence"]  # documented example: filled
    assert one.json()["@odata.context"].endswith("/api/$metadata#Alerts/$entity")
    gone = api.get(f"/api/alerts/{stale['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "ResourceNotFound"
    assert api.get("/api/alerts/da0_0").status_code == 404
    assert [r.endpoint for r in defender.calls()[-3:]] == ["alert"] * 3

    defender.alert_retention_days = 365
    assert ids(api.alerts()) == sorted([recent["id"], stale["id"]])
    defender.alert_retention_days = 1e9  # reaches past year 1: everything, and no overflow in the handler
    assert len(api.alerts()) == 2 and api.get(f"/api/alerts/{stale['id']}").status_code == 200


def test_hostile_shapes_are_served_as_stored(defender: DefenderStandIn, api: Api) -> None:
    odd_evidence = [
        {},
        None,
        "File",
        42,
        {"entityType": None, "sha1": 123, "url": ["http://x.example/"], "ipAddress": {"v": 4}},
        {"entityType": "Url", "url": "EVIL.example.com."},
        {"unknownKey": {"nested": [1, 2.5, True]}, "sha256": "Z" * 64},
    ]
    odd = defender.add_alert(evidence=odd_evidence, title=17, severity=None, mitreTechniques="T1566")
    null_evidence = defender.add_alert(evidence=None)
    text_evidence = defender.add_alert(evidence="not a list")
    bare = defender.add_alert(omit=("evidence", "detectionSource", "relatedUser"))
    untimed = defender.add_alert(lastUpdateTime=None)
    garbled = defender.add_alert(lastUpdateTime="yesterday", alertCreationTime=12345)
    big = defender.add_alert(
        evidence=[defender.evidence(entityType="Ip", ipAddress=f"8.8.{n // 250}.{n % 250}") for n in range(5000)]
    )

    rows = {a["id"]: a for a in api.alerts(**{"$expand": "evidence"})}
    for stored in (odd, null_evidence, text_evidence, bare, untimed, garbled, big):
        assert rows[stored["id"]] == json.loads(json.dumps(stored))  # kept by retention, byte-for-byte
    assert len(rows[big["id"]]["evidence"]) == 5000
    assert "evidence" not in rows[bare["id"]] and "detectionSource" not in rows[bare["id"]]

    plain = {a["id"]: a for a in api.alerts()}
    assert plain[null_evidence["id"]]["evidence"] == [] and plain[big["id"]]["evidence"] == []
    assert "evidence" not in plain[bare["id"]]
    # Comparisons on a missing/unparseable time are false; detectionSource filter skips the bare alert.
    since = ids(api.alerts(**{"$filter": "lastUpdateTime ge 2000-01-01T00:00:00Z"}))
    assert untimed["id"] not in since and garbled["id"] not in since and odd["id"] in since
    assert bare["id"] not in ids(api.alerts(**{"$filter": "detectionSource eq 'CustomerTI'"}))
    assert api.get(f"/api/alerts/{odd['id']}").json()["evidence"] == json.loads(json.dumps(odd_evidence))


# ------------------------------------------------------ quota + permissions
def test_alert_quota_429_and_early_retries(entra: EntraStandIn, pki: PKI) -> None:
    default = DefenderStandIn(pki, entra).quotas
    assert default["alerts"] == default["alert"] == ((100, 60), (1500, 3600))  # the documented figures
    entra.set_roles(TEST_CLIENT_ID, READ_ALERTS)
    # One "minute" lasts 0.5 s and one "hour" 30 s here; the minute's first call must not age out
    # before the third, hence the generous window (each call is a fresh TLS connection).
    with serving(DefenderStandIn(pki, entra, time_scale=1 / 120, quotas={"alerts": [(2, 60), (3, 3600)]})) as d:
        api = Api(d, pki)
        started = time.monotonic()
        assert [api.get().status_code for _ in range(2)] == [200, 200]
        minute = api.get()
        assert minute.status_code == 429 and minute.json()["error"]["code"] == "TooManyRequests"
        assert minute.headers["Retry-After"] == "1" and d.early_retries == []
        assert api.get("/api/indicators").status_code == 200  # its own quota
        assert api.get("/api/alerts/da0_0").status_code == 404  # "alert" has its own quota too
        time.sleep(max(0.0, started + 0.55 - time.monotonic()))
        assert api.get().status_code == 200  # the minute window moved on...
        hour = api.get()  # ...but 3 calls per "hour" are spent
        assert hour.status_code == 429 and 25 <= int(hour.headers["Retry-After"]) <= 30
        assert api.get().status_code == 429
        assert [r.status for r in d.calls("alerts")] == [200, 200, 429, 200, 429, 429]
        # Retry-After is whole seconds (at least 1) even on a scaled clock, so the 4th call came early
        # too (unless this machine is very slow); the last one surely did (it was told ~30 s).
        assert d.calls("alerts")[-1] in d.early_retries and 2 <= len(d.early_retries) <= 3


def test_alert_permissions(entra: EntraStandIn, defender: DefenderStandIn, pki: PKI) -> None:
    ti_only = Api(defender, pki)  # default roles: Ti.ReadWrite.All only
    denied = ti_only.get()
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "Forbidden"
    assert (
        denied.json()["error"]["message"]
        == "Missing application roles. API required roles: Alert.Read.All, Alert.ReadWrite.All"
    )
    assert ti_only.get("/api/alerts/whatever").status_code == 403
    assert ti_only.get("/api/indicators").status_code == 200

    entra.set_roles(OTHER_CLIENT_ID, ["Alert.Read.All"])
    reader = Api(defender, pki, OTHER_CLIENT_ID, OTHER_CLIENT_SECRET)
    assert reader.get().status_code == 200
    no_ti = reader.get("/api/indicators")
    assert no_ti.status_code == 403 and no_ti.json()["error"]["message"].endswith("Ti.ReadWrite.All, Ti.ReadWrite")

    entra.set_roles(OTHER_CLIENT_ID, ["Alert.ReadWrite.All"])
    assert Api(defender, pki, OTHER_CLIENT_ID, OTHER_CLIENT_SECRET).get().status_code == 200
    defender.forbid(OTHER_CLIENT_ID)
    assert Api(defender, pki, OTHER_CLIENT_ID, OTHER_CLIENT_SECRET).get().status_code == 403
    entra.expire_all_tokens()
    assert reader.get().status_code == 401


# ------------------------------------------------------- timestamp styles
def _import(api: Api, value: str, **extra: Any) -> None:
    body = {"indicatorValue": value, "indicatorType": "IpAddress", "action": "Block", "title": "t", "description": "d"}
    resp = api.session.post(f"{api.base}/api/indicators/import", json={"Indicators": [{**body, **extra}]}, timeout=10)
    assert resp.status_code == 200 and not resp.json()["value"][0]["isFailed"], resp.text


def test_timestamp_styles_in_the_indicator_listing(defender: DefenderStandIn, api: Api) -> None:
    _import(api, "8.8.8.8", expirationTime="2999-01-01T00:00:00Z")
    stored = dict(defender.active()[0])

    default = api.get("/api/indicators").json()["value"][0]
    assert {k: default[k] for k in ("expirationTime", "creationTimeDateTimeUtc", "lastUpdateTime")} == {
        k: stored[k] for k in ("expirationTime", "creationTimeDateTimeUtc", "lastUpdateTime")
    }  # unchanged by default
    assert default["expirationTime"] == "2999-01-01T00:00:00Z"

    expected = {
        (1, "Z"): (r"\.\dZ", "2999-01-01T00:00:00.0Z"),
        (7, "Z"): (r"\.\d{7}Z", "2999-01-01T00:00:00.0000000Z"),
        (3, "+00:00"): (r"\.\d{3}\+00:00", "2999-01-01T00:00:00.000+00:00"),
        (7, "+02:00"): (r"\.\d{7}\+02:00", "2999-01-01T02:00:00.0000000+02:00"),
        (2, "-05:30"): (r"\.\d{2}-05:30", "2998-12-31T18:30:00.00-05:30"),
    }
    for (digits, offset), (shape, expiry) in expected.items():
        defender.timestamp_style = TimestampStyle(digits, offset)
        row = api.get("/api/indicators").json()["value"][0]
        assert row["expirationTime"] == expiry, (digits, offset)
        for name in ("creationTimeDateTimeUtc", "lastUpdateTime"):
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}" + shape, row[name]), (name, row[name])
            # The same instant as stored, truncated to the printed digits.
            unit = 10 ** (7 - digits)
            assert to_ticks(row[name]) == to_ticks(stored[name]) // unit * unit, name

    defender.timestamp_style = TimestampStyle(1, "Z")
    posted = api.session.post(
        f"{api.base}/api/indicators",
        json={
            "indicatorValue": "8.8.4.4",
            "indicatorType": "IpAddress",
            "action": "Block",
            "title": "t",
            "description": "d",
            "expirationTime": "2999-01-01T00:00:00Z",
        },
        timeout=10,
    ).json()
    assert posted["expirationTime"] == "2999-01-01T00:00:00.0Z"  # one serializer for every response
    assert defender.indicators[posted["id"]]["expirationTime"] == "2999-01-01T00:00:00Z"  # the store is untouched

    with serving(DefenderStandIn(defender.pki, defender.entra, timestamp_style=TimestampStyle(7, "+00:00"))) as other:
        _import(Api(other, defender.pki), "9.9.9.9")
        assert (
            Api(other, defender.pki)
            .get("/api/indicators")
            .json()["value"][0]["creationTimeDateTimeUtc"]
            .endswith("+00:00")
        )
    for bad in ((0, "Z"), (8, "Z"), (3, "CET"), (3, "+15:00"), (3, "+0200")):
        with pytest.raises(ValueError):
            TimestampStyle(*bad)


# ------------------------------------------------------------- fault knobs
def test_injected_retry_after_as_http_date_and_very_large(defender: DefenderStandIn, api: Api) -> None:
    defender.inject("alerts", status=429, retry_after=86400)
    huge = api.get()
    assert huge.status_code == 429 and huge.headers["Retry-After"] == "86400"
    assert huge.json()["error"]["code"] == "TooManyRequests"
    assert api.get().status_code == 200 and len(defender.early_retries) == 1  # a day early

    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    defender.inject("list", status=503, retry_after=soon)
    dated = api.get("/api/indicators")
    assert dated.status_code == 503 and dated.headers["Retry-After"] == soon
    assert email.utils.parsedate_to_datetime(dated.headers["Retry-After"]).tzinfo is not None
    assert api.get("/api/indicators").status_code == 200 and len(defender.early_retries) == 2

    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    defender.inject("import", status=429, retry_after=past)
    assert api.session.post(f"{api.base}/api/indicators/import", json={}, timeout=10).headers["Retry-After"] == past
    _import(api, "8.8.8.8")
    assert len(defender.early_retries) == 2  # that date had already passed

    defender.inject("alert", status=429, retry_after="not a date")
    assert api.get("/api/alerts/x").headers["Retry-After"] == "not a date"
    api.get("/api/alerts/x")
    assert len(defender.early_retries) == 2  # unreadable: no deadline, no crash


def test_seed_any_type_value_action(defender: DefenderStandIn, api: Api) -> None:
    _import(api, "8.8.8.8")  # the tool's own indicator
    combos = [
        {"indicatorType": t, "indicatorValue": f"{t}-value", "action": a}
        for t in INDICATOR_TYPES
        for a in ("Allowed", "Audit", "Warn", "Block", "BlockAndRemediate", "AlertAndBlock")
    ]
    rejected_by_import = [
        {"indicatorType": "IpAddress", "indicatorValue": "8.8.8.8", "action": "Block"},  # same key as ours
        {"indicatorType": "IpAddress", "indicatorValue": "10.0.0.1", "action": "Block"},  # internal
        {"indicatorType": "Url", "indicatorValue": "http://x.example/", "action": "BlockAndRemediate"},
        {"indicatorType": "CertificateThumbprint", "indicatorValue": "b" * 40, "action": "Block"},
        {"indicatorType": "DomainName", "indicatorValue": "*.example.com", "action": "Audit", "generateAlert": False},
    ]
    seeded = defender.seed(combos + rejected_by_import, created_by="other-app", application="Sentinel")
    assert len(seeded) == len(set(seeded)) == len(combos) + len(rejected_by_import)
    listed = api.get("/api/indicators").json()["value"]
    assert len(listed) == 1 + len(seeded)
    mine_and_theirs = [r for r in listed if r["indicatorValue"] == "8.8.8.8"]
    assert sorted(r["createdBy"] for r in mine_and_theirs) == sorted([TEST_CLIENT_ID, "other-app"])
    assert {(r["indicatorType"], r["action"]) for r in listed if r["application"] == "Sentinel"} >= {
        (c["indicatorType"], c["action"]) for c in combos
    }
