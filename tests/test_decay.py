"""MISP decaying models drive selection, cap priority and expiry (issue 16).

The MISP stand-in scores attributes with MISP's Polynomial formula and its shipped "NIDS Simple
Decaying Model" (lifetime 120 days, decay speed 2, threshold 30, base score 80): for an attribute
last seen t days ago, score = 80 × (1 − (t/120)^(1/2)). The expected scores below are worked out by
hand from that formula:

    t =  0 days: 80.0          t = 30 days: 80 × (1 − 0.5)      = 40.0
    t = 10 days: 56.9          t = 60 days: 80 × (1 − 0.7071)   = 23.4  (below 30: decayed)
    t = 20 days: 47.3          t = 100 days: 80 × (1 − 0.9129)  =  7.0  (decayed)

The score reaches the threshold 30 when (t/120)^(1/2) = 1 − 30/80, at t = 120 × 0.625² = 46.875 days.
"""

from __future__ import annotations

import time

import pytest

from tests.harness import Tool
from tests.util import TEST_CLIENT_ID

DAY = 86400
NIDS = "NIDS Simple Decaying Model"
FILTERS = {"published": True, "tags": ["decay-test"]}


def decay_event(ages: dict[str, float], now: float | None = None) -> dict:
    """One event whose domain attributes were last touched ``ages[value]`` days ago."""
    now = time.time() if now is None else now
    attributes = [{"uuid": f"d0000000-0000-4000-8000-{n:012d}", "type": "domain", "category": "Network activity",
                   "to_ids": True, "value": value, "timestamp": str(int(now - age * DAY))}
                  for n, (value, age) in enumerate(ages.items())]
    return {"Event": {"uuid": "d1000000-0000-4000-8000-000000000001", "info": "decay test", "published": True,
                      "Tag": [{"name": "decay-test"}], "Attribute": attributes}}


@pytest.fixture
def nids(tool: Tool) -> dict:
    tool.misp.enable_model(NIDS)
    return {"decay_model": NIDS, "misp_event_filters": FILTERS}


def held(tool: Tool) -> set[str]:
    return {v for _, v, _ in tool.held()}


def test_decayed_attributes_are_not_pushed_and_are_counted_with_their_reason(tool: Tool, nids: dict) -> None:
    tool.misp.add_event(decay_event({"fresh.top": 0, "month.top": 30, "two-months.top": 60, "old.top": 100}))
    result = tool.run(**nids)
    assert result.code == 0, result.stderr
    assert held(tool) == {"fresh.top", "month.top"}
    assert result.report["skipped_by_reason"]["decayed (score below 30)"] == 2
    query = tool.misp.calls("events")[-1].body
    assert query["includeDecayScore"] == 1 and "decayingModel" not in query


def test_an_owned_indicator_whose_attribute_decays_goes_but_never_after_a_partial_read(tool: Tool,
                                                                                       nids: dict) -> None:
    tool.misp.add_event(decay_event({"fresh.top": 0, "ageing.top": 20}))
    tool.misp.add_event({"Event": {"uuid": "d2000000-0000-4000-8000-000000000002", "info": "second page",
                                   "published": True, "Tag": [{"name": "decay-test"}], "Attribute": []}})
    assert tool.run(**nids).code == 0 and held(tool) == {"fresh.top", "ageing.top"}
    tool.misp.advance(30 * DAY)  # ageing.top is 50 days old now: 80 × (1 − (50/120)^½) = 28.4 < 30
    tool.misp.fail_page(2, times=50)
    partial = tool.run(misp_event_limit_per_page=1, **nids)
    assert partial.code == 1 and held(tool) == {"fresh.top", "ageing.top"}  # read in part: nothing goes
    complete = tool.run(**nids)
    assert complete.code == 0, complete.stderr
    assert held(tool) == {"fresh.top"}
    assert complete.report["deleted_by_reason"] == {"retracted: decayed (score below 30)": 1}


def test_over_the_cap_the_highest_scores_win(tool: Tool, nids: dict) -> None:
    tool.misp.add_event(decay_event({"s40.top": 30, "s80.top": 0, "s47.top": 20, "s57.top": 10}))
    result = tool.run(defender_max_indicators=2, **nids)
    assert result.code == 1  # two left out by the cap
    assert held(tool) == {"s80.top", "s57.top"}
    left = {item["value"]: item["score"] for item in result.report["left_out_items"]}
    assert left == {"s47.top": pytest.approx(47.3, abs=0.1), "s40.top": pytest.approx(40.0, abs=0.1)}


