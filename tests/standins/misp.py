"""MISP stand-in: the handful of endpoints PyMISP's constructor and ``search()`` use.

Filters follow shared/reference/misp-and-pymisp.md (MISP 2.5 RestSearch
semantics) for the keys PyMISP actually sends. Unknown keys are ignored, like
MISP's IndexFilterComponent does, and kept in the request log.

Scale: ``events`` may be a large lazy ``Sequence`` (a synthetic corpus of up to
1,000,000 attributes). The stand-in never copies it: events are normalised one
at a time when they are served, filters read the raw dicts (with the same
defaults), the set of matching events for one query is computed once and
cached until the data changes, and unfiltered paging jumps straight to the
page. Relative times ("2d") in a cached query are resolved when it is first
seen, so all pages of one run agree.

Ids: explicit ``id`` values in the data are kept (tests use them as keys).
Feed-format data has none, so the stand-in assigns them, as a MISP import
would: events get ``offset + index + 1`` and attributes/objects
``event_id * 1_000_000 + n``, stable without a corpus scan. ``offset`` is the
largest explicit event id when ``events`` is a list or tuple (so mixed data,
like the shared real events, cannot collide) and 0 for other (lazy)
sequences, which should carry ids on every event or on none.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pymisp

from tests.standins.base import Recorded, Request, Response, Route, StandIn, json_response, route
from tests.standins.tls import PKI

DEFAULT_KEY = "M1spT3stK3y0000000000000000000000000000a"
ORG_UUID = "5d1b4c9e-0a3f-4e2b-9c6d-7f8e9a0b1c2d"
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_EVENT_SUMMARY_KEYS = (
    "id",
    "uuid",
    "info",
    "orgc_id",
    "org_id",
    "date",
    "threat_level_id",
    "publish_timestamp",
    "published",
    "distribution",
)


@cache
def describe_types() -> dict[str, Any]:
    """The describeTypes bundled with the installed pymisp (what a same-version MISP serves)."""
    text = resources.files("pymisp").joinpath("data/describeTypes.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return data.get("result", data)


def recommended_pymisp_version() -> str:
    """Installed pymisp's X.Y.Z, so PyMISP logs no version nag at construction."""
    return ".".join(pymisp.__version__.split(".")[:3])


# --------------------------------------------------------------------- filters
def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple | set):
        return list(value)
    return [value]


