#!/usr/bin/env python3
"""misp2defender: keep Microsoft Defender for Endpoint custom indicators in step with MISP.

One run, as cron starts it every few hours:

    config.py ─► Settings ─► MISP source ─► mapping ─► desired set ─┐
                                                                     ├─► Plan ─► apply ─► Report, exit code
                          Defender listing ─► existing indicators ──┘

Then, with misp_sightings, Defender alerts on owned values go back to MISP as sightings. With a
``tenants`` list, MISP is read once and each Defender tenant gets its own plan.

Only the MISP source and the HTTP clients (Entra, Key Vault, Defender, OTX) touch the network.
Mapping and planning are pure functions over plain data, so the plan is a value that can be
printed (``--dry-run``), written (``--report``), compared in tests and trusted in production.

Exit codes (one place decides them, ``Report.exit_code``):
    0  Defender holds what was planned (values Defender would refuse don't count)
    1  some planned changes did not land, MISP was read only in part, or the run stopped itself
       (mass-delete guard, tenant cap); the next run picks up what is missing
    2  the run could not proceed and changed nothing (config, credentials, lock, unreachable)

Sections, in the order a run uses them (none calls into a later one, except the run and the
command line, which drive them all):
    Shared helpers · Settings · MISP reading · Mapping · Reading the selection (MISP pages mapped
    as they arrive, in a helper process) · HTTP clients (Entra tokens, Key Vault, Defender, OTX) ·
    Planning · Applying and reporting · Sightings · The run · Command line
"""

from __future__ import annotations

import argparse
import array
import bisect
import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import datetime as dt
import difflib
import email.utils
import fcntl
import functools
import hashlib
import heapq
import ipaddress
import itertools
import json
import logging
import math
import multiprocessing
import os
import queue
import random
import re
import resource
import runpy
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

__version__ = "1.0.0"

log = logging.getLogger("misp2defender")

EXIT_OK, EXIT_INCOMPLETE, EXIT_CANNOT_PROCEED = 0, 1, 2
T = TypeVar("T")


# ###########################################################################################
# Shared helpers: errors, redaction, time, files, the retry policy
# ###########################################################################################

class Misp2DefenderError(Exception):
    """A failure the run reports in one sentence.

    ``exit_code`` says what it means for cron; ``service`` names the system at fault (misp,
    entra, defender, otx, config, files), so that --check and the summary can name the right fix
    without reading the message.
    """

    exit_code = EXIT_CANNOT_PROCEED
    service = ""
    fix = ""  # the fix for this very error, when the service's usual fix would not do

    def __init__(self, message: str, service: str = "", fix: str = "") -> None:
        super().__init__(message)
        if service:
            self.service = service
        if fix:
            self.fix = fix


class ConfigError(Misp2DefenderError):
    service = "config"


class CredentialError(Misp2DefenderError):
    """A service refused our credentials or permissions: retrying will not help."""


class UnreachableError(Misp2DefenderError):
    """A service could not be reached, or kept failing, within the bounded retries."""


class CertificateError(UnreachableError):
    """TLS verification failed: a wrong CA, or a TLS-inspecting proxy. Never retried."""


class ServerError(UnreachableError):
    """A service answered with a server error (5xx) until the retries ran out."""


class AnswerError(UnreachableError):
    """A service answered 200 with a shape its documentation does not describe."""


class LockedError(Misp2DefenderError):
    service = "lock"


class DefenderError(Misp2DefenderError):
    """Defender still refused or failed a call after the bounded retries."""

    exit_code = EXIT_INCOMPLETE
    service = "defender"


class StoppedWaiting(Misp2DefenderError):
    """A wait longer than max_retry_wait, or past max_run_seconds: the work is left for the next run."""

    exit_code = EXIT_INCOMPLETE


# --- Redaction: nothing secret reaches a log, a report, a file or the terminal ---

_TOKEN_PATTERNS = (
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[REDACTED]"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), "[REDACTED-TOKEN]"),
    # Session cookies: PyMISP logs the request headers (Cookie included) on a MISP 5xx.
    (re.compile(r"(?i)((?:set-)?cookie['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n]+"), r"\1[REDACTED]"),
)
SHORT_SECRET = 8  # shorter secrets are redacted only as whole words, so output stays readable


@functools.lru_cache(maxsize=32)
def _secret_patterns(secrets: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for secret in sorted(set(filter(None, secrets)), key=len, reverse=True):
        escaped = re.escape(secret)
        patterns.append(re.compile(escaped if len(secret) >= SHORT_SECRET
                                   else rf"(?<![A-Za-z0-9]){escaped}(?![A-Za-z0-9])"))
    return tuple(patterns)


_TOKEN_MARKS = ("earer", "EARER", "eyJ", "ookie", "OOKIE")  # text without these holds no token or cookie


def redact(text: str, secrets: Iterable[str]) -> str:
    """Remove secrets, bearer tokens and session cookies from text we are about to write."""
    secrets = tuple(secrets)
    # Most text (indicator values, counts) holds nothing to redact: plain substring tests say so fast.
    if not any(secret and secret in text for secret in secrets) and not any(m in text for m in _TOKEN_MARKS):
        return text
    for pattern in _secret_patterns(secrets):
        text = pattern.sub("[REDACTED]", text)
    for pattern, replacement in _TOKEN_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


TENANT = contextvars.ContextVar("tenant", default="")  # the tenant a thread works for: its log lines say so


def redact_data(value: Any, secrets: Iterable[str]) -> Any:
    """Redact every string inside a JSON-like value, so the JSON written stays valid JSON."""
    secrets = tuple(secrets)
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {redact_data(k, secrets) if isinstance(k, str) else k: redact_data(v, secrets)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v, secrets) for v in value]
    return value


# --- Time ---

MAX_EPOCH = dt.datetime(9000, 1, 1, tzinfo=dt.timezone.utc).timestamp()  # far future, still formattable
_ISO_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
                       r"\s*(?:([Zz])|([+-])(\d{2}):?(\d{2})?)?")


def parse_time(value: Any) -> float | None:
    """ISO 8601 as Defender and MISP write it → epoch seconds; None when it is not a time.

    Fractions of any length (Defender prints 1 to 7 digits), ``Z`` or an offset, naive = UTC.
    Hand-written: ``datetime.fromisoformat`` on Python 3.10 rejects most of these forms.
    """
    if not isinstance(value, str):
        return None
    match = _ISO_TIME.fullmatch(value.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, _, sign, off_hours, off_minutes = match.groups()
    offset = dt.timedelta(0)
    if sign:
        offset = dt.timedelta(hours=int(off_hours), minutes=int(off_minutes or 0)) * (-1 if sign == "-" else 1)
    try:
        moment = dt.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0),
                             tzinfo=dt.timezone(offset))
        epoch = moment.timestamp()
    except (ValueError, OverflowError):
        return None
    return epoch + (int(fraction[:9]) / 10 ** len(fraction[:9]) if fraction else 0.0)


@functools.lru_cache(maxsize=4096)  # plans and reports format the same few expiry times many times over
def format_time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch_or(value: Any, default: float = 0.0) -> float:
    """MISP's string epochs as float; anything else (garbage, NaN, infinity) → default."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return number if math.isfinite(number) and abs(number) < MAX_EPOCH else default


STOPPING = threading.Event()  # SIGTERM: every deadline has passed, so no thread starts another call


class Deadline:
    """The end of the run (max_run_seconds): no wait may pass it and no write starts after it."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.at = clock() + seconds

    def remaining(self) -> float:
        return 0.0 if STOPPING.is_set() else self.at - self.clock()

    @property
    def passed(self) -> bool:
        return self.remaining() <= 0


class Progress:
    """One live line on a terminal, saying what the run is doing; never in logs, pipes or cron mail.

    Off unless main() turns it on (stdout is a terminal, and not -q). Thread-safe: each tenant's
    thread may report; the line shows the tenant's name.
    """

    def __init__(self) -> None:
        self.stream: Any = None
        self.lock = threading.Lock()
        self.last = 0.0
        self.width = 100

    @property
    def on(self) -> bool:
        return self.stream is not None

    def show(self, text: str, force: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.2:
            return
        tenant = TENANT.get()
        line = f"[{tenant}] {text}" if tenant else text
        with self.lock:
            self.last = now
            self.stream.write("\r\x1b[K" + line[:self.width])
            self.stream.flush()

    def wait(self, seconds: float, what: str, sleep: Callable[[float], None] = time.sleep) -> None:
        """Sleep, showing the time left (a quota wait of a minute should not look like a hang)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.show(f"{what}: waiting {left:.0f} s", force=True)
            sleep(min(left, 1.0))

    def clear(self) -> None:
        if self.stream is not None:
            with self.lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


PROGRESS = Progress()


# --- One retry policy for every client ---

@dataclass
class EndpointStats:
    calls: int = 0
    retries: int = 0
    throttled: int = 0
    waited_seconds: float = 0.0
    unrefused: int = 0  # calls not refused outright (2xx, 5xx, no answer): a write among them may have landed


class Retry(Exception):
    """Raised inside an attempt that may succeed if repeated.

    ``wait`` is what the server asked for; ``final`` is the error to raise if no attempt is left
    (a server error stays a server error, whatever the caller's default).
    """

    def __init__(self, problem: str, wait: float | None = None, final: type[Misp2DefenderError] | None = None):
        super().__init__(problem)
        self.problem, self.wait, self.final = problem, wait, final


def time_scale_from_environment() -> float:
    """Tests shrink the quota windows and the retry backoff with MISP2DEFENDER_TIME_SCALE; users never need it."""
    try:
        scale = float(os.environ.get("MISP2DEFENDER_TIME_SCALE", "1"))
    except ValueError:
        return 1.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with jitter, so that many clients do not retry in step."""
    return min(cap, base * 2 ** attempt) * random.uniform(0.5, 1.0)


@dataclass
class RetryPolicy:
    """How every client retries: bounded attempts, backoff with jitter, capped waits.

    An attempt raises ``Retry`` for what may pass (429, 5xx, resets, timeouts) and any other
    error for what will not. A wait longer than ``max_wait`` (a Retry-After of a day) or past the
    run's deadline is never slept: ``StoppedWaiting`` leaves that work for the next run.
    """

    max_retries: int
    max_wait: float
    deadline: Deadline
    sleep: Callable[[float], None] = time.sleep
    backoff_scale: float = 1.0  # the tests' time scale; 1 for users

    def run(self, what: str, attempt: Callable[[], T], *, fail: type[Misp2DefenderError] = UnreachableError,
            service: str = "", stats: EndpointStats | None = None, min_wait: float = 0.0,
            wait_with: Callable[[float], None] | None = None, quiet: bool = False) -> T:
        for number in itertools.count():
            if self.deadline.passed:  # no call starts after the run's end, first attempts included
                raise StoppedWaiting(f"{what}: not sent: max_run_seconds ({self.deadline.seconds:g} s) reached; "
                                     "left for the next run", service)
            try:
                return attempt()
            except Retry as retry:
                if number >= self.max_retries:
                    raise (retry.final or fail)(f"{what} failed after {number + 1} attempts: {retry.problem}",
                                                service) from None
                wait = max(min_wait * self.backoff_scale,
                           backoff(number) * self.backoff_scale if retry.wait is None else retry.wait)
                self.check_wait(what, wait, service)
                log.log(logging.DEBUG if quiet else logging.WARNING, "%s: %s; retrying in %.1f s",
                        what, retry.problem, wait)
                if stats is not None:
                    stats.retries += 1
                    stats.waited_seconds += wait
                (wait_with or self.sleep)(wait)
        raise AssertionError("unreachable")  # itertools.count() never ends

    def check_wait(self, what: str, wait: float, service: str = "") -> None:
        """Refuse a wait the run must not make (the caller's work is then left for the next run)."""
        if wait > self.max_wait:
            raise StoppedWaiting(f"{what}: asked to wait {wait:.0f} s, more than max_retry_wait "
                                 f"({self.max_wait:g} s); left for the next run", service)
        if wait > self.deadline.remaining():
            raise StoppedWaiting(f"{what}: waiting {wait:.0f} s would pass max_run_seconds "
                                 f"({self.deadline.seconds:g} s); left for the next run", service)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """An exception, what it wraps (cause, context, urllib3's ``reason``, exception args)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo.extend(e for e in linked if isinstance(e, BaseException))


def transport_problem(exc: BaseException) -> str | None:
    """"certificate", "connection" or "timeout" when ``exc`` is (or wraps) a transport failure."""
    import requests

    kinds = [e for e in exception_chain(exc)]
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in kinds):
        return "certificate"
    if any(isinstance(e, (requests.Timeout, TimeoutError, socket.timeout)) for e in kinds):
        return "timeout"
    if any(isinstance(e, (requests.ConnectionError, ConnectionError, ssl.SSLError, socket.gaierror)) for e in kinds):
        return "connection"
    return None


def certificate_error(service: str, where: str, exc: BaseException) -> CertificateError:
    detail = next((str(e) for e in exception_chain(exc) if isinstance(e, ssl.SSLCertVerificationError)), "")
    fix = ("set misp_verifycert to the CA bundle that signed MISP's certificate" if service == "misp"
           else "behind a TLS-inspecting proxy, set REQUESTS_CA_BUNDLE to a bundle holding its CA")
    return CertificateError(f"the TLS certificate of {where} is not trusted (CERTIFICATE_VERIFY_FAILED: "
                            f"{detail}): {fix}", service)


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def key_fingerprint(indicator_type: str, value: str) -> int:
    """A 64-bit digest of a key, the same in every process (unlike hash(), which is salted)."""
    digest = hashlib.blake2b(f"{indicator_type}\0{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM first: ru_maxrss also counts what a forking parent held."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def private_file(path: str | Path) -> None:
    """Create a file readable by its owner only (if it is not there yet): logs and outputs name indicators."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


READABLE_JSON = 1 << 20  # JSON files up to 1 MiB are indented; larger ones stay compact (json's fast path)


def needs_redaction(text: str, secrets: tuple[str, ...]) -> bool:
    """Whether JSON text holds a secret (as written, or as JSON escapes it), a token or a cookie."""
    return any(secret and (secret in text or json.dumps(secret)[1:-1] in text) for secret in secrets) or \
        any(mark in text for mark in _TOKEN_MARKS)


def write_json(path: str | Path, document: Any, secrets: Iterable[str]) -> None:
    """Write atomically and owner-only, so a reader never sees half a file and others see none."""
    path, secrets = Path(path), tuple(secrets)
    temporary = path.with_name(path.name + ".tmp")
    text = json.dumps(document, default=str)  # C-fast; almost always nothing in it to redact
    if needs_redaction(text, secrets):
        document = redact_data(document, secrets)
        text = json.dumps(document, default=str)
    if len(text) < READABLE_JSON:  # small enough to be worth laying out for people (and slow to lay out)
        text = json.dumps(document, indent=2, default=str)
    text += "\n"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    temporary.replace(path)


class JsonLog:
    """log_json_file: one JSON document per Defender response, secrets and tokens redacted."""

    def __init__(self, path: str, secrets: list[str]):
        private_file(path)
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self.secrets = secrets
        self.lock = threading.Lock()

    def __call__(self, entry: dict) -> None:
        with self.lock:
            self.handle.write(json.dumps(redact_data(entry, self.secrets), default=str) + "\n")

    def close(self) -> None:
        self.handle.close()


# ###########################################################################################
# Settings: config.py checked into Settings, and the logging they configure
# ###########################################################################################

INDICATOR_TYPES = ("FileSha1", "FileSha256", "FileMd5", "CertificateThumbprint",
                   "IpAddress", "DomainName", "Url")
NETWORK_TYPES = frozenset({"IpAddress", "DomainName", "Url"})
FILE_TYPES = frozenset({"FileSha1", "FileSha256", "FileMd5"})
SEVERITIES = ("Informational", "Low", "Medium", "High")
ACTIONS = ("Warn", "Block", "Audit", "Alert", "AlertAndBlock", "BlockAndRemediate", "Allowed")
TIME_WINDOW_FILTERS = ("publish_timestamp", "timestamp", "last", "date_from", "date_to")
SECRET_ENVIRONMENT = {
    "misp_key": "MISP2DEFENDER_MISP_KEY",
    "client_secret": "MISP2DEFENDER_CLIENT_SECRET",
    "otx_alienvault_api": "MISP2DEFENDER_OTX_KEY",
    "sightings_misp_key": "MISP2DEFENDER_SIGHTINGS_KEY",
}
SECRET_NAMES = {"misp_key": "misp_key", "client_secret": "graph_auth['client_secret']",
                "otx_alienvault_api": "otx_alienvault_api", "sightings_misp_key": "sightings_misp_key"}
# Workload identity (AKS sets these): used when graph_auth names no credential of its own.
AZURE_ENVIRONMENT = ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST")
KEY_VAULT_API_VERSION = "7.4"  # stable in every cloud; see docs/microsoft-assumptions.md
# Key Vault's token resource by the vault's host suffix (public cloud when the host is none of these).
KEY_VAULT_RESOURCES = {".vault.usgovcloudapi.net": "https://vault.usgovcloudapi.net",
                       ".vault.azure.cn": "https://vault.azure.cn",
                       ".vault.microsoftazure.de": "https://vault.microsoftazure.de"}
MANAGED_IDENTITY_IDS = ("client_id", "resource_id", "object_id")
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
DEFAULT_API_URL = "https://api.securitycenter.microsoft.com"
DEFAULT_SCOPE = "https://api.securitycenter.windows.com/.default"
DEFAULT_USER_AGENT = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36"

# defender_cloud presets: API host, login authority, token scope. Gov scopes follow the API host
# (not stated in Microsoft's gov page; CISA's Untitled Goose Tool and msticpy use the same).
CLOUDS: dict[str, tuple[str, str, str]] = {
    "commercial": (DEFAULT_API_URL, DEFAULT_AUTHORITY, DEFAULT_SCOPE),
    "gcc": ("https://api-gcc.securitycenter.microsoft.us", DEFAULT_AUTHORITY,
            "https://api-gcc.securitycenter.microsoft.us/.default"),
    "gcc-high": ("https://api-gov.securitycenter.microsoft.us", "https://login.microsoftonline.us",
                 "https://api-gov.securitycenter.microsoft.us/.default"),
    "dod": ("https://api-gov.securitycenter.microsoft.us", "https://login.microsoftonline.us",
            "https://api-gov.securitycenter.microsoft.us/.default"),
}


# --- Checks for one config value: each returns what Settings holds, or raises ConfigError naming the key ---

def _expect(name: str, value: Any, kinds: type | tuple[type, ...], what: str) -> Any:
    # bool is an int in Python; a True where a number belongs is a typo, not a number.
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ConfigError(f"config key {name} must be {what}, not {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(f"config key {name} must be {what}, not {type(value).__name__} {value!r}")
    return value


def _one_of(name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"config key {name} is {value!r}; allowed values: {', '.join(allowed)}")
    return value


def _positive_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    _expect(name, value, int, "a whole number")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"config key {name} must be {bound}, not {value}")
    return value


def _positive_number(name: str, value: Any) -> float:
    _expect(name, value, (int, float), "a number of seconds")
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(f"config key {name} must be a positive number of seconds, not {value}")
    return float(value)


def _tag_list(name: str, value: Any) -> frozenset[str]:
    _expect(name, value, (list, tuple, set), "a list of tag names")
    for item in value:
        _expect(name, item, str, "a list of tag names")
    return frozenset(value)


def flag(name: str, value: Any) -> bool:
    return _expect(name, value, bool, "True or False")


def text(name: str, value: Any) -> str:
    return _expect(name, value, str, "a string")


def nonempty_text(name: str, value: Any) -> str:
    if not text(name, value).strip():
        raise ConfigError(f"config key {name} must not be empty")
    return value


def text_or(default: str) -> Callable[[str, Any], str]:
    """A string; empty (or blank) means the default, as leaving the key out does."""
    return lambda name, value: text(name, value).strip() or default


def integer(minimum: int = 1, maximum: int | None = None) -> Callable[[str, Any], int]:
    return lambda name, value: _positive_int(name, value, minimum, maximum)


def choice(*allowed: str) -> Callable[[str, Any], str]:
    return lambda name, value: _one_of(name, value, allowed)


def percentage(name: str, value: Any) -> float:
    _expect(name, value, (int, float), "a percentage")
    if not 0 <= value <= 100:
        raise ConfigError(f"config key {name} must be between 0 and 100, not {value}")
    return float(value)


def string_list(name: str, value: Any) -> tuple[str, ...]:
    _expect(name, value, (list, tuple), "a list")
    for item in value:
        _expect(name, item, str, "a list of strings")
    return tuple(value)


def lifetimes_by_type(name: str, value: Any) -> dict[str, int]:
    _expect(name, value, dict, "a dict")
    for key, days in value.items():
        _one_of(name, key, INDICATOR_TYPES)
        _positive_int(f"{name}['{key}']", days, minimum=0)
    return dict(value)


def a_dict(what: str) -> Callable[[str, Any], dict]:
    return lambda name, value: dict(_expect(name, value, dict, what))


def ca_choice(name: str, value: Any) -> bool | str:
    _expect(name, value, (bool, str), "True, False or a CA bundle path")
    if isinstance(value, str) and not Path(value).is_file():
        raise ConfigError(f"config key {name} names a CA bundle {value!r} that does not exist")
    return value


@dataclass(frozen=True)
class Option:
    """One config.py setting: the Settings field it fills, its default, its check, who may set it.

    ``tenant``: a tenant entry may override it. A check of None means build_settings handles the
    key itself (it depends on other keys: presets, credentials, paths).
    """

    field: str
    default: Any
    check: Callable[[str, Any], Any] | None
    tenant: bool = False


OPTIONS: dict[str, Option] = {
    # Microsoft Entra and Defender
    "graph_auth": Option("", {"tenant": "", "client_id": "", "client_secret": ""}, None, tenant=True),
    "max_indicators_per_query": Option("max_indicators_per_query", 450, integer(1, 500), tenant=True),
    "quota_requests": Option("quota_requests", 25, integer(1), tenant=True),
    "targetScope": Option("target_scope", DEFAULT_SCOPE, None, tenant=True),
    "custom_user_agent": Option("user_agent", DEFAULT_USER_AGENT, text_or(DEFAULT_USER_AGENT)),
    "defender_cloud": Option("", "commercial", choice(*CLOUDS), tenant=True),
    "defender_api_url": Option("api_url", DEFAULT_API_URL, None, tenant=True),
    "proxies": Option("proxies", {}, a_dict("a dict like {'https': 'http://proxy:3128'}"), tenant=True),
    "request_timeout": Option("request_timeout", 60, _positive_number),
    "max_retries": Option("max_retries", 5, integer(0)),
    "max_retry_wait": Option("max_retry_wait", 300, _positive_number),
    "max_run_seconds": Option("max_run_seconds", 10800, _positive_number),
    # MISP
    "misp_domain": Option("misp_url", "", None),
    "misp_key": Option("misp_key", "", None),
    "misp_verifycert": Option("misp_verifycert", True, ca_choice),
    "misp_event_filters": Option("misp_event_filters", {
        "published": True, "tags": ['workflow:state="complete"'], "enforceWarninglist": True,
        "publish_timestamp": "2d"}, a_dict("a dict of MISP restSearch filters"), tenant=True),
    "misp_event_limit_per_page": Option("misp_page_size", 100, integer(1)),
    "misp_flatten_attributes": Option("misp_flatten_attributes", True, flag),
    # Logging and outputs
    "verbose_log": Option("verbose_log", True, flag),
    "report_plan_limit": Option("report_plan_limit", 20000, integer(0)),
    "log_file": Option("log_file", "misp2defender.log", None),
    "log_json_file": Option("log_json_file", "", None),
    "dry_run": Option("dry_run", False, flag),
    "write_parsed_eventid": Option("write_parsed_eventid", True, flag),
    "write_parsed_indicators": Option("write_parsed_indicators", True, flag),
    "lock_file": Option("lock_file", "", None),
    # AlienVault OTX
    "exclude_if_in_alienvault": Option("exclude_if_in_alienvault", False, flag),
    "otx_alienvault_api": Option("otx_key", "", None),
    "otx_alienvault_url": Option("otx_url", "https://otx.alienvault.com", nonempty_text),
    "otx_max_workers": Option("otx_max_workers", 16, integer(1, 64)),
    # Indicator expiry
    "days_to_expire_ignore_misp_last_seen": Option("ignore_last_seen", True, flag),
    "days_to_expire": Option("days_to_expire", 50, integer(0), tenant=True),
    "days_to_expire_start": Option("", "valid_from", choice("valid_from", "current_date"), tenant=True),
    "days_to_expire_mapping": Option("days_to_expire_mapping", {
        "IpAddress": 90, "FileMd5": 99999, "FileSha1": 99999, "FileSha256": 99999, "Url": 365, "DomainName": 300},
        lifetimes_by_type, tenant=True),
    "days_to_expire_tlpclear": Option("days_to_expire_tlpclear", 7, integer(0), tenant=True),
    # Defender indicators
    "defender_application": Option("application", "MISP", nonempty_text, tenant=True),
    "defender_severity": Option("severity", "Medium", choice(*SEVERITIES), tenant=True),
    "defender_recommended_actions": Option("recommended_actions", "Block", text, tenant=True),
    "defender_generate_alert": Option("generate_alert", True, flag, tenant=True),
    "defender_action": Option("action", "Audit", choice(*ACTIONS), tenant=True),
    "defender_rbac_group_names": Option("rbac_group_names", [], string_list, tenant=True),
    "defender_max_indicators": Option("max_indicators", 15000, integer(1), tenant=True),
    # Reconciliation and selection
    "check_if_already_in_defender": Option("check_existing", True, flag),
    "keep_unpublished_edits": Option("keep_unpublished_edits", True, flag),
    "remove_guard_percent": Option("remove_guard_percent", 50, percentage, tenant=True),
    "limit_vetted_attributes_from_specific_events": Option("vetted_event_tags", ['curation:source="MISP-TEST"'],
                                                           _tag_list),
    "vetted_attribute_classifier": Option("vetted_attribute_tags", ['course-of-action:active="deny"'], _tag_list),
    "include_tags": Option("include_tags", [], _tag_list, tenant=True),
    "exclude_tags": Option("exclude_tags", [], _tag_list, tenant=True),
    # MISP decaying models
    "decay_model": Option("", None, None),
    "decay_threshold": Option("decay_threshold", None, None),
    "decay_expiry": Option("decay_expiry", False, flag),
    # Detections back to MISP as sightings
    "misp_sightings": Option("misp_sightings", False, flag),
    "sightings_lookback_days": Option("sightings_lookback_days", 7, integer(1, 180)),
    "sightings_source": Option("sightings_source", "Microsoft Defender for Endpoint", nonempty_text),
    "sightings_false_positive": Option("sightings_false_positive", True, flag),
    "sightings_misp_key": Option("sightings_misp_key", "", None),
    # Secrets kept elsewhere
    "key_vault_url": Option("key_vault_url", "", None),
    "key_vault_secrets": Option("", {}, None),
    # Several tenants
    "tenants": Option("", [], None),
    "max_parallel_tenants": Option("max_parallel_tenants", 4, integer(1, 64)),
}
DEFAULTS: dict[str, Any] = {name: option.default for name, option in OPTIONS.items()}
TENANT_KEYS = frozenset({"name", *(name for name, option in OPTIONS.items() if option.tenant)})
GRAPH_AUTH_KEYS = ("tenant", "client_id", "client_secret", "authority", "client_certificate",
                   "client_certificate_thumbprint", "client_assertion_file", "managed_identity")
# The keys that name how an app proves itself: a tenant entry naming one replaces the top level's.
CREDENTIAL_KEYS = ("client_secret", "client_certificate", "client_certificate_thumbprint", "client_assertion_file",
                   "managed_identity")
TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class DecayModel:
    """A MISP decaying model (Polynomial formula), as decayingModel/index describes it."""

    id: str
    name: str
    lifetime: float  # days
    decay_speed: float
    threshold: float
    default_base_score: float
    enabled: bool

    def crossing(self, score: float, base: float, threshold: float, now: float) -> float | None:
        """When the score falls to ``threshold`` (epoch), from its value now.

        MISP's Polynomial model: score = base × (1 − (t/lifetime)^(1/decay_speed)), t in days since
        the last sighting (else last_seen, else the attribute's timestamp). So the time elapsed at a
        score S is lifetime × (1 − S/base)^decay_speed, and the crossing comes that much less the
        elapsed time at the threshold T later: now + lifetime × ((1 − T/base)^speed − (1 − S/base)^speed).
        """
        if base <= 0 or not 0 <= threshold < base:
            return None
        elapsed = self.lifetime * (1 - min(max(score, 0.0), base) / base) ** self.decay_speed
        at_threshold = self.lifetime * (1 - threshold / base) ** self.decay_speed
        return now + (at_threshold - elapsed) * 86400.0


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a run reads from config.py, validated and with defaults and presets resolved.

    With several tenants there is one Settings per tenant (``name``): the shared settings are the
    same in each, the per-tenant ones are that tenant's.
    """

    name: str = ""  # the tenant's name; "" for a config without tenants

    tenant: str
    client_id: str
    client_secret: str
    client_certificate: str
    client_certificate_thumbprint: str
    authority: str
    target_scope: str
    api_url: str
    user_agent: str
    max_indicators_per_query: int
    quota_requests: int
    misp_url: str
    misp_key: str
    misp_verifycert: bool | str
    misp_event_filters: Mapping[str, Any]
    misp_page_size: int
    misp_flatten_attributes: bool
    verbose_log: bool
    log_file: str
    log_json_file: str
    dry_run: bool
    write_parsed_eventid: bool
    write_parsed_indicators: bool
    exclude_if_in_alienvault: bool
    otx_key: str
    otx_url: str
    otx_max_workers: int
    ignore_last_seen: bool
    days_to_expire: int
    expire_from_current_date: bool
    days_to_expire_mapping: Mapping[str, int]
    days_to_expire_tlpclear: int
    application: str
    severity: str
    recommended_actions: str
    generate_alert: bool
    action: str
    rbac_group_names: tuple[str, ...]
    max_indicators: int
    check_existing: bool
    keep_unpublished_edits: bool
    vetted_event_tags: frozenset[str]
    vetted_attribute_tags: frozenset[str]
    remove_guard_percent: float
    max_retries: int
    max_retry_wait: float
    max_run_seconds: float
    request_timeout: float
    lock_file: str
    proxies: Mapping[str, str]
    include_tags: frozenset[str] = frozenset()
    exclude_tags: frozenset[str] = frozenset()
    max_parallel_tenants: int = 4
    report_plan_limit: int = 20000
    misp_sightings: bool = False
    sightings_lookback_days: int = 7
    sightings_source: str = "Microsoft Defender for Endpoint"
    sightings_false_positive: bool = True
    sightings_misp_key: str = ""  # "": the MISP key
    decay_model: str = ""  # the model's name or id as config.py gives it; "" = off
    decay_threshold: float | None = None  # None: the model's own threshold
    decay_expiry: bool = False
    decay: DecayModel | None = None  # the model as MISP holds it, found at the start of a run

    @property
    def mapping_signature(self) -> tuple:
        """What mapping reads from these settings: tenants alike in it map each attribute once."""
        return (self.vetted_event_tags, self.vetted_attribute_tags, self.severity, self.action, self.generate_alert,
                self.include_tags, self.exclude_tags, self.decay, self.decay_threshold, self.decay_expiry,
                self.days_to_expire, tuple(sorted(self.days_to_expire_mapping.items())),
                self.days_to_expire_tlpclear, self.expire_from_current_date, self.ignore_last_seen)

    @property
    def decay_query(self) -> dict[str, Any]:
        """What a restSearch needs for the model's scores on each attribute.

        Not ``decayingModel``: the events scope ignores it (MISP scores with the enabled models that
        cover each attribute's type), while the attributes scope would then score every type with
        it. Both reads must agree, so both leave the choice to MISP and take this model's entry.
        """
        return {"includeDecayScore": 1} if self.decay else {}
    managed_identity: tuple[str, str] | None = None  # ("system", "") or ("client_id"|"resource_id"|"object_id", id)
    client_assertion_file: str = ""  # workload identity federation: re-read for every new token
    key_vault_url: str = ""
    key_vault_names: Mapping[str, str] = field(default_factory=dict)  # secret key → Key Vault secret name
    sources: Mapping[str, str] = field(default_factory=dict)  # where each secret came from (never its value)
    config_path: str = ""
    notes: tuple[str, ...] = ()  # config warnings: likely typos, short secrets
    # With tenants: the top-level settings, which MISP, OTX and Key Vault are reached with (a tenant's
    # proxies and credential are for its own Entra and Defender only).
    shared: Settings | None = field(default=None, repr=False, compare=False)

    @property
    def common(self) -> Settings:
        """The settings of what every tenant shares: MISP, OTX, Key Vault, sightings."""
        return self.shared or self

    @property
    def has_defender_credentials(self) -> bool:
        return bool(self.managed_identity) or bool(self.tenant and self.client_id and (
            self.client_secret or self.client_certificate or self.client_assertion_file))

    @property
    def credential(self) -> str:
        """How this tenant signs in to Entra, for --check and the log (never a secret)."""
        if self.managed_identity:
            kind, identifier = self.managed_identity
            return "managed identity (system-assigned)" if kind == "system" else \
                f"managed identity (user-assigned, {kind} {identifier})"
        if self.client_assertion_file:
            return self.sources.get("credential") or f"workload identity federation ({self.client_assertion_file})"
        if self.client_certificate:
            return f"certificate {self.client_certificate}"
        return f"client secret from {self.sources.get('client_secret') or 'nowhere'}"

    def retry_policy(self, deadline: Deadline) -> RetryPolicy:
        return RetryPolicy(self.max_retries, self.max_retry_wait, deadline, backoff_scale=time_scale_from_environment())

    @property
    def secrets(self) -> list[str]:
        """Values that must never be written anywhere."""
        return [s for s in (self.client_secret, self.misp_key, self.otx_key, self.sightings_misp_key) if s]

    def days_for(self, indicator_type: str) -> int:
        return int(self.days_to_expire_mapping.get(indicator_type, self.days_to_expire))

    @functools.cached_property
    def lifetimes(self) -> dict[tuple[str, bool], int]:
        """Days an indicator lives, by (indicator type, TLP:CLEAR): worked out once per run."""
        return {(t, clear): min(self.days_for(t), self.days_to_expire_tlpclear) if clear else self.days_for(t)
                for t in INDICATOR_TYPES for clear in (False, True)}


def load_config_module(path: str | Path) -> dict[str, Any]:
    """Execute config.py and return its public names (no network, nothing else imported)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found",
                          fix=f"copy config.py.default to {path} and fill in your settings (or pass --config PATH)")
    try:
        namespace = runpy.run_path(str(path), run_name="misp2defender_config")
    except SyntaxError as exc:
        raise ConfigError(f"config file {path} is not valid Python: {exc.msg} (line {exc.lineno})",
                          fix=f"correct line {exc.lineno} of {path}: config.py is Python "
                          "(quotes around text, commas between list items)") from None
    except Exception as exc:  # the config ran and failed: a NameError, an import, ...
        raise ConfigError(f"config file {path} could not be loaded: {type(exc).__name__}: {exc}",
                          fix=f"correct {path}: it must only assign settings (see config.py.default)") from None
    return {name: value for name, value in namespace.items()
            if not name.startswith("_") and not callable(value) and not isinstance(value, type(os))}


def did_you_mean(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.75)
    return f" did you mean {close[0]}?" if close else ""


def short_secret_note(label: str, secret: str) -> str:
    """A warning when ``secret`` is too short to be redacted everywhere; "" otherwise."""
    if secret and len(secret) < SHORT_SECRET:
        return (f"{label} is shorter than {SHORT_SECRET} characters: it is redacted from output only where "
                "it stands as a whole word; use the full secret")
    return ""


def beside_config(path: str, folder: Path | None) -> str:
    return str(folder / path) if path and folder is not None and not Path(path).is_absolute() else path


def tenant_file(path: str, name: str) -> str:
    """A per-Defender file gets the tenant's name: defender.jsonl → defender.acme.jsonl."""
    if not path or not name:
        return path
    target = Path(path)
    return str(target.with_name(f"{target.stem}.{name}{target.suffix}"))


def check_writable(name: str, path: str) -> None:
    """A file the run will write must be writable: say so before anything is contacted."""
    if not path:
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ConfigError(f"{name} {path!r} is a directory; name a file", "files")
    if not folder.is_dir():
        raise ConfigError(f"{name} {path!r}: the directory {str(folder)!r} does not exist", "files")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"{name} {path!r} is not writable by this user", "files")


def secret_from(key: str, configured: str, environ: Mapping[str, str], vault_names: Mapping[str, str]
                ) -> tuple[str, str]:
    """A secret and where it came from, in the README's order: Key Vault, a file, the environment, config.py.

    A secret Key Vault holds is read at the start of the run: here its value is still "".
    """
    variable = SECRET_ENVIRONMENT[key]
    if key in vault_names:
        return "", f"Key Vault secret {vault_names[key]}"
    path = environ.get(f"{variable}_FILE")
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"{variable}_FILE names {path!r}, which cannot be read ({type(exc).__name__})",
                              "config") from None
        if not value.strip():
            raise ConfigError(f"{variable}_FILE names {path!r}, which is empty", "config")
        return value, f"{variable}_FILE"
    if environ.get(variable):
        return environ[variable], variable
    return configured, "config.py" if configured else ""


