"""AlienVault OTX DirectConnect stand-in (HTTPS): indicator "general" lookups.

Serves ``GET /api/v1/indicators/{section}/{value}/general`` with the
``X-OTX-API-KEY`` header, answering the fields a reputation check reads
(``pulse_info.count`` and ``pulses``). ``latency`` slows every lookup so tests
can prove a tool bounds or parallelises its enrichment calls.

Choices: a missing key is treated like a wrong key (403); values match
case-insensitively (hashes and host names are case-insensitive); the ``url``
section takes the rest of the path as the value, percent-decoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

from tests.standins.base import Recorded, Request, Response, Route, StandIn, json_response, route
from tests.standins.tls import PKI

SECTIONS = ("IPv4", "IPv6", "domain", "hostname", "url", "file")
DEFAULT_KEY = "4f0c5e1a9b2d7c3e8f6a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e"
_TYPE_NAMES = {"IPv4": "IPv4", "IPv6": "IPv6", "domain": "domain", "hostname": "hostname", "url": "URL"}
_HASH_TYPES = {32: "FileHash-MD5", 40: "FileHash-SHA1", 64: "FileHash-SHA256"}

Known = Mapping[tuple[str, str], int] | Iterable[str | tuple[str, str]]


class OtxStandIn(StandIn):
    """Stand-in for ``https://otx.alienvault.com``. Endpoint name: ``lookup``.

    ``known`` is a mapping ``(section, value) -> pulse count``, or an iterable
    of values (any section) and/or ``(section, value)`` pairs (count 1 each).
    """

    name = "otx"

    def __init__(self, pki: PKI, key: str = DEFAULT_KEY, known: Known = (), latency: float = 0.0) -> None:
        super().__init__(pki)
        self.key = key
        self.latency = latency
        self.known: dict[tuple[str | None, str], int] = {}
        items = known.items() if isinstance(known, Mapping) else ((k, 1) for k in known)
        for k, count in items:
            section, value = k if isinstance(k, tuple) else (None, k)
            self.known[(section, value.lower())] = int(count)

    def routes(self) -> list[Route]:
        sections = "|".join(SECTIONS)
        return [
            route("GET", rf"/api/v1/indicators/(?P<section>{sections})/(?P<value>.+)/general", "lookup", self._lookup)
        ]

    def fault_body(self, recorded: Recorded, status: int) -> Any:
        return {"detail": "Internal server error." if status >= 500 else "Request failed."}

    def pulse_count(self, section: str, value: str) -> int:
        v = value.lower()
        return self.known.get((section, v), self.known.get((None, v), 0))

    def _lookup(self, req: Request) -> Response:
        if self.latency:
            self._closing.wait(self.latency)
        if req.headers.get("x-otx-api-key", "") != self.key:
            return json_response(403, {"detail": "Invalid API key."})
        section = req.params["section"]
        value = unquote(req.params["value"])
        count = self.pulse_count(section, value)
        if section == "file":
            type_name = _HASH_TYPES.get(len(value), "FileHash-SHA256")
        else:
            type_name = _TYPE_NAMES[section]
        pulses = [self._pulse(value, n) for n in range(min(count, 10))]  # OTX pages pulses; 10 is plenty here
        return json_response(
            200,
            {
                "sections": ["general", "reputation", "geo", "malware", "url_list", "passive_dns", "http_scans"],
                "indicator": value,
                "type": type_name,
                "type_title": type_name,
                "base_indicator": (
                    {
                        "id": 1000 + count,
                        "indicator": value,
                        "type": type_name,
                        "title": "",
                        "description": "",
                        "content": "",
                        "access_type": "public",
                        "access_reason": "",
                    }
                    if count
                    else {}
                ),
                "pulse_info": {
                    "count": count,
                    "pulses": pulses,
                    "references": [],
                    "related": {
                        "alienvault": {"adversary": [], "malware_families": [], "industries": []},
                        "other": {"adversary": [], "malware_families": [], "industries": []},
                    },
                },
                "false_positive": [],
                "validation": [],
                "whois": f"http://whois.domaintools.com/{value}" if section != "file" else "",
                "reputation": 0,
            },
        )

    @staticmethod
    def _pulse(value: str, n: int) -> dict[str, Any]:
        pulse_id = hashlib.sha1(f"{value}-{n}".encode()).hexdigest()[:24]
        return {
            "id": pulse_id,
            "name": f"Stand-in pulse {n + 1} for {value}",
            "description": "",
            "modified": "2024-01-01T00:00:00.000000",
            "created": "2024-01-01T00:00:00.000000",
            "tags": ["malware"],
            "references": [],
            "public": 1,
            "adversary": "",
            "targeted_countries": [],
            "malware_families": [],
            "attack_ids": [],
            "industries": [],
            "TLP": "white",
            "author": {
                "username": "standin",
                "id": "1",
                "avatar_url": "",
                "is_subscribed": False,
                "is_following": False,
            },
            "in_group": False,
            "is_subscribing": None,
        }
