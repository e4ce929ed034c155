"""The stand-ins are only useful if real clients cannot tell them from the services.

These tests drive them with the real msal, pymisp and requests (no mocks) and
pin the behaviours the sync tool's tests rely on.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msal
import pymisp
import pytest
import requests

from tests.standins.defender import DefenderStandIn
from tests.standins.entra import EntraStandIn
from tests.standins.misp import MispStandIn, load_events
from tests.standins.otx import OtxStandIn
from tests.standins.tls import PKI
from tests.util import (
    DEFENDER_SCOPE,
    DEFENDER_TIME_SCALE,
    MISP_KEY,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    OTX_KEY,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_TENANT,
    serving,
    wait_for,
)

SHA256 = "a" * 64


# --------------------------------------------------------------------- helpers
def msal_app(
    entra: EntraStandIn, pki: PKI, credential: Any = TEST_CLIENT_SECRET, client_id: str = TEST_CLIENT_ID
) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=entra.authority,
        instance_discovery=False,
        verify=str(pki.ca_path),
    )


class Api:
    """A requests session speaking to the Defender stand-in with a real token."""

    def __init__(
        self, defender: DefenderStandIn, pki: PKI, client_id: str = TEST_CLIENT_ID, secret: str = TEST_CLIENT_SECRET
    ):
        token = msal_app(defender.entra, pki, secret, client_id).acquire_token_for_client([DEFENDER_SCOPE])
        self.token = token["access_token"]
        self.base = defender.url
        self.session = requests.Session()
        self.session.verify = str(pki.ca_path)
        self.session.headers["Authorization"] = f"Bearer {self.token}"

    def get(self, path: str = "/api/indicators", **params: Any) -> requests.Response:
        return self.session.get(self.base + path, params=params or None, timeout=10)

    def post(self, path: str, body: Any) -> requests.Response:
        return self.session.post(self.base + path, json=body, timeout=10)

    def delete(self, path: str) -> requests.Response:
        return self.session.delete(self.base + path, timeout=10)

    def import_(self, *items: dict[str, Any]) -> list[dict[str, Any]]:
        resp = self.post("/api/indicators/import", {"Indicators": list(items)})
        assert resp.status_code == 200, resp.text
        return resp.json()["value"]


def ind(value: str, itype: str = "IpAddress", action: str = "Block", **extra: Any) -> dict[str, Any]:
    return {
        "indicatorValue": value,
        "indicatorType": itype,
        "action": action,
        "title": "t",
        "description": "d",
        **extra,
    }


def event(n: int, *, published: bool = True, tags: Sequence[str] = ("tlp:white",), attrs: Sequence[dict] = ()) -> dict:
    """A small feed-format event (no ids, like the DigitalSide feed)."""
    return {
        "Event": {
            "uuid": f"00000000-0000-4000-8000-{n:012d}",
            "info": f"event {n}",
            "date": f"2024-01-0{1 + n % 9}",
            "timestamp": str(1_700_000_000 + n),
            "published": published,
            "threat_level_id": "2",
            "analysis": "2",
            "Orgc": {"name": "CIRCL", "uuid": "55f6ea5e-2c60-40e5-964f-47a8950d210f"},
            "Tag": [{"name": t} for t in tags],
            "Attribute": list(attrs)
            or [
                {
                    "uuid": f"10000000-0000-4000-8000-{n:012d}",
                    "type": "ip-dst",
                    "category": "Network activity",
                    "value": f"198.51.100.{n}",
                    "to_ids": True,
                }
            ],
        }
    }


def attr(uuid_n: int, atype: str, value: str, **extra: Any) -> dict[str, Any]:
    return {"uuid": f"20000000-0000-4000-8000-{uuid_n:012d}", "type": atype, "value": value, "to_ids": True, **extra}


# ----------------------------------------------------------------------- Entra
def test_msal_secret_token_is_jwt_shaped_and_cached(entra: EntraStandIn, pki: PKI) -> None:
    app = msal_app(entra, pki)
    first = app.acquire_token_for_client([DEFENDER_SCOPE])
    again = app.acquire_token_for_client([DEFENDER_SCOPE])

    assert first["token_source"] == "identity_provider" and first["expires_in"] == 3599
    assert again["token_source"] == "cache" and again["access_token"] == first["access_token"]
    assert len(entra.calls("discovery")) == 1 and len(entra.calls("token")) == 1 and entra.issued == 1
    form = entra.calls("token")[0].body
    assert form["grant_type"] == "client_credentials" and form["client_secret"] == TEST_CLIENT_SECRET
    payload = first["access_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["roles"] == ["Ti.ReadWrite.All"] and claims["appid"] == TEST_CLIENT_ID
    assert claims["tid"] == TEST_TENANT and claims["aud"] == "https://api.securitycenter.microsoft.com"
    assert entra.validate(first["access_token"]) == TEST_CLIENT_ID


def test_msal_errors_match_entra(entra: EntraStandIn, pki: PKI) -> None:
    bad = msal_app(entra, pki, "wrong").acquire_token_for_client([DEFENDER_SCOPE])
    assert bad["error"] == "invalid_client" and bad["error_codes"] == [7000215]
    assert bad["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert entra.calls("token", status=401)

    unknown = msal_app(entra, pki, "x", client_id="11111111-2222-3333-4444-555555555555").acquire_token_for_client(
        [DEFENDER_SCOPE]
    )
    assert unknown["error"] == "unauthorized_client" and unknown["error_codes"] == [700016]
    assert entra.calls("token", status=400)

    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        msal.ConfidentialClientApplication(
            TEST_CLIENT_ID,
            client_credential=TEST_CLIENT_SECRET,
            authority=f"{entra.url}/00000000-0000-0000-0000-000000000000",
            instance_discovery=False,
            verify=str(pki.ca_path),
        )


def test_certificate_credential(entra: EntraStandIn, pki: PKI, client_certificate: tuple[Path, str]) -> None:
    pem_path, thumbprint = client_certificate
    pem = pem_path.read_text()
    entra.register_certificate("cert-app", pem_path)

    legacy = msal_app(entra, pki, {"private_key": pem, "thumbprint": thumbprint}, "cert-app")  # RS256 + x5t
    assert "access_token" in legacy.acquire_token_for_client([DEFENDER_SCOPE])
    modern = msal_app(entra, pki, {"private_key": pem, "public_certificate": pem}, "cert-app")  # PS256 + x5t#S256
    assert "access_token" in modern.acquire_token_for_client([DEFENDER_SCOPE])

    entra.register_certificate(TEST_CLIENT_ID, pem_path)
    other_key, _ = _other_certificate(pem_path.parent)
    forged = msal_app(entra, pki, {"private_key": other_key, "thumbprint": thumbprint}).acquire_token_for_client(
        [DEFENDER_SCOPE]
    )
    assert forged["error"] == "invalid_client" and "invalid signature" in forged["error_description"]


def _other_certificate(directory: Path) -> tuple[str, str]:
    from tests.standins.tls import make_client_certificate

    path, thumb = make_client_certificate(directory, common_name="intruder")
    return path.read_text(), thumb


def test_expired_and_revoked_tokens_get_defender_401(entra: EntraStandIn, defender: DefenderStandIn, pki: PKI) -> None:
    api = Api(defender, pki)
    assert api.get().status_code == 200
    entra.expire_all_tokens()
    resp = api.get()
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "Unauthorized"
    assert set(resp.json()["error"]) == {"code", "message", "target"}
    assert entra.validate(api.token) is None

    entra.token_lifetime = 0  # issued already expired: validity is by time too
    assert entra.validate(Api(defender, pki).token) is None


def test_missing_roles_get_403(entra: EntraStandIn, defender: DefenderStandIn, pki: PKI) -> None:
    defender.forbid(TEST_CLIENT_ID)
    resp = Api(defender, pki).get()
    assert resp.status_code == 403
    assert (
        resp.json()["error"]["message"]
        == "Missing application roles. API required roles: Ti.ReadWrite.All, Ti.ReadWrite"
    )
    entra.set_roles(OTHER_CLIENT_ID, ["Ti.Read.All"])
    assert Api(defender, pki, OTHER_CLIENT_ID, OTHER_CLIENT_SECRET).get().status_code == 403


# -------------------------------------------------------------------- Defender
def test_import_then_list_with_top_skip_and_filter(defender: DefenderStandIn, pki: PKI) -> None:
    api = Api(defender, pki)
    results = api.import_(
        *(ind(f"8.8.8.{n}", application="misp2defender") for n in range(1, 6)), ind(SHA256, "FileSha256")
    )
    assert [r["isFailed"] for r in results] == [False] * 6
    assert [r["id"] for r in results] == ["1", "2", "3", "4", "5", "6"]

    body = api.get().json()
    assert body["@odata.context"].endswith("/api/$metadata#Indicators") and "@odata.nextLink" not in body
    row = body["value"][0]
    assert row["createdBy"] == TEST_CLIENT_ID and row["sourceType"] == "AadApp"
    assert row["createdByDisplayName"] == "misp2defender" and row["creationTimeDateTimeUtc"].endswith("Z")

    page = api.get(**{"$top": "2", "$skip": "3"}).json()["value"]
    assert [r["id"] for r in page] == ["4", "5"]
    only_ip = api.get(**{"$filter": "indicatorType eq 'IpAddress' and application eq 'misp2defender'"}).json()
    assert len(only_ip["value"]) == 5
    assert api.get(**{"$filter": f"createdBy eq '{TEST_CLIENT_ID}' and generateAlert eq false"}).json()["value"]
    assert api.get(**{"$filter": "startswith(title,'t')"}).json()["error"]["code"] == "ODataError"
    assert api.get(**{"$top": "10001"}).status_code == 400

    defender.expire("1")
    assert [r["id"] for r in api.get().json()["value"]] == ["2", "3", "4", "5", "6"]
    assert api.delete("/api/indicators/1").status_code == 404  # expired counts as gone


def test_next_link_knob(defender: DefenderStandIn, pki: PKI) -> None:
    api = Api(defender, pki)
    api.import_(*(ind(f"8.8.8.{n}") for n in range(1, 6)))
    defender.next_link = True
    body = api.get(**{"$top": "2"}).json()
    assert "%24skip=2" in body["@odata.nextLink"] and body["@odata.nextLink"].startswith(defender.url)
    last = api.session.get(api.get(**{"$top": "2", "$skip": "2"}).json()["@odata.nextLink"]).json()
    assert [r["id"] for r in last["value"]] == ["5"] and "@odata.nextLink" not in last


def test_upsert_by_type_value_action_keeps_application(defender: DefenderStandIn, pki: PKI) -> None:
    api = Api(defender, pki)
    (first,) = api.import_(ind("Evil.Example.com", "DomainName", application="first", severity="Low"))
    (same,) = api.import_(
        ind(
            "evil.example.com",
            "DomainName",
            application="second",
            severity="High",
            title="new",
            expirationTime="2999-01-01T00:00:00.0Z",
        )
    )
    (other_action,) = api.import_(ind("evil.example.com", "DomainName", action="Audit", generateAlert=True))

    assert same["id"] == first["id"] and other_action["id"] != first["id"]
    stored = defender.indicators[first["id"]]
    assert stored["application"] == "first" and stored["severity"] == "High" and stored["title"] == "new"
    assert stored["expirationTime"] == "2999-01-01T00:00:00Z"
    assert len(defender.active()) == 2

    resp = api.post("/api/indicators", ind("evil.example.com", "DomainName", description="via submit"))
    assert resp.status_code == 200 and resp.json()["id"] == first["id"]
    assert defender.indicators[first["id"]]["description"] == "via submit"


def test_validation_failures_are_per_item(defender: DefenderStandIn, pki: PKI) -> None:
    api = Api(defender, pki)
    table = {
        "private IP": (ind("192.168.1.10"), "IP address 192.168.1.10 is invalid"),
        "loopback": (ind("127.0.0.1"), "is invalid"),
        "CIDR": (ind("8.8.8.0/24"), "IP address 8.8.8.0/24 is invalid."),
        "range": (ind("8.8.8.1-8.8.8.9"), "is invalid"),
        "compressed IPv6": (ind("2001:4860:4860::8888"), "8 segments"),
        "bad hash": (ind("abc", "FileSha1"), "Hash value abc is invalid."),
        "md5 as sha256": (ind("d41d8cd98f00b204e9800998ecf8427e", "FileSha256"), "is invalid"),
        "url + BlockAndRemediate": (ind("http://x.example/a", "Url", "BlockAndRemediate"), "not supported"),
        "cert + Block": (ind("b" * 40, "CertificateThumbprint", "Block"), "not supported"),
        "Audit without alert": (ind("9.9.9.9", action="Audit"), "GenerateAlert"),
        "domain with scheme": (ind("http://example.com", "DomainName"), "Domain name http://example.com is invalid."),
        "wildcard domain": (ind("*.example.com", "DomainName"), "is invalid"),
        "missing title": ({**ind("9.9.9.8"), "title": ""}, "Parameter title is missing."),
        "bad severity": (ind("9.9.9.7", severity="Critical"), "Invalid input Critical."),
        "bad expiry": (ind("9.9.9.6", expirationTime="tomorrow"), "Invalid input tomorrow."),
        "wrong case type": (ind("9.9.9.5", "ipaddress"), "Invalid input ipaddress."),
    }
    good = [
        ind("2001:4860:4860:0:0:0:0:8888"),
        ind("https://bad.example.net:8443/x?y=1", "Url", "Warn"),
        ind("c" * 40, "CertificateThumbprint", "Allowed"),
    ]
    results = api.import_(*(item for item, _ in table.values()), *good)
    for (name, (_, reason)), result in zip(table.items(), results, strict=False):
        assert result["isFailed"], name
        assert reason in result["failureReason"], (name, result["failureReason"])
    assert [r["isFailed"] for r in results[len(table) :]] == [False, False, False]

    resp = api.post("/api/indicators", ind("10.1.2.3"))
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "InvalidIpAddress"


def test_import_batch_shape_and_size(defender: DefenderStandIn, pki: PKI) -> None:
    api = Api(defender, pki)
    too_many = api.post(
        "/api/indicators/import", {"Indicators": [ind(f"8.8.{n // 250}.{n % 250 + 1}") for n in range(501)]}
    )
    assert too_many.status_code == 400
    assert too_many.json()["error"] == {
        "code": "MaximumBatchSizeExceeded",
        "message": "Maximum batch size exceeded. Received: 501, allowed: 500.",
        "target": too_many.json()["error"]["target"],
    }
    assert api.post("/api/indicators/import", {"Indicators": []}).status_code == 400
    assert (
        api.post("/api/indicators/import", {"indicators": [ind("8.8.8.8")]}).json()["error"]["code"]
        == "InvalidRequestBody"
    )
    full = api.post(
        "/api/indicators/import", {"Indicators": [ind(f"8.8.{n // 250}.{n % 250 + 1}") for n in range(500)]}
    )
    assert full.status_code == 200 and len(defender.active()) == 500


def test_tenant_cap_blocks_new_but_not_updates(entra: EntraStandIn, pki: PKI) -> None:
    with serving(DefenderStandIn(pki, entra, cap=3)) as defender:
        defender.seed([ind("1.1.1.1"), ind("1.0.0.1")], application="other-tool")
        api = Api(defender, pki)
        results = api.import_(ind("9.9.9.9"), ind("8.8.8.8"), ind("1.1.1.1", severity="High"))
        assert [r["isFailed"] for r in results] == [False, True, False]
        assert "limit of 3 active indicators" in results[1]["failureReason"]
        assert len(defender.owned_by(TEST_CLIENT_ID)) == 1 and len(defender.owned_by("some-other-app-id")) == 2


def test_delete_and_atomic_batch_delete(defender: DefenderStandIn, pki: PKI) -> None:
    api = Api(defender, pki)
    ids = [r["id"] for r in api.import_(*(ind(f"8.8.8.{n}") for n in range(1, 5)))]

    missing = api.post("/api/indicators/BatchDelete", {"IndicatorIds": [ids[0], "999"]})
    assert missing.status_code == 404 and len(defender.active()) == 4  # nothing deleted
    assert api.post("/api/indicators/BatchDelete", {"IndicatorIds": ["abc"]}).status_code == 400
    assert api.post("/api/indicators/BatchDelete", {"IndicatorIds": []}).status_code == 400
    assert api.post("/api/indicators/BatchDelete", {"IndicatorIds": [str(n) for n in range(501)]}).status_code == 400
    assert api.post("/api/indicators/BatchDelete", {"IndicatorIds": ids[:2]}).status_code == 204
    assert api.delete(f"/api/indicators/{ids[2]}").status_code == 204
    assert api.delete(f"/api/indicators/{ids[2]}").status_code == 404
    assert [i["id"] for i in defender.active()] == [ids[3]]


def test_quota_429_retry_after_and_early_retries(entra: EntraStandIn, pki: PKI) -> None:
    assert DefenderStandIn(pki, entra).quotas["import"] == ((30, 60),)  # the documented table is the default
    standin = DefenderStandIn(pki, entra, time_scale=DEFENDER_TIME_SCALE, quotas={"import": [(3, 60)]})
    with serving(standin) as defender:
        api = Api(defender, pki)
        for n in range(3):
            api.import_(ind(f"8.8.8.{n + 1}"))
        throttled = api.post("/api/indicators/import", {"Indicators": [ind("8.8.4.4")]})
        assert throttled.status_code == 429 and throttled.json()["error"]["code"] == "TooManyRequests"
        retry_after = int(throttled.headers["Retry-After"])
        assert retry_after == 1
        assert standin.early_retries == []

        assert api.post("/api/indicators/import", {"Indicators": [ind("8.8.4.4")]}).status_code == 429
        assert len(standin.early_retries) == 1  # retried without waiting
        assert api.get().status_code == 200  # other endpoints have their own quota

        time.sleep(retry_after)
        assert api.post("/api/indicators/import", {"Indicators": [ind("8.8.4.4")]}).status_code == 200
        assert len(standin.early_retries) == 1


# ------------------------------------------------------------------------ MISP
SMALL_CORPUS = [
    event(1),
    event(2, tags=("tlp:white", "defender:sync")),
    event(3, published=False),
    event(
        4,
        tags=("tlp:red",),
        attrs=[
            attr(41, "domain", "bad.example.com", Tag=[{"name": "defender:sync"}]),
            attr(42, "ip-dst", "8.8.8.8", _warninglist_hit=True),
            attr(43, "md5", "d41d8cd98f00b204e9800998ecf8427e", to_ids=False),
            attr(44, "sha256", SHA256, deleted=True),
        ],
    ),
    event(5),
    event(6, tags=("defender:sync",)),
]


@pytest.fixture
def small_misp() -> Any:
    with serving(MispStandIn(SMALL_CORPUS, key=MISP_KEY)) as server:
        yield server


def test_pymisp_constructs_quietly_and_pages_events(small_misp: MispStandIn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymisp")
    misp = pymisp.PyMISP(small_misp.url, MISP_KEY, ssl=False)
    assert [r.endpoint for r in small_misp.log] == ["version", "me", "describe"]
    assert caplog.records == []

    page1 = misp.search(controller="events", limit=2, page=1, published=True)
    page3 = misp.search(controller="events", limit=2, page=3, published=True)
    assert [e["Event"]["id"] for e in page1] == ["1", "2"] and [e["Event"]["id"] for e in page3] == ["6"]
    assert small_misp.calls("events")[-1].body["page"] == 3
    full = page1[0]["Event"]
    assert full["Attribute"][0]["event_id"] == "1" and full["Attribute"][0]["deleted"] is False
    assert full["publish_timestamp"] == full["timestamp"] and full["org_id"] == "1"
    assert SMALL_CORPUS[0]["Event"].get("id") is None  # the caller's data is not mutated

    objs = misp.search(controller="events", limit=10, page=1, pythonify=True)
    assert len(objs) == 6 and isinstance(objs[0], pymisp.MISPEvent)


def test_pymisp_attribute_filters(small_misp: MispStandIn) -> None:
    misp = pymisp.PyMISP(small_misp.url, MISP_KEY, ssl=False)

    def values(**kw: Any) -> list[str]:
        return [a["value"] for a in misp.search(controller="attributes", **kw)["Attribute"]]

    assert len(values()) == 8  # deleted attribute hidden by default
    assert values(deleted=1) == [SHA256]
    assert len(values(deleted=[0, 1])) == 9
    assert "8.8.8.8" not in values(enforce_warninglist=True)
    assert "d41d8cd98f00b204e9800998ecf8427e" not in values(to_ids=1)
    assert values(type_attribute="domain") == ["bad.example.com"]
    assert values(value="8.8.8.8") == ["8.8.8.8"]
    assert values(tags=["defender:sync"]) == ["198.51.100.2", "bad.example.com", "198.51.100.6"]
    assert "198.51.100.1" not in values(tags=["!tlp:white"])
    assert values(eventid=5) == ["198.51.100.5"]
    assert values(published=False) == ["198.51.100.3"]
    assert values(publish_timestamp="1d") == []
    assert values(limit=3, page=2) == ["bad.example.com", "8.8.8.8", "d41d8cd98f00b204e9800998ecf8427e"]
    assert values(limit=3, page=3) == ["198.51.100.5", "198.51.100.6"] and values(limit=3, page=4) == []

    item = misp.search(controller="attributes", type_attribute="domain", include_event_tags=True)["Attribute"][0]
    assert item["Event"]["id"] == "4" and item["Event"]["info"] == "event 4"
    assert {t["name"] for t in item["Tag"]} == {"defender:sync", "tlp:red"}
    assert "_warninglist_hit" not in json.dumps(misp.search(controller="attributes"))

    events = misp.search(
        controller="events", tags=pymisp.PyMISP.build_complex_query(or_parameters=["defender:sync"]), to_ids=1
    )
    assert [e["Event"]["id"] for e in events] == ["2", "4", "6"]
    assert [a["value"] for a in events[1]["Event"]["Attribute"]] == ["bad.example.com", "8.8.8.8"]
    meta = misp.search(controller="events", metadata=True, eventid=[1, 2])
    assert [e["Event"]["id"] for e in meta] == ["1", "2"] and "Attribute" not in meta[0]["Event"]


def test_pymisp_wrong_key_and_failed_page(small_misp: MispStandIn) -> None:
    with pytest.raises(pymisp.PyMISPError):
        pymisp.PyMISP(small_misp.url, "not-the-key", ssl=False)
    assert small_misp.calls("me", status=403)

    misp = pymisp.PyMISP(small_misp.url, MISP_KEY, ssl=False)
    small_misp.fail_page(2)
    assert len(misp.search(controller="events", limit=2, page=1)) == 2
    with pytest.raises(pymisp.MISPServerError):
        misp.search(controller="events", limit=2, page=2)
    assert len(misp.search(controller="events", limit=2, page=2)) == 2  # times=1


def test_misp_mutations(small_misp: MispStandIn) -> None:
    misp = pymisp.PyMISP(small_misp.url, MISP_KEY, ssl=False)
    target = "10000000-0000-4000-8000-000000000001"
    small_misp.set_attribute(target, to_ids=False)
    ev1 = misp.search(controller="events", eventid=1)[0]["Event"]
    assert ev1["Attribute"][0]["to_ids"] is False and int(ev1["timestamp"]) > 1_700_000_001

    small_misp.delete_attribute(target)
    assert misp.search(controller="events", eventid=1)[0]["Event"]["Attribute"] == []
    assert misp.search(controller="events", eventid=1, deleted=[0, 1])[0]["Event"]["published"] is False  # edited

    small_misp.unpublish("00000000-0000-4000-8000-000000000002")
    assert "2" not in [e["Event"]["id"] for e in misp.search(controller="events", published=True)]
    small_misp.publish("00000000-0000-4000-8000-000000000003")
    assert [e["Event"]["id"] for e in misp.search(controller="events", publish_timestamp="1h")] == ["3"]

    small_misp.remove_event("00000000-0000-4000-8000-000000000005")
    added = small_misp.add_event(event(7))
    ids = [e["Event"]["id"] for e in misp.search(controller="events")]
    assert ids == ["1", "2", "3", "4", "6", "7"] and added["id"] == "7"


class CountingCorpus(Sequence[dict[str, Any]]):
    """A lazy corpus that builds events on access and counts the accesses."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.built = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            raise TypeError("the stand-in must not slice the corpus")
        if not 0 <= i < self.size:
            raise IndexError(i)
        self.built += 1
        return event(i + 1)