def managed_identity_of(value: Any) -> tuple[str, str] | None:
    """graph_auth['managed_identity']: True (system-assigned) or {'client_id'|'resource_id'|'object_id': id}."""
    if value is None or value is False:
        return None
    if value is True:
        return ("system", "")
    if isinstance(value, dict) and len(value) == 1:
        (kind, identifier), = value.items()
        if kind in MANAGED_IDENTITY_IDS and isinstance(identifier, str) and identifier.strip():
            return (kind, identifier.strip())
    raise ConfigError("config key graph_auth['managed_identity'] must be True (system-assigned) or one of "
                      "{'client_id': ...}, {'resource_id': ...}, {'object_id': ...} (user-assigned), "
                      f"not {value!r}")


def decay_settings(model: Any, threshold: Any) -> tuple[str, float | None]:
    if model is not None and (isinstance(model, bool) or not isinstance(model, (str, int))):
        raise ConfigError(f"config key decay_model must be a decaying model's name or id, not {model!r}")
    if threshold is not None:
        _expect("decay_threshold", threshold, (int, float), "a score from 0 to 100, or None")
        if not 0 <= threshold <= 100:
            raise ConfigError(f"config key decay_threshold must be between 0 and 100, not {threshold}")
    return ("" if model is None else str(model).strip()), (None if threshold is None else float(threshold))


def key_vault_settings(cfg: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    url = text("key_vault_url", cfg["key_vault_url"]).strip().rstrip("/")
    names = _expect("key_vault_secrets", cfg["key_vault_secrets"], dict, "a dict like {'misp_key': '<secret name>'}")
    for key, name in names.items():
        _one_of("key_vault_secrets", key, SECRET_ENVIRONMENT)
        if not isinstance(name, str) or not re.fullmatch(r"[0-9A-Za-z-]{1,127}", name):
            raise ConfigError(f"config key key_vault_secrets['{key}'] must be a Key Vault secret name "
                              f"(letters, digits and '-'), not {name!r}")
    if url and not url.startswith("https://"):
        raise ConfigError(f"config key key_vault_url must be an https URL, not {url!r}")
    if names and not url:
        raise ConfigError("config key key_vault_url is required when key_vault_secrets names secrets")
    return url, dict(names)


MISP_KEY_MISSING = ("config key misp_key is required (or set MISP2DEFENDER_MISP_KEY, or MISP2DEFENDER_MISP_KEY_FILE, "
                    "or key_vault_secrets): a MISP API key that can read events")
OTX_KEY_MISSING = ("config key otx_alienvault_api is required when exclude_if_in_alienvault is True (or set "
                   "MISP2DEFENDER_OTX_KEY)")


def config_typos(raw: Mapping[str, Any]) -> list[str]:
    """Keys config.py sets that no setting reads (at the top level and in graph_auth): likely typos."""
    notes = [f"config key {key} is not a misp2defender setting (a typo?{did_you_mean(key, OPTIONS)}); it is ignored"
             for key in sorted(set(raw) - set(OPTIONS))]
    auth = raw.get("graph_auth")
    if isinstance(auth, dict):
        notes += [f"config key graph_auth['{key}'] is not known (a typo?{did_you_mean(key, GRAPH_AUTH_KEYS)}); "
                  "it is ignored" for key in sorted(set(auth) - set(GRAPH_AUTH_KEYS))]
    return notes


def build_settings(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                   config_path: str = "", dry_run: bool = False, *, name: str = "",
                   require_credentials: bool = True) -> Settings:
    """Validate config names, types and values; resolve presets and environment secrets.

    Runs before any network call: every mistake here names the config key that is wrong. The
    settings in the OPTIONS table are checked by their own check; the ones that depend on other
    keys (credentials, cloud presets, MISP, OTX, file paths) are checked here. A likely typo is a
    warning; when the key it was meant to be is then missing, the error says so too.
    """
    typos = config_typos(raw)
    try:
        settings = _checked_settings(raw, os.environ if environ is None else environ, config_path, dry_run,
                                     name, require_credentials)
    except ConfigError as exc:
        if typos:
            raise ConfigError(f"{exc} ({'; '.join(typos)})", exc.service, exc.fix) from None
        raise
    return dataclasses.replace(settings, notes=(*typos, *settings.notes))


def _checked_settings(raw: Mapping[str, Any], environ: Mapping[str, str], config_path: str, dry_run: bool,
                      name: str, require_credentials: bool) -> Settings:
    notes: list[str] = []  # warnings, logged once logging is set up (Settings.notes)
    cfg = {**DEFAULTS, **{k: v for k, v in raw.items() if k in OPTIONS}}
    fields: dict[str, Any] = {}
    for key, option in OPTIONS.items():
        if option.check is not None:
            value = option.check(key, cfg[key])
            if option.field:
                fields[option.field] = value

    auth = _expect("graph_auth", cfg["graph_auth"], dict, "a dict")
    auth_values = {key: _expect(f"graph_auth['{key}']", auth.get(key) or "", str, "a string").strip()
                   for key in GRAPH_AUTH_KEYS if key != "managed_identity"}
    vault_url, vault_names = key_vault_settings(cfg)
    sources: dict[str, str] = {}
    found = {}
    for key, configured in (("client_secret", auth_values["client_secret"]), ("misp_key", cfg["misp_key"]),
                            ("otx_alienvault_api", cfg["otx_alienvault_api"]),
                            ("sightings_misp_key", cfg["sightings_misp_key"])):
        found[key], sources[key] = secret_from(key, text(SECRET_NAMES[key], configured), environ, vault_names)
    client_secret, misp_key, otx_key = found["client_secret"], found["misp_key"], found["otx_alienvault_api"]
    fields["sightings_misp_key"] = found["sightings_misp_key"]
    identity = managed_identity_of(auth.get("managed_identity"))
    named = identity or client_secret or sources["client_secret"] or auth_values["client_certificate"] or \
        auth_values["client_assertion_file"]
    if not named and environ.get("AZURE_FEDERATED_TOKEN_FILE"):  # AKS workload identity, as it sets it up
        auth_values["client_assertion_file"] = environ["AZURE_FEDERATED_TOKEN_FILE"]
        auth_values["tenant"] = auth_values["tenant"] or environ.get("AZURE_TENANT_ID", "")
        auth_values["client_id"] = auth_values["client_id"] or environ.get("AZURE_CLIENT_ID", "")
        auth_values["authority"] = auth_values["authority"] or environ.get("AZURE_AUTHORITY_HOST", "").rstrip("/")
        sources["credential"] = "workload identity federation (AZURE_* variables)"
    if auth_values["client_assertion_file"] and not Path(auth_values["client_assertion_file"]).is_file():
        where = ("AZURE_FEDERATED_TOKEN_FILE" if "credential" in sources
                 else "config key graph_auth['client_assertion_file']")
        raise ConfigError(f"{where} names a file that does not exist: {auth_values['client_assertion_file']!r}")

    cloud_api, cloud_authority, cloud_scope = CLOUDS[cfg["defender_cloud"]]
    api_url = raw.get("defender_api_url", cloud_api)
    authority = auth_values["authority"] or cloud_authority
    scope = raw.get("targetScope", cloud_scope)
    for key, url in (("defender_api_url", api_url), ("graph_auth['authority']", authority)):
        _expect(key, url, str, "an https URL")
        if not url.startswith("https://"):
            raise ConfigError(f"config key {key} must be an https URL, not {url!r}")
    nonempty_text("targetScope", scope)

    misp_url = text("misp_domain", cfg["misp_domain"]).strip()
    if not misp_url:
        raise ConfigError("config key misp_domain is required: the full URL of your MISP instance")
    if not misp_url.startswith(("http://", "https://")):
        raise ConfigError(f"config key misp_domain must start with https:// or http://, not {misp_url!r}")
    if not misp_key and not sources["misp_key"] and require_credentials:  # (--check: the MISP stage says so)
        raise ConfigError(MISP_KEY_MISSING)

    dry_run = fields["dry_run"] or dry_run
    if not dry_run and require_credentials and not identity:
        for key in ("tenant", "client_id"):
            if not auth_values[key]:
                raise ConfigError(f"config key graph_auth['{key}'] is required: "
                                  "see the Entra application section of the README")
        if not (client_secret or sources["client_secret"] or auth_values["client_certificate"]
                or auth_values["client_assertion_file"]):
            raise ConfigError("config key graph_auth['client_secret'] is required (or set "
                              "MISP2DEFENDER_CLIENT_SECRET, or use a certificate, a managed identity or workload "
                              "identity federation: see 'No secrets on disk' in the README)")
    if auth_values["client_certificate"]:
        if not Path(auth_values["client_certificate"]).is_file():
            raise ConfigError("config key graph_auth['client_certificate'] names a file that does not "
                              f"exist: {auth_values['client_certificate']!r}")
        if not re.fullmatch(r"[0-9A-Fa-f]{40}", auth_values["client_certificate_thumbprint"].replace(":", "")):
            raise ConfigError("config key graph_auth['client_certificate_thumbprint'] must be the "
                              "certificate's SHA-1 thumbprint (40 hex digits)")
    if fields["exclude_if_in_alienvault"] and not (otx_key or sources["otx_alienvault_api"]) and require_credentials:
        raise ConfigError(OTX_KEY_MISSING)

    fields["decay_model"], fields["decay_threshold"] = decay_settings(cfg["decay_model"], cfg["decay_threshold"])
    # Files the run writes: a relative path is taken from the config file's directory (not cron's
    # working directory), so that every file lands beside config.py wherever the run starts.
    beside = Path(config_path).resolve().parent if config_path else None
    log_file = beside_config(text("log_file", cfg["log_file"]), beside)
    lock_file = beside_config(text("lock_file", cfg["lock_file"]), beside) or str(
        Path(log_file or beside_config("misp2defender.log", beside)).with_name("misp2defender.lock"))
    log_json_file = beside_config(text("log_json_file", cfg["log_json_file"]), beside)
    for key, path in (("log_file", log_file), ("lock_file", lock_file), ("log_json_file", log_json_file)):
        check_writable(f"config key {key}", path)
    for key, secret in (("misp_key", misp_key), ("otx_alienvault_api", otx_key),
                        ("graph_auth['client_secret']", client_secret),
                        ("sightings_misp_key", fields["sightings_misp_key"])):
        if note := short_secret_note(f"config key {key}", secret):
            notes.append(note)

    return Settings(
        **fields, name=name,
        tenant=auth_values["tenant"], client_id=auth_values["client_id"], client_secret=client_secret,
        client_certificate=auth_values["client_certificate"],
        client_certificate_thumbprint=auth_values["client_certificate_thumbprint"].replace(":", ""),
        authority=authority.rstrip("/"), target_scope=scope, api_url=api_url.rstrip("/"),
        misp_url=misp_url, misp_key=misp_key, otx_key=otx_key,
        managed_identity=identity, client_assertion_file=auth_values["client_assertion_file"],
        key_vault_url=vault_url, key_vault_names=vault_names, sources=sources,
        log_file=log_file, log_json_file=log_json_file, lock_file=lock_file,
        expire_from_current_date=cfg["days_to_expire_start"] == "current_date",
        config_path=config_path, notes=tuple(notes),
    )


def build_tenants(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None, config_path: str = "",
                  dry_run: bool = False, only: Iterable[str] = (), require_credentials: bool = True) -> list[Settings]:
    """The Defender tenants a run serves: one from a plain config, one per ``tenants`` entry otherwise.

    The top-level settings are every tenant's defaults; an entry may override the settings marked
    ``tenant`` in OPTIONS, and its graph_auth is merged over the top-level one (one multi-tenant
    Entra app: client id and credential written once, a ``tenant`` per entry). Every mistake names
    the tenant and the key, before anything is contacted.
    """
    environ = os.environ if environ is None else environ
    entries = raw.get("tenants")
    only = list(only)
    if entries is None or isinstance(entries, (list, tuple)) and not entries:
        if only:
            raise ConfigError(f"--tenant {only[0]}: config.py defines no tenants (see 'Several tenants')")
        return [build_settings(raw, environ, config_path, dry_run, require_credentials=require_credentials)]
    _expect("tenants", entries, (list, tuple), "a list of dicts, one per Defender tenant")
    base = {k: v for k, v in raw.items() if k != "tenants"}
    shared = build_settings(base, environ, config_path, dry_run, require_credentials=False)  # checked first
    tenants, names = [], set()
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise ConfigError(f"config key tenants: entry {position} must be a dict, not {type(entry).__name__}")
        name = entry.get("name")
        if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
            raise ConfigError(f"config key tenants: entry {position} needs a 'name' of 1-64 letters, digits, "
                              f"'_', '.' or '-' (it names files), not {name!r}")
        if name in names:
            raise ConfigError(f"config key tenants: the name {name!r} is used twice")
        names.add(name)
        unknown = sorted(set(entry) - TENANT_KEYS)
        if unknown:
            raise ConfigError(f"tenant {name!r}: key {unknown[0]!r} cannot be set per tenant (a typo"
                              f"{did_you_mean(unknown[0], TENANT_KEYS)}, or a setting shared by every tenant)")
        auth = entry.get("graph_auth", {})
        if not isinstance(auth, dict):
            raise ConfigError(f"tenant {name!r}: config key graph_auth must be a dict, not {type(auth).__name__}")
        inherited = base.get("graph_auth", {}) if isinstance(base.get("graph_auth"), dict) else {}
        own_credential = any(auth.get(k) for k in CREDENTIAL_KEYS)
        if own_credential:  # its own credential replaces the top level's (a managed identity, a certificate, ...)
            inherited = {k: v for k, v in inherited.items() if k not in CREDENTIAL_KEYS}
        merged = {**base, **{k: v for k, v in entry.items() if k != "name"}, "graph_auth": {**inherited, **auth}}
        if "defender_cloud" in entry:  # its cloud names its hosts: not the ones the top level set for another
            for key in ("defender_api_url", "targetScope"):
                if key not in entry:
                    merged.pop(key, None)
            if "authority" not in auth:
                merged["graph_auth"].pop("authority", None)
        tenant_environ = environ
        if own_credential:  # ... and the top-level secret too, wherever that one is kept
            variable = SECRET_ENVIRONMENT["client_secret"]
            tenant_environ = {k: v for k, v in environ.items() if k not in (variable, f"{variable}_FILE")}
            vault = base.get("key_vault_secrets")
            if isinstance(vault, dict):
                merged["key_vault_secrets"] = {k: v for k, v in vault.items() if k != "client_secret"}
        try:
            tenants.append(dataclasses.replace(build_settings(merged, tenant_environ, config_path, dry_run, name=name,
                                                              require_credentials=require_credentials), shared=shared))
        except ConfigError as exc:
            raise ConfigError(f"tenant {name!r}: {exc}", exc.service) from None
    unknown_names = [n for n in only if n not in names]
    if unknown_names:
        raise ConfigError(f"--tenant {unknown_names[0]}: no such tenant in config.py "
                          f"(known: {', '.join(sorted(names))})")
    return [t for t in tenants if not only or t.name in only]


def exposed_secrets_warning(path: str | Path, raw: Mapping[str, Any]) -> str | None:
    """A config.py holding a secret (its own or a tenant's) should be readable by its owner only."""
    tenants = raw.get("tenants") if isinstance(raw.get("tenants"), list) else []
    scopes = [raw, *(t for t in tenants if isinstance(t, dict))]
    holds_secret = any(scope.get(key) for scope in scopes for key in SECRET_ENVIRONMENT) or any(
        isinstance(scope.get("graph_auth"), dict) and scope["graph_auth"].get("client_secret") for scope in scopes)
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if holds_secret and mode & (stat.S_IRGRP | stat.S_IROTH):
        return (f"{path} holds a secret and is readable by other users: run 'chmod 600 {path}' or move the "
                "secrets to MISP2DEFENDER_* environment variables, *_FILE files or Key Vault")
    return None


class RedactingFormatter(logging.Formatter):
    """Every log line redacted, and prefixed with the tenant whose thread wrote it."""

    def __init__(self, fmt: str, secrets: list[str]):
        super().__init__(fmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        tenant = TENANT.get()
        record.tenant = f"[{tenant}] " if tenant else ""
        return redact(super().format(record), self.secrets)


def setup_logging(settings: Settings | None, verbosity: int, secrets: list[str] | None = None) -> list[logging.Handler]:
    """File log (debug when verbose_log) and stderr (warnings; more with -v); secrets redacted."""
    secrets = secrets if secrets is not None else settings.secrets if settings else []
    fmt = "%(asctime)s %(levelname)s %(name)s: %(tenant)s%(message)s"
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(sys.stderr)
    console.setLevel({-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))
    # File-only records: errors said once; and PyMISP's own lines, which our error message says better.
    console.addFilter(lambda record: getattr(record, "console", True) and not record.name.startswith("pymisp"))
    handlers.append(console)
    if settings and settings.log_file:
        private_file(settings.log_file)  # the log names indicators: owner-only
        file_handler = logging.FileHandler(settings.log_file, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG if settings.verbose_log else logging.INFO)
        handlers.append(file_handler)
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(RedactingFormatter(fmt, secrets))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for noisy in ("urllib3", "msal", "pymisp"):  # pymisp logs whole responses at debug
        logging.getLogger(noisy).setLevel(logging.INFO)
    return handlers


# ###########################################################################################
# MISP reading: PyMISP paging and the shapes of MISP's answers
# ###########################################################################################

@dataclass
class MispReadStatus:
    """Whether the MISP read saw everything the filters select; an incomplete read forbids deletes."""

    complete: bool = True
    events: int = 0
    error: str = ""
    last_page_full: bool = False
    helper_peak_rss_mib: float = 0.0  # a helper reader's own peak (each process has its own)

    def fail(self, error: str) -> None:
        self.complete = False
        self.error = self.error or error
        log.error("%s; nothing will be deleted in this run", error)

    def absorb(self, other: MispReadStatus) -> None:
        self.helper_peak_rss_mib = max(self.helper_peak_rss_mib, other.helper_peak_rss_mib)
        self.complete = self.complete and other.complete
        self.events += other.events
        self.error = self.error or other.error


def event_attributes(event: dict, flatten_objects: bool) -> Iterator[Any]:
    """Top-level attributes, then (when flattening) those inside objects."""
    attributes = event.get("Attribute")
    if isinstance(attributes, list):
        yield from attributes
    objects = event.get("Object") if flatten_objects else None
    if isinstance(objects, list):
        for obj in objects:
            inner = obj.get("Attribute") if isinstance(obj, dict) else None
            if isinstance(inner, list):
                yield from inner


def selection_filters(filters: Mapping[str, Any], full_sync: bool) -> dict[str, Any]:
    """The user's filters; a full sync drops the time window to see the whole selected set."""
    selected = dict(filters)
    if full_sync:
        for key in TIME_WINDOW_FILTERS:
            selected.pop(key, None)
    return selected


class MispSource:
    """Reads MISP through PyMISP, page by page, under the run's retry policy.

    Every answer is checked against the shape MISP documents: anything else (``{}``, ``null``, a
    message) is an error, never an empty page, because an empty page would read as "MISP holds
    nothing any more" and deletes follow from that.
    """

    def __init__(self, settings: Settings, policy: RetryPolicy, *, helper: bool = False):
        self.settings, self.policy = settings, policy
        self.misp = self._connect(helper)

    def selecting_for(self, settings: Settings) -> MispSource:
        """This connection, selecting with these settings' filters (tenants may each have their own)."""
        view = copy.copy(self)
        view.settings = settings
        return view

    def _connect(self, helper: bool) -> Any:
        import pymisp
        import urllib3

        s = self.settings
        if s.misp_verifycert is False and s.misp_url.startswith("https://"):
            # One warning per run (not per request, nor again from a helper reader).
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
            if not helper:
                log.warning("misp_verifycert is False: the MISP server certificate is not verified")

        def attempt() -> Any:
            try:
                return pymisp.PyMISP(s.misp_url, s.misp_key, ssl=s.misp_verifycert, timeout=s.request_timeout,
                                     proxies=s.proxies or None, tool=f"misp2defender/{__version__}")
            except Exception as exc:  # PyMISP wraps what went wrong; classify by type, not by its words
                self._raise_or_retry(exc, "users/view/me")

        return self.policy.run(f"MISP at {s.misp_url}", attempt, service="misp")

    def _raise_or_retry(self, exc: BaseException, probe_path: str) -> None:
        """Turn a PyMISP failure into a typed error, or into Retry when it may pass."""
        import pymisp

        problem = transport_problem(exc)
        if problem == "certificate":
            raise certificate_error("misp", self.settings.misp_url, exc) from None
        if problem:
            raise Retry(redact(f"{type(exc).__name__}: {exc}", self.settings.secrets)[:500])
        if any(isinstance(e, pymisp.MISPServerError) for e in exception_chain(exc)):
            detail = " ".join(str(exc).split())  # PyMISP's "Error code 500: <MISP's JSON>" on one line
            raise Retry(redact(f"MISP server error: {detail}", self.settings.secrets)[:500], final=ServerError)
        # PyMISP's constructor reports a refused key only in its message: ask MISP for the status.
        status = self._probe(probe_path)
        if status in (401, 403):
            raise CredentialError(f"MISP rejected the API key (misp_key) at {self.settings.misp_url} "
                                  f"(HTTP {status}): check the key and that its user may use the API", "misp")
        if status is None or status < 300 or status >= 500 or status in (408, 429):
            raise Retry(redact(f"{type(exc).__name__}: {exc}", self.settings.secrets)[:500])
        raise UnreachableError(redact(f"MISP at {self.settings.misp_url} answered HTTP {status} "
                                      f"({type(exc).__name__}: {exc})", self.settings.secrets)[:500], "misp")

    def _probe(self, path: str) -> int | None:
        import requests

        s = self.settings
        try:
            response = requests.get(s.misp_url.rstrip("/") + "/" + path, verify=s.misp_verifycert,
                                    headers={"Authorization": s.misp_key, "Accept": "application/json"},
                                    proxies=s.proxies or None, timeout=s.request_timeout)
        except Exception:
            return None
        return response.status_code

    def search(self, controller: str, what: str, check: Callable[[Any], T], **query: Any) -> T:
        """One restSearch call under the retry policy, its answer checked by ``check``."""
        query = {**query, "controller": controller, "return_format": "json"}  # whatever the user's filters say
        return self._request(what, check, lambda: self.misp.search(**query))

    def direct(self, path: str, what: str, check: Callable[[Any], T], body: Mapping[str, Any], *,
               once: bool = False, method: str = "POST") -> T:
        """One call PyMISP has no method for (or mis-sends), under the same policy and checks.

        ``once``: never sent twice (a write whose answer was lost may have landed).
        """
        policy = dataclasses.replace(self.policy, max_retries=0) if once else self.policy
        send = (lambda: self.misp.direct_call(path, dict(body))) if method == "POST" else (
            lambda: self.misp.direct_call(path))
        return self._request(what, check, send, policy)

    def _request(self, what: str, check: Callable[[Any], T], send: Callable[[], Any],
                 policy: RetryPolicy | None = None) -> T:
        """A MISP error answer is raised, never taken for an empty result; an answer of the wrong
        shape (``check`` raises AnswerError) is asked for again, then reported."""

        def attempt() -> T:
            try:
                result = send()
            except Exception as exc:  # connection reset, timeout, MISPServerError
                self._raise_or_retry(exc, "servers/getVersion")
            if isinstance(result, dict) and "errors" in result:
                error = result["errors"]
                status = error[0] if isinstance(error, (list, tuple)) and error and isinstance(error[0], int) else None
                message = redact(f"MISP answered {error!r}", self.settings.secrets)[:500]
                if status in (401, 403):
                    raise CredentialError(f"{what}: MISP refused the API key (HTTP {status})", "misp")
                if status is not None and 400 <= status < 500 and status not in (408, 429):
                    raise UnreachableError(f"{what}: {message}", "misp")  # will not fix itself by retrying
                raise Retry(message)
            try:
                return check(result)
            except AnswerError as exc:
                raise Retry(str(exc)) from None

        return (policy or self.policy).run(what, attempt, service="misp")

    def decaying_model(self, wanted: str) -> DecayModel:
        """The decaying model decay_model names (by name or id), as this MISP holds it; enabled."""
        models = self.direct("decayingModel/index", "MISP decaying models", decaying_models_of, {}, method="GET")
        found = next((m for m in models if wanted in (m.id, m.name)), None)
        if found is None:
            known = ", ".join(f"{m.name!r} (id {m.id})" for m in models) or "none: load them first"
            raise ConfigError(f"decay_model {wanted!r}: MISP has no such decaying model (it has {known})", "decay")
        if not found.enabled:
            raise ConfigError(f"decay_model {wanted!r}: the decaying model is disabled on MISP", "decay")
        return found

    def count_events(self) -> int:
        """How many events the filters select (for --check), from metadata only.

        Without the warninglist flags: MISP 2.5 answers ``metadata`` with ``enforceWarninglist`` or
        ``includeWarninglistHits`` with a 500 as soon as an event matches, and those flags choose
        attributes inside events, not which events match.
        """
        filters = {k: v for k, v in self.settings.misp_event_filters.items() if k not in WARNINGLIST_FLAGS}
        count = 0
        for page in itertools.count(1):
            query = {**filters, "metadata": True}
            if "limit" not in filters:
                query.update(limit=self.settings.misp_page_size, page=page)
            events = self.search("events", f"MISP events page {page}", events_of_page, **query)
            count += len(events)
            if "limit" in filters or len(events) < self.settings.misp_page_size:
                return count
        return count

    def events(self, full_sync: bool, status: MispReadStatus, extra: Mapping[str, Any] | None = None, *,
               next_page: Callable[[], int] | None = None, max_pages: int | None = None) -> Iterator[dict]:
        """Yield the selected events page by page; record in ``status`` whether the read completed.

        Pages 1, 2, 3, ... until a short page; or, when readers share the pages, whichever page
        ``next_page()`` hands out next. Soft-deleted attributes are requested too (``deleted:
        [0, 1]``) so that a retraction inside the time window can be seen and acted on.
        """
        filters = {**selection_filters(self.settings.misp_event_filters, full_sync), **self.settings.decay_query,
                   **(extra or {})}
        filters.setdefault("deleted", [0, 1])
        single_page = "limit" in filters
        pages = itertools.count(1)
        next_page = next_page or pages.__next__
        while max_pages is None or max_pages > 0:
            page = next_page()
            if self.policy.deadline.passed:
                status.fail(f"MISP events page {page} not read: max_run_seconds "
                            f"({self.settings.max_run_seconds:g} s) reached")
                return
            query = dict(filters) if single_page else {**filters, "limit": self.settings.misp_page_size,
                                                        "page": page}
            try:
                events = self.search("events", f"MISP events page {page}", events_of_page, **query)
            except Misp2DefenderError as exc:
                status.fail(str(exc))
                return
            log.debug("MISP events page %d: %d events", page, len(events))
            PROGRESS.show(f"MISP: page {page} read")
            for event in events:
                status.events += 1
                yield event
            status.last_page_full = not single_page and len(events) >= self.settings.misp_page_size
            if not status.last_page_full:
                return
            max_pages = None if max_pages is None else max_pages - 1

    def being_edited(self, uuids: Iterable[str]) -> set[str]:
        """Of these events, the ones MISP still holds that were published and are unpublished now
        (being edited). By uuid alone: an edit may have taken out what the filters select on."""
        found: set[str] = set()
        for batch in chunks(sorted(set(uuids)), 100):
            events = self.search("events", "MISP events being edited", events_of_page,
                                 uuid=batch, metadata=True, limit=len(batch), page=1)
            found.update(str(e.get("uuid")).lower() for e in events
                         if e.get("published") is not True and epoch_or(e.get("publish_timestamp")) > 0)
        return found

    def attributes_with_values(self, values: list[str], extra: Mapping[str, Any] | None = None) -> list[dict]:
        """Attributes the filters select (no time window, to_ids on) carrying one of ``values``.

        Each comes with its event's tags, marked ``inherited`` (see split_inherited_tags). Those
        inside objects only when the read takes them too (misp_flatten_attributes).
        """
        filters = selection_filters(self.settings.misp_event_filters, full_sync=True)
        filters.pop("limit", None)
        filters.pop("page", None)
        found = []
        for batch in chunks(values, 200):
            # The user's filters may name to_ids too: only to_ids attributes become indicators.
            query = {**filters, **self.settings.decay_query, **(extra or {}), "value": batch,
                     "to_ids": 1, "include_event_tags": True}
            attributes = self.search("attributes", "MISP value check", attributes_of_answer, **query)
            found.extend(a for a in attributes if self.settings.misp_flatten_attributes
                         or str(a.get("object_id") or "0") == "0")
        return found


WARNINGLIST_FLAGS = ("enforceWarninglist", "enforce_warninglist", "includeWarninglistHits")  # (PyMISP's spellings)


def decaying_models_of(answer: Any) -> list[DecayModel]:
    """decayingModel/index: [{"DecayingModel": {id, name, enabled, parameters: {...}}}, ...]."""
    if not isinstance(answer, list):
        raise AnswerError(f"the answer is {shape_of(answer)}, not a list of decaying models", "misp")
    models = []
    for item in answer:
        model = item.get("DecayingModel") if isinstance(item, dict) else None
        parameters = model.get("parameters") if isinstance(model, dict) else None
        if not isinstance(parameters, dict):
            continue
        numbers = [epoch_or(parameters.get(k), -1.0) for k in ("lifetime", "decay_speed", "threshold",
                                                               "default_base_score")]
        if min(numbers) < 0 or numbers[0] <= 0:
            continue  # not a Polynomial model this tool can predict
        models.append(DecayModel(str(model.get("id")), str(model.get("name")), *numbers,
                                 enabled=model.get("enabled") in (True, 1, "1", "true")))
    return models


def shape_of(value: Any) -> str:
    """A short description of an unexpected answer, for the message (never its full content)."""
    if isinstance(value, dict):
        keys = ", ".join(map(str, list(value)[:5]))
        return f"an object with keys [{keys}]" if value else "an empty object"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return "null" if value is None else f"a {type(value).__name__}"


def events_of_page(result: Any) -> list[dict]:
    """The events of one restSearch page; AnswerError for any other shape (never an empty page)."""
    if not isinstance(result, list):
        raise AnswerError(f"the answer is {shape_of(result)}, not a list of events", "misp")
    events = []
    for item in result:
        event = item.get("Event", item) if isinstance(item, dict) else None
        if not isinstance(event, dict):
            raise AnswerError(f"an item of the answer is {shape_of(item)}, not an event", "misp")
        events.append(event)
    return events


def attributes_of_answer(result: Any) -> list[dict]:
    """The attributes of an attributes/restSearch answer; AnswerError for any other shape."""
    attributes = result.get("Attribute") if isinstance(result, dict) else None
    if not isinstance(attributes, list) or not all(isinstance(a, dict) for a in attributes):
        raise AnswerError(f"the answer is {shape_of(result)}, not a list of attributes", "misp")
    return attributes


# ###########################################################################################
# Mapping: MISP attributes to Defender indicators (pure)
# ###########################################################################################

# MISP attribute type → (Defender indicator type, which part of a composite value to take).
# The part is None for plain values, 0 for the left of "a|b", 1 for the right.
TYPE_MAP: dict[str, tuple[str, int | None]] = {
    "md5": ("FileMd5", None), "sha1": ("FileSha1", None), "sha256": ("FileSha256", None),
    "filename|md5": ("FileMd5", 1), "filename|sha1": ("FileSha1", 1), "filename|sha256": ("FileSha256", 1),
    "malware-sample": ("FileMd5", 1),
    "ip-src": ("IpAddress", None), "ip-dst": ("IpAddress", None),
    "ip-src|port": ("IpAddress", 0), "ip-dst|port": ("IpAddress", 0),
    "domain": ("DomainName", None), "hostname": ("DomainName", None), "hostname|port": ("DomainName", 0),
    "url": ("Url", None),
    "x509-fingerprint-sha1": ("CertificateThumbprint", None),
}
# domain|ip is the one type that yields two indicators.
SPLIT_TYPES: dict[str, tuple[tuple[str, int], ...]] = {
    "domain|ip": (("DomainName", 0), ("IpAddress", 1)),
}
TYPE_PARTS: dict[str, tuple[tuple[str, int | None], ...]] = {
    **{misp_type: (target,) for misp_type, target in TYPE_MAP.items()}, **SPLIT_TYPES}
COMPOSITE_TYPES = frozenset(t for t, parts in TYPE_PARTS.items() if any(p is not None for _, p in parts))

THREAT_LEVEL_SEVERITY = {
    'misp:threat-level="high-risk"': "High",
    'misp:threat-level="medium-risk"': "Medium",
    'misp:threat-level="low-risk"': "Low",
    'misp:threat-level="no-risk"': "Informational",
}
# course-of-action taxonomy: active measures block, passive ones watch (as cudeso's tool does).
COURSE_OF_ACTION = {"active": "Block", "passive": "Audit"}
COURSE_OF_ACTION_PREFIXES = ("course-of-action:", "coa:")
TLP_CLEAR_TAGS = frozenset({"tlp:clear", "tlp:white"})
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}
ACTION_RANK = {"Allowed": 0, "Audit": 1, "Alert": 1, "Warn": 2, "Block": 3, "AlertAndBlock": 3,
               "BlockAndRemediate": 3}
TITLE_LIMIT, DESCRIPTION_LIMIT = 100, 1000  # undocumented limits: stay conservative
HEX_LENGTH = {"FileMd5": 32, "FileSha1": 40, "FileSha256": 64, "CertificateThumbprint": 40}
_DEFANG = (("hxxps", "https"), ("hxxp", "http"), ("[.]", "."), ("(.)", "."), ("[dot]", "."),
           ("[:]", ":"), ("[://]", "://"))
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}")
_HEX = re.compile(r"[0-9a-f]+")
_SPACE = re.compile(r"\s")
_URL = re.compile(r"(?:([A-Za-z][A-Za-z0-9+.-]*)://)?([^/?#]*)(.*)", re.DOTALL)
_IPV4 = re.compile(r"(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})")


