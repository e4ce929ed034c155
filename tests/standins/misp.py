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

Extras (MISP 2.5.1 behaviour from shared/reference/misp-and-pymisp.md, last
section, and misp-sightings.md; MISP source read at bb0909a):

* ``warninglist_metadata_bug`` (default on): events/restSearch with
  ``metadata`` and ``enforceWarninglist`` or ``includeWarninglistHits`` answers
  MISP's 500 body. Reading: MISP crashes while building each event, so the 500
  comes only when the requested *page* holds at least one event (a page past
  the end answers ``[]``).
* Session cookie: MISP renews the CakePHP session on every API-key request, so
  every response carries ``Set-Cookie: MISP-<instance uuid>=<new id>; ...;
  path=/; HttpOnly; SameSite=Lax`` (``secure`` over https) with a fresh value.
  ``cookies`` lists every value issued, so tests can assert none leaks. The
  ``expires`` date uses real time (it is for the HTTP client's jar, not data).
* ``unpublish_on_edit`` (default on, as MISP does): edits (``set_attribute``,
  ``delete_attribute``, ``tag_event``/``untag_event``/``tag_attribute``/
  ``untag_attribute``) set ``published`` false, keep ``publish_timestamp`` and
  bump ``timestamp`` (attribute tags also bump the attribute, as MISP's
  ``touch()`` does). Off: timestamps still move, ``published`` stays.
* ``add_event(event, normalise=True)`` models MISP's insert: trim, refang,
  ``AttributeValidationTool::modifyBeforeValidation`` and ``::validate`` per
  type, category/type consistency, composite shape, first/last_seen parsing,
  per-event duplicates (type, category, value1, value2; case-insensitive like
  MySQL's ``*_ci`` collation; deleted and object attributes exempt) and object
  checks (name, meta-category, uuid-shaped template_uuid, natural
  template_version). Failures are dropped silently and listed in
  ``dropped_on_insert``. Readings: "values with spaces" are dropped where the
  type's validator rejects them (domains, IPs, hashes...), not for free-text
  types such as ``url``; ``link`` validation approximates PHP's
  FILTER_VALIDATE_URL; types MISP 2.5.1 has no validator for are accepted;
  attribute UUIDs are not checked for uniqueness across events.
* Sightings (``POST /sightings/add[/{id|uuid}]``, ``POST
  /sightings/restSearch[/{context}]``): body keys, matching on value1/value2
  (case-insensitive), ``filters`` through the attributes restSearch path,
  error messages as HTTP 200 ``{"message": ...}``, restSearch filters and
  shapes as Sighting.php. ``sighting_keys`` (and ``admin_keys``) hold
  perm_sighting; other keys get the ACL 403 on add. Sightings policy 0
  (MISP's default): on events owned by another org only org 1's sightings are
  shown. Readings: numeric ``org_id`` filters match nothing (2.5.1 only
  resolves org UUIDs); ``source`` is compared exactly (binary collation) and
  cut to 255 characters.
* Decaying models: the three shipped models (ids 1 NIDS, 2 Phishing, 3
  Vishing: the models folder in file-name order; all disabled), REST
  ``decayingModel/index|enable|disable|update`` (enable/disable/update need a
  site admin: ``admin_keys``). ``includeDecayScore`` works on both scopes;
  ``decayingModel`` (model *ids*; MISP then uses exactly those models, enabled
  or not, whatever the type), ``score``/``modelOverrides`` and
  ``excludeDecayed`` (applied after paging, counted in
  ``X-Skipped-Elements-Count``) only on attributes, as in MISP's RestSearch
  parameter lists. Score: Polynomial.php with t0 from Base.php. Base score:
  the model's taxonomy weights (``base_score_config``) over tags that carry a
  ``numerical_value`` (event tags overridden by attribute tags of the same
  base), else ``default_base_score``; tags without ``numerical_value`` count
  as non-numerical (MISP reads it from its enabled taxonomies).
* One clock for the whole stand-in: ``clock`` (default ``time.time``) plus the
  offset moved by ``advance(seconds)`` drives relative time filters, default
  timestamps, sighting dates, the 30-day sighting window and decay scores.
  Changing it clears the query caches.
"""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import json
import re
import secrets
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
from urllib.parse import unquote

import idna
import pymisp

from tests.standins.base import Recorded, Request, Response, Route, StandIn, json_response, route
from tests.standins.tls import PKI

DEFAULT_KEY = "M1spT3stK3y0000000000000000000000000000a"
ORG_UUID = "5d1b4c9e-0a3f-4e2b-9c6d-7f8e9a0b1c2d"
INSTANCE_UUID = "8e2a4c61-3b7d-4f0e-9a15-6c2d8b9e0f13"
# CakePHP's session cookie, named by AppController from MISP.uuid.
COOKIE_NAME = f"MISP-{INSTANCE_UUID}"
ORG_ID = "1"  # the key users' org, also the host org
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


# ----------------------------------------------------------------------- roles
READ_ONLY_ROLE: dict[str, Any] = {
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
}
# MISP's Role.php marks perm_sighting "readonlyenabled": a read-only role may add sightings.
SIGHTING_ROLE: dict[str, Any] = {**READ_ONLY_ROLE, "id": "7", "name": "read only + sighting", "perm_sighting": True}
ADMIN_ROLE: dict[str, Any] = {
    **{k: True for k in READ_ONLY_ROLE if k.startswith("perm_")},
    "id": "1",
    "name": "admin",
    "perm_decaying": True,
}

# The models MISP ships (MISP/misp-decaying-models, models/*.json), as `decayingModel/update`
# stores them: parameters rounded to 4 digits by DecayingModel::__adjustParameters (so floats).
_NIDS_TYPES = ["domain", "domain|ip", "hostname", "hostname|port", "ip-dst", "ip-dst|port", "ip-src", "ip-src|port"]
SHIPPED_DECAYING_MODELS: tuple[dict[str, Any], ...] = (
    {
        "uuid": "073fae4a-2377-4cfa-bd34-2516830d33c3",
        "name": "NIDS Simple Decaying Model",
        "description": "Simple decaying model for Network Intrusion Detection System (NIDS). ",
        "formula": "Polynomial",
        "version": "2",
        "parameters": {
            "lifetime": 120.0,
            "decay_speed": 2.0,
            "threshold": 30.0,
            "default_base_score": 80.0,
            "base_score_config": {
                "estimative-language:confidence-in-analytic-judgment": 0.1667,
                "estimative-language:likelihood-probability": 0.1667,
                "false-positive:risk": 0.1667,
                "priority-level": 0.1667,
                "retention": 0.1667,
                "targeted-threat-index:targeting-sophistication-base-value": 0.0833,
                "targeted-threat-index:technical-sophistication-multiplier": 0.0833,
            },
        },
        "attribute_types": [*_NIDS_TYPES, "url", "snort", "suricata", "zeek", "bro"],
    },
    {
        "uuid": "dbbd7ba7-6559-48fc-ab58-cc499d1b1143",
        "name": "Phishing model",
        "description": "Simple model to rapidly decay phishing website.",
        "formula": "Polynomial",
        "version": "2",
        "parameters": {
            "lifetime": 3.0,
            "decay_speed": 2.3,
            "threshold": 30.0,
            "default_base_score": 80.0,
            "base_score_config": {
                "estimative-language:confidence-in-analytic-judgment": 0.25,
                "estimative-language:likelihood-probability": 0.25,
                "phishing:psychological-acceptability": 0.25,
                "phishing:state": 0.25,
            },
        },
        "attribute_types": [*_NIDS_TYPES, "url"],
    },
    {
        "uuid": "1097c0fe-06eb-4741-94d9-8098301d92f4",
        "name": "Vishing model",
        "description": "Simple model to rapidly decay voice scamming, vishing relying on phone-numbers.",
        "formula": "Polynomial",
        "version": "1",
        "parameters": {
            "lifetime": 10.0,
            "decay_speed": 2.3,
            "threshold": 30.0,
            "default_base_score": 80.0,
            "base_score_config": {
                "estimative-language:confidence-in-analytic-judgment": 0.25,
                "estimative-language:likelihood-probability": 0.25,
                "phishing:psychological-acceptability": 0.25,
                "phishing:state": 0.25,
            },
        },
        "attribute_types": ["phone-number", "prtn"],
    },
)
_MODEL_REFS = ["https://arxiv.org/abs/1902.03914", "https://arxiv.org/abs/1803.11052"]


# ------------------------------------------------------------- PHP semantics
_PHP_TRIM = " \t\n\r\0\x0b"
_NUMERIC = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*")
_UUID_SHAPE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _php_empty(value: Any) -> bool:
    """PHP's ``empty()``: null, false, 0, 0.0, "", "0" and empty arrays."""
    return value is None or value is False or value == 0 or value in ("", "0") or value == [] or value == {}


def _php_numeric(value: Any) -> bool:
    """PHP's ``is_numeric()`` (booleans are not numeric)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, str) and _NUMERIC.fullmatch(value) is not None


def _ctype_digit(value: Any) -> bool:
    return isinstance(value, str) and value.isascii() and value.isdigit()


def _positive_integer(value: Any) -> bool:
    """AttributeValidationTool::isPositiveInteger (zero included)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or _ctype_digit(value)


def _resolve_delta(value: Any, now: int) -> int:
    """AppModel::resolveTimeDelta: epoch, ``N[dhms]`` before now, a date string, else ``now + 1``."""
    if isinstance(value, bool):
        return now + 1
    if _php_numeric(value):
        return int(float(value))
    text = str(value).strip()
    m = re.fullmatch(r"(.*)([dhmsDHMS])", text)
    if m:
        if not _php_numeric(m.group(1)):
            return now + 1
        return int(now - float(m.group(1)) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[m.group(2).lower()])
    resolved = _resolve_time(text, now)
    return now + 1 if resolved == now + 1 else int(resolved)


def _iso_epoch(value: Any) -> int | None:
    """Epoch seconds of an ISO-8601 string (``first_seen``/``last_seen``), None when absent or unparseable."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return int((parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp())


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
    warninglist_hits: bool = False
    include_decay: bool = False
    exclude_decayed: bool = False
    decaying_models: list[Any] | None = None  # attributes scope: explicit model ids
    model_overrides: dict[str, Any] | None = None

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
        f.warninglist_hits = _truthy(b.get("includeWarninglistHits", 0))
        f.include_decay = _truthy(b.get("includeDecayScore", 0))
        if controller == "attributes":
            f._parse_decay(b)
        try:
            limit = int(b["limit"]) if b.get("limit") not in (None, "") else None
            page = int(b["page"]) if b.get("page") not in (None, "") else 1
        except (TypeError, ValueError):
            limit, page = None, 1
        f.limit = limit if limit and limit > 0 else None
        f.page = max(page, 1)
        return f

    def _parse_decay(self, b: Mapping[str, Any]) -> None:
        """Attributes-only decay options (MISP's Event parameter list has none of them)."""
        if not _php_empty(b.get("excludeDecayed")):
            self.exclude_decayed = self.include_decay = True
        chosen = b.get("decayingModel")
        if not _php_empty(chosen):
            if isinstance(chosen, str) and "||" in chosen:
                chosen = chosen.split("||")
            # fetchModels(): a scalar must be numeric, else PHP's foreach over a string yields nothing.
            self.decaying_models = (
                list(chosen) if isinstance(chosen, list) else [chosen] if _php_numeric(chosen) else []
            )
        overrides: dict[str, Any] = {}
        if isinstance(b.get("modelOverrides"), Mapping):
            allowed = ("threshold", "lifetime", "decay_speed")  # DecayingModel::$allowed_overrides
            overrides.update({k: v for k, v in b["modelOverrides"].items() if k in allowed})
        if not _php_empty(b.get("score")):
            overrides["threshold"] = b["score"]
        self.model_overrides = overrides or None

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


# ------------------------------------------------------ MISP insert modelling
# AttributeValidationTool::HASH_HEX_LENGTH
_HASH_HEX_LENGTH = {
    "authentihash": 64, "md5": 32, "imphash": 32, "telfhash": 70, "sha1": 40, "git-commit-id": 40,
    "x509-fingerprint-md5": 32, "x509-fingerprint-sha1": 40, "x509-fingerprint-sha256": 64,
    "ja3-fingerprint-md5": 32, "jarm-fingerprint": 62, "hassh-md5": 32, "hasshserver-md5": 32, "pehash": 40,
    "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128, "sha512/224": 56, "sha512/256": 64,
    "sha3-224": 56, "sha3-256": 64, "sha3-384": 96, "sha3-512": 128, "dom-hash": 32,
}  # fmt: skip
_HASH_TYPES = set(_HASH_HEX_LENGTH) - {"telfhash", "pehash"}
_FILENAME_HASH_TYPES = {
    "filename|" + h
    for h in ("md5", "sha1", "imphash", "sha224", "sha256", "sha384", "sha512", "sha512/224", "sha512/256",
              "sha3-224", "sha3-256", "sha3-384", "sha3-512", "authentihash")
}  # fmt: skip
_LOWERED_TYPES = {
    "md5", "sha1", "sha224", "sha256", "sha384", "sha512", "sha512/224", "sha512/256", "sha3-224", "sha3-256",
    "sha3-384", "sha3-512", "ja3-fingerprint-md5", "jarm-fingerprint", "hassh-md5", "hasshserver-md5", "hostname",
    "pehash", "authentihash", "vhash", "imphash", "telfhash", "tlsh", "anonymised", "cdhash", "email", "email-src",
    "email-dst", "target-email", "whois-registrant-email", "dom-hash", "onion-address",
}  # fmt: skip
_EMAIL_TYPES = {"email", "email-src", "eppn", "email-dst", "target-email", "whois-registrant-email",
                "dns-soa-email", "jabber-id"}  # fmt: skip
_ALWAYS_VALID_TYPES = {
    "mutex", "process-state", "snort", "bro", "zeek", "community-id", "anonymised", "pattern-in-file",
    "pattern-in-traffic", "pattern-in-memory", "filename-pattern", "pgp-public-key", "pgp-private-key", "yara",
    "stix2-pattern", "sigma", "gene", "kusto-query", "mime-type", "identity-card-number", "cookie", "attachment",
    "malware-sample", "comment", "text", "other", "cpe", "email-attachment", "email-body", "email-header",
    "first-name", "middle-name", "last-name", "full-name",
}  # fmt: skip
_SINGLE_LINE_TYPES = {
    "target-user", "campaign-name", "campaign-id", "threat-actor", "target-machine", "target-org", "target-location",
    "target-external", "email-subject", "malware-type", "url", "uri", "user-agent", "regkey", "regkey|value",
    "filename", "pdb", "windows-scheduled-task", "whois-registrant-name", "whois-registrant-org", "whois-registrar",
    "whois-creation-date", "date-of-birth", "place-of-birth", "gender", "passport-number", "passport-country",
    "passport-expiration", "redress-number", "nationality", "visa-number", "issue-date-of-the-visa",
    "primary-residence", "country-of-residence", "special-service-request", "frequent-flyer-number",
    "travel-details", "payment-details", "place-port-of-original-embarkation", "place-port-of-clearance",
    "place-port-of-onward-foreign-destination", "passenger-name-record-locator-number", "email-dst-display-name",
    "email-src-display-name", "email-reply-to", "email-x-mailer", "email-mime-boundary", "email-thread-index",
    "email-message-id", "github-username", "github-repository", "github-organisation", "twitter-id", "dkim",
    "dkim-signature", "favicon-mmh3", "chrome-extension-id", "mobile-application-id", "azure-application-id",
    "named pipe",
}  # fmt: skip
_NUMERIC_TYPES = {"bin", "cc-number", "bank-account-nr", "aba-rtn", "prtn", "phone-number", "whois-registrant-phone",
                  "float"}  # fmt: skip
# ComplexTypeTool::REFANG_REGEX_TABLE
_REFANG = (
    (re.compile(r"^(hxxp|hxtp|htxp|meow|h\[tt\]p)", re.IGNORECASE), "http", {"link", "url"}),
    (re.compile(r"(\[\.\]|\[dot\]|\(dot\))"), ".",
     {"link", "url", "ip-dst", "ip-src", "domain|ip", "domain", "hostname", "email", "email-src", "email-dst"}),
    (re.compile(r"\[hxxp://\]"), "http://", {"link", "url"}),
    (re.compile(r"\[\@\]|\[at\]"), "@", {"email", "email-src", "email-dst"}),
    (re.compile(r"\[:\]"), ":", {"url", "link"}),
)  # fmt: skip
_DOMAIN = re.compile(r"[A-Z0-9.\-_]+\.[A-Z0-9\-]{2,}", re.IGNORECASE)
_FOUR_BYTE_UTF8 = re.compile("[\U00010000-\U0010ffff]")


@cache
def _composite_types() -> frozenset[str]:
    return frozenset({t for t in describe_types()["types"] if "|" in t} | {"malware-sample"})


def _php_lower(value: str) -> str:
    """PHP 8 ``strtolower``: ASCII only."""
    return value.translate(_ASCII_LOWER)


def _valid_ip(value: str) -> bool:
    """FILTER_VALIDATE_IP (no zone ids, no leading zeros)."""
    if not value or "%" in value:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _inet_compress(value: str) -> str | None:
    """inet_ntop(inet_pton()) for IPv6, glibc style (embedded IPv4 kept dotted)."""
    if "%" in value:
        return None
    try:
        ip = ipaddress.IPv6Address(value)
    except ValueError:
        return None
    words = ip.packed
    if words[:10] == b"\0" * 10 and words[10:12] == b"\xff\xff":
        return f"::ffff:{ipaddress.IPv4Address(words[12:])}"
    if words[:12] == b"\0" * 12 and words[12:14] != b"\0\0":
        return f"::{ipaddress.IPv4Address(words[12:])}"
    return ip.compressed


def _normalise_ip(value: str) -> str:
    """AttributeValidationTool::normalizeIp (note PHP's ``strpos() > 0`` tests: ``::1`` is left alone)."""
    if value.find("/") > 0:
        ip, cidr = value.split("/", 1)
        if ip.find(":") > 0:
            ip = _inet_compress(ip) or ip
        if (cidr == "32" and value.find(".") > 0) or (cidr == "128" and value.find(":") > 0):
            return ip
        return f"{ip}/{cidr}"
    if value.find(":") > 0:
        return _inet_compress(value) or value
    return value


def _punycode(domain: str) -> str:
    """idn_to_ascii() for a domain the validator rejects; unchanged when IDNA refuses it."""
    if _DOMAIN.fullmatch(domain):
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain


def _split_ip_port(value: str) -> str:
    if value.count(":") >= 2:  # IPv6
        if value.find("|") > 0:
            parts = value.split("|")
        elif value.startswith("[") and "]" in value:
            close = value.index("]")
            parts = [value[1:close], (value[close:].split(":") + [""])[1]]
        elif value.find(".") > 0:
            parts = value.split(".")
        elif value.find(" port ") > 0:
            parts = value.split(" port ")
        elif value.find("p") > 0:
            parts = value.split("p")
        elif value.find("#") > 0:
            parts = value.split("#")
        else:
            head, _, tail = value.rpartition(":")
            parts = [head, tail]
    elif value.find(":") > 0:
        parts = value.split(":")
    elif value.find("|") > 0:
        parts = value.split("|")
    else:
        return value
    return f"{_normalise_ip(parts[0])}|{parts[1] if len(parts) > 1 else ''}"


def modify_before_validation(atype: str, value: str) -> str:
    """AttributeValidationTool::modifyBeforeValidation for the types a sync cares about (and a few more)."""
    value = _FOUR_BYTE_UTF8.sub("?", value)
    if atype in ("ip-src", "ip-dst"):
        return _normalise_ip(value)
    if atype in _LOWERED_TYPES:
        return _php_lower(value)
    if atype == "domain":
        return _punycode(_php_lower(value).strip("."))
    if atype == "domain|ip":
        parts = _php_lower(value).split("|")
        if len(parts) < 2:
            return "|".join(parts)
        return f"{_punycode(parts[0].strip('.'))}|{_normalise_ip(parts[1])}" + "".join("|" + p for p in parts[2:])
    if atype in _FILENAME_HASH_TYPES or atype in ("filename|vhash", "filename|pehash", "filename|tlsh"):
        pos = value.find("|")
        return value[:pos] + _php_lower(value[pos:]) if pos >= 0 else _php_lower(value)
    if atype in ("x509-fingerprint-md5", "x509-fingerprint-sha256", "x509-fingerprint-sha1"):
        return _php_lower(value.replace(":", ""))
    if atype in ("ip-dst|port", "ip-src|port"):
        return _split_ip_port(value)
    if atype == "hostname|port":
        return _php_lower(value).replace(":", "|")
    if atype in ("http-method", "hex"):
        return value.upper()
    if atype == "AS":
        if value[:2].upper() == "AS":
            value = value[2:]
        if "." in value:
            high, low = value.split(".", 1)
            if _ctype_digit(high) and _ctype_digit(low):
                return str(int(high) * 65536 + int(low))
        return value
    if atype == "datetime":
        parsed = _parse_datetime(value)
        if parsed is None:
            return value
        return parsed.strftime("%Y-%m-%dT%H:%M:%S.%f") + parsed.strftime("%z")
    return value


def _parse_datetime(value: str) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _valid_link(value: str) -> bool:
    """Approximates PHP's FILTER_VALIDATE_URL: ASCII, no blanks, a scheme, a host for http(s)."""
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.\-]*):(//)?(\S+)", value)
    if not value.isascii() or m is None:
        return False
    return not (m.group(1).lower() in ("http", "https") and (not m.group(2) or m.group(3).startswith("/")))


def validate_value(atype: str, value: str) -> str | None:
    """AttributeValidationTool::validate: None when valid, else MISP's reason."""
    if atype in _HASH_TYPES:
        length = _HASH_HEX_LENGTH[atype]
        if len(value) == length and _xdigit(value):
            return None
        return f"Checksum has an invalid length or format (expected: {length} hexadecimal characters)."
    if atype == "pehash":
        return None if len(value) == 40 and _xdigit(value) else "The input doesn't match the expected sha1 format."
    if atype == "telfhash":
        return None if len(value) in (70, 72) else "Checksum has an invalid length or format."
    if atype == "tlsh":
        return None if _valid_tlsh(value) else "Checksum has an invalid length or format."
    if atype == "ssdeep":
        return None if _SSDEEP.fullmatch(value) else "Invalid SSDeep hash. The format has to be blocksize:hash:hash"
    if atype == "cdhash":
        return None if re.fullmatch(r"[0-9a-f]{40,}", value) else "The input doesn't match the expected format."
    if atype in _FILENAME_HASH_TYPES:
        length = _HASH_HEX_LENGTH[atype[9:]]
        if re.fullmatch(rf".+\|[0-9a-f]{{{length}}}", value):
            return None
        return f"Checksum has an invalid length or format (expected: filename|{length} hexadecimal characters)."
    if atype == "filename|pehash":
        return None if re.fullmatch(r".+\|[0-9a-f]{40}", value) else "The input doesn't match filename|sha1."
    if atype in ("filename|ssdeep", "filename|tlsh"):
        name, _, digest = value.partition("|")
        if "\n" in name:
            return "Filename must not contain new line character."
        ok = _SSDEEP.fullmatch(digest) if atype == "filename|ssdeep" else _valid_tlsh(digest)
        return None if ok else "Invalid hash."
    if atype == "filename|vhash":
        return None if re.fullmatch(r".+\|.+", value) else "Checksum has an invalid length or format."
    if atype in ("ip-src", "ip-dst"):
        return _validate_ip_or_cidr(value)
    if atype == "port":
        return None if _valid_port(value) else "Port numbers have to be integers between 1 and 65535."
    if atype in ("ip-dst|port", "ip-src|port"):
        ip, _, port = value.partition("|")
        if not _valid_ip(ip):
            return "IP address has an invalid format."
        return None if _valid_port(port) else "Port numbers have to be integers between 1 and 65535."
    if atype in ("hostname", "domain"):
        if _DOMAIN.fullmatch(value):
            return None
        return f'{atype.capitalize()} has an invalid format. Please double check the value or select type "other".'
    if atype == "hostname|port":
        host, _, port = value.partition("|")
        if not _DOMAIN.fullmatch(host):
            return "Hostname has an invalid format."
        return None if _valid_port(port) else "Port numbers have to be integers between 1 and 65535."
    if atype == "domain|ip":
        domain, _, ip = value.partition("|")
        if not _DOMAIN.fullmatch(domain):
            return "Domain has an invalid format."
        return None if _valid_ip(ip) else "IP address has an invalid format."
    if atype in _EMAIL_TYPES:
        if re.fullmatch(r".[^\s]*@.*\..*", value, re.IGNORECASE):
            return None
        return "Email address has an invalid format."
    if atype == "onion-address":  # sic: MISP's pattern has an unbalanced {56)
        return None if re.fullmatch(r"[a-z2-7]{16}\.onion", value) else "Onion address has an invalid format."
    if atype in ("mac-address", "mac-eui-64"):
        n = 6 if atype == "mac-address" else 8
        return None if re.fullmatch(rf"([a-fA-F0-9]{{2}}:?){{{n}}}", value) else "Invalid MAC address."
    if atype == "vulnerability":
        return None if re.fullmatch(r"CVE-[0-9]{4}-[0-9]{4,}", value) else "Invalid format. Expected: CVE-xxxx-xxxx..."
    if atype == "weakness":
        return None if re.fullmatch(r"CWE-[0-9]+", value) else "Invalid format. Expected: CWE-x..."
    if atype in _ALWAYS_VALID_TYPES:
        return None
    if atype in _SINGLE_LINE_TYPES:
        return "Value must not contain new line character." if "\n" in value else None
    if atype == "link":
        return None if _valid_link(value) else "Value not in the right type/format."
    if atype == "hex":
        return None if _xdigit(value) else "Value not in the right type/format."
    if atype == "datetime":
        return None if _parse_datetime(value) else "Datetime has to be in the ISO 8601 format."
    if atype in ("size-in-bytes", "counter"):
        return None if _positive_integer(value) else "The value has to be a whole number greater or equal 0."
    if atype in _NUMERIC_TYPES:
        return None if _php_numeric(value) else "Value not in the right type/format."
    if atype in ("iban", "bic", "btc", "dash", "xmr"):
        return None if re.fullmatch(r"[a-zA-Z0-9]+", value) else "Value not in the right type/format."
    if atype == "AS":
        if _positive_integer(value) and int(value) <= 4294967295:
            return None
        return "AS number have to be integer between 1 and 4294967295"
    return None  # no validator in MISP 2.5.1 for this type (or not modelled): accepted


_SSDEEP = re.compile(r"([0-9]+):([0-9a-zA-Z/+]*):([0-9a-zA-Z/+]*)")


def _xdigit(value: str) -> bool:
    return bool(value) and re.fullmatch(r"[0-9a-fA-F]+", value) is not None


def _valid_tlsh(value: str) -> bool:
    value = value[1:] if value.startswith("t") else value
    return len(value) > 35 and _xdigit(value)


def _valid_port(value: str) -> bool:
    return _positive_integer(value) and 1 <= int(value) <= 65535


def _validate_ip_or_cidr(value: str) -> str | None:
    if "/" in value:
        parts = value.split("/")
        if len(parts) != 2 or not _positive_integer(parts[1]):
            return "Invalid CIDR notation value found."
        try:
            version = ipaddress.ip_address(parts[0]).version if "%" not in parts[0] else 0
        except ValueError:
            version = 0
        if version == 0:
            return "IP address has an invalid format."
        if int(parts[1]) > (32 if version == 4 else 128):
            return "Invalid CIDR notation value found."
        return None
    return None if _valid_ip(value) else "IP address has an invalid format."


def _seen_iso(value: Any) -> tuple[str | None, str | None]:
    """first_seen/last_seen as MISP serves them (UTC, microseconds), or an error."""
    if value is None or value == "":
        return None, None
    parsed = _parse_datetime(value) if isinstance(value, str) else None
    if parsed is None:
        return None, "Invalid ISO 8601 format"
    return parsed.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00"), None


def _insert_attribute(raw: Any, now: int, in_object: bool) -> tuple[dict[str, Any] | None, str]:
    """MispAttribute beforeValidate + validation rules: (stored attribute, "") or (None, reason)."""
    if not isinstance(raw, Mapping):
        return None, "Not an attribute."
    a = dict(raw)
    types = describe_types()
    atype = a.get("type")
    if not atype:
        return None, "No type set."
    if atype not in types["sane_defaults"]:
        return None, "Invalid type."
    value = a.get("value")
    if _php_empty(value):
        v1, v2 = a.get("value1"), a.get("value2")
        value = f"{v1}|{v2}" if v1 and v2 else v1 if v1 else value
    if isinstance(value, list | dict):
        return None, "Value is an array."
    if in_object and not a.get("object_relation"):
        return None, "Object attribute sent, but no object_relation set."
    text = "" if value is None or isinstance(value, bool) else str(value)
    text = text.strip(_PHP_TRIM)
    for pattern, replacement, applies in _REFANG:
        if atype in applies:
            text = pattern.sub(replacement, text)
    text = modify_before_validation(atype, text)
    a["value"] = text
    a.pop("value1", None)
    a.pop("value2", None)
    if not a.get("category"):
        a["category"] = types["sane_defaults"][atype]["default_category"]
    if a["category"] not in types["categories"]:
        return None, "Options : Payload delivery, Antivirus detection, Payload installation, Files dropped ..."
    if atype not in types["category_type_mappings"].get(a["category"], ()):
        return None, "Options depend on the selected category."
    if text == "":
        return None, "Value cannot be empty."
    if all(ord(c) < 32 or ord(c) == 127 for c in text):
        return None, "Value provided consists purely of control characters and is therefore considered to be empty."
    if atype in _composite_types() and text.count("|") != 1:
        return None, "Composite type found but the value not in the composite (value1|value2) format."
    reason = validate_value(atype, text)
    if reason:
        return None, reason
    if len(text.encode("utf-8")) > 65535:
        return None, "The entered string is too long and would get truncated."
    to_ids = a["to_ids"] if a.get("to_ids") is not None else types["sane_defaults"][atype]["to_ids"]
    if to_ids not in (True, False, 0, 1, "0", "1"):
        return None, "to_ids is not a boolean."
    a["to_ids"] = to_ids in (True, 1, "1")
    a["distribution"] = str(a["distribution"] if a.get("distribution") is not None else "5")
    if a["distribution"] not in ("0", "1", "2", "3", "4", "5"):
        return None, "Options: Your organisation only, This community only, Connected communities, ..."
    if a.get("uuid"):
        if not isinstance(a["uuid"], str) or not _UUID_SHAPE.fullmatch(a["uuid"]):
            return None, "Please provide a valid RFC 4122 UUID"
        a["uuid"] = a["uuid"].lower()
    if _php_empty(a.get("timestamp")):
        a["timestamp"] = str(now)
    elif _php_numeric(a["timestamp"]):
        a["timestamp"] = str(int(float(a["timestamp"])))  # an int column, served as a string
    for key in ("first_seen", "last_seen"):
        if key in a:
            a[key], error = _seen_iso(a[key])
            if error:
                return None, error
    if a.get("first_seen") and a.get("last_seen") and a["first_seen"] > a["last_seen"]:
        return None, "Last seen value should be greater than first seen value"
    if not a.get("comment"):
        a["comment"] = ""
    return a, ""


def _insert_object_reason(obj: Mapping[str, Any]) -> str:
    """MispObject validation on create: why the object would be dropped, or ""."""
    for key in ("name", "meta-category"):
        if not isinstance(obj.get(key), str) or not obj[key].strip(_PHP_TRIM):
            return f"{key.capitalize()} cannot be empty."
    if "description" in obj and not (isinstance(obj["description"], str) and obj["description"].strip(_PHP_TRIM)):
        return "Description cannot be empty."
    template = obj.get("template_uuid")
    if not isinstance(template, str) or not _UUID_SHAPE.fullmatch(template):
        return "template_uuid: Please provide a valid RFC 4122 UUID"
    version = obj.get("template_version")
    if not _php_empty(version) and not (_positive_integer(version) and int(version) > 0):
        return "template_version must be a natural number."
    return ""


def misp_insert(event: Mapping[str, Any], now: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What MISP stores for an ``events/add`` body, and what it drops silently (with the reason)."""
    ev = dict(event)
    dropped: list[dict[str, Any]] = []

    def drop(kind: str, item: Any, reason: str, obj: Mapping[str, Any] | None = None) -> None:
        item = item if isinstance(item, Mapping) else {}
        dropped.append(
            {
                "event_uuid": ev.get("uuid"),
                "event_info": ev.get("info"),
                "kind": kind,
                "object": obj.get("name") if obj is not None else None,
                "type": item.get("type"),
                "value": item.get("value"),
                "uuid": item.get("uuid"),
                "reason": reason,
            }
        )

    seen: set[tuple[str, str, str, str]] = set()
    uuids: set[str] = set()  # the uuid rule is "isUnique" on create (checked here within the event only)
    composite = _composite_types()
    attributes = []
    for raw in event.get("Attribute") or ():
        a, reason = _insert_attribute(raw, now, in_object=False)
        if a is not None and a.get("uuid") and a["uuid"] in uuids:
            a, reason = None, "The UUID provided is not unique"
        if a is None:
            drop("attribute", raw, reason)
            continue
        if a.get("uuid"):
            uuids.add(a["uuid"])
        if not _php_empty(a.get("deleted")):
            attributes.append(a)  # valueIsUnique() skips deleted attributes
            continue
        v1, _, v2 = a["value"].partition("|") if a["type"] in composite else (a["value"], "", "")
        key = (a["type"].casefold(), a["category"].casefold(), v1.casefold(), v2.casefold())
        if key in seen:
            drop("attribute", raw, "A similar attribute already exists for this event.")
            continue
        seen.add(key)
        attributes.append(a)
    ev["Attribute"] = attributes
    objects = []
    for raw_obj in event.get("Object") or ():
        if not isinstance(raw_obj, Mapping):
            continue
        reason = _insert_object_reason(raw_obj)
        if reason:
            drop("object", {"uuid": raw_obj.get("uuid")}, reason, raw_obj)
            continue
        obj = dict(raw_obj)
        if _php_empty(obj.get("template_version")):
            obj["template_version"] = "1"
        if _php_empty(obj.get("timestamp")):
            obj["timestamp"] = str(now)
        kept = []
        for raw in raw_obj.get("Attribute") or ():
            a, reason = _insert_attribute(raw, now, in_object=True)
            if a is not None and a.get("uuid") and a["uuid"] in uuids:
                a, reason = None, "The UUID provided is not unique"
            if a is None:
                drop("attribute", raw, reason, raw_obj)
                continue
            if a.get("uuid"):
                uuids.add(a["uuid"])
            if not _php_empty(obj.get("deleted")):
                a["deleted"] = True
            kept.append(a)
        obj["Attribute"] = kept
        objects.append(obj)
    ev["Object"] = objects
    return ev, dropped


# ------------------------------------------------------------ decaying models
def _tag_base(name: str) -> str:
    """DecayingModelBase::__extractTagBasename()['base']."""
    if re.fullmatch(r'[^:="]+:[^:="]+="[^:="]+"', name, re.IGNORECASE):
        namespace, rest = name.split(":", 1)
        return f"{namespace}:{rest.split('=', 1)[0]}"
    if re.fullmatch(r'[^:="]+:[^:="]+', name, re.IGNORECASE):
        return name.split(":", 1)[0]
    return name


def _tag_dicts(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    tags = obj.get("Tag")
    if not isinstance(tags, list):
        return []
    return [t for t in tags if isinstance(t, Mapping) and isinstance(t.get("name"), str)]


def base_score(
    model: Mapping[str, Any], event_tags: list[Mapping[str, Any]], attr_tags: list[Mapping[str, Any]]
) -> Any:
    """DecayingModelBase::computeBasescore: taxonomy-weighted numerical_value, else default_base_score."""
    params = model["parameters"]
    config = params.get("base_score_config") or {}
    default = params.get("default_base_score", 0)
    if not config:
        return default
    # __getPrioritisedTag: an attribute tag overrides the event tags of the same base.
    tags = list(event_tags)
    by_base: dict[str, list[int]] = {}
    for i, t in enumerate(tags):
        by_base.setdefault(_tag_base(t["name"]), []).append(i)
    removed: set[int] = set()
    for t in attr_tags:
        positions = by_base.get(_tag_base(t["name"]))
        if positions:
            tags[positions[0]] = t
            removed.update(positions[1:])
        else:
            tags.append(t)
    tags = [t for i, t in enumerate(tags) if i not in removed]
    weighted = [(t, _tag_base(t["name"])) for t in tags]
    total = sum(float(config[b]) for t, b in weighted if b in config and _php_numeric(t.get("numerical_value")))
    ratios = {
        b: float(config[b]) / total for t, b in weighted if b in config and _php_numeric(t.get("numerical_value"))
    }
    if not ratios:
        return default
    score = 0.0
    for t, b in weighted:
        if b in ratios:
            value = t.get("numerical_value")
            score += ratios[b] * (float(value) if _php_numeric(value) else 0.0)
    return score


def polynomial_score(base: float, elapsed: float, lifetime_days: float, decay_speed: float) -> float | int:
    """Polynomial.php: base × (1 − (elapsed/lifetime)^(1/decay_speed)), 0 when negative or elapsed < 0."""
    if elapsed < 0:
        return 0
    score = base * (1 - pow(elapsed / (float(lifetime_days) * 86400), 1 / float(decay_speed)))
    return 0 if score < 0 else score


# ------------------------------------------------------------------ the server
class MispStandIn(StandIn):
    """Plain-http (or https with a PKI) stand-in for a MISP instance.

    Endpoints (log/fault names): ``version`` (GET /servers/getVersion),
    ``me`` (GET /users/view/me), ``describe`` (GET
    /attributes/describeTypes.json), ``events`` (POST /events/restSearch),
    ``attributes`` (POST /attributes/restSearch), ``sightings_add`` (POST
    /sightings/add[/{id}]), ``sightings_search`` (POST
    /sightings/restSearch[/{context}]), ``decaying_index`` (GET
    /decayingModel/index), ``decaying_enable``/``decaying_disable`` (POST
    /decayingModel/enable|disable/{id}), ``decaying_update`` (POST
    /decayingModel/update).

    Keys: ``key`` (role "read only"), ``sighting_keys`` (read only +
    perm_sighting) and ``admin_keys`` (site admin) all authenticate.
    """

    name = "misp"

    def __init__(
        self,
        events: Sequence[Mapping[str, Any]] = (),
        key: str = DEFAULT_KEY,
        pki: PKI | None = None,
        version: str = "2.5.2",
        cache_responses: bool = False,
        *,
        warninglist_metadata_bug: bool = True,
        unpublish_on_edit: bool = True,
        sighting_keys: Iterable[str] = (),
        admin_keys: Iterable[str] = (),
        disable_sighting_loading: bool = False,
        decaying_models_loaded: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``decaying_models_loaded=False`` starts with an empty model store, as a fresh MISP does
        until an admin runs ``decayingModel/update`` (REST, or ``load_default_models()``)."""
        super().__init__(pki)
        self.key = key
        self.warninglist_metadata_bug = warninglist_metadata_bug
        self.unpublish_on_edit = unpublish_on_edit
        self.sighting_keys: set[str] = set(sighting_keys)
        self.admin_keys: set[str] = set(admin_keys)
        self.disable_sighting_loading = disable_sighting_loading
        self.cookies: list[str] = []  # every session id issued in a Set-Cookie, in order
        self.dropped_on_insert: list[dict[str, Any]] = []  # what add_event(normalise=True) dropped, and why
        self.sightings: list[dict[str, Any]] = []  # stored rows, MISP's shape (integers as strings)
        self._sighting_refs: dict[str, tuple[int, str]] = {}  # sighting id -> (event position, attribute uuid)
        self._last_sighting: dict[str, int] = {}  # attribute id -> latest type-0 date_sighting of org 1
        self._sighting_serial = 0
        self.decaying_models: list[dict[str, Any]] = []
        self._clock = clock
        self._offset = 0.0
        self._tag_ids: dict[str, str] = {}
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
        if decaying_models_loaded:
            self.load_default_models()

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
            route("POST", r"/sightings/add(?:\.json)?", "sightings_add", self._auth(self._sightings_add)),
            route("POST", r"/sightings/add/(?P<target>[^/]+)", "sightings_add", self._auth(self._sightings_add)),
            route("POST", r"/sightings/restSearch(?:\.json)?(?:/(?P<context>[^/]*))?", "sightings_search",
                  self._auth(self._sightings_search)),
            route("GET", r"/decayingModel/index(?:\.json)?", "decaying_index", self._auth(self._decaying_index)),
            route("POST", r"/decayingModel/enable/(?P<model>[^/]+)", "decaying_enable",
                  self._auth(lambda req: self._decaying_toggle(req, True))),
            route("POST", r"/decayingModel/disable/(?P<model>[^/]+)", "decaying_disable",
                  self._auth(lambda req: self._decaying_toggle(req, False))),
            route("POST", r"/decayingModel/update(?:/[^/]*)?", "decaying_update", self._auth(self._decaying_update)),
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
            if not self._known_key(req.headers.get("authorization", "").strip()):
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

    def _known_key(self, key: str) -> bool:
        return key == self.key or key in self.sighting_keys or key in self.admin_keys

    def role_for(self, key: str) -> dict[str, Any]:
        """The role behind an API key (admin beats sighting beats the read-only default)."""
        if key in self.admin_keys:
            return ADMIN_ROLE
        if key in self.sighting_keys:
            return SIGHTING_ROLE
        return READ_ONLY_ROLE

    def _role(self, req: Request) -> dict[str, Any]:
        return self.role_for(req.headers.get("authorization", "").strip())

    @staticmethod
    def _error(status: int, message: str, req: Request) -> Response:
        """MISP's exception body: name and message alike, plus the path."""
        return json_response(status, {"name": message, "message": message, "url": req.path})

    def _acl_denied(self, req: Request) -> Response:
        return self._error(403, "You do not have permission to use this functionality.", req)

    # ------------------------------------------------------- cookie and clock
    def on_answer(self, recorded: Recorded, response: Response) -> None:
        """CakePHP renews the session on every API-key request: a fresh session id each time."""
        value = secrets.token_hex(16)
        with self._lock:
            self.cookies.append(value)
        expires = time.strftime("%a, %d-%b-%Y %H:%M:%S GMT", time.gmtime(time.time() + 604800))
        cookie = f"{COOKIE_NAME}={value}; expires={expires}; Max-Age=604800; path=/; HttpOnly; SameSite=Lax"
        response.headers["Set-Cookie"] = cookie + ("; secure" if self.pki else "")

    @property
    def clock(self) -> Callable[[], float]:
        """The stand-in's time source (``now()`` adds the ``advance()`` offset)."""
        return self._clock

    @clock.setter
    def clock(self, value: Callable[[], float]) -> None:
        with self._data:
            self._clock = value
            self._changed()

    def now(self) -> float:
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the stand-in's time forward (or back); cached query results are dropped."""
        with self._data:
            self._offset += seconds
            self._changed()

    # --------------------------------------------------------- simple answers
    def _get_version(self, req: Request) -> Response:
        role = self._role(req)
        return json_response(
            200,
            {
                "version": self.version,
                "pymisp_recommended_version": recommended_pymisp_version(),
                "perm_sync": role["perm_sync"],
                "perm_sighting": role["perm_sighting"],
                "perm_galaxy_editor": role["perm_site_admin"],
                "perm_analyst_data": role["perm_site_admin"],
                "uuid": INSTANCE_UUID if role["perm_sync"] else "-",
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
                    "role_id": self._role(req)["id"],
                    "disabled": False,
                    "change_pw": False,
                    "termsaccepted": True,
                    "last_login": "0",
                    "date_created": "1700000000",
                    "date_modified": "1700000000",
                },
                "Role": dict(self._role(req)),
                "Organisation": {"id": "1", "name": "ORGNAME", "uuid": ORG_UUID, "local": True},
                "UserSetting": [],
            },
        )

    def _describe(self, req: Request) -> Response:
        return json_response(200, {"result": describe_types()})

    # ------------------------------------------------------------- sightings
    def _sightings_add(self, req: Request) -> Response:
        """SightingsController::add: ACL, body massaging, then Sighting::saveSightings."""
        if not self._role(req)["perm_sighting"]:
            return self._acl_denied(req)
        body: Any = req.body if isinstance(req.body, dict) else {}
        if body.get("request") is not None:
            body = body["request"]
        if isinstance(body, dict) and body.get("Sighting") is not None:
            body = body["Sighting"]
        body = dict(body) if isinstance(body, dict) else {}  # never alter the logged request
        now = int(self.now())
        if not _php_empty(body.get("date")) and not _php_empty(body.get("time")):
            try:
                when = dt.datetime.strptime(f"{body['date']}:{body['time']}", "%Y-%m-%d:%H:%M:%S")
            except ValueError:  # DateTime::createFromFormat() false, then ->getTimestamp(): a PHP fatal error
                return json_response(500, self.fault_body(req.recorded, 500))
            timestamp: Any = int(when.replace(tzinfo=dt.timezone.utc).timestamp())
        else:
            timestamp = body["timestamp"] if body.get("timestamp") is not None else now
        if body.get("value") is not None:
            body["values"] = [body["value"]]
        values = body["values"] if body.get("values") is not None else False
        target: Any = unquote(req.params["target"]) if req.params.get("target") else False
        if _php_empty(target) and body.get("uuid") is not None:
            target = body["uuid"]
        if _php_empty(target) and body.get("id") is not None:
            target = body["id"]
        stype = body["type"] if body.get("type") is not None else "0"
        source = str(body["source"]).strip(_PHP_TRIM) if body.get("source") is not None else ""
        filters = body["filters"] if not _php_empty(body.get("filters")) else None
        with self._data:
            result = self._save_sightings(target, values, timestamp, stype, source, filters, ORG_ID)
        if isinstance(result, str):
            return json_response(200, {"message": "Could not add the Sighting. Reason: " + result})
        return json_response(200, {"Sighting": dict(result)})

    def _save_sightings(
        self, target: Any, values: Any, timestamp: Any, stype: Any, source: str, filters: Any, org_id: str
    ) -> dict[str, Any] | str:
        """Sighting::saveSightings: the last stored row, or MISP's failure reason."""
        type_value = _sighting_type(stype)
        if type_value is None:
            return "Invalid type, please change it before you POST 1000000 sightings."
        if _php_empty(target) or target == "stix":
            if _php_empty(values):
                return "No valid attributes found."
            values = values if isinstance(values, list) else [values]
        targets = self._sighting_targets(target, values, filters)
        if not targets:
            return "No valid attributes found that match the criteria."
        if _php_empty(timestamp) or not _php_numeric(timestamp):
            # beforeValidate() puts a date string in an empty date_sighting; the 'numeric' rule then fails.
            return json.dumps({"date_sighting": ["This field cannot be left blank"]}, separators=(",", ":"))
        date = int(float(timestamp) + 0.5)
        row: dict[str, Any] = {}
        for pos, attr in targets:
            if stype == "2":  # `$type === '2'`: the org's earlier expiration on the attribute goes
                self._drop_sightings(
                    lambda r, a=attr: r["org_id"] == org_id and r["type"] == "2" and r["attribute_id"] == str(a["id"])
                )
            row = self._store_sighting(pos, attr, date, type_value, source, org_id)
        return row

    def _store_sighting(
        self, pos: int, attr: Mapping[str, Any], date: int, stype: int, source: str, org_id: str
    ) -> dict[str, Any]:
        self._sighting_serial += 1  # AUTO_INCREMENT: ids are never reused
        sid = str(self._sighting_serial)
        row = {
            "id": sid,
            "attribute_id": str(attr["id"]),
            "event_id": str(attr["event_id"]),
            "org_id": str(org_id),
            "date_sighting": str(date),
            "uuid": str(uuid.uuid4()),
            "source": source[:255],
            "type": str(stype),
        }
        self.sightings.append(row)
        self._sighting_refs[sid] = (pos, str(attr["uuid"]))
        if stype == 0 and row["org_id"] == ORG_ID:
            self._last_sighting[row["attribute_id"]] = max(date, self._last_sighting.get(row["attribute_id"], date))
        self._response_cache.clear()  # decay scores may change
        return row

    def _drop_sightings(self, doomed: Callable[[dict[str, Any]], bool]) -> None:
        gone = [r for r in self.sightings if doomed(r)]
        if gone:
            self.sightings = [r for r in self.sightings if not doomed(r)]
            for r in gone:
                self._sighting_refs.pop(r["id"], None)

    def _sighting_targets(self, target: Any, values: Any, filters: Any) -> list[tuple[int, dict[str, Any]]]:
        """(event position, served attribute) pairs a sighting applies to, in storage order.

        By id/uuid or by value1/value2 (no ACL beyond existence: the key's org owns the data, and like
        fetchAttributesSimple nothing filters on deleted or to_ids); with ``filters`` the attributes
        restSearch path decides (deleted hidden, to_ids honoured when given).
        """
        found: list[tuple[int, dict[str, Any]]] = []
        if filters is not None:
            body = dict(filters) if isinstance(filters, Mapping) else {}
            body.pop("value", None)  # saveSightings() overwrites it with the values (false when sighting by id)
            if not _php_empty(values):
                body["value"] = values
            f = Filters.from_body(body, "attributes", self.now())
            for i in range(len(self)):
                raw = self._raw(i)
                if raw is None or not self._event_selected(raw, f, str(raw.get("id") or self._id_offset + i + 1)):
                    continue
                ev = self.event(i)
                assert ev is not None
                found.extend((i, a) for a, obj in _attributes_with_objects(ev) if self._attr_ok(a, ev, f, obj))
            return found  # type: ignore[return-value]
        if not (_php_empty(target) or target == "stix"):
            text = str(target)
            if text.find("|") > 0:
                ids = {str(int(float(p))) for p in text.split("|") if _php_numeric(p)}
            elif len(text) == 36:
                wanted = text.lower()
                return self._scan(
                    lambda a: a.get("uuid") is None or str(a["uuid"]).lower() == wanted,
                    lambda a: str(a.get("uuid", "")).lower() == wanted,
                )
            else:
                ids = {str(int(float(text)))} if _php_numeric(text) else set()
            return self._scan(lambda a: a.get("id") is None or str(a["id"]) in ids, lambda a: str(a["id"]) in ids)
        wanted_values = {_php_str(v).casefold() for v in values if v is not None and not isinstance(v, list | dict)}
        composite = _composite_types()

        def halves(a: Mapping[str, Any]) -> tuple[str, str]:
            value = str(a.get("value", ""))
            if a.get("type") in composite:
                head, _, tail = value.partition("|")
                return head.casefold(), tail.casefold()
            return value.casefold(), ""

        def by_value(a: Mapping[str, Any]) -> bool:
            return any(half in wanted_values for half in halves(a))

        return self._scan(by_value, by_value)

    def _scan(
        self, maybe: Callable[[Mapping[str, Any]], bool], match: Callable[[Mapping[str, Any]], bool]
    ) -> list[tuple[int, dict[str, Any]]]:
        """Served attributes matching ``match``; ``maybe`` on the raw data skips events cheaply."""
        found = []
        for i in range(len(self)):
            raw = self._raw(i)
            if raw is None or not any(maybe(a) for a in _all_attributes(raw) if isinstance(a, Mapping)):
                continue
            ev = self.event(i)
            assert ev is not None
            found.extend((i, a) for a in _all_attributes(ev) if match(a))
        return found

    def add_sighting(
        self,
        attribute_uuid: str,
        *,
        type: int = 0,  # noqa: A002 - MISP's field name
        source: str = "",
        timestamp: int | None = None,
        org_id: str = ORG_ID,
    ) -> dict[str, Any]:
        """Test API: store a sighting directly (no permission check); defaults to now on the stand-in clock."""
        with self._data:
            targets = self._sighting_targets(attribute_uuid, False, None)
            if not targets:
                raise KeyError(f"no attribute {attribute_uuid}")
            pos, attr = targets[0]
            date = int(self.now()) if timestamp is None else int(timestamp)
            return self._store_sighting(pos, attr, date, int(type), source, str(org_id))

    def _sightings_search(self, req: Request) -> Response:
        """AppController::restSearch + Sighting::restSearch (JSON export)."""
        if not isinstance(req.body, dict) or not req.body:
            return self._error(400, "Either specify the search terms in the url, or POST a json with the filter "
                                    "parameters.", req)  # fmt: skip
        data = req.body["request"] if req.body.get("request") is not None else req.body
        data = data if isinstance(data, dict) else {}
        filters = {k: data[k] for k in _SIGHTING_PARAMS if data.get(k) is not None}
        context = unquote(req.params.get("context") or "")
        if context and context.lower() not in ("null", "0", "false"):
            filters["context"] = context
        for k, v in list(filters.items()):
            if isinstance(v, str):
                v = v.strip(_PHP_TRIM)
                filters[k] = v.split("||") if v.find("||") > 0 else v
        fmt = filters.get("returnFormat") or "json"
        if fmt not in ("json", "xml", "csv"):
            return self._error(404, "Invalid output format.", req)
        if fmt != "json":
            return self._error(400, f"stand-in: returnFormat {fmt} is not modelled", req)
        if "context" in filters and filters["context"] not in ("event", "attribute"):
            return self._error(400, f"Invalid context {_php_str(filters['context'])}.", req)
        if not _php_empty(filters.get("context")) and "id" not in filters and "uuid" not in filters:
            return self._error(400, "An ID or UUID must be provided if the context is set.", req)
        if not _php_empty(filters.get("id")):
            for given in filters["id"] if isinstance(filters["id"], list) else [filters["id"]]:
                if not isinstance(given, int) or isinstance(given, bool):
                    return self._error(400, f"Invalid ID `{_php_str(given)}` provided.", req)
        if self.disable_sighting_loading:
            return json_response(200, {"response": []})
        with self._data:
            try:
                keep = self._sighting_conditions(filters, int(self.now()))
            except ValueError:  # setTimestampConditions(): InvalidArgumentException
                return json_response(500, self.fault_body(req.recorded, 500))
            results = self._sighting_results(keep, filters)
        return json_response(200, {"response": results})

    def _sighting_conditions(
        self, filters: dict[str, Any], now: int
    ) -> Callable[[dict[str, Any], dict[str, Any]], bool]:
        """The SQL conditions of Sighting::restSearch as a predicate on (row, its event)."""
        checks: list[Callable[[dict[str, Any], dict[str, Any]], bool]] = []
        if filters.get("from") is not None and filters.get("to") is not None:
            window: Any = [filters["from"], filters["to"]]
        else:
            window = filters.get("last", "30d")
        if isinstance(window, list):
            if len(window) != 2:
                raise ValueError("Invalid date specification, must be string or array with two elements")
            lo, hi = sorted(_resolve_delta(w, now) for w in window)
            checks.append(lambda r, e: (lo == 0 or int(r["date_sighting"]) >= lo) and int(r["date_sighting"]) <= hi)
        else:
            since = _resolve_delta(window, now)
            if since != 0:
                checks.append(lambda r, e: int(r["date_sighting"]) >= since)
        if "type" in filters:
            types = {_int_text(t) for t in _as_list(filters["type"])}
            checks.append(lambda r, e: r["type"] in types)
        if "org_id" in filters:
            checks.append(self._org_condition(filters["org_id"]))
        if "source" in filters:
            sources = {_php_str(s) for s in _as_list(filters["source"])}
            checks.append(lambda r, e: r["source"] in sources)
        context = filters.get("context")
        if context == "attribute":
            if not _php_empty(filters.get("id")):
                ids = {str(i) for i in _as_list(filters["id"])}
                checks.append(lambda r, e: r["attribute_id"] in ids)
            if not _php_empty(filters.get("uuid")):
                uuids = {str(u).lower() for u in _as_list(filters["uuid"])}
                checks.append(lambda r, e: self._sighting_refs[r["id"]][1].lower() in uuids)
        elif context == "event":
            if not _php_empty(filters.get("uuid")):  # replaces an id condition (same SQL key)
                uuids = {str(u).lower() for u in _as_list(filters["uuid"])}
                checks.append(lambda r, e: str(e.get("uuid", "")).lower() in uuids)
            elif not _php_empty(filters.get("id")):
                ids = {str(i) for i in _as_list(filters["id"])}
                checks.append(lambda r, e: r["event_id"] in ids)
        return lambda r, e: all(check(r, e) for check in checks)

    def _org_condition(self, given: Any) -> Callable[[dict[str, Any], dict[str, Any]], bool]:
        """Only org UUIDs resolve in MISP 2.5.1; an unresolved entry reuses the previous one (or matches nothing)."""
        known = {self._organisation(r["org_id"])["uuid"].lower(): r["org_id"] for r in self.sightings}
        known[ORG_UUID.lower()] = ORG_ID
        include: list[str | None] = []
        exclude: list[str | None] = []
        resolved: str | None = None
        for entry in _as_list(given):
            negate = isinstance(entry, str) and entry.startswith("!")
            text = str(entry)[1:] if negate else str(entry)
            if _UUID_SHAPE.fullmatch(text) and text.lower() in known:
                resolved = known[text.lower()]
            (exclude if negate else include).append(resolved)

        def ok(r: dict[str, Any], e: dict[str, Any]) -> bool:
            if include and r["org_id"] not in include:
                return False
            return not exclude or (None not in exclude and r["org_id"] not in exclude)

        return ok

    def _sighting_results(
        self, keep: Callable[[dict[str, Any], dict[str, Any]], bool], filters: dict[str, Any]
    ) -> list[dict[str, Any]]:
        include_attribute = not _php_empty(filters.get("includeAttribute"))
        include_event = not _php_empty(filters.get("includeEvent"))
        include_uuid = not _php_empty(filters.get("includeUuid"))
        events: dict[int, dict[str, Any] | None] = {}
        results = []
        for row in self.sightings:
            pos, attribute_uuid = self._sighting_refs[row["id"]]
            if pos not in events:
                events[pos] = self.event(pos)
            ev = events[pos]
            if ev is None:
                continue  # hard-deleted event: its attributes are gone
            attr = next((a for a in _all_attributes(ev) if a.get("uuid") == attribute_uuid), None)
            if attr is None or not keep(row, ev):
                continue
            if str(ev.get("org_id")) != ORG_ID and row["org_id"] != ORG_ID:
                continue  # Sightings_policy 0: another org's event shows only our org's sightings
            result: dict[str, Any] = {**row, "value": attr.get("value")}
            if include_uuid:
                result["attribute_uuid"] = attr.get("uuid")
                result["event_uuid"] = ev.get("uuid")
            if include_attribute:
                result["Attribute"] = {k: attr.get(k) for k in ("id", "value", "uuid", "type", "category", "to_ids")}
                result["Attribute"]["id"] = str(result["Attribute"]["id"])
            if include_event:
                orgc = ev.get("Orgc") if isinstance(ev.get("Orgc"), Mapping) else {}
                result["Event"] = {k: ev.get(k) for k in ("id", "uuid", "orgc_id", "org_id", "info")}
                result["Event"]["Orgc"] = {"name": orgc.get("name")}
            if row["org_id"] not in ("", "0"):
                result["Organisation"] = self._organisation(row["org_id"])
            results.append({"Sighting": result})
        return results

    @staticmethod
    def _organisation(org_id: str) -> dict[str, str]:
        if org_id == ORG_ID:
            return {"id": ORG_ID, "uuid": ORG_UUID, "name": "ORGNAME"}
        return {"id": org_id, "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"misp-standin-org-{org_id}")),
                "name": f"ORG{org_id}"}  # fmt: skip

    # -------------------------------------------------------- decaying models
    def load_default_models(self) -> None:
        """What ``decayingModel/update`` does: store the shipped models missing from the store (disabled)."""
        with self._data:
            present = {m["uuid"] for m in self.decaying_models}
            for spec in SHIPPED_DECAYING_MODELS:
                if spec["uuid"] not in present:
                    self.decaying_models.append(self._new_model(spec, default=True))
            self._response_cache.clear()

    def _new_model(self, spec: Mapping[str, Any], default: bool) -> dict[str, Any]:
        next_id = max((int(m["id"]) for m in self.decaying_models), default=0) + 1
        return {
            "id": str(next_id),
            "uuid": spec.get("uuid"),
            "name": spec["name"],
            "parameters": copy.deepcopy(dict(spec["parameters"])),
            "attribute_types": list(spec["attribute_types"]),
            "description": spec.get("description", ""),
            "org_id": ORG_ID,
            "enabled": False,
            "all_orgs": True,
            "ref": list(_MODEL_REFS) if default else None,
            "formula": spec.get("formula", "Polynomial"),
            "version": spec.get("version", ""),
            "default": default,
        }

    def add_model(
        self,
        name: str,
        *,
        lifetime: float,
        decay_speed: float,
        threshold: float,
        default_base_score: float = 80.0,
        attribute_types: Iterable[str] = (),
        base_score_config: Mapping[str, float] | None = None,
        enabled: bool = False,
        description: str = "",
    ) -> dict[str, Any]:
        """Test API: an org model (Polynomial), mapped to ``attribute_types`` as if linked in MISP's UI."""
        if lifetime <= 0 or decay_speed <= 0:
            raise ValueError("lifetime and decay_speed must be positive (MISP would divide by zero)")
        parameters = {
            "lifetime": round(float(lifetime), 4),
            "decay_speed": round(float(decay_speed), 4),
            "threshold": round(float(threshold), 4),
            "default_base_score": round(float(default_base_score), 4),
            "base_score_config": {k: round(float(v), 4) for k, v in (base_score_config or {}).items()},
        }
        spec = {"name": name, "parameters": parameters, "attribute_types": list(attribute_types),
                "description": description, "formula": "Polynomial"}  # fmt: skip
        with self._data:
            model = self._new_model(spec, default=False)
            model["enabled"] = enabled
            self.decaying_models.append(model)
            self._response_cache.clear()
            return model

    def model(self, id_or_name: int | str) -> dict[str, Any]:
        """A stored model by id (int or numeric string) or exact name."""
        with self._data:
            for m in self.decaying_models:
                if m["id"] == str(id_or_name) or m["name"] == id_or_name:
                    return m
        raise KeyError(f"no decaying model {id_or_name!r}")

    def enable_model(self, id_or_name: int | str) -> dict[str, Any]:
        return self._set_enabled(self.model(id_or_name), True)

    def disable_model(self, id_or_name: int | str) -> dict[str, Any]:
        return self._set_enabled(self.model(id_or_name), False)

    def _set_enabled(self, model: dict[str, Any], enabled: bool) -> dict[str, Any]:
        with self._data:
            model["enabled"] = enabled
            self._response_cache.clear()
            return model

    def _model_by_id(self, given: Any) -> dict[str, Any] | None:
        """fetchModel(): ``id = <given>`` in SQL (numeric only; no name lookup)."""
        if not _php_numeric(given):
            return None
        wanted = float(given)
        return next((m for m in self.decaying_models if float(m["id"]) == wanted), None)

    def _model_view(self, model: Mapping[str, Any], editable: bool = False) -> dict[str, Any]:
        view: dict[str, Any] = {"DecayingModel": copy.deepcopy(dict(model))}
        if editable:
            view["DecayingModel"]["isEditable"] = True
        mappings = [] if model["default"] else model["attribute_types"]
        view["DecayingModelMapping"] = [
            {"id": str(n), "attribute_type": t, "model_id": model["id"]} for n, t in enumerate(mappings, start=1)
        ]
        return view

    def _decaying_index(self, req: Request) -> Response:
        with self._data:  # paginate(): ORDER BY DecayingModel.ID DESC
            models = sorted(self.decaying_models, key=lambda m: -int(m["id"]))
            return json_response(200, [self._model_view(m) for m in models])

    def _decaying_toggle(self, req: Request, enabled: bool) -> Response:
        role = self._role(req)
        if not (role["perm_admin"] or role.get("perm_decaying")):
            return self._acl_denied(req)
        given = unquote(req.params["model"])
        action = "enable" if enabled else "disable"
        with self._data:
            model = self._model_by_id(given)
            if model is None:
                return self._error(404, "No Decaying Model with the provided ID exists", req)
            if not role["perm_site_admin"] and (model["default"] or not role.get("perm_decaying")):
                return self._error(405, f"You are not authorised to {action} this model.", req)
            self._set_enabled(model, enabled)
            message = f"Decaying model {action}d"
            return json_response(
                200,
                {
                    "saved": True,
                    "success": True,
                    "name": message,
                    "message": message,
                    "url": f"/decaying_models/{action}/{given}",
                    "data": self._model_view(model, editable=True),
                    "id": given,
                },
            )

    def _decaying_update(self, req: Request) -> Response:
        if not self._role(req)["perm_site_admin"]:
            return self._acl_denied(req)
        self.load_default_models()
        message = "Default decaying models updated"
        body = {"saved": True, "success": True, "name": message, "message": message, "url": "/decaying_models/update"}
        return json_response(200, body)

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
    def _touch(self, ev: dict[str, Any], now: str) -> None:
        """Event side of an edit: new timestamp; unpublished when ``unpublish_on_edit`` (MISP's behaviour)."""
        ev["timestamp"] = now
        if self.unpublish_on_edit:
            ev["published"] = False  # publish_timestamp stays until the next publish

    def set_attribute(self, attribute_uuid: str, **fields: Any) -> dict[str, Any]:
        """Change fields of an attribute (e.g. ``to_ids=False``); bumps timestamps (and unpublishes, see flag)."""
        with self._data:
            i, _ = self._find_attribute(attribute_uuid)
            ev = self._mutable(i)
            attr = next(a for a in _all_attributes(ev) if a.get("uuid") == attribute_uuid)
            now = str(int(self.now()))
            attr.update(fields)
            attr.setdefault("timestamp", now)
            if "timestamp" not in fields:
                attr["timestamp"] = now
            self._touch(ev, now)
            self._changed()
            return attr

    def delete_attribute(self, attribute_uuid: str) -> dict[str, Any]:
        """Soft-delete an attribute (deleted=True, timestamp=now).

        Real MISP also unpublishes the event, and so does the stand-in (``unpublish_on_edit``).
        """
        return self.set_attribute(attribute_uuid, deleted=True)

    def publish_event_of(self, attribute_uuid: str) -> None:
        """Republish the event holding this attribute (an analyst's edit, then Publish)."""
        with self._data:
            i, _ = self._find_attribute(attribute_uuid)
            event_uuid = str((self._raw(i) or {}).get("uuid", ""))
        self.publish(event_uuid)

    def _tag_dict(self, tag: str | Mapping[str, Any], local: bool) -> dict[str, Any]:
        given = dict(tag) if isinstance(tag, Mapping) else {"name": str(tag)}
        name = str(given["name"])
        tag_id = self._tag_ids.setdefault(name, str(1000 + len(self._tag_ids)))
        return {
            "id": tag_id,
            "name": name,
            "colour": "#0088cc",
            "exportable": True,
            "user_id": "0",
            "hide_tag": False,
            "numerical_value": None,
            "is_galaxy": False,
            "is_custom_galaxy": False,
            "local_only": False,
            **given,
            "local": 1 if local else 0,
        }

    @staticmethod
    def _tag_list(holder: dict[str, Any]) -> list[Any]:
        if not isinstance(holder.get("Tag"), list):
            holder["Tag"] = []
        return holder["Tag"]  # type: ignore[no-any-return]

    def tag_event(self, event_uuid: str, tag: str | Mapping[str, Any], *, local: bool = False) -> dict[str, Any]:
        """Attach a tag (name or tag dict) to an event; an already attached name changes nothing."""
        with self._data:
            ev = self._mutable(self._index_of_event(event_uuid))
            tags = self._tag_list(ev)
            entry = self._tag_dict(tag, local)
            if entry["name"] not in _tag_names(ev):
                tags.append(entry)
                self._touch(ev, str(int(self.now())))
                self._changed()
            return ev

    def untag_event(self, event_uuid: str, name: str) -> dict[str, Any]:
        """Detach a tag by name from an event (no-op when absent)."""
        with self._data:
            ev = self._mutable(self._index_of_event(event_uuid))
            tags = self._tag_list(ev)
            kept = [t for t in tags if not (isinstance(t, Mapping) and t.get("name") == name)]
            if len(kept) != len(tags):
                ev["Tag"] = kept
                self._touch(ev, str(int(self.now())))
                self._changed()
            return ev

    def tag_attribute(
        self, attribute_uuid: str, tag: str | Mapping[str, Any], *, local: bool = False
    ) -> dict[str, Any]:
        """Attach a tag to an attribute: MISP's ``touch()`` bumps attribute and event timestamps."""
        with self._data:
            ev, attr = self._mutable_attribute(attribute_uuid)
            entry = self._tag_dict(tag, local)
            if entry["name"] not in _tag_names(attr):
                self._tag_list(attr).append(entry)
                now = str(int(self.now()))
                attr["timestamp"] = now
                self._touch(ev, now)
                self._changed()
            return attr

    def untag_attribute(self, attribute_uuid: str, name: str) -> dict[str, Any]:
        """Detach a tag by name from an attribute (no-op when absent)."""
        with self._data:
            ev, attr = self._mutable_attribute(attribute_uuid)
            tags = self._tag_list(attr)
            kept = [t for t in tags if not (isinstance(t, Mapping) and t.get("name") == name)]
            if len(kept) != len(tags):
                attr["Tag"] = kept
                now = str(int(self.now()))
                attr["timestamp"] = now
                self._touch(ev, now)
                self._changed()
            return attr

    def _mutable_attribute(self, attribute_uuid: str) -> tuple[dict[str, Any], dict[str, Any]]:
        i, _ = self._find_attribute(attribute_uuid)
        ev = self._mutable(i)
        return ev, next(a for a in _all_attributes(ev) if a.get("uuid") == attribute_uuid)

    def unpublish(self, event_uuid: str) -> None:
        with self._data:
            ev = self._mutable(self._index_of_event(event_uuid))
            ev["published"] = False
            ev["timestamp"] = str(int(self.now()))
            self._changed()

    def publish(self, event_uuid: str) -> None:
        with self._data:
            ev = self._mutable(self._index_of_event(event_uuid))
            now = str(int(self.now()))
            ev["published"] = True
            ev["publish_timestamp"] = now
            ev["timestamp"] = now
            self._changed()

    def remove_event(self, event_uuid: str) -> None:
        """Hard delete, as MISP does for events."""
        with self._data:
            self._overrides[self._index_of_event(event_uuid)] = None
            self._changed()

    def add_event(self, event: Mapping[str, Any], normalise: bool = False) -> dict[str, Any]:
        """Append an event (either form); missing timestamps default to now.

        ``normalise=False`` stores the data as given (hostile-data tests rely on
        that). ``normalise=True`` stores what MISP's ``events/add`` would keep:
        normalised values, with invalid/duplicate attributes and invalid objects
        dropped silently and recorded in ``dropped_on_insert``.
        """
        with self._data:
            inner = dict(event.get("Event", event))
            now = int(self.now())
            inner.setdefault("timestamp", str(now))
            inner.setdefault("date", time.strftime("%Y-%m-%d", time.gmtime(now)))
            if normalise:
                inner, dropped = misp_insert(inner, now)
                self.dropped_on_insert.extend(dropped)
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
        f = Filters.from_body(req.body, "events", self.now())
        with self._data:
            matches = self._matching_events(f, f.cache_key(req.body))
            page = matches[(f.page - 1) * f.limit : f.page * f.limit] if f.limit else matches
            if self.warninglist_metadata_bug and f.metadata and (f.warninglist or f.warninglist_hits) and len(page):
                # Warninglist::attachWarninglistToAttributes(): Argument #1 must be of type array, null given
                return json_response(500, self.fault_body(req.recorded, 500))
            decay = _Decay(self, f) if f.include_decay and not f.metadata else None
            out = []
            for i in page:
                ev = self.event(i)
                if ev is not None:
                    out.append({"Event": self._prune(ev, f, decay)})
        return json_response(200, {"response": out}, {"X-Result-Count": str(len(matches))})

    def _prune(self, ev: dict[str, Any], f: Filters, decay: _Decay | None = None) -> dict[str, Any]:
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
        if decay is not None:  # Event::fetchEvent scores every attribute, object attributes included
            event_tags = _tag_dicts(ev)
            for item in [*out["Attribute"], *(a for o in objects for a in o["Attribute"])]:
                scores = decay.scores(item, event_tags)
                if scores:
                    item["decay_score"] = scores
        return out

    def _attributes(self, req: Request) -> Response:
        f = Filters.from_body(req.body, "attributes", self.now())
        with self._data:
            positions, cumulative = self._attribute_counts(f, f.cache_key(req.body))
            total = cumulative[-1] if cumulative else 0
            start, stop = ((f.page - 1) * f.limit, f.page * f.limit) if f.limit else (0, total)
            out: list[dict[str, Any]] = []
            k = bisect_right(cumulative, start)  # first event whose matches reach past `start`
            seen = cumulative[k - 1] if k else 0
            decay = _Decay(self, f) if f.include_decay else None
            skipped = 0
            for i in positions[k:]:
                if seen >= stop:
                    break
                ev = self.event(i)
                assert ev is not None
                summary = {key: ev.get(key) for key in _EVENT_SUMMARY_KEYS}
                event_tags = _tag_dicts(ev) if decay is not None else []
                for a, obj in _attributes_with_objects(ev):
                    if not self._attr_ok(a, ev, f, obj):
                        continue
                    if start <= seen < stop:
                        item = self._attribute_item(a, ev, obj, summary, f)
                        if decay is None or self._keep_scored(item, decay.scores(a, event_tags), f):
                            out.append(item)
                        else:
                            skipped += 1
                    seen += 1
                    if seen >= stop:
                        break
        headers = {"X-Result-Count": str(total)}
        if decay is not None:
            headers["X-Skipped-Elements-Count"] = str(skipped)
        return json_response(200, {"response": {"Attribute": out}}, headers)

    @staticmethod
    def _keep_scored(item: dict[str, Any], scores: list[dict[str, Any]], f: Filters) -> bool:
        """Attach the scores; False when excludeDecayed drops the item (every attached model says decayed)."""
        if not scores:
            return True
        item["decay_score"] = scores
        return not (f.exclude_decayed and all(x["decayed"] for x in scores))

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


class _Decay:
    """Decay scores for one restSearch request: models chosen once, a score list per attribute.

    DecayingModel::attachScoresToAttribute: without ``decayingModel`` the enabled models mapped to the
    attribute's type (id order); with it exactly the models named (enabled or not, any type).
    DecayingModelsFormulas/Base.php::computeCurrentScore picks t0; Polynomial.php scores.
    """

    def __init__(self, misp: MispStandIn, f: Filters) -> None:
        self.misp = misp
        self.now = int(misp.now())
        self.overrides = {k: v for k, v in (f.model_overrides or {}).items() if _php_numeric(v)}
        self.fixed: list[dict[str, Any]] | None = None
        if f.decaying_models is not None:
            chosen = (misp._model_by_id(given) for given in f.decaying_models)
            self.fixed = [self._apply(m) for m in chosen if m is not None]
        self.by_type: dict[Any, list[dict[str, Any]]] = {}

    def _apply(self, model: dict[str, Any]) -> dict[str, Any]:
        if not self.overrides:
            return model
        return {**model, "parameters": {**model["parameters"], **self.overrides}}

    def models(self, atype: Any) -> list[dict[str, Any]]:
        if self.fixed is not None:
            return self.fixed
        if atype not in self.by_type:
            self.by_type[atype] = [
                self._apply(m) for m in self.misp.decaying_models if m["enabled"] and atype in m["attribute_types"]
            ]
        return self.by_type[atype]

    def t0(self, a: Mapping[str, Any]) -> int:
        """Latest visible type-0 sighting, else last_seen, else timestamp; an edit after it wins."""
        try:
            changed = int(float(a.get("timestamp") or 0))
        except (TypeError, ValueError):
            changed = 0
        seen = _iso_epoch(a.get("last_seen"))
        sighted = self.misp._last_sighting.get(str(a.get("id")))
        start = sighted if sighted is not None else seen if seen is not None else changed
        if changed > start:  # "The attribute was modified after the last sighting"
            start = seen if seen is not None else changed
        return start

    def scores(self, a: Mapping[str, Any], event_tags: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        models = self.models(a.get("type"))
        if not models:
            return []
        elapsed = self.now - self.t0(a)
        attr_tags = _tag_dicts(a)
        out = []
        for m in models:
            params = m["parameters"]
            base = base_score(m, event_tags, attr_tags)
            score = polynomial_score(base, elapsed, float(params["lifetime"]), float(params["decay_speed"]))
            out.append(
                {
                    "score": score,
                    "base_score": base,
                    "decayed": float(params["threshold"]) > score,
                    "DecayingModel": {"id": m["id"], "name": m["name"]},
                }
            )
        return out


_SIGHTING_PARAMS = ("context", "returnFormat", "id", "uuid", "type", "from", "to", "last", "org_id", "source",
                    "includeAttribute", "includeEvent", "includeUuid")  # fmt: skip


def _php_str(value: Any) -> str:
    """PHP string interpolation of a scalar."""
    if value is True:
        return "1"
    if value is False or value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _int_text(value: Any) -> str:
    """An integer column compared with a given value, as text."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(int(float(value))) if _php_numeric(value) else _php_str(value)


def _sighting_type(value: Any) -> int | None:
    """saveSightings(): ``in_array($type, [0, 1, 2])`` with PHP 8 loose comparison."""
    if isinstance(value, bool):
        return int(value)
    if _php_numeric(value) and float(value) in (0.0, 1.0, 2.0):
        return int(float(value))
    return None


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
