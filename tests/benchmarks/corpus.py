"""A synthetic, lazily generated MISP corpus for benchmarks.

``SyntheticCorpus(n_events, attributes_per_event)`` behaves like a read-only list of MISP events in
``/events/restSearch`` form (``{"Event": {...}}``), but it stores nothing: event ``i`` is built again
from ``(seed, i)`` each time it is asked for.  A corpus of a million attributes therefore costs no
memory until a consumer holds on to the events it was given.

What an event looks like:

* ids and uuids are deterministic (``id`` = ``str(first_event_id + i)``); ``published`` is true;
  ``timestamp`` grows by 60 s per event from ``base_timestamp`` and ``publish_timestamp`` is 30 s
  later, so ``timestamp``/``publish_timestamp`` window filters select contiguous slices.
* event tags: one ``tlp:*`` (mostly green), ``workflow:state="complete"`` (on every event, so the
  default misp2defender tag filter passes them all), ``misp:threat-level=...`` on about a third.
* exactly ``attributes_per_event`` attributes per event, of which about ``object_ratio`` sit in
  ``Object[*].Attribute`` (``file``, ``domain-ip``, ``url`` and ``ip-port`` objects, with
  ``object_relation`` set) and the rest in ``Event.Attribute``.
* type mix of the plain attributes, approximately: 30 % hashes (md5, sha1, sha256,
  filename|sha256, filename|md5, filename|sha1), 20 % IPs (ip-dst, ip-src, ip-dst|port,
  ip-src|port), 20 % domains (domain, hostname, hostname|port, domain|ip), 15 % url, 15 %
  non-mappable (text, filename, link, email-src, mutex, regkey).
* ``to_ids`` is false on about 10 % of the mappable attributes, and follows MISP's default (false)
  for text/link; a few attributes carry ``course-of-action`` tags.
* about ``duplicate_ratio`` of the attributes take their value from a small shared pool, so the
  same hash/IP/domain/URL shows up in several events (composite types share the pool of their
  parts: a ``filename|sha256`` can repeat a plain ``sha256``).
* every value is syntactically valid and public: IPv4 addresses skip private, loopback,
  link-local, shared, documentation, multicast and reserved ranges; hashes are hex digests of
  ``(seed, family, index)``; domains are made-up names under public TLDs.

Nothing here touches the network or the file system.  Run ``python tests/benchmarks/corpus.py`` for
a sample event and timings.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

__all__ = ["SyntheticCorpus"]

_M64 = (1 << 64) - 1
_M128 = (1 << 128) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit hash of an int."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _uuid4(a: int, b: int) -> str:
    """Format two 64-bit ints as a valid version-4, RFC 4122 variant UUID string."""
    a = (a & 0xFFFFFFFFFFFF0FFF) | 0x4000
    b = (b & 0x3FFFFFFFFFFFFFFF) | 0x8000000000000000
    h = f"{a:016x}{b:016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# IPv4 ranges that are not globally routable unicast (start, end inclusive), sorted by start.
_BAD_V4 = sorted(
    (
        int.from_bytes(bytes(map(int, net.split("."))), "big"),
        int.from_bytes(bytes(map(int, net.split("."))), "big") + (1 << (32 - plen)) - 1,
    )
    for net, plen in (
        ("0.0.0.0", 8),
        ("10.0.0.0", 8),
        ("100.64.0.0", 10),
        ("127.0.0.0", 8),
        ("169.254.0.0", 16),
        ("172.16.0.0", 12),
        ("192.0.0.0", 24),
        ("192.0.2.0", 24),
        ("192.31.196.0", 24),
        ("192.52.193.0", 24),
        ("192.88.99.0", 24),
        ("192.168.0.0", 16),
        ("192.175.48.0", 24),
        ("198.18.0.0", 15),
        ("198.51.100.0", 24),
        ("203.0.113.0", 24),
        ("224.0.0.0", 4),
        ("240.0.0.0", 4),
    )
)
_BAD_V4_STARTS = [s for s, _ in _BAD_V4]


def _is_public_v4(n: int) -> bool:
    k = bisect.bisect_right(_BAD_V4_STARTS, n) - 1
    return k < 0 or n > _BAD_V4[k][1]


_WORDS = (
    "update",
    "cdn",
    "secure",
    "login",
    "verify",
    "account",
    "cloud",
    "sync",
    "docs",
    "share",
    "mail",
    "portal",
    "office",
    "files",
    "invoice",
    "track",
    "status",
    "service",
    "auth",
    "check",
    "micro",
    "data",
    "web",
    "static",
    "assets",
    "img",
    "api",
    "node",
    "edge",
    "gate",
    "panel",
    "host",
)
_TLDS = ("top", "xyz", "site", "online", "info", "live", "shop", "club", "icu", "click", "biz", "net")
_SUBS = ("www", "mail", "api", "cdn", "dl", "update", "ns1", "secure", "m", "app")
_PATHS = ("wp-content/plugins", "admin", "gate", "download", "files", "js", "images", "owa/auth", "api/v2")
_EXTS = ("php", "exe", "zip", "js", "html", "aspx", "dll", "doc")
_FILE_EXTS = ("exe", "dll", "doc", "xlsm", "zip", "js", "lnk", "iso", "msi", "ps1")
_PORTS = (80, 443, 8080, 8443, 4444, 1337, 2222, 9001, 50050, 53)
_TEXTS = (
    "C2 observed in sandbox run",
    "payload retrieved over HTTPS",
    "beacon interval 60s",
    "dropped by macro document",
    "seen in malspam wave",
    "config extracted from sample",
)

# (family of the value, weight per 1000) for plain attributes; families map to MISP types below.
_PLAIN_MIX: tuple[tuple[str, int], ...] = (
    ("md5", 80),
    ("sha1", 60),
    ("sha256", 100),
    ("filename|sha256", 40),
    ("filename|md5", 10),
    ("filename|sha1", 10),
    ("ip-dst", 100),
    ("ip-src", 40),
    ("ip-dst|port", 40),
    ("ip-src|port", 20),
    ("domain", 120),
    ("hostname", 60),
    ("hostname|port", 10),
    ("domain|ip", 10),
    ("url", 150),
    ("text", 40),
    ("filename", 40),
    ("link", 30),
    ("email-src", 20),
    ("mutex", 10),
    ("regkey", 10),
)
_TYPE_TABLE: tuple[str, ...] = tuple(t for t, w in _PLAIN_MIX for _ in range(w))
assert len(_TYPE_TABLE) == 1000
_TYPE_SHARE = {t: w / 1000 for t, w in _PLAIN_MIX}

_CATEGORY = {
    "md5": "Payload delivery",
    "sha1": "Payload delivery",
    "sha256": "Payload delivery",
    "filename|sha256": "Payload delivery",
    "filename|md5": "Payload delivery",
    "filename|sha1": "Payload delivery",
    "filename": "Payload delivery",
    "email-src": "Payload delivery",
    "ip-dst": "Network activity",
    "ip-src": "Network activity",
    "ip-dst|port": "Network activity",
    "ip-src|port": "Network activity",
    "domain": "Network activity",
    "hostname": "Network activity",
    "hostname|port": "Network activity",
    "domain|ip": "Network activity",
    "url": "Network activity",
    "port": "Network activity",
    "text": "Other",
    "link": "External analysis",
    "mutex": "Artifacts dropped",
    "regkey": "Persistence mechanism",
    "size-in-bytes": "Other",
}
_NON_IDS_TYPES = frozenset({"text", "link", "port", "size-in-bytes"})
_NON_MAPPABLE = frozenset({"text", "filename", "link", "email-src", "mutex", "regkey", "port", "size-in-bytes"})

# Object templates: name, meta-category, template uuid, version, [(relation, MISP type), ...].
_OBJECTS: tuple[tuple[str, str, str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "file",
        "file",
        "688c46fb-5edb-40a3-8273-1af7923e2215",
        "25",
        (("filename", "filename"), ("md5", "md5"), ("sha1", "sha1"), ("sha256", "sha256")),
    ),
    ("domain-ip", "network", "43b3b146-77eb-4931-b4cc-b66c60f28734", "11", (("domain", "domain"), ("ip", "ip-dst"))),
    (
        "url",
        "network",
        "60efb77b-40b5-4c46-871b-ed1ed999fce5",
        "10",
        (("url", "url"), ("domain", "domain"), ("host", "hostname")),
    ),
    ("ip-port", "network", "9f8cea74-16fe-4968-a2b4-026676949ac6", "10", (("ip", "ip-dst"), ("dst-port", "port"))),
)

_TAG_IDS = {
    "tlp:white": "2",
    "tlp:clear": "3",
    "tlp:green": "4",
    "tlp:amber": "5",
    'workflow:state="complete"': "11",
    'misp:threat-level="high-risk"': "21",
    'misp:threat-level="medium-risk"': "22",
    'misp:threat-level="low-risk"': "23",
    'course-of-action:active="deny"': "31",
    'course-of-action:passive="detect"': "32",
}


def _tag(name: str) -> dict[str, Any]:
    return {
        "id": _TAG_IDS[name],
        "name": name,
        "colour": "#0088cc",
        "exportable": True,
        "user_id": "0",
        "hide_tag": False,
        "local": 0,
    }


_TAGS = {name: _tag(name) for name in _TAG_IDS}

_ATTR_BASE: dict[str, Any] = {
    "id": "",
    "uuid": "",
    "event_id": "",
    "object_id": "0",
    "object_relation": None,
    "type": "",
    "category": "",
    "value": "",
    "to_ids": True,
    "distribution": "5",
    "sharing_group_id": "0",
    "timestamp": "",
    "comment": "",
    "deleted": False,
    "disable_correlation": False,
    "first_seen": None,
    "last_seen": None,
}


class SyntheticCorpus(Sequence):
    """Read-only sequence of ``n_events`` deterministic MISP events (see the module docstring)."""

    def __init__(
        self,
        n_events: int,
        attributes_per_event: int,
        seed: int = 0,
        duplicate_ratio: float = 0.05,
        object_ratio: float = 0.2,
        *,
        base_timestamp: int = 1793606400,  # 2026-11-02T08:00:00Z
        first_event_id: int = 1,
    ) -> None:
        if n_events < 0 or attributes_per_event < 0:
            raise ValueError("n_events and attributes_per_event must be >= 0")
        if not 0.0 <= duplicate_ratio <= 1.0 or not 0.0 <= object_ratio <= 1.0:
            raise ValueError("duplicate_ratio and object_ratio must be within [0, 1]")
        self.n_events = n_events
        self.attributes_per_event = attributes_per_event
        self.seed = seed
        self.duplicate_ratio = duplicate_ratio
        self.object_ratio = object_ratio
        self.base_timestamp = base_timestamp
        self.first_event_id = first_event_id
        self._key = _mix(seed & _M64)
        # Per-type pools of shared values, sized for about three uses per pooled value, so that
        # nearly every attribute drawn from a pool repeats a value seen elsewhere.
        total = n_events * attributes_per_event * duplicate_ratio
        self._pool = {t: min(1 << 24, max(1, int(total * max(_TYPE_SHARE.get(t, 0.0), 0.01) / 3))) for t in _CATEGORY}
        self._object_attrs = round(attributes_per_event * object_ratio)
        self._dup_cut = round(duplicate_ratio * 1024)
        self._makers = self._build_makers()

    # -- Sequence protocol ---------------------------------------------------------------------

    def __len__(self) -> int:
        return self.n_events

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self._event(i) for i in range(*index.indices(self.n_events))]
        if index < 0:
            index += self.n_events
        if not 0 <= index < self.n_events:
            raise IndexError("SyntheticCorpus index out of range")
        return self._event(index)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.n_events):
            yield self._event(i)

    def __repr__(self) -> str:
        return (
            f"SyntheticCorpus(n_events={self.n_events}, attributes_per_event={self.attributes_per_event}, "
            f"seed={self.seed}, duplicate_ratio={self.duplicate_ratio}, object_ratio={self.object_ratio})"
        )

    # -- conveniences --------------------------------------------------------------------------

    @property
    def total_attributes(self) -> int:
        """Attributes in the whole corpus, objects' attributes included."""
        return self.n_events * self.attributes_per_event

    def page(self, page: int, limit: int) -> list[dict[str, Any]]:
        """MISP-style 1-based page of events (what ``/events/restSearch`` with page/limit returns)."""
        if page < 1 or limit < 1:
            raise ValueError("page and limit start at 1")
        start = (page - 1) * limit
        return [self._event(i) for i in range(start, min(start + limit, self.n_events))]

    def event_timestamp(self, index: int) -> int:
        """``timestamp`` of event ``index`` (``publish_timestamp`` is 30 s later)."""
        return self.base_timestamp + 60 * index

    # -- values --------------------------------------------------------------------------------

    def _ip(self, vkey: int) -> str:
        x = _mix(self._key ^ (vkey * 0x100000001B3) ^ 0x1B)
        while True:
            n = x & 0xFFFFFFFF
            if _is_public_v4(n):
                return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
            x = _mix(x)

    def _domain(self, vkey: int) -> str:
        x = _mix(self._key ^ (vkey * 0x9E3779B1) ^ 0xD0)
        w = _WORDS
        return f"{w[x % 32]}-{w[(x >> 5) % 32]}{(x >> 10) % 1000}.{_TLDS[(x >> 20) % len(_TLDS)]}"

    def _hostname(self, vkey: int) -> str:
        x = _mix(self._key ^ vkey ^ 0x405)
        return f"{_SUBS[x % len(_SUBS)]}.{self._domain(vkey)}"

    def _url(self, vkey: int) -> str:
        x = _mix(self._key ^ (vkey * 0x2545F491) ^ 0x0421)
        scheme = "https" if x & 1 else "http"
        return (
            f"{scheme}://{self._domain(vkey ^ 0x5A5A5)}/{_PATHS[(x >> 1) % len(_PATHS)]}/"
            f"{(x >> 8) & 0xFFFFFF:06x}.{_EXTS[(x >> 40) % len(_EXTS)]}"
        )

    def _filename(self, vkey: int) -> str:
        x = _mix(self._key ^ vkey ^ 0xF11E)
        return f"{_WORDS[x % 32]}_{(x >> 5) & 0xFFFF:04x}.{_FILE_EXTS[(x >> 24) % len(_FILE_EXTS)]}"

    def _port(self, vkey: int) -> str:
        return str(_PORTS[_mix(self._key ^ vkey ^ 0x9027) % len(_PORTS)])

    def _value(self, typ: str, vkey: int) -> str:
        return self._makers[typ](vkey)

    def _build_makers(self) -> dict[str, Callable[[int], str]]:
        seed, key, ip, dom, host, fname, port = (
            self.seed,
            self._key,
            self._ip,
            self._domain,
            self._hostname,
            self._filename,
            self._port,
        )
        md5, sha1, sha256 = hashlib.md5, hashlib.sha1, hashlib.sha256
        return {
            "md5": lambda v: md5(f"{seed}:md5:{v}".encode()).hexdigest(),
            "sha1": lambda v: sha1(f"{seed}:sha1:{v}".encode()).hexdigest(),
            "sha256": lambda v: sha256(f"{seed}:sha256:{v}".encode()).hexdigest(),
            "filename|md5": lambda v: f"{fname(v)}|{md5(f'{seed}:md5:{v}'.encode()).hexdigest()}",
            "filename|sha1": lambda v: f"{fname(v)}|{sha1(f'{seed}:sha1:{v}'.encode()).hexdigest()}",
            "filename|sha256": lambda v: f"{fname(v)}|{sha256(f'{seed}:sha256:{v}'.encode()).hexdigest()}",
            "ip-dst": ip,
            "ip-src": ip,
            "ip-dst|port": lambda v: f"{ip(v)}|{port(v)}",
            "ip-src|port": lambda v: f"{ip(v)}|{port(v)}",
            "domain": dom,
            "hostname": host,
            "hostname|port": lambda v: f"{host(v)}|{port(v)}",
            "domain|ip": lambda v: f"{dom(v)}|{ip(v)}",
            "url": self._url,
            "filename": fname,
            "text": lambda v: _TEXTS[_mix(key ^ v) % len(_TEXTS)],
            "link": lambda v: f"https://threat-notes.blog/report/{v:x}",
            "email-src": lambda v: f"{_WORDS[v % 32]}{v % 97}@{dom(v)}",
            "mutex": lambda v: f"Global\\{{{_uuid4(_mix(key ^ v), _mix(v)).upper()}}}",
            "regkey": lambda v: f"HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run\\{_WORDS[v % 32]}{v % 1000}",
            "port": port,
        }

    # -- events --------------------------------------------------------------------------------

    def _attribute(
        self,
        rng: random.Random,
        g: int,
        typ: str | None,
        event_id: str,
        ts: str,
        object_id: str = "0",
        relation: str | None = None,
    ) -> dict[str, Any]:
        # One draw per attribute: 128 bits of uuid, then 10-bit fields for the other choices.
        r = rng.getrandbits(192)
        u = r >> 128
        if typ is None:
            typ = _TYPE_TABLE[(u & 0x3FF) % 1000]
        # Fresh values use even keys, pooled (shared) values odd keys: the two never collide.
        if ((u >> 10) & 0x3FF) < self._dup_cut:
            vkey = ((u >> 40) % self._pool[typ]) * 2 + 1
        else:
            vkey = g * 2
        attr = _ATTR_BASE.copy()
        attr["id"] = str(g + 1)
        h = f"{r & _M128:032x}"
        attr["uuid"] = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"
        attr["event_id"] = event_id
        attr["object_id"] = object_id
        attr["object_relation"] = relation
        attr["type"] = typ
        attr["category"] = _CATEGORY[typ]
        attr["value"] = self._makers[typ](vkey)
        attr["timestamp"] = ts
        if typ in _NON_IDS_TYPES:
            attr["to_ids"] = False
        else:
            if ((u >> 20) & 0x3FF) < 102:  # about 10 %
                attr["to_ids"] = False
            if typ not in _NON_MAPPABLE:
                t = (u >> 30) & 0x3FF
                if t < 41:  # about 4 %
                    attr["Tag"] = [dict(_TAGS['course-of-action:active="deny"'])]
                elif t < 61:  # about 2 %
                    attr["Tag"] = [dict(_TAGS['course-of-action:passive="detect"'])]
        return attr

    def _event(self, i: int) -> dict[str, Any]:
        rng = random.Random((self.seed << 40) ^ i)
        n = self.attributes_per_event
        g0 = i * n
        event_id = str(self.first_event_id + i)
        ts_int = self.base_timestamp + 60 * i
        ts = str(ts_int)
        attr_ts = str(ts_int - 300)

        # objects first, filling about object_ratio of the attributes
        objects: list[dict[str, Any]] = []
        g = g0
        budget = self._object_attrs
        while budget > 0:
            name, meta, tuuid, tver, rels = _OBJECTS[rng.randrange(len(_OBJECTS))]
            rels = rels[:budget]
            oid = g + 1  # unique: the global index of the object's first attribute
            objects.append(
                {
                    "id": str(oid),
                    "uuid": _uuid4(_mix(self._key ^ g ^ 0x0B1), _mix(g ^ 0x0B1)),
                    "name": name,
                    "meta-category": meta,
                    "description": "",
                    "template_uuid": tuuid,
                    "template_version": tver,
                    "event_id": event_id,
                    "timestamp": attr_ts,
                    "distribution": "5",
                    "sharing_group_id": "0",
                    "comment": "",
                    "deleted": False,
                    "first_seen": None,
                    "last_seen": None,
                    "ObjectReference": [],
                    "Attribute": [
                        self._attribute(rng, g + k, typ, event_id, attr_ts, str(oid), rel)
                        for k, (rel, typ) in enumerate(rels)
                    ],
                }
            )
            g += len(rels)
            budget -= len(rels)

        make = self._attribute
        attributes = [make(rng, gg, None, event_id, attr_ts) for gg in range(g, g0 + n)]

        x = _mix(self._key ^ (i * 0x51ED27) ^ 0xE7)
        tlp = ("tlp:green", "tlp:green", "tlp:green", "tlp:white", "tlp:clear", "tlp:amber")[x % 6]
        threat = str(1 + (x >> 3) % 4)
        tags = [dict(_TAGS[tlp]), dict(_TAGS['workflow:state="complete"'])]
        level = (x >> 6) % 3
        if (x >> 8) % 3 == 0:
            tags.append(
                dict(
                    _TAGS[
                        (
                            'misp:threat-level="high-risk"',
                            'misp:threat-level="medium-risk"',
                            'misp:threat-level="low-risk"',
                        )[level]
                    ]
                )
            )
        day = ts_int // 86400
        return {
            "Event": {
                "id": event_id,
                "orgc_id": "1",
                "org_id": "1",
                "date": _civil_date(day),
                "threat_level_id": threat,
                "info": f"Synthetic event {event_id}: {_WORDS[x % 32]} {_WORDS[(x >> 12) % 32]} campaign",
                "published": True,
                "uuid": _uuid4(_mix(self._key ^ i ^ 0xE0E), _mix(i ^ 0xE0E ^ (self._key << 3))),
                "attribute_count": str(n),
                "analysis": "2",
                "timestamp": ts,
                "distribution": "3",
                "proposal_email_lock": False,
                "locked": False,
                "publish_timestamp": str(ts_int + 30),
                "sharing_group_id": "0",
                "disable_correlation": False,
                "extends_uuid": "",
                "Org": {"id": "1", "name": "SYNTHETIC-ORG", "uuid": "5b0e1c2d-3f4a-4b5c-8d6e-7f8091a2b3c4"},
                "Orgc": {"id": "1", "name": "SYNTHETIC-ORG", "uuid": "5b0e1c2d-3f4a-4b5c-8d6e-7f8091a2b3c4"},
                "Tag": tags,
                "Attribute": attributes,
                "Object": objects,
            }
        }