def test_decay_expiry_is_the_predicted_crossing_and_a_sighting_moves_it_later(tool: Tool, nids: dict) -> None:
    now = time.time()
    tool.misp.add_event(decay_event({"predicted.top": 30}, now))
    assert tool.run(decay_expiry=True, **nids).code == 0
    [indicator] = tool.defender.owned_by(TEST_CLIENT_ID)
    crossing = now - 30 * DAY + 46.875 * DAY  # the attribute's time plus 46.875 days
    assert abs(m2d_time(indicator["expirationTime"]) - crossing) < 60
    steady = tool.run(decay_expiry=True, **nids)
    assert steady.code == 0 and steady.counts["updated"] == 0  # the prediction does not drift run to run
    tool.misp.add_sighting("d0000000-0000-4000-8000-000000000000", type=0, source="a SOC analyst",
                           timestamp=int(now))
    refreshed = tool.run(decay_expiry=True, **nids)
    assert refreshed.code == 0 and refreshed.counts["updated"] == 1
    [indicator] = tool.defender.owned_by(TEST_CLIENT_ID)
    assert abs(m2d_time(indicator["expirationTime"]) - (now + 46.875 * DAY)) < 60


def m2d_time(text: str) -> float:
    from tests.util import m2d

    parsed = m2d.parse_time(text)
    assert parsed is not None
    return parsed


@pytest.mark.parametrize("problem", ["missing", "disabled"])
def test_a_model_that_is_missing_or_disabled_stops_the_run_with_the_fix(tool: Tool, problem: str) -> None:
    model = "A model nobody loaded" if problem == "missing" else NIDS  # NIDS is loaded but disabled
    result = tool.run(decay_model=model, misp_event_filters=FILTERS)
    assert result.code == 2
    assert ("no such decaying model" if problem == "missing" else "is disabled") in result.stderr
    assert tool.defender.calls("import") == []
    check = tool.run("--check", decay_model=model, misp_event_filters=FILTERS)
    assert check.code == 2
    assert "✗ MISP decaying model:" in check.stdout and "Enable the one decay_model names" in check.stdout


def test_check_names_the_model_and_what_it_scores(tool: Tool, nids: dict) -> None:
    tool.misp.add_event(decay_event({"fresh.top": 0, "month.top": 30}))
    check = tool.run("--check", **nids)
    assert check.code == 0, check.stdout
    assert f"✓ MISP: decaying model '{NIDS}' (id 1) is enabled; it scores 2 of 2 selected attributes" in check.stdout


def test_dry_run_shows_the_scores(tool: Tool, nids: dict) -> None:
    tool.misp.add_event(decay_event({"month.top": 30}))
    result = tool.run("--dry-run", **nids)
    assert "DomainName month.top [Audit, Medium, score 40.0," in result.stdout


def test_a_type_the_model_does_not_cover_is_never_scored_by_any_read(tool: Tool, nids: dict) -> None:
    # The NIDS model covers network types, not hashes. The events read and the value check must
    # agree: an old sha256 is unscored in both, so a retraction elsewhere never deletes it.
    now = time.time()
    old, recent = int(now - 200 * DAY), int(now - 60)
    sha256 = "ab" * 32
    for uuid, stamp, to_ids in (("d2000000-0000-4000-8000-000000000001", old, True),
                                ("d3000000-0000-4000-8000-000000000001", recent, False)):
        tool.misp.add_event({"Event": {
            "uuid": uuid, "info": "hash", "published": True, "timestamp": str(stamp), "publish_timestamp": str(stamp),
            "Tag": [{"name": "decay-test"}],
            "Attribute": [{"uuid": uuid[:-1] + "9", "type": "sha256", "category": "Payload delivery",
                           "to_ids": to_ids, "value": sha256, "timestamp": str(stamp)}]}})
    tool.misp.add_event(decay_event({f"filler{n}.top": 0 for n in range(5)}))  # so the guard stays quiet
    assert tool.run("--full-sync", **nids).code == 0
    assert sha256 in held(tool)
    windowed = {**nids, "misp_event_filters": {**FILTERS, "publish_timestamp": "1d"}}
    result = tool.run(**windowed)
    assert result.code == 0, result.stderr
    assert sha256 in held(tool), "the older event still carries it, unscored"
    assert result.report["kept_by_reason"]["still carried by a selected MISP attribute"] == 1
    check = tool.run("--check", **nids)
    assert "it scores 5 of 6 selected attributes" in check.stdout  # the hash is not scored here either
