"""Entra ID (Azure AD) v2.0 stand-in: OIDC discovery and client-credentials tokens.

Only what the real ``msal.ConfidentialClientApplication`` needs, answered with
the shapes and AADSTS texts login.microsoftonline.com uses, so the tool's
error handling is exercised against realistic payloads. Tokens are JWT-shaped
(a client could decode ``roles``) but their validity is decided here, by
lookup, which lets tests revoke or expire them at will. Other stand-ins (the
managed identity endpoint, Key Vault, Defender) mint and check tokens through
``issue_token``/``validate``/``token_info``, so one token store serves them all.

Three client credentials: a secret, a certificate (private_key_jwt) and a
federated identity credential (workload identity federation, as on AKS). Readings
chosen where shared/reference/entra-credentials.md is silent:

* A ``client_assertion`` whose unverified ``iss`` equals the client id is a
  private_key_jwt (certificate) assertion, as before; any other issuer makes it
  a federated assertion, matched against the client's registered FICs.
* The external issuer's signature is **not** verified (the stand-in has no
  access to the issuer's JWKS); only the claims are checked. So AADSTS90061
  (issuer unreachable) and signature failures of federated tokens never occur.
* FIC matching is checked issuer first (AADSTS700211), then subject within that
  issuer (AADSTS7002138 if it only matches case-insensitively, else
  AADSTS700213), then audience (AADSTS70021), then the time range
  (AADSTS700024). Issuer and subject compare exactly, so a missing trailing
  ``/`` on the issuer is a mismatch. Every failure is HTTP 401 ``invalid_client``.
* ``clock_skew`` (default 0 s) is the tolerance on ``nbf``/``exp`` of assertions;
  Entra tolerates a few minutes, the stand-in none, so expiry tests need no sleep.
* A token missing ``iss``/``sub``/``aud``/``exp`` or not a JWT at all is
  AADSTS50027 (invalid or malformed JWT), also 401 ``invalid_client``.
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.standins.base import Recorded, Request, Response, Route, StandIn, json_response, route
from tests.standins.tls import PKI

DEFAULT_TENANT = "5f1c9a2e-8b3d-4e6f-a7c0-2d9e4b1a6c38"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FIC_AUDIENCE = "api://AzureADTokenExchange"


@dataclass
class TokenInfo:
    """Server-side record of an issued access token."""

    client_id: str
    roles: tuple[str, ...]
    aud: str
    expires_at: float  # time.time() epoch
    revoked: bool = False
    claims: dict[str, Any] = field(default_factory=dict)  # the JWT payload as issued


@dataclass(frozen=True)
class FederatedCredential:
    """A federated identity credential (FIC) on an app registration."""

    client_id: str
    issuer: str
    subject: str
    audience: str = FIC_AUDIENCE


@dataclass
class AssertionUse:
    """One token request that presented a ``client_assertion``.

    ``kind`` is ``"federated"`` or ``"certificate"``; ``claims`` is the
    unverified payload (empty if it was not a JWT); ``error_code`` is the
    AADSTS number of the rejection, None when a token was issued.
    """

    client_id: str
    kind: str
    assertion: str
    claims: dict[str, Any]
    error_code: int | None
    t: float


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(obj: object) -> str:
    return _b64url(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def _aad_time(epoch: float) -> str:
    """Entra's timestamp style in AADSTS texts: 2021-12-02T13:27:48.2413326Z."""
    moment = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}0Z"


def make_federated_assertion(
    issuer: str,
    subject: str,
    audience: str = FIC_AUDIENCE,
    lifetime: int = 3600,
    not_before: float | None = None,
) -> str:
    """A workload identity token as a Kubernetes projected service-account token looks.

    ``not_before`` (epoch, default now) is ``nbf``/``iat``; ``exp`` is
    ``not_before + lifetime``, so a negative lifetime or an old ``not_before``
    gives an expired token. The signature is random bytes: the Entra stand-in
    does not verify issuer signatures (module docstring), and a unique ``jti``
    makes every call's token distinct so rotation is observable.
    """
    nbf = int(time.time() if not_before is None else not_before)
    payload = {
        "aud": [audience],
        "exp": nbf + int(lifetime),
        "iat": nbf,
        "iss": issuer,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "workload"}},
        "nbf": nbf,
        "sub": subject,
    }
    header = {"alg": "RS256", "kid": _b64url(hashlib.sha256(issuer.encode("utf-8")).digest()[:16])}
    return f"{_b64json(header)}.{_b64json(payload)}.{_b64url(secrets.token_bytes(256))}"


