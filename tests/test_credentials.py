"""Credentials without stored secrets (issue 11): managed identity, federation, secret files, Key Vault.

Real msal and requests against loopback stand-ins: an App Service managed identity endpoint
(IDENTITY_ENDPOINT/IDENTITY_HEADER set to 127.0.0.1 by the ``identity`` fixture; IMDS is pointed at
a closed loopback port for every test), Entra with federated credentials, and an HTTPS Key Vault.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Tool
from tests.standins.entra import make_federated_assertion
from tests.standins.identity import DEFAULT_SYSTEM_CLIENT_ID
from tests.util import MISP_KEY, SAMPLE_KEYS, TEST_CLIENT_ID, TEST_CLIENT_SECRET, TEST_TENANT

USER_ASSIGNED = "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
ISSUER = "https://oidc.prod-aks.azure.com/5f1c9a2e-8b3d-4e6f-a7c0-2d9e4b1a6c38/"
SUBJECT = "system:serviceaccount:misp:misp2defender"


def owned_by(tool: Tool, client_id: str) -> set[tuple[str, str]]:
    return {(i["indicatorType"], i["indicatorValue"]) for i in tool.defender.owned_by(client_id)}


def everything_written(tool: Tool, *results) -> str:
    texts = [r.stdout + r.stderr for r in results]
    texts += [p.read_text(errors="replace") for p in tool.written_files()
              if not p.name.startswith("config") and p.name not in ("misp-key", "client-secret")]
    return "\n".join(texts)


# --- Managed identity --------------------------------------------------------------------------------

def test_a_system_assigned_identity_syncs_with_no_secret_anywhere(tool: Tool, identity) -> None:
    config = {"graph_auth": {"managed_identity": True}, "misp_key": MISP_KEY}
    first = tool.run(**config)
    assert first.code == 0, first.stderr
    assert owned_by(tool, DEFAULT_SYSTEM_CLIENT_ID) == SAMPLE_KEYS  # owned as the identity's app id
    second = tool.run(**config)
    assert second.code == 0 and second.counts["created"] == second.counts["updated"] == 0
    assert second.counts["kept"] == 36  # the identity recognises its own indicators
    assert tool.entra.calls("token") == []  # no client-credentials request at all
    assert identity.calls("token") and "client_id" not in identity.calls("token")[0].query
    check = tool.run("--check", **config)
    assert check.code == 0, check.stdout
    assert (f"✓ Entra: managed identity (system-assigned) on App Service or Functions, owns indicators as "
            f"{DEFAULT_SYSTEM_CLIENT_ID}") in check.stdout


def test_a_user_assigned_identity_is_asked_for_by_its_client_id(tool: Tool, identity) -> None:
    identity.add_user_assigned(USER_ASSIGNED, name="id-misp2defender")
    result = tool.run(graph_auth={"managed_identity": {"client_id": USER_ASSIGNED}})
    assert result.code == 0, result.stderr
    assert {call.query.get("client_id") for call in identity.calls("token")} == {USER_ASSIGNED}
    assert owned_by(tool, USER_ASSIGNED) == SAMPLE_KEYS


def test_an_identity_the_host_does_not_have_is_a_credential_error(tool: Tool, identity) -> None:
    result = tool.run(graph_auth={"managed_identity": {"client_id": USER_ASSIGNED}})
    assert result.code == 2
    assert "managed identity was refused" in result.stderr
    assert tool.defender.calls() == []


# --- Workload identity federation --------------------------------------------------------------------

def federated(tool: Tool, token_file: Path, lifetime: int = 3600) -> dict:
    tool.entra.register_federated(TEST_CLIENT_ID, ISSUER, SUBJECT)
    token_file.write_text(make_federated_assertion(ISSUER, SUBJECT, lifetime=lifetime) + "\n")
    return {"graph_auth": {"tenant": TEST_TENANT, "client_id": TEST_CLIENT_ID, "authority": tool.entra.url,
                           "client_assertion_file": str(token_file)}}


def test_a_federated_token_file_is_read_again_when_it_rotates(tool: Tool) -> None:
    token_file = tool.tmp / "azure-identity-token"
    config = federated(tool, token_file)
    first_token = token_file.read_text().strip()
    rotated = make_federated_assertion(ISSUER, SUBJECT)

    def rotate_and_expire() -> None:  # Kubernetes rotates the file; the access token runs out meanwhile
        token_file.write_text(rotated)
        tool.entra.expire_all_tokens()

    tool.defender.after("import", 1, rotate_and_expire)
    result = tool.run(max_indicators_per_query=10, **config)
    assert result.code == 0, result.stderr
    assert owned_by(tool, TEST_CLIENT_ID) == SAMPLE_KEYS
    assert tool.entra.assertions_used(TEST_CLIENT_ID) == [first_token, rotated]
    assert all("client_secret" not in call.body for call in tool.entra.calls("token"))


def test_an_expired_federated_token_stops_the_run_with_its_fix(tool: Tool) -> None:
    config = federated(tool, tool.tmp / "token", lifetime=-60)
    result = tool.run(**config)
    assert result.code == 2
    assert "federated token (client_assertion_file: expired or not yet valid" in result.stderr
    assert "federated credential whose issuer, subject and audience" in result.stderr  # not a secret's fix
    check = tool.run("--check", **config)
    assert "✗ Entra:" in check.stdout and "fix:" in check.stdout
    assert "client_secret = the secret *value*" not in check.stdout


def test_aks_workload_identity_variables_are_used_when_graph_auth_names_no_credential(tool: Tool,
                                                                                       monkeypatch) -> None:
    token_file = tool.tmp / "aks-token"
    federated(tool, token_file)
    monkeypatch.setenv("AZURE_TENANT_ID", TEST_TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", TEST_CLIENT_ID)
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", tool.entra.url + "/")
    result = tool.run(graph_auth={})
    assert result.code == 0, result.stderr
    assert owned_by(tool, TEST_CLIENT_ID) == SAMPLE_KEYS
    check = tool.run("--check", graph_auth={})
    assert "✓ Entra: workload identity federation (AZURE_* variables)" in check.stdout


# --- Secret files and Key Vault ----------------------------------------------------------------------

def test_secrets_from_files_and_key_vault_are_named_in_check_and_never_written(tool: Tool, identity, keyvault,
                                                                                 monkeypatch) -> None:
    keyvault.set_secret("m2d-app-secret", TEST_CLIENT_SECRET)
    keyvault.grant(DEFAULT_SYSTEM_CLIENT_ID)  # the machine's identity reads the vault
    misp_key_file = tool.tmp / "misp-key"
    misp_key_file.write_text(MISP_KEY + "\n")
    misp_key_file.chmod(0o600)
    monkeypatch.setenv("MISP2DEFENDER_MISP_KEY_FILE", str(misp_key_file))
    config = {"graph_auth": {"tenant": TEST_TENANT, "client_id": TEST_CLIENT_ID, "authority": tool.entra.url},
              "misp_key": "", "key_vault_url": keyvault.vault_url,
              "key_vault_secrets": {"client_secret": "m2d-app-secret"}}
    result = tool.run("-vv", verbose_log=True, **config)
    assert result.code == 0, result.stderr
    assert owned_by(tool, TEST_CLIENT_ID) == SAMPLE_KEYS
    assert [call.path for call in keyvault.calls("secret")] == ["/secrets/m2d-app-secret"]
    check = tool.run("--check", **config)
    assert check.code == 0, check.stdout
    assert "✓ secrets: MISP key from MISP2DEFENDER_MISP_KEY_FILE" in check.stdout
    assert "✓ Entra: client secret from Key Vault secret m2d-app-secret" in check.stdout
    written = everything_written(tool, result, check)
    assert TEST_CLIENT_SECRET not in written and MISP_KEY not in written


def test_check_reads_key_vault_for_a_tenant_even_when_the_first_has_its_own_credential(tool: Tool, identity,
                                                                                       keyvault) -> None:
    keyvault.set_secret("m2d-app-secret", TEST_CLIENT_SECRET)
    keyvault.grant(DEFAULT_SYSTEM_CLIENT_ID)
    config = {"graph_auth": {"tenant": TEST_TENANT, "client_id": TEST_CLIENT_ID, "authority": tool.entra.url},
              "key_vault_url": keyvault.vault_url, "key_vault_secrets": {"client_secret": "m2d-app-secret"},
              "tenants": [{"name": "own", "graph_auth": {"client_secret": TEST_CLIENT_SECRET}}, {"name": "vaulted"}]}
    assert tool.run(**config).code == 0
    check = tool.run("--check", **config)
    assert check.code == 0, check.stdout
    assert "✓ Entra: client secret from Key Vault secret m2d-app-secret" in check.stdout


def test_a_client_secret_file_and_the_file_wins_over_the_variable(tool: Tool, monkeypatch) -> None:
    secret_file = tool.tmp / "client-secret"
    secret_file.write_text(TEST_CLIENT_SECRET + "\n")
    monkeypatch.setenv("MISP2DEFENDER_CLIENT_SECRET_FILE", str(secret_file))
    monkeypatch.setenv("MISP2DEFENDER_CLIENT_SECRET", "a-stale-secret-in-the-environment")
    graph_auth = {k: v for k, v in tool.defaults["graph_auth"].items() if k != "client_secret"}
    result = tool.run(graph_auth=graph_auth)
    assert result.code == 0, result.stderr
    check = tool.run("--check", graph_auth=graph_auth)
    assert "✓ Entra: client secret from MISP2DEFENDER_CLIENT_SECRET_FILE" in check.stdout


@pytest.mark.parametrize("status,fix", [(403, "Key Vault Secrets User"), (404, "check key_vault_secrets")])
def test_key_vault_refusals_are_explained(tool: Tool, identity, keyvault, status: int, fix: str) -> None:
    if status == 404:
        keyvault.grant(TEST_CLIENT_ID)  # the app reads the vault (its secret is not in it); the name is wrong
    config = {"key_vault_url": keyvault.vault_url, "key_vault_secrets": {"misp_key": "misp-api-key"}}
    result = tool.run(**config)
    assert result.code == 2
    assert fix in result.stderr and f"HTTP {status}" in result.stderr
    assert tool.misp.calls() == [] and tool.defender.calls() == []
    check = tool.run("--check", **config)
    assert "✗ Key Vault" in check.stdout and fix in check.stdout


# --- Bad input: exit 2 naming the key, nothing contacted ------------------------------------------------

BAD = [
    ({"graph_auth": {"managed_identity": "yes"}}, {}, "graph_auth['managed_identity'] must be True"),
    ({"graph_auth": {"managed_identity": {"name": "x"}}}, {}, "graph_auth['managed_identity'] must be True"),
    ({"graph_auth": {"tenant": TEST_TENANT, "client_id": TEST_CLIENT_ID, "client_assertion_file": "/nonexistent"}},
     {}, "graph_auth['client_assertion_file'] names a file that does not exist"),
    ({}, {"MISP2DEFENDER_MISP_KEY_FILE": "EMPTY"}, "MISP2DEFENDER_MISP_KEY_FILE names"),
    ({}, {"MISP2DEFENDER_OTX_KEY_FILE": "/nonexistent/otx"}, "MISP2DEFENDER_OTX_KEY_FILE names '/nonexistent/otx'"),
    ({"key_vault_url": "http://vault.example", "key_vault_secrets": {"misp_key": "k"}}, {},
     "key_vault_url must be an https URL"),
    ({"key_vault_secrets": {"misp_key": "k"}}, {}, "key_vault_url is required"),
    ({"key_vault_url": "https://v.vault.azure.net", "key_vault_secrets": {"misp_password": "k"}}, {},
     "key_vault_secrets is 'misp_password'"),
]


@pytest.mark.parametrize("overrides,environment,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_credential_settings_stop_before_anything_is_contacted(tool: Tool, monkeypatch, overrides: dict,
                                                                    environment: dict, message: str) -> None:
    for name, value in environment.items():
        if value == "EMPTY":
            (tool.tmp / "empty").write_text("\n")
            value = str(tool.tmp / "empty")
        monkeypatch.setenv(name, value)
    result = tool.run(**overrides)
    assert result.code == 2
    assert message in result.stderr
    assert "EMPTY" not in result.stderr
    assert tool.misp.calls() == [] and tool.entra.calls() == [] and tool.defender.calls() == []