def test_misp_pages_a_large_lazy_corpus_without_copying() -> None:
    corpus = CountingCorpus(200_000)
    with serving(MispStandIn(corpus, key=MISP_KEY)) as server:
        misp = pymisp.PyMISP(server.url, MISP_KEY, ssl=False)
        page = misp.search(controller="events", limit=100, page=1500)
        assert [e["Event"]["id"] for e in page][:2] == ["149901", "149902"]
        assert corpus.built == 100  # straight to the page


def test_misp_over_https(pki: PKI) -> None:
    with serving(MispStandIn([event(1)], key=MISP_KEY, pki=pki)) as server:
        assert server.url.startswith("https://")
        misp = pymisp.PyMISP(server.url, MISP_KEY, ssl=str(pki.ca_path))
        assert len(misp.search(controller="events")) == 1


def test_real_events_load_and_serve(misp_real: MispStandIn) -> None:
    expected = load_events(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "misp-events")
    misp = pymisp.PyMISP(misp_real.url, MISP_KEY, ssl=False)
    events = misp.search(controller="events", metadata=True)
    assert len(events) == len(expected) == len(misp_real)
    flagged = sum(
        1
        for e in expected
        for a in [
            *e["Event"].get("Attribute", []),
            *(x for o in e["Event"].get("Object", []) for x in o.get("Attribute", [])),
        ]
        if a.get("to_ids") and not a.get("deleted")
    )
    assert len(misp.search(controller="attributes", to_ids=1)["Attribute"]) == flagged
    assert all(
        isinstance(e, pymisp.MISPEvent) for e in misp.search(controller="events", limit=5, page=2, pythonify=True)
    )


