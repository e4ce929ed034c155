"""What the tests share: the stand-ins' credentials, the sample data's expected keys, builders.

Test modules import from here (never from one another, never from conftest.py): settings and
candidates for the pure-function tests, config files and event corpora for the runs.
"""

from __future__ import annotations

import hashlib
import pprint
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import misp2defender as m2d  # noqa: E402
from tests.standins.base import StandIn  # noqa: E402
from tests.standins.misp import DEFAULT_KEY as MISP_KEY  # noqa: E402
from tests.standins.otx import DEFAULT_KEY as OTX_KEY  # noqa: E402

DATA_DIR = ROOT / "tests" / "data"
SHARED_EVENTS_DIR = ROOT.parent / "shared" / "data" / "misp-events"

TEST_TENANT = "5f1c9a2e-8b3d-4e6f-a7c0-2d9e4b1a6c38"
TEST_CLIENT_ID = "0b7e3f52-6a1d-4c8e-9f24-d1a5c6b7e8f9"
TEST_CLIENT_SECRET = "Zq8~standin.client-secret_4Kp2Vw9"
OTHER_CLIENT_ID = "9c2d4e6f-1a3b-4c5d-8e7f-a0b1c2d3e4f5"
OTHER_CLIENT_SECRET = "Yx7~other.client-secret_1Lm3Nb8"
DEFENDER_SCOPE = "https://api.securitycenter.microsoft.com/.default"
# One "minute" of Defender quota lasts 1 s and one "hour" 60 s: the documented
# counts (30 imports/min, 100 lists/min, 1,500/h) apply, but a test that runs
# into a 429 waits about a second, not a minute.
DEFENDER_TIME_SCALE = 1 / 60

__all__ = ["MISP_KEY", "OTX_KEY", "m2d"]

S = TypeVar("S", bound=StandIn)

BASE_CONFIG: dict[str, Any] = {
    "graph_auth": {"tenant": "7f3c1e2a-5b8d-4c6e-9a0f-1d2e3f4a5b6c", "client_id": "test-client",
                   "client_secret": "test-secret"},
    "misp_domain": "http://127.0.0.1:1/",
    "misp_key": "test-misp-key",
}


def make_settings(**overrides: Any) -> m2d.Settings:
    """Settings from the base config plus overrides, validated by the real loader."""
    return m2d.build_settings({**BASE_CONFIG, **overrides}, environ={})


