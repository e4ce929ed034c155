#!/usr/bin/env python3
"""See misp2defender work end to end, with no MISP and no Defender tenant.

    python tests/sandbox.py

Starts the test stand-ins on 127.0.0.1 (Entra ID over HTTPS with a throw-away CA, the Defender
Indicators API, and a MISP serving the sample events in tests/data), writes a config.py for them,
then runs misp2defender twice: a --dry-run that prints the plan, and a real run. It ends by
printing what Defender holds. Nothing outside this machine is contacted.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import misp2defender  # noqa: E402
from tests.conftest import (  # noqa: E402
    DATA_DIR,
    MISP_KEY,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_TENANT,
    serving,
)
from tests.standins.defender import DefenderStandIn  # noqa: E402
from tests.standins.entra import EntraStandIn  # noqa: E402
from tests.standins.misp import MispStandIn, load_events  # noqa: E402
from tests.standins.tls import make_test_pki  # noqa: E402
from tests.util import write_config  # noqa: E402


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def main() -> int:
    # The stand-ins' certificate comes from a throw-away CA: trust it the way the tool does.
    for name in ("CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        os.environ.pop(name, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    with tempfile.TemporaryDirectory(prefix="misp2defender-sandbox-") as temp:
        work = Path(temp)
        pki = make_test_pki(work / "pki")
        os.environ["REQUESTS_CA_BUNDLE"] = str(pki.ca_path)
        entra = EntraStandIn(pki, tenant=TEST_TENANT, clients={TEST_CLIENT_ID: TEST_CLIENT_SECRET})
        with contextlib.ExitStack() as stack:
            stack.enter_context(serving(entra))
            defender = stack.enter_context(serving(DefenderStandIn(pki, entra)))
            misp = stack.enter_context(serving(MispStandIn(load_events(DATA_DIR, recursive=False), key=MISP_KEY)))
            config = write_config(work / "config.py", {
                "graph_auth": {"tenant": TEST_TENANT, "client_id": TEST_CLIENT_ID,
                               "client_secret": TEST_CLIENT_SECRET, "authority": entra.url},
                "defender_api_url": defender.url,
                "misp_domain": misp.url + "/",
                "misp_key": MISP_KEY,
                # The sample events are dated November 2026: read them without a time window.
                "misp_event_filters": {"published": True, "tags": ['workflow:state="complete"'],
                                       "enforceWarninglist": True},
                "days_to_expire_start": "current_date",
                "log_file": str(work / "misp2defender.log"),
            })
            os.chmod(config, 0o600)
            print(f"Stand-ins: Entra {entra.url}  Defender {defender.url}  MISP {misp.url}")

            banner("1. python misp2defender.py --dry-run   (reads MISP and Defender, writes nothing)")
            dry = misp2defender.main(["--config", str(config), "--dry-run"])
            banner("2. python misp2defender.py   (the cron run)")
            real = misp2defender.main(["--config", str(config)])
            banner("3. python misp2defender.py   (again: nothing changed, so nothing is written)")
            again = misp2defender.main(["--config", str(config)])

            banner(f"What Defender holds now ({len(defender.active())} indicators)")
            for item in defender.active():
                print(f"  {item['indicatorType']:<22} {item['action']:<18} {item['severity']:<8} "
                      f"{item['expirationTime'] or 'never':<21} {item['indicatorValue']}")
            writes = [c for c in defender.calls() if c.endpoint in ("import", "batch_delete", "delete")]
            print(f"\nExit codes: dry run {dry}, first run {real}, second run {again}; "
                  f"Defender write calls in total: {len(writes)}")
    return 0 if (dry, real, again) == (0, 0, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