def _date_epoch(date: str | None) -> int:
    try:
        return int(dt.datetime.strptime(str(date), "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp())
    except (TypeError, ValueError):
        return 0


def _resolve_time(value: Any, now: float) -> float:
    """MISP's resolveTimeDelta: epoch, ``N[smhdw]`` relative to now, or a date string.

    An unparseable value becomes ``now + 1`` (matches nothing), as in MISP.
    """
    if isinstance(value, bool):
        return now + 1
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    m = re.fullmatch(r"(\d+)([smhdw])", text)
    if m:
        return now - int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return now + 1
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()


def _time_range(value: Any, now: float) -> tuple[float, float | None] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, list | tuple) and len(value) == 2:
        lo, hi = sorted((_resolve_time(value[0], now), _resolve_time(value[1], now)))
        return lo, hi
    if isinstance(value, list | tuple):
        value = value[0] if value else None
        if value is None:
            return None
    return _resolve_time(value, now), None


def _in_range(ts: Any, rng: tuple[float, float | None] | None) -> bool:
    if rng is None:
        return True
    try:
        t = float(ts)
    except (TypeError, ValueError):
        return False
    return t >= rng[0] and (rng[1] is None or t <= rng[1])


def _date_bound(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        return dt.datetime.fromtimestamp(float(value), dt.timezone.utc).strftime("%Y-%m-%d")
    return str(value)[:10]


def _like(pattern: str) -> re.Pattern[str]:
    """MISP matches tags and values with SQL LIKE (``%`` wildcard, case-insensitive)."""
    return re.compile(".*".join(re.escape(p) for p in pattern.split("%")), re.IGNORECASE)


def _tag_names(obj: Mapping[str, Any]) -> list[str]:
    """Tag names; hostile test data may hold tags that are not dicts or have no string name."""
    tags = obj.get("Tag")
    if not isinstance(tags, list):
        return []
    return [t["name"] for t in tags if isinstance(t, Mapping) and isinstance(t.get("name"), str)]


def _any_tag(patterns: list[re.Pattern[str]], names: Iterable[str]) -> bool:
    names = list(names)
    return any(p.fullmatch(n) for p in patterns for n in names)


@dataclass
class Filters:
    """A restSearch body reduced to what the stand-in evaluates."""

    controller: str
    published: bool | None = None
    tags_or: list[re.Pattern[str]] | None = None
    tags_and: list[re.Pattern[str]] | None = None
    tags_not: list[re.Pattern[str]] | None = None
    publish_ts: tuple[float, float | None] | None = None
    timestamp: tuple[float, float | None] | None = None
    event_timestamp: tuple[float, float | None] | None = None
    attribute_timestamp: tuple[float, float | None] | None = None
    eventids: set[str] | None = None
    uuids: set[str] | None = None
    date_from: str | None = None
    date_to: str | None = None
    to_ids: bool | None = None
    deleted: str = "hide"  # hide | only | both
    warninglist: bool = False
    types: set[str] | None = None
    values: list[re.Pattern[str]] | None = None
    metadata: bool = False
    include_event_tags: bool = False
    limit: int | None = None
    page: int = 1

    @classmethod
    def from_body(cls, body: Any, controller: str, now: float) -> Filters:
        b = body if isinstance(body, dict) else {}
        f = cls(controller)
        if "published" in b and b["published"] is not None and not isinstance(b["published"], list):
            f.published = _truthy(b["published"])
        f._parse_tags(b.get("tags"))
        f.publish_ts = _time_range(b.get("publish_timestamp", b.get("last")), now)
        f.timestamp = _time_range(b.get("timestamp"), now)
        f.event_timestamp = _time_range(b.get("event_timestamp"), now)
        f.attribute_timestamp = _time_range(b.get("attribute_timestamp"), now)
        if b.get("eventid") not in (None, "", []):
            f.eventids = {str(v) for v in _as_list(b["eventid"])}
        if b.get("uuid") not in (None, "", []):
            f.uuids = {str(v).lower() for v in _as_list(b["uuid"])}
        f.date_from = _date_bound(b.get("from", b.get("date_from")))
        f.date_to = _date_bound(b.get("to", b.get("date_to")))
        if b.get("to_ids") not in (None, "", []):
            f.to_ids = str(b["to_ids"]).lower() not in ("0", "false", "exclude")
        deleted = b.get("deleted")
        if isinstance(deleted, list):
            flags = {_truthy(d) for d in deleted}
            f.deleted = "both" if flags == {True, False} else ("only" if flags == {True} else "hide")
        elif isinstance(deleted, str) and deleted.lower() in ("both", "only"):
            f.deleted = deleted.lower()
        elif deleted is not None and _truthy(deleted):
            f.deleted = "only"
        f.warninglist = _truthy(b.get("enforceWarninglist", b.get("enforce_warninglist", 0)))
        types = b.get("type", b.get("type_attribute"))
        if isinstance(types, dict):
            types = types.get("OR", [])
        if types not in (None, "", []):
            f.types = {str(t) for t in _as_list(types)}
        if controller == "attributes" and b.get("value") not in (None, "", []):
            f.values = [_like(str(v)) for v in _as_list(b["value"])]
        f.metadata = _truthy(b.get("metadata", 0))
        f.include_event_tags = _truthy(b.get("includeEventTags", 0))
        try:
            limit = int(b["limit"]) if b.get("limit") not in (None, "") else None
            page = int(b["page"]) if b.get("page") not in (None, "") else 1
        except (TypeError, ValueError):
            limit, page = None, 1
        f.limit = limit if limit and limit > 0 else None
        f.page = max(page, 1)
        return f

    def _parse_tags(self, tags: Any) -> None:
        ors: list[str] = []
        ands: list[str] = []
        nots: list[str] = []
        if isinstance(tags, dict):
            for k, v in tags.items():
                target = {"OR": ors, "AND": ands, "NOT": nots}.get(str(k).upper())
                if target is not None:
                    target.extend(str(x) for x in _as_list(v))
        else:
            items: list[str] = []
            for t in _as_list(tags):
                items.extend(s for s in str(t).split("&&") if s) if "&&" in str(t) else items.append(str(t))
            for t in items:
                (nots if t.startswith("!") else ors).append(t[1:] if t.startswith("!") else t)
        self.tags_or = [_like(t) for t in ors] or None
        self.tags_and = [_like(t) for t in ands] or None
        self.tags_not = [_like(t) for t in nots] or None

    @property
    def selects_events(self) -> bool:
        """True when matching needs to look at events (else every event matches)."""
        return any(
            v is not None
            for v in (
                self.published,
                self.tags_or,
                self.tags_and,
                self.tags_not,
                self.publish_ts,
                self.timestamp,
                self.event_timestamp,
                self.attribute_timestamp,
                self.eventids,
                self.uuids,
                self.date_from,
                self.date_to,
                self.to_ids,
                self.types,
                self.values,
            )
        ) or (self.controller == "events" and self.deleted == "only")

    @property
    def selects_by_attribute(self) -> bool:
        """Events controller: attribute conditions that also select events."""
        return any(v is not None for v in (self.to_ids, self.types, self.attribute_timestamp)) or self.deleted == "only"

    def cache_key(self, body: Any) -> str:
        b = {k: v for k, v in (body or {}).items() if k not in ("page", "limit")} if isinstance(body, dict) else {}
        return self.controller + json.dumps(b, sort_keys=True, default=str)


# ------------------------------------------------------------------ the server
class MispStandIn(StandIn):
    """Plain-http (or https with a PKI) stand-in for a MISP instance.

    Endpoints (log/fault names): ``version`` (GET /servers/getVersion),
    ``me`` (GET /users/view/me), ``describe`` (GET
    /attributes/describeTypes.json), ``events`` (POST /events/restSearch),
    ``attributes`` (POST /attributes/restSearch).
    """

    name = "misp"

    def __init__(
        self,
        events: Sequence[Mapping[str, Any]] = (),
        key: str = DEFAULT_KEY,
        pki: PKI | None = None,
        version: str = "2.5.2",
        cache_responses: bool = False,
    ) -> None:
        super().__init__(pki)
        self.key = key
        self.version = version
        # Benchmarks: keep each encoded restSearch answer, so that the second identical request is
        # served at network speed and the tool's own cost can be measured (cleared on any change).
        self.cache_responses = cache_responses
        self._response_cache: dict[str, bytes] = {}
        self._base = events
        self._base_len = len(events)
        self._id_offset = _max_explicit_id(events) if isinstance(events, list | tuple) else 0
        self._overrides: dict[int, dict[str, Any] | None] = {}
        self._added: list[Mapping[str, Any]] = []
        self._data_version = 0
        self._match_cache: dict[str, tuple[int, Any]] = {}
        self._data = threading.RLock()

    @classmethod
    def from_directory(cls, path: str | Path, recursive: bool = True, **kwargs: Any) -> MispStandIn:
        """Load every event JSON under ``path`` (sorted by path; non-event JSON skipped)."""
        return cls(load_events(path, recursive=recursive), **kwargs)

    def routes(self) -> list[Route]:
        return [
            route("GET", r"/servers/getVersion(?:\.json)?", "version", self._auth(self._get_version)),
            route("GET", r"/users/view/me(?:\.json)?", "me", self._auth(self._me)),
            route("GET", r"/attributes/describeTypes\.json", "describe", self._auth(self._describe)),
            route("POST", r"/events/restSearch(?:\.json)?", "events",
                  self._auth(lambda req: self._cached(req, self._events))),
            route("POST", r"/attributes/restSearch(?:\.json)?", "attributes",
                  self._auth(lambda req: self._cached(req, self._attributes))),
        ]

    # ------------------------------------------------------------------ errors
    def fault_body(self, recorded: Recorded, status: int) -> Any:
        if status >= 500:
            text = "An Internal Error Has Occurred."
        elif status == 404:
            text = "Not Found"
        else:
            text = "Error"
        return {"name": text, "message": text, "url": recorded.path}

    def fail_page(self, page: int, status: int = 500, controller: str = "events", times: int = 1) -> None:
        """Make restSearch of ``controller`` fail for the given page number."""

        def is_page(rec: Recorded) -> bool:
            body = rec.body if isinstance(rec.body, dict) else {}
            return int(body.get("page") or 1) == page

        self.inject(controller, status=status, times=times, match=is_page)

    def _auth(self, fn: Any) -> Any:
        def handler(req: Request) -> Response:
            if req.headers.get("authorization", "").strip() != self.key:
                return json_response(
                    403,
                    {
                        "name": "Authentication failed. Please make sure you pass the API key of an API enabled user "
                        "along in the Authorization header.",
                        "message": "Authentication failed. Please make sure you pass the API key of an API enabled "
                        "user along in the Authorization header.",
                        "url": req.path,
                    },
                )
            return fn(req)

        return handler

    # --------------------------------------------------------- simple answers
    def _get_version(self, req: Request) -> Response:
        return json_response(
            200,
            {
                "version": self.version,
                "pymisp_recommended_version": recommended_pymisp_version(),
                "perm_sync": False,
                "perm_sighting": False,
                "perm_galaxy_editor": False,
                "perm_analyst_data": False,
                "uuid": "-",
                "request_encoding": ["gzip", "br"],
                "filter_sightings": True,
            },
        )

    def _me(self, req: Request) -> Response:
        return json_response(
            200,
            {
                "User": {
                    "id": "1",
                    "org_id": "1",
                    "email": "sync@misp.test",
                    "autoalert": False,
                    "authkey": "*****",
                    "role_id": "6",
                    "disabled": False,
                    "change_pw": False,
                    "termsaccepted": True,
                    "last_login": "0",
                    "date_created": "1700000000",
                    "date_modified": "1700000000",
                },
                "Role": {
                    "id": "6",
                    "name": "read only",
                    "perm_add": False,
                    "perm_modify": False,
                    "perm_publish": False,
                    "perm_sync": False,
                    "perm_admin": False,
                    "perm_site_admin": False,
                    "perm_auth": True,
                    "perm_tagger": False,
                    "perm_sighting": False,
                },
                "Organisation": {"id": "1", "name": "ORGNAME", "uuid": ORG_UUID, "local": True},
                "UserSetting": [],
            },
        )

    def _describe(self, req: Request) -> Response:
        return json_response(200, {"result": describe_types()})

    # ---------------------------------------------------------- data access
    def __len__(self) -> int:
        """Number of event slots (hard-deleted events included)."""
        return self._base_len + len(self._added)

    def __bool__(self) -> bool:
        return True  # a server with no events is still a server (``if misp:`` must not be False)

    def _raw(self, i: int) -> dict[str, Any] | None:
        """Event dict at position i (raw from the corpus or a normalised override)."""
        if i in self._overrides:
            return self._overrides[i]
        raw = self._base[i] if i < self._base_len else self._added[i - self._base_len]
        return raw.get("Event", raw) if isinstance(raw, Mapping) else None  # type: ignore[return-value]

    def event(self, i: int) -> dict[str, Any] | None:
        """Normalised copy of the event at position i (None when removed)."""
        raw = self._raw(i)
        if raw is None:
            return None
        if i in self._overrides:
            return raw
        return normalise_event(raw, self._id_offset + i + 1)

    def events(self) -> Iterator[dict[str, Any]]:
        """All live events, normalised (test helper; scans the corpus)."""
        for i in range(len(self)):
            ev = self.event(i)
            if ev is not None:
                yield ev

    def _index_of_event(self, event_uuid: str) -> int:
        for i in range(len(self)):
            raw = self._raw(i)
            if raw is not None and str(raw.get("uuid", "")).lower() == event_uuid.lower():
                return i
        raise KeyError(f"no event {event_uuid}")

    def _mutable(self, i: int) -> dict[str, Any]:
        if i not in self._overrides:
            ev = self.event(i)
            assert ev is not None
            self._overrides[i] = copy.deepcopy(ev)
        ev = self._overrides[i]
        assert ev is not None
        return ev

    def _changed(self) -> None:
        self._data_version += 1
        self._match_cache.clear()
        self._response_cache.clear()

    def _cached(self, req: Request, answer: Callable[[Request], Response]) -> Response:
        if not self.cache_responses:
            return answer(req)
        key = req.recorded.endpoint + json.dumps(req.body, sort_keys=True)
        with self._data:
            body = self._response_cache.get(key)
        if body is None:
            response = answer(req)
            if response.status != 200:
                return response
            body = json.dumps(response.body).encode("utf-8")
            with self._data:
                self._response_cache[key] = body
        return Response(200, body)

    # --------------------------------------------------------- mutations
    def set_attribute(self, attribute_uuid: str, **fields: Any) -> dict[str, Any]:
        """Change fields of an attribute (e.g. ``to_ids=False``); bumps timestamps."""
        with self._data:
            i, _ = self._find_attribute(attribute_uuid)
            ev = self._mutable(i)
            attr = next(a for a in _all_attributes(ev) if a.get("uuid") == attribute_uuid)
            now = str(int(time.time()))
            attr.update(fields)
            attr.setdefault("timestamp", now)
            if "timestamp" not in fields:
                attr["timestamp"] = now
            ev["timestamp"] = now
            self._changed()
            return attr

    def delete_attribute(self, attribute_uuid: str) -> dict[str, Any]:
        """Soft-delete an attribute (deleted=True, timestamp=now).

        Real MISP also unpublishes the event on a soft delete; the stand-in keeps
        it published to keep tests simple (use ``unpublish`` to model that).
        """
        return self.set_attribute(attribute_uuid, deleted=True)

    def unpublish(self, event_uuid: str) -> None:
        with self._data:
            ev = self._mutable(self._index_of_event(event_uuid))
            ev["published"] = False
            ev["timestamp"] = str(int(time.time()))
            self._changed()

    def publish(self, event_uuid: str) -> None:
        with self._data:
            ev = self._mutable(self._index_of_event(event_uuid))
            now = str(int(time.time()))
            ev["published"] = True
            ev["publish_timestamp"] = now
            ev["timestamp"] = now
            self._changed()

    def remove_event(self, event_uuid: str) -> None:
        """Hard delete, as MISP does for events."""
        with self._data:
            self._overrides[self._index_of_event(event_uuid)] = None
            self._changed()

    def add_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Append an event (either form); missing timestamps default to now."""
        with self._data:
            inner = dict(event.get("Event", event))
            now = str(int(time.time()))
            inner.setdefault("timestamp", now)
            inner.setdefault("date", time.strftime("%Y-%m-%d", time.gmtime()))
            self._added.append(inner)
            self._changed()
            ev = self.event(len(self) - 1)
            assert ev is not None
            return ev

    def _find_attribute(self, attribute_uuid: str) -> tuple[int, dict[str, Any]]:
        for i in range(len(self)):
            raw = self._raw(i)
            if raw is None:
                continue
            for attr in _all_attributes(raw):
                if attr.get("uuid") == attribute_uuid:
                    return i, attr
        raise KeyError(f"no attribute {attribute_uuid}")

    # ---------------------------------------------------------- matching
    def _event_selected(self, ev: Mapping[str, Any], f: Filters, eid: str) -> bool:
        """Event-level conditions, read from the raw dict with MISP's defaults."""
        if f.published is not None and bool(ev.get("published", True)) != f.published:
            return False
        ts = ev.get("timestamp") or _date_epoch(ev.get("date"))
        published_at = ev.get("publish_timestamp") or (ts if ev.get("published", True) else 0)
        if not _in_range(published_at, f.publish_ts):
            return False
        if f.controller == "events" and not _in_range(ts, f.timestamp):
            return False
        if not _in_range(ts, f.event_timestamp):
            return False
        date = str(ev.get("date", ""))
        if (f.date_from and date < f.date_from) or (f.date_to and date > f.date_to):
            return False
        if f.eventids is not None and not ({eid, str(ev.get("uuid", "")).lower()} & f.eventids):
            return False
        if f.controller == "events":
            if f.uuids is not None and str(ev.get("uuid", "")).lower() not in f.uuids:
                return False
            event_tags = _tag_names(ev)
            if f.tags_not and _any_tag(f.tags_not, event_tags):
                return False
            if f.tags_or or f.tags_and:
                names = set(event_tags)
                for attr in _all_attributes(ev):
                    names.update(_tag_names(attr))
                if f.tags_or and not _any_tag(f.tags_or, names):
                    return False
                if f.tags_and and not all(_any_tag([p], names) for p in f.tags_and):
                    return False
            if f.selects_by_attribute:
                return any(self._attr_ok(a, ev, f, obj) for a, obj in _attributes_with_objects(ev))
        return True

    def _attr_ok(self, a: Mapping[str, Any], ev: Mapping[str, Any], f: Filters, obj: Mapping[str, Any] | None) -> bool:
        deleted = bool(a.get("deleted", False)) or bool(obj is not None and obj.get("deleted", False))
        if (f.deleted == "hide" and deleted) or (f.deleted == "only" and not deleted):
            return False
        if f.to_ids is not None and bool(a.get("to_ids", False)) != f.to_ids:
            return False
        if f.types is not None and a.get("type") not in f.types:
            return False
        if f.warninglist and a.get("_warninglist_hit"):
            return False
        a_ts = a.get("timestamp") or ev.get("timestamp")
        if not _in_range(a_ts, f.attribute_timestamp):
            return False
        attr_tags = _tag_names(a)
        if f.controller == "events":
            # MISP turns tags.NOT into blockedAttributeTags for events.
            return not (f.tags_not and _any_tag(f.tags_not, attr_tags))
        if not _in_range(a_ts, f.timestamp):
            return False
        if f.values is not None:
            # MISP compares a value filter with the whole value and with each half of a composite.
            value = str(a.get("value", ""))
            forms = (value, *value.split("|", 1)) if "|" in value else (value,)
            if not any(p.fullmatch(form) for p in f.values for form in forms):
                return False
        if f.uuids is not None and not ({str(a.get("uuid", "")).lower(), str(ev.get("uuid", "")).lower()} & f.uuids):
            return False
        names = attr_tags + _tag_names(ev)
        if f.tags_not and _any_tag(f.tags_not, names):
            return False
        if f.tags_or and not _any_tag(f.tags_or, names):
            return False
        return not (f.tags_and and not all(_any_tag([p], names) for p in f.tags_and))

    def _matching_events(self, f: Filters, key: str) -> Sequence[int]:
        """Positions of matching events, cached per query until the data changes."""
        if not f.selects_events:
            if not any(v is None for v in self._overrides.values()):
                return range(len(self))
            return [i for i in range(len(self)) if self._overrides.get(i, True) is not None]
        cached = self._match_cache.get(key)
        if cached and cached[0] == self._data_version:
            return cached[1]  # type: ignore[no-any-return]
        found = []
        for i in range(len(self)):
            ev = self._raw(i)
            if ev is not None and self._event_selected(ev, f, str(ev.get("id") or self._id_offset + i + 1)):
                found.append(i)
        self._remember(key, found)
        return found

    def _attribute_counts(self, f: Filters, key: str) -> tuple[list[int], list[int]]:
        """(event positions with matches, cumulative match counts), cached per query."""
        cached = self._match_cache.get(key + "#attrs")
        if cached and cached[0] == self._data_version:
            return cached[1]  # type: ignore[no-any-return]
        positions: list[int] = []
        cumulative: list[int] = []
        total = 0
        # One pass over the corpus: a lazy corpus may build each event on access.
        for i in range(len(self)):
            ev = self._raw(i)
            if ev is None or not self._event_selected(ev, f, str(ev.get("id") or self._id_offset + i + 1)):
                continue
            n = sum(1 for a, obj in _attributes_with_objects(ev) if self._attr_ok(a, ev, f, obj))
            if n:
                total += n
                positions.append(i)
                cumulative.append(total)
        self._remember(key + "#attrs", (positions, cumulative))
        return positions, cumulative

    def _remember(self, key: str, value: Any) -> None:
        if len(self._match_cache) >= 32:  # a run repeats one query per page; keep memory bounded
            self._match_cache.clear()
        self._match_cache[key] = (self._data_version, value)

    # ---------------------------------------------------------- restSearch
    def _events(self, req: Request) -> Response:
        f = Filters.from_body(req.body, "events", time.time())
        with self._data:
            matches = self._matching_events(f, f.cache_key(req.body))
            page = matches[(f.page - 1) * f.limit : f.page * f.limit] if f.limit else matches
            out = []
            for i in page:
                ev = self.event(i)
                if ev is not None:
                    out.append({"Event": self._prune(ev, f)})
        return json_response(200, {"response": out}, {"X-Result-Count": str(len(matches))})

    def _prune(self, ev: dict[str, Any], f: Filters) -> dict[str, Any]:
        out = dict(ev)
        if f.metadata:
            for k in ("Attribute", "Object", "ShadowAttribute", "EventReport"):
                out.pop(k, None)
            return out
        out["Attribute"] = [_public(a) for a in ev.get("Attribute") or () if self._attr_ok(a, ev, f, None)]
        objects = []
        for obj in ev.get("Object") or ():
            kept = [_public(a) for a in obj.get("Attribute") or () if self._attr_ok(a, ev, f, obj)]
            if kept:  # objects left without attributes are not served
                objects.append({**obj, "Attribute": kept})
        out["Object"] = objects
        return out

    def _attributes(self, req: Request) -> Response:
        f = Filters.from_body(req.body, "attributes", time.time())
        with self._data:
            positions, cumulative = self._attribute_counts(f, f.cache_key(req.body))
            total = cumulative[-1] if cumulative else 0
            start, stop = ((f.page - 1) * f.limit, f.page * f.limit) if f.limit else (0, total)
            out: list[dict[str, Any]] = []
            k = bisect_right(cumulative, start)  # first event whose matches reach past `start`
            seen = cumulative[k - 1] if k else 0
            for i in positions[k:]:
                if seen >= stop:
                    break
                ev = self.event(i)
                assert ev is not None
                summary = {key: ev.get(key) for key in _EVENT_SUMMARY_KEYS}
                for a, obj in _attributes_with_objects(ev):
                    if not self._attr_ok(a, ev, f, obj):
                        continue
                    if start <= seen < stop:
                        out.append(self._attribute_item(a, ev, obj, summary, f))
                    seen += 1
                    if seen >= stop:
                        break
        return json_response(200, {"response": {"Attribute": out}}, {"X-Result-Count": str(total)})

    @staticmethod
    def _attribute_item(
        a: Mapping[str, Any], ev: Mapping[str, Any], obj: Mapping[str, Any] | None, summary: dict[str, Any], f: Filters
    ) -> dict[str, Any]:
        item = _public(a)
        tags = list(a["Tag"]) if isinstance(a.get("Tag"), list) else []
        if f.include_event_tags and isinstance(ev.get("Tag"), list):
            tags += [{**t, "inherited": 1} for t in ev["Tag"] if isinstance(t, Mapping)]
        item["Tag"] = tags
        item["Event"] = dict(summary)
        if obj is not None:
            item["Object"] = {
                "id": obj.get("id"),
                "distribution": obj.get("distribution"),
                "sharing_group_id": obj.get("sharing_group_id"),
            }
        return item


def _public(attr: Mapping[str, Any]) -> dict[str, Any]:
    """Attribute as served: test-only markers (``_warninglist_hit``) removed."""
    if "_warninglist_hit" not in attr:
        return dict(attr)
    return {k: v for k, v in attr.items() if not k.startswith("_")}


def _all_attributes(ev: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for a, _ in _attributes_with_objects(ev):
        yield a  # type: ignore[misc]


def _attributes_with_objects(ev: Mapping[str, Any]) -> Iterator[tuple[Mapping[str, Any], Mapping[str, Any] | None]]:
    for a in ev.get("Attribute") or ():
        yield a, None
    for obj in ev.get("Object") or ():
        for a in obj.get("Attribute") or ():
            yield a, obj


def _max_explicit_id(events: Sequence[Mapping[str, Any]]) -> int:
    best = 0
    for raw in events:
        ev = raw.get("Event", raw)
        if str(ev.get("id", "")).isdigit():
            best = max(best, int(ev["id"]))
    return best


def normalise_event(raw: Mapping[str, Any], fallback_id: int) -> dict[str, Any]:
    """API-shaped copy of a feed or API event, with MISP's defaults filled in.

    Shallow copies only (tags and other nested values are shared with the
    caller's data, never mutated). Explicit ids are kept; missing ones are
    derived from ``fallback_id`` as described in the module docstring.
    """
    ev = dict(raw)
    eid = str(ev.get("id") or fallback_id)
    event_id = int(eid) if eid.isdigit() else fallback_id
    ts = str(ev.get("timestamp") or _date_epoch(ev.get("date")) or 0)
    orgc = ev.get("Orgc") if isinstance(ev.get("Orgc"), Mapping) else None
    org = {"id": "1", "name": "ORGNAME", "uuid": ORG_UUID, "local": True}
    ev["id"] = eid
    ev["timestamp"] = ts
    if not isinstance(ev.get("Org"), Mapping):
        ev["Org"] = org
    if orgc is None:
        ev["Orgc"] = ev["Org"]
    ev.setdefault("org_id", str(ev["Org"].get("id") or "1"))
    ev.setdefault("orgc_id", str(ev["Orgc"].get("id") or ev["org_id"]))
    if "uuid" not in ev:
        ev["uuid"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"misp-standin-event-{eid}"))
    ev.setdefault("info", "")
    ev.setdefault("date", time.strftime("%Y-%m-%d", time.gmtime(int(ts))))
    ev.setdefault("published", True)
    if not ev.get("publish_timestamp") and ev["published"]:
        ev["publish_timestamp"] = ts
    ev.setdefault("publish_timestamp", "0")
    ev.setdefault("threat_level_id", "4")
    ev.setdefault("analysis", "0")
    ev.setdefault("distribution", "3")
    ev.setdefault("sharing_group_id", "0")
    ev.setdefault("locked", False)
    ev.setdefault("proposal_email_lock", False)
    ev.setdefault("disable_correlation", False)
    ev.setdefault("extends_uuid", "")
    ev.setdefault("Tag", [])
    counter = iter(range(1, 10**6))

    def attr(a: Mapping[str, Any], object_id: str) -> dict[str, Any]:
        out = dict(a)
        generated = event_id * 1_000_000 + next(counter)
        out["id"] = str(a.get("id") or generated)
        out["event_id"] = eid
        out["object_id"] = object_id
        out.setdefault("object_relation", None)
        if "uuid" not in out:  # uuid5 is slow enough to matter on a large corpus
            out["uuid"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"misp-standin-attr-{out['id']}"))
        out.setdefault("category", "Other")
        out.setdefault("to_ids", False)
        out.setdefault("distribution", "5")
        out.setdefault("sharing_group_id", "0")
        out.setdefault("timestamp", ts)
        out.setdefault("comment", "")
        out.setdefault("deleted", False)
        out.setdefault("disable_correlation", False)
        return out

    ev["Attribute"] = [attr(a, "0") for a in raw.get("Attribute") or ()]
    objects = []
    for n, obj in enumerate(raw.get("Object") or (), start=1):
        o = dict(obj)
        o["id"] = str(obj.get("id") or event_id * 1_000_000 + n)
        o["event_id"] = eid
        o.setdefault("timestamp", ts)
        o.setdefault("distribution", "5")
        o.setdefault("sharing_group_id", "0")
        o.setdefault("deleted", False)
        o.setdefault("comment", "")
        o["Attribute"] = [attr(a, o["id"]) for a in obj.get("Attribute") or ()]
        objects.append(o)
    ev["Object"] = objects
    ev["attribute_count"] = str(len(ev["Attribute"]) + sum(len(o["Attribute"]) for o in objects))
    return ev


def load_events(path: str | Path, recursive: bool = True) -> list[dict[str, Any]]:
    """Read event JSON files: ``{"Event": ...}``, bare events or ``{"response": [...]}``."""
    root = Path(path)
    if not root.is_dir():
        return []
    files = sorted(root.rglob("*.json") if recursive else root.glob("*.json"))
    events: list[dict[str, Any]] = []
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        candidates = data.get("response") if isinstance(data, dict) and "response" in data else [data]
        for item in candidates if isinstance(candidates, list) else [candidates]:
            if isinstance(item, dict) and isinstance(item.get("Event"), dict):
                events.append(item)
            elif isinstance(item, dict) and "info" in item and ("Attribute" in item or "Object" in item):
                events.append({"Event": item})
    return events