def write_config(path: Path, values: dict[str, Any]) -> Path:
    """Write a config.py the way a user would, one assignment per line."""
    lines = [f"{name} = {pprint.pformat(value, width=100)}" for name, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


WRITES = ("import", "submit", "delete", "batch_delete")

# The sample events in tests/data, as tests/data/README.md tabulates them (default filters,
# vetted-only mode on event 04, warninglist enforced). Certificate thumbprints are rejected under
# the default Audit action: Defender's certificate indicators take only Allowed/BlockAndRemediate.
SAMPLE_KEYS = {
    ("IpAddress", "185.225.17.88"), ("IpAddress", "91.215.85.147"), ("IpAddress", "46.101.155.38"),
    ("IpAddress", "2a01:4f8:c17:2b1:0:0:0:3"), ("DomainName", "evil-domain.top"),
    ("DomainName", "login-verify-account.xyz"), ("DomainName", "mail.cdn-update-check.top"),
    ("Url", "http://cdn-update-check.top/wp-content/plugins/wpx-cache/loader.php"),
    ("FileSha256", "d2f1da0889b90a130e36f0da535bd9b6fd299e2f9573e6a627a5c540997ab424"),
    ("FileSha256", "bb9008e38301becb5406cdbd3f88f5f789ad9c82b43a750cfc2592a783fc3d92"),
    ("IpAddress", "194.87.31.12"),
    ("Url", "http://secure-login-portal.site/office365/auth.php"), ("DomainName", "secure-login-portal.site"),
    ("DomainName", "xn--bcher-update-dlb.top"), ("DomainName", "auth.secure-login-portal.site"),
    ("DomainName", "office-docs-share.xyz"), ("IpAddress", "5.188.86.172"),
    ("Url", "https://docs-share-files.online/view?doc=INV-2026-1188"), ("IpAddress", "193.42.33.7"),
    ("Url", "https://www.login-verify-account.xyz/owa/auth/logon.aspx?replaceCurrent=1"),
    ("DomainName", "www.login-verify-account.xyz"),
    ("FileMd5", "3e7188e69da07334aa862af04851634f"), ("FileSha1", "bbf3f14daad62c6cbba660465fdbc6f11d75d5a8"),
    ("FileMd5", "5944c615e31c1482bdcc3cbcfa769e4a"), ("FileSha1", "a9f51651341103926ed17ac5363f755beaa2cfe5"),
    ("FileMd5", "d0a9bf3ef7dc08b615e2daf165b035f8"), ("FileSha1", "4c08199ea3ef9d62d1298d97676558f2d3c7994a"),
    ("FileSha256", "b7606bb122de9d77f58125ba3052b9035b39d837277128d5d71dc49d77189dff"),
    ("IpAddress", "141.98.10.61"), ("DomainName", "update-service-cdn.xyz"),
    ("FileSha256", "9fa1a3791607155b9fa2813741369ded4b987375f82e7a6d4f817fb78b7857a1"), ("IpAddress", "80.66.88.145"),
    ("IpAddress", "179.43.187.30"), ("DomainName", "cs-teamserver.cloud-sync-status.top"),
    ("IpAddress", "2a0b:f4c2:2:0:0:0:0:1"), ("Url", "https://cloud-sync-status.top/jquery-3.3.1.min.js"),
}
assert len(SAMPLE_KEYS) == 36

# Sample event 03 and what only it carries (its sha256 d2f1da08… is also in event 01).
EVENT_01 = "c5e5fc6c-e9ef-4edd-b2ec-552651e2fd5e"  # sample event 01 (tests/data)
EVENT_03 = "37018e28-4d6a-4ace-9e41-009656db4192"
ATTR_40103_IP = "cc1317cf-5a8f-48b9-bb20-2b086aa45cde"  # 46.101.155.38, event 01 only
EVENT_03_ONLY = {
    ("FileMd5", "3e7188e69da07334aa862af04851634f"), ("FileSha1", "bbf3f14daad62c6cbba660465fdbc6f11d75d5a8"),
    ("FileMd5", "5944c615e31c1482bdcc3cbcfa769e4a"), ("FileSha1", "a9f51651341103926ed17ac5363f755beaa2cfe5"),
    ("FileMd5", "d0a9bf3ef7dc08b615e2daf165b035f8"), ("FileSha1", "4c08199ea3ef9d62d1298d97676558f2d3c7994a"),
    ("FileSha256", "b7606bb122de9d77f58125ba3052b9035b39d837277128d5d71dc49d77189dff"),
}


@contextmanager
def serving(server: S) -> Iterator[S]:
    """Start a stand-in, hand it over, then close it and demand a clean record."""
    server.start()
    try:
        yield server
    finally:
        server.close()
        assert not server.running, f"{type(server).__name__} thread still alive"
        assert server.errors == [], f"{type(server).__name__} errors: {server.errors}"


def make_candidate(value: str, **fields: Any) -> m2d.Candidate:
    """A Candidate for pure-function tests: a medium Audit domain from event 1 unless told otherwise."""
    defaults: dict[str, Any] = {
        "indicator_type": "DomainName", "action": "Audit", "severity": "Medium", "expiration": None,
        "lifetime_days": 90, "title": "event", "event_id": "1", "event_uuid": "uuid-1", "attribute_type": "domain",
        "category": "Network activity", "comment": "", "attribute_timestamp": 0.0, "generate_alert": True}
    return m2d.Candidate(value=value, **{**defaults, **fields})


def distinct_sha256_events(count: int, per_event: int = 250) -> list[dict]:
    """Events carrying ``count`` distinct sha256 values (the test's own corpus)."""
    events = []
    for start in range(0, count, per_event):
        attributes = [{"uuid": f"00000000-0000-4000-8000-{n:012d}", "type": "sha256", "category": "Payload delivery",
                       "to_ids": True, "value": hashlib.sha256(f"sample-{n}".encode()).hexdigest()}
                      for n in range(start, min(start + per_event, count))]
        events.append({"Event": {"uuid": f"10000000-0000-4000-8000-{start:012d}", "info": f"bulk {start}",
                                 "published": True, "Tag": [{"name": 'workflow:state="complete"'}],
                                 "Attribute": attributes}})
    return events


def wait_for(condition: Any, seconds: float = 15.0) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; its last answer."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())
