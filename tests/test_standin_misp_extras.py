"""Self-tests of the MISP stand-in's MISP 2.5 behaviours: the warninglist/metadata 500, the session
cookie (and its leak into PyMISP's 5xx log), unpublish on edit, normalisation on insert, sightings,
decaying models and the movable clock.

Driven through the real PyMISP (and ``requests`` where PyMISP has no call) over loopback. Expected
decay scores are worked out by hand in the comments (Polynomial: base × (1 − (t/lifetime)^(1/speed))).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pymisp
import pytest
import requests

from tests.standins.misp import COOKIE_NAME, DEFAULT_KEY, MispStandIn
from tests.util import serving

T0 = 1_700_000_000  # the stand-in's "now" in most tests
DAY = 86_400
SIGHT_KEY = "S1ght1ngK3y000000000000000000000000000000"
ADMIN_KEY = "Adm1nK3y0000000000000000000000000000000000"
MD5 = "d41d8cd98f00b204e9800998ecf8427e"
NO_MATCH = "No valid attributes found that match the criteria."


def attr(n: int, atype: str, value: str, *, ts: int = T0, **extra: Any) -> dict[str, Any]:
    return {
        "uuid": f"a0000000-0000-4000-8000-{n:012d}",
        "type": atype,
        "category": "Network activity",
        "value": value,
        "to_ids": True,
        "timestamp": str(ts),
        **extra,
    }


def event(n: int, attrs: Sequence[dict[str, Any]] = (), *, ts: int = T0, **extra: Any) -> dict[str, Any]:
    return {
        "Event": {
            "uuid": f"e0000000-0000-4000-8000-{n:012d}",
            "info": f"event {n}",
            "date": "2023-11-14",
            "timestamp": str(ts),
            "published": True,
            "publish_timestamp": str(ts),
            "Tag": [{"name": "tlp:white"}],
            "Attribute": list(attrs),
            **extra,
        }
    }


def auid(n: int) -> str:
    return f"a0000000-0000-4000-8000-{n:012d}"


def euid(n: int) -> str:
    return f"e0000000-0000-4000-8000-{n:012d}"


@pytest.fixture
def misp() -> Iterator[MispStandIn]:
    """Two events on a fixed clock (T0); one sighting key, one admin key."""
    corpus = [
        event(
            1,
            [
                attr(1, "ip-dst", "198.51.100.1", ts=T0 - 30 * DAY),
                attr(2, "domain", "Evil.Example", ts=T0 - 30 * DAY),
                attr(3, "ip-dst|port", "203.0.113.5|443"),
                attr(4, "md5", MD5, category="Payload delivery"),
                attr(5, "domain", "gone.example", deleted=True),
                attr(6, "domain", "quiet.example", to_ids=False),
            ],
        ),
        event(2, [attr(21, "domain", "evil.example", ts=T0 - 30 * DAY)]),
    ]
    with serving(
        MispStandIn(corpus, sighting_keys=[SIGHT_KEY], admin_keys=[ADMIN_KEY], clock=lambda: float(T0))
    ) as server:
        yield server


def client(server: MispStandIn, key: str = DEFAULT_KEY) -> pymisp.PyMISP:
    return pymisp.PyMISP(server.url, key, ssl=False)


def attribute(server: MispStandIn, n: int) -> dict[str, Any]:
    """The attribute as served (with its generated id)."""
    found = client(server).search(controller="attributes", uuid=auid(n), deleted=[0, 1])["Attribute"]
    assert len(found) == 1
    return found[0]  # type: ignore[no-any-return]


# ------------------------------------------------------------ warninglist bug
def test_metadata_with_warninglist_answers_500_only_when_an_event_matches(misp: MispStandIn) -> None:
    api = client(misp)
    with pytest.raises(pymisp.MISPServerError):
        api.search(controller="events", metadata=True, enforce_warninglist=True)
    with pytest.raises(pymisp.MISPServerError):
        api.search(controller="events", metadata=True, includeWarninglistHits=1)
    body = misp.calls("events", status=500)[-1]
    assert body.path == "/events/restSearch"
    # Either flag alone is fine; so is a query (or a page) without events.
    assert len(api.search(controller="events", metadata=True)) == 2
    assert len(api.search(controller="events", enforce_warninglist=True)) == 2
    assert api.search(controller="events", metadata=True, enforce_warninglist=True, eventid=999) == []
    assert api.search(controller="events", metadata=True, enforce_warninglist=True, limit=10, page=3) == []
    assert len(misp.calls("events", status=500)) == 2


def test_warninglist_bug_can_be_switched_off() -> None:
    with serving(MispStandIn([event(1)], warninglist_metadata_bug=False)) as server:
        assert len(client(server).search(controller="events", metadata=True, enforce_warninglist=True)) == 1


# -------------------------------------------------------------- session cookie
def test_every_response_sets_a_fresh_session_cookie_that_pymisp_sends_back(misp: MispStandIn) -> None:
    first = requests.get(f"{misp.url}/servers/getVersion", headers={"Authorization": DEFAULT_KEY}, timeout=5)
    denied = requests.get(f"{misp.url}/users/view/me", headers={"Authorization": "wrong"}, timeout=5)
    assert denied.status_code == 403
    for response, value in zip((first, denied), misp.cookies, strict=True):
        header = response.headers["Set-Cookie"]
        assert header.startswith(f"{COOKIE_NAME}={value};") and COOKIE_NAME.startswith("MISP-")
        assert "; path=/;" in header and "HttpOnly" in header
    assert misp.cookies[0] != misp.cookies[1]

    client(misp).search(controller="events")
    sent = misp.calls("events")[-1].headers["cookie"]
    assert sent == f"{COOKIE_NAME}={misp.cookies[-2]}"  # the value issued with the previous answer


def test_session_cookie_reaches_pymisp_critical_log_on_a_500(
    misp: MispStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pymisp")
    api = client(misp)
    with pytest.raises(pymisp.MISPServerError):
        api.search(controller="events", metadata=True, enforce_warninglist=True)
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "Something is broken server-side" in critical[0]
    leaked = [value for value in misp.cookies if value in critical[0]]
    assert leaked and misp.calls("events")[-1].headers["cookie"].endswith(leaked[0])
    assert DEFAULT_KEY not in critical[0]  # PyMISP strips only the Authorization value


# ----------------------------------------------------------- unpublish on edit
def test_edits_unpublish_when_asked_and_publish_republishes() -> None:
    now = [float(T0)]
    corpus = [event(1, [attr(1, "ip-dst", "198.51.100.1", ts=T0 - DAY)], ts=T0 - DAY)]
    with serving(MispStandIn(corpus, unpublish_on_edit=True, clock=lambda: now[0])) as server:
        api = client(server)

        def state() -> tuple[bool, str, str]:
            ev = api.search(controller="events", deleted=[0, 1])[0]["Event"]
            return ev["published"], ev["publish_timestamp"], ev["timestamp"]

        edits = [
            lambda: server.set_attribute(auid(1), to_ids=False),
            lambda: server.tag_event(euid(1), 'workflow:state="complete"'),
            lambda: server.untag_event(euid(1), "tlp:white"),
            lambda: server.tag_attribute(auid(1), {"name": "tlp:green", "colour": "#33ff00"}),
            lambda: server.untag_attribute(auid(1), "tlp:green"),
            lambda: server.delete_attribute(auid(1)),
        ]
        for n, edit in enumerate(edits, start=1):
            server.publish(euid(1))
            published_at = state()[1]
            now[0] += 60
            edit()
            assert state() == (False, published_at, str(T0 + 60 * n)), n
        assert api.search(controller="events", published=True) == []
        server.publish(euid(1))
        assert state() == (True, str(T0 + 360), str(T0 + 360))
        tagged = api.search(controller="attributes", deleted=[0, 1])["Attribute"][0]
        assert tagged["timestamp"] == str(T0 + 360) and tagged["Tag"] == []


def test_tag_methods_without_the_flag_keep_the_event_published(misp: MispStandIn) -> None:
    misp.unpublish_on_edit = False
    misp.tag_attribute(auid(4), "tlp:amber")
    misp.tag_attribute(auid(4), "tlp:amber")  # already attached: no second copy
    ev = client(misp).search(controller="events", eventid=1)[0]["Event"]
    assert ev["published"] is True and ev["timestamp"] == str(T0)
    md5 = next(a for a in ev["Attribute"] if a["uuid"] == auid(4))
    assert [t["name"] for t in md5["Tag"]] == ["tlp:amber"] and md5["Tag"][0]["local"] == 0
    assert client(misp).search(controller="attributes", tags=["tlp:amber"])["Attribute"][0]["uuid"] == auid(4)


# --------------------------------------------------------- insert like MISP
X509 = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01"
NORMALISED = [
    # (type, given, stored)
    ("ip-dst", "2001:0DB8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("ip-src", "  10.0.0.1 \n", "10.0.0.1"),
    ("ip-dst", "198.51.100[.]7", "198.51.100.7"),
    ("ip-dst", "192.0.2.9/32", "192.0.2.9"),
    ("ip-dst", "192.0.2.0/24", "192.0.2.0/24"),  # CIDR is valid in MISP (a range "a-b" is not)
    ("md5", MD5.upper(), MD5),
    ("sha256", "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
     "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    ("domain", "Example.COM.", "example.com"),
    ("domain", "bücher.de", "xn--bcher-kva.de"),
    ("hostname", "WWW.Example.ORG", "www.example.org"),
    ("url", "hxxp://evil[.]example/Path", "http://evil.example/Path"),
    ("x509-fingerprint-sha1", X509, "abcdef0123456789abcdef0123456789abcdef01"),
    ("ip-dst|port", "203.0.113.5:443", "203.0.113.5|443"),
    ("filename|md5", "Setup.EXE|" + MD5.upper(), "Setup.EXE|" + MD5),
    ("AS", "AS20491", "20491"),
]  # fmt: skip
DROPPED = [
    # (type, given, reason fragment)
    ("md5", MD5[:-1], "invalid length"),
    ("sha1", "z" * 40, "invalid length or format"),
    ("ip-dst", "999.1.2.3", "IP address has an invalid format"),
    ("ip-dst", "10.0.0.1-10.0.0.9", "IP address has an invalid format"),
    ("domain", "*.wild.net", "Domain has an invalid format"),
    ("domain", "http://bad.example.com", "Domain has an invalid format"),
    ("domain", "localhost", "Domain has an invalid format"),
    ("domain", "bad domain.example", "Domain has an invalid format"),
    ("ip-src", "   ", "empty"),
    ("ip-dst|port", "203.0.113.5", "Composite type"),
]


def test_normalise_on_insert_rewrites_values_and_drops_invalid_ones(misp: MispStandIn) -> None:
    given = [attr(100 + n, t, v, category="") for n, (t, v, _) in enumerate(NORMALISED)]
    bad = [attr(200 + n, t, v, category="") for n, (t, v, _) in enumerate(DROPPED)]
    duplicates = [
        attr(300, "domain", "EXAMPLE.com", category=""),  # same as "Example.COM." once normalised
        attr(301, "domain", "example.com", category="External analysis"),  # another category: kept
        attr(302, "domain", "example.com", category="", deleted=True),  # deleted ones are exempt
    ]
    stored = misp.add_event(event(3, [*given, *bad, *duplicates]), normalise=True)

    by_uuid = {a["uuid"]: a for a in stored["Attribute"]}
    for n, (atype, _, value) in enumerate(NORMALISED):
        assert by_uuid[auid(100 + n)]["value"] == value, atype
    assert by_uuid[auid(100)]["category"] == "Network activity" and by_uuid[auid(105)]["category"] == "Payload delivery"
    assert set(by_uuid) == {auid(100 + n) for n in range(len(NORMALISED))} | {auid(301), auid(302)}

    reasons = {d["uuid"]: d["reason"] for d in misp.dropped_on_insert}
    for n, (atype, value, fragment) in enumerate(DROPPED):
        assert fragment in reasons[auid(200 + n)], (atype, value, reasons[auid(200 + n)])
    assert "similar attribute already exists" in reasons[auid(300)]
    assert len(misp.dropped_on_insert) == len(DROPPED) + 1
    assert all(d["event_uuid"] == euid(3) for d in misp.dropped_on_insert)

    served = client(misp).search(controller="attributes", eventid=euid(3), deleted=[0, 1])["Attribute"]
    assert sorted(a["value"] for a in served) == sorted([v for _, _, v in NORMALISED] + ["example.com"] * 2)


def test_normalise_drops_objects_without_a_valid_template_uuid(misp: MispStandIn) -> None:
    def obj(n: int, template_uuid: str, *attrs: dict[str, Any]) -> dict[str, Any]:
        return {
            "uuid": f"0b000000-0000-4000-8000-{n:012d}",
            "name": "domain-ip",
            "meta-category": "network",
            "description": "A domain and its IP addresses.",
            "template_uuid": template_uuid,
            "template_version": "9",
            "Attribute": list(attrs),
        }

    good = obj(1, "43b3b146-77eb-4931-b4cc-b66c60f28734",
               attr(401, "domain", "Obj.Example", object_relation="domain"),
               attr(402, "domain", "obj.example", object_relation="domain"),  # duplicates are fine in objects
               attr(403, "ip-dst", "999.0.0.1", object_relation="ip"))  # fmt: skip
    bad = obj(2, "domain-ip", attr(404, "ip-dst", "192.0.2.1", object_relation="ip"))
    good["Attribute"].append({**attr(405, "ip-dst", "192.0.2.5", object_relation="ip"), "uuid": auid(400)})
    stored = misp.add_event(event(4, [attr(400, "domain", "obj.example")], Object=[good, bad]), normalise=True)
    assert [o["uuid"] for o in stored["Object"]] == [good["uuid"]]
    assert [a["value"] for a in stored["Object"][0]["Attribute"]] == ["obj.example", "obj.example"]
    dropped = {(d["kind"], d["uuid"]): d["reason"] for d in misp.dropped_on_insert}
    assert set(dropped) == {("attribute", auid(403)), ("object", bad["uuid"]), ("attribute", auid(400))}
    assert dropped[("attribute", auid(400))] == "The UUID provided is not unique"
    assert "template_uuid" in dropped[("object", bad["uuid"])]


def test_raw_insert_is_unchanged(misp: MispStandIn) -> None:
    raw = misp.add_event(event(5, [attr(500, "domain", "Example.COM."), attr(501, "md5", "not-a-hash")]))
    assert [a["value"] for a in raw["Attribute"]] == ["Example.COM.", "not-a-hash"]
    assert misp.dropped_on_insert == []


# ---------------------------------------------------------------- sightings
def test_sighting_permission_is_per_key(misp: MispStandIn) -> None:
    reader, sighter = client(misp), client(misp, SIGHT_KEY)
    denied = reader.add_sighting({"values": ["198.51.100.1"]})
    assert denied["errors"][0] == 403
    assert denied["errors"][1]["message"] == "You do not have permission to use this functionality."
    assert misp.sightings == []
    assert "Sighting" in sighter.add_sighting({"values": ["198.51.100.1"]})
    assert len(reader.search_sightings()) == 1  # restSearch is open to any key

    def role(key: str) -> tuple[bool, bool]:
        headers = {"Authorization": key, "Accept": "application/json"}
        version = requests.get(f"{misp.url}/servers/getVersion", headers=headers, timeout=5).json()
        me = requests.get(f"{misp.url}/users/view/me", headers=headers, timeout=5).json()
        return version["perm_sighting"], me["Role"]["perm_sighting"]

    assert role(DEFAULT_KEY) == (False, False) and role(SIGHT_KEY) == (True, True) and role(ADMIN_KEY) == (True, True)


def test_sighting_by_value_matches_each_half_case_insensitively(misp: MispStandIn) -> None:
    api = client(misp, SIGHT_KEY)
    added = api.add_sighting({"values": ["EVIL.example", "203.0.113.5"], "source": " defender:1 ", "type": 0,
                              "timestamp": T0 - 60})  # fmt: skip
    # One row per matched attribute: domain (event 1), ip-dst|port's first half, domain (event 2).
    rows = misp.sightings
    assert [r["attribute_id"] for r in rows] == [attribute(misp, n)["id"] for n in (2, 3, 21)]
    assert added == {"Sighting": rows[-1]} and rows[-1]["event_id"] == attribute(misp, 21)["event_id"]
    assert {r["source"] for r in rows} == {"defender:1"} and {r["date_sighting"] for r in rows} == {str(T0 - 60)}
    assert all(isinstance(v, str) for v in rows[0].values()) and rows[0]["type"] == "0"

    # Without filters deleted and non-IDS attributes are sighted too; `filters` takes the restSearch path.
    api.add_sighting({"values": ["gone.example", "quiet.example"]})
    assert len(misp.sightings) == 5 and misp.sightings[-1]["date_sighting"] == str(T0)
    failed = api.add_sighting({"values": ["gone.example", "quiet.example"], "filters": {"to_ids": 1}})
    assert failed == {"message": f"Could not add the Sighting. Reason: {NO_MATCH}"}
    api.add_sighting({"values": ["198.51.100.1", "quiet.example", "gone.example"], "filters": {"to_ids": 1}})
    assert len(misp.sightings) == 6 and misp.sightings[-1]["attribute_id"] == attribute(misp, 1)["id"]


def test_sighting_by_id_or_uuid_and_failures(misp: MispStandIn) -> None:
    api = client(misp, SIGHT_KEY)
    md5 = attribute(misp, 4)
    by_uuid = api.add_sighting({"source": "s", "type": "1"}, attribute=auid(4))
    by_id = api.add_sighting({"source": "s"}, attribute=int(md5["id"]))
    in_body = api.add_sighting({"uuid": auid(1)})
    assert [x["Sighting"]["attribute_id"] for x in (by_uuid, by_id)] == [md5["id"]] * 2
    assert by_uuid["Sighting"]["type"] == "1" and in_body["Sighting"]["attribute_id"] == attribute(misp, 1)["id"]
    assert misp.calls("sightings_add")[0].path == f"/sightings/add/{auid(4)}"

    def reason(body: dict[str, Any]) -> str:
        answer = api.add_sighting(body)
        assert set(answer) == {"message"}, answer  # failures are HTTP 200 with a message
        return str(answer["message"]).removeprefix("Could not add the Sighting. Reason: ")

    assert reason({"values": ["198.51.100.1"], "type": 3}).startswith("Invalid type")
    assert reason({"values": ["no.such.value"]}) == NO_MATCH
    assert reason({"value": "no.such.value"}) == NO_MATCH  # `value` is wrapped into `values`...
    assert misp.calls("sightings_add")[-1].body == {"value": "no.such.value"}  # ...not in the logged request
    assert reason({"source": "nothing to sight"}) == "No valid attributes found."
    assert reason({"values": ["198.51.100.1"], "timestamp": "2024-01-01T00:00:00"}) == (
        '{"date_sighting":["This field cannot be left blank"]}'
    )
    assert misp.calls("sightings_add", status=200) and len(misp.sightings) == 3


def test_expiration_sent_as_string_replaces_the_previous_one(misp: MispStandIn) -> None:
    api = client(misp, SIGHT_KEY)
    api.add_sighting({"type": 2}, attribute=auid(4))
    api.add_sighting({"type": 2}, attribute=auid(4))  # integer 2: both kept
    api.add_sighting({"type": "2"}, attribute=auid(4))  # string "2": earlier expirations go
    assert [(r["id"], r["type"]) for r in misp.sightings] == [("3", "2")]


def test_sighting_search_filters_and_shapes(misp: MispStandIn) -> None:
    for n, (source, stype, age) in enumerate([("a", 0, 1), ("b", 1, 2), ("a", 0, 40), ("c", 0, 3)]):
        misp.add_sighting(auid(1 if n < 3 else 4), source=source, type=stype, timestamp=T0 - age * DAY)
    api = client(misp)

    def ids(**kw: Any) -> list[str]:
        return [s["Sighting"]["id"] for s in api.search_sightings(**kw)]

    assert ids() == ["1", "2", "4"]  # default window: 30 days
    assert ids(publish_timestamp=0) == ["1", "2", "3", "4"]  # `last: 0` lifts it
    assert ids(publish_timestamp="2d") == ["1", "2"]
    assert ids(date_from=T0 - 41 * DAY, date_to=T0 - 2 * DAY) == ["2", "3", "4"]  # bounds inclusive
    assert ids(date_from=T0 - 41 * DAY, date_to=T0 - 2 * DAY - 1) == ["3", "4"]
    assert ids(date_from=T0 - 41 * DAY) == ["1", "2", "4"]  # `from` alone: ignored, 30-day default
    assert ids(source="a") == ["1"] and ids(source="A") == [] and ids(type_sighting="1") == ["2"]
    md5_id = int(attribute(misp, 4)["id"])
    assert ids(context="attribute", context_id=md5_id) == ["4"]
    assert ids(context="event", context_id=1, publish_timestamp=0) == ["1", "2", "3", "4"]
    assert ids(org=1) == [] and ids(org=misp._organisation("1")["uuid"]) == ["1", "2", "4"]

    full = api.direct_call(
        "sightings/restSearch/attribute",
        {"uuid": auid(4), "includeUuid": 1, "includeAttribute": 1, "includeEvent": 1, "source": ["c", "z"]},
    )
    assert [s["Sighting"]["id"] for s in full] == ["4"]
    one = full[0]["Sighting"]
    assert one["value"] == MD5 and one["attribute_uuid"] == auid(4) and one["event_uuid"] == euid(1)
    assert one["Attribute"] == {"id": str(md5_id), "value": MD5, "uuid": auid(4), "type": "md5",
                                "category": "Payload delivery", "to_ids": True}  # fmt: skip
    assert one["Event"]["uuid"] == euid(1) and one["Event"]["Orgc"] == {"name": "ORGNAME"}
    assert one["Organisation"]["name"] == "ORGNAME" and one["date_sighting"] == str(T0 - 3 * DAY)

    bad_id = api.search_sightings(context="attribute", context_id=str(md5_id))
    assert bad_id["errors"][0] == 400 and f"Invalid ID `{md5_id}`" in bad_id["errors"][1]["message"]
    assert api.direct_call("sightings/restSearch/attribute", {"last": 0})["errors"][0] == 400
    misp.disable_sighting_loading = True
    assert api.search_sightings(publish_timestamp=0) == []


def test_idempotent_report_lookup_by_source(misp: MispStandIn) -> None:
    """The dedupe pattern of misp-sightings.md §8: look the source up before adding."""
    api, sighter = client(misp), client(misp, SIGHT_KEY)
    ip_id = int(attribute(misp, 1)["id"])
    t = T0 - 45 * DAY  # older than the default window on purpose
    source = "defender:alert-0001"

    def already() -> bool:
        found = api.search_sightings(
            context="attribute", context_id=ip_id, source=source, date_from=t - 1, date_to=t + 1
        )
        return bool(found)

    assert not already()
    sighter.add_sighting({"source": source, "timestamp": t}, attribute=auid(1))
    assert already()
    batched = api.direct_call("sightings/restSearch", {"source": [source, "defender:other"], "last": 0})
    assert [s["Sighting"]["source"] for s in batched] == [source]
    assert api.search_sightings(source=source) == []  # the 30-day default hides it


# ---------------------------------------------------------- decaying models
def test_decaying_models_rest(misp: MispStandIn) -> None:
    reader, admin = client(misp), client(misp, ADMIN_KEY)
    listed = reader.decaying_models()
    assert [m["DecayingModel"]["name"] for m in listed] == [
        "Vishing model",
        "Phishing model",
        "NIDS Simple Decaying Model",
    ]
    nids = listed[-1]["DecayingModel"]
    assert nids["id"] == "1" and nids["enabled"] is False and nids["default"] is True
    assert nids["parameters"]["lifetime"] == 120.0 and nids["parameters"]["decay_speed"] == 2.0
    assert nids["parameters"]["threshold"] == 30.0 and nids["parameters"]["default_base_score"] == 80.0
    assert [m["DecayingModel"]["parameters"]["lifetime"] for m in listed[:2]] == [10.0, 3.0]
    assert reader.enable_decaying_model(1)["errors"][0] == 403
    enabled = admin.enable_decaying_model(1)
    assert enabled["message"] == "Decaying model enabled" and enabled["data"]["DecayingModel"]["enabled"] is True
    assert misp.model(1)["enabled"] is True
    assert admin.disable_decaying_model(1)["message"] == "Decaying model disabled"
    assert admin.enable_decaying_model(99)["errors"][0] == 404
    objects = reader.decaying_models(pythonify=True)
    assert isinstance(objects[0], pymisp.MISPDecayingModel) and objects[0].name == "Vishing model"


def test_models_load_only_on_update_when_asked() -> None:
    with serving(MispStandIn([], admin_keys=[ADMIN_KEY], decaying_models_loaded=False)) as server:
        admin = client(server, ADMIN_KEY)
        assert admin.decaying_models() == []
        assert client(server).update_decaying_models()["errors"][0] == 403
        assert admin.update_decaying_models()["message"] == "Default decaying models updated"
        assert len(admin.decaying_models()) == 3


def scores(api: pymisp.PyMISP, n: int, **kw: Any) -> list[tuple[str, Any, Any, bool]]:
    """(model name, score, base score, decayed) for attribute n, via attributes/restSearch."""
    found = api.search(controller="attributes", uuid=auid(n), include_decay_score=True, **kw)["Attribute"]
    assert len(found) == 1
    entries = found[0].get("decay_score", [])
    return [(d["DecayingModel"]["name"], d["score"], d["base_score"], d["decayed"]) for d in entries]


NIDS = "NIDS Simple Decaying Model"


def test_decay_scores_follow_the_polynomial(misp: MispStandIn) -> None:
    api = client(misp)
    assert scores(api, 1) == []  # all models disabled: no decay_score at all
    misp.enable_model(NIDS)
    # ip-dst last changed 30 days ago: 80 × (1 − (30/120)^(1/2)) = 80 × (1 − 0.5) = 40.0, above threshold 30
    assert scores(api, 1) == [(NIDS, 40.0, 80.0, False)]
    assert scores(api, 4) == []  # md5: no model maps it
    misp.advance(30 * DAY)
    # 60 days: 80 × (1 − √0.5) = 80 × 0.2928932… = 23.4314575…, below 30: decayed
    ((name, score, base, decayed),) = scores(api, 1)
    assert score == pytest.approx(23.4314575, abs=1e-6) and decayed is True
    misp.advance(61 * DAY)
    assert scores(api, 1) == [(NIDS, 0, 80.0, True)]  # 121 days > lifetime: floored at 0
    misp.enable_model("Phishing model")
    # domain, 121 days old: both models decayed (Phishing lifetime is 3 days)
    assert [(s[0], s[3]) for s in scores(api, 2)] == [(NIDS, True), ("Phishing model", True)]
    misp.disable_model(NIDS)
    misp.disable_model("Phishing model")
    assert scores(api, 2) == []


def test_a_sighting_resets_t0_unless_the_attribute_changed_after_it(misp: MispStandIn) -> None:
    api = client(misp)
    misp.enable_model(NIDS)
    misp.add_sighting(auid(1), type=1, timestamp=T0 - DAY)  # false positive: not a t0
    misp.add_sighting(auid(1), timestamp=T0 - 2 * DAY, org_id="2")  # another org: not visible under policy 0
    assert scores(api, 1) == [(NIDS, 40.0, 80.0, False)]
    client(misp, SIGHT_KEY).add_sighting({"values": ["198.51.100.1"], "timestamp": T0 - 7.5 * DAY})
    # 7.5 days since the sighting: 80 × (1 − (7.5/120)^(1/2)) = 80 × (1 − 0.25) = 60.0
    assert scores(api, 1) == [(NIDS, 60.0, 80.0, False)]
    misp.set_attribute(auid(1), comment="edited")  # timestamp now T0 > the sighting: t0 = timestamp
    assert scores(api, 1) == [(NIDS, 80.0, 80.0, False)]

    # last_seen stands in for a missing sighting: 80 × (1 − (30/120)^(1/2)) = 40.0
    misp.set_attribute(auid(2), timestamp=str(T0 - 60 * DAY), last_seen="2023-10-15T22:13:20.000000+00:00")
    assert T0 - 30 * DAY == 1_697_408_000  # = 2023-10-15T22:13:20Z
    assert scores(api, 2) == [(NIDS, 40.0, 80.0, False)]
    # a sighting in the future: negative elapsed time scores 0
    misp.add_sighting(auid(21), timestamp=T0 + DAY)
    assert scores(api, 21) == [(NIDS, 0, 80.0, True)]


def test_base_score_from_taxonomy_tags(misp: MispStandIn) -> None:
    misp.enable_model(NIDS)
    misp.tag_attribute(auid(1), {"name": 'false-positive:risk="low"', "numerical_value": 50})
    # the only weighted tag: ratio 1, base 50; tagging touched the attribute (t0 = T0): score 50.0
    assert scores(client(misp), 1) == [(NIDS, 50.0, 50.0, False)]
    misp.advance(30 * DAY)
    # 30 days: 50 × (1 − 0.5) = 25.0 < 30
    assert scores(client(misp), 1) == [(NIDS, 25.0, 50.0, True)]


def test_exclude_decayed_and_model_choice_on_attributes(misp: MispStandIn) -> None:
    api = client(misp)
    misp.enable_model(NIDS)
    misp.enable_model("Phishing model")  # 3-day lifetime: decayed for every attribute here
    misp.advance(30 * DAY)  # attributes 1, 2, 21 are 60 days old (decayed); 3 is 30 days (NIDS 40.0)
    kept = api.search(controller="attributes", exclude_decayed=True)["Attribute"]
    assert sorted(a["uuid"] for a in kept) == [auid(3), auid(4), auid(6)]  # md5: no model, kept
    three = next(a for a in kept if a["uuid"] == auid(3))
    assert [d["decayed"] for d in three["decay_score"]] == [False, True]  # not *all* decayed: kept
    misp.disable_model("Phishing model")
    assert misp.calls("attributes")[-1].body["excludeDecayed"] == 1
    # Dropped after LIMIT, as MISP does: page 1 (attributes 1 and 2) comes back empty, page 2 does not.
    assert api.search(controller="attributes", exclude_decayed=True, limit=2, page=1)["Attribute"] == []
    assert misp.calls("attributes")[-1].status == 200
    page2 = api.search(controller="attributes", exclude_decayed=True, limit=2, page=2)["Attribute"]
    assert [a["uuid"] for a in page2] == [auid(3), auid(4)]
    skipped = requests.post(f"{misp.url}/attributes/restSearch", json={"excludeDecayed": 1, "limit": 2, "page": 1},
                            headers={"Authorization": DEFAULT_KEY}, timeout=5)  # fmt: skip
    assert skipped.headers["X-Skipped-Elements-Count"] == "2" and skipped.json() == {"response": {"Attribute": []}}

    misp.disable_model(NIDS)
    # decayingModel names model *ids*; MISP then uses them even when disabled
    assert scores(api, 3, decayingModel=[1]) == [(NIDS, 40.0, 80.0, False)]
    assert scores(api, 4, decayingModel=[1]) == [(NIDS, 40.0, 80.0, False)]  # any type
    assert scores(api, 3, decayingModel=NIDS) == []  # a name selects nothing
    assert scores(api, 3, decayingModel=[1], score=50) == [(NIDS, 40.0, 80.0, True)]  # threshold override


def test_events_scope_scores_every_attribute_but_ignores_exclude_decayed(misp: MispStandIn) -> None:
    misp.enable_model(NIDS)
    obj = {"name": "domain-ip", "meta-category": "network", "template_uuid": "43b3b146-77eb-4931-b4cc-b66c60f28734",
           "Attribute": [attr(600, "ip-dst", "192.0.2.60", ts=T0 - 90 * DAY, object_relation="ip")]}  # fmt: skip
    misp.add_event(event(6, [attr(601, "ip-dst", "192.0.2.61", ts=T0 - 30 * DAY)], Object=[obj]))
    ev = client(misp).search(controller="events", eventid=euid(6), include_decay_score=True, exclude_decayed=True)
    body = ev[0]["Event"]
    assert [d["score"] for d in body["Attribute"][0]["decay_score"]] == [40.0]
    # 90 days: 80 × (1 − (90/120)^(1/2)) = 80 × (1 − 0.8660254…) = 10.7179677…, decayed but still served
    inner = body["Object"][0]["Attribute"][0]["decay_score"][0]
    assert inner["score"] == pytest.approx(10.7179677, abs=1e-6) and inner["decayed"] is True
    plain = client(misp).search(controller="events", eventid=euid(6))[0]["Event"]
    assert "decay_score" not in plain["Attribute"][0]


# ------------------------------------------------------------------- clock
def test_one_clock_drives_time_filters_too() -> None:
    corpus = [event(1, ts=T0 - 2 * DAY), event(2, ts=T0 - 3 * 3600)]
    with serving(MispStandIn(corpus, clock=lambda: float(T0))) as server:
        api = client(server)
        assert [e["Event"]["id"] for e in api.search(controller="events", publish_timestamp="1d")] == ["2"]
        server.advance(-DAY)  # now T0 - 1 d: event 2 is in the future, event 1 a day old
        assert [e["Event"]["id"] for e in api.search(controller="events", publish_timestamp="25h")] == ["1", "2"]
        server.clock = lambda: float(T0 + 10 * DAY)  # replacing the clock keeps the offset
        assert api.search(controller="events", publish_timestamp="8d") == []
        assert server.add_event(event(3))["timestamp"] == str(T0)  # explicit timestamps are kept


class CountingCorpus(Sequence[dict[str, Any]]):
    """Lazy corpus that counts how many events were built."""

    def __init__(self, size: int) -> None:
        self.size, self.built = size, 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice) or not 0 <= i < self.size:
            raise IndexError(i)
        self.built += 1
        return event(i + 1, [attr(i + 1, "ip-dst", f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}")])


def test_decay_scores_cost_only_the_served_page() -> None:
    corpus = CountingCorpus(100_000)
    with serving(MispStandIn(corpus, clock=lambda: float(T0))) as server:
        server.enable_model(NIDS)
        page = client(server).search(controller="events", limit=50, page=900, include_decay_score=True)
        assert len(page) == 50 and corpus.built == 50
        assert page[0]["Event"]["Attribute"][0]["decay_score"][0]["score"] == 80.0
