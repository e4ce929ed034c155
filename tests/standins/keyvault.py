"""Azure Key Vault data-plane stand-in (HTTPS): reading secrets with a bearer token.

Serves ``GET /secrets/{name}`` (latest version; ``/secrets/{name}/`` too, as the
Azure SDK sends it) and ``GET /secrets/{name}/{version}`` with
``?api-version=7.4``, as ``https://{vault}.vault.azure.net`` does (shared/
reference/entra-credentials.md (d)). Tokens are the Entra stand-in's: they must
be known, unexpired, unrevoked and have ``aud`` ``https://vault.azure.net``,
however they were obtained (managed identity stand-in with resource
``https://vault.azure.net`` or client credentials with scope
``https://vault.azure.net/.default``). Authorisation is the RBAC model: a
client id is either granted (Key Vault Secrets User) or not.

Documented behaviour modelled: 401 with ``WWW-Authenticate: Bearer
authorization="<authority>", resource="https://vault.azure.net"`` and
``AKV10000: Request is missing a Bearer or PoP token.``; a token for another
resource is 401 ``AKV10022: Invalid audience. Expected https://vault.azure.net,
found: <aud>.``; an ungranted caller is 403 ``Forbidden`` with innererror
``ForbiddenByRbac``; an unknown secret or version is 404 ``SecretNotFound``;
200 bodies are ``{"value", "id": ".../secrets/<name>/<version>", "attributes":
{...}}``. Secret names are case-insensitive, as in Key Vault.

Readings chosen where the docs are silent:

* Checks run in this order: api-version, authentication, name, authorisation,
  lookup. A missing api-version or one not in ``api_versions`` is 400
  ``BadParameter``; so is a name outside ``^[0-9a-zA-Z-]{1,127}$``.
* An unknown, expired or revoked token is 401 with the challenge and the
  message "Token validation failed." (the docs list no code for it). ``aud``
  compares without a trailing slash.
* A disabled secret is 403 ``Forbidden`` with innererror ``SecretDisabled``.
* The ``authorization`` in the challenge is the Entra stand-in's authority
  (``https://127.0.0.1:PORT/<tenant>``), the loopback twin of
  ``https://login.windows.net/<tenant>``.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.standins.base import Recorded, Request, Response, Route, StandIn, json_response, route
from tests.standins.entra import EntraStandIn
from tests.standins.tls import PKI

VAULT_RESOURCE = "https://vault.azure.net"
API_VERSIONS = ("7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-06-01", "2025-07-01")
NAME_PATTERN = re.compile(r"[0-9a-zA-Z-]{1,127}")
GET_SECRET_ACTION = "Microsoft.KeyVault/vaults/secrets/getSecret/action"
DEFAULT_SUBSCRIPTION = "6d1f0b2a-4c3e-4a5b-9e8f-7a6b5c4d3e2f"


@dataclass
class SecretVersion:
    """One stored version of a secret."""

    name: str
    version: str
    value: str
    created: int
    updated: int
    enabled: bool = True
    content_type: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


class KeyVaultStandIn(StandIn):
    """Stand-in for ``https://{vault_name}.vault.azure.net``. Endpoint name: ``secret``.

    Test API: ``set_secret(name, value)`` (returns the new version id),
    ``grant(client_id)``/``revoke(client_id)``, ``secret_id(name, version)``.
    """

    name = "keyvault"

    def __init__(
        self,
        pki: PKI,
        entra: EntraStandIn,
        *,
        vault_name: str = "kv-misp2defender",
        resource: str = VAULT_RESOURCE,
        api_versions: Iterable[str] = API_VERSIONS,
        granted: Iterable[str] = (),
        location: str = "westeurope",
    ) -> None:
        super().__init__(pki)
        self.entra = entra
        self.vault_name = vault_name
        self.resource = resource.rstrip("/")
        self.api_versions = tuple(api_versions)
        self.location = location
        self.granted: set[str] = {c.lower() for c in granted}
        self._secrets: dict[str, list[SecretVersion]] = {}
        self._state = threading.Lock()

    def routes(self) -> list[Route]:
        return [route("GET", r"/secrets/(?P<name>[^/]+)(?:/(?P<version>[^/]*))?", "secret", self._get_secret)]

    # ---------------------------------------------------------------- test API
    @property
    def vault_url(self) -> str:
        """What the tool should use as the vault URL (``https://{vault}.vault.azure.net``)."""
        return self.url

    def set_secret(
        self,
        name: str,
        value: str,
        *,
        enabled: bool = True,
        content_type: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Store a new version of ``name`` (it becomes the latest); returns its version id."""
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"invalid Key Vault secret name {name!r}")
        now = int(time.time())
        version = uuid.uuid4().hex
        with self._state:
            versions = self._secrets.setdefault(name.lower(), [])
            stored_name = versions[0].name if versions else name
            stored = SecretVersion(stored_name, version, value, now, now, enabled, content_type, dict(tags or {}))
            versions.append(stored)
        return version

    def grant(self, client_id: str) -> None:
        """Give ``client_id`` the Key Vault Secrets User role on this vault."""
        with self._state:
            self.granted.add(client_id.lower())

    def revoke(self, client_id: str) -> None:
        with self._state:
            self.granted.discard(client_id.lower())

    def secret_id(self, name: str, version: str | None = None) -> str:
        """The ``id`` Key Vault reports for a stored version (the latest when None); KeyError if absent."""
        with self._state:
            versions = self._secrets.get(name.lower(), [])
            chosen = (
                (versions[-1] if versions else None)
                if version is None
                else next((v for v in versions if v.version == version), None)
            )
        if chosen is None:
            raise KeyError(f"{name}/{version}" if version else name)
        return f"{self.vault_url}/secrets/{chosen.name}/{chosen.version}"

    # ---------------------------------------------------------------- helpers
    def fault_body(self, recorded: Recorded, status: int) -> Any:
        if status == 429:
            return self._body(
                "Throttled",
                "Request was not processed because too many requests were received. Reason: "
                "VaultRequestTypeLimitReached",
            )
        return super().fault_body(recorded, status)

    def on_answer(self, recorded: Recorded, response: Response) -> None:
        response.headers.setdefault("Cache-Control", "no-cache")
        response.headers.setdefault("x-ms-request-id", str(uuid.uuid4()))
        response.headers.setdefault("x-ms-keyvault-region", self.location)
        response.headers.setdefault("x-ms-keyvault-service-version", "1.9.0.0")

    @staticmethod
    def _body(code: str, message: str, inner: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {"code": code, "message": message}
        if inner:
            error["innererror"] = {"code": inner}
        return {"error": error}

    def _unauthorized(self, message: str) -> Response:
        challenge = f'Bearer authorization="{self.entra.authority}", resource="{self.resource}"'
        return json_response(401, self._body("Unauthorized", message), {"WWW-Authenticate": challenge})

    def _forbidden(self, client_id: str, oid: str, name: str) -> Response:
        vault_id = (
            f"/subscriptions/{DEFAULT_SUBSCRIPTION}/resourcegroups/rg-misp2defender"
            f"/providers/microsoft.keyvault/vaults/{self.vault_name}"
        )
        message = (
            "Caller is not authorized to perform action on resource.\r\n"
            "If role assignments, deny assignments or role definitions were changed recently, please observe "
            "propagation time.\r\n"
            f"Caller: appid={client_id};oid={oid};iss=https://sts.windows.net/{self.entra.tenant}/\r\n"
            f"Action: '{GET_SECRET_ACTION}'\r\n"
            f"Resource: '{vault_id}/secrets/{name.lower()}'\r\n"
            "Assignment: (not found)\r\n"
            "DenyAssignmentId: null\r\n"
            "DecisionReason: null \r\n"
            f"Vault: {self.vault_name};location={self.location}\r\n"
        )
        return json_response(403, self._body("Forbidden", message, "ForbiddenByRbac"))

    # ---------------------------------------------------------------- handler
    def _get_secret(self, req: Request) -> Response:
        version_param = req.query.get("api-version")
        if not version_param:
            return json_response(400, self._body("BadParameter", "The api-version query parameter is missing."))
        if version_param not in self.api_versions:
            return json_response(
                400,
                self._body(
                    "BadParameter",
                    f"The specified version ({version_param}) is not recognized. Consider using the latest "
                    f"supported version ({self.api_versions[-1]}).",
                ),
            )

        auth = req.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token:
            return self._unauthorized("AKV10000: Request is missing a Bearer or PoP token.")
        client = self.entra.validate(token)
        info = self.entra.token_info(token) if client else None
        if client is None or info is None:
            return self._unauthorized("Token validation failed.")
        if info.aud.rstrip("/") != self.resource:
            return self._unauthorized(f"AKV10022: Invalid audience. Expected {self.resource}, found: {info.aud}.")

        name = req.params["name"]
        if not NAME_PATTERN.fullmatch(name):
            return json_response(400, self._body("BadParameter", f"The request URI contains an invalid name: {name}"))
        with self._state:
            allowed = client.lower() in self.granted
            versions = list(self._secrets.get(name.lower(), []))
        if not allowed:
            oid = str(info.claims.get("oid", ""))
            return self._forbidden(client, oid, name)

        wanted = req.params.get("version") or ""
        found = (
            next((v for v in versions if v.version == wanted.lower()), None)
            if wanted
            else (versions[-1] if versions else None)
        )
        if found is None:
            shown = f"{name}/{wanted}" if wanted else name
            return json_response(
                404,
                self._body(
                    "SecretNotFound",
                    f"A secret with (name/id) {shown} was not found in this key vault. If you recently deleted this "
                    "secret you may be able to recover it using the correct recovery command. For help resolving "
                    "this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
                ),
            )
        if not found.enabled:
            return json_response(
                403, self._body("Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled")
            )
        body: dict[str, Any] = {
            "value": found.value,
            "id": f"{self.vault_url}/secrets/{found.name}/{found.version}",
            "attributes": {
                "enabled": found.enabled,
                "created": found.created,
                "updated": found.updated,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
        }
        if found.content_type is not None:
            body["contentType"] = found.content_type
        if found.tags:
            body["tags"] = dict(found.tags)
        return json_response(200, body)