@dataclass(frozen=True, slots=True)
class EventContext:
    """What mapping needs to know about the event an attribute came from.

    The tag-derived facts are worked out once per event, not once per attribute.
    """

    id: str
    uuid: str
    info: str
    tags: frozenset[str]
    timestamp: float
    severity: str | None = field(init=False)  # from misp:threat-level tags
    action: str | None = field(init=False)  # from course-of-action tags
    tlp_clear: bool = field(init=False)
    title: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "severity", _tag_override(self.tags, THREAT_LEVEL_SEVERITY))
        object.__setattr__(self, "action", _course_of_action(self.tags))
        object.__setattr__(self, "tlp_clear", bool(self.tags & TLP_CLEAR_TAGS))
        object.__setattr__(self, "title", (self.info or f"MISP event {self.id}")[:TITLE_LIMIT])


NO_TAGS: frozenset[str] = frozenset()


def tag_names(container: Any) -> frozenset[str]:
    """Tag names of an event or attribute dict, tolerating the shapes hostile data takes."""
    tags = container.get("Tag") if isinstance(container, dict) else None
    if not tags or not isinstance(tags, list):
        return NO_TAGS
    return frozenset(t["name"] for t in tags if isinstance(t, dict) and isinstance(t.get("name"), str))


def event_context(event: dict) -> EventContext:
    return EventContext(id=str(event.get("id") or ""), uuid=str(event.get("uuid") or ""),
                        info=str(event.get("info") or ""), tags=tag_names(event),
                        timestamp=epoch_or(event.get("timestamp")))


def split_inherited_tags(attribute: dict) -> tuple[dict, EventContext]:
    """An attribute from attributes/restSearch (with includeEventTags) and its event's context."""
    tags = attribute.get("Tag") if isinstance(attribute.get("Tag"), list) else []
    own = [t for t in tags if not (isinstance(t, dict) and t.get("inherited") in (1, "1", True))]
    inherited = {"Tag": [t for t in tags if isinstance(t, dict) and t.get("inherited") in (1, "1", True)]}
    event = attribute.get("Event") if isinstance(attribute.get("Event"), dict) else {}
    return {**attribute, "Tag": own}, event_context({**event, **inherited})


class Rejected(ValueError):
    """A value Defender would refuse; the message is the reason users read."""


@dataclass(slots=True)
class Candidate:
    """One indicator the run wants in Defender, with just enough provenance to explain it.

    Treated as immutable; not frozen only because frozen dataclasses are slow to build, and a
    million of them are built in a large sync.
    """

    indicator_type: str
    value: str
    action: str
    severity: str
    expiration: float | None  # epoch seconds; None = never expires
    lifetime_days: int
    title: str
    event_id: str
    event_uuid: str
    attribute_type: str
    category: str
    comment: str
    attribute_timestamp: float
    generate_alert: bool
    score: float = -1.0  # the decaying model's score (decay_model); -1 when there is none
    # Worked out once, when first needed, and shared by every tenant the candidate goes to.
    priority: tuple | None = None
    fingerprint: int | None = None

    def __reduce__(self) -> tuple:
        # Plain positional fields: pickles (to and from a helper reader) several times faster.
        return (Candidate, tuple(getattr(self, name) for name in self.__slots__))

    @property
    def key(self) -> tuple[str, str]:
        return (self.indicator_type, self.value)


@dataclass(slots=True)
class Outcome:
    """What mapping made of a value that is not a candidate: a retraction, a rejection or a skip.

    Mapping returns a Candidate or an Outcome for each value; ``isinstance(x, Candidate)`` tells
    them apart (a Candidate is built directly, one object less per attribute on the hot path).
    """

    kind: str  # "retraction" | "rejected" | "skipped"
    reason: str = ""
    candidate: Candidate | None = None
    key: tuple[str, str] | None = None
    detail: Mapping[str, str] | None = None


def refang(value: str) -> str:
    if "[" not in value and "(" not in value and "xx" not in value.lower():
        return value
    for fanged, plain in _DEFANG:
        value = value.replace(fanged, plain).replace(fanged.upper(), plain)
    return value


def normalise_hash(indicator_type: str, value: str) -> str:
    cleaned = value.strip().lower()
    if indicator_type == "CertificateThumbprint":
        cleaned = cleaned.replace(":", "").replace(" ", "")
    length = HEX_LENGTH[indicator_type]
    if len(cleaned) != length or not _HEX.fullmatch(cleaned):
        raise Rejected(f"malformed {indicator_type} hash (expected {length} hex digits)")
    return cleaned


# IPv4 networks that are not global, and multicast, as integer ranges: checking them with bisect is
# much cheaper than ipaddress' is_global, and mapping runs once per MISP attribute. 192.0.0.0/24
# (whose exceptions differ between Python versions) goes to ipaddress instead. A test compares
# this table with ipaddress on every boundary and on random addresses.
_NOT_GLOBAL_V4 = sorted(
    (int(net.network_address), int(net.broadcast_address))
    for net in map(ipaddress.IPv4Network, (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
        "224.0.0.0/4", "240.0.0.0/4")))
_NOT_GLOBAL_STARTS = [start for start, _ in _NOT_GLOBAL_V4]
_IETF_V4 = (int(ipaddress.IPv4Address("192.0.0.0")), int(ipaddress.IPv4Address("192.0.0.255")))


def ipv4_is_public(number: int) -> bool:
    """Whether Defender would take this IPv4 address: global and not multicast."""
    if _IETF_V4[0] <= number <= _IETF_V4[1]:
        address = ipaddress.IPv4Address(number)
        return address.is_global and not address.is_multicast
    index = bisect.bisect_right(_NOT_GLOBAL_STARTS, number) - 1
    return index < 0 or number > _NOT_GLOBAL_V4[index][1]


def normalise_ip(value: str) -> str:
    cleaned = refang(value.strip())
    match = _IPV4.fullmatch(cleaned)
    if match:  # the common case, without ipaddress objects
        a, b, c, d = map(int, match.groups())
        if a < 256 and b < 256 and c < 256 and d < 256:
            if not ipv4_is_public((a << 24) | (b << 16) | (c << 8) | d):
                raise Rejected("private or reserved IP address (Defender takes external IPs only)")
            return cleaned
    if "/" in cleaned:
        raise Rejected("CIDR ranges are not supported by Defender")
    if "-" in cleaned:
        raise Rejected("IP ranges are not supported by Defender")
    try:
        address = ipaddress.ip_address(cleaned.strip("[]"))
    except ValueError:
        raise Rejected("not a valid IP address") from None
    if not address.is_global or address.is_multicast:
        raise Rejected("private or reserved IP address (Defender takes external IPs only)")
    if address.version == 6:
        # Defender asks for all eight groups (2001:4860:4860:0:0:0:0:8888).
        return ":".join(f"{int(group, 16):x}" for group in address.exploded.split(":"))
    return str(address)


def normalise_domain(value: str) -> str:
    cleaned = refang(value.strip()).lower().rstrip(".")
    if cleaned.startswith("*."):
        cleaned = cleaned[2:]  # Defender domain indicators already cover subdomains
    if not cleaned:
        raise Rejected("empty domain")
    if cleaned.isascii():
        ascii_name = cleaned
    else:
        try:
            ascii_name = cleaned.encode("idna").decode("ascii")
        except UnicodeError:
            raise Rejected("not a valid domain name (IDN encoding failed)") from None
    if len(ascii_name) > 253 or not _DOMAIN.fullmatch(ascii_name) or ascii_name.rpartition(".")[2].isdigit():
        try:
            ipaddress.ip_address(cleaned)
        except ValueError:
            raise Rejected("not a valid domain name") from None
        raise Rejected("an IP address, not a domain name")
    return ascii_name


def normalise_url(value: str) -> str:
    """Scheme and host lowercased (IDN → punycode), host checked; path and query kept as they are.

    Credentials in the URL (user:pass@) are dropped: they are not part of what Defender matches.
    Scheme-less MISP urls are sent as MISP holds them (host normalised): Defender's docs do not say
    whether it adds a scheme, and adding http:// could miss https traffic.
    """
    cleaned = refang(value.strip())
    if not cleaned or _SPACE.search(cleaned):
        raise Rejected("not a valid URL (empty or contains spaces)")
    scheme, netloc, rest = _URL.match(cleaned).groups()  # type: ignore[union-attr]  # the regex always matches
    if scheme is not None:
        scheme = scheme.lower()
        if scheme not in ("http", "https", "ftp"):
            raise Rejected(f"unsupported URL scheme {scheme!r}")
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):
        host, _, port = hostport[1:].partition("]")
        port = port[1:] if port.startswith(":") else port
        host_text = f"[{normalise_ip(host)}]"
    else:
        host, _, port = hostport.partition(":")
        host_text = normalise_ip(host) if _is_ip_literal(host) else normalise_domain(host)
    if port and not (port.isdigit() and int(port) < 65536):
        raise Rejected("not a valid URL (bad port)")
    netloc = f"{host_text}:{port}" if port else host_text
    return f"{scheme}://{netloc}{rest}" if scheme is not None else f"{netloc}{rest}"


def _is_ip_literal(host: str) -> bool:
    if not host or not (host[-1].isdigit() or ":" in host):  # cheap test first: most hosts are names
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


NORMALISERS: dict[str, Callable[[str], str]] = {
    "FileMd5": lambda v: normalise_hash("FileMd5", v),
    "FileSha1": lambda v: normalise_hash("FileSha1", v),
    "FileSha256": lambda v: normalise_hash("FileSha256", v),
    "CertificateThumbprint": lambda v: normalise_hash("CertificateThumbprint", v),
    "IpAddress": normalise_ip,
    "DomainName": normalise_domain,
    "Url": normalise_url,
}


def normalise(indicator_type: str, value: str) -> str:
    return NORMALISERS[indicator_type](value)


def normalise_existing(indicator_type: str, value: str) -> str:
    """Normalise a value Defender holds, so it compares with ours; tolerate what we'd reject."""
    try:
        return normalise(indicator_type, value)
    except Rejected:
        return value.strip().lower() if indicator_type != "Url" else value.strip()


def action_for(indicator_type: str, wanted: str) -> tuple[str, bool]:
    """An action Defender accepts for this type, and whether it forces generateAlert.

    Legacy Alert/AlertAndBlock map to their documented successors; network indicators can't
    BlockAndRemediate; certificates only Allow or BlockAndRemediate.
    """
    force_alert = wanted in ("Alert", "AlertAndBlock", "Audit")
    action = {"Alert": "Audit", "AlertAndBlock": "BlockAndRemediate"}.get(wanted, wanted)
    if indicator_type in NETWORK_TYPES and action == "BlockAndRemediate":
        action = "Block"
    if indicator_type == "CertificateThumbprint":
        if action in ("Block", "BlockAndRemediate"):
            action = "BlockAndRemediate"
        elif action != "Allowed":
            raise Rejected(f"Defender certificate indicators support only Allowed or BlockAndRemediate, "
                           f"not {wanted}")
    return action, force_alert


_ACTIONS: dict[tuple[str, str], tuple[str, bool] | str] = {}


def cached_action_for(indicator_type: str, wanted: str) -> tuple[str, bool] | str:
    """action_for, remembered: (action, force_alert), or the rejection reason as a string."""
    found = _ACTIONS.get((indicator_type, wanted))
    if found is None:
        try:
            found = action_for(indicator_type, wanted)
        except Rejected as exc:
            found = str(exc)
        _ACTIONS[(indicator_type, wanted)] = found
    return found


def _tag_override(tags: frozenset[str], table: Mapping[str, str]) -> str | None:
    found = [table[t] for t in tags if t in table]
    return max(found, key=lambda s: SEVERITY_RANK[s]) if found else None


def _course_of_action(tags: frozenset[str]) -> str | None:
    found = []
    for tag in tags:
        for prefix in COURSE_OF_ACTION_PREFIXES:
            if tag.startswith(prefix):
                predicate = tag[len(prefix):].split("=", 1)[0]
                if predicate in COURSE_OF_ACTION:
                    found.append(COURSE_OF_ACTION[predicate])
    return max(found, key=ACTION_RANK.__getitem__) if found else None


def expiration_for(settings: Settings, indicator_type: str, tlp_clear: bool, attribute: dict,
                   now: float) -> tuple[float | None, int]:
    """Expiry as docs/mapping.md describes it: per-type days from valid_from or now, TLP:CLEAR shorter, last_seen."""
    days = settings.lifetimes[indicator_type, tlp_clear]
    if not settings.ignore_last_seen:
        last_seen = parse_time(attribute.get("last_seen"))
        if last_seen is not None:
            return last_seen, days
    if settings.expire_from_current_date:
        start = now
    else:
        start = parse_time(attribute.get("first_seen"))
        if start is None:
            start = epoch_or(attribute.get("timestamp"), now) or now
    return min(start + days * 86400.0, MAX_EPOCH), days


def _skip(reason: str) -> list[Outcome]:
    return [Outcome("skipped", reason)]


def _rejected(reason: str, attribute: dict, event: EventContext) -> Outcome:
    detail = {"event_id": event.id, "event_uuid": event.uuid, "attribute_uuid": str(attribute.get("uuid") or ""),
              "type": str(attribute.get("type")), "value": str(attribute.get("value"))[:200]}
    return Outcome("rejected", reason, detail=detail)


def _retraction_reason(attribute: dict) -> str | None:
    """"" for a live actionable attribute, a reason for a retracted one, None when never actionable."""
    deleted, to_ids = attribute.get("deleted"), attribute.get("to_ids")
    if deleted is True or deleted in ("1", 1):
        return "deleted in MISP"
    if to_ids is True or to_ids in (1, "1"):
        return ""
    if to_ids is False or to_ids in ("0", 0):
        return "to_ids turned off"
    return None


def map_attribute(attribute: Any, event: EventContext, settings: Settings, now: float) -> list[Outcome | Candidate]:
    """Attribute → outcomes. Pure: no I/O, no globals but the tables above."""
    return event_mapper(event, settings, now)(attribute)


