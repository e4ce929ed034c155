"""Entra ID (Azure AD) v2.0 stand-in: OIDC discovery and client-credentials tokens.

Only what the real ``msal.ConfidentialClientApplication`` needs, answered with
the shapes and AADSTS texts login.microsoftonline.com uses, so the tool's
error handling is exercised against realistic payloads. Tokens are JWT-shaped
(a client could decode ``roles``) but their validity is decided here, by
lookup, which lets tests revoke or expire them at will.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.standins.base import Recorded, Request, Response, Route, StandIn, json_response, route
from tests.standins.tls import PKI

DEFAULT_TENANT = "5f1c9a2e-8b3d-4e6f-a7c0-2d9e4b1a6c38"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class TokenInfo:
    """Server-side record of an issued access token."""

    client_id: str
    roles: tuple[str, ...]
    aud: str
    expires_at: float  # time.time() epoch
    revoked: bool = False


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(obj: object) -> str:
    return _b64url(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


class EntraStandIn(StandIn):
    """HTTPS stand-in for ``https://login.microsoftonline.com/{tenant}``.

    Endpoints (log/fault names): ``discovery`` (GET
    ``/{tenant}/v2.0/.well-known/openid-configuration``) and ``token`` (POST
    ``/{tenant}/oauth2/v2.0/token``).
    """

    name = "entra"

    def __init__(
        self,
        pki: PKI,
        tenant: str = DEFAULT_TENANT,
        clients: dict[str, str | None] | None = None,
        token_lifetime: int = 3599,
        roles: Iterable[str] = ("Ti.ReadWrite.All",),
        display_names: dict[str, str] | None = None,
    ) -> None:
        super().__init__(pki)
        self.tenant = tenant
        self.clients: dict[str, str | None] = dict(clients or {})
        self.token_lifetime = token_lifetime
        self.roles = tuple(roles)
        self.client_roles: dict[str, tuple[str, ...]] = {}
        self.display_names = dict(display_names or {})
        self.issued = 0
        self._tokens: dict[str, TokenInfo] = {}
        self._certs: dict[str, list[x509.Certificate]] = {}
        self._state = threading.Lock()

    def routes(self) -> list[Route]:
        return [
            route("GET", r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration", "discovery", self._discovery),
            route("POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token", "token", self._token),
        ]

    # ---------------------------------------------------------------- test API
    @property
    def authority(self) -> str:
        """What to pass as MSAL's ``authority``."""
        return f"{self.url}/{self.tenant}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/{self.tenant}/oauth2/v2.0/token"

    def set_roles(self, client_id: str, roles: Iterable[str]) -> None:
        """Roles put into tokens issued to ``client_id`` from now on."""
        self.client_roles[client_id] = tuple(roles)

    def display_name(self, client_id: str) -> str:
        return self.display_names.get(client_id, f"App {client_id[:8]}")

    def register_certificate(self, client_id: str, cert: str | Path | bytes) -> None:
        """Accept client assertions for ``client_id`` signed by this cert's key.

        ``cert`` is PEM bytes or a path to a PEM holding (at least) the cert.
        The client becomes known even if it has no secret.
        """
        pem = cert if isinstance(cert, bytes) else Path(cert).read_bytes()
        with self._state:
            self._certs.setdefault(client_id, []).extend(x509.load_pem_x509_certificates(pem))
            self.clients.setdefault(client_id, None)

    def token_info(self, token: str) -> TokenInfo | None:
        """The record of an issued token regardless of validity (None if unknown)."""
        with self._state:
            return self._tokens.get(token)

    def validate(self, token: str) -> str | None:
        """Client id of a valid token; None when unknown, expired or revoked."""
        info = self.token_info(token)
        if info is None or info.revoked or info.expires_at <= time.time():
            return None
        return info.client_id

    def expire_all_tokens(self) -> None:
        """Revoke every token issued so far (as after a key roll or a long pause)."""
        with self._state:
            for info in self._tokens.values():
                info.revoked = True

    # ---------------------------------------------------------------- helpers
    def fault_body(self, recorded: Recorded, status: int) -> object:
        return self._aad_error("temporarily_unavailable", 50196 if status == 429 else 90033, "Service unavailable.")

    def _aad_error(self, error: str, code: int, text: str) -> dict[str, object]:
        now = dt.datetime.now(dt.timezone.utc)
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        return {
            "error": error,
            "error_description": (
                f"AADSTS{code}: {text}\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}\r\nTimestamp: {stamp}"
            ),
            "error_codes": [code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": corr,
            "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        }

    def _tenant_not_found(self, tenant: str) -> Response:
        return json_response(
            400,
            self._aad_error(
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
                "into the correct cloud. Check with your subscription administrator, this may happen if there "
                "are no active subscriptions for the tenant.",
            ),
        )

    # ---------------------------------------------------------------- handlers
    def _discovery(self, req: Request) -> Response:
        tenant = req.params["tenant"]
        if tenant != self.tenant:
            return self._tenant_not_found(tenant)
        base = f"{self.url}/{tenant}"
        return json_response(
            200,
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{self.url}/{tenant}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce", "tid", "ver"],
                "kerberos_endpoint": f"{base}/kerberos",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
                "rbac_url": "https://pas.windows.net",
            },
        )

    def _token(self, req: Request) -> Response:
        tenant = req.params["tenant"]
        if tenant != self.tenant:
            return self._tenant_not_found(tenant)
        form = req.body if isinstance(req.body, dict) else {}
        grant = form.get("grant_type", "")
        if grant != "client_credentials":
            return json_response(
                400,
                self._aad_error(
                    "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant}'."
                ),
            )
        client_id = form.get("client_id", "")
        if not client_id:
            return self._missing("client_id")
        with self._state:
            known = client_id in self.clients
            secret = self.clients.get(client_id)
        if not known:
            return json_response(
                400,
                self._aad_error(
                    "unauthorized_client",
                    700016,
                    f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can "
                    "happen if the application has not been installed by the administrator of the tenant or "
                    "consented to by any user in the tenant. You may have sent your authentication request to the "
                    "wrong tenant.",
                ),
            )
        scope = form.get("scope", "")
        if not scope:
            return self._missing("scope")
        resource = next((s for s in scope.split() if s.endswith("/.default")), None)
        if resource is None:
            return json_response(
                400,
                self._aad_error(
                    "invalid_scope",
                    1002012,
                    f"The provided value for scope {scope} is not valid. Client credential flows must have a scope "
                    "value with /.default suffixed to the resource identifier (application ID URI).",
                ),
            )
        if form.get("client_assertion_type") or form.get("client_assertion"):
            failure = self._check_assertion(client_id, form)
            if failure:
                return json_response(401, self._aad_error("invalid_client", 700027, failure))
        elif "client_secret" in form:
            if secret is None or not secrets.compare_digest(form["client_secret"], secret):
                return json_response(
                    401,
                    self._aad_error(
                        "invalid_client",
                        7000215,
                        "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                        "secret value, not the client secret ID, for a secret added to app "
                        f"'{client_id}'.",
                    ),
                )
        else:
            return json_response(
                401,
                self._aad_error(
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                ),
            )
        return json_response(200, self._issue(client_id, resource[: -len("/.default")]))

    def _missing(self, name: str) -> Response:
        return json_response(
            400,
            self._aad_error(
                "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'."
            ),
        )

    def _check_assertion(self, client_id: str, form: dict[str, str]) -> str | None:
        """Verify a private_key_jwt assertion; return an AADSTS text on failure."""
        if form.get("client_assertion_type") != JWT_BEARER:
            return "The client_assertion_type is not supported."
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return "Client assertion failed signature validation."
        alg = header.get("alg")
        if alg not in ("RS256", "PS256"):
            return f"Client assertion uses an unsupported algorithm '{alg}'."
        with self._state:
            certs = list(self._certs.get(client_id, []))
        # MSAL keeps base64 padding on x5t; RFC 7515 says unpadded. Accept both.
        x5t = str(header.get("x5t", "")).rstrip("=")
        x5t256 = str(header.get("x5t#S256", "")).rstrip("=")
        cert = None
        for candidate in certs:
            der = candidate.public_bytes(Encoding.DER)
            if x5t == _b64url(hashlib.sha1(der).digest()) or x5t256 == _b64url(hashlib.sha256(der).digest()):
                cert = candidate
                break
        if cert is None:
            return (
                "The certificate with identifier used to sign the client assertion is not registered on "
                f"application. [Reason - The key was not found., Thumbprint of key used by client: "
                f"'{header.get('x5t') or header.get('x5t#S256')}']"
            )
        try:
            claims = jwt.decode(
                assertion,
                cert.public_key(),  # type: ignore[arg-type]
                algorithms=[alg],
                audience=[self.token_endpoint, f"{self.url}/{self.tenant}/v2.0"],
                issuer=client_id,
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.InvalidSignatureError:
            return "Client assertion contains an invalid signature."
        except jwt.PyJWTError as exc:
            return f"Client assertion failed validation: {exc}."
        if claims.get("sub") != client_id:
            return "Client assertion subject does not match the client id."
        return None

    def _issue(self, client_id: str, aud: str) -> dict[str, object]:
        now = int(time.time())
        roles = self.client_roles.get(client_id, self.roles)
        payload = {
            "aud": aud,
            "iss": f"https://sts.windows.net/{self.tenant}/",
            "iat": now,
            "nbf": now,
            "exp": now + self.token_lifetime,
            "appid": client_id,
            "appidacr": "1",
            "idp": f"https://sts.windows.net/{self.tenant}/",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id)),
            "roles": list(roles),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id)),
            "tid": self.tenant,
            "uti": secrets.token_urlsafe(16),
            "ver": "1.0",
        }
        header = {"typ": "JWT", "alg": "RS256", "x5t": "standin", "kid": "standin"}
        token = f"{_b64json(header)}.{_b64json(payload)}.{_b64url(secrets.token_bytes(64))}"
        with self._state:
            self._tokens[token] = TokenInfo(client_id, tuple(roles), aud, time.time() + self.token_lifetime)
            self.issued += 1
        return {
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": token,
        }
