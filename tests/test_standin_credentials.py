"""Self-tests of the credential stand-ins: managed identity, workload identity federation, Key Vault.

The real msal (``ManagedIdentityClient``, ``ConfidentialClientApplication``)
and requests talk to the stand-ins over loopback sockets; nothing is mocked.
Managed identity tests always point ``IDENTITY_ENDPOINT`` at 127.0.0.1 (the
``identity_env`` fixture), so msal can never fall back to IMDS at
169.254.169.254.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import msal
import msal.managed_identity
import pytest
import requests

from tests.standins.defender import DefenderStandIn
from tests.standins.entra import FIC_AUDIENCE, JWT_BEARER, EntraStandIn, make_federated_assertion
from tests.standins.identity import DEFAULT_SYSTEM_CLIENT_ID, ManagedIdentityStandIn, object_id_for
from tests.standins.keyvault import KeyVaultStandIn
from tests.standins.tls import PKI
from tests.util import (
    DEFENDER_SCOPE,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    serving,
)

DEFENDER_RESOURCE = "https://api.securitycenter.microsoft.com"
VAULT_RESOURCE = "https://vault.azure.net"
VAULT_SCOPE = "https://vault.azure.net/.default"
UA_CLIENT_ID = "7e1d2c3b-4a5f-4e6d-8c7b-9a0f1e2d3c4b"
FED_CLIENT_ID = "4a5b6c7d-8e9f-4a0b-b1c2-d3e4f5a6b7c8"
ISSUER = "https://oidc.prod-aks.azure.com/1f2e3d4c-5b6a-4798-8a7b-6c5d4e3f2a1b/"
SUBJECT = "system:serviceaccount:misp:misp2defender"
_MI_SOURCE_VARIABLES = ("IDENTITY_SERVER_THUMBPRINT", "MSI_ENDPOINT", "MSI_SECRET", "IMDS_ENDPOINT")


# --------------------------------------------------------------------- fixtures
@pytest.fixture
def identity(entra: EntraStandIn) -> Iterator[ManagedIdentityStandIn]:
    """App Service token service with the system identity and one user-assigned identity."""
    server = ManagedIdentityStandIn(entra)
    server.add_user_assigned(UA_CLIENT_ID, name="id-misp2defender")
    with serving(server) as started:
        yield started


@pytest.fixture
def identity_env(identity: ManagedIdentityStandIn, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Make msal see App Service pointing at the stand-in, and nothing that could reach IMDS.

    The variables of the other managed identity sources are removed so msal's
    detection lands on App Service; ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` (msal
    1.39's IMDS host override) points at a closed loopback port as a second
    guard, so even a wrong branch could not leave 127.0.0.1.
    """
    for name in _MI_SOURCE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:9")
    env = identity.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert msal.managed_identity.get_managed_identity_source() is msal.managed_identity.APP_SERVICE
    return env


@pytest.fixture
def keyvault(pki: PKI, entra: EntraStandIn) -> Iterator[KeyVaultStandIn]:
    with serving(KeyVaultStandIn(pki, entra)) as server:
        yield server


# --------------------------------------------------------------------- helpers
def mi_client(managed_identity: Any) -> msal.ManagedIdentityClient:
    return msal.ManagedIdentityClient(managed_identity, http_client=requests.Session())


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def cca(entra: EntraStandIn, pki: PKI, client_id: str, credential: Any) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=entra.authority,
        instance_discovery=False,
        verify=str(pki.ca_path),
    )


def vault_get(
    kv: KeyVaultStandIn, pki: PKI, path: str, token: str | None, api_version: str | None = "7.4"
) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params = {"api-version": api_version} if api_version else None
    return requests.get(f"{kv.vault_url}{path}", params=params, headers=headers, verify=str(pki.ca_path), timeout=10)


