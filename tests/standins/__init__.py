"""Loopback stand-ins for the services misp2defender talks to.

Each stand-in is a real HTTP(S) server on 127.0.0.1 (port 0) run in daemon
threads, so the real ``msal``, ``pymisp`` and ``requests`` code paths are
exercised end to end without mocks or patches.
"""

from tests.standins.base import Recorded, StandIn
from tests.standins.defender import DefenderStandIn
from tests.standins.entra import EntraStandIn
from tests.standins.misp import MispStandIn
from tests.standins.otx import OtxStandIn
from tests.standins.tls import PKI, make_client_certificate, make_test_pki

__all__ = [
    "PKI",
    "DefenderStandIn",
    "EntraStandIn",
    "MispStandIn",
    "OtxStandIn",
    "Recorded",
    "StandIn",
    "make_client_certificate",
    "make_test_pki",
]
