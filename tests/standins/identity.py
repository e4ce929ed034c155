"""App Service / Azure Functions managed identity endpoint stand-in (plain http).

On App Service the platform runs a local token service and sets
``IDENTITY_ENDPOINT`` (``http://localhost:8081/msi/token`` or similar) and
``IDENTITY_HEADER``; ``msal.ManagedIdentityClient`` (and the tool) send
``GET $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=<uri>[&client_id=|
&mi_res_id=|&object_id=]`` with the header ``X-IDENTITY-HEADER`` (and
``Metadata: true``). Protocol from shared/reference/entra-credentials.md (a),
the App Service "managed identity" article and msal 1.39's
``_obtain_token_on_app_service``.

Tokens are minted by ``EntraStandIn.issue_token`` (aud = the resource without a
trailing slash, ``appid``/``azp`` = the identity's client id, ``oid``/``sub`` =
its object id, ``xms_mirid`` = its resource id, roles = the Entra stand-in's
roles for that client id), so the Defender and Key Vault stand-ins accept them.

Readings chosen where the docs are silent:

* Errors use the platform's JSON shape ``{"statusCode", "message",
  "correlationId"}`` (seen in public reports; msal turns it into
  ``{"error": "invalid_scope", "error_description": "<statusCode>, <message>"}``).
* Missing ``X-IDENTITY-HEADER`` → 400; a wrong value → 401 (public reports show
  401 for a bad header on the 2019-08-01 protocol).
* Missing ``resource`` or ``api-version``, an ``api-version`` older than
  2019-08-01 (the legacy ``secret``-header protocol is not modelled), or more
  than one of ``client_id``/``principal_id``/``object_id``/``mi_res_id`` → 400.
* An identity the app does not have (or no id on an app without a
  system-assigned identity) → 400 "Unable to load the proper Managed Identity."
  (azure-sdk-for-net#43691). Ids compare case-insensitively (GUIDs, ARM ids).
* Any resource URI is accepted (the real service answers a vague 500 for a bad
  one); the response echoes ``resource`` as requested and adds ``not_before``
  (listed in the docs' table, absent from its example).
"""

from __future__ import annotations

import re
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from tests.standins.base import Recorded, Request, Response, Route, StandIn, json_response, route
from tests.standins.entra import EntraStandIn

API_VERSION = "2019-08-01"
DEFAULT_SYSTEM_CLIENT_ID = "3c8e5a1f-7b2d-4f6e-9a0c-1d2e3f4a5b6c"
DEFAULT_SUBSCRIPTION = "6d1f0b2a-4c3e-4a5b-9e8f-7a6b5c4d3e2f"
DEFAULT_RESOURCE_GROUP = "rg-misp2defender"
SELECTORS = ("client_id", "principal_id", "object_id", "mi_res_id")
NO_IDENTITY = "Unable to load the proper Managed Identity."


@dataclass(frozen=True)
class Identity:
    """One managed identity of the app: how a request can address it."""

    client_id: str
    object_id: str
    resource_id: str
    system: bool = False


