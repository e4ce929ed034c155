"""Shared fixtures: a clean environment, a session PKI and fresh stand-ins per test.

Each stand-in fixture starts a real server before the test and, at teardown,
closes it and asserts ``errors == []`` so a broken stand-in (or a handler
crash provoked by the tool) fails the test instead of hiding behind retries.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from tests.standins.base import StandIn
from tests.standins.defender import DefenderStandIn
from tests.standins.entra import EntraStandIn
from tests.standins.identity import ManagedIdentityStandIn
from tests.standins.keyvault import KeyVaultStandIn
from tests.standins.misp import DEFAULT_KEY as MISP_KEY
from tests.standins.misp import MispStandIn, load_events
from tests.standins.otx import DEFAULT_KEY as OTX_KEY
from tests.standins.otx import OtxStandIn
from tests.standins.tls import PKI, make_client_certificate, make_test_pki

S = TypeVar("S", bound=StandIn)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "tests" / "data"
SHARED_EVENTS_DIR = REPO.parent / "shared" / "data" / "misp-events"

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

__all__ = [
    "DEFENDER_SCOPE",
    "DEFENDER_TIME_SCALE",
    "MISP_KEY",
    "OTHER_CLIENT_ID",
    "OTHER_CLIENT_SECRET",
    "OTX_KEY",
    "TEST_CLIENT_ID",
    "TEST_CLIENT_SECRET",
    "TEST_TENANT",
]

_SCRUBBED = (
    # Credentials the tool finds in the environment (workload identity, managed identity sources).
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IMDS_ENDPOINT",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "MSAL_FORCE_REGION",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove what makes requests/msal ignore our CA or route 127.0.0.1 via a proxy.

    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` override msal's ``verify=``, a
    proxy variable sends loopback traffic to the proxy, ``MSAL_FORCE_REGION``
    rewrites the authority host, and stray ``MISP2DEFENDER_*`` settings from
    a developer shell would leak into the tool under test.
    """
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("MISP2DEFENDER_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    # MSAL's managed identity falls back to IMDS (169.254.169.254); msal 1.39 takes its host from
    # here: a closed loopback port, so no test can ever leave 127.0.0.1 that way.
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:9")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """Test CA + 127.0.0.1 leaf, made once per session (EC keys are cheap)."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def client_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """RSA key+cert PEM and its SHA-1 thumbprint for the certificate credential."""
    return make_client_certificate(tmp_path_factory.mktemp("client-cert"))


@pytest.fixture
def ca_env(clean_env: None, pki: PKI, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Trust the test CA through REQUESTS_CA_BUNDLE, as the tool under test will.

    The tool always verifies Microsoft certificates, so pointing requests at
    the test CA is the one honest way in.
    """
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_path))
    return pki.ca_path


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


@pytest.fixture
def entra(pki: PKI) -> Iterator[EntraStandIn]:
    with serving(
        EntraStandIn(
            pki,
            tenant=TEST_TENANT,
            clients={TEST_CLIENT_ID: TEST_CLIENT_SECRET, OTHER_CLIENT_ID: OTHER_CLIENT_SECRET},
            display_names={TEST_CLIENT_ID: "misp2defender", OTHER_CLIENT_ID: "other-tool"},
        )
    ) as server:
        yield server


@pytest.fixture
def defender(pki: PKI, entra: EntraStandIn) -> Iterator[DefenderStandIn]:
    """Defender with the real quota numbers on a 1/60 time scale (``defender.time_scale``)."""
    with serving(DefenderStandIn(pki, entra, time_scale=DEFENDER_TIME_SCALE)) as server:
        yield server


@pytest.fixture
def misp() -> Iterator[MispStandIn]:
    """Plain-http MISP serving the sample events in tests/data/*.json (may be none yet)."""
    with serving(MispStandIn(load_events(DATA_DIR, recursive=False), key=MISP_KEY)) as server:
        yield server


@pytest.fixture
def misp_real() -> Iterator[MispStandIn]:
    """MISP serving the real events in <repo>/../shared/data/misp-events (read-only)."""
    if not SHARED_EVENTS_DIR.is_dir():
        pytest.skip(f"{SHARED_EVENTS_DIR} is absent")
    with serving(MispStandIn.from_directory(SHARED_EVENTS_DIR, key=MISP_KEY)) as server:
        yield server


@pytest.fixture
def identity(entra: EntraStandIn, monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagedIdentityStandIn]:
    """An App Service managed identity endpoint, with IDENTITY_ENDPOINT/IDENTITY_HEADER pointing at it."""
    with serving(ManagedIdentityStandIn(entra)) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server


@pytest.fixture
def keyvault(pki: PKI, entra: EntraStandIn) -> Iterator[KeyVaultStandIn]:
    with serving(KeyVaultStandIn(pki, entra)) as server:
        yield server


@pytest.fixture
def otx(pki: PKI) -> Iterator[OtxStandIn]:
    with serving(OtxStandIn(pki, key=OTX_KEY)) as server:
        yield server


# The end-to-end harness (tests/harness.py) defines the `tool` fixture on top of the
# fixtures above; importing it here registers it for every test module. It imports
# the constants above from this module, so this import must stay at the bottom.
from tests.harness import tool  # noqa: E402, F401