class EntraStandIn(StandIn):
    """HTTPS stand-in for ``https://login.microsoftonline.com/{tenant}``.

    Endpoints (log/fault names): ``discovery`` (GET
    ``/{tenant}/v2.0/.well-known/openid-configuration``) and ``token`` (POST
    ``/{tenant}/oauth2/v2.0/token``).

    Credentials: ``clients`` (secrets), ``register_certificate`` and
    ``register_federated``; every assertion presented is kept in
    ``assertions`` (see ``assertions_used``). ``issue_token`` mints tokens for
    the other stand-ins; ``validate``/``token_info`` check them.
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
        self.federated: list[FederatedCredential] = []
        self.assertions: list[AssertionUse] = []
        self.clock_skew = 0.0
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

    def register_federated(
        self, client_id: str, issuer: str, subject: str, audience: str = FIC_AUDIENCE
    ) -> FederatedCredential:
        """Add a federated identity credential: trust ``issuer``'s tokens for ``subject``.

        The client becomes known even if it has no secret (as an app registration
        used only through workload identity federation).
        """
        fic = FederatedCredential(client_id, issuer, subject, audience)
        with self._state:
            self.federated.append(fic)
            self.clients.setdefault(client_id, None)
        return fic

    def assertions_used(self, client_id: str | None = None, kind: str | None = None) -> list[str]:
        """The ``client_assertion`` strings token requests presented, oldest first."""
        with self._state:
            return [
                a.assertion
                for a in self.assertions
                if (client_id is None or a.client_id == client_id) and (kind is None or a.kind == kind)
            ]

    def issue_token(
        self,
        client_id: str,
        aud: str,
        roles: Iterable[str] | None = None,
        *,
        lifetime: int | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> dict[str, object]:
        """Mint an access token for ``client_id`` and ``aud``; returns Entra's token response.

        ``roles`` default to the client's (``set_roles``) or the stand-in's
        default roles; ``lifetime`` to ``token_lifetime``; ``claims`` override or
        add payload claims (e.g. ``oid``/``xms_mirid`` of a managed identity).
        The token is recorded, so ``validate``/``token_info`` (and every stand-in
        that authenticates through them) accept it until it expires or is revoked.
        """
        now = int(time.time())
        lifetime = self.token_lifetime if lifetime is None else int(lifetime)
        roles = tuple(self.client_roles.get(client_id, self.roles) if roles is None else roles)
        payload: dict[str, Any] = {
            "aud": aud,
            "iss": f"https://sts.windows.net/{self.tenant}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
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
        payload.update(claims or {})
        header = {"typ": "JWT", "alg": "RS256", "x5t": "standin", "kid": "standin"}
        token = f"{_b64json(header)}.{_b64json(payload)}.{_b64url(secrets.token_bytes(64))}"
        with self._state:
            self._tokens[token] = TokenInfo(client_id, roles, aud, time.time() + lifetime, claims=payload)
            self.issued += 1
        return {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }

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
            code, failure = self._check_any_assertion(client_id, form)
            if failure:
                return json_response(401, self._aad_error("invalid_client", code, failure))
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
        return json_response(200, self.issue_token(client_id, resource[: -len("/.default")]))

    def _missing(self, name: str) -> Response:
        return json_response(
            400,
            self._aad_error(
                "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'."
            ),
        )

    def _check_any_assertion(self, client_id: str, form: dict[str, str]) -> tuple[int, str | None]:
        """Route an assertion to the certificate or the federated check; log its use."""
        assertion = form.get("client_assertion", "")
        try:
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            claims = {}
        if not isinstance(claims, dict):
            claims = {}
        federated = form.get("client_assertion_type") == JWT_BEARER and bool(claims) and claims.get("iss") != client_id
        if federated:
            kind = "federated"
            code, failure = self._check_federated(client_id, claims)
        else:
            kind = "certificate"
            code, failure = 700027, self._check_assertion(client_id, form)
        with self._state:
            self.assertions.append(
                AssertionUse(client_id, kind, assertion, claims, code if failure else None, time.time())
            )
        return code, failure

    def _check_federated(self, client_id: str, claims: dict[str, Any]) -> tuple[int, str | None]:
        """Match a workload identity token against the client's FICs (see module docstring)."""
        iss, sub, aud = claims.get("iss"), claims.get("sub"), claims.get("aud")
        if not all(isinstance(c, str) and c for c in (iss, sub)) or not aud or "exp" not in claims:
            return 50027, "JWT token is invalid or malformed."
        auds = [aud] if isinstance(aud, str) else [a for a in aud if isinstance(a, str)]
        with self._state:
            fics = [f for f in self.federated if f.client_id == client_id]
        same_issuer = [f for f in fics if f.issuer == iss]
        if not same_issuer:
            return 700211, (
                f"No matching federated identity record found for presented assertion issuer '{iss}'. Please check "
                "your federated identity credential Subject, Audience and Issuer against the presented assertion. "
                "https://learn.microsoft.com/entra/workload-id/workload-identity-federation"
            )
        same_subject = [f for f in same_issuer if f.subject == sub]
        if not same_subject:
            if any(f.subject.lower() == str(sub).lower() for f in same_issuer):
                return 7002138, (
                    f"No matching federated identity record found for presented assertion subject '{sub}'. The "
                    "subject matches a federated identity credential only case-insensitively; matching is "
                    "case-sensitive."
                )
            return 700213, (
                f"No matching federated identity record found for presented assertion subject '{sub}'. Please check "
                "your federated identity credential Subject, Audience and Issuer against the presented assertion. "
                "https://learn.microsoft.com/entra/workload-id/workload-identity-federation"
            )
        if not any(f.audience in auds for f in same_subject):
            return 70021, (
                f"No matching federated identity record found for presented assertion. Assertion Issuer: '{iss}'. "
                f"Assertion Subject: '{sub}'. Assertion Audience: '{','.join(auds)}'. "
                "https://learn.microsoft.com/entra/workload-id/workload-identity-federation"
            )
        now = time.time()
        try:
            exp = float(claims["exp"])
            nbf = float(claims.get("nbf", claims.get("iat", 0)))
        except (TypeError, ValueError):
            return 50027, "JWT token is invalid or malformed."
        if now < nbf - self.clock_skew or now >= exp + self.clock_skew:
            return 700024, (
                f"Client assertion is not within its valid time range. Current time: {_aad_time(now)}, assertion "
                f"valid from {_aad_time(nbf)}, expiry time of assertion {_aad_time(exp)}. Review the documentation at "
                "https://docs.microsoft.com/azure/active-directory/develop/active-directory-certificate-credentials ."
            )
        return 0, None

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
        """Kept for callers of the old private name; use ``issue_token``."""
        return self.issue_token(client_id, aud)
