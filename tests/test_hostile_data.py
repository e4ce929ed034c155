"""Hostile MISP data: whatever a MISP (or a proxy in front of it) sends, reading and mapping never
crash, and every attribute that does not become a candidate is counted with a reason."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import Tool
from tests.util import m2d, make_settings

NOW = 1_795_000_000.0
SETTINGS = make_settings()
MAPPABLE = sorted({*m2d.TYPE_MAP, *m2d.SPLIT_TYPES})

odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1000, max_size=5000),
    st.sampled_from(["|", "||", "a|b|c", "1.2.3.4|", "|443", "hxxp://x[.]y", "xn--", "\u202e", "\x00",
                     "::ffff:10.0.0.1", "8.8.8.8", "185.220.101.4|99999", "d41d8cd98f00b204e9800998ecf8427e"]),
)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), odd_text)
tags = st.one_of(scalar, st.lists(st.one_of(scalar, st.fixed_dictionaries({"name": scalar})), max_size=4))
attribute = st.one_of(
    scalar,
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.one_of(st.sampled_from(MAPPABLE), scalar),
            "value": st.one_of(odd_text, scalar),
            "to_ids": scalar, "deleted": scalar, "timestamp": scalar, "first_seen": scalar,
            "last_seen": scalar, "comment": scalar, "category": scalar, "uuid": scalar, "Tag": tags,
        },
    ),
)
event = st.fixed_dictionaries(
    {},
    optional={
        "id": scalar, "uuid": scalar, "info": scalar, "timestamp": scalar, "Tag": tags,
        "Attribute": st.one_of(scalar, st.lists(attribute, max_size=6)),
        "Object": st.one_of(scalar, st.lists(st.one_of(scalar, st.fixed_dictionaries(
            {}, optional={"Attribute": st.one_of(scalar, st.lists(attribute, max_size=4))})), max_size=3)),
    },
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(event, min_size=1, max_size=3))
def test_hostile_events_never_crash_and_every_attribute_is_accounted_for(events: list[dict]) -> None:
    desired = m2d.collect(events, SETTINGS, NOW)
    kinds: dict[str, int] = {"candidate": 0, "retraction": 0, "rejected": 0, "skipped": 0}
    for one in events:
        context = m2d.event_context(one)
        for attr in m2d.event_attributes(one, flatten_objects=True):
            results = m2d.map_attribute(attr, context, SETTINGS, NOW)
            assert results, "an attribute vanished without an outcome"
            for result in results:
                kind = "candidate" if isinstance(result, m2d.Candidate) else result.kind
                kinds[kind] += 1
                if kind in ("rejected", "skipped"):
                    assert result.reason
    assert sum(desired.rejected.values()) == kinds["rejected"]
    assert sum(desired.skipped.values()) == kinds["skipped"] + kinds["retraction"]  # a retraction is skipped too
    # The counts add up: every value mapping made is a candidate, a duplicate, rejected or skipped.
    values = sum(kinds.values())
    assert desired.values == values >= desired.attributes
    assert desired.distinct + desired.duplicates + sum(desired.rejected.values()) + sum(desired.skipped.values()) \
        == values
    assert len(desired.candidates) + desired.duplicates == kinds["candidate"]
    assert len(desired.retractions) <= kinds["retraction"]
    for candidate in desired.candidates.values():
        item = m2d.indicator_json(candidate, SETTINGS)
        assert item["indicatorValue"] and item["indicatorType"] in m2d.INDICATOR_TYPES


def test_nonsense_timestamps_fall_back_instead_of_crashing() -> None:
    for stamp in ("nan", "inf", "-inf", "1e300", [], {"a": 1}):
        attr = {"type": "domain", "value": "bad.site", "to_ids": True, "timestamp": stamp,
                "first_seen": "not a date", "last_seen": stamp}
        event = m2d.EventContext("1", "u", "i", frozenset(), NOW)
        [result] = m2d.map_attribute(attr, event, SETTINGS, NOW)
        # Falls back to the event timestamp (NOW here) as valid_from: 300 days for DomainName.
        assert result.expiration == NOW + 300 * 86400
        assert m2d.indicator_json(result, SETTINGS)["expirationTime"] == "2027-09-14T11:06:40Z"


def test_hostile_events_through_misp_and_the_whole_run(tool: Tool) -> None:
    hostile = {"Event": {
        "uuid": "70000000-0000-4000-8000-000000000070", "info": "x" * 100_000, "published": True,
        "Tag": [{"name": 'workflow:state="complete"'}, {"name": None}, "not-a-tag"],
        "Attribute": [
            {"uuid": "a1", "type": "domain", "to_ids": True, "value": "still-syncs.top", "Tag": "tlp:clear"},
            {"uuid": "a2", "type": "ip-dst", "to_ids": True, "value": None},
            {"uuid": "a3", "type": "url", "to_ids": True, "value": "http://\u202eevil.top/" + "a" * 5000},
            {"uuid": "a4", "type": "ip-dst|port", "to_ids": True, "value": "1.2.3.4|80|80"},
            {"uuid": "a5", "type": None, "value": "x"},
            {"uuid": "a6", "type": "sha256", "to_ids": "yes", "value": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4"},
        ],
        "Object": [{"name": "file", "Attribute": [
            {"uuid": "a7", "type": "md5", "to_ids": True, "value": "d41d8cd98f00b204e9800998ecf8427e",
             "timestamp": "not a number", "first_seen": "yesterday"}]}],
    }}
    tool.misp.add_event(hostile)
    result = tool.run()
    assert result.code == 0, result.stderr
    held = {v for _, v, _ in tool.held()}
    assert {"still-syncs.top", "d41d8cd98f00b204e9800998ecf8427e"} <= held
    reasons = result.report["rejected_by_reason"]
    assert reasons["empty or missing value"] == 1 + 1  # a2, plus the sample events' own empty domain
    assert reasons["composite ip-dst|port value must hold exactly one '|'"] == 1
    assert result.report["skipped_by_reason"]["attribute has no type"] == 1
    assert result.report["skipped_by_reason"]["to_ids is not set"] >= 1
