"""Soak (issue 9): many runs over a MISP that keeps changing, with faults, and the invariants after each.

After every run: no foreign indicator changed; no indicator was deleted whose value a selected
event carried both when the run started and when it ended (unless the value is still held, as
after an action change). After a final clean full sync, Defender holds exactly what a simple
model of MISP says it should: the values of selected published events, except that what we
already held for an event under edit stays exactly as it was (every edit unpublishes a MISP event;
its indicators stay as last published until it is republished or deleted): the values such an
event carries (an attribute edited since the publish whatever its flags say now, the others as
they stand), and the indicators whose description names such an event.

The model is written here from the rules, independently of the code under test: the corpus uses
values that need no normalisation (lower-case domains, public IPv4, sha256), no severity tags, and
action Block where a course-of-action:active tag applies to the value, Audit otherwise.
Run with MISP2DEFENDER_SOAK_SEED=<n> to try other seeds (the seed is printed on a failure).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from collections.abc import Callable

import pytest

from tests.harness import Tool
from tests.util import TEST_CLIENT_ID

SEED = int(os.environ.get("MISP2DEFENDER_SOAK_SEED", "20261202"))
RUNS = int(os.environ.get("MISP2DEFENDER_SOAK_RUNS", "50"))
SELECT = "soak:selected"
BLOCK_TAG = 'course-of-action:active="deny"'
TYPES = {"domain": "DomainName", "ip-dst": "IpAddress", "sha256": "FileSha256"}


def value_for(n: int) -> tuple[str, str]:
    kind = ("domain", "ip-dst", "sha256")[n % 3]
    value = {"domain": f"soak-{n}.example-soak.top", "ip-dst": f"45.{n // 250}.{n % 250}.{7 + n % 200}",
             "sha256": hashlib.sha256(f"soak-{n}".encode()).hexdigest()}[kind]
    return kind, value


def make_event(number: int, rng: random.Random, pool: int = 40) -> dict:
    attributes = []
    for slot, n in enumerate(rng.sample(range(pool), 6)):
        kind, value = value_for(n)
        tags = [{"name": BLOCK_TAG}] if rng.random() < 0.15 else []
        attributes.append({"uuid": f"50000000-0000-4000-8000-{number:06d}{slot:06d}", "type": kind, "to_ids": True,
                           "category": "Network activity", "value": value, "Tag": tags})
    tags = [{"name": SELECT}] + ([{"name": BLOCK_TAG}] if rng.random() < 0.25 else [])
    return {"Event": {"uuid": f"40000000-0000-4000-8000-{number:012d}", "info": f"soak event {number}",
                      "published": True, "Tag": tags, "Attribute": attributes}}


def names(tags: object) -> set[str]:
    return {t["name"] for t in tags if isinstance(t, dict)} if isinstance(tags, list) else set()


def model(tool: Tool) -> dict[tuple[str, str], str]:
    """What MISP selects now: key → the action the rules give it (Block wins over Audit)."""
    wanted: dict[tuple[str, str], str] = {}
    for event in tool.misp.events():
        if not event.get("published") or SELECT not in names(event.get("Tag")):
            continue
        event_block = BLOCK_TAG in names(event.get("Tag"))
        for attribute in event.get("Attribute", []):
            if attribute.get("to_ids") is not True or attribute.get("deleted"):
                continue
            key = (TYPES[attribute["type"]], attribute["value"])
            action = "Block" if event_block or BLOCK_TAG in names(attribute.get("Tag")) else "Audit"
            if wanted.get(key) != "Block":
                wanted[key] = action
    return wanted


def under_edit(tool: Tool) -> tuple[set[str], set[tuple[str, str]]]:
    """Events that were published and are now unpublished by an edit (their uuids), and the values
    the selected ones carry as last published: an attribute edited since counts whatever its flags
    say now, the others as they stand."""
    uuids, keys = set(), set()
    for event in tool.misp.events():
        published_at = int(event.get("publish_timestamp") or 0)
        if event.get("published") or published_at <= 0:
            continue
        uuids.add(event["uuid"])
        if SELECT in names(event.get("Tag")):
            keys |= {(TYPES[a["type"]], a["value"]) for a in event.get("Attribute", [])
                     if int(a.get("timestamp") or 0) > published_at or (a.get("to_ids") is True
                                                                        and not a.get("deleted"))}
    return uuids, keys


def named_events(tool: Tool) -> dict[tuple[str, str], str]:
    """The event each indicator of ours names in its description ("MISP event <id> (<uuid>), ...")."""
    return {(i["indicatorType"], i["indicatorValue"]): i["description"].split("(", 1)[1].split(")", 1)[0]
            for i in tool.defender.owned_by(TEST_CLIENT_ID) if "(" in i.get("description", "")}


def foreign_snapshot(tool: Tool) -> str:
    return json.dumps({i: ind for i, ind in tool.defender.indicators.items() if ind.get("createdBy") != TEST_CLIENT_ID},
                      sort_keys=True)


def mutation(tool: Tool, rng: random.Random, added: list[int]) -> Callable[[], None]:
    """One random change an analyst (or MISP itself) might make."""
    events = list(tool.misp.events())
    event = rng.choice(events)
    attributes = event.get("Attribute", [])
    attribute = rng.choice(attributes) if attributes else None
    kind = rng.choice(["unpublish", "publish", "to_ids", "delete_attribute", "retag", "remove_event", "add_event"])
    if kind == "unpublish":
        return lambda: tool.misp.unpublish(event["uuid"])
    if kind == "publish":
        return lambda: tool.misp.publish(event["uuid"])
    if kind == "to_ids" and attribute:
        return lambda: tool.misp.set_attribute(attribute["uuid"], to_ids=not attribute.get("to_ids"))
    if kind == "delete_attribute" and attribute:
        return lambda: tool.misp.delete_attribute(attribute["uuid"])
    if kind == "retag" and attribute:
        tags = [] if BLOCK_TAG in names(attribute.get("Tag")) else [{"name": BLOCK_TAG}]
        return lambda: tool.misp.set_attribute(attribute["uuid"], Tag=tags)
    if kind == "remove_event" and len(events) > 6:
        return lambda: tool.misp.remove_event(event["uuid"])
    added.append(100 + len(added))
    new = make_event(added[-1], rng)
    return lambda: tool.misp.add_event(new)


def inject_faults(tool: Tool, rng: random.Random) -> str:
    """Zero or more faults for the next run; returns a label for the failure message."""
    labels = []
    for _ in range(rng.choice([0, 1, 1, 2])):
        fault = rng.choice(["import503", "import429", "import_drop", "list500", "misp500", "misp_odd",
                            "attributes_odd", "batch_delete503"])
        labels.append(fault)
        if fault == "import503":
            tool.defender.inject("import", status=503, times=rng.randint(1, 2))
        elif fault == "import429":
            tool.defender.inject("import", status=429, retry_after=0.2, times=1)
        elif fault == "import_drop":
            tool.defender.inject("import", drop=True, times=1)
        elif fault == "list500":
            tool.defender.inject("list", status=500, times=1)
        elif fault == "batch_delete503":
            tool.defender.inject("batch_delete", status=503, times=rng.randint(1, 5))
        elif fault == "misp500":
            tool.misp.inject("events", status=500, times=rng.randint(1, 5), skip=rng.randint(0, 3))
        elif fault == "misp_odd":
            tool.misp.inject("events", status=200, body=rng.choice([{}, {"response": None}, {"message": "x"}]),
                             times=rng.randint(1, 5), skip=rng.randint(0, 3))
        elif fault == "attributes_odd":
            tool.misp.inject("attributes", status=200, body={"response": {}}, times=rng.randint(1, 5))
    return "+".join(labels) or "none"


@pytest.mark.slow
def test_fifty_runs_over_a_changing_misp_with_faults_keep_every_invariant(tool: Tool) -> None:
    rng = random.Random(SEED)
    for number in range(12):
        tool.misp.add_event(make_event(number, rng))
    foreign = [{"indicatorType": "DomainName", "indicatorValue": value_for(0)[1], "action": "Block",
                "title": "analyst", "description": "kept by hand", "severity": "High"},
               {"indicatorType": "IpAddress", "indicatorValue": value_for(1)[1], "action": "Audit", "title": "feed",
                "description": "another feed", "generateAlert": True},
               {"indicatorType": "FileSha256", "indicatorValue": "f" * 64, "action": "Block", "title": "other",
                "description": "unrelated"}]
    tool.defender.seed(foreign, created_by="another-app", application="OpenCTI")
    foreign_keys = {(f["indicatorType"], f["indicatorValue"]) for f in foreign}
    foreign_before = foreign_snapshot(tool)
    added: list[int] = []
    config = {"misp_event_filters": {"published": True, "tags": [SELECT]}, "remove_guard_percent": 100,
              "max_retries": 2, "request_timeout": 5}
    kills = 0
    for number in range(RUNS):
        for _ in range(rng.randint(0, 3)):
            mutation(tool, rng, added)()
        tool.misp.reset_faults()
        tool.defender.reset_faults()
        faults = inject_faults(tool, rng)
        carried_at_start = set(model(tool))
        held_before = {i["id"]: (i["indicatorType"], i["indicatorValue"])
                       for i in tool.defender.owned_by(TEST_CLIENT_ID)}
        deletes_before = len(tool.defender.calls("batch_delete"))
        if rng.random() < 0.3:  # an analyst edits MISP while the run reads it
            tool.misp.after("events", tool.misp.ok_count("events") + rng.randint(1, 3), mutation(tool, rng, added))
        args = ("--full-sync",) if rng.random() < 0.5 else ()
        overrides = {**config, "misp_event_limit_per_page": rng.choice([1, 2, 3, 100])}
        context = f"seed {SEED}, run {number}, faults {faults}, args {args}"
        if kills < 5 and rng.random() < 0.12:
            kills += 1
            child, _ = tool.spawn(*args, **overrides)
            endpoint = rng.choice(["import", "list", "events"])
            target = tool.defender if endpoint != "events" else tool.misp
            target.after(endpoint, target.ok_count(endpoint) + 1, lambda c=child: os.kill(c.pid, signal.SIGKILL))
            child.communicate(timeout=60)
            context += f", killed after {endpoint}"
        else:
            tool.run(*args, **overrides)
        # Invariants after every run.
        assert foreign_snapshot(tool) == foreign_before, f"a foreign indicator changed ({context})"
        carried = carried_at_start & set(model(tool))
        owned_after = {(t, v) for t, v, _ in tool.held()}
        deleted = [held_before[i] for call in tool.defender.calls("batch_delete")[deletes_before:]
                   if call.status == 204 for i in call.body["IndicatorIds"] if i in held_before]
        wrong = [key for key in deleted if key in carried and key not in owned_after]
        assert not wrong, f"deleted values MISP still selected: {wrong} ({context})"
    tool.misp.reset_faults()
    tool.defender.reset_faults()
    held_before, named = tool.held(), named_events(tool)
    final = tool.run("--full-sync", **config)
    assert final.code == 0, final.stderr
    wanted, (edited_events, edited) = model(tool), under_edit(tool)
    frozen = {(t, v) for t, v, _ in held_before} & edited  # stay as last published, whatever else says
    frozen |= {key for key, uuid in named.items() if uuid in edited_events}
    expected = {(t, v, a) for (t, v), a in wanted.items() if (t, v) not in foreign_keys | frozen}
    expected |= {(t, v, a) for t, v, a in held_before if (t, v) in frozen}
    assert tool.held() == expected, f"seed {SEED}: after a clean full sync Defender differs from MISP"
    assert foreign_snapshot(tool) == foreign_before