def event_mapper(event: EventContext, settings: Settings, now: float,
                 normalised: dict[tuple[str, str], str | Rejected] | None = None
                 ) -> Callable[[Any], list[Outcome | Candidate]]:
    """map_attribute for every attribute of one event, with the per-event facts worked out once.

    This is the sync's hot path (a large MISP has millions of attributes): the closure keeps what
    every attribute of the event shares in local variables. ``normalised`` lets the mappers of
    several tenants share one normalisation of each value (the costly part) for the event.
    """
    include, exclude = settings.include_tags, settings.exclude_tags
    decay = settings.decay
    threshold = decay_threshold(settings)
    vetted_event = bool(event.tags & settings.vetted_event_tags)
    vetted_tags = settings.vetted_attribute_tags
    event_severity = event.severity or settings.severity
    event_action = event.action or settings.action
    default_alert = settings.generate_alert
    title, event_id, event_uuid, event_timestamp = event.title, event.id, event.uuid, event.timestamp

    def map_one(attribute: Any) -> list[Outcome | Candidate]:
        if not isinstance(attribute, dict):
            return _skip("attribute is not an object")
        misp_type = attribute.get("type")
        parts = TYPE_PARTS.get(misp_type) if isinstance(misp_type, str) else None
        if parts is None:
            return _skip(f"type {misp_type} has no Defender indicator type" if isinstance(misp_type, str)
                         else "attribute has no type")
        if include or exclude:  # a tenant's selection: before anything else is worked out
            tags = event.tags | tag_names(attribute)
            if include and not tags & include:
                return _skip("not for this tenant: no include_tags tag")
            if exclude and tags & exclude:
                return _skip("not for this tenant: an exclude_tags tag")
        raw_value = attribute.get("value")
        if not isinstance(raw_value, str) or not raw_value.strip():
            return [_rejected("empty or missing value", attribute, event)]
        if misp_type in COMPOSITE_TYPES and raw_value.count("|") != 1:
            return [_rejected(f"composite {misp_type} value must hold exactly one '|'", attribute, event)]
        if attribute.get("to_ids") is True and not attribute.get("deleted"):
            retracted = ""  # the common case first
        else:
            retracted = _retraction_reason(attribute)
            if retracted is None:
                return _skip("to_ids is not set")

        keys: list[tuple[str, str | Rejected]] = []
        for indicator_type, part in parts:
            value = raw_value if part is None else raw_value.split("|", 1)[part]
            found = normalised.get((indicator_type, value)) if normalised is not None else None
            if found is None:
                try:
                    found = NORMALISERS[indicator_type](value)
                except Rejected as exc:
                    found = exc
                if normalised is not None:
                    normalised[indicator_type, value] = found
            if isinstance(found, Rejected) and len(parts) == 1:
                return [_rejected(str(found), attribute, event)]
            keys.append((indicator_type, found))  # domain|ip: one bad half does not spoil the other

        score, base = decay_score_of(attribute, decay.id) if decay is not None else (-1.0, 0.0)
        if decay is not None and not retracted and 0 <= score < threshold:
            retracted = f"decayed (score below {threshold:g})"  # goes, as a retraction does
        attribute_tags = tag_names(attribute) if attribute.get("Tag") else NO_TAGS
        if attribute_tags:
            severity = _tag_override(attribute_tags, THREAT_LEVEL_SEVERITY) or event_severity
            wanted_action = _course_of_action(attribute_tags) or event_action
            tlp_clear = event.tlp_clear or bool(attribute_tags & TLP_CLEAR_TAGS)
        else:
            severity, wanted_action, tlp_clear = event_severity, event_action, event.tlp_clear
        not_vetted = vetted_event and not (attribute_tags & vetted_tags)
        outcomes: list[Outcome | Candidate] = []
        for indicator_type, value in keys:
            if isinstance(value, Rejected):
                outcomes.append(_rejected(str(value), attribute, event))
            elif retracted:
                outcomes.append(Outcome("retraction", retracted, key=(indicator_type, value)))
            elif not_vetted:
                outcomes.append(Outcome("skipped", "event needs vetted attributes; attribute not vetted",
                                        key=(indicator_type, value)))
            else:
                action = cached_action_for(indicator_type, wanted_action)
                if isinstance(action, str):
                    outcomes.append(_rejected(action, attribute, event))
                    continue
                expiration, days = expiration_for(settings, indicator_type, tlp_clear, attribute, now)
                if decay is not None and settings.decay_expiry and score >= 0:
                    crossing = decay.crossing(score, base, threshold, now)
                    if crossing is not None and (expiration is None or crossing < expiration):
                        expiration, days = crossing, 0  # stable: no refresh until the score moves
                if expiration is not None and expiration <= now:
                    outcomes.append(Outcome("skipped", "already expired", key=(indicator_type, value)))
                    continue
                comment = attribute.get("comment")
                category = attribute.get("category")
                outcomes.append(Candidate(
                    indicator_type, value, action[0], severity, expiration, days, title, event_id, event_uuid,
                    misp_type, category if isinstance(category, str) else "",
                    comment[:500] if isinstance(comment, str) and comment else "",
                    epoch_or(attribute.get("timestamp"), event_timestamp), action[1] or default_alert, score))
        return outcomes

    return map_one


def rank(candidate: Candidate) -> tuple:
    """One order for candidates, used both between duplicates of a key and for the tenant cap.

    Highest decay score first (decay_model; otherwise all equal), then strongest severity, then
    strongest action (Block before Audit), then latest expiry, then newest attribute, then fixed
    tie-breaks. Because the duplicate that wins a key is also the one
    the cap ranks, the choice never depends on which key Defender already holds nor on page order:
    a plan over the cap settles instead of switching a value between two duplicates every run.
    """
    c = candidate
    return (c.score, SEVERITY_RANK[c.severity], ACTION_RANK.get(c.action, 0),
            math.inf if c.expiration is None else c.expiration,
            c.attribute_timestamp, c.event_uuid, c.attribute_type, c.category, c.comment)


def decay_threshold(settings: Settings) -> float:
    if settings.decay is None:
        return 0.0
    return settings.decay.threshold if settings.decay_threshold is None else settings.decay_threshold


def decay_score_of(attribute: dict, model_id: str) -> tuple[float, float]:
    """The model's (score, base score) in an attribute's ``decay_score`` list; (-1, 0) when it has none."""
    entries = attribute.get("decay_score")
    if isinstance(entries, list):
        for entry in entries:
            model = entry.get("DecayingModel") if isinstance(entry, dict) else None
            if isinstance(model, dict) and str(model.get("id")) == model_id:
                score, base = epoch_or(entry.get("score"), -1.0), epoch_or(entry.get("base_score"), 0.0)
                return (score, base) if 0 <= score <= 1000 else (-1.0, 0.0)
    return (-1.0, 0.0)


def stronger(a: Candidate, b: Candidate) -> Candidate:
    """Of two candidates for one key, the one ``rank`` puts first."""
    return a if rank(a) >= rank(b) else b


def misp_spellings(indicator_type: str, value: str) -> set[str]:
    """Ways MISP may hold a normalised value: as is, defanged, IPv6 compressed, with a final dot, IDN."""
    spellings = {value}
    if indicator_type in HEX_LENGTH:
        spellings.add(value.upper())
    elif indicator_type == "IpAddress" and ":" in value:
        spellings.add(ipaddress.ip_address(value).compressed)
    elif indicator_type == "DomainName":
        for name in {value, _unicode_host(value)}:
            spellings |= {name, f"{name}.", name.replace(".", "[.]")}
    elif indicator_type == "Url":
        scheme, separator, rest = value.partition("://")
        host, slash, path = rest.partition("/") if separator else value.partition("/")
        for shown_host in {host, _unicode_host(host)}:
            defanged_host = shown_host.replace(".", "[.]")
            if separator:
                for shown in {scheme, scheme.replace("http", "hxxp")}:
                    spellings |= {f"{shown}://{shown_host}{slash}{path}", f"{shown}://{defanged_host}{slash}{path}"}
            else:
                spellings |= {f"{shown_host}{slash}{path}", f"{defanged_host}{slash}{path}"}
    return spellings


def _unicode_host(host: str) -> str:
    """An IDN host as its author wrote it (MISP may hold either form); the host itself otherwise."""
    if "xn--" not in host:
        return host
    try:
        return host.encode("ascii").decode("idna")
    except UnicodeError:
        return host


def cap_priority(candidate: Candidate) -> tuple:
    """Who gets the room when the tenant cap is short: ``rank``, then the key itself."""
    if candidate.priority is None:
        candidate.priority = (*rank(candidate), candidate.indicator_type, candidate.value)
    return candidate.priority


def indicator_json(candidate: Candidate, settings: Settings) -> dict[str, Any]:
    """The Defender import item for a candidate (field names are case-sensitive)."""
    description = (f"MISP event {candidate.event_id} ({candidate.event_uuid}), attribute "
                   f"{candidate.attribute_type}/{candidate.category or 'uncategorised'}")
    if candidate.comment:
        description += f": {candidate.comment}"
    item = {
        "indicatorValue": candidate.value,
        "indicatorType": candidate.indicator_type,
        "action": candidate.action,
        "application": settings.application,
        "title": candidate.title,
        "description": description[:DESCRIPTION_LIMIT],
        "severity": candidate.severity,
        "recommendedActions": settings.recommended_actions,
        "generateAlert": candidate.generate_alert,
        "expirationTime": format_time(candidate.expiration),
    }
    if settings.rbac_group_names:
        item["rbacGroupNames"] = list(settings.rbac_group_names)
    return item


@dataclass
class Tally:
    """How mapping went, value by value: counts by kind and reason, and the distinct keys seen.

    Distinct keys are counted by their 64-bit fingerprints, so that a read of millions of
    attributes is counted exactly without keeping their records.
    """

    attributes: int = 0
    values: int = 0  # outcomes: one per attribute, two for a domain|ip
    duplicates: int = 0
    rejected: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    rejected_items: list[dict] = field(default_factory=list)
    seen: set[int] = field(default_factory=set, repr=False)  # fingerprints of every candidate key
    elsewhere: int = 0  # distinct keys only a helper reader saw

    @property
    def distinct(self) -> int:
        return len(self.seen) + self.elsewhere

    def candidate(self, candidate: Candidate) -> None:
        fingerprint = candidate.fingerprint
        if fingerprint is None:
            fingerprint = candidate.fingerprint = key_fingerprint(candidate.indicator_type, candidate.value)
        if fingerprint in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(fingerprint)

    def rejection(self, outcome: Outcome) -> None:
        self.rejected[outcome.reason] += 1
        if len(self.rejected_items) < 1000:
            self.rejected_items.append({**(outcome.detail or {}), "reason": outcome.reason})

    def absorb(self, other: Tally, fingerprints: Iterable[int]) -> None:
        """Add another reader's counts; only the number of its keys we have not seen is kept."""
        fingerprints = list(fingerprints)
        overlap = sum(map(self.seen.__contains__, fingerprints))
        self.attributes += other.attributes
        self.values += other.values
        self.duplicates += other.duplicates + overlap
        self.elsewhere += len(fingerprints) - overlap
        self.rejected.update(other.rejected)
        self.skipped.update(other.skipped)
        self.rejected_items.extend(other.rejected_items[:max(0, 1000 - len(self.rejected_items))])

    def take_fingerprints(self) -> set[int]:
        """Hand over the key fingerprints (a helper sends them compactly, apart from the rest)."""
        seen, self.seen = self.seen, set()
        return seen


EVICTED_LISTED = 1000  # of the values the cap leaves out while MISP is read, the best this many are listed


@dataclass
class CandidateSet:
    """What Defender should hold, as full records: the keys it holds, and the ``room`` best others.

    Memory stays bounded however large MISP is: Defender can take at most ``room`` more
    indicators, so of the keys it does not hold (``interesting``) only the ``room`` best by
    ``cap_priority`` are kept; the others are counted (and a sample kept for the report).
    ``interesting=None`` keeps everything (before the bounds are known, small inputs, tests).
    """

    interesting: frozenset | None = None
    room: int | None = None
    candidates: dict[tuple[str, str], Candidate] = field(default_factory=dict)
    retractions: dict[tuple[str, str], str] = field(default_factory=dict)
    evicted: int = 0  # distinct candidates dropped for lack of room (the tenant cap); set by finish()
    evicted_sample: list[Candidate] = field(default_factory=list)  # the best of them, best first; set by finish()
    _evicted_best: dict = field(default_factory=dict, repr=False)  # key → the best EVICTED_LISTED keys' entries
    _evicted_heap: list = field(default_factory=list, repr=False)  # their weakest first (stale entries skipped)
    _others: int = 0  # resident candidates outside ``interesting``
    _pushes: int = 0  # heap tie-breaker
    _heap: list = field(default_factory=list, repr=False)

    def place(self, candidate: Candidate) -> None:
        """Keep the candidate if its key is held by Defender or it is among the ``room`` best."""
        key = (candidate.indicator_type, candidate.value)
        present = self.candidates.get(key)
        keeps_all = self.interesting is None or self.room is None or key in self.interesting
        if present is not None:
            best = stronger(present, candidate)
            if best is not present:
                self.candidates[key] = best
                if not keeps_all:
                    self._push(cap_priority(best), best)
            return
        if keeps_all:
            self.candidates[key] = candidate
            return
        priority = cap_priority(candidate)
        if self._others >= self.room and self._heap and priority <= self._heap[0][0]:
            self._evict(candidate)  # weaker than everything kept: never enters
            return
        self.candidates[key] = candidate
        self._others += 1
        self._push(priority, candidate)
        if self._evicted_best:
            self._evicted_best.pop(key, None)  # resident now: not left out
        while self._others > self.room:
            weakest = heapq.heappop(self._heap)[2]
            weakest_key = (weakest.indicator_type, weakest.value)
            if self.candidates.get(weakest_key) is not weakest:
                continue  # a stale entry: that key holds a stronger candidate now, or none
            del self.candidates[weakest_key]
            self._others -= 1
            self._evict(weakest)

    def retract(self, key: tuple[str, str], reason: str) -> None:
        if self.interesting is None or key in self.interesting:
            self.retractions.setdefault(key, reason)

    def _push(self, priority: tuple, candidate: Candidate) -> None:
        self._pushes += 1
        heapq.heappush(self._heap, (priority, self._pushes, candidate))

    def _evict(self, candidate: Candidate) -> None:
        """Keep the best evicted keys (one entry each): the report lists them after the ones in line."""
        key, entry = candidate.key, (cap_priority(candidate), id(candidate), candidate)
        best, heap = self._evicted_best, self._evicted_heap
        present = best.get(key)
        if present is not None or len(best) < EVICTED_LISTED:
            if present is None or entry[0] > present[0]:
                best[key] = entry
                heapq.heappush(heap, entry)
            return
        while heap and best.get(heap[0][2].key) is not heap[0]:
            heapq.heappop(heap)  # stale: that key holds a stronger entry now, or none
        if not heap:  # unpickled: the heap is only an index over ``best``
            heap.extend(sorted(best.values(), key=lambda e: e[0]))
        if entry[0] > heap[0][0]:
            del best[heapq.heapreplace(heap, entry)[2].key]
            best[key] = entry

    def absorb(self, other: CandidateSet) -> None:
        """Fold in another reader's set (or, into a new empty set, one collected before the bounds)."""
        for key, reason in other.retractions.items():
            self.retract(key, reason)
        for candidate in other.candidates.values():
            self.place(candidate)
        for _, _, candidate in other._evicted_best.values():
            self._evict(candidate)

    def __getstate__(self) -> dict[str, Any]:
        # The heap is only a working index over ``candidates``: rebuilt where it is needed.
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "_heap": [], "_evicted_heap": []}

    def finish(self, distinct: int) -> None:
        """Settle: a value one attribute retracts but another still carries is kept; count the evicted."""
        for key in list(self.retractions):
            if key in self.candidates:
                del self.retractions[key]
        held = (len(self.candidates) if self.interesting is None
                else sum(1 for key in self.candidates if key in self.interesting))
        self.evicted = distinct - held - self._others
        self._heap = []
        self._evicted_heap = []
        self.evicted_sample = [entry[2] for entry in sorted(self._evicted_best.values(), key=lambda e: e[0],
                                                            reverse=True) if entry[2].key not in self.candidates]


class Desired:
    """One tenant's share of a MISP read: how mapping went (``tally``) and what to hold (``kept``)."""

    __slots__ = ("tally", "kept")

    def __init__(self, interesting: frozenset | None = None, room: int | None = None):
        self.tally, self.kept = Tally(), CandidateSet(interesting, room)

    def add(self, outcome: Outcome | Candidate) -> None:
        if type(outcome) is Candidate:
            self.tally.candidate(outcome)
            self.kept.place(outcome)
        elif outcome.kind == "retraction":
            self.tally.skipped[outcome.reason] += 1  # not pushed; and if Defender holds it, it goes
            self.kept.retract(outcome.key, outcome.reason)  # type: ignore[arg-type]
        elif outcome.kind == "rejected":
            self.tally.rejection(outcome)
        else:
            self.tally.skipped[outcome.reason] += 1

    def __getstate__(self) -> tuple[Tally, CandidateSet]:
        return self.tally, self.kept

    def __setstate__(self, state: tuple[Tally, CandidateSet]) -> None:
        self.tally, self.kept = state

    def merge_unbounded(self, other: Desired) -> None:
        """Take, under this (new, empty) Desired's bounds, what ``other`` collected before any bounds."""
        self.tally = dataclasses.replace(other.tally, rejected=Counter(other.tally.rejected),
                                         skipped=Counter(other.tally.skipped),
                                         rejected_items=list(other.tally.rejected_items), seen=set(other.tally.seen))
        self.kept.absorb(other.kept)

    def absorb(self, part: Desired, fingerprints: Iterable[int]) -> None:
        """Fold in what another reader (a helper process) collected from other MISP pages."""
        self.tally.absorb(part.tally, fingerprints)
        self.kept.absorb(part.kept)

    def take_fingerprints(self) -> set[int]:
        return self.tally.take_fingerprints()

    def finish(self) -> None:
        self.kept.finish(self.tally.distinct)
        self.tally.elsewhere, self.tally.seen = self.tally.distinct, set()

    # What planning and reporting read, by their usual names.
    candidates = property(lambda self: self.kept.candidates)
    retractions = property(lambda self: self.kept.retractions)
    interesting = property(lambda self: self.kept.interesting)
    evicted = property(lambda self: self.kept.evicted)
    evicted_sample = property(lambda self: self.kept.evicted_sample)
    distinct = property(lambda self: self.tally.distinct)
    attributes = property(lambda self: self.tally.attributes)
    values = property(lambda self: self.tally.values)
    duplicates = property(lambda self: self.tally.duplicates)
    rejected = property(lambda self: self.tally.rejected)
    skipped = property(lambda self: self.tally.skipped)
    rejected_items = property(lambda self: self.tally.rejected_items)


def collect(events: Iterable[dict], settings: Settings, now: float,
            on_event: Callable[[EventContext], None] | None = None, desired: Desired | None = None,
            finish: bool = True) -> Desired:
    """Map every attribute of ``events`` into ``desired`` (finished unless told otherwise)."""
    desired = Desired() if desired is None else desired
    collect_for(events, [Target(settings, desired)], now, on_event)
    if finish:
        desired.finish()
    return desired


@dataclass
class Target:
    """One tenant's share of a MISP read: its settings, and the Desired its mapping fills (None: dropped)."""

    settings: Settings
    desired: Desired | None


def collect_for(events: Iterable[dict], targets: list[Target], now: float,
                on_event: Callable[[EventContext], None] | None = None) -> None:
    """Map every attribute of ``events`` for each target.

    Tenants whose mapping settings are the same (``mapping_signature``) share each outcome; the
    others still share each value's normalisation, the costly part of mapping.
    """
    flatten = targets[0].settings.misp_flatten_attributes
    groups: dict[tuple, list[Target]] = {}
    for target in targets:
        groups.setdefault(target.settings.mapping_signature, []).append(target)
    for event in events:
        context = event_context(event)
        if on_event:
            on_event(context)
        attributes = list(event_attributes(event, flatten))
        normalised: dict | None = {} if len(groups) > 1 else None
        for group in groups.values():
            live = unique(t.desired for t in group)
            if not live:
                continue
            map_one = event_mapper(context, group[0].settings, now, normalised)
            values = 0
            if len(live) == 1:  # the common case, without the inner loop
                add = live[0].add
                for attribute in attributes:
                    outcomes = map_one(attribute)
                    values += len(outcomes)  # a domain|ip attribute is two values
                    for outcome in outcomes:
                        add(outcome)
            else:
                adds = [desired.add for desired in live]
                for attribute in attributes:
                    outcomes = map_one(attribute)
                    values += len(outcomes)
                    for outcome in outcomes:
                        for add in adds:
                            add(outcome)
            for desired in live:
                desired.tally.attributes += len(attributes)
                desired.tally.values += values


def unique(desireds: Iterable[Desired | None]) -> list[Desired]:
    """The distinct Desired objects (several tenants may share one), without the dropped ones."""
    return list({id(d): d for d in desireds if d is not None}.values())


# ###########################################################################################
# Reading the selection: MISP pages mapped as they arrive, in a helper process
# ###########################################################################################

def share_desired(tenants: list[Settings], given: list[Bounds]) -> list[Target]:
    """A Target per tenant: bounded as its listing says, None when its listing failed. Tenants alike
    in mapping settings and bounds (a frequent case: one MISP selection, Defenders that hold the same
    values) share one Desired, so their mapping is done once."""
    shared: dict[tuple, Desired] = {}
    targets = []
    for tenant, bounds in zip(tenants, given, strict=True):
        if bounds is None:
            targets.append(Target(tenant, None))
            continue
        key = (tenant.mapping_signature, *bounds)
        if key not in shared:
            shared[key] = Desired(interesting=bounds[0], room=bounds[1])
        targets.append(Target(tenant, shared[key]))
    return targets


def apply_bounds(targets: list[Target], tenants: list[Settings], given: list[Bounds]) -> None:
    """Move what the unbounded start of a read collected under each tenant's bounds, in place
    (the mapping loop holds these Targets)."""
    shared = share_desired(tenants, given)
    merged: set[int] = set()
    for target, fresh in zip(targets, shared, strict=True):
        if fresh.desired is not None and target.desired is not None and id(fresh.desired) not in merged:
            merged.add(id(fresh.desired))
            fresh.desired.merge_unbounded(target.desired)
    for target, fresh in zip(targets, shared, strict=True):
        target.desired = fresh.desired


# --- Reading the whole selection: page 1 here, the rest shared with a helper when it is large ---

Bounds = tuple[frozenset | None, int | None] | None  # (keys Defender holds, room); None: the tenant dropped out


@dataclass
class HelperProcess:
    """The parent's handle on a helper reader: the process and the parent's ends of its pipes."""

    process: Any
    results: Any  # the helper's bounded results come back here
    bounds: Any  # each tenant's bounds go out here
    sent: bool = False


class SelectionReader:
    """Reads and maps every selected MISP event once, for every tenant that shares the selection.

    Mapping is CPU-bound and a large MISP holds millions of attributes. So ``start()`` reads the
    first page; when it comes back full and the machine has a second core, a helper process starts
    at once (its PyMISP connection and first page overlap the Defender listings) and then shares the
    remaining pages with this process: each takes the next unread page, so neither waits for the
    other. Each tenant's ``Desired`` starts unbounded and takes its bounds (the keys its Defender
    holds, its room) as soon as its listing is done; a tenant whose listing failed drops out. The
    helper keeps bounded ``Desired`` values of its own, folded in at the end. Small reads never start
    a process. The helper never outlives this process (see ``_helper_reader``).
    """

    def __init__(self, misp: MispSource, tenants: Sequence[Settings], full_sync: bool, now: float, *,
                 start_method: str | None = None, close_in_helper: Iterable[int] = ()):
        self.misp, self.tenants, self.full_sync, self.now = misp, list(tenants), full_sync, now
        self.settings = self.tenants[0]  # what the tenants share: MISP, paging, logging
        # fork is quick and shares what this process holds; a process with other threads
        # (tests, embedding callers, tenants being listed) must not fork: it starts a fresh interpreter.
        self.start_method = start_method or ("fork" if threading.active_count() == 1 else "spawn")
        self.close_in_helper = tuple(close_in_helper)
        self.status = MispReadStatus()
        self.seen: set[str] = set()  # ids and uuids of the events read (--event says which were not found)
        self.first_page: list[dict] = []
        self.helper: HelperProcess | None = None
        self.more = False
        self.next_page: Callable[[], int] = itertools.count(2).__next__

    def start(self) -> None:
        """Read the first page; start the helper reader when there are more pages to share."""
        self.first_page = list(self.misp.events(self.full_sync, self.status, max_pages=1))
        self.more = self.status.complete and self.status.last_page_full
        if self.more and (os.cpu_count() or 1) > 1:
            context = multiprocessing.get_context(self.start_method)
            counter = context.Value("i", 2)
            self.next_page = functools.partial(_claim_page, counter)
            results, results_end = context.Pipe(duplex=False)
            bounds_end, bounds = context.Pipe(duplex=False)
            # A forked helper holds copies of every descriptor of this process: it closes the ones it
            # must not keep (our pipe ends, the run lock). A spawned one inherits only its own ends.
            inherited = ((results.fileno(), bounds.fileno(), *self.close_in_helper)
                         if self.start_method == "fork" else ())
            process = context.Process(target=_helper_reader, daemon=True, args=(
                results_end, bounds_end, counter, self.tenants, self.full_sync, self.now, os.getpid(),
                inherited, self.misp.policy.deadline.remaining()))
            process.start()
            results_end.close()
            bounds_end.close()
            self.helper = HelperProcess(process, results, bounds)

    def read_into(self, bounds: list[concurrent.futures.Future]) -> list[Desired | None]:
        """Map every event into a Desired per tenant; ``bounds[i]`` gives tenant i's bounds.

        With a helper reader at work, mapping here waits for every listing (the helper reads on);
        alone, it starts at once, unbounded, and takes the bounds as soon as every listing is in
        (they run in parallel meanwhile; a large unbounded share waits for them). Tenants alike in
        mapping settings and bounds share one Desired: the work is then done once. A tenant whose
        listing failed gets None.
        """
        targets = share_desired(self.tenants, [(None, None)] * len(self.tenants))
        bounded = False
        mapped = itertools.count(1)

        def settle() -> None:
            nonlocal bounded
            given = [future.result() for future in bounds]
            self._send_bounds(given)
            apply_bounds(targets, self.tenants, given)
            bounded = True

        def shown(events: Iterable[dict]) -> Iterator[dict]:
            for event in events:
                PROGRESS.show(f"MISP: {next(mapped)} events read and mapped")
                if not bounded and (all(f.done() for f in bounds) or any(
                        len(t.desired.candidates) > UNBOUNDED_LIMIT for t in targets if t.desired is not None)):
                    settle()
                yield event

        on_event = lambda e: self._saw(e.id, e.uuid, e.info)  # noqa: E731 - a one-line callback
        if self.helper is not None:
            # The helper reads on meanwhile: waiting here leaves the listings the CPU and spares
            # re-placing an unbounded share (about 15 % quicker with three tenants).
            settle()
        collect_for(shown(self.first_page), targets, self.now, on_event)
        self.first_page = []
        if self.more:
            collect_for(shown(self.misp.events(self.full_sync, self.status, next_page=self.next_page)),
                        targets, self.now, on_event)
        if not bounded:
            settle()
        if self.helper is not None:
            self._join_helper(targets)
        for desired in unique(t.desired for t in targets):
            desired.finish()
        return [t.desired for t in targets]

    def _saw(self, event_id: str, event_uuid: str, info: str) -> None:
        self.seen.update((event_id, event_uuid.lower()))
        if self.settings.write_parsed_eventid:
            log.info("MISP event %s: %s", event_id, info)

    def _send_bounds(self, given: list[Bounds]) -> None:
        if self.helper is None:
            return
        try:
            self.helper.bounds.send(given)
        except OSError:
            pass  # the helper is gone; _join_helper notices and marks the read incomplete

    def _join_helper(self, targets: list[Target]) -> None:
        helper, self.helper = self.helper, None
        assert helper is not None
        delivered = False
        try:
            # Poll, never block: a helper that hangs or dies must not hold the run past its deadline.
            while not helper.results.poll(0.5):
                if not helper.process.is_alive() and not helper.results.poll(0.1):
                    raise EOFError("the helper process ended without a result")
                if self.misp.policy.deadline.passed:
                    raise TimeoutError("max_run_seconds reached while waiting for the helper reader")
            parts, part_status, events = helper.results.recv()
            delivered = True
        except (EOFError, OSError) as exc:  # the helper died or hung: the read is incomplete
            self.status.fail(f"MISP helper reader failed: {type(exc).__name__}: {exc}")
        else:
            absorbed: set[int] = set()  # a Desired shared by several tenants takes its part once
            for target, part in zip(targets, parts, strict=True):
                if target.desired is not None and part is not None and id(target.desired) not in absorbed:
                    absorbed.add(id(target.desired))
                    target.desired.absorb(*part)
            self.status.absorb(part_status)
            for event_id, event_uuid, info in events:
                self._saw(event_id, event_uuid, info)
        finally:
            _stop_helper(helper, delivered)

    def close(self) -> None:
        """Stop a helper that will not be needed (the run failed before reading)."""
        if self.helper is not None:
            helper, self.helper = self.helper, None
            _stop_helper(helper, delivered=False)