def _civil_date(days: int) -> str:
    """Days since 1970-01-01 -> 'YYYY-MM-DD' (H. Hinnant's algorithm; avoids datetime overhead)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return f"{yoe + era * 400 + (m <= 2):04d}-{m:02d}-{d:02d}"


if __name__ == "__main__":
    import json
    import time
    from collections import Counter

    sample = SyntheticCorpus(3, 12, seed=1)
    print(json.dumps(sample[0], indent=2))

    corpus = SyntheticCorpus(2_000, 100)
    t0 = time.perf_counter()
    n_attrs = 0
    types: Counter[str] = Counter()
    values: Counter[str] = Counter()
    ids_false = 0
    for ev in corpus:
        e = ev["Event"]
        flat = e["Attribute"] + [a for o in e["Object"] for a in o["Attribute"]]
        n_attrs += len(flat)
    t1 = time.perf_counter()
    for ev in corpus:
        e = ev["Event"]
        for a in e["Attribute"] + [a for o in e["Object"] for a in o["Attribute"]]:
            types[a["type"]] += 1
            if a["type"] not in _NON_MAPPABLE:
                values[a["value"]] += 1
            ids_false += not a["to_ids"]
    elapsed = t1 - t0
    print(f"\n{corpus!r}: total_attributes={corpus.total_attributes}, generated {n_attrs}")
    print(
        f"generated 2,000 events x 100 attributes in {elapsed:.3f} s "
        f"({elapsed / 2_000 * 1e3:.3f} ms per event, {elapsed / n_attrs * 1e6:.2f} us per attribute)"
    )
    repeated = sum(c for c in values.values() if c > 1)
    print(
        f"to_ids false: {ids_false / n_attrs:.1%}; "
        f"mappable attributes whose exact value repeats: {repeated / sum(values.values()):.1%}"
    )
    print("type mix:", ", ".join(f"{t} {c / n_attrs:.1%}" for t, c in types.most_common()))
    t0 = time.perf_counter()
    _ = SyntheticCorpus(10, 100_000)[3]
    print(f"one event of 100,000 attributes: {time.perf_counter() - t0:.3f} s")