# ---------------------------------------------------------------- issue_token
def test_issue_token_is_validated_and_uses_client_roles(entra: EntraStandIn) -> None:
    issued = entra.issue_token("app-one", DEFENDER_RESOURCE, roles=["Ti.ReadWrite"], claims={"xms_mirid": "/x"})
    assert set(issued) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    token = str(issued["access_token"])
    info = entra.token_info(token)
    assert info is not None and info.roles == ("Ti.ReadWrite",) and info.aud == DEFENDER_RESOURCE
    assert entra.validate(token) == "app-one" and entra.issued == 1
    assert claims_of(token)["xms_mirid"] == "/x" and info.claims["appid"] == "app-one"

    entra.set_roles("app-one", ["Alert.Read.All"])
    default = entra.token_info(str(entra.issue_token("app-one", DEFENDER_RESOURCE)["access_token"]))
    assert default is not None and default.roles == ("Alert.Read.All",)
    assert entra.validate(str(entra.issue_token("app-one", DEFENDER_RESOURCE, lifetime=0)["access_token"])) is None


# ----------------------------------------------------------- managed identity
def test_system_assigned_token_is_accepted_by_entra_and_defender(
    identity: ManagedIdentityStandIn,
    identity_env: dict[str, str],
    entra: EntraStandIn,
    defender: DefenderStandIn,
    pki: PKI,
) -> None:
    client = mi_client(msal.SystemAssignedManagedIdentity())
    result = client.acquire_token_for_client(resource=DEFENDER_RESOURCE)
    assert result["token_source"] == "identity_provider" and result["resource"] == DEFENDER_RESOURCE
    assert 3500 < result["expires_in"] <= entra.token_lifetime
    token = result["access_token"]
    assert entra.validate(token) == DEFAULT_SYSTEM_CLIENT_ID
    claims = claims_of(token)
    assert claims["appid"] == claims["azp"] == DEFAULT_SYSTEM_CLIENT_ID and claims["aud"] == DEFENDER_RESOURCE
    assert claims["oid"] == object_id_for(DEFAULT_SYSTEM_CLIENT_ID) and claims["roles"] == ["Ti.ReadWrite.All"]

    (call,) = identity.calls("token")
    assert call.query == {"api-version": "2019-08-01", "resource": DEFENDER_RESOURCE}
    assert call.headers["x-identity-header"] == identity.header and call.headers["metadata"] == "true"
    assert identity.issued == [(DEFAULT_SYSTEM_CLIENT_ID, DEFENDER_RESOURCE)]

    resp = requests.get(
        f"{defender.url}/api/indicators",
        headers={"Authorization": f"Bearer {token}"},
        verify=str(pki.ca_path),
        timeout=10,
    )
    assert resp.status_code == 200

    assert client.acquire_token_for_client(resource=DEFENDER_RESOURCE)["token_source"] == "cache"
    assert len(identity.calls("token")) == 1


def test_raw_response_shape(identity: ManagedIdentityStandIn, identity_env: dict[str, str]) -> None:
    resp = requests.get(
        identity.endpoint,
        params={"api-version": "2019-08-01", "resource": "https://vault.azure.net/"},
        headers={"X-IDENTITY-HEADER": identity.header},
        timeout=10,
    )
    body = resp.json()
    assert resp.status_code == 200 and resp.headers["X-CORRELATION-ID"]
    assert set(body) == {"access_token", "expires_on", "not_before", "resource", "token_type", "client_id"}
    assert isinstance(body["expires_on"], str) and int(body["expires_on"]) > time.time() + 3000
    assert body["resource"] == "https://vault.azure.net/" and body["token_type"] == "Bearer"
    assert body["client_id"] == DEFAULT_SYSTEM_CLIENT_ID
    info = identity.entra.token_info(body["access_token"])
    assert info is not None and info.aud == VAULT_RESOURCE  # no trailing slash


@pytest.mark.parametrize(
    ("kind", "wire"), [("client_id", "client_id"), ("resource_id", "mi_res_id"), ("object_id", "object_id")]
)
def test_user_assigned_identity_by_each_id(
    identity: ManagedIdentityStandIn, identity_env: dict[str, str], entra: EntraStandIn, kind: str, wire: str
) -> None:
    ua = next(i for i in identity.identities if i.client_id == UA_CLIENT_ID)
    value = {"client_id": ua.client_id, "resource_id": ua.resource_id, "object_id": ua.object_id}[kind]
    entra.set_roles(UA_CLIENT_ID, ["Ti.ReadWrite"])
    result = mi_client(msal.UserAssignedManagedIdentity(**{kind: value})).acquire_token_for_client(
        resource=VAULT_RESOURCE
    )
    assert entra.validate(result["access_token"]) == UA_CLIENT_ID
    info = entra.token_info(result["access_token"])
    assert info is not None and info.roles == ("Ti.ReadWrite",) and info.aud == VAULT_RESOURCE
    assert info.claims["xms_mirid"] == ua.resource_id and info.claims["oid"] == ua.object_id
    (call,) = identity.calls("token")
    assert call.query[wire] == value and identity.issued == [(UA_CLIENT_ID, VAULT_RESOURCE)]