def _stop_helper(helper: HelperProcess, delivered: bool) -> None:
    """A helper that delivered its result is ending by itself; one that did not (the run failed or
    was interrupted) may be waiting on MISP and would read on: it is stopped at once, as it owns nothing."""
    helper.bounds.close()  # a helper waiting for its bounds sees the end of the pipe and exits
    helper.results.close()
    if delivered:
        helper.process.join(5)
    if helper.process.is_alive():
        helper.process.kill()
        helper.process.join(5)


def _claim_page(counter: Any) -> int:
    with counter.get_lock():
        page = counter.value
        counter.value += 1
    return page


PR_SET_PDEATHSIG = 1


def _bind_to_parent(parent: int, inherited: Iterable[int]) -> None:
    """Make a helper reader die with its parent and hold nothing of the parent's.

    Linux delivers SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG); the parent pid is also
    checked in the loop, for other kernels and for a parent that died before the prctl. The
    descriptors the parent owns (its pipe ends, the run lock) are closed, and stdin/stdout/stderr
    are pointed at /dev/null so that whoever reads the run's output sees it end with the run.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)
    for descriptor in inherited:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    null = os.open(os.devnull, os.O_RDWR)
    for standard in (0, 1, 2):
        os.dup2(null, standard)
    os.close(null)


def _helper_reader(results: Any, bounds: Any, counter: Any, tenants: list[Settings], full_sync: bool, now: float,
                   parent: int, inherited: tuple[int, ...], seconds_left: float) -> None:
    """The helper process: read and map the pages it claims; send back each tenant's bounded result.

    It starts while the parent is still listing Defender, so it maps its first pages keeping
    every candidate, and applies the bounds (the keys each Defender holds, the room) when they come.
    """
    _bind_to_parent(parent, inherited)
    settings = tenants[0]
    if not logging.getLogger().handlers:  # spawned: set up the log; forked: the parent's handlers came along
        setup_logging(settings, 0)
    status, events = MispReadStatus(), []

    def on_event(event: EventContext) -> None:
        events.append((event.id, event.uuid, event.info if settings.write_parsed_eventid else ""))
    targets = share_desired(tenants, [(None, None)] * len(tenants))  # unbounded until the bounds come
    bounded_yet = False

    def receive_bounds() -> None:
        nonlocal bounded_yet
        while not bounds.poll(1.0):  # bounded waits: the parent may be gone
            if os.getppid() != parent:
                raise EOFError
        apply_bounds(targets, tenants, bounds.recv())  # as the parent does
        bounded_yet = True

    def bounded(events_in: Iterable[dict]) -> Iterator[dict]:
        for event in events_in:
            if os.getppid() != parent:
                raise EOFError
            if not bounded_yet and (bounds.poll() or any(
                    len(t.desired.candidates) > UNBOUNDED_LIMIT for t in targets if t.desired is not None)):
                receive_bounds()  # waits only if the parent is slow and we hold many
            yield event

    try:
        policy = settings.retry_policy(Deadline(seconds_left))
        pages = MispSource(settings.common, policy, helper=True).selecting_for(settings).events(
            full_sync, status, next_page=functools.partial(_claim_page, counter))
        collect_for(bounded(pages), targets, now, on_event)
        if not bounded_yet:
            receive_bounds()
    except (EOFError, OSError):
        return  # the parent gave up before reading, or is gone
    except Misp2DefenderError as exc:
        status.fail(str(exc))
    parts = [None if t.desired is None else (t.desired, array.array("Q", t.desired.take_fingerprints()))
             for t in targets]
    status.helper_peak_rss_mib = peak_rss_mib()
    with contextlib.suppress(OSError):
        results.send((parts, status, events))
        results.close()


UNBOUNDED_LIMIT = 50_000  # candidates a helper may hold before it knows its bounds


# ###########################################################################################
# HTTP clients: Entra tokens, Key Vault, Defender, OTX
# ###########################################################################################

def make_session(user_agent: str, proxies: Mapping[str, str]) -> Any:
    import requests

    session = requests.Session()
    session.headers["User-Agent"] = user_agent
    if proxies:
        session.proxies.update(proxies)
    return session


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds or as an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# The fixes for credentials other than a secret or a certificate (FIXES["entra"] covers those).
IDENTITY_FIX = ("assign a managed identity to this machine (or App Service), name a user-assigned one in "
                "graph_auth['managed_identity'], and grant it the WindowsDefenderATP app role Ti.ReadWrite.All "
                "(docs/credentials.md); elsewhere use another credential")
FEDERATION_FIX = ("check graph_auth['client_assertion_file'] (or AZURE_FEDERATED_TOKEN_FILE): a fresh token the run "
                  "may read, and on the app registration a federated credential whose issuer, subject and "
                  "audience match it (docs/credentials.md)")
# Entra's error codes (AADSTS…) that name the credential at fault; the code list is typed data.
ENTRA_CODES = {7000215: "client secret (graph_auth['client_secret'])",
               7000222: "client secret (graph_auth['client_secret'], expired)",
               700016: "client id (graph_auth['client_id'])",
               700027: "certificate (graph_auth['client_certificate'])",
               90002: "tenant (graph_auth['tenant'])",
               700024: "federated token (client_assertion_file: expired or not yet valid; is it being rotated?)",
               700211: "federated token (no federated credential on the app trusts its issuer)",
               700213: "federated token (no federated credential on the app matches its subject)",
               7002138: "federated token (the subject matches only if case is ignored)",
               70021: "federated token (no federated credential on the app matches it)"}
ENTRA_CREDENTIAL_ERRORS = ("invalid_client", "unauthorized_client", "invalid_request", "invalid_scope",
                           "invalid_tenant")
IDENTITY_PLATFORMS = {"APP_SERVICE": "App Service or Functions", "AZURE_ARC": "Azure Arc",
                      "CLOUD_SHELL": "Cloud Shell", "MACHINE_LEARNING": "Machine Learning",
                      "SERVICE_FABRIC": "Service Fabric", "DEFAULT_TO_VM": "Azure VM (IMDS)"}


def token_claims(token: str) -> dict[str, Any]:
    """An access token's claims, read without verification (which app it is, its roles: advice only)."""
    import base64

    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def identity_platform() -> str:
    """Where MSAL will ask for a managed identity's token (App Service, Arc, a VM's IMDS, ...)."""
    import msal.managed_identity as mi

    source = mi.get_managed_identity_source()
    return next((IDENTITY_PLATFORMS[name] for name in IDENTITY_PLATFORMS if getattr(mi, name, None) is source),
                "unknown")


class TokenProvider:
    """Entra tokens for one scope, from whatever credential the settings name; MSAL caches and refreshes.

    An app registration signs in with MSAL's ConfidentialClientApplication: a client secret, a
    certificate, or a federated token read again from its file for every new token (workload
    identity federation: the file is rotated underneath). A managed identity uses MSAL's
    ManagedIdentityClient, which finds the platform's endpoint itself.
    """

    def __init__(self, settings: Settings, session: Any, policy: RetryPolicy, scope: str | None = None,
                 identity: tuple[str, str] | None = None):
        self.settings, self.policy, self.session = settings, policy, session
        self.scopes = [scope or settings.target_scope]
        self.identity = identity or settings.managed_identity
        self.stats = EndpointStats()
        if self.identity:  # outside Azure MSAL falls back to IMDS (169.254.169.254), which may never answer
            self.session.request = functools.partial(self.session.request,
                                                     timeout=min(settings.request_timeout, 10))
        self.app = self._identity_client() if self.identity else self._app()

    def _app(self) -> Any:
        import msal

        s = self.settings
        credential: Any = s.client_secret
        if s.client_assertion_file:
            credential = {"client_assertion": self._read_assertion}
        elif s.client_certificate:
            credential = {"private_key": Path(s.client_certificate).read_text(),
                          "thumbprint": s.client_certificate_thumbprint}
        known = urlsplit(s.authority).hostname in msal.authority.WELL_KNOWN_AUTHORITY_HOSTS

        def attempt() -> Any:
            try:
                return msal.ConfidentialClientApplication(
                    s.client_id, client_credential=credential, authority=f"{s.authority}/{s.tenant}",
                    instance_discovery=known, http_client=self.session, timeout=s.request_timeout)
            except ValueError as exc:  # MSAL's type for a tenant the authority does not know
                raise CredentialError(f"Entra does not know tenant graph_auth['tenant'] = {s.tenant!r} "
                                      f"at {s.authority}: {exc}", "entra") from None
            except Exception as exc:
                self._raise_or_retry(exc)

        return self.policy.run(f"Entra ID at {s.authority}", attempt, service="entra")

    def _read_assertion(self) -> str:
        """The federated token, read again for each token request (Kubernetes rotates it hourly)."""
        try:
            token = Path(self.settings.client_assertion_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeError) as exc:
            raise CredentialError(f"the federated token file {self.settings.client_assertion_file!r} cannot be "
                                  f"read ({type(exc).__name__})", "entra", FEDERATION_FIX) from None
        if not token:
            raise CredentialError(f"the federated token file {self.settings.client_assertion_file!r} is empty",
                                  "entra", FEDERATION_FIX)
        return token

    def _identity_client(self) -> Any:
        import msal

        kind, identifier = self.identity  # type: ignore[misc]
        identity = (msal.SystemAssignedManagedIdentity() if kind == "system"
                    else msal.UserAssignedManagedIdentity(**{kind: identifier}))
        return msal.ManagedIdentityClient(identity, http_client=self.session, token_cache=msal.TokenCache())

    def _raise_or_retry(self, exc: Exception) -> None:
        import msal

        if isinstance(exc, Misp2DefenderError):
            raise exc
        problem = transport_problem(exc)
        if problem == "certificate":
            raise certificate_error("entra", self.settings.authority, exc) from None
        if problem and self.identity and identity_platform() == IDENTITY_PLATFORMS["DEFAULT_TO_VM"]:
            raise CredentialError("no managed identity answers on this host: IDENTITY_ENDPOINT is not set and "
                                  "the Azure VM endpoint (IMDS) does not answer", "entra", IDENTITY_FIX) from None
        if problem or isinstance(exc, msal.exceptions.MsalServiceError):
            raise Retry(f"{type(exc).__name__}: {redact(str(exc), self.settings.secrets)}"[:300])
        raise UnreachableError(f"Entra ID at {self.settings.authority} failed: {type(exc).__name__}: "
                               f"{redact(str(exc), self.settings.secrets)}"[:500], "entra") from None

    def get(self) -> str:
        def attempt() -> str:
            try:
                if self.identity:
                    result = self.app.acquire_token_for_client(resource=self.scopes[0].removesuffix("/.default"))
                else:
                    result = self.app.acquire_token_for_client(scopes=self.scopes)
            except Exception as exc:  # MsalServiceError on 5xx, connection errors
                self.stats.calls += 1
                self._raise_or_retry(exc)
            if "access_token" in result:
                if result.get("token_source") != "cache":
                    self.stats.calls += 1  # MSAL answered from Entra, not from its cache
                return result["access_token"]
            self.stats.calls += 1
            error, description = result.get("error", "?"), str(result.get("error_description", ""))
            first_line = description.splitlines()[0] if description else ""
            if self.identity:
                raise CredentialError(f"the managed identity was refused a token for {self.scopes[0]}: {error}: "
                                      f"{first_line}", "entra", IDENTITY_FIX)
            if error in ENTRA_CREDENTIAL_ERRORS:
                codes = result.get("error_codes") if isinstance(result.get("error_codes"), list) else []
                which = next((ENTRA_CODES[c] for c in codes if c in ENTRA_CODES), "Entra app credentials")
                raise CredentialError(f"Entra rejected the {which}: {error}: {first_line}", "entra",
                                      FEDERATION_FIX if self.settings.client_assertion_file else "")
            raise Retry(f"{error}: {first_line}")

        return self.policy.run("Entra token request", attempt, service="entra", stats=self.stats, min_wait=1.0)

    def invalidate(self) -> None:
        if self.identity:
            self.app = self._identity_client()  # a fresh cache: the next get() asks the platform again
        else:
            self.app.remove_tokens_for_client()

    def owner(self) -> str:
        """The application id this credential acts as: the configured client id, else the token's (appid/azp)."""
        if self.settings.client_id and not self.identity:
            return self.settings.client_id
        claims = token_claims(self.get())
        return str(claims.get("appid") or claims.get("azp") or self.settings.client_id)


