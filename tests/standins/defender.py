"""Microsoft Defender for Endpoint "Indicators" API stand-in (HTTPS).

Behaviour follows shared/reference/defender-indicators-api.md. Where Microsoft
documents nothing, the stand-in picks one reading and says so here, so a test
failure can be traced to a deliberate choice:

* Upsert key: (indicatorType, indicatorValue case-insensitively, action) of an
  *active* indicator visible to the caller (the docs team's answer in
  microsoft-365-docs#4927). Only the fields present in the item are updated,
  and never ``application`` (documented) nor ``externalId``.
* BatchDelete with any unknown id answers 404 and deletes nothing (atomic).
  The docs only say "If any Indicator ID wasn't found - 404".
* Expired indicators are treated as gone: not listed, not counted towards the
  cap, not upsert targets, 404 on delete.
* IPv6 must be written with all 8 groups (``strict_ipv6``, the docs' wording);
  documentation ranges (TEST-NET, 2001:db8::/32) count as external so
  fixtures can use them; RFC 1918, CGNAT, loopback, link-local, multicast,
  reserved and unspecified addresses are "internal" and rejected.
* Enum values and property names are case-sensitive.
* ``$filter`` supports only ``field eq 'value'`` / ``generateAlert eq
  true|false`` joined by ``and``; anything else is a 400 ODataError here.
* Without ``$top`` at most 10,000 rows are returned (as cudeso observed).
* Quotas are per (endpoint, client id); a request arriving before the
  Retry-After it was given (with a 429 or 503) on the same endpoint is noted
  in ``early_retries``; Retry-After may be seconds or an HTTP date (RFC 9110).
* ``timestamp_style`` (None by default: times are printed as stored, 6 or 0
  fractional digits and ``Z``) reprints ``expirationTime``,
  ``creationTimeDateTimeUtc`` and ``lastUpdateTime`` of listed and submitted
  indicators with a fixed number of fractional digits (1-7, truncated like
  .NET's ``fffffff``; a 7th digit the store lacks prints as 0) and ``Z`` or an
  explicit offset. The instant is the same whatever the offset.

Alerts (shared/reference/defender-alerts-api.md, get-alerts.md,
get-alert-info-by-id.md). Readings chosen where the docs are silent:

* ``$filter`` is narrower than the documented field list, on purpose:
  ``lastUpdateTime``/``alertCreationTime`` with ``ge``/``gt`` and an unquoted
  OData DateTimeOffset literal (seconds optional, 1-12 fractional digits, ``Z``
  or ``+hh:mm``; a quoted string or a bare date is a type error), and
  ``detectionSource eq '...'`` (case-sensitive), joined by ``and``. Anything
  else, and any ``$`` option other than ``$filter/$top/$skip/$expand`` (so
  ``$orderby`` too: it is not in the supported list), is a 400 ODataError.
  Times compare as instants at 100 ns (tick) precision, so a 7th fractional
  digit counts. A stored time that is missing or unparseable never satisfies
  a comparison (OData null semantics).
* ``$expand=evidence`` (exactly that) fills ``evidence``; otherwise every
  alert that has an ``evidence`` key shows ``[]``. The single-alert GET always
  includes the evidence, as its documented example does.
* Order is not documented; alerts are served in id (string) order, which for
  generated ids is creation order. Clients must not rely on it.
* No ``@odata.nextLink`` (microsoft-365-docs#8489) unless ``next_link`` is on;
  without ``$top`` at most 10,000 rows, as for indicators.
* Retention: only alerts whose ``lastUpdateTime`` is within
  ``alert_retention_days`` (wall clock, not scaled by ``time_scale``) are
  listed or fetched (404 otherwise); an alert whose ``lastUpdateTime`` is
  missing or unparseable is kept, so hostile shapes stay visible.
* The stand-in serves alerts exactly as stored (``add_alert`` accepts any
  shape); only datetime objects given to ``add_alert``/``update_alert`` are
  turned into text. Generated times have 7 fractional digits and ``Z``
  (Microsoft's examples also show ``lastUpdateTime`` trimmed, ``...:59.2Z``:
  pass such text explicitly to test that). The generic title/description of
  a custom-indicator alert is not documented; the defaults are neutral text.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import ipaddress
import math
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlencode

from tests.standins.base import Recorded, Request, Response, Route, StandIn, json_response, route
from tests.standins.entra import EntraStandIn
from tests.standins.tls import PKI

INDICATOR_TYPES = ("FileSha1", "FileSha256", "FileMd5", "CertificateThumbprint", "IpAddress", "DomainName", "Url")
ACTIONS = ("Warn", "Block", "Audit", "Alert", "AlertAndBlock", "BlockAndRemediate", "Allowed")
SEVERITIES = ("Informational", "Low", "Medium", "High")
REQUIRED = ("indicatorValue", "indicatorType", "action", "title", "description")
HASH_LENGTHS = {"FileMd5": 32, "FileSha1": 40, "FileSha256": 64, "CertificateThumbprint": 40}
ALLOWED_ACTIONS: dict[str, frozenset[str]] = {
    **{t: frozenset(ACTIONS) for t in ("FileSha1", "FileSha256", "FileMd5")},
    **{t: frozenset(ACTIONS) - {"BlockAndRemediate"} for t in ("IpAddress", "DomainName", "Url")},
    "CertificateThumbprint": frozenset({"Allowed", "BlockAndRemediate"}),
}
WRITE_ROLES = ("Ti.ReadWrite.All", "Ti.ReadWrite")
ALERT_ROLES = ("Alert.Read.All", "Alert.ReadWrite.All")
# Application roles any one of which a token needs, per endpoint (default WRITE_ROLES).
ENDPOINT_ROLES: dict[str, tuple[str, ...]] = {"alerts": ALERT_ROLES, "alert": ALERT_ROLES}
ACCEPTED_AUDIENCES = frozenset(
    {
        "https://api.securitycenter.microsoft.com",
        "https://api.security.microsoft.com",
        "https://api.securitycenter.windows.com",
        "https://securitycenter.onmicrosoft.com/windowsatpservice",
    }
)
STRING_FILTER_FIELDS = frozenset(
    {
        "application",
        "createdBy",
        "indicatorValue",
        "indicatorType",
        "action",
        "severity",
        "title",
        "createdByDisplayName",
    }
)
UPDATABLE = (
    "expirationTime",
    "severity",
    "title",
    "description",
    "recommendedActions",
    "generateAlert",
    "rbacGroupNames",
)
MAX_BATCH = 500
MAX_TOP = 10_000
# (count, window seconds before time_scale) per endpoint and client id.
DEFAULT_QUOTAS: dict[str, tuple[tuple[int, float], ...]] = {
    "import": ((30, 60),),
    "list": ((100, 60), (1500, 3600)),
    "submit": ((100, 60), (1500, 3600)),
    "delete": ((100, 60), (1500, 3600)),
    "batch_delete": ((30, 60), (1500, 3600)),
    "alerts": ((100, 60), (1500, 3600)),
    "alert": ((100, 60), (1500, 3600)),
}
# Indicator times that ``timestamp_style`` reprints.
STYLED_TIME_FIELDS = ("expirationTime", "creationTimeDateTimeUtc", "lastUpdateTime")
# Every evidence item carries all of these keys, unused ones null (get-alerts.md, Example 2).
EVIDENCE_KEYS = (
    "entityType",
    "evidenceCreationTime",
    "sha1",
    "sha256",
    "fileName",
    "filePath",
    "processId",
    "processCommandLine",
    "processCreationTime",
    "parentProcessId",
    "parentProcessCreationTime",
    "parentProcessFileName",
    "parentProcessFilePath",
    "ipAddress",
    "url",
    "registryKey",
    "registryHive",
    "registryValueType",
    "registryValue",
    "accountName",
    "domainName",
    "userSid",
    "aadUserId",
    "userPrincipalName",
    "detectionStatus",
)
ALERT_TIME_FILTERS = frozenset({"lastUpdateTime", "alertCreationTime"})
ALERT_QUERY_OPTIONS = frozenset({"$filter", "$top", "$skip", "$expand"})
DEFAULT_ALERT_RETENTION_DAYS = 180.0
TICKS_PER_SECOND = 10_000_000
_DOTNET_EPOCH = dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc)
_INTERNAL_NETS = [
    (ipaddress.ip_network(n), why)
    for n, why in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "private"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
]
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_ODATA_CLAUSE = re.compile(r"\s*(\w+)\s+eq\s+(?:'((?:[^']|'')*)'|(true|false))\s*")
_ODATA_AND = re.compile(r"and\s+")
_ALERT_CLAUSE = re.compile(r"\s*(\w+)\s+(\w+)\s+('(?:[^']|'')*'|[^\s']+)\s*")
_ODATA_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,12})?)?(?:Z|[+-]\d{2}:\d{2})")
_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})")


def utc_now_text() -> str:
    """Timestamps the way the API prints them (UTC, 7 fractional digits cut to 6)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _format_time(value: dt.datetime) -> str:
    value = value.astimezone(dt.timezone.utc)
    if value.microsecond:
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?\s*(Z|z|[+-]\d{2}:?\d{2})?")