def test_misp_fixture_serves_tests_data(misp: MispStandIn) -> None:
    client = pymisp.PyMISP(misp.url, MISP_KEY, ssl=False)
    assert len(client.search(controller="events", metadata=True)) == len(misp)


# --------------------------------------------------------------------- faults
def test_fault_status_skip_match_and_retry_after(otx: OtxStandIn, pki: PKI) -> None:
    url = f"{otx.url}/api/v1/indicators/IPv4/8.8.8.8/general"
    headers = {"X-OTX-API-KEY": OTX_KEY}
    otx.inject("lookup", status=503, retry_after=7, skip=1, match=lambda r: "8.8.8.8" in r.path)
    other = requests.get(f"{otx.url}/api/v1/indicators/IPv4/9.9.9.9/general", headers=headers, verify=str(pki.ca_path))
    first = requests.get(url, headers=headers, verify=str(pki.ca_path))
    second = requests.get(url, headers=headers, verify=str(pki.ca_path))
    third = requests.get(url, headers=headers, verify=str(pki.ca_path))
    assert (other.status_code, first.status_code, second.status_code, third.status_code) == (200, 200, 503, 200)
    assert second.headers["Retry-After"] == "7"
    assert [r.status for r in otx.calls("lookup")] == [200, 200, 503, 200]