class KeyVault:
    """Secrets from Azure Key Vault over its REST API, read once at the start of a run.

    The token comes from the managed identity (graph_auth's, or the system-assigned one), or from
    the app credential when graph_auth has one that Key Vault does not itself hold.
    """

    def __init__(self, settings: Settings, policy: RetryPolicy):
        self.settings, self.policy = settings, policy
        host = urlsplit(settings.key_vault_url).hostname or ""
        resource = next((r for suffix, r in KEY_VAULT_RESOURCES.items() if host.endswith(suffix)),
                        "https://vault.azure.net")
        self.session = make_session(settings.user_agent, settings.proxies)
        app_credential = not settings.managed_identity and settings.has_defender_credentials and \
            "client_secret" not in settings.key_vault_names
        self.tokens = TokenProvider(settings, make_session(settings.user_agent, settings.proxies), policy,
                                    scope=f"{resource}/.default",
                                    identity=None if app_credential else settings.managed_identity or ("system", ""))

    def secret(self, name: str) -> str:
        import requests

        url = f"{self.settings.key_vault_url}/secrets/{name}"

        def attempt() -> str:
            headers = {"Authorization": f"Bearer {self.tokens.get()}"}
            try:
                response = self.session.get(url, params={"api-version": KEY_VAULT_API_VERSION}, headers=headers,
                                            timeout=self.settings.request_timeout)
            except requests.RequestException as exc:
                if transport_problem(exc) == "certificate":
                    raise certificate_error("keyvault", self.settings.key_vault_url, exc) from None
                raise Retry(type(exc).__name__) from None
            status = response.status_code
            if status == 429 or status >= 500:
                raise Retry(f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After")))
            if status in (401, 403):
                raise CredentialError(f"Key Vault {self.settings.key_vault_url} refused secret {name!r} (HTTP "
                                      f"{status}): grant the identity the 'Key Vault Secrets User' role on the "
                                      "vault (or an access policy allowing 'get' on secrets)", "keyvault")
            if status == 404:
                raise CredentialError(f"Key Vault {self.settings.key_vault_url} has no secret {name!r} (HTTP 404): "
                                      "check key_vault_secrets", "keyvault")
            try:
                value = response.json().get("value") if status == 200 else None
            except (ValueError, AttributeError):
                value = None
            if not isinstance(value, str) or not value:
                raise UnreachableError(f"Key Vault answered HTTP {status} without a secret value for {name!r}",
                                       "keyvault")
            return value

        return self.policy.run(f"Key Vault secret {name}", attempt, service="keyvault")


SECRET_FIELDS = {"misp_key": "misp_key", "client_secret": "client_secret", "otx_alienvault_api": "otx_key",
                 "sightings_misp_key": "sightings_misp_key"}


def read_key_vault(tenants: list[Settings], deadline: Deadline) -> list[Settings]:
    """Fill the secrets config.py keeps in Key Vault (key_vault_secrets), once for every tenant."""
    common = tenants[0].common  # the top level's identity reads the vault, for every tenant
    names = {name for t in (common, *tenants) for name in t.key_vault_names.values()}
    if not names:
        return tenants
    vault = KeyVault(common, common.retry_policy(deadline))
    values = {name: vault.secret(name) for name in sorted(names)}
    for name, value in values.items():
        if note := short_secret_note(f"Key Vault secret {name!r}", value):
            log.warning("%s", note)

    def filled(settings: Settings) -> Settings:
        return dataclasses.replace(settings, **{SECRET_FIELDS[key]: values[name]
                                                for key, name in settings.key_vault_names.items()})
    shared = filled(common) if tenants[0].shared else None
    return [dataclasses.replace(filled(t), shared=shared) for t in tenants]


# Documented per-endpoint limits: (calls, window seconds).
ENDPOINT_LIMITS: dict[str, tuple[tuple[int, float], ...]] = {
    "import": ((30, 60.0),),
    "list": ((100, 60.0), (1500, 3600.0)),
    "submit": ((100, 60.0), (1500, 3600.0)),
    "delete": ((100, 60.0), (1500, 3600.0)),
    "batch_delete": ((30, 60.0), (1500, 3600.0)),
    "alerts": ((100, 60.0), (1500, 3600.0)),
}
WRITE_ENDPOINTS = ("import", "submit", "delete", "batch_delete")
PERMISSION_FIX = ("in Entra, API permissions → APIs my organization uses → WindowsDefenderATP → Application "
                  "permission {}, then 'Grant admin consent'")
# The application roles that let an app write indicators (.All: every indicator; without: its own).
WRITE_ROLES = ("Ti.ReadWrite.All", "Ti.ReadWrite")
LIST_PAGE = 10000


class Decoder:
    """The one thread that parses listing pages, whichever tenant they are for. A daemon: a run
    stopped by a signal at any line never waits for it at exit."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="decoder", daemon=True).start()

    def _work(self) -> None:
        while True:
            future, function, args = self.jobs.get()
            try:
                future.set_result(function(*args))
            except BaseException as exc:  # the caller gets it from result()
                future.set_exception(exc)

    def submit(self, function: Callable[..., T], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((future, function, args))
        return future


@functools.cache
def decoder() -> Decoder:
    return Decoder()


def decode_page(endpoint: str, response: Any, convert: Callable[[dict], Any] | None) -> tuple[list, Any, int]:
    """A listing page's items (converted), its nextLink and its length; DefenderError for another shape."""
    try:
        body = response.json()
    except ValueError:
        body = None
    page = body.get("value") if isinstance(body, dict) else None
    if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
        raise DefenderError(f"Defender {endpoint}: the answer is {shape_of(body)}, not a list of items")
    return (page if convert is None else list(map(convert, page))), body.get("@odata.nextLink"), len(page)


ALERT_PAGE = 1000  # alerts carry their evidence: smaller pages than the documented 10,000
BATCH_LIMIT = 500


class RateLimiter:
    """Sliding-window limits for one endpoint; also holds a not-before time set by Retry-After."""

    def __init__(self, name: str, limits: Iterable[tuple[int, float]], *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 check: Callable[[float], None] | None = None):
        # A small margin: the server counts arrival times, which trail our send times.
        self.name = name
        self.check = check  # may refuse a wait (RetryPolicy.check_wait): raises instead of sleeping
        self.limits = [(count, window * 1.02 + 0.05) for count, window in limits]
        self.sent = [deque() for _ in self.limits]
        self.not_before = 0.0
        self.clock, self.sleep = clock, sleep
        self.waited = 0.0
        self.lock = threading.Lock()

    def defer(self, seconds: float) -> None:
        self.not_before = max(self.not_before, self.clock() + seconds)

    def acquire(self) -> None:
        with self.lock:
            while True:
                now = self.clock()
                wait = self.not_before - now
                for (count, window), sent in zip(self.limits, self.sent, strict=True):
                    while sent and sent[0] <= now - window:
                        sent.popleft()
                    if len(sent) >= count:
                        wait = max(wait, sent[0] + window - now)
                if wait <= 0:
                    break
                if self.check is not None:
                    self.check(wait)
                log.info("Defender %s quota: waiting %.1f s", self.name, wait)
                self.waited += wait
                if PROGRESS.on:
                    PROGRESS.wait(wait, f"Defender {self.name} quota", self.sleep)
                else:
                    self.sleep(wait)
            for sent in self.sent:
                sent.append(now)


def build_limiters(quota_requests: int, time_scale: float = 1.0, **kwargs: Any) -> dict[str, RateLimiter]:
    """One limiter per endpoint; ``quota_requests`` per minute applies on top (the stricter wins)."""
    limiters = {}
    for name, limits in ENDPOINT_LIMITS.items():
        combined = [*limits, (quota_requests, 60.0)]
        limiters[name] = RateLimiter(name, [(n, w * time_scale) for n, w in combined], **kwargs)
    return limiters


class DefenderClient:
    """Defender's Indicators API: HTTP, tokens, quotas and retries. Knows nothing about MISP."""

    def __init__(self, settings: Settings, policy: RetryPolicy, *, time_scale: float = 1.0, json_log: Any = None):
        self.settings, self.policy = settings, policy
        self.session = make_session(settings.user_agent, settings.proxies)
        self.tokens = TokenProvider(settings, make_session(settings.user_agent, settings.proxies), policy)
        self.limiters = build_limiters(settings.quota_requests, time_scale)
        for name, limiter in self.limiters.items():
            limiter.check = functools.partial(policy.check_wait, f"Defender {name} quota", service="defender")
        self.stats: dict[str, EndpointStats] = {name: EndpointStats() for name in ENDPOINT_LIMITS}
        self.stopped: dict[str, str] = {}  # endpoints whose remaining work is left for the next run
        self.json_log = json_log

    def _call(self, endpoint: str, method: str, url: str, **kwargs: Any) -> Any:
        """Send one call under its quota and the retry policy; re-authenticate once on a 401.

        An endpoint that asked for a wait the run must not make (longer than max_retry_wait, or
        past max_run_seconds) is not called again in this run: its work is left for the next.
        """
        import requests

        if endpoint in self.stopped:
            raise DefenderError(self.stopped[endpoint])
        stats, limiter = self.stats[endpoint], self.limiters[endpoint]

        def attempt() -> Any:
            for renewed in (False, True):
                limiter.acquire()
                headers = {"Authorization": f"Bearer {self.tokens.get()}"}
                stats.calls += 1
                try:
                    response = self.session.request(method, url, headers=headers,
                                                    timeout=self.settings.request_timeout, **kwargs)
                except requests.RequestException as exc:
                    if transport_problem(exc) == "certificate":
                        raise certificate_error("defender", self.settings.api_url, exc) from None
                    stats.unrefused += 1  # the answer was lost, not the request
                    raise Retry(type(exc).__name__) from None
                if not 400 <= response.status_code < 500:
                    stats.unrefused += 1
                self._log_response(method, url, response)
                if response.status_code == 401 and not renewed:
                    log.info("Defender answered 401: getting a new token and retrying once")
                    self.tokens.invalidate()
                    continue
                break
            status = response.status_code
            if status == 429:
                stats.throttled += 1
                raise Retry("429 Too Many Requests", parse_retry_after(response.headers.get("Retry-After")))
            if status >= 500:
                raise Retry(f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After")))
            return response

        try:
            return self.policy.run(f"Defender {endpoint}", attempt, fail=DefenderError, service="defender",
                                   stats=stats, wait_with=limiter.defer)
        except StoppedWaiting as exc:
            self.stopped[endpoint] = str(exc)
            log.error("%s", exc)
            raise DefenderError(str(exc)) from None

    def _log_response(self, method: str, url: str, response: Any) -> None:
        if self.json_log is None:
            return
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = response.text[:2000]
        self.json_log({"time": format_time(time.time()), "method": method, "url": url,
                       "status": response.status_code, "body": body})

    @staticmethod
    def _error_text(response: Any) -> str:
        try:
            error = response.json().get("error", {})
            return f"{error.get('code', response.status_code)}: {error.get('message', '')}".strip()
        except (ValueError, AttributeError):
            return f"HTTP {response.status_code}"

    def _raise_for_status(self, endpoint: str, response: Any) -> None:
        if response.status_code < 400:
            return
        detail = self._error_text(response)
        if response.status_code in (401, 403):
            permission = "Alert.Read.All" if endpoint == "alerts" else "Ti.ReadWrite.All"
            raise CredentialError(
                f"Defender refused {endpoint} ({detail}). Grant the Entra app the WindowsDefenderATP "
                f"application permission {permission} and an admin consent", "defender",
                PERMISSION_FIX.format(permission))
        raise DefenderError(f"Defender {endpoint} answered {response.status_code}: {detail}")

    def list_indicators(self, page_size: int = LIST_PAGE, limit: int | None = None,
                        convert: Callable[[dict], Any] | None = None) -> list:
        """Every active indicator (each passed through ``convert`` as its page arrives, when given)."""
        return self._pages("list", f"{self.settings.api_url}/api/indicators", {}, page_size, limit, convert)

    def list_alerts(self, since: str, page_size: int = ALERT_PAGE, limit: int | None = None) -> list[dict]:
        """Alerts updated since ``since`` (ISO time), with their evidence (Alerts API, Alert.Read.All)."""
        return self._pages("alerts", f"{self.settings.api_url}/api/alerts",
                           {"$filter": f"lastUpdateTime ge {since}", "$expand": "evidence"}, page_size, limit)

    def _pages(self, endpoint: str, url: str, query: dict[str, Any], page_size: int, limit: int | None,
               convert: Callable[[dict], Any] | None = None) -> list:
        """$top/$skip until a short page; follow @odata.nextLink if one is ever given. Each page is checked.

        Tenants list in parallel, but every page is decoded in one thread (``decoder``): a page of
        10,000 indicators takes tens of MiB while it is parsed, and memory parsed in several threads
        stays in several allocator arenas (the parsing holds the GIL anyway).
        """
        params: dict[str, Any] | None = {**query, "$top": page_size, "$skip": 0}
        items: list = []
        while True:
            response = self._call(endpoint, "GET", url, params=params)
            self._raise_for_status(endpoint, response)
            page, next_link, count = decoder().submit(decode_page, endpoint, response, convert).result()
            del response
            items.extend(page)
            if limit is not None and len(items) >= limit:
                return items[:limit]
            if isinstance(next_link, str) and next_link:
                url, params = next_link, None
            elif count < page_size:
                return items
            else:
                params = {**query, "$top": page_size, "$skip": len(items)}

    def import_batch(self, items: list[dict]) -> list[dict]:
        """Import ≤ 500 items; Defender answers per item (isFailed, failureReason)."""
        assert len(items) <= BATCH_LIMIT
        response = self._call("import", "POST", f"{self.settings.api_url}/api/indicators/import",
                              json={"Indicators": items})
        self._raise_for_status("import", response)
        return response.json().get("value", [])

    def batch_delete(self, ids: list[str]) -> int:
        """BatchDelete ≤ 500 ids; returns the HTTP status (204 all deleted, 404 some not found)."""
        assert len(ids) <= BATCH_LIMIT
        response = self._call("batch_delete", "POST", f"{self.settings.api_url}/api/indicators/BatchDelete",
                              json={"IndicatorIds": ids})
        if response.status_code == 404:
            return 404
        self._raise_for_status("batch_delete", response)
        return response.status_code


class OtxClient:
    """AlienVault OTX lookups over plain requests, concurrent and cached for one run.

    An OTX error never stops a run: the indicator is pushed and the error counted.
    """

    SECTIONS = {"IpAddress": None, "DomainName": "domain", "Url": "url",
                "FileMd5": "file", "FileSha1": "file", "FileSha256": "file"}

    def __init__(self, settings: Settings, policy: RetryPolicy):
        import requests.adapters

        # One retry per lookup at most: OTX is advice, and thousands of lookups must stay quick.
        self.settings, self.policy = settings, dataclasses.replace(policy, max_retries=min(policy.max_retries, 1))
        self.session = make_session(settings.user_agent, settings.proxies)
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=settings.otx_max_workers)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.cache: dict[tuple[str, str], bool | None] = {}
        self.lock = threading.Lock()
        self.stats = EndpointStats()
        self.last_error = ""  # what the last failed lookup said (a bad certificate fails them all)

    def _path(self, indicator_type: str, value: str) -> str | None:
        from urllib.parse import quote

        section = self.SECTIONS.get(indicator_type)
        if indicator_type == "IpAddress":
            section = "IPv6" if ":" in value else "IPv4"
        if section is None:
            return None
        return f"{self.settings.otx_url}/api/v1/indicators/{section}/{quote(value, safe='')}/general"

    def lookup(self, indicator_type: str, value: str) -> bool | None:
        """True if OTX knows the value (in at least one pulse), False if not, None on error."""
        path = self._path(indicator_type, value)
        if path is None:
            return False
        import requests

        def attempt() -> bool:
            self.stats.calls += 1
            try:
                response = self.session.get(path, headers={"X-OTX-API-KEY": self.settings.otx_key},
                                            timeout=min(self.settings.request_timeout, 30))
            except requests.RequestException as exc:
                if transport_problem(exc) == "certificate":
                    raise certificate_error("otx", self.settings.otx_url, exc) from None
                raise Retry(type(exc).__name__) from None
            if response.status_code == 404:
                return False
            if response.status_code == 429 or response.status_code >= 500:
                raise Retry(f"HTTP {response.status_code}", parse_retry_after(response.headers.get("Retry-After")))
            if response.status_code != 200:
                raise UnreachableError(f"HTTP {response.status_code}", "otx")
            info = response.json().get("pulse_info") if isinstance(response.json(), dict) else None
            count = info.get("count") if isinstance(info, dict) else None
            if not isinstance(count, int):
                raise AnswerError("the answer carries no pulse count", "otx")
            return count > 0

        try:
            return self.policy.run(f"OTX lookup of {value}", attempt, service="otx", stats=self.stats, quiet=True)
        except (Misp2DefenderError, ValueError) as exc:
            log.debug("OTX lookup of %s failed: %s", value, exc)
            self.last_error = str(exc)
            return None

    def known(self, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Of these keys, the ones OTX knows; an error counts as unknown. Tenants share the answers."""
        keys = list(dict.fromkeys(keys))
        with self.lock:  # one tenant at a time: a value several tenants want is looked up once
            todo = [k for k in keys if k not in self.cache]
            with concurrent.futures.ThreadPoolExecutor(max_workers=self.settings.otx_max_workers) as pool:
                for key, answer in zip(todo, pool.map(lambda k: self.lookup(*k), todo), strict=True):
                    self.cache[key] = answer
            return {k for k in keys if self.cache[k]}

    def errors_for(self, keys: Iterable[tuple[str, str]]) -> int:
        """How many of these keys OTX could not answer for."""
        return sum(1 for k in keys if k in self.cache and self.cache[k] is None)

    def check_key(self) -> Misp2DefenderError | None:
        """None when the key works, else what is wrong (for --check)."""
        try:
            response = self.session.get(self._path("IpAddress", "8.8.8.8"),
                                        headers={"X-OTX-API-KEY": self.settings.otx_key},
                                        timeout=self.settings.request_timeout)
        except Exception as exc:
            if transport_problem(exc) == "certificate":
                return certificate_error("otx", self.settings.otx_url, exc)
            return UnreachableError(f"OTX unreachable at {self.settings.otx_url}: {type(exc).__name__}", "otx")
        if response.status_code in (401, 403):
            return CredentialError("OTX rejected the API key (otx_alienvault_api)", "otx")
        if response.status_code in (200, 404):
            return None
        return UnreachableError(f"OTX answered HTTP {response.status_code}", "otx")


# ###########################################################################################
# Planning: desired against existing, with reasons (pure)
# ###########################################################################################

@dataclass(frozen=True, slots=True)
class Existing:
    """An indicator Defender holds, reduced to what planning compares."""

    id: str
    indicator_type: str
    value: str
    action: str
    severity: str
    title: str
    expiration: float | None
    owned: bool
    # None: Defender's answer did not carry the field, so it is not compared.
    generate_alert: bool | None = None
    recommended_actions: str | None = None
    rbac_groups: tuple[str, ...] | None = None
    event_uuid: str = ""  # the MISP event an indicator of ours came from (its description says)
    key: tuple[str, str] = field(init=False, repr=False, compare=False)  # planning asks for it often

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.indicator_type, self.value))


# indicator_json's description: "MISP event <id> (<uuid>), attribute ..."
_FROM_EVENT = re.compile(r"MISP event \S+ \(([0-9a-fA-F-]{36})\)")


def existing_from_api(item: dict, client_id: str, application: str, now: float) -> Existing | None:
    """Defender's JSON → Existing; None for expired items (they no longer count or protect)."""
    indicator_type = item.get("indicatorType")
    if indicator_type not in INDICATOR_TYPES or not isinstance(item.get("indicatorValue"), str):
        return None
    expiration = parse_time(item.get("expirationTime"))
    if expiration is not None and expiration <= now:
        return None
    owned = item.get("createdBy") == client_id and item.get("application") == application
    origin = _FROM_EVENT.match(item["description"]) if owned and isinstance(item.get("description"), str) else None
    return Existing(id=str(item.get("id")), indicator_type=indicator_type,
                    value=normalise_existing(indicator_type, item["indicatorValue"]),
                    action=str(item.get("action") or ""), severity=str(item.get("severity") or ""),
                    title=str(item.get("title") or ""), expiration=expiration,
                    owned=owned, event_uuid=origin.group(1).lower() if origin else "",
                    generate_alert=item.get("generateAlert") if isinstance(item.get("generateAlert"), bool) else None,
                    recommended_actions=item.get("recommendedActions") if isinstance(
                        item.get("recommendedActions"), str) else None,
                    rbac_groups=tuple(sorted(map(str, item["rbacGroupNames"])))
                    if isinstance(item.get("rbacGroupNames"), list) else None)


@dataclass(frozen=True, slots=True)
class Change:
    candidate: Candidate
    reason: str
    replaces: str = ""  # the id of an indicator this one supersedes (action change)


@dataclass(frozen=True, slots=True)
class Deletion:
    id: str
    indicator_type: str
    value: str
    reason: str


@dataclass
class Plan:
    """What a run will do, and why. A value: print it, serialise it, compare it in tests."""

    creates: list[Change] = field(default_factory=list)
    updates: list[Change] = field(default_factory=list)
    deletes: list[Deletion] = field(default_factory=list)
    replaced: list[Deletion] = field(default_factory=list)  # deleted after their successor lands
    replaced_first: list[Deletion] = field(default_factory=list)  # no room: deleted before their successor
    keeps: Counter = field(default_factory=Counter)
    waiting: list[Change] = field(default_factory=list)  # left out by the cap, best first: the next in line
    evicted: int = 0  # left out by the cap while MISP was read (only the best EVICTED_LISTED are kept)
    evicted_sample: list[Candidate] = field(default_factory=list)
    deletes_withheld: str = ""
    owned: int = 0
    foreign: int = 0
    room: int = 0

    @property
    def writes(self) -> list[Change]:
        return self.creates + self.updates

    @property
    def left_out_count(self) -> int:
        return self.evicted + len(self.waiting)

    @property
    def left_out(self) -> list[Candidate]:
        """What the cap left out, best first: the ones in line, then the best of those dropped while reading."""
        return [c.candidate for c in self.waiting] + self.evicted_sample

    def summary(self) -> dict[str, int]:
        return {"create": len(self.creates), "update": len(self.updates),
                "delete": len(self.deletes) + len(self.replaced) + len(self.replaced_first),
                "keep": sum(self.keeps.values()), "left_out": self.left_out_count}


def update_reason(candidate: Candidate, existing: Existing, settings: Settings, now: float) -> str:
    """Why an owned indicator must be rewritten, or "" when users would notice no difference.

    Expiry: only when the desired expiry is later by more than half the configured lifetime, so
    the hours of drift that ``current_date`` adds every run never cause a write, and an expiry
    that an earlier run set later is never shortened. Settings that apply to every indicator
    (alerts, recommended actions, device groups) are compared when Defender reports them.
    """
    if candidate.severity != existing.severity:
        return f"severity {existing.severity or 'unset'} → {candidate.severity}"
    if candidate.title != existing.title:
        return "title changed"
    if existing.generate_alert is not None and existing.generate_alert != candidate.generate_alert:
        return f"generateAlert → {candidate.generate_alert}"
    if existing.recommended_actions is not None and existing.recommended_actions != settings.recommended_actions:
        return "recommended actions changed"
    if existing.rbac_groups is not None and existing.rbac_groups != tuple(sorted(settings.rbac_group_names)):
        return "device groups changed"
    return expiry_reason(candidate, existing, now)


def expiry_reason(candidate: Candidate, existing: Existing, now: float) -> str:
    """Whether the expiry must move: only later, and only by more than half the lifetime."""
    if existing.expiration is not None:
        if candidate.expiration is None:
            return "expiry removed"
        threshold = max(candidate.lifetime_days * 86400.0 / 2, 3600.0)
        if candidate.expiration - existing.expiration > threshold:
            remaining = (existing.expiration - now) / 86400.0
            return f"expiry refresh ({remaining:.1f} days left)"
    return ""


def upsert_key(indicator_type: str, value: str, action: str) -> tuple[str, str, str]:
    """What Defender's import matches an item on (the value case-insensitively; see docs/microsoft-assumptions.md)."""
    return (indicator_type, value.lower(), action)


def stale_keys(desired: Desired, existing: Iterable[Existing], full_sync: bool) -> list[tuple[str, str]]:
    """Owned keys a plan would delete as no longer wanted: each is confirmed with MISP first."""
    owned = {e.key for e in existing if e.owned}
    if full_sync:
        return sorted(key for key in owned if key not in desired.candidates)
    return sorted(key for key in owned if key in desired.retractions)


def plan(desired: Desired, existing: Iterable[Existing], settings: Settings, *,
         read_complete: bool, full_sync: bool, still_selected: frozenset = frozenset(),
         held: Mapping[tuple[str, str], Candidate | None] | None = None,
         whole_view: Mapping[tuple[str, str], Candidate | None] | None = None,
         force: bool = False, partial: bool = False, now: float | None = None) -> Plan:
    """Compare what MISP wants with what Defender holds. Pure: no HTTP, no PyMISP.

    ``still_selected``: stale keys that MISP, asked just before planning, says a selected
    attribute still carries; they are kept. ``held``: owned keys an event carries that is being
    edited (unpublished after it was published): they stay as Defender holds them, the last
    published form, with only their expiry refreshed, until the event is republished or deleted
    (keep_unpublished_edits); None for a value the edit took out of its event: kept exactly as it
    is. Nothing is ever written onto an indicator another application owns:
    Defender's import would overwrite it, since it matches on the upsert key (the value compared
    case-insensitively). ``partial``: MISP was read in part on purpose (--event): nothing is deleted.
    ``whole_view``: for owned values a time window or --event saw in part, the strongest candidate
    MISP's whole selection gives (None: MISP could not say, and the indicator stays as it is), so a
    change seen in one event never downgrades what another, unread event still asks for. After a
    partial read no action change is made either: it deletes the old indicator.
    """
    held, whole_view = held or {}, whole_view or {}
    now = time.time() if now is None else now
    result = Plan()
    owned: dict[tuple[str, str], list[Existing]] = {}
    foreign: set[tuple[str, str]] = set()  # (type, value lower-cased), as Defender's import matches them
    foreign_upserts: set[tuple[str, str, str]] = set()
    for item in existing:
        if item.owned:
            owned.setdefault(item.key, []).append(item)
            result.owned += 1
        else:
            foreign.add((item.indicator_type, item.value.lower()))
            foreign_upserts.add(upsert_key(item.indicator_type, item.value, item.action))
            result.foreign += 1

    for key, candidate in desired.candidates.items():
        mine = owned.get(key, [])
        if mine and key in held:
            _keep_as_published(result, held[key], mine, foreign_upserts, now)
            continue
        if not mine:
            if (key[0], key[1].lower()) in foreign:
                result.keeps["held by another application"] += 1
            else:
                result.creates.append(Change(candidate, "new in MISP"))
            continue
        if not settings.check_existing:
            result.keeps["check_if_already_in_defender is False: not compared"] += 1
            continue
        if key in whole_view:
            confirmed = whole_view[key]
            if confirmed is None:
                result.keeps["MISP could not confirm the change: kept as is"] += 1
                continue
            candidate = stronger(candidate, confirmed)
        same_action = [e for e in mine if e.action == candidate.action]
        if upsert_key(*key, candidate.action) in foreign_upserts:
            # The write would land on another application's indicator: ours stays as it is.
            result.keeps[f"another application holds {candidate.action} for this value; ours kept as is"] += 1
            extras = [e for e in mine if e is not same_action[0]] if same_action else mine[1:]
        elif same_action:
            keep = same_action[0]
            reason = update_reason(candidate, keep, settings, now)
            if not reason and full_sync and read_complete and keep.event_uuid \
                    and candidate.event_uuid.lower() != keep.event_uuid:
                # The description names the event a held value is kept for while that event is being
                # edited: a whole read says which event gives the value now.
                reason = "now from another event"
            if reason:
                result.updates.append(Change(candidate, reason))
            else:
                result.keeps["unchanged"] += 1
            extras = [e for e in mine if e is not keep]
        elif not read_complete:
            result.keeps["action change withheld: MISP was read only in part"] += 1
            extras = mine[1:]
        else:
            # Defender may key indicators on the action: create the new one first, then delete the
            # old, so that the value is never unprotected and never held twice.
            result.creates.append(Change(candidate, f"action {mine[0].action} → {candidate.action}",
                                         replaces=mine[0].id))
            result.replaced.append(Deletion(mine[0].id, *key, f"replaced by action {candidate.action}"))
            extras = mine[1:]
        result.deletes.extend(Deletion(e.id, *key, "duplicate of an owned indicator") for e in extras)

    for key in [] if partial or not settings.check_existing else stale_keys(desired, existing, full_sync):
        if key in still_selected:
            result.keeps["still carried by a selected MISP attribute"] += 1
            continue
        if key in held:
            _keep_as_published(result, held[key], owned[key], foreign_upserts, now)
            continue
        reason = "not selected in MISP any more" if full_sync else f"retracted: {desired.retractions[key]}"
        result.deletes.extend(Deletion(e.id, *key, reason) for e in owned[key])

    _guard_deletes(result, settings, read_complete=read_complete, force=force)
    _apply_cap(result, desired, settings)  # after the guard: withheld deletes free no room
    return result


EDITED = "its event is being edited in MISP (unpublished): kept as last published"


def _keep_as_published(result: Plan, candidate: Candidate | None, mine: list[Existing],
                       foreign_upserts: set[tuple[str, str, str]], now: float) -> None:
    """An owned value of an event under edit: keep it as it is; refresh only its expiry (None: the
    edit took the value out of its event, and nothing in MISP says how it was published)."""
    if candidate is None:
        result.keeps[EDITED] += 1
        return
    keep = next((e for e in mine if e.action == candidate.action), mine[0])
    reason = expiry_reason(candidate, keep, now) if keep.action == candidate.action else ""
    if reason and upsert_key(candidate.indicator_type, candidate.value, candidate.action) not in foreign_upserts:
        as_published = dataclasses.replace(candidate, title=keep.title, severity=keep.severity, priority=None)
        result.updates.append(Change(as_published, f"{reason}; {EDITED}"))
    else:
        result.keeps[EDITED] += 1
    result.deletes.extend(Deletion(e.id, *candidate.key, "duplicate of an owned indicator")
                          for e in mine if e is not keep)


def changed_by_events(the_plan: Plan, existing: Iterable[Existing]) -> list[tuple[str, str]]:
    """The owned keys whose action, severity or title the plan changes: what MISP's events decide
    (an expiry refresh only extends, and settings-wide fields come from config.py)."""
    held = {(e.key, e.action): e for e in existing if e.owned}
    return [c.candidate.key for c in the_plan.creates if c.replaces] + [
        c.candidate.key for c in the_plan.updates
        if (e := held.get((c.candidate.key, c.candidate.action))) is None
        or (c.candidate.severity, c.candidate.title) != (e.severity, e.title)]


def _apply_cap(result: Plan, desired: Desired, settings: Settings) -> None:
    """Room = the cap minus active foreign indicators; what does not fit waits, best first.

    Replacements (action changes) come first: each needs a slot while its old indicator still
    counts. Those with no slot delete their old indicator first (a short gap in protection, but
    the change lands). New values get what is left, by ``cap_priority``.
    """
    result.room = settings.max_indicators - result.foreign
    staying = result.owned - len(result.deletes)  # replaced ones still count until their successor lands
    free = max(result.room - staying, 0)
    replacements = sorted((c for c in result.creates if c.replaces), key=lambda c: cap_priority(c.candidate),
                          reverse=True)
    new = sorted((c for c in result.creates if not c.replaces), key=lambda c: cap_priority(c.candidate),
                 reverse=True)
    without_slot = {c.replaces for c in replacements[free:]}
    result.replaced_first = [d for d in result.replaced if d.id in without_slot]
    result.replaced = [d for d in result.replaced if d.id not in without_slot]
    free = max(free - len(replacements), 0)
    result.creates = replacements + new[:free]
    result.waiting = new[free:]
    result.evicted = desired.evicted
    result.evicted_sample = sorted(desired.evicted_sample, key=cap_priority, reverse=True)


def _guard_deletes(result: Plan, settings: Settings, *, read_complete: bool, force: bool) -> None:
    """No deletes after a partial MISP read; none above the mass-delete guard unless forced."""
    if not result.deletes:
        return
    if not read_complete:
        result.deletes_withheld = (f"MISP was read only in part: {len(result.deletes)} deletes withheld "
                                   "so nothing is removed by mistake")
    elif not force and result.owned:
        share = 100.0 * len(result.deletes) / result.owned
        if share > settings.remove_guard_percent:
            result.deletes_withheld = (
                f"the plan would delete {len(result.deletes)} of {result.owned} owned indicators "
                f"({share:.0f}% > remove_guard_percent {settings.remove_guard_percent:g}%); "
                "check the MISP filters, then rerun with --force to proceed")
    if result.deletes_withheld:
        result.deletes = []


def exclude_known(result: Plan, known: set[tuple[str, str]]) -> int:
    """Drop new creates whose value OTX already knows; the next in line take their slots. Count them."""
    dropped = [c for c in result.creates if not c.replaces and c.candidate.key in known]
    if not dropped:
        return 0
    result.creates = [c for c in result.creates if c.replaces or c.candidate.key not in known]
    waiting = [c for c in result.waiting if c.candidate.key not in known]  # known values are skipped, not left out
    removed_waiting = len(result.waiting) - len(waiting)
    result.creates += waiting[:len(dropped)]
    result.waiting = waiting[len(dropped):]
    return len(dropped) + removed_waiting


# ###########################################################################################
# Applying and reporting
# ###########################################################################################

@dataclass
class SightingCounts:
    alerts_read: int = 0
    matched: int = 0
    added: int = 0
    false_positive: int = 0
    already_present: int = 0
    failed: int = 0
    evidence_skipped: int = 0


@dataclass
class Report:
    """What happened; the exit code is derived from it, here and nowhere else.

    With several tenants each has a Report of its own in ``tenants`` and the run's Report holds
    the totals (``add_up``); without tenants the run's Report is the one tenant's.
    """

    name: str = ""
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    dry_run: bool = False
    full_sync: bool = False
    events: int = 0
    attributes: int = 0
    values: int = 0  # what mapping made of the attributes: candidates + duplicates + rejected + skipped
    candidates: int = 0
    duplicates: int = 0
    rejected: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    created: int = 0
    updated: int = 0
    deleted: int = 0
    deleted_by_reason: Counter = field(default_factory=Counter)
    kept: int = 0
    kept_by_reason: Counter = field(default_factory=Counter)
    left_out: int = 0
    failed: list[dict] = field(default_factory=list)
    rejected_items: list[dict] = field(default_factory=list)
    left_out_items: list[dict] = field(default_factory=list)
    misp_error: str = ""
    deletes_withheld: str = ""
    fatal: str = ""
    api: dict[str, EndpointStats] = field(default_factory=dict)
    fatal_code: int = EXIT_CANNOT_PROCEED
    otx_errors: int = 0
    helper_peak_rss_mib: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)  # plan_items(): what the plan would do, item by item
    error: Misp2DefenderError | None = field(default=None, repr=False)  # the fatal one, for its fix
    sightings: SightingCounts | None = None  # None: the sightings pass did not run
    sightings_error: str = ""
    tenants: dict[str, Report] = field(default_factory=dict)
    reads: list[tuple[int, int]] = field(default_factory=list)  # (events, attributes) of each MISP read
    secrets: list[str] = field(default_factory=list, repr=False)

    def tenant(self, name: str) -> Report:
        self.tenants[name] = Report(name=name, started=self.started, dry_run=self.dry_run, full_sync=self.full_sync)
        return self.tenants[name]

    def add_up(self) -> None:
        """The run's totals over its tenants: MISP's counts once per read, Defender's summed."""
        parts = list(self.tenants.values())
        self.events = sum(events for events, _ in self.reads)
        self.attributes = sum(attributes for _, attributes in self.reads)
        for name in ("candidates", "duplicates", "created", "updated", "deleted", "kept", "left_out", "otx_errors",
                     "values"):
            setattr(self, name, sum(getattr(p, name) for p in parts))
        for name in ("rejected", "skipped", "deleted_by_reason", "kept_by_reason"):
            setattr(self, name, sum((getattr(p, name) for p in parts), Counter()))
        self.failed = [{"tenant": p.name, **item} for p in parts for item in p.failed]
        self.left_out_items = [{"tenant": p.name, **item} for p in parts for item in p.left_out_items]
        self.misp_error = self.misp_error or next((p.misp_error for p in parts if p.misp_error), "")
        self.deletes_withheld = "; ".join(f"{p.name}: {p.deletes_withheld}" for p in parts if p.deletes_withheld)
        self.sightings_error = "; ".join(f"{p.name}: {p.sightings_error}" for p in parts if p.sightings_error)
        counted = [p.sightings for p in parts if p.sightings is not None]
        if counted:
            self.sightings = SightingCounts(**{f.name: sum(getattr(c, f.name) for c in counted)
                                               for f in dataclasses.fields(SightingCounts)})
        self.helper_peak_rss_mib = max([self.helper_peak_rss_mib, *(p.helper_peak_rss_mib for p in parts)])
        api: dict[str, EndpointStats] = {}
        for p in parts:
            for endpoint, stats in p.api.items():
                total = api.setdefault(endpoint, EndpointStats())
                for f in dataclasses.fields(EndpointStats):
                    setattr(total, f.name, getattr(total, f.name) + getattr(stats, f.name))
        self.api = api

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one stage of the run (the report and the log show where a slow run spent it)."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - started, 3)
            log.info("%s took %.2f s", name.replace("_", " "), self.phases[name])

    @property
    def wrote(self) -> bool:
        """Whether Defender may have changed: a write it did not refuse, even one whose answer never came."""
        sent = any(stats.unrefused for name, stats in self.api.items() if name in WRITE_ENDPOINTS)
        return bool(self.created or self.updated or self.deleted or sent
                    or any(t.wrote for t in self.tenants.values()))

    @property
    def exit_code(self) -> int:
        if self.fatal:
            # 2 promises "nothing changed": a run that fails after writing says 1.
            return EXIT_INCOMPLETE if self.fatal_code == EXIT_CANNOT_PROCEED and self.wrote else self.fatal_code
        if self.tenants:  # 2 only when no tenant could proceed; 0 only when every tenant holds its plan
            codes = {t.exit_code for t in self.tenants.values()}
            return codes.pop() if len(codes) == 1 and codes <= {EXIT_OK, EXIT_CANNOT_PROCEED} else EXIT_INCOMPLETE
        if self.failed or self.left_out or self.misp_error or self.deletes_withheld or self.sightings_error:
            return EXIT_INCOMPLETE
        if self.sightings is not None and self.sightings.failed:
            return EXIT_INCOMPLETE
        return EXIT_OK

    def summary_lines(self) -> list[str]:
        """One line per tenant (with its name), then the run's; or the one line of a run without tenants."""
        lines = [t.summary_line(f"misp2defender [{t.name}]") for t in self.tenants.values()]
        total = f"misp2defender: {len(self.tenants)} tenants" if self.tenants else "misp2defender"
        return [*lines, self.summary_line(total)]

    def summary_line(self, label: str = "misp2defender") -> str:
        rejected = ", ".join(f"{n} {reason}" for reason, n in self.rejected.most_common()) or "none"
        deleted = ", ".join(f"{n} {reason}" for reason, n in self.deleted_by_reason.most_common())
        calls = sum(s.calls for name, s in self.api.items() if name in ENDPOINT_LIMITS)  # Defender's own
        mode = " (dry run: nothing written)" if self.dry_run else ""
        problem = f", error: {self.fatal}" if self.fatal and self.name else ""
        if self.sightings is not None:
            problem = (f", sightings {self.sightings.added} added, {self.sightings.failed} failed" + problem
                       + (f", sightings error: {self.sightings_error}" if self.sightings_error else ""))
        skipped = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common(4))
        more = len(self.skipped) - 4
        skipped += f", {more} more reasons" if more > 0 else ""
        return (f"{label}: {self.events} events, {self.attributes} attributes ({self.values} values: "
                f"{self.candidates} candidates, {self.duplicates} duplicates, rejected {sum(self.rejected.values())} "
                f"[{rejected}], skipped {sum(self.skipped.values())} [{skipped or 'none'}]); "
                f"created {self.created}, updated {self.updated}, deleted {self.deleted}"
                f"{f' [{deleted}]' if deleted else ''}, "
                f"kept {self.kept}, left out {self.left_out}, failed {len(self.failed)}, "
                f"API calls {calls}, exit {self.exit_code}{mode}{problem}")

    def record_read(self, desired: Desired, status: MispReadStatus) -> None:
        self.helper_peak_rss_mib = status.helper_peak_rss_mib
        self.events, self.attributes, self.values = status.events, desired.attributes, desired.values
        self.candidates, self.duplicates = desired.distinct, desired.duplicates
        # Copies: tenants alike share one Desired, and each report counts its own OTX skips.
        self.rejected, self.skipped = Counter(desired.rejected), Counter(desired.skipped)
        self.rejected_items = list(desired.rejected_items)

    def record_plan(self, the_plan: Plan, settings: Settings) -> None:
        self.plan = plan_items(the_plan, settings.report_plan_limit)
        self.kept, self.left_out = sum(the_plan.keeps.values()), the_plan.left_out_count
        self.kept_by_reason = Counter(the_plan.keeps)
        self.left_out_items = [{"type": c.indicator_type, "value": c.value, "severity": c.severity,
                                "action": c.action, "event_id": c.event_id,
                                **({"score": round(c.score, 2)} if c.score >= 0 else {})} for c in the_plan.left_out]
        self.deletes_withheld = the_plan.deletes_withheld
        if the_plan.deletes_withheld:
            log.error("%s", the_plan.deletes_withheld)
        if the_plan.left_out_count:
            log.error("tenant cap: %d indicators left out (room %d of defender_max_indicators %d)",
                      the_plan.left_out_count, the_plan.room, settings.max_indicators)

    def table(self) -> str:
        """A short summary for a person at a terminal."""
        rows = [("created", self.created), ("updated", self.updated), ("deleted", self.deleted),
                ("kept", self.kept), ("rejected", sum(self.rejected.values())), ("left out", self.left_out),
                ("failed", len(self.failed))]
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {count:>7}" for name, count in rows]
        lines += [f"    rejected: {n} {reason}" for reason, n in self.rejected.most_common(5)]
        lines += [f"    failed: {item['type']} {item['value']}: {item['reason']}" for item in self.failed[:5]]
        return "\n".join(["", *lines])

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": __version__, "started": format_time(self.started), "finished": format_time(self.finished),
            "duration_seconds": round(self.finished - self.started, 3), "exit_code": self.exit_code,
            # The largest of this process and its helper reader, as /usr/bin/time -f %M reports it.
            "peak_rss_mib": round(max(peak_rss_mib(), self.helper_peak_rss_mib), 1),
            "helper_peak_rss_mib": round(self.helper_peak_rss_mib, 1),
            "dry_run": self.dry_run, "full_sync": self.full_sync,
            "counts": {"events": self.events, "attributes": self.attributes, "values": self.values,
                       "candidates": self.candidates, "skipped": sum(self.skipped.values()),
                       "duplicates": self.duplicates, "created": self.created, "updated": self.updated,
                       "deleted": self.deleted, "kept": self.kept, "left_out": self.left_out,
                       "failed": len(self.failed), "rejected": sum(self.rejected.values())},
            "rejected_by_reason": dict(self.rejected), "skipped_by_reason": dict(self.skipped),
            "deleted_by_reason": dict(self.deleted_by_reason), "kept_by_reason": dict(self.kept_by_reason),
            "failed": self.failed, "rejected_items": self.rejected_items, "left_out_items": self.left_out_items,
            "misp_error": self.misp_error, "deletes_withheld": self.deletes_withheld, "fatal": self.fatal,
            "otx_errors": self.otx_errors, "phase_seconds": self.phases,
            "plan": self.plan,
            "sightings": dataclasses.asdict(self.sightings) if self.sightings is not None else None,
            "sightings_error": self.sightings_error,
            "api": {name: dataclasses.asdict(s) for name, s in self.api.items()},
            **({"tenants": {name: t.as_dict() for name, t in self.tenants.items()}} if self.tenants else {}),
        }