def test_managed_identity_errors_through_msal(
    identity: ManagedIdentityStandIn, identity_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    unknown = mi_client(msal.UserAssignedManagedIdentity(client_id="00000000-1111-2222-3333-444444444444"))
    result = unknown.acquire_token_for_client(resource=VAULT_RESOURCE)
    assert result == {"error": "invalid_scope", "error_description": "400, Unable to load the proper Managed Identity."}

    old = identity.header
    identity.rotate_header()
    stale = mi_client(msal.SystemAssignedManagedIdentity()).acquire_token_for_client(resource=VAULT_RESOURCE)
    assert stale["error"] == "invalid_scope" and stale["error_description"].startswith("401, ")
    assert identity.calls("token", status=401)[0].headers["x-identity-header"] == old

    monkeypatch.setenv("IDENTITY_HEADER", identity.header)  # msal re-reads the variable on every request
    fresh = mi_client(msal.SystemAssignedManagedIdentity()).acquire_token_for_client(resource=VAULT_RESOURCE)
    assert "access_token" in fresh

    identity.remove(DEFAULT_SYSTEM_CLIENT_ID)
    gone = mi_client(msal.SystemAssignedManagedIdentity()).acquire_token_for_client(resource=VAULT_RESOURCE)
    assert gone["error_description"] == "400, Unable to load the proper Managed Identity."


def test_managed_identity_protocol_errors(identity: ManagedIdentityStandIn) -> None:
    ua = identity.identities[1]

    def get(params: dict[str, str], header: str | None = identity.header) -> requests.Response:
        headers = {"X-IDENTITY-HEADER": header} if header is not None else {}
        return requests.get(identity.endpoint, params=params, headers=headers, timeout=10)

    base = {"api-version": "2019-08-01", "resource": VAULT_RESOURCE}
    missing_header = get(base, header=None)
    assert missing_header.status_code == 400
    assert set(missing_header.json()) == {"statusCode", "message", "correlationId"}
    assert missing_header.json()["correlationId"] == missing_header.headers["X-CORRELATION-ID"]
    assert get(base, header="wrong").status_code == 401
    assert get({"resource": VAULT_RESOURCE}).status_code == 400
    assert get({**base, "api-version": "2017-09-01"}).status_code == 400
    assert get({"api-version": "2019-08-01"}).status_code == 400
    assert get({**base, "client_id": ua.client_id, "object_id": ua.object_id}).status_code == 400
    alias = get({**base, "principal_id": ua.object_id.upper()})
    assert alias.status_code == 200 and alias.json()["client_id"] == UA_CLIENT_ID
    assert requests.post(identity.endpoint, params=base, timeout=10).status_code == 405


# ------------------------------------------------ workload identity federation
def test_federated_assertion_file_is_reread_on_each_token_request(
    entra: EntraStandIn, pki: PKI, tmp_path: Path
) -> None:
    entra.register_federated(FED_CLIENT_ID, ISSUER, SUBJECT)
    entra.token_lifetime = 300  # msal treats < 300 s left as expired, so every call sends a token request
    token_file = tmp_path / "azure-identity-token"
    first = make_federated_assertion(ISSUER, SUBJECT)
    token_file.write_text(first + "\n")

    def read_assertion() -> str:
        return token_file.read_text().strip()

    app = cca(entra, pki, FED_CLIENT_ID, {"client_assertion": read_assertion})
    one = app.acquire_token_for_client(scopes=[DEFENDER_SCOPE])
    second = make_federated_assertion(ISSUER, SUBJECT)
    token_file.write_text(second + "\n")  # the kubelet rotates the projected token
    two = app.acquire_token_for_client(scopes=[DEFENDER_SCOPE])

    assert one["token_source"] == two["token_source"] == "identity_provider"
    assert entra.validate(one["access_token"]) == entra.validate(two["access_token"]) == FED_CLIENT_ID
    assert entra.assertions_used(FED_CLIENT_ID) == [first, second]
    assert [a.kind for a in entra.assertions] == ["federated", "federated"]
    assert all(a.error_code is None for a in entra.assertions)
    body = entra.calls("token", status=200)[-1].body
    assert body["client_assertion_type"] == JWT_BEARER and "client_secret" not in body


def _bare_jwt(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: make_federated_assertion(ISSUER, SUBJECT, not_before=time.time() - 7200), 700024),
        (lambda: make_federated_assertion(ISSUER, SUBJECT, not_before=time.time() + 600), 700024),
        (lambda: make_federated_assertion(ISSUER, "system:serviceaccount:misp:other"), 700213),
        (lambda: make_federated_assertion(ISSUER.rstrip("/"), SUBJECT), 700211),
        (lambda: make_federated_assertion(ISSUER, SUBJECT, audience="api://AzureADTokenExchangeX"), 70021),
        (lambda: make_federated_assertion(ISSUER, SUBJECT.upper()), 7002138),
        (lambda: _bare_jwt({"iss": ISSUER, "sub": SUBJECT, "aud": FIC_AUDIENCE}), 50027),
    ],
    ids=["expired", "not-yet-valid", "subject", "issuer-slash", "audience", "subject-case", "no-exp"],
)
def test_federated_rejections_match_entra(entra: EntraStandIn, pki: PKI, make: Any, code: int) -> None:
    entra.register_federated(FED_CLIENT_ID, ISSUER, SUBJECT)
    assertion = make()
    result = cca(entra, pki, FED_CLIENT_ID, {"client_assertion": lambda: assertion}).acquire_token_for_client(
        scopes=[DEFENDER_SCOPE]
    )
    assert result["error"] == "invalid_client" and result["error_codes"] == [code]
    assert result["error_description"].startswith(f"AADSTS{code}: ")
    assert entra.calls("token", status=401) and not entra.calls("token", status=200)
    assert entra.assertions[-1].error_code == code and entra.assertions[-1].assertion == assertion


