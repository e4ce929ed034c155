#!/usr/bin/env python3
"""See misp2defender work end to end, with no MISP and no Defender tenant.

    python tests/sandbox.py                 # the demo; its files go when it ends
    python tests/sandbox.py --keep DIR      # ...and leave config.py, the log and a report in DIR
    python tests/sandbox.py --serve         # ...then keep the stand-ins up to run the tool by hand

Starts the test stand-ins on 127.0.0.1 (Entra ID over HTTPS with a throw-away CA, the Defender
Indicators API, and a MISP serving the sample events in tests/data), writes a config.py for them,
then runs misp2defender three times: a --dry-run that prints the plan, the cron run, and the same
run again (nothing changed, so nothing is written). It ends by printing what Defender holds.
Nothing outside this machine is contacted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import misp2defender  # noqa: E402
from tests.standins.defender import DefenderStandIn  # noqa: E402
from tests.standins.entra import EntraStandIn  # noqa: E402
from tests.standins.misp import MispStandIn, load_events  # noqa: E402
from tests.standins.tls import make_test_pki  # noqa: E402
from tests.util import (  # noqa: E402
    DATA_DIR,
    MISP_KEY,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_TENANT,
    serving,
    write_config,  # noqa: E402
)


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tests/sandbox.py", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="write config.py, the log and report.json to DIR and keep them")
    parser.add_argument("--serve", action="store_true",
                        help="after the demo, keep the stand-ins running (Ctrl-C stops them) to try the tool by hand")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The stand-ins' certificate comes from a throw-away CA: trust it the way the tool does.
    for name in ("CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        os.environ.pop(name, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="misp2defender-sandbox-")))
        pki = make_test_pki(work / "pki")
        os.environ["REQUESTS_CA_BUNDLE"] = str(pki.ca_path)
        entra = stack.enter_context(serving(EntraStandIn(pki, tenant=TEST_TENANT,
                                                         clients={TEST_CLIENT_ID: TEST_CLIENT_SECRET})))
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
            "log_file": "misp2defender.log",  # beside config.py, as in a real installation
        })
        os.chmod(config, 0o600)
        report = work / "report.json"
        print(f"Stand-ins: Entra {entra.url}  Defender {defender.url}  MISP {misp.url}")

        banner("1. python misp2defender.py --dry-run   (reads MISP and Defender, writes nothing)")
        dry = misp2defender.main(["--config", str(config), "--dry-run"])
        banner("2. python misp2defender.py   (the cron run)")
        real = misp2defender.main(["--config", str(config), "--report", str(report)])
        banner("3. python misp2defender.py   (again: nothing changed, so nothing is written)")
        again = misp2defender.main(["--config", str(config)])

        banner(f"What Defender holds now ({len(defender.active())} indicators)")
        for item in defender.active():
            print(f"  {item['indicatorType']:<22} {item['action']:<18} {item['severity']:<8} "
                  f"{item['expirationTime'] or 'never':<21} {item['indicatorValue']}")
        writes = [c for c in defender.calls() if c.endpoint in ("import", "batch_delete", "delete")]
        print(f"\nExit codes: dry run {dry}, first run {real}, second run {again}; "
              f"Defender write calls in total: {len(writes)}")
        if args.keep or args.serve:
            banner("Look around, or run the tool yourself")
            print(f"  config:  {config}\n  log:     {work / 'misp2defender.log'}\n  report:  {report}")
            print(f"  parsed:  {work / 'misp2defender_indicators.json'}")
            if not args.serve:
                print("\n  The stand-ins stop now. To run the tool by hand against them, start the sandbox "
                      "with --serve too\n  (it then prints the commands, the CA included).")
        if args.serve:
            environment = {"REQUESTS_CA_BUNDLE": str(pki.ca_path), "NO_PROXY": "127.0.0.1,localhost"}
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in environment.items())
            print(f"\nThe stand-ins stay up until Ctrl-C. In another shell:\n\n"
                  f"  export {exports}\n"
                  f"  {shlex.quote(sys.executable)} {ROOT / 'misp2defender.py'} --config {config} --check\n"
                  f"  {shlex.quote(sys.executable)} {ROOT / 'misp2defender.py'} --config {config} --dry-run\n",
                  flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
            if not args.keep:
                print("(--serve without --keep: the files go now)")
    return 0 if (dry, real, again) == (0, 0, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