def apply_plan(the_plan: Plan, client: DefenderClient, settings: Settings, report: Report) -> None:
    """Deletes first (they free room under the cap), then imports, then superseded indicators.

    No batch starts after max_run_seconds: what is left is reported and the next run does it.
    """
    deadline = client.policy.deadline
    _delete(the_plan.deletes + the_plan.replaced_first, client, report, deadline)
    landed_replacements: set[str] = set()
    updates = {id(change) for change in the_plan.updates}
    writes, sent = the_plan.writes, 0
    for batch in chunks(writes, settings.max_indicators_per_query):
        PROGRESS.show(f"Defender: {sent} of {len(writes)} indicators written", force=True)
        sent += len(batch)
        items = [indicator_json(change.candidate, settings) for change in batch]
        try:
            if deadline.passed:
                raise StoppedWaiting(f"not sent: max_run_seconds ({deadline.seconds:g} s) reached; "
                                     "left for the next run")
            results = client.import_batch(items)
        except (DefenderError, StoppedWaiting) as exc:
            report.failed.extend({"type": c.candidate.indicator_type, "value": c.candidate.value,
                                  "reason": str(exc)} for c in batch)
            log.error("%s; %d indicators not written (the next run retries them)", exc, len(batch))
            continue
        log.debug("import batch of %d sent (%d of %d)", len(batch), sent, len(writes))
        by_value = {str(r.get("indicator", "")).lower(): r for r in results if isinstance(r, dict)}
        for position, change in enumerate(batch):
            result = results[position] if position < len(results) and isinstance(results[position], dict) else None
            if result is None or str(result.get("indicator", "")).lower() != change.candidate.value.lower():
                result = by_value.get(change.candidate.value.lower())
            if result is None or result.get("isFailed") is not False:
                reason = (result or {}).get("failureReason") or "no result for this item"
                report.failed.append({"type": change.candidate.indicator_type, "value": change.candidate.value,
                                      "reason": str(reason)})
            elif id(change) in updates:
                report.updated += 1
            else:
                report.created += 1
                if change.replaces:
                    landed_replacements.add(change.replaces)
    _delete([d for d in the_plan.replaced if d.id in landed_replacements], client, report, deadline)


def _delete(deletions: list[Deletion], client: DefenderClient, report: Report, deadline: Deadline) -> None:
    for batch in chunks(deletions, BATCH_LIMIT):
        ids = [d.id for d in batch]
        try:
            if deadline.passed:
                raise StoppedWaiting(f"not sent: max_run_seconds ({deadline.seconds:g} s) reached; "
                                     "left for the next run")
            status = client.batch_delete(ids)
            if status == 404:
                # Some ids are gone already (expired, or deleted by hand): recheck, don't retry blindly.
                present = {str(i.get("id")) for i in client.list_indicators()}
                ids = [i for i in ids if i in present]
                status = client.batch_delete(ids) if ids else 204
            if status == 404:
                raise DefenderError("BatchDelete still answered 404 after a fresh listing")
            report.deleted += len(ids)
            gone = set(ids)
            report.deleted_by_reason.update(d.reason for d in batch if d.id in gone)
        except (DefenderError, StoppedWaiting) as exc:
            report.failed.extend({"type": d.indicator_type, "value": d.value, "reason": f"delete: {exc}"}
                                 for d in batch)
            log.error("%s", exc)


def format_plan(the_plan: Plan, report_limit: int, limit: int = 200) -> str:
    """The plan as a person reads it (the dry run prints this); its counts are the report's."""
    counts = the_plan.summary()
    lines = [f"Plan: {counts['create']} to create, {counts['update']} to update, {counts['delete']} to delete, "
             f"{counts['keep']} kept, {counts['left_out']} left out (Defender holds {the_plan.owned} of ours "
             f"and {the_plan.foreign} of others; room for {the_plan.room})"]

    def section(title: str, items: Sequence[T], row: Callable[[T], str], total: int | None = None) -> None:
        total = len(items) if total is None else total
        if not total:
            return
        lines.append(f"{title} ({total}):")
        lines.extend(f"  {row(item)}" for item in items[:limit])  # only the rows shown are written out
        if total > limit:
            listed = min(report_limit, len(items))  # what the report can list: every one, or the first
            more = "for all" if listed >= total else f"for the first {listed}" + (
                " (report_plan_limit)" if listed == report_limit else "")
            lines.append(f"  ... and {total - limit} more (use --report FILE {more})")

    def change(c: Change) -> str:
        return f"{describe(c.candidate)} — {c.reason}"

    def deletion(d: Deletion) -> str:
        return f"{d.indicator_type} {d.value} (id {d.id}) — {d.reason}"

    section("+ create", the_plan.creates, change)
    section("~ update", the_plan.updates, change)
    section("- delete", the_plan.deletes + the_plan.replaced, deletion)
    section("- delete first, no room to replace in place", the_plan.replaced_first, deletion)
    section("! left out (tenant cap), best first", the_plan.left_out, describe, the_plan.left_out_count)
    if the_plan.deletes_withheld:
        lines.append(f"! deletes withheld: {the_plan.deletes_withheld}")
    return "\n".join(lines)


def describe(c: Candidate) -> str:
    score = f", score {c.score:.1f}" if c.score >= 0 else ""
    return (f"{c.indicator_type} {c.value} [{c.action}, {c.severity}{score}, expires "
            f"{format_time(c.expiration) or 'never'}] event {c.event_id}")


def plan_items(the_plan: Plan, limit: int) -> dict[str, Any]:
    """The plan for --report: every create, update, delete and left-out value (up to ``limit`` each)."""
    def candidate(c: Candidate) -> dict[str, Any]:
        return {"type": c.indicator_type, "value": c.value, "action": c.action, "severity": c.severity,
                "expires": format_time(c.expiration), "event_id": c.event_id, "event_uuid": c.event_uuid,
                **({"score": round(c.score, 2)} if c.score >= 0 else {})}

    def deletion(d: Deletion) -> dict[str, Any]:
        return {"id": d.id, "type": d.indicator_type, "value": d.value, "reason": d.reason}

    deletes = the_plan.deletes + the_plan.replaced + the_plan.replaced_first
    counts = {"create": len(the_plan.creates), "update": len(the_plan.updates), "delete": len(deletes),
              "left_out": the_plan.left_out_count}
    # Only what is listed is built: a plan over the cap leaves out far more than any report lists.
    return {"counts": counts, "truncated": any(count > limit for count in counts.values())
            or the_plan.left_out_count > len(the_plan.left_out),
            "create": [{**candidate(c.candidate), "reason": c.reason, **({"replaces": c.replaces} if c.replaces
                                                                        else {})} for c in the_plan.creates[:limit]],
            "update": [{**candidate(c.candidate), "changed": c.reason} for c in the_plan.updates[:limit]],
            "delete": [deletion(d) for d in deletes[:limit]],
            "left_out": [{**candidate(c), "priority": n} for n, c in enumerate(the_plan.left_out[:limit], start=1)]}


# ###########################################################################################
# Sightings: Defender detections back to MISP
# ###########################################################################################

# Evidence fields of an alert and the indicator type their value is compared as.
EVIDENCE_FIELDS = {"sha1": "FileSha1", "sha256": "FileSha256", "ipAddress": "IpAddress", "url": "Url",
                   "domainName": "DomainName"}
SIGHTING, FALSE_POSITIVE = 0, 1  # MISP's sighting types (2, expiration, is never sent)
SOURCE_LENGTH = 255  # MISP's sightings.source column
SIGHTING_OVERLAP = 600.0  # seconds: alerts come in no set order; the last ten minutes are read again


@dataclass(frozen=True)
class Sighting:
    """One sighting to add: an owned value an alert's evidence carried."""

    alert_id: str
    indicator_type: str
    value: str
    kind: int  # SIGHTING or FALSE_POSITIVE
    timestamp: int
    source: str

    def describe(self) -> str:
        kind = "false positive" if self.kind == FALSE_POSITIVE else "sighting"
        return f"{kind} {self.indicator_type} {self.value} at {format_time(self.timestamp)} — {self.source}"


def _host_keys(host: str) -> list[tuple[str, str]]:
    """An evidence host as the keys it can hit: the IP, or the domain and every parent domain.

    A Defender domain indicator covers its subdomains, so www.evil.top hits an owned evil.top.
    """
    host = host.strip().strip("[]")
    if not host:
        return []
    try:
        return [("IpAddress", normalise_ip(host))]
    except Rejected:
        pass
    try:
        domain = normalise_domain(host)
    except Rejected:
        return []
    labels = domain.split(".")
    return [("DomainName", ".".join(labels[n:])) for n in range(len(labels) - 1)]


def evidence_keys(item: Any) -> list[tuple[str, str]] | None:
    """The keys one evidence item carries, normalised as mapping normalises MISP values; None if none.

    ``domainName`` on a User entity is the user's Active Directory domain, not a DNS name: skipped.
    """
    if not isinstance(item, dict):
        return None
    keys: list[tuple[str, str]] = []
    for name, indicator_type in EVIDENCE_FIELDS.items():
        value = item.get(name)
        if not isinstance(value, str) or not value.strip() or len(value) > 8192:
            continue
        if name == "domainName":
            if item.get("entityType") != "User":
                keys += _host_keys(value)
            continue
        if name == "url":  # with a scheme or without one (a network destination is often a bare host)
            text = value.strip()
            try:
                keys += _host_keys(urlsplit(text if "://" in text else "//" + text).hostname or "")
            except ValueError:  # "[evil", an odd port: no host to match; the value itself may still be a URL
                pass
        try:
            keys.append((indicator_type, NORMALISERS[indicator_type](value)))
        except Rejected:
            continue
    return keys or None


def candidate_sightings(alerts: Iterable[Any], owned: set[tuple[str, str]], settings: Settings, now: float,
                        counts: SightingCounts) -> list[Sighting]:
    """Every (alert, owned value) an alert's evidence carries, as the sighting it makes. Pure.

    Type 0 at the alert's first event time (never in the future); an alert classified FalsePositive
    makes a false-positive sighting instead (sightings_false_positive). Evidence items without a
    usable value are counted as skipped.
    """
    source = settings.sightings_source.strip() + (f" ({settings.name})" if settings.name else "")
    found: dict[tuple, Sighting] = {}
    for alert in alerts:
        counts.alerts_read += 1
        if not isinstance(alert, dict) or not isinstance(alert.get("id"), str | int):
            counts.evidence_skipped += 1
            continue
        evidence = alert.get("evidence") if isinstance(alert.get("evidence"), list) else []
        hits: set[tuple[str, str]] = set()
        for item in evidence:
            keys = evidence_keys(item)
            if keys is None:
                counts.evidence_skipped += 1
            else:
                hits.update(key for key in keys if key in owned)
        if not hits:
            continue
        when = parse_time(alert.get("firstEventTime")) or parse_time(alert.get("alertCreationTime")) or now
        kind = (FALSE_POSITIVE if settings.sightings_false_positive and alert.get("classification") == "FalsePositive"
                else SIGHTING)
        for indicator_type, value in sorted(hits):
            # MISP trims a sighting's source and keeps 255 characters: ours must come back as sent,
            # or the exactly-once check would never find it.
            suffix = f" alert {alert['id']}"
            sighting = Sighting(str(alert["id"]), indicator_type, value, kind, int(min(when, now)),
                                source[:max(0, SOURCE_LENGTH - len(suffix))].rstrip() + suffix)
            found[sighting.source, kind, indicator_type, value] = sighting
    counts.matched = len(found)
    return list(found.values())


class MispSightings:
    """Adds sightings with the sightings key, and asks MISP which ones it holds already.

    MISP does not de-duplicate sightings; its own record is the truth a re-run (or a run after a
    crash at any point) is checked against, so each (alert, value, type) is added exactly once.
    """

    def __init__(self, settings: Settings, policy: RetryPolicy):
        key = settings.sightings_misp_key or settings.misp_key
        self.source = MispSource(dataclasses.replace(settings, misp_key=key), policy, helper=True)

    def present(self, sightings: list[Sighting]) -> set[tuple[str, int, str]]:
        """(source, type, value as MISP spells it, lower-cased) of the sightings MISP holds for these alerts."""
        held: set[tuple[str, int, str]] = set()
        for batch in chunks(sorted({s.source for s in sightings}), 100):
            rows = self.source.direct("sightings/restSearch", "MISP sightings search", sightings_of_answer,
                                      {"source": batch, "last": 0, "returnFormat": "json"})
            for row in rows:
                value = str(row.get("value") or "").lower()
                held.update((str(row.get("source")), int(row.get("type") or 0), part) for part in value.split("|"))
        return held

    def add(self, sighting: Sighting) -> None:
        """One sighting on every selected attribute that holds the value, in any spelling MISP may hold."""
        body = {"values": sorted(misp_spellings(sighting.indicator_type, sighting.value)), "source": sighting.source,
                "type": sighting.kind, "timestamp": sighting.timestamp, "filters": {"to_ids": 1}}
        answer = self.source.direct("sightings/add", "MISP sightings add", lambda a: a, body, once=True)
        if not isinstance(answer, dict) or not isinstance(answer.get("Sighting"), dict):
            message = answer.get("message") if isinstance(answer, dict) else None
            raise AnswerError(f"MISP did not add the sighting: {message or shape_of(answer)}", "misp")


def sightings_of_answer(answer: Any) -> list[dict]:
    rows = answer if isinstance(answer, list) else None
    if rows is None or not all(isinstance(r, dict) and isinstance(r.get("Sighting"), dict) for r in rows):
        raise AnswerError(f"the answer is {shape_of(answer)}, not a list of sightings", "misp")
    return [r["Sighting"] for r in rows]


def already_in_misp(sighting: Sighting, held: set[tuple[str, int, str]]) -> bool:
    return any((sighting.source, sighting.kind, spelling.lower()) in held
               for spelling in misp_spellings(sighting.indicator_type, sighting.value))


def sightings_state_path(settings: Settings) -> Path:
    return Path(tenant_file(str(Path(settings.lock_file).with_name("misp2defender_sightings.json")), settings.name))


def sightings_since(settings: Settings, now: float) -> str:
    """Where this pass starts: the newest alert update already read, less the overlap, at most the lookback."""
    floor = now - settings.sightings_lookback_days * 86400.0
    try:
        state = json.loads(sightings_state_path(settings).read_text(encoding="utf-8"))
        newest = parse_time(state.get("newest_alert_update")) if isinstance(state, dict) else None
    except (OSError, ValueError):
        newest = None
    start = max(floor, min(newest, now) - SIGHTING_OVERLAP) if newest is not None else floor
    return format_time(start) or ""


# ###########################################################################################
# The run
# ###########################################################################################

def run(tenants: list[Settings], args: argparse.Namespace, report: Report, deadline: Deadline,
        close_in_helper: Iterable[int] = ()) -> None:
    """One sync for every tenant: read MISP once per selection, then plan and apply each tenant.

    Tenants whose misp_event_filters are equal share one read. Each tenant is listed, planned and
    applied in its own thread, with its own token, quotas and report: one tenant failing never stops
    or changes another's work. A config without tenants is the one tenant whose report is the run's.
    Then, with misp_sightings, each tenant's alerts become MISP sightings (alone: --sightings-only).
    """
    shared = tenants[0].common
    misp = MispSource(shared, shared.retry_policy(deadline))  # each read selects with its tenants' filters
    if shared.decay_model:
        model = misp.decaying_model(shared.decay_model)
        tenants = [dataclasses.replace(t, decay=model) for t in tenants]
    usual = {t.name: t for t in tenants}  # each tenant's own selection, which --event narrows for the read
    if args.event:  # just these events, whatever the time window (and, with --ignore-filters, the filters)
        tenants = [dataclasses.replace(t, misp_event_filters=event_filters(t, args)) for t in tenants]
    dry_run = args.dry_run or shared.dry_run
    report.dry_run, report.full_sync = dry_run, args.full_sync
    single = len(tenants) == 1 and not tenants[0].name
    runs = [TenantRun(t, report if single else report.tenant(t.name), deadline, usual[t.name]) for t in tenants]
    misp_lock = threading.Lock()  # PyMISP's session is not shared between threads
    being_edited = EditedEvents()
    otx = OtxClient(shared, shared.retry_policy(deadline)) if shared.exclude_if_in_alienvault else None
    sightings = sightings_writer(shared, deadline, runs) if shared.misp_sightings else None
    workers = min(shared.max_parallel_tenants, len(runs))
    try:
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="tenant") as listing, \
                concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="tenant") as finishing:
            finished = []
            if args.sightings_only:
                finished = [finishing.submit(in_tenant, r, r.prepare) for r in runs]
            else:
                for group in selection_groups(runs):
                    seen = read_selection(misp, group, args, report, listing, close_in_helper, single)
                    missing = [e for e in args.event if e.lower() not in seen]
                    for r in group:
                        if missing and r.desired is not None:
                            r.status.fail(f"event not found in MISP (or not selected by the filters): "
                                          f"{', '.join(missing)}")
                    finished += [finishing.submit(in_tenant, r, r.finish, misp, misp_lock, being_edited, otx, args,
                                                  dry_run)
                                 for r in group if r.desired is not None]
            for future in finished:
                future.result()
            if sightings is not None:
                for future in [finishing.submit(in_tenant, r, r.sightings, sightings, misp_lock, dry_run)
                               for r in runs if not r.report.fatal]:
                    future.result()
    finally:
        for r in runs:
            r.close()
    if dry_run:
        PROGRESS.clear()  # the plan starts on a clean line
        for r in runs:
            if r.plan_text:
                print(redact(r.plan_text if single else f"== tenant {r.settings.name} ==\n{r.plan_text}",
                             report.secrets))
    if not single:
        report.add_up()


def event_filters(tenant: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """--event: the tenant's filters without a time window (none with --ignore-filters), for these events."""
    kept = {} if args.ignore_filters else selection_filters(tenant.misp_event_filters, full_sync=True)
    return {**kept, "eventid": list(args.event)}


def sightings_writer(shared: Settings, deadline: Deadline, runs: list[TenantRun]) -> MispSightings | None:
    """The MISP connection sightings are added with; when it cannot be had, every tenant's pass says why."""
    try:
        return MispSightings(shared, shared.retry_policy(deadline))
    except Misp2DefenderError as exc:
        for r in runs:
            r.report.sightings, r.report.sightings_error = SightingCounts(), sightings_problem(exc)
        log.error("sightings: %s", exc)
        return None


def sightings_problem(exc: Misp2DefenderError) -> str:
    """What failed in the sightings pass, and the fix for its kind."""
    if isinstance(exc, CredentialError) and exc.service == "defender":
        return (f"{exc} (the alerts are read with WindowsDefenderATP's application permission Alert.Read.All: "
                "grant it to the app, with admin consent)")
    if isinstance(exc, CredentialError) and exc.service == "misp":
        return (f"{exc}: the sightings key's MISP user needs a role that may add sightings (perm_sighting); "
                "set sightings_misp_key to such a key (the sync's own key can stay read-only)")
    return str(exc)


def selection_groups(runs: list[TenantRun]) -> list[list[TenantRun]]:
    """Tenants with the same misp_event_filters, in config order: each group is one MISP read."""
    groups: dict[str, list[TenantRun]] = {}
    for r in runs:
        groups.setdefault(selection_key(r.settings), []).append(r)
    return list(groups.values())


def selection_key(settings: Settings) -> str:
    """Tenants with equal keys select the same MISP events."""
    return json.dumps(settings.misp_event_filters, sort_keys=True, default=str)


def read_selection(misp: MispSource, group: list[TenantRun], args: argparse.Namespace, report: Report,
                   listing: concurrent.futures.Executor, close_in_helper: Iterable[int], single: bool) -> set[str]:
    """One MISP read for a group of tenants, while each tenant's Defender is listed in parallel."""
    if single:  # a bad secret stops the run before any MISP paging
        in_tenant(group[0], group[0].authenticate)
        if group[0].report.fatal:
            return set()
    reader = SelectionReader(misp.selecting_for(group[0].settings), [r.settings for r in group], args.full_sync,
                             time.time(),
                             close_in_helper=close_in_helper)
    try:
        with report.phase("misp_first_page"):
            reader.start()  # before any tenant thread starts: a helper reader can then be forked
        if single:  # its listing (while the helper starts) bounds its Desired from the first event
            bounds = [concurrent.futures.Future()]
            bounds[0].set_result(in_tenant(group[0], group[0].list_defender))
        else:
            bounds = [listing.submit(in_tenant, r, r.prepare) for r in group]
        with report.phase("misp_read_and_map"):
            desireds = reader.read_into(bounds)
    finally:
        reader.close()
    status = reader.status
    report.reads.append((status.events, max((d.attributes for d in desireds if d is not None), default=0)))
    seen = reader.seen
    for r, desired in zip(group, desireds, strict=True):
        if r.report.fatal or desired is None:
            continue  # its listing failed: the tenant's report says why
        r.desired, r.status = desired, MispReadStatus(complete=status.complete, events=status.events,
                                                      error=status.error,
                                                      helper_peak_rss_mib=status.helper_peak_rss_mib)
        r.report.record_read(desired, r.status)
        r.read = seen
    return seen


def in_tenant(tenant_run: TenantRun, step: Callable[..., T], *args: Any) -> T | None:
    """Run one tenant's step in its own context: its log lines carry its name, its failure stays its own."""
    token = TENANT.set(tenant_run.settings.name)
    try:
        return step(*args)
    except Misp2DefenderError as exc:
        tenant_run.fail(str(exc), exc.exit_code, exc)
        log.error("%s", exc, extra={"console": False})  # the summary (or the error line) says it once
    except Exception as exc:  # a bug or an unforeseen answer: this tenant stops, the others go on
        tenant_run.fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_INCOMPLETE)
        log.exception("unexpected error; the next run starts again from MISP and Defender", extra={"console": False})
    finally:
        TENANT.reset(token)
    return None


@dataclass
class TenantRun:
    """One tenant's part of a run: its Defender client, what Defender holds, what MISP wants, its plan."""

    settings: Settings
    report: Report
    deadline: Deadline
    selection: Settings  # the tenant's own filters: what MISP is asked when a plan was made from a partial view
    client: DefenderClient | None = None
    json_log: JsonLog | None = None
    existing: list[Existing] = field(default_factory=list)
    desired: Desired | None = None
    status: MispReadStatus = field(default_factory=MispReadStatus)
    read: set[str] = field(default_factory=set)  # ids and uuids of the events this run read
    plan_text: str = ""

    def fail(self, message: str, exit_code: int, error: Misp2DefenderError | None = None) -> None:
        self.report.fatal, self.report.fatal_code, self.report.error = message, exit_code, error

    def prepare(self) -> Bounds:
        """Token and listing: what bounds this tenant's share of the MISP read."""
        self.authenticate()
        return self.list_defender()

    def authenticate(self) -> None:
        s = self.settings
        dry_run = s.dry_run or self.report.dry_run
        if s.has_defender_credentials and (s.check_existing or not dry_run):
            self.json_log = JsonLog(tenant_file(s.log_json_file, s.name), s.secrets) if s.log_json_file else None
            self.client = DefenderClient(s, s.retry_policy(self.deadline), time_scale=time_scale_from_environment(),
                                         json_log=self.json_log)
            self.report.api = {**self.client.stats, "token": self.client.tokens.stats}
            self.client.tokens.get()  # a bad secret stops this tenant before any listing

    def list_defender(self) -> Bounds:
        s = self.settings
        self.existing = list_existing(self.client, s, self.report)
        foreign = sum(1 for e in self.existing if not e.owned)
        room = max(s.max_indicators - foreign, 0)
        # OTX-known values are dropped before the cap: keep a second room's worth in line for their slots.
        return frozenset(e.key for e in self.existing), room * 2 if s.exclude_if_in_alienvault else room

    def finish(self, misp: MispSource, misp_lock: threading.Lock, being_edited: EditedEvents, otx: OtxClient | None,
               args: argparse.Namespace, dry_run: bool) -> None:
        """Confirm with MISP, plan, drop what OTX knows, write the plan out, and apply it."""
        s, report, desired, status = self.settings, self.report, self.desired, self.status
        assert desired is not None
        partial = bool(args.event)  # some events on purpose: creates and updates, never a delete
        held: dict[tuple[str, str], Candidate | None] = {}
        still_selected: frozenset = frozenset()
        own_view = misp.selecting_for(self.selection)  # (--event: the events it would select anyway)
        with misp_lock:
            held = held_by_edited_events(own_view, [e.key for e in self.existing if e.owned], self.selection,
                                         status, being_edited)
            if not partial:
                stale = [key for key in stale_keys(desired, self.existing, args.full_sync) if key not in held]
                still_selected = confirm_with_misp(own_view, stale, s, status)
        whole_view: dict[tuple[str, str], Candidate | None] = {}

        def decide() -> Plan:
            return plan(desired, self.existing, s, read_complete=status.complete, full_sync=args.full_sync,
                        still_selected=still_selected, held=held, whole_view=whole_view, force=args.force,
                        partial=partial)

        with report.phase("plan"):
            the_plan = decide()
            windowed = not args.full_sync and any(key in s.misp_event_filters for key in TIME_WINDOW_FILTERS)
            if partial or windowed or not status.complete:  # a view of the selection in part
                with misp_lock:
                    whole_view = whole_view_of(own_view, the_plan, self.existing, s, status)
                if whole_view:
                    the_plan = decide()
            with misp_lock:
                edited = from_edited_events(own_view, the_plan, self.existing, self.read, self.selection, status)
            if edited or not status.complete:
                held |= dict.fromkeys(edited - held.keys())
                the_plan = decide()
        report.misp_error = status.error
        if otx is not None and the_plan.creates:
            exclude_known_to_otx(the_plan, otx, report)
        report.record_plan(the_plan, s)
        if s.write_parsed_indicators:
            write_json(parsed_indicators_path(s), [indicator_json(c.candidate, s) for c in the_plan.writes],
                       s.secrets)
        self.plan_text = format_plan(the_plan, s.report_plan_limit)
        if dry_run:
            return
        log.info("%s", self.plan_text)
        assert self.client is not None, "validation requires Defender credentials unless dry_run"
        with report.phase("apply"):
            apply_plan(the_plan, self.client, s, report)

    def sightings(self, writer: MispSightings, misp_lock: threading.Lock, dry_run: bool) -> None:
        """Alerts on values this tenant owns become MISP sightings; a failure here never undoes the sync."""
        s, counts = self.settings, SightingCounts()
        self.report.sightings = counts
        if self.client is None:
            return  # no Defender credentials (a dry run without them): no alerts to read
        try:
            now = time.time()
            alerts = self.client.list_alerts(sightings_since(s, now))
            owned = {e.key for e in self.existing if e.owned}
            candidates = candidate_sightings(alerts, owned, s, now, counts)
            with misp_lock:
                held = writer.present(candidates) if candidates else set()
            todo = [c for c in candidates if not already_in_misp(c, held)]
            counts.already_present = len(candidates) - len(todo)
            if dry_run:
                self.plan_text += "".join(f"\n  + {c.describe()}" for c in todo) if todo else ""
                self.plan_text += f"\nSightings: {len(todo)} to add, {counts.already_present} in MISP already"
                return
            for sighting in todo:
                try:
                    with misp_lock:
                        writer.add(sighting)
                except CredentialError:
                    raise
                except Misp2DefenderError as exc:
                    counts.failed += 1
                    log.error("sighting of %s for alert %s not added: %s", sighting.value, sighting.alert_id, exc)
                    continue
                counts.added += 1
                counts.false_positive += sighting.kind == FALSE_POSITIVE
            if not counts.failed:  # a failed one is read again next time (MISP says if it landed after all)
                # An update time in the future (a clock gone wrong) would make every later pass
                # ask for nothing: the state never passes the time this pass started.
                newest = max((min(t, now) for t in (parse_time(a.get("lastUpdateTime")) for a in alerts
                                                    if isinstance(a, dict)) if t is not None), default=None)
                if newest is not None:
                    write_json(sightings_state_path(s), {"newest_alert_update": format_time(newest)}, s.secrets)
        except Misp2DefenderError as exc:
            self.report.sightings_error = sightings_problem(exc)
            log.error("sightings: %s", self.report.sightings_error)

    def close(self) -> None:
        if self.json_log is not None:
            self.json_log.close()