def test_fault_drop_delay_and_after(entra: EntraStandIn, defender: DefenderStandIn, pki: PKI) -> None:
    api = Api(defender, pki)
    defender.inject("list", drop=True)
    with pytest.raises(requests.ConnectionError):
        api.get()
    assert defender.calls("list")[-1].status == 0

    defender.inject("list", delay=0.2)
    started = time.monotonic()
    assert api.get().status_code == 200 and time.monotonic() - started >= 0.2

    defender.after("import", 1, entra.expire_all_tokens)
    assert api.import_(ind("8.8.8.8"))[0]["isFailed"] is False
    assert api.post("/api/indicators/import", {"Indicators": [ind("8.8.4.4")]}).status_code == 401


def test_close_leaves_nothing_running(pki: PKI) -> None:
    before = threading.active_count()
    server = OtxStandIn(pki).start()
    port = server.port
    requests.get(f"{server.url}/api/v1/indicators/IPv4/8.8.8.8/general", verify=str(pki.ca_path))
    server.close()
    assert threading.active_count() == before and not server.running
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_client_rejecting_our_cert_is_not_a_server_error(entra: EntraStandIn) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(entra.url, verify=True, timeout=5)  # the system store does not know our CA
    assert wait_for(lambda: entra.tls_rejections)