def object_id_for(client_id: str) -> str:
    """The object (principal) id the Entra stand-in puts in ``oid`` by default."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, client_id))


class ManagedIdentityStandIn(StandIn):
    """Stand-in for the App Service token service. Endpoint name: ``token``.

    ``system_client_id`` is the app id of the system-assigned identity (None:
    the app has none). Add user-assigned identities with ``add_user_assigned``.
    ``env()`` gives the two variables to set; ``rotate_header()`` changes the
    secret as the platform does. ``issued`` lists ``(client_id, resource)`` of
    every token handed out, in order.
    """

    name = "identity"

    def __init__(
        self,
        entra: EntraStandIn,
        *,
        system_client_id: str | None = DEFAULT_SYSTEM_CLIENT_ID,
        header: str | None = None,
        path: str = "/msi/token",
        token_lifetime: int | None = None,
        site: str = "misp2defender-func",
    ) -> None:
        super().__init__(None)  # App Service's endpoint is plain http on localhost
        self.entra = entra
        self.header = header or str(uuid.uuid4())
        self.path = path
        self.token_lifetime = token_lifetime
        self.identities: list[Identity] = []
        self.issued: list[tuple[str, str]] = []
        self._state = threading.Lock()
        if system_client_id is not None:
            site_id = (
                f"/subscriptions/{DEFAULT_SUBSCRIPTION}/resourceGroups/{DEFAULT_RESOURCE_GROUP}"
                f"/providers/Microsoft.Web/sites/{site}"
            )
            self.identities.append(Identity(system_client_id, object_id_for(system_client_id), site_id, True))

    def routes(self) -> list[Route]:
        return [route("GET", re.escape(self.path), "token", self._token)]

    # ---------------------------------------------------------------- test API
    @property
    def endpoint(self) -> str:
        """The value of ``IDENTITY_ENDPOINT``."""
        return f"{self.url}{self.path}"

    def env(self) -> dict[str, str]:
        """``IDENTITY_ENDPOINT``/``IDENTITY_HEADER`` as App Service sets them."""
        return {"IDENTITY_ENDPOINT": self.endpoint, "IDENTITY_HEADER": self.header}

    def rotate_header(self) -> str:
        """Replace the identity header (the old value is refused from now on); returns the new one."""
        self.header = str(uuid.uuid4())
        return self.header

    @property
    def system_assigned(self) -> Identity | None:
        return next((i for i in self.identities if i.system), None)

    def add_user_assigned(
        self, client_id: str, *, object_id: str | None = None, resource_id: str | None = None, name: str | None = None
    ) -> Identity:
        """Attach a user-assigned identity, addressable by client id, object id or resource id."""
        name = name or f"id-{client_id[:8]}"
        identity = Identity(
            client_id,
            object_id or object_id_for(client_id),
            resource_id
            or (
                f"/subscriptions/{DEFAULT_SUBSCRIPTION}/resourcegroups/{DEFAULT_RESOURCE_GROUP}"
                f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            ),
        )
        with self._state:
            self.identities.append(identity)
        return identity

    def remove(self, client_id: str) -> None:
        """Detach an identity (system or user-assigned) from the app."""
        with self._state:
            self.identities = [i for i in self.identities if i.client_id.lower() != client_id.lower()]

    # ---------------------------------------------------------------- helpers
    def fault_body(self, recorded: Recorded, status: int) -> Any:
        return {"statusCode": status, "message": "An unexpected error occured while fetching the AAD Token."}

    def on_answer(self, recorded: Recorded, response: Response) -> None:
        response.headers.setdefault("X-CORRELATION-ID", str(uuid.uuid4()))
        body = response.body
        if isinstance(body, dict) and "statusCode" in body and "correlationId" not in body:
            response.body = {**body, "correlationId": response.headers["X-CORRELATION-ID"]}

    @staticmethod
    def _error(status: int, message: str) -> Response:
        return json_response(status, {"statusCode": status, "message": message})

    def _find(self, query: dict[str, str]) -> Identity | None:
        with self._state:
            identities = list(self.identities)
        if "client_id" in query:
            want, attr = query["client_id"], "client_id"
        elif "principal_id" in query or "object_id" in query:
            want, attr = query.get("principal_id", query.get("object_id", "")), "object_id"
        elif "mi_res_id" in query:
            want, attr = query["mi_res_id"], "resource_id"
        else:
            return next((i for i in identities if i.system), None)
        return next((i for i in identities if getattr(i, attr).lower() == want.lower() and want), None)

    # ---------------------------------------------------------------- handler
    def _token(self, req: Request) -> Response:
        presented = req.headers.get("x-identity-header")
        if not presented:
            return self._error(400, "The X-IDENTITY-HEADER header is required.")
        if presented != self.header:
            return self._error(401, "The X-IDENTITY-HEADER header is invalid.")
        version = req.query.get("api-version", "")
        if not version:
            return self._error(400, "The api-version query parameter is required.")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}(-preview)?", version) or version < API_VERSION:
            return self._error(400, f"The api-version '{version}' is not supported; use {API_VERSION} or later.")
        resource = req.query.get("resource", "")
        if not resource:
            return self._error(400, "The resource query parameter is required.")
        if sum(1 for s in SELECTORS if s in req.query) > 1:
            return self._error(400, "Only one of client_id, principal_id, object_id or mi_res_id may be specified.")
        identity = self._find(req.query)
        if identity is None:
            return self._error(400, NO_IDENTITY)
        aud = resource.rstrip("/")
        issued = self.entra.issue_token(
            identity.client_id,
            aud,
            lifetime=self.token_lifetime,
            claims={
                "azp": identity.client_id,
                "oid": identity.object_id,
                "sub": identity.object_id,
                "idtyp": "app",
                "xms_mirid": identity.resource_id,
            },
        )
        token = str(issued["access_token"])
        info = self.entra.token_info(token)
        assert info is not None
        with self._state:
            self.issued.append((identity.client_id, resource))
        return json_response(
            200,
            {
                "access_token": token,
                "expires_on": str(info.claims["exp"]),
                "not_before": str(info.claims["nbf"]),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": identity.client_id,
            },
        )