def parsed_indicators_path(settings: Settings) -> Path:
    # Beside the log; with no log file, beside the lock (itself beside config.py unless set elsewhere).
    default = Path(settings.log_file or settings.lock_file).with_name("misp2defender_indicators.json")
    return Path(tenant_file(str(default), settings.name))


def list_existing(client: DefenderClient | None, settings: Settings, report: Report) -> list[Existing]:
    """What Defender holds, as planning compares it (nothing without credentials or the listing)."""
    if not settings.check_existing:
        log.warning("check_if_already_in_defender is False: new values are imported, nothing of ours is updated "
                    "or deleted (Defender is still listed, so that no other application's indicator is overwritten)")
    if client is None:
        return []
    with report.phase("defender_list"):
        PROGRESS.show("Defender: listing the indicators it holds", force=True)
        now, owner = time.time(), client.tokens.owner()
        convert = functools.partial(existing_from_api, client_id=owner, application=settings.application, now=now)
        # $skip paging over a list that changes meanwhile can show an indicator twice: once is what it is.
        return list({e.id: e for e in client.list_indicators(convert=convert) if e is not None}.values())


def exclude_known_to_otx(the_plan: Plan, otx: OtxClient, report: Report) -> None:
    """exclude_if_in_alienvault: drop the creates OTX knows, before the cap; an OTX failure never stops the run.

    Values waiting behind the cap take the slots of the ones dropped, and are looked up in turn.
    """
    looked_up: set[tuple[str, str]] = set()
    while todo := [c.candidate.key for c in the_plan.creates if not c.replaces and c.candidate.key not in looked_up]:
        looked_up.update(todo)
        known = exclude_known(the_plan, otx.known(todo))
        report.skipped["known in AlienVault OTX"] += known
        report.candidates -= known  # skipped now, so that the counts still add up
    report.otx_errors = otx.errors_for(looked_up)
    report.api["otx"] = otx.stats
    if report.otx_errors:
        log.warning("OTX: %d lookups failed (the last: %s); those indicators are pushed anyway", report.otx_errors,
                    otx.last_error)


def confirm_with_misp(misp: MispSource, keys: list[tuple[str, str]], settings: Settings,
                      status: MispReadStatus) -> frozenset:
    """Ask MISP, just before planning deletes, which of these keys a selected attribute still carries.

    Paging by offset can miss an event that moved between pages while the read went on; this
    check does not depend on paging, so a value MISP still selects is never deleted. When the
    check fails the read counts as incomplete, and nothing is deleted.
    """
    if not keys or not status.complete:
        return frozenset()
    try:
        return frozenset(selected_candidates(misp, keys, settings))
    except Misp2DefenderError as exc:
        status.fail(f"MISP value check failed: {exc}")
        return frozenset()


def whole_view_of(misp: MispSource, the_plan: Plan, existing: list[Existing], settings: Settings,
                  status: MispReadStatus) -> dict[tuple[str, str], Candidate | None]:
    """For the owned values a plan would change after a partial view (a time window, --event, a read
    that failed part-way): what MISP's whole selection asks for each, so that an event outside the
    view still counts. None for every key when MISP cannot be asked (or the read failed): those
    indicators then stay as they are."""
    changing = changed_by_events(the_plan, existing)
    if not changing:
        return {}
    if not status.complete:
        log.warning("MISP was read only in part: %d changes to owned indicators withheld", len(changing))
        return dict.fromkeys(changing)
    try:
        found = selected_candidates(misp, changing, settings)
    except Misp2DefenderError as exc:
        log.warning("MISP value check failed (%s): %d owned indicators kept as they are", exc, len(changing))
        return dict.fromkeys(changing)
    return {key: found[key] for key in changing if key in found}


class EditedEvents:
    """The selected events that were published and are being edited now, read once per selection:
    every tenant whose filters select the same events asks for them (in turn, under the MISP lock)."""

    def __init__(self) -> None:
        self.read: dict[str, tuple[list[dict], MispReadStatus]] = {}

    def of(self, misp: MispSource) -> tuple[list[dict], MispReadStatus]:
        key = selection_key(misp.settings)
        if key not in self.read:
            status = MispReadStatus()
            events = [event for event in misp.events(True, status, extra={"published": False})
                      if event.get("published") is not True and epoch_or(event.get("publish_timestamp")) > 0]
            self.read[key] = events, status  # (a draft never published holds nothing back)
        return self.read[key]


def holds_edits(settings: Settings) -> bool:
    """keep_unpublished_edits applies: with filters that select unpublished events too, an edit
    changes nothing about the selection, so nothing needs holding back."""
    return settings.keep_unpublished_edits and \
        settings.misp_event_filters.get("published") in (True, 1, "1", "true", "True")


def held_by_edited_events(misp: MispSource, keys: list[tuple[str, str]], settings: Settings,
                          status: MispReadStatus, being_edited: EditedEvents) -> dict[tuple[str, str], Candidate]:
    """Of these owned keys, the ones an event carries that was published and is now being edited.

    Any edit unpublishes a MISP event until someone republishes it. Like MISP's own sync, the last
    published state stands meanwhile: so the attributes edited since the last publish count
    whatever their to_ids or deleted flags say now (those edits take effect at the republish).
    """
    if not keys or not status.complete or not holds_edits(settings):
        return {}
    wanted, held = set(keys), {}
    now = time.time()
    events, edited = being_edited.of(misp)
    for event in events:
        map_one = event_mapper(event_context(event), settings, now)
        published_at = epoch_or(event.get("publish_timestamp"))
        for attribute in event_attributes(event, settings.misp_flatten_attributes):
            if isinstance(attribute, dict):
                # Edited since the last publish: its to_ids and deleted flags may be the edit's. Not
                # edited since: as it stands, it is as it was published.
                since = epoch_or(attribute.get("timestamp")) > published_at
                for outcome in map_one({**attribute, "to_ids": True, "deleted": False} if since else attribute):
                    if type(outcome) is Candidate and outcome.key in wanted:
                        held[outcome.key] = stronger(held[outcome.key], outcome) if outcome.key in held else outcome
    if not edited.complete:
        status.fail(f"MISP read of events being edited failed: {edited.error}")
    return held


def from_edited_events(misp: MispSource, the_plan: Plan, existing: list[Existing], read: set[str],
                       settings: Settings, status: MispReadStatus) -> set[tuple[str, str]]:
    """Of the owned indicators the plan would delete or change, the ones whose own event is being edited.

    The edit may have changed the value (a typo fixed) or the tag the filters select on, so the
    event's current content does not say: its uuid does (in the indicator's description). Until
    the republish, the last published state stands, as it does for MISP's own sync. The events
    this run read are published, so only the others are asked about. When MISP cannot say, the
    read counts as incomplete, and every indicator asked about stays exactly as it is.
    """
    touched = {*changed_by_events(the_plan, existing),
               *((d.indicator_type, d.value) for d in the_plan.deletes + the_plan.replaced + the_plan.replaced_first)}
    asked = [e for e in existing if e.owned and e.key in touched and e.event_uuid and e.event_uuid not in read]
    if not asked or not status.complete or not holds_edits(settings):
        return set()
    try:
        edited = misp.being_edited(e.event_uuid for e in asked)
    except Misp2DefenderError as exc:  # unknown: each stays exactly as it is
        status.fail(f"MISP check of events being edited failed: {exc}")
        return {e.key for e in asked}
    return {e.key for e in asked if e.event_uuid in edited}


def selected_candidates(misp: MispSource, keys: Iterable[tuple[str, str]],
                        settings: Settings) -> dict[tuple[str, str], Candidate]:
    """The strongest candidate for each key that an attribute selected by the filters still carries (asks MISP).

    MISP matches values as written, so each key is asked for in the spellings MISP may hold it in;
    each attribute found goes through the same mapping (vetting, to_ids, type rules) as the read.
    """
    wanted = set(keys)
    values = sorted({spelling for key in wanted for spelling in misp_spellings(*key)})
    found: dict[tuple[str, str], Candidate] = {}
    for attribute, context in map(split_inherited_tags, misp.attributes_with_values(values)):
        for outcome in map_attribute(attribute, context, settings, time.time()):
            if isinstance(outcome, Candidate) and outcome.key in wanted:
                found[outcome.key] = stronger(found[outcome.key], outcome) if outcome.key in found else outcome
    return found


# ###########################################################################################
# Command line
# ###########################################################################################

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="misp2defender.py", description="Sync MISP indicators to Microsoft Defender for Endpoint.")
    parser.add_argument("--config", default=str(Path(__file__).resolve().with_name("config.py")),
                        help="path to the config module (default: config.py beside this script)")
    parser.add_argument("--dry-run", action="store_true", help="read and plan, print the plan, write nothing")
    parser.add_argument("--full-sync", action="store_true",
                        help="read the whole MISP selection (no time window) and delete what it no longer holds")
    parser.add_argument("--force", action="store_true", help="delete even above remove_guard_percent")
    parser.add_argument("--check", action="store_true",
                        help="check config, MISP, Entra, Defender permission (and OTX); write nothing")
    parser.add_argument("--report", metavar="FILE", help="write a JSON report of the run to FILE")
    parser.add_argument("--tenant", metavar="NAME", action="append", default=[],
                        help="only this tenant of the 'tenants' list (repeatable)")
    parser.add_argument("--event", metavar="UUID_OR_ID", action="append", default=[],
                        help="push just this MISP event now, whatever the time window (repeatable); "
                             "deletes no retracted or unselected value")
    parser.add_argument("--ignore-filters", action="store_true",
                        help="with --event: ignore misp_event_filters (published, tags, ...) too")
    parser.add_argument("--sightings-only", action="store_true",
                        help="only turn Defender alerts into MISP sightings (misp_sightings), no sync")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output on stderr (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    parser.add_argument("--version", action="version", version=f"misp2defender {__version__}")
    return parser.parse_args(argv)


FIXES = {
    "config": "edit the named key in config.py (see config.py.default and the README)",
    "files": "create the directory, or make it writable by the user the run starts as, or change the key",
    "misp_key": "create an API key for a user that may read events (MISP: Administration → List Auth Keys) "
                "and set misp_key",
    "misp_reach": "check misp_domain (with a trailing / for a sub-path), the network path and misp_verifycert",
    "misp_server": "MISP itself failed: see MISP's error log (Administration → Logs, or app/tmp/logs/error.log)",
    "entra": "check graph_auth: tenant = Directory ID, client_id = Application ID, client_secret = the secret "
             "*value* (not its ID), or the certificate and its thumbprint",
    "entra_reach": "allow HTTPS to the login host (graph_auth['authority']) or set proxies / HTTPS_PROXY",
    "defender": PERMISSION_FIX.format("Ti.ReadWrite.All"),
    "defender_reach": "allow HTTPS to defender_api_url or set proxies / HTTPS_PROXY",
    "otx": "check otx_alienvault_api (OTX → Settings → API key) and HTTPS to otx_alienvault_url",
    "keyvault": "check key_vault_url and key_vault_secrets, and that the identity reading the vault (graph_auth's "
                "managed identity, or its app) has the 'Key Vault Secrets User' role on it",
    "keyvault_reach": "allow HTTPS to key_vault_url (and the vault's firewall to this host) or set HTTPS_PROXY",
    "decay": "in MISP, Administration → Decaying Models: 'Update all default models' loads MISP's models, then "
             "Enable the one decay_model names (or set decay_model to an enabled model's name or id)",
    "lock": "nothing, if that run is still working (this one changed nothing; the next one goes ahead); if it "
            "hangs, see its log and stop it (a run that died frees the lock by itself)",
    "certificate": "trust the CA that signed the certificate: REQUESTS_CA_BUNDLE for Microsoft hosts behind a "
                   "TLS-inspecting proxy, misp_verifycert = '/path/to/ca.pem' for MISP",
}
SERVICE_NAMES = {"misp": "MISP", "entra": "Entra", "defender": "Defender", "otx": "OTX", "files": "files",
                 "config": "config", "lock": "lock", "keyvault": "Key Vault", "decay": "MISP decaying model"}


def fix_for(exc: Misp2DefenderError) -> str:
    """The fix for an error, chosen by its type and the service at fault (never by its words)."""
    if exc.fix:
        return exc.fix
    service = exc.service or "config"
    if isinstance(exc, CertificateError):
        return FIXES["certificate"]
    if isinstance(exc, CredentialError):
        return FIXES.get({"misp": "misp_key"}.get(service, service), FIXES["config"])
    if isinstance(exc, ServerError) and service == "misp":
        return FIXES["misp_server"]
    if isinstance(exc, (UnreachableError, DefenderError, StoppedWaiting)):
        return FIXES.get(f"{service}_reach", FIXES.get(service, ""))
    return FIXES.get(service, FIXES["config"])


def token_roles(token: str) -> list[str]:
    """The roles claim of an access token (for --check's advice only)."""
    roles = token_claims(token).get("roles", [])
    return [str(r) for r in roles] if isinstance(roles, list) else []


@dataclass
class Checklist:
    """--check's rows: ✓ passed, ⚠ worth a look, ✗ failed (with its fix)."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)
    indent: str = "  "

    def ok(self, text: str) -> None:
        self.rows.append((f"{self.indent}✓", text, ""))

    def warn(self, text: str, fix: str = "") -> None:
        self.rows.append((f"{self.indent}⚠", text, fix))

    def fail(self, text: str, fix: str) -> None:
        self.rows.append((f"{self.indent}✗", text, fix))

    def error(self, exc: Misp2DefenderError) -> None:
        self.fail(f"{SERVICE_NAMES.get(exc.service, exc.service or 'config')}: {exc}", fix_for(exc))

    def heading(self, text: str) -> None:
        self.rows.append(("", f"  {text}", ""))
        self.indent = "    "

    @property
    def passed(self) -> bool:
        return not any(mark.endswith("✗") for mark, _, _ in self.rows)

    def print(self, secrets: list[str]) -> None:
        print("misp2defender --check")
        for mark, text, fix in self.rows:
            print(redact(f"{mark} {text}" if mark else text, secrets))
            if fix and not mark.endswith("✓"):
                print(f"{' ' * len(mark)}    fix: {fix}")
        print("All checks passed." if self.passed else "Some checks failed.")


NO_EVENTS_FIX = ("check the filters: the tags filter (is the tag on your events?), the time window "
                 "(publish_timestamp), and 'published' (are the events published?); or try --full-sync")


def run_check(config_path: str, only: Iterable[str] = (), report_path: str | None = None) -> int:
    """--check: prove the setup works, stage by stage, without writing anything anywhere.

    Config (and every file the run will write), then MISP (which needs no Entra settings), then
    for each tenant Entra and Defender, then OTX. A stage that cannot be checked is a ✗ with its
    fix; the stages before it have still been checked.
    """
    checks = Checklist()
    # PyMISP logs its own errors (a 5xx with the request's headers); the checklist says it better.
    pymisp_log = logging.getLogger("pymisp")
    pymisp_log.addHandler(logging.NullHandler())
    pymisp_log.propagate = False
    tenants: list[Settings] = []
    try:
        raw = load_config_module(config_path)
        tenants = build_tenants(raw, config_path=config_path, only=only, require_credentials=False)
        if report_path:
            check_writable("--report", report_path)
        count = f" ({len(tenants)} tenants)" if tenants[0].name else ""
        checks.ok(f"config: {config_path} is valid{count}")
        for note in dict.fromkeys(note for t in tenants for note in t.notes):
            checks.warn(f"config: {note}")
        if warning := exposed_secrets_warning(config_path, raw):
            checks.warn(f"config: {warning}")
        shared = tenants[0]
        written = [p for p in (shared.log_file, shared.lock_file, shared.log_json_file, report_path) if p]
        checks.ok(f"files: {', '.join(written)} can be written")
    except ConfigError as exc:
        checks.error(exc)
    if tenants and any(t.key_vault_names for t in (tenants[0].common, *tenants)):  # as read_key_vault asks
        try:
            tenants = read_key_vault(tenants, Deadline(tenants[0].max_run_seconds))
            checks.ok(f"Key Vault: {tenants[0].key_vault_url} gave every secret key_vault_secrets names")
        except Misp2DefenderError as exc:
            checks.error(exc)
            tenants = []
    if tenants:
        shared = tenants[0].common
        kept = [f"{label} from {shared.sources[key]}" for key, label in (("misp_key", "MISP key"),
                ("otx_alienvault_api", "OTX key")) if shared.sources.get(key)]
        if kept:
            checks.ok(f"secrets: {'; '.join(kept)}")
    if tenants:
        check_stages(checks, [dataclasses.replace(t, max_retries=min(t.max_retries, 1)) for t in tenants])
    pymisp_log.propagate = True
    checks.print(all_secrets(tenants))
    return EXIT_OK if checks.passed else EXIT_CANNOT_PROCEED


def check_stages(checks: Checklist, tenants: list[Settings]) -> None:
    shared = tenants[0].common
    policy = shared.retry_policy(Deadline(shared.max_run_seconds))
    misp: MispSource | None = None
    try:
        if shared.misp_key:
            misp = MispSource(shared, policy)
            version = (misp.misp.misp_instance_version or {}).get("version", "?")
            checks.ok(f"MISP: {shared.misp_url} answers (MISP {version}) and accepts the API key")
        else:
            checks.fail(f"MISP: {MISP_KEY_MISSING}", FIXES["misp_key"])
    except Misp2DefenderError as exc:
        checks.error(exc)
    if shared.misp_sightings and (shared.sightings_misp_key or shared.misp_key):  # (no key: said above)
        check_sightings_key(checks, shared, policy)
    if shared.decay_model and misp is not None:
        tenants = check_decay(checks, misp, tenants)
    counted: dict[str, int] = {}
    for tenant in tenants:
        if tenant.name:
            checks.heading(f"tenant {tenant.name}:")
        filters = selection_key(tenant)
        if misp is not None and filters not in counted:
            try:
                counted[filters] = misp.selecting_for(tenant).count_events()
                label = "this tenant's misp_event_filters" if tenant.name else "misp_event_filters"
                if counted[filters]:
                    checks.ok(f"MISP: {counted[filters]} events match {label}")
                else:
                    checks.warn(f"MISP: no event matches {label}", NO_EVENTS_FIX)
            except Misp2DefenderError as exc:
                checks.error(exc)
        check_defender(checks, tenant, policy)
    if shared.exclude_if_in_alienvault:
        checks.indent = "  "
        problem = OtxClient(shared, policy).check_key() if shared.otx_key else ConfigError(OTX_KEY_MISSING, "otx")
        if problem:
            checks.fail(f"OTX: {problem}", fix_for(problem))
        else:
            checks.ok("OTX: the API key works")


def check_defender(checks: Checklist, tenant: Settings, policy: RetryPolicy) -> None:
    if not tenant.has_defender_credentials:
        missing = [f"graph_auth['{k}']" for k in ("tenant", "client_id") if not getattr(tenant, k)]
        if not (tenant.client_secret or tenant.client_certificate):
            missing.append("graph_auth['client_secret'] (or a certificate)")
        checks.fail(f"Entra: {', '.join(missing)} not set: Entra and Defender cannot be checked yet", FIXES["entra"])
        return
    try:
        client = DefenderClient(tenant, policy)
        roles = token_roles(client.tokens.get())
        platform = f" on {identity_platform()}" if tenant.managed_identity else ""
        checks.ok(f"Entra: {tenant.credential}{platform}, owns indicators as {client.tokens.owner()}")
        checks.ok(f"Entra: token issued for {tenant.target_scope}" + (f" (roles: {', '.join(roles)})" if roles else ""))
        if roles and not set(roles) & set(WRITE_ROLES) and not tenant.dry_run:
            # Reading may still work (Ti.Read.All): the sync's first write would be refused.
            checks.fail(f"Defender: the token grants {', '.join(roles)} but neither of {' or '.join(WRITE_ROLES)}: "
                        "this app could not create, update or delete indicators", FIXES["defender"])
            return
        client.list_indicators(page_size=1, limit=1)
        checks.ok(f"Defender: {tenant.api_url} lets this app read indicators")
    except Misp2DefenderError as exc:
        checks.error(exc)
        return
    if tenant.misp_sightings:
        try:
            client.list_alerts(format_time(time.time()) or "", page_size=1, limit=1)
            checks.ok("Defender: this app may read alerts (Alert.Read.All), for the sightings")
        except Misp2DefenderError as exc:
            checks.fail(f"Defender: {sightings_problem(exc)}", fix_for(exc))


def check_decay(checks: Checklist, misp: MispSource, tenants: list[Settings]) -> list[Settings]:
    """The decaying model: on MISP, enabled, and scoring the selected attributes (the first 1,000)."""
    shared = tenants[0]
    try:
        model = misp.decaying_model(shared.decay_model)
    except Misp2DefenderError as exc:
        checks.error(exc)
        return tenants
    tenants = [dataclasses.replace(t, decay=model) for t in tenants]
    filters = {k: v for k, v in selection_filters(shared.misp_event_filters, full_sync=False).items()
               if k not in ("limit", "page")}
    try:
        sample = misp.search("attributes", "MISP decay scores", attributes_of_answer,
                             **{**filters, **tenants[0].decay_query, "limit": 1000, "page": 1, "to_ids": 1})
    except Misp2DefenderError as exc:
        checks.error(exc)
        return tenants
    scored = sum(1 for a in sample if decay_score_of(a, model.id)[0] >= 0)
    text = (f"MISP: decaying model {model.name!r} (id {model.id}) is enabled; it scores {scored} of "
            f"{'the first ' if len(sample) == 1000 else ''}{len(sample)} selected attributes "
            f"(threshold {decay_threshold(tenants[0]):g})")
    if sample and not scored:
        checks.warn(text, "the model applies to other attribute types: choose a model for the types you sync")
    else:
        checks.ok(text)
    return tenants


def check_sightings_key(checks: Checklist, shared: Settings, policy: RetryPolicy) -> None:
    """The key sightings are added with must belong to a MISP role that may add them (nothing is written)."""
    source = "sightings_misp_key" if shared.sightings_misp_key else "misp_key"
    try:
        role = MispSightings(shared, policy).source.misp._current_role
    except Misp2DefenderError as exc:
        checks.error(exc)
        return
    if getattr(role, "perm_sighting", False):
        checks.ok(f"MISP: {source} may add sightings (role {getattr(role, 'name', '?')})")
    else:
        checks.fail(f"MISP: {source}'s role ({getattr(role, 'name', '?')}) may not add sightings",
                    "give that user a role with 'Sighting' permission, or set sightings_misp_key to a key "
                    "that has it (the sync's own key can stay read-only)")


class RunLock:
    """An exclusive flock: overlapping cron runs cannot interleave; a dead holder frees it."""

    def __init__(self, path: str):
        self.path = path
        self.handle: Any = None

    def __enter__(self) -> RunLock:
        private_file(self.path)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise LockedError(f"another misp2defender run (pid {holder}) holds the lock {self.path}; "
                              "exiting without changes") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


class Terminated(BaseException):
    """SIGTERM (timeout, systemctl stop): unwind like an interrupt, so a helper reader is stopped."""


def _terminate(signum: int, frame: Any) -> None:
    STOPPING.set()  # the tenants' threads start no other call; this one unwinds
    raise Terminated(f"stopped by signal {signum}")


def _interrupt(signum: int, frame: Any) -> None:
    STOPPING.set()  # Ctrl-C: the same, as an interrupt
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    STOPPING.clear()  # (main may run more than once in a process: tests, embedding callers)
    if args.check:
        return run_check(args.config, args.tenant, args.report)
    report = Report()
    handlers: list[logging.Handler] = []
    tenants: list[Settings] = []
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    previous_interrupt = signal.signal(signal.SIGINT, _interrupt) if in_main_thread else None
    error: Misp2DefenderError | None = None
    try:
        raw = load_config_module(args.config)
        tenants = build_tenants(raw, config_path=args.config, dry_run=args.dry_run, only=args.tenant)
        check_arguments(args, tenants[0])
        report.secrets = all_secrets(tenants)
        if args.report:
            check_writable("--report", args.report)
        shared = tenants[0]
        deadline = Deadline(shared.max_run_seconds)
        handlers = setup_logging(shared, -1 if args.quiet else args.verbose, report.secrets)
        if sys.stdout.isatty() and not args.quiet:
            PROGRESS.stream = sys.stdout
        log.info("misp2defender %s: %s run with %s%s", __version__, run_mode(args, shared), args.config,
                 f" for tenants {', '.join(t.name for t in tenants)}" if shared.name else "")
        for note in dict.fromkeys(note for t in tenants for note in t.notes):
            log.warning("%s", note)
        if warning := exposed_secrets_warning(args.config, raw):
            log.warning("%s", warning)
        tenants = read_key_vault(tenants, deadline)
        report.secrets[:] = all_secrets(tenants)  # the handlers share this list: they redact these too
        if args.dry_run or shared.dry_run:
            run(tenants, args, report, deadline)
        else:
            with RunLock(shared.lock_file) as lock:
                run(tenants, args, report, deadline, close_in_helper=[lock.handle.fileno()])
    except Misp2DefenderError as exc:
        error = exc
        report.fatal, report.fatal_code = str(exc), exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:
        report.fatal, report.fatal_code = f"interrupted ({exc or 'Ctrl-C'})", EXIT_INCOMPLETE
    except Exception as exc:  # a bug or an unforeseen answer: say so, redacted, and let cron see it
        report.fatal, report.fatal_code = f"unexpected {type(exc).__name__}: {exc}", EXIT_INCOMPLETE
        if not handlers:
            handlers = setup_logging(tenants[0] if tenants else None, args.verbose, report.secrets)
        log.exception("unexpected error; the next run starts again from MISP and Defender",
                      extra={CONSOLE: False})
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if previous_interrupt is not None:
            signal.signal(signal.SIGINT, previous_interrupt)
        PROGRESS.clear()
        PROGRESS.stream = None
        report.finished = time.time()
        finish(args, report, error, handlers)
    return report.exit_code


CONSOLE = "console"  # a log record with extra={CONSOLE: False} goes to the log file only


def finish(args: argparse.Namespace, report: Report, error: Misp2DefenderError | None,
           handlers: list[logging.Handler]) -> None:
    """The error once (with its fix), the summary, the log's end line, the report; handlers removed."""
    secrets = report.secrets
    if report.fatal:
        error = error or report.error
        fix = fix_for(error) if error is not None else ("the traceback is in the log file"
                                                        if report.fatal.startswith("unexpected") else "")
        print(redact(f"misp2defender: error: {report.fatal}" + (f"\n  fix: {fix}" if fix else ""), secrets),
              file=sys.stderr)
        if handlers:  # (without them, logging's last resort would print it a second time)
            log.error("%s", report.fatal, extra={CONSOLE: False})
    if not (report.fatal and not report.events and not report.wrote and not report.tenants):
        for line in report.summary_lines():  # (nothing to sum up when the run stopped before reading)
            print(redact(line, secrets))
            log.info("%s", line)
        if sys.stdout.isatty() and not args.quiet:
            print(redact(report.table(), secrets))
    log.info("misp2defender finished in %.1f s: exit %d", report.finished - report.started, report.exit_code)
    if args.report:
        with contextlib.suppress(OSError, ConfigError):
            write_json(args.report, report.as_dict(), secrets)
    for handler in handlers:
        logging.getLogger().removeHandler(handler)
        handler.close()


def run_mode(args: argparse.Namespace, shared: Settings) -> str:
    modes = [name for name, on in (("check", args.check), ("dry", args.dry_run or shared.dry_run),
                                   ("full-sync", args.full_sync), ("event", bool(args.event)),
                                   ("sightings-only", args.sightings_only)) if on]
    return "+".join(modes) or "incremental"


def check_arguments(args: argparse.Namespace, shared: Settings) -> None:
    """Options that contradict each other or the config: said before anything is contacted."""
    if args.ignore_filters and not args.event:
        raise ConfigError("--ignore-filters goes with --event")
    if args.event and args.full_sync:
        raise ConfigError("--event reads some events only: it cannot be a --full-sync")
    if args.sightings_only and not shared.misp_sightings:
        raise ConfigError("--sightings-only needs misp_sightings = True in config.py")


def all_secrets(tenants: Iterable[Settings]) -> list[str]:
    """Every tenant's secrets: each is redacted from everything the run writes."""
    return list(dict.fromkeys(secret for t in tenants for secret in t.secrets))


if __name__ == "__main__":
    sys.exit(main())