def test_certificate_and_federated_credentials_coexist(
    entra: EntraStandIn, pki: PKI, client_certificate: tuple[Path, str]
) -> None:
    pem_path, thumbprint = client_certificate
    entra.register_certificate(FED_CLIENT_ID, pem_path)
    entra.register_federated(FED_CLIENT_ID, ISSUER, SUBJECT)
    by_cert = cca(entra, pki, FED_CLIENT_ID, {"private_key": pem_path.read_text(), "thumbprint": thumbprint})
    assert "access_token" in by_cert.acquire_token_for_client(scopes=[DEFENDER_SCOPE])
    assertion = make_federated_assertion(ISSUER, SUBJECT)
    by_fic = cca(entra, pki, FED_CLIENT_ID, {"client_assertion": lambda: assertion})
    assert "access_token" in by_fic.acquire_token_for_client(scopes=[DEFENDER_SCOPE])
    assert [a.kind for a in entra.assertions] == ["certificate", "federated"]
    assert entra.assertions_used(FED_CLIENT_ID, kind="federated") == [assertion]


# ------------------------------------------------------------------ Key Vault
def test_key_vault_with_managed_identity_token(
    identity: ManagedIdentityStandIn,
    identity_env: dict[str, str],
    keyvault: KeyVaultStandIn,
    entra: EntraStandIn,
    pki: PKI,
) -> None:
    first = keyvault.set_secret("misp-api-key", "s3cret-one")
    client = mi_client(msal.SystemAssignedManagedIdentity())
    token = client.acquire_token_for_client(resource=VAULT_RESOURCE)["access_token"]

    anonymous = vault_get(keyvault, pki, "/secrets/misp-api-key", None)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == (
        f'Bearer authorization="{entra.authority}", resource="https://vault.azure.net"'
    )
    assert anonymous.json() == {
        "error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}
    }

    denied = vault_get(keyvault, pki, "/secrets/misp-api-key", token)
    error = denied.json()["error"]
    assert denied.status_code == 403 and error["code"] == "Forbidden"
    assert (
        error["innererror"] == {"code": "ForbiddenByRbac"} and f"appid={DEFAULT_SYSTEM_CLIENT_ID}" in error["message"]
    )

    keyvault.grant(DEFAULT_SYSTEM_CLIENT_ID)
    ok = vault_get(keyvault, pki, "/secrets/misp-api-key", token)
    body = ok.json()
    assert ok.status_code == 200 and body["value"] == "s3cret-one"
    assert body["id"] == f"{keyvault.vault_url}/secrets/misp-api-key/{first}" == keyvault.secret_id("misp-api-key")
    assert body["attributes"]["enabled"] is True and body["attributes"]["recoveryLevel"] == "Recoverable+Purgeable"
    assert isinstance(body["attributes"]["created"], int) and isinstance(body["attributes"]["updated"], int)

    second = keyvault.set_secret("misp-api-key", "s3cret-two")
    assert vault_get(keyvault, pki, "/secrets/MISP-API-KEY/", token).json()["value"] == "s3cret-two"
    pinned = vault_get(keyvault, pki, f"/secrets/misp-api-key/{first}", token).json()
    assert pinned["value"] == "s3cret-one" and pinned["id"].endswith(first) and second != first

    missing = vault_get(keyvault, pki, "/secrets/otx-key", token)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "SecretNotFound"
    assert vault_get(keyvault, pki, "/secrets/misp-api-key/" + "0" * 32, token).status_code == 404
    assert vault_get(keyvault, pki, "/secrets/misp-api-key", token, api_version=None).status_code == 400
    assert vault_get(keyvault, pki, "/secrets/misp-api-key", token, api_version="1.0").status_code == 400
    assert vault_get(keyvault, pki, "/secrets/bad_name", token).status_code == 400

    defender_token = client.acquire_token_for_client(resource=DEFENDER_RESOURCE)["access_token"]
    wrong_aud = vault_get(keyvault, pki, "/secrets/misp-api-key", defender_token)
    assert wrong_aud.status_code == 401 and "AKV10022: Invalid audience" in wrong_aud.json()["error"]["message"]
    assert wrong_aud.headers["WWW-Authenticate"].startswith("Bearer authorization=")

    keyvault.revoke(DEFAULT_SYSTEM_CLIENT_ID)
    assert vault_get(keyvault, pki, "/secrets/misp-api-key", token).status_code == 403
    keyvault.grant(DEFAULT_SYSTEM_CLIENT_ID)
    entra.expire_all_tokens()
    expired = vault_get(keyvault, pki, "/secrets/misp-api-key", token)
    assert expired.status_code == 401 and "WWW-Authenticate" in expired.headers


def test_key_vault_with_client_credentials_token(keyvault: KeyVaultStandIn, entra: EntraStandIn, pki: PKI) -> None:
    keyvault.set_secret("misp-api-key", "from-cca", content_type="text/plain")
    keyvault.grant(TEST_CLIENT_ID)
    mine = cca(entra, pki, TEST_CLIENT_ID, TEST_CLIENT_SECRET).acquire_token_for_client(scopes=[VAULT_SCOPE])
    other = cca(entra, pki, OTHER_CLIENT_ID, OTHER_CLIENT_SECRET).acquire_token_for_client(scopes=[VAULT_SCOPE])
    info = entra.token_info(mine["access_token"])
    assert info is not None and info.aud == VAULT_RESOURCE

    ok = vault_get(keyvault, pki, "/secrets/misp-api-key", mine["access_token"])
    assert ok.status_code == 200 and ok.json()["value"] == "from-cca" and ok.json()["contentType"] == "text/plain"
    denied = vault_get(keyvault, pki, "/secrets/misp-api-key", other["access_token"])
    assert denied.status_code == 403 and denied.json()["error"]["innererror"]["code"] == "ForbiddenByRbac"
    assert [c.status for c in keyvault.calls("secret")] == [200, 403]
