"""Planning: desired set × Defender listing → Plan. Pure data in, pure data out."""

from __future__ import annotations

import dataclasses

import pytest

from tests.util import m2d, make_candidate, make_settings

NOW = 1_795_000_000.0
DAY = 86400.0
CLIENT = "test-client"


def candidate(value: str, *, type_: str = "DomainName", action: str = "Audit", severity: str = "Medium",
              expires_in_days: float | None = 90, lifetime: int = 90, title: str = "event",
              stamp: float = NOW) -> m2d.Candidate:
    return make_candidate(value, indicator_type=type_, action=action, severity=severity, lifetime_days=lifetime,
                          expiration=None if expires_in_days is None else NOW + expires_in_days * DAY, title=title,
                          attribute_timestamp=stamp)


def existing(id_: str, value: str, *, type_: str = "DomainName", action: str = "Audit", severity: str = "Medium",
             expires_in_days: float | None = 90, title: str = "event", owned: bool = True) -> m2d.Existing:
    return m2d.Existing(id=id_, indicator_type=type_, value=value, action=action, severity=severity, title=title,
                        expiration=None if expires_in_days is None else NOW + expires_in_days * DAY, owned=owned)


def desired(*candidates: m2d.Candidate, retractions: dict | None = None) -> m2d.Desired:
    result = m2d.Desired()
    for c in candidates:
        result.candidates[c.key] = c
    result.retractions.update(retractions or {})
    return result


def make_plan(wanted: m2d.Desired, held: list[m2d.Existing], *, read_complete: bool = True,
              full_sync: bool = False, force: bool = False, still_selected: frozenset = frozenset(),
              **config: object) -> m2d.Plan:
    return m2d.plan(wanted, held, make_settings(**config), read_complete=read_complete, full_sync=full_sync,
                    still_selected=still_selected, force=force, now=NOW)


def values(changes: list) -> list[str]:
    return sorted(c.candidate.value if isinstance(c, m2d.Change) else c.value for c in changes)


def test_creates_what_is_missing_and_keeps_what_matches() -> None:
    result = make_plan(desired(candidate("a.top"), candidate("b.top")), [existing("1", "a.top")])
    assert values(result.creates) == ["b.top"]
    assert (result.updates, result.deletes, result.keeps) == ([], [], {"unchanged": 1})


def test_hours_of_expiry_drift_are_not_a_change() -> None:
    # current_date: every run wants an expiry a few hours later than the last run wrote.
    result = make_plan(desired(candidate("a.top", expires_in_days=90)), [existing("1", "a.top", expires_in_days=89.7)])
    assert result.updates == [] and result.keeps == {"unchanged": 1}


def test_expiry_falling_well_short_is_refreshed_but_never_shortened() -> None:
    refresh = make_plan(desired(candidate("a.top", expires_in_days=90)), [existing("1", "a.top", expires_in_days=1)])
    assert values(refresh.updates) == ["a.top"] and "expiry refresh" in refresh.updates[0].reason
    later = make_plan(desired(candidate("a.top", expires_in_days=10)), [existing("1", "a.top", expires_in_days=300)])
    assert later.updates == []


@pytest.mark.parametrize("held, reason_part", [
    (existing("1", "a.top", severity="Low"), "severity Low → Medium"),
    (existing("1", "a.top", title="old title"), "title changed"),
])
def test_users_would_notice_severity_or_title_changes(held: m2d.Existing, reason_part: str) -> None:
    result = make_plan(desired(candidate("a.top")), [held])
    assert [c.reason for c in result.updates] == [reason_part]


def test_foreign_indicators_are_never_touched() -> None:
    foreign = existing("9", "a.top", action="Block", severity="High", owned=False)
    result = make_plan(desired(candidate("a.top")), [foreign], full_sync=True)
    assert (result.creates, result.updates, result.deletes) == ([], [], [])
    assert result.keeps == {"held by another application": 1}
    unrelated = make_plan(desired(), [existing("9", "z.top", owned=False)], full_sync=True)
    assert unrelated.deletes == []


def test_action_change_creates_the_new_one_then_replaces_the_old() -> None:
    result = make_plan(desired(candidate("a.top", action="Block")), [existing("7", "a.top", action="Audit")])
    [create] = result.creates
    assert (create.candidate.action, create.replaces) == ("Block", "7")
    assert [(d.id, d.reason) for d in result.replaced] == [("7", "replaced by action Block")]
    assert result.deletes == []


def test_owned_duplicates_left_by_an_interrupted_run_are_cleaned_up() -> None:
    held = [existing("7", "a.top", action="Audit"), existing("8", "a.top", action="Block")]
    result = make_plan(desired(candidate("a.top", action="Block")), held)
    assert result.creates == [] and [(d.id, d.reason) for d in result.deletes] == [
        ("7", "duplicate of an owned indicator")]


def test_incremental_run_deletes_only_retractions_not_still_selected_elsewhere() -> None:
    held = [existing("1", "gone.top"), existing("2", "off.top"), existing("3", "elsewhere.top"),
            existing("4", "outside-window.top")]
    wanted = desired(retractions={("DomainName", "gone.top"): "deleted in MISP",
                                  ("DomainName", "off.top"): "to_ids turned off",
                                  ("DomainName", "elsewhere.top"): "to_ids turned off"})
    result = make_plan(wanted, held, still_selected=frozenset({("DomainName", "elsewhere.top")}),
                       remove_guard_percent=100)
    assert [(d.id, d.reason) for d in result.deletes] == [("1", "retracted: deleted in MISP"),
                                                         ("2", "retracted: to_ids turned off")]


