"""Shared fixtures: a clean environment, a session PKI and fresh stand-ins per test.

Each stand-in fixture starts a real server before the test and, at teardown,
closes it and asserts ``errors == []`` so a broken stand-in (or a handler
crash provoked by the tool) fails the test instead of hiding behind retries.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import tool  # noqa: F401 - the end-to-end `tool` fixture, registered for every module
from tests.standins.defender import DefenderStandIn
from tests.standins.entra import EntraStandIn
from tests.standins.identity import ManagedIdentityStandIn
from tests.standins.keyvault import KeyVaultStandIn
from tests.standins.misp import MispStandIn, load_events
from tests.standins.otx import OtxStandIn
from tests.standins.tls import PKI, make_client_certificate, make_test_pki
from tests.util import (
    DATA_DIR,
    DEFENDER_TIME_SCALE,
    MISP_KEY,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    OTX_KEY,
    SHARED_EVENTS_DIR,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_TENANT,
    serving,
)

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