def parse_time(text: Any) -> dt.datetime | None:
    """Parse ISO 8601 (``Z`` or offset; naive means UTC); None when unparseable.

    Hand-rolled because Python 3.10's fromisoformat rejects ``Z`` and the
    1 or 7 fractional digits Defender's own examples use (``...:SS.0Z``).
    """
    if not isinstance(text, str):
        return None
    m = _ISO.fullmatch(text.strip())
    if not m:
        return None
    year, month, day, hour, minute, second, frac, zone = m.groups()
    tz = dt.timezone.utc
    if zone and zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        tz = dt.timezone(sign * dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        return dt.datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((frac or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:
        return None


def to_ticks(value: Any) -> int | None:
    """.NET ticks (100 ns since 0001-01-01 UTC) of a time text or datetime; None when unparseable.

    Ticks keep the 7th fractional digit that ``parse_time`` (microseconds)
    drops, so ``gt`` filters and reprinted times agree with Defender's own
    precision instead of silently rounding to the microsecond.
    """
    if isinstance(value, dt.datetime):
        parsed, seventh = (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)), 0
    else:
        parsed = parse_time(value)
        if parsed is None:
            return None
        m = _ISO.fullmatch(value.strip())
        frac = (m.group(7) if m else None) or ""
        seventh = int(frac[6]) if len(frac) > 6 else 0
    delta = parsed - _DOTNET_EPOCH
    return (delta.days * 86_400 + delta.seconds) * TICKS_PER_SECOND + delta.microseconds * 10 + seventh


def format_ticks(ticks: int, digits: int = 7, offset: str = "Z") -> str:
    """Print ticks as ISO 8601 with ``digits`` fractional digits (0-7, truncated) and ``Z`` or ``±hh:mm``."""
    seconds, frac = divmod(ticks, TICKS_PER_SECOND)
    tz = dt.timezone.utc
    if offset != "Z":
        m = _OFFSET.fullmatch(offset)
        if not m:
            raise ValueError(f"offset must be 'Z' or ±hh:mm, not {offset!r}")
        minutes = (int(m[2]) * 60 + int(m[3])) * (-1 if m[1] == "-" else 1)
        tz = dt.timezone(dt.timedelta(minutes=minutes))
    local = (_DOTNET_EPOCH + dt.timedelta(seconds=seconds)).astimezone(tz)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{frac:07d}"[:digits]
    return text + ("Z" if offset == "Z" else offset)


def format_time7(value: dt.datetime) -> str:
    """A datetime the way Defender prints alert times: UTC, 7 fractional digits, ``Z``."""
    ticks = to_ticks(value)
    assert ticks is not None
    return format_ticks(ticks)


@dataclass(frozen=True)
class TimestampStyle:
    """How indicator listings print times: ``digits`` fractional digits (1-7) and ``offset``.

    ``offset`` is ``"Z"`` or ``"±hh:mm"`` (``"+00:00"`` is the explicit form
    of UTC; ``"+02:00"`` prints the same instant two hours ahead). Defender's
    own examples use 1 digit (``...:SS.0Z``, the CSV doc) and 7 digits.
    """

    digits: int = 7
    offset: str = "Z"

    def __post_init__(self) -> None:
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not 1 <= self.digits <= 7:
            raise ValueError(f"digits must be 1 to 7, not {self.digits!r}")
        if self.offset != "Z":
            m = _OFFSET.fullmatch(self.offset) if isinstance(self.offset, str) else None
            if not m or int(m[2]) > 14 or int(m[3]) > 59:
                raise ValueError(f"offset must be 'Z' or ±hh:mm within ±14:00, not {self.offset!r}")

    def format(self, value: Any) -> Any:
        """Reprint a stored time; None and unparseable values are returned unchanged."""
        ticks = to_ticks(value) if isinstance(value, str) else None
        if ticks is None:
            return value
        try:
            return format_ticks(ticks, self.digits, self.offset)
        except OverflowError:  # year 9999 shifted past the calendar: print what is stored
            return value


def retry_after_seconds(value: str, now: float | None = None) -> float | None:
    """Seconds a Retry-After asks for (delta-seconds or HTTP date); None when unreadable."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return when.timestamp() - (time.time() if now is None else now)
    return None if math.isnan(seconds) else seconds


def _is_hostname(host: str) -> bool:
    if not host or len(host) > 253 or not host.isascii():
        return False
    labels = host.rstrip(".").split(".")
    if len(labels) < 2 or labels[-1].isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


class DefenderStandIn(StandIn):
    """HTTPS stand-in for ``https://api.security.microsoft.com``.

    Endpoints (log/fault names): ``list`` (GET /api/indicators), ``import``
    (POST /api/indicators/import), ``submit`` (POST /api/indicators),
    ``delete`` (DELETE /api/indicators/{id}), ``batch_delete`` (POST
    /api/indicators/BatchDelete), ``alerts`` (GET /api/alerts) and ``alert``
    (GET /api/alerts/{id}). Indicator endpoints need ``Ti.ReadWrite(.All)``,
    alert endpoints ``Alert.Read.All`` or ``Alert.ReadWrite.All`` (``ENDPOINT_ROLES``).
    """

    name = "defender"

    def __init__(
        self,
        pki: PKI,
        entra: EntraStandIn,
        *,
        cap: int = 15_000,
        time_scale: float = 1.0,
        enforce_quotas: bool = True,
        quotas: dict[str, Iterable[tuple[int, float]]] | None = None,
        next_link: bool = False,
        strict_ipv6: bool = True,
        timestamp_style: TimestampStyle | None = None,
        alert_retention_days: float = DEFAULT_ALERT_RETENTION_DAYS,
    ) -> None:
        super().__init__(pki)
        self.entra = entra
        self.cap = cap
        self.time_scale = time_scale
        self.enforce_quotas = enforce_quotas
        self.quotas = {**DEFAULT_QUOTAS, **{k: tuple(v) for k, v in (quotas or {}).items()}}
        self.next_link = next_link
        self.strict_ipv6 = strict_ipv6
        self.timestamp_style = timestamp_style
        self.alert_retention_days = alert_retention_days
        self.indicators: dict[str, dict[str, Any]] = {}
        self.alerts: dict[str, dict[str, Any]] = {}
        self._alert_seq = 0
        self.early_retries: list[Recorded] = []
        self._forbidden: set[str] = set()
        self._next_id = 1
        self._usage: dict[tuple[str, str], list[float]] = {}
        self._retry_deadline: dict[tuple[str, str], float] = {}
        self._state = threading.RLock()

    def routes(self) -> list[Route]:
        # ASP.NET routing is case-insensitive, hence (?i) on the fixed segments.
        return [
            route("GET", r"/api/indicators/?", "list", self._guard("list", self._list)),
            route("POST", r"/api/indicators/?", "submit", self._guard("submit", self._submit)),
            route("POST", r"/api/indicators/(?i:import)", "import", self._guard("import", self._import)),
            route(
                "POST",
                r"/api/indicators/(?i:batchdelete)",
                "batch_delete",
                self._guard("batch_delete", self._batch_delete),
            ),
            route("DELETE", r"/api/indicators/(?P<id>[^/]+)", "delete", self._guard("delete", self._delete)),
            route("GET", r"/api/(?i:alerts)/?", "alerts", self._guard("alerts", self._list_alerts)),
            route("GET", r"/api/(?i:alerts)/(?P<id>[^/]+)", "alert", self._guard("alert", self._get_alert)),
        ]

    # ---------------------------------------------------------------- test API
    def forbid(self, client_id: str) -> None:
        """Answer 403 (missing roles) to this client from now on."""
        self._forbidden.add(client_id)

    def allow(self, client_id: str) -> None:
        self._forbidden.discard(client_id)

    @staticmethod
    def is_active(indicator: dict[str, Any], now: dt.datetime | None = None) -> bool:
        exp = indicator.get("expirationTime")
        if not exp:
            return True
        parsed = parse_time(exp)
        return parsed is None or parsed > (now or dt.datetime.now(dt.timezone.utc))

    def active(self) -> list[dict[str, Any]]:
        """Active indicators ordered by numeric id (what a list would return)."""
        now = dt.datetime.now(dt.timezone.utc)
        with self._state:
            rows = [i for i in self.indicators.values() if self.is_active(i, now)]
        return sorted(rows, key=lambda i: int(i["id"]))

    def owned_by(self, client_id: str) -> list[dict[str, Any]]:
        return [i for i in self.active() if i.get("createdBy") == client_id]

    def seed(
        self,
        indicators: Iterable[dict[str, Any]],
        created_by: str = "some-other-app-id",
        application: str | None = None,
    ) -> list[str]:
        """Add indicators directly (no validation, no cap), as another tool would have."""
        ids = []
        with self._state:
            for item in indicators:
                item = dict(item)
                if application is not None:
                    item["application"] = application
                ind = self._new_indicator(item, created_by, display=f"App {created_by[:8]}")
                ind.update({k: v for k, v in item.items() if k not in ind or ind[k] is None})
                ids.append(ind["id"])
        return ids

    def expire(self, which: str | Callable[[dict[str, Any]], bool]) -> int:
        """Move expirationTime of the matching indicator(s) into the past; returns how many."""
        past = _format_time(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1))
        count = 0
        with self._state:
            for ind in self.indicators.values():
                if (ind["id"] == which) if isinstance(which, str) else which(ind):
                    ind["expirationTime"] = past
                    count += 1
        return count

    # ------------------------------------------------------------ alerts API
    @staticmethod
    def evidence(**fields: Any) -> dict[str, Any]:
        """An evidence item with every documented key (unused ones null), plus ``fields``.

        Defaults: ``entityType`` File, ``evidenceCreationTime`` now, and
        ``detectionStatus`` Detected for File/Process entities (null for the
        others, as in the documented example). Unknown keys are kept: tests may
        add undocumented ones. datetime values become 7-digit ``Z`` text.
        """
        item: dict[str, Any] = dict.fromkeys(EVIDENCE_KEYS)
        item["entityType"] = "File"
        item["evidenceCreationTime"] = format_time7(dt.datetime.now(dt.timezone.utc))
        item.update({k: _alert_value(v) for k, v in fields.items()})
        if "detectionStatus" not in fields and item["entityType"] in ("File", "Process"):
            item["detectionStatus"] = "Detected"
        return item

    def add_alert(self, *, omit: Iterable[str] = (), **fields: Any) -> dict[str, Any]:
        """Store an alert (all documented properties, realistic defaults) and return the live record.

        Defaults model an alert raised by a custom indicator: ``detectionSource``
        CustomerTI, severity Informational (Block indicators only raise generic
        informational alerts), status New, classification/determination null,
        ``evidence`` ``[]``. Times have 7 fractional digits and ``Z``;
        ``lastUpdateTime`` is now and the others precede it, anchored on
        ``alertCreationTime`` or ``lastUpdateTime`` when given (text or
        datetime). ``id`` looks like ``da<creation ticks>_<signed int32>``.

        ``fields`` override or add properties and are stored as given (any
        shape: null, numbers, odd evidence, 5,000 evidence items...); ``omit``
        removes keys from the record. The record is kept under ``str(id)`` (the
        generated id when ``id`` is omitted); ids must be unique (ValueError).
        """
        with self._state:
            self._alert_seq += 1
            seq = self._alert_seq
            now = to_ticks(dt.datetime.now(dt.timezone.utc))
            assert now is not None
            created = to_ticks(fields.get("alertCreationTime"))
            updated = to_ticks(fields.get("lastUpdateTime"))
            if updated is None:  # now, or 1.5 s after a given creation time (documented example's gap)
                updated = (now if created is None else created + 15_000_000) - (seq * 7) % 10
            if created is None:
                created = updated - 15_000_000 - seq % 10
            last_event = created - 1_446_642_453 - (seq * 3) % 10
            first_event = last_event - 1_014_661
            suffix = zlib.crc32(f"{self.entra.tenant}:{seq}".encode()) - 2**31
            alert_id = f"da{created}_{suffix}"
            while alert_id in self.alerts:
                created += 1
                alert_id = f"da{created}_{suffix}"
            alert: dict[str, Any] = {
                "id": alert_id,
                "incidentId": 1_126_092 + seq,
                "investigationId": None,
                "assignedTo": None,
                "severity": "Informational",
                "status": "New",
                "classification": None,
                "determination": None,
                "investigationState": "UnsupportedAlertType",
                "detectionSource": "CustomerTI",
                "detectorId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"defender-standin/detector/{seq}")),
                "category": "SuspiciousActivity",
                "threatFamilyName": None,
                "title": "Custom indicator alert",
                "description": "A custom indicator of compromise matched activity on this device.",
                "alertCreationTime": format_ticks(created),
                "firstEventTime": format_ticks(first_event),
                "lastEventTime": format_ticks(last_event),
                "lastUpdateTime": format_ticks(updated),
                "resolvedTime": None,
                "machineId": hashlib.sha1(f"machine-{seq}".encode()).hexdigest(),
                "computerDnsName": f"wks-{seq:04d}.corp.contoso.com",
                "rbacGroupName": None,
                "aadTenantId": self.entra.tenant,
                "threatName": None,
                "mitreTechniques": [],
                "relatedUser": None,
                "comments": [],
                "evidence": [],
            }
            alert.update({k: _alert_value(v) for k, v in fields.items()})
            key = str(alert.get("id"))
            if key in self.alerts:
                raise ValueError(f"alert id {key!r} already exists")
            for name in omit:
                alert.pop(name, None)
            self.alerts[key] = alert
        return alert

    def update_alert(self, alert_id: str, **fields: Any) -> dict[str, Any]:
        """Change stored properties (e.g. ``classification="FalsePositive"``) and bump ``lastUpdateTime``.

        ``lastUpdateTime`` becomes now, or one tick after its previous value if
        that is later, so an update is always visible to ``lastUpdateTime gt
        <previous>``; give ``lastUpdateTime`` to set it yourself. Setting
        ``status`` Resolved also sets a missing ``resolvedTime``. Returns the
        live record; KeyError for an unknown id.
        """
        with self._state:
            alert = self.alerts[alert_id]
            now = to_ticks(dt.datetime.now(dt.timezone.utc))
            assert now is not None
            previous = to_ticks(alert.get("lastUpdateTime"))
            alert.update({k: _alert_value(v) for k, v in fields.items()})
            if "lastUpdateTime" not in fields:
                alert["lastUpdateTime"] = format_ticks(now if previous is None else max(now, previous + 1))
            if fields.get("status") == "Resolved" and "resolvedTime" not in fields and not alert.get("resolvedTime"):
                alert["resolvedTime"] = format_ticks(now)
        return alert

    def visible_alerts(self) -> list[dict[str, Any]]:
        """Alerts inside the retention window, in the order the listing serves them (by id)."""
        cutoff = self._retention_cutoff()
        with self._state:
            items = sorted(self.alerts.items())
        return [a for _, a in items if self._retained(a, cutoff)]

    def _retention_cutoff(self) -> int:
        """Ticks of the oldest ``lastUpdateTime`` still retained (0 when the window reaches year 1)."""
        try:
            oldest = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=self.alert_retention_days)
        except OverflowError:
            return 0
        return to_ticks(oldest) or 0

    @staticmethod
    def _retained(alert: dict[str, Any], cutoff: int) -> bool:
        ticks = to_ticks(alert.get("lastUpdateTime"))
        return ticks is None or ticks >= cutoff

    # ------------------------------------------------------------ hooks/errors
    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        return json_response(
            status, {"error": {"code": code, "message": message, "target": str(uuid.uuid4())}}, headers
        )

    def fault_body(self, recorded: Recorded, status: int) -> Any:
        code = {
            400: "BadRequest",
            401: "Unauthorized",
            403: "Forbidden",
            404: "NotFound",
            429: "TooManyRequests",
            500: "InternalServerError",
        }.get(status, "InternalServerError" if status >= 500 else "BadRequest")
        message = {
            429: "Response represents reaching quota limit either by number of requests or by CPU.",
            404: "General Not Found error message.",
        }.get(status, "An error occurred.")
        return {"error": {"code": code, "message": message, "target": str(uuid.uuid4())}}

    def _client_of(self, rec: Recorded) -> str | None:
        auth = rec.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        info = self.entra.token_info(auth[7:].strip())
        return info.client_id if info else None

    def on_arrival(self, recorded: Recorded) -> None:
        client = self._client_of(recorded)
        if client is None:
            return
        with self._state:
            deadline = self._retry_deadline.get((client, recorded.endpoint))
            if deadline is not None and recorded.t < deadline:
                self.early_retries.append(recorded)

    def on_answer(self, recorded: Recorded, response: Response) -> None:
        retry_after = response.headers.get("Retry-After")
        if response.status not in (429, 503) or retry_after is None:
            return
        client = self._client_of(recorded)
        if client is None:
            return
        seconds = retry_after_seconds(retry_after)
        if seconds is None:
            return
        with self._state:
            self._retry_deadline[(client, recorded.endpoint)] = time.monotonic() + seconds

    # ---------------------------------------------------------- auth + quotas
    def _guard(
        self, endpoint: str, fn: Callable[[Request, str], Response], roles: Iterable[str] | None = None
    ) -> Callable[[Request], Response]:
        """Wrap a handler with authentication, role checks and quotas, in that order.

        ``roles``: the token needs any one of them (default ``ENDPOINT_ROLES``
        for the endpoint, else ``WRITE_ROLES``); the 403 names them all.
        """
        required = tuple(roles) if roles is not None else ENDPOINT_ROLES.get(endpoint, WRITE_ROLES)
        missing = f"Missing application roles. API required roles: {', '.join(required)}"

        def handler(req: Request) -> Response:
            auth = req.headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            client = self.entra.validate(token) if token else None
            info = self.entra.token_info(token) if client else None
            if client is None or info is None or info.aud.rstrip("/") not in ACCEPTED_AUDIENCES:
                return self._error(401, "Unauthorized", "Unauthorized (invalid or expired authorization header).")
            if client in self._forbidden or not any(r in info.roles for r in required):
                return self._error(403, "Forbidden", missing)
            wait = self._take_quota(endpoint, client)
            if wait is not None:
                return self._error(
                    429,
                    "TooManyRequests",
                    "Response represents reaching quota limit either by number of requests or by CPU.",
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
            return fn(req, client)

        return handler

    def _take_quota(self, endpoint: str, client: str) -> float | None:
        """Consume one slot, or return the seconds until one frees (nothing consumed)."""
        if not self.enforce_quotas:
            return None
        limits = self.quotas.get(endpoint, ())
        if not limits:
            return None
        now = time.monotonic()
        with self._state:
            used = self._usage.setdefault((endpoint, client), [])
            longest = max(w for _, w in limits) * self.time_scale
            while used and used[0] <= now - longest:
                used.pop(0)
            waits = []
            for count, window in limits:
                span = window * self.time_scale
                recent = [t for t in used if t > now - span]
                if len(recent) >= count:
                    waits.append(recent[len(recent) - count] + span - now)
            if waits:
                return max(waits)
            used.append(now)
        return None

    def _can_see(self, client: str, indicator: dict[str, Any]) -> bool:
        info_roles = self.entra.client_roles.get(client, self.entra.roles)
        return "Ti.ReadWrite.All" in info_roles or indicator.get("createdBy") == client

    # ------------------------------------------------------------- validation
    def validate(self, item: Any) -> tuple[str, str] | None:
        """Return (error code, message) for an invalid indicator, else None."""
        if not isinstance(item, dict):
            return "InvalidRequestBody", "Invalid request body."
        for name in REQUIRED:
            value = item.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                return "MissingRequiredParameter", f"Parameter {name} is missing."
            if not isinstance(value, str):
                return "InvalidInput", f"Invalid input {value!r}."
        itype, value, action = item["indicatorType"], item["indicatorValue"].strip(), item["action"]
        if itype not in INDICATOR_TYPES:
            return "InvalidInput", f"Invalid input {itype}."
        if action not in ACTIONS:
            return "InvalidInput", f"Invalid input {action}."
        severity = item.get("severity")
        if severity is not None and severity not in SEVERITIES:
            return "InvalidInput", f"Invalid input {severity}."
        problem = self._check_value(itype, value)
        if problem:
            return problem
        if action not in ALLOWED_ACTIONS[itype]:
            return "InvalidInput", f"Action {action} is not supported for indicator type {itype}."
        generate = item.get("generateAlert")
        valid_text = isinstance(generate, str) and generate.lower() in ("true", "false")
        if generate is not None and not isinstance(generate, bool) and not valid_text:
            return "InvalidInput", f"Invalid input {generate}."
        if action == "Audit" and not _truthy(generate):
            return "InvalidInput", "GenerateAlert must be set to true when creating an indicator with action Audit."
        exp = item.get("expirationTime")
        if exp is not None and parse_time(exp) is None:
            return "InvalidInput", f"Invalid input {exp}."
        groups = item.get("rbacGroupNames")
        if groups is not None and not (isinstance(groups, list) and all(isinstance(g, str) for g in groups)):
            return "InvalidInput", f"Invalid input {groups!r}."
        return None

    def _check_value(self, itype: str, value: str) -> tuple[str, str] | None:
        if itype in HASH_LENGTHS:
            if not re.fullmatch(rf"[0-9A-Fa-f]{{{HASH_LENGTHS[itype]}}}", value):
                return "InvalidHashValue", f"Hash value {value} is invalid."
        elif itype == "IpAddress":
            try:
                ip = ipaddress.ip_address(value)
            except ValueError:
                return "InvalidIpAddress", f"IP address {value} is invalid."
            if ip.version == 6 and self.strict_ipv6 and ("::" in value or value.count(":") != 7):
                return "InvalidIpAddress", f"IP address {value} is invalid. Specify all 8 segments of an IPv6 address."
            for net, why in _INTERNAL_NETS:
                if ip.version == net.version and ip in net:
                    return (
                        "InvalidIpAddress",
                        f"IP address {value} is invalid. Only external IPs are supported ({why}).",
                    )
            if getattr(ip, "ipv4_mapped", None) is not None or value == "255.255.255.255":
                return "InvalidIpAddress", f"IP address {value} is invalid."
        elif itype == "DomainName":
            if not _is_hostname(value):
                return "InvalidDomainName", f"Domain name {value} is invalid."
        elif itype == "Url" and not self._is_url(value):
            return "InvalidUrl", f"URL {value} is invalid."
        return None

    @staticmethod
    def _is_url(value: str) -> bool:
        """Absolute http(s) URL or a scheme-less host[/path]; host a name or an IP."""
        if any(c.isspace() for c in value) or len(value) > 2048:
            return False
        m = re.fullmatch(
            r"(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://)?(?P<host>\[[^\]]+\]|[^/:?#]+)(?::(?P<port>\d{1,5}))?(?P<rest>[/?#].*)?",
            value,
        )
        if not m or (m["scheme"] and m["scheme"].lower() not in ("http", "https")):
            return False
        if m["port"] and not 0 < int(m["port"]) < 65536:
            return False
        host = m["host"].strip("[]")
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            return _is_hostname(host)

    # --------------------------------------------------------------- upserts
    def _new_indicator(self, item: dict[str, Any], client: str, display: str) -> dict[str, Any]:
        now = utc_now_text()
        exp = item.get("expirationTime")
        parsed = parse_time(exp) if exp else None
        ind = {
            "id": str(self._next_id),
            "indicatorValue": item.get("indicatorValue"),
            "indicatorType": item.get("indicatorType"),
            "action": item.get("action"),
            "application": item.get("application"),
            "source": display,
            "sourceType": "AadApp",
            "title": item.get("title"),
            "description": item.get("description"),
            "recommendedActions": item.get("recommendedActions"),
            "creationTimeDateTimeUtc": now,
            "createdBy": client,
            "createdBySource": display,
            "createdByDisplayName": display,
            "expirationTime": _format_time(parsed) if parsed else None,
            "lastUpdateTime": now,
            "lastUpdatedBy": client,
            "severity": item.get("severity") or "Informational",
            "generateAlert": _truthy(item.get("generateAlert")),
            "rbacGroupNames": list(item.get("rbacGroupNames") or []),
            "rbacGroupIds": [],
            "externalId": item.get("externalId"),
            "educateUrl": item.get("educateUrl"),
            "category": item.get("category"),
            "mitreTechniques": list(item.get("mitreTechniques") or []),
            "historicalDetection": False,
            "lookBackPeriod": None,
            "bypassDurationHours": None,
            "notificationId": None,
            "notificationBody": None,
            "version": None,
            "certificateInfo": None,
        }
        self._next_id += 1
        self.indicators[ind["id"]] = ind
        return ind

    @staticmethod
    def _key(ind: dict[str, Any]) -> tuple[str, str, str]:
        return (ind["indicatorType"], str(ind["indicatorValue"]).strip().lower(), ind["action"])

    def _upsert_many(self, items: list[dict[str, Any]], client: str) -> list[tuple[dict[str, Any] | None, str | None]]:
        """Create or update each (already valid) item per the upsert rule.

        Returns (indicator, None) or (None, failure reason) per item. The active
        set and the upsert index are built once per call, because a full tenant
        holds 15,000 indicators and an import carries up to 500 items.
        """
        results: list[tuple[dict[str, Any] | None, str | None]] = []
        with self._state:
            active = self.active()
            count = len(active)
            index: dict[tuple[str, str, str], dict[str, Any]] = {}
            for ind in active:
                if self._can_see(client, ind):
                    index.setdefault(self._key(ind), ind)
            for item in items:
                existing = index.get(self._key(item))
                if existing is not None:
                    self._apply_update(existing, item, client)
                    results.append((existing, None))
                elif count >= self.cap:
                    results.append(
                        (
                            None,
                            f"The tenant has reached the limit of {self.cap} active indicators. "
                            "Delete indicators or let them expire before adding new ones.",
                        )
                    )
                else:
                    clean = {**item, "indicatorValue": item["indicatorValue"].strip()}
                    ind = self._new_indicator(clean, client, self.entra.display_name(client))
                    index[self._key(ind)] = ind
                    count += 1
                    results.append((ind, None))
        return results

    @staticmethod
    def _apply_update(ind: dict[str, Any], item: dict[str, Any], client: str) -> None:
        """Update the documented-updatable fields present in ``item`` (never application)."""
        for name in UPDATABLE:
            if name not in item:
                continue
            value = item[name]
            if name == "expirationTime":
                parsed = parse_time(value) if value else None
                value = _format_time(parsed) if parsed else None
            elif name == "generateAlert":
                value = _truthy(value)
            elif name == "rbacGroupNames":
                value = list(value or [])
            ind[name] = value
        ind["lastUpdateTime"] = utc_now_text()
        ind["lastUpdatedBy"] = client

    # ---------------------------------------------------------------- handlers
    def _paging(self, q: dict[str, str]) -> tuple[int, int] | Response:
        """($top, $skip) from the query, or the 400 ODataError Defender answers."""
        try:
            top = int(q.get("$top", MAX_TOP))
            skip = int(q.get("$skip", 0))
        except ValueError:
            return self._error(400, "ODataError", "Invalid OData URI query: $top and $skip must be integers.")
        if top < 0 or skip < 0:
            return self._error(400, "ODataError", "Invalid OData URI query: $top and $skip must not be negative.")
        if top > MAX_TOP:
            return self._error(
                400, "ODataError", f"Invalid OData URI query: the limit of '{MAX_TOP}' for Top query has been exceeded."
            )
        return top, skip

    def _next_link(self, q: dict[str, str], path: str, total: int, top: int, skip: int) -> str | None:
        """The nextLink Defender does not send (#8489) unless the ``next_link`` knob is on."""
        if not self.next_link or skip + top >= total:
            return None
        nxt = dict(q)
        nxt["$skip"] = str(skip + top)
        return f"{self.url}{path}?{urlencode(nxt)}"

    def _styled(self, ind: dict[str, Any]) -> dict[str, Any]:
        """A copy of an indicator with its times printed in ``timestamp_style`` (if set)."""
        out = dict(ind)
        style = self.timestamp_style
        if style is not None:
            for name in STYLED_TIME_FIELDS:
                if name in out:
                    out[name] = style.format(out[name])
        return out

    def _list(self, req: Request, client: str) -> Response:
        q = req.query
        paging = self._paging(q)
        if isinstance(paging, Response):
            return paging
        top, skip = paging
        try:
            predicate = _parse_filter(q.get("$filter", ""))
        except ValueError as exc:
            return self._error(400, "ODataError", f"Invalid OData URI query: {exc}")
        rows = [i for i in self.active() if self._can_see(client, i) and predicate(i)]
        page = [self._styled(i) for i in rows[skip : skip + top]]
        body: dict[str, Any] = {"@odata.context": f"{self.url}/api/$metadata#Indicators", "value": page}
        nxt = self._next_link(q, "/api/indicators", len(rows), top, skip)
        if nxt:
            body["@odata.nextLink"] = nxt
        return json_response(200, body)

    def _list_alerts(self, req: Request, client: str) -> Response:
        q = req.query
        unsupported = sorted(k for k in q if k.startswith("$") and k not in ALERT_QUERY_OPTIONS)
        if unsupported:
            return self._error(
                400, "ODataError", f"Invalid OData URI query: the query option '{unsupported[0]}' is not supported."
            )
        paging = self._paging(q)
        if isinstance(paging, Response):
            return paging
        top, skip = paging
        expand = self._expand(q)
        if isinstance(expand, Response):
            return expand
        try:
            predicate = _parse_alert_filter(q.get("$filter", ""))
        except ValueError as exc:
            return self._error(400, "ODataError", f"Invalid OData URI query: {exc}")
        rows = [a for a in self.visible_alerts() if predicate(a)]
        page = [self._served_alert(a, expand) for a in rows[skip : skip + top]]
        body: dict[str, Any] = {"@odata.context": f"{self.url}/api/$metadata#Alerts", "value": page}
        nxt = self._next_link(q, "/api/alerts", len(rows), top, skip)
        if nxt:
            body["@odata.nextLink"] = nxt
        return json_response(200, body)

    def _expand(self, q: dict[str, str]) -> bool | Response:
        if "$expand" not in q:
            return False
        if q["$expand"].strip() != "evidence":
            return self._error(
                400,
                "ODataError",
                f"Invalid OData URI query: could not find a navigation property named '{q['$expand']}' to expand.",
            )
        return True

    @staticmethod
    def _served_alert(alert: dict[str, Any], expand: bool) -> dict[str, Any]:
        out = dict(alert)
        if not expand and "evidence" in out:
            out["evidence"] = []
        return out

    def _get_alert(self, req: Request, client: str) -> Response:
        alert_id = unquote(req.params["id"])
        cutoff = self._retention_cutoff()
        with self._state:
            alert = self.alerts.get(alert_id)
            found = alert is not None and self._retained(alert, cutoff)
            served = self._served_alert(alert, True) if alert is not None and found else None
        if served is None:
            return self._error(404, "ResourceNotFound", f"Alert {alert_id} was not found.")
        return json_response(200, {"@odata.context": f"{self.url}/api/$metadata#Alerts/$entity", **served})

    def _import(self, req: Request, client: str) -> Response:
        body = req.body
        items = body.get("Indicators") if isinstance(body, dict) else None
        if not isinstance(items, list):
            return self._error(400, "InvalidRequestBody", "Invalid request body.")
        if not items:
            return self._error(400, "InvalidRequestBody", "Invalid request body: Indicators is empty.")
        if len(items) > MAX_BATCH:
            return self._error(
                400,
                "MaximumBatchSizeExceeded",
                f"Maximum batch size exceeded. Received: {len(items)}, allowed: {MAX_BATCH}.",
            )
        problems = [self.validate(item) for item in items]
        upserted = iter(self._upsert_many([i for i, p in zip(items, problems, strict=True) if p is None], client))
        results = []
        for item, problem in zip(items, problems, strict=True):
            value = item.get("indicatorValue") if isinstance(item, dict) else None
            if problem:
                results.append({"id": None, "indicator": value, "isFailed": True, "failureReason": problem[1]})
                continue
            ind, reason = next(upserted)
            results.append(
                {"id": ind["id"] if ind else None, "indicator": value, "isFailed": ind is None, "failureReason": reason}
            )
        return json_response(200, {"value": results})

    def _submit(self, req: Request, client: str) -> Response:
        problem = self.validate(req.body)
        if problem:
            return self._error(400, *problem)
        ((ind, reason),) = self._upsert_many([req.body], client)
        if ind is None:
            return self._error(400, "BadRequest", reason or "Bad request.")
        return json_response(
            200, {"@odata.context": f"{self.url}/api/$metadata#Indicators/$entity", **self._styled(ind)}
        )

    def _delete(self, req: Request, client: str) -> Response:
        ind_id = req.params["id"]
        with self._state:
            ind = self.indicators.get(ind_id)
            if ind is None or not self.is_active(ind) or not self._can_see(client, ind):
                return self._error(404, "NotFound", f"Indicator {ind_id} was not found.")
            del self.indicators[ind_id]
        return Response(204)

    def _batch_delete(self, req: Request, client: str) -> Response:
        body = req.body
        ids = body.get("IndicatorIds") if isinstance(body, dict) else None
        if not isinstance(ids, list):
            return self._error(400, "InvalidRequestBody", "Invalid request body.")
        if not ids or len(ids) > MAX_BATCH:
            return self._error(
                400, "BadRequest", f"IndicatorIds must hold between 1 and {MAX_BATCH} ids. Received: {len(ids)}."
            )
        keys = []
        for raw in ids:
            text = str(raw).strip() if isinstance(raw, int | str) and not isinstance(raw, bool) else ""
            if not text.isdigit():
                return self._error(400, "InvalidInput", f"Invalid input {raw!r}.")
            keys.append(str(int(text)))
        with self._state:
            missing = [
                k
                for k in keys
                if k not in self.indicators
                or not self.is_active(self.indicators[k])
                or not self._can_see(client, self.indicators[k])
            ]
            if missing:
                return self._error(404, "NotFound", f"Indicators not found: {', '.join(missing)}.")
            for k in keys:
                self.indicators.pop(k, None)
        return Response(204)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def _odata_clauses(text: str, clause: re.Pattern[str]) -> Iterator[re.Match[str]]:
    """Each ``clause`` of an OData ``$filter`` joined by ``and``; ValueError at the first syntax error."""
    pos = 0
    while True:
        m = clause.match(text, pos)
        if not m:
            raise ValueError(f"syntax error at position {pos} in '{text}'.")
        yield m
        pos = m.end()
        if pos == len(text):
            return
        m_and = _ODATA_AND.match(text, pos)
        if not m_and:
            raise ValueError(f"syntax error at position {pos} in '{text}'.")
        pos = m_and.end()


def _parse_filter(text: str) -> Callable[[dict[str, Any]], bool]:
    """Compile the supported OData subset into a predicate; ValueError otherwise."""
    text = text.strip()
    if not text:
        return lambda _ind: True
    clauses: list[tuple[str, Any]] = []
    for m in _odata_clauses(text, _ODATA_CLAUSE):
        name, string, boolean = m.group(1), m.group(2), m.group(3)
        if name == "generateAlert":
            if boolean is None:
                raise ValueError("generateAlert must be compared with true or false.")
            clauses.append((name, boolean == "true"))
        elif name in STRING_FILTER_FIELDS:
            if string is None:
                raise ValueError(f"{name} must be compared with a quoted string.")
            clauses.append((name, string.replace("''", "'")))
        else:
            raise ValueError(f"filtering on '{name}' is not supported.")

    def predicate(ind: dict[str, Any]) -> bool:
        return all(ind.get(name) == value for name, value in clauses)

    return predicate


def _alert_value(value: Any) -> Any:
    """datetimes become Defender-style text (JSON has no datetime); anything else is stored as given."""
    return format_time7(value) if isinstance(value, dt.datetime) else value


def _time_test(name: str, op: str, bound: int) -> Callable[[dict[str, Any]], bool]:
    def test(alert: dict[str, Any]) -> bool:
        ticks = to_ticks(alert.get(name))
        return ticks is not None and (ticks > bound if op == "gt" else ticks >= bound)

    return test


def _parse_alert_filter(text: str) -> Callable[[dict[str, Any]], bool]:
    """Compile the alerts ``$filter`` subset (see the module docstring) into a predicate; ValueError otherwise."""
    text = text.strip()
    if not text:
        return lambda _alert: True
    tests: list[Callable[[dict[str, Any]], bool]] = []
    for m in _odata_clauses(text, _ALERT_CLAUSE):
        name, op, literal = m.groups()
        if name in ALERT_TIME_FILTERS:
            if op not in ("ge", "gt"):
                raise ValueError(f"operator '{op}' is not supported on '{name}'.")
            bound = to_ticks(literal) if _ODATA_DATETIME.fullmatch(literal) else None
            if bound is None:
                raise ValueError(
                    f"A binary operator with incompatible types was detected: '{literal}' is not an "
                    f"Edm.DateTimeOffset literal for '{name}'."
                )
            tests.append(_time_test(name, op, bound))
        elif name == "detectionSource":
            if op != "eq":
                raise ValueError(f"operator '{op}' is not supported on '{name}'.")
            if len(literal) < 2 or not (literal.startswith("'") and literal.endswith("'")):
                raise ValueError(f"{name} must be compared with a quoted string.")
            wanted = literal[1:-1].replace("''", "'")
            tests.append(lambda alert, wanted=wanted: alert.get("detectionSource") == wanted)
        else:
            raise ValueError(f"filtering on '{name}' is not supported.")

    def predicate(alert: dict[str, Any]) -> bool:
        return all(test(alert) for test in tests)

    return predicate