def test_ca_env_lets_plain_requests_verify(entra: EntraStandIn, ca_env: Path) -> None:
    resp = requests.get(f"{entra.authority}/v2.0/.well-known/openid-configuration", timeout=5)
    assert resp.json()["issuer"] == f"{entra.authority}/v2.0"


# ------------------------------------------------------------------------ OTX
def test_otx_lookups(pki: PKI) -> None:
    known = {("IPv4", "8.8.8.8"): 3, ("domain", "bad.example.com"): 1}
    with serving(OtxStandIn(pki, key=OTX_KEY, known=known, latency=0.05)) as otx:

        def get(section: str, value: str, key: str = OTX_KEY) -> requests.Response:
            return requests.get(
                f"{otx.url}/api/v1/indicators/{section}/{value}/general",
                headers={"X-OTX-API-KEY": key},
                verify=str(pki.ca_path),
                timeout=5,
            )

        started = time.monotonic()
        hit = get("IPv4", "8.8.8.8").json()
        assert time.monotonic() - started >= 0.05
        assert hit["pulse_info"]["count"] == 3 and len(hit["pulse_info"]["pulses"]) == 3
        assert get("domain", "BAD.example.com").json()["pulse_info"]["count"] == 1
        assert get("file", SHA256).json()["pulse_info"] == {**get("file", SHA256).json()["pulse_info"], "count": 0}
        assert get("url", "http://bad.example.com/x").json()["pulse_info"]["count"] == 0
        assert get("IPv4", "8.8.8.8", key="wrong").status_code == 403
        assert [r.endpoint for r in otx.log] == ["lookup"] * 6