def test_full_sync_deletes_owned_indicators_no_longer_selected() -> None:
    held = [existing("1", "a.top"), existing("2", "b.top"), existing("3", "c.top", owned=False)]
    result = make_plan(desired(candidate("a.top")), held, full_sync=True)
    assert [(d.id, d.reason) for d in result.deletes] == [("2", "not selected in MISP any more")]


def test_incomplete_read_withholds_every_delete() -> None:
    held = [existing("1", "a.top"), existing("2", "b.top")]
    result = make_plan(desired(candidate("a.top")), held, full_sync=True, read_complete=False)
    assert result.deletes == [] and "read only in part" in result.deletes_withheld


def test_mass_delete_guard_stops_unless_forced() -> None:
    held = [existing(str(i), f"d{i}.top") for i in range(10)]
    wanted = desired(candidate("d0.top"), candidate("d1.top"))
    guarded = make_plan(wanted, held, full_sync=True)
    assert guarded.deletes == [] and "8 of 10" in guarded.deletes_withheld and "--force" in guarded.deletes_withheld
    forced = make_plan(wanted, held, full_sync=True, force=True)
    assert len(forced.deletes) == 8 and forced.deletes_withheld == ""
    below = make_plan(wanted, held, full_sync=True, remove_guard_percent=80)
    assert len(below.deletes) == 8


def test_cap_keeps_by_priority_and_reports_the_rest() -> None:
    held = [existing(f"f{i}", f"foreign{i}.top", owned=False) for i in range(7)]
    wanted = desired(
        candidate("low-audit.top", severity="Low"),
        candidate("high-audit.top", severity="High"),
        candidate("high-block-old.top", severity="High", action="Block", stamp=NOW - 100),
        candidate("high-block-new.top", severity="High", action="Block", stamp=NOW),
        candidate("medium-block.top", action="Block"),
    )
    result = make_plan(wanted, held, defender_max_indicators=10)  # room 3
    assert result.room == 3
    assert values(result.creates) == ["high-audit.top", "high-block-new.top", "high-block-old.top"]
    assert values(result.left_out) == ["low-audit.top", "medium-block.top"]


def test_deletes_free_room_for_creates_in_the_same_run() -> None:
    held = [existing("1", "old.top"), existing("f", "foreign.top", owned=False)]
    wanted = desired(candidate("new1.top"), candidate("new2.top"))
    result = make_plan(wanted, held, full_sync=True, defender_max_indicators=3, force=True)
    assert [d.id for d in result.deletes] == ["1"] and values(result.creates) == ["new1.top", "new2.top"]
    assert result.left_out == []


def test_desired_keeps_only_held_keys_and_the_best_others_in_full() -> None:
    held = existing("1", "held.top", severity="Low")
    bounded = m2d.Desired(interesting=frozenset({held.key}), room=2)
    for c in (candidate("held.top", severity="Low"), candidate("low.top", severity="Low"),
              candidate("high.top", severity="High"), candidate("medium.top"), candidate("LOW2.top", severity="Low"),
              candidate("low.top", severity="High")):  # a stronger duplicate of an evicted key comes back
        bounded.add(c)
    bounded.finish()
    assert sorted(k[1] for k in bounded.candidates) == ["held.top", "high.top", "low.top"]
    assert (bounded.distinct, bounded.duplicates, bounded.evicted) == (5, 1, 2)
    result = m2d.plan(bounded, [held], make_settings(defender_max_indicators=3), read_complete=True,
                      full_sync=False, now=NOW)
    assert values(result.creates) == ["high.top", "low.top"]
    assert result.left_out_count == 2
    assert values(result.left_out) == ["LOW2.top", "medium.top"]


def test_the_left_out_list_keeps_one_entry_per_value_and_the_best_values() -> None:
    bounded = m2d.Desired(interesting=frozenset(), room=1)
    bounded.add(candidate("kept.top", severity="High"))
    for event in range(600):  # two values met again and again: each still takes one place in the list
        for value in ("again.top", "and-again.top"):
            bounded.add(candidate(value, stamp=NOW - event))
    for number in range(1500):
        bounded.add(candidate(f"other{number:04d}.top", severity="Low"))
    bounded.finish()
    listed = [c.value for c in bounded.evicted_sample]
    assert len(listed) == len(set(listed)) == m2d.EVICTED_LISTED
    assert listed[:2] == ["and-again.top", "again.top"] or listed[:2] == ["again.top", "and-again.top"]
    assert bounded.evicted == 1502


@pytest.mark.parametrize("held, config, reason", [
    (dict(generate_alert=True), {"defender_generate_alert": False, "defender_action": "Block"},
     "generateAlert → False"),
    (dict(recommended_actions="Block"), {"defender_recommended_actions": "Isolate the host"},
     "recommended actions changed"),
    (dict(rbac_groups=()), {"defender_rbac_group_names": ["Servers"]}, "device groups changed"),
    (dict(rbac_groups=("Servers",), recommended_actions="Block", generate_alert=False),
     {"defender_rbac_group_names": ["Servers"], "defender_generate_alert": False, "defender_action": "Block"}, ""),
])
def test_config_changes_that_apply_to_every_indicator_reach_existing_ones(held: dict, config: dict,
                                                                           reason: str) -> None:
    settings = make_settings(**config)
    wanted = candidate("a.top", action="Block")
    wanted.generate_alert = settings.generate_alert
    base = existing("1", "a.top", action="Block")
    result = m2d.plan(desired(wanted), [dataclasses.replace(base, **held)],
                      settings, read_complete=True, full_sync=False, now=NOW)
    assert [c.reason for c in result.updates] == ([reason] if reason else [])
