#!/usr/bin/env python3
"""Benchmarks: run on demand, print each figure beside its target (not part of the test run).

    venv/bin/python tests/benchmarks/run_benchmarks.py [--only NAME ...]

Figures (targets from issue 6, on a 2-core machine):
  plan-200k   --dry-run over 200,000 MISP attributes (2,000 events), Defender holding 10,000 of
              ours: ≤ 5 s wall, ≤ 160 MiB peak RSS of the tool's process
  plan-1m     the same over 1,000,000 attributes (10,000 events): ≤ 30 s, ≤ 200 MiB
  api         call counts against the optimum: imports = ceil(changes/500), BatchDeletes =
              ceil(deletes/500), listings = the minimum for the listed count, 0 writes when idle
  quota       15,000 new indicators against Defender's real import quota (30/min): ≤ 65 s, 0 HTTP 429
  otx         2,000 OTX lookups at 50 ms latency: ≤ 10 s
  tenants-quota   three tenants × 15,000 new indicators under each tenant's real import quota:
              ≤ 1.3 × the time one tenant alone takes in the same benchmark, 0 HTTP 429, 45,000 landed
  tenants-plan    three tenants sharing one selection of 200,000 attributes (dry run): MISP pages
              read once; ≤ 1.5 × the single-tenant dry run's time and peak RSS (best of three each)

The tool runs as a child process (peak RSS is its own, read from inside the tool); the stand-ins
run in this process. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.corpus import SyntheticCorpus  # noqa: E402
from tests.standins.defender import DefenderStandIn  # noqa: E402
from tests.standins.entra import EntraStandIn  # noqa: E402
from tests.standins.misp import MispStandIn  # noqa: E402
from tests.standins.otx import OtxStandIn  # noqa: E402
from tests.standins.tls import PKI, make_test_pki  # noqa: E402
from tests.util import (  # noqa: E402
    MISP_KEY,
    OTX_KEY,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_TENANT,
    serving,
    write_config,  # noqa: E402
)

WRITES = ("import", "batch_delete", "delete", "submit")
FILTERS = {"published": True, "tags": ['workflow:state="complete"']}


class Bench:
    """Stand-ins plus a config writer and a child-process runner for the tool."""

    def __init__(self, work: Path, pki: PKI, entra: EntraStandIn, defender: DefenderStandIn, misp: MispStandIn):
        self.work, self.pki, self.entra, self.defender, self.misp = work, pki, entra, defender, misp

    def run(self, *args: str, time_scale: float = 1.0, **config: Any) -> tuple[int, float, dict]:
        """Run the tool in a child process with the stand-ins' config plus ``config``."""
        values = {
            "graph_auth": {"tenant": TEST_TENANT, "client_id": TEST_CLIENT_ID, "client_secret": TEST_CLIENT_SECRET,
                           "authority": self.entra.url},
            "defender_api_url": self.defender.url, "misp_domain": self.misp.url + "/", "misp_key": MISP_KEY,
            "misp_event_filters": FILTERS, "days_to_expire_start": "current_date",
            "log_file": str(self.work / "bench.log"), "verbose_log": False, "write_parsed_eventid": False,
            "write_parsed_indicators": False, **config,
        }
        path = write_config(self.work / "config.py", values)
        os.chmod(path, 0o600)
        report = self.work / "report.json"
        env = {**os.environ, "REQUESTS_CA_BUNDLE": str(self.pki.ca_path), "NO_PROXY": "127.0.0.1,localhost",
               "MISP2DEFENDER_TIME_SCALE": str(time_scale)}
        started = time.monotonic()
        child = subprocess.run([sys.executable, str(ROOT / "misp2defender.py"), "--config", str(path),
                                "--report", str(report), *args], env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        if child.returncode not in (0, 1):
            print(child.stdout[-2000:], child.stderr[-4000:], file=sys.stderr)
        return child.returncode, elapsed, json.loads(report.read_text())


@contextlib.contextmanager
def bench(events: Any = (), *, defender_time_scale: float = 1.0, cap: int = 15_000) -> Iterator[Bench]:
    with tempfile.TemporaryDirectory(prefix="m2d-bench-") as temp:
        work = Path(temp)
        pki = make_test_pki(work / "pki")
        entra = EntraStandIn(pki, tenant=TEST_TENANT, clients={TEST_CLIENT_ID: TEST_CLIENT_SECRET})
        defender = DefenderStandIn(pki, entra, time_scale=defender_time_scale, cap=cap)
        misp = MispStandIn(events, key=MISP_KEY, cache_responses=True)
        with serving(entra), serving(defender), serving(misp):
            yield Bench(work, pki, entra, defender, misp)


def row(name: str, measured: str, target: str, ok: bool) -> bool:
    print(f"  {name:<46} {measured:<28} target {target:<22} {'OK' if ok else 'MISSED'}", flush=True)
    return ok


def owned_from_corpus(corpus: SyntheticCorpus, count: int) -> list[dict]:
    """``count`` indicators of ours whose values come from the corpus (so planning matches them)."""
    items: list[dict] = []
    for event in corpus:
        for attribute in event["Event"].get("Attribute", []):
            if attribute["type"] == "sha256" and attribute.get("to_ids"):
                items.append({"indicatorType": "FileSha256", "indicatorValue": attribute["value"].lower(),
                              "action": "Audit", "severity": "Medium", "title": event["Event"]["info"][:100],
                              "description": "seeded", "generateAlert": True, "application": "MISP"})
                if len(items) == count:
                    return items
    return items


def plan_benchmark(events: int, seconds: float, mib: float) -> bool:
    corpus = SyntheticCorpus(events, 100, seed=7)
    with bench(corpus) as b:
        b.defender.seed(owned_from_corpus(corpus, 10_000), created_by=TEST_CLIENT_ID, application="MISP")
        # A first run lets the stand-in render and keep its pages; the second measures the tool.
        b.run("--dry-run", misp_event_limit_per_page=100)
        code, elapsed, report = b.run("--dry-run", misp_event_limit_per_page=100)
    label = f"dry run, {corpus.total_attributes:,} attributes ({events:,} events)"
    ok = row(label + " wall", f"{elapsed:.1f} s", f"≤ {seconds:g} s", elapsed <= seconds)
    ok &= row(label + " peak RSS", f"{report['peak_rss_mib']:.0f} MiB", f"≤ {mib:g} MiB", report["peak_rss_mib"] <= mib)
    counts = report["counts"]
    print(f"    (candidates {counts['candidates']:,}, kept {counts['kept']:,}, left out {counts['left_out']:,}, "
          f"exit {code}; seconds by phase {report['phase_seconds']})")
    return ok


def api_benchmark() -> bool:
    corpus = [e for e in SyntheticCorpus(40, 100, seed=11)]
    ok = True
    with bench(corpus, defender_time_scale=1 / 60) as b:
        code, _, first = b.run(max_indicators_per_query=500, time_scale=1 / 60, quota_requests=30)
        changes = first["counts"]["created"]
        calls = {name: len(b.defender.calls(name)) for name in ("import", "list", "batch_delete")}
        ok &= row("imports for a first run", f"{calls['import']} for {changes:,} creates",
                  f"{math.ceil(changes / 500)}", calls["import"] == math.ceil(changes / 500))
        held = len(b.defender.active())
        ok &= row("listing calls", f"{calls['list']} for {0:,} held", "1", calls["list"] == 1)
        before = len([c for c in b.defender.calls() if c.endpoint in WRITES])
        b.run(time_scale=1 / 60, quota_requests=30)
        idle = len([c for c in b.defender.calls() if c.endpoint in WRITES]) - before
        ok &= row("writes when nothing changed", str(idle), "0", idle == 0)
        listed = len(b.defender.calls("list")) - calls["list"]
        ok &= row("listing calls", f"{listed} for {held:,} held", f"{held // 10_000 + 1}", listed == held // 10_000 + 1)
        for index in range(20):  # removed from MISP (an unpublished event is only being edited: kept)
            b.misp.remove_event(corpus[index]["Event"]["uuid"])
        before_delete = len(b.defender.calls("batch_delete"))
        code, _, full = b.run("--full-sync", "--force", time_scale=1 / 60, quota_requests=30)
        deletes = full["counts"]["deleted"]
        made = len(b.defender.calls("batch_delete")) - before_delete
        ok &= row("BatchDelete calls", f"{made} for {deletes:,} deletes", f"{math.ceil(deletes / 500)}",
                  deletes > 0 and made == math.ceil(deletes / 500))
    return ok


def quota_benchmark() -> bool:
    with bench(bulk_events(15_000)) as b:
        code, elapsed, report = b.run(max_indicators_per_query=500, quota_requests=30)
        throttled = len(b.defender.calls(status=429))
        landed = len(b.defender.active())
    ok = row("15,000 new indicators, real import quota", f"{elapsed:.1f} s, {landed:,} landed", "≤ 65 s",
             elapsed <= 65 and landed == 15_000)
    return ok & row("HTTP 429 answers during that run", str(throttled), "0", throttled == 0)


def tenant_stand_ins(stack: contextlib.ExitStack, pki: PKI, count: int, time_scale: float = 1.0
                     ) -> list[tuple[EntraStandIn, DefenderStandIn]]:
    """One Entra directory and one Defender per tenant, each with its own quotas."""
    found = []
    for number in range(count):
        entra = stack.enter_context(serving(EntraStandIn(pki, tenant=f"{number + 1}0000000-1111-4222-8333-"
                                                                     "444444444444",
                                                         clients={TEST_CLIENT_ID: TEST_CLIENT_SECRET})))
        found.append((entra, stack.enter_context(serving(DefenderStandIn(pki, entra, time_scale=time_scale)))))
    return found


def tenant_entries(stand_ins: list[tuple[EntraStandIn, DefenderStandIn]]) -> list[dict]:
    return [{"name": f"customer{n}", "graph_auth": {"tenant": entra.tenant, "authority": entra.url},
             "defender_api_url": defender.url} for n, (entra, defender) in enumerate(stand_ins, start=1)]


def tenants_quota_benchmark() -> bool:
    # The default batch (450) and quota (25 calls a minute) make 34 imports a tenant: the quota,
    # not the CPU, sets the pace, as it does for a real first full sync.
    events = bulk_events(15_000)
    with bench(events) as b, contextlib.ExitStack() as stack:
        one = tenant_stand_ins(stack, b.pki, 1)
        _, alone, _ = b.run(tenants=tenant_entries(one))
        three = tenant_stand_ins(stack, b.pki, 3)
        code, together, report = b.run(tenants=tenant_entries(three))
        landed = sum(len(defender.active()) for _, defender in three)
        throttled = sum(len(defender.calls(status=429)) for _, defender in three)
    ok = row("3 tenants × 15,000 new indicators", f"{together:.1f} s (one alone {alone:.1f} s)",
             f"≤ {1.3 * alone:.1f} s", together <= 1.3 * alone)
    ok &= row("indicators landed in the three tenants", f"{landed:,}", "45,000", landed == 45_000)
    return ok & row("HTTP 429 answers during that run", str(throttled), "0", throttled == 0)


def tenants_plan_benchmark() -> bool:
    corpus = SyntheticCorpus(2_000, 100, seed=7)
    seeded = owned_from_corpus(corpus, 10_000)
    with bench(corpus) as b, contextlib.ExitStack() as stack:
        stand_ins = tenant_stand_ins(stack, b.pki, 3)
        for _, defender in stand_ins:
            defender.seed(seeded, created_by=TEST_CLIENT_ID, application="MISP")
        b.run("--dry-run", misp_event_limit_per_page=100, tenants=tenant_entries(stand_ins[:1]))  # warm the cache
        # Best of three of each: the stand-ins share these two cores with the tool, and they do three
        # tenants' worth of work too (listing 10,000 indicators each), so one run alone is noisy.
        alone, single = min((b.run("--dry-run", misp_event_limit_per_page=100,
                                   tenants=tenant_entries(stand_ins[:1]))[1:] for _ in range(3)), key=lambda r: r[0])
        pages_before = len(b.misp.calls("events"))
        _, together, report = b.run("--dry-run", misp_event_limit_per_page=100, tenants=tenant_entries(stand_ins))
        pages = [c.body.get("page") for c in b.misp.calls("events")[pages_before:] if c.body.get("published")]
        together = min([together, *(b.run("--dry-run", misp_event_limit_per_page=100,
                                           tenants=tenant_entries(stand_ins))[1] for _ in range(2))])
    label = f"dry run, 3 tenants, {corpus.total_attributes:,} attributes"
    ok = row(label + " wall", f"{together:.1f} s (one {alone:.1f} s)", f"≤ {1.5 * alone:.1f} s",
             together <= 1.5 * alone)
    ok &= row(label + " peak RSS", f"{report['peak_rss_mib']:.0f} MiB (one {single['peak_rss_mib']:.0f})",
              f"≤ {1.5 * single['peak_rss_mib']:.0f} MiB", report["peak_rss_mib"] <= 1.5 * single["peak_rss_mib"])
    repeated = len(pages) - len(set(pages))
    ok &= row("MISP pages fetched more than once", str(repeated), "0", repeated == 0)
    print(f"    (seconds by phase {report['phase_seconds']})")
    return ok


def bulk_events(count: int) -> list[dict]:
    """``count`` distinct sha256 values, 500 to an event."""
    return [{"Event": {"uuid": f"40000000-0000-4000-8000-{start:012d}", "info": f"bulk {start}", "published": True,
                       "Tag": [{"name": 'workflow:state="complete"'}],
                       "Attribute": [{"type": "sha256", "category": "Payload delivery", "to_ids": True,
                                      "uuid": f"50000000-0000-4000-8000-{n:012d}", "value": f"{n:064x}"}
                                     for n in range(start, start + 500)]}} for start in range(0, count, 500)]


def otx_benchmark() -> bool:
    events = [{"Event": {"uuid": "60000000-0000-4000-8000-000000000001", "info": "otx", "published": True,
                         "Tag": [{"name": 'workflow:state="complete"'}],
                         "Attribute": [{"type": "sha256", "category": "Payload delivery", "to_ids": True,
                                        "uuid": f"70000000-0000-4000-8000-{n:012d}", "value": f"{n + 7:064x}"}
                                       for n in range(2000)]}}]
    with bench(events, defender_time_scale=1 / 60) as b, \
            serving(OtxStandIn(b.pki, key=OTX_KEY, latency=0.05)) as otx:
        started = time.monotonic()
        b.run("--dry-run", exclude_if_in_alienvault=True, otx_alienvault_api=OTX_KEY, otx_alienvault_url=otx.url)
        lookups = otx.calls("lookup")
        span = lookups[-1].t - lookups[0].t if lookups else 0.0
        print(f"    (whole dry run {time.monotonic() - started:.1f} s)")
    return row(f"{len(lookups):,} OTX lookups at 50 ms", f"{span:.1f} s", "≤ 10 s", span <= 10 and len(lookups) == 2000)


BENCHMARKS = {
    "plan-200k": lambda: plan_benchmark(2_000, 5, 160),
    "plan-1m": lambda: plan_benchmark(10_000, 30, 200),
    "api": api_benchmark,
    "quota": quota_benchmark,
    "otx": otx_benchmark,
    "tenants-quota": tenants_quota_benchmark,
    "tenants-plan": tenants_plan_benchmark,
}


def cpu_steal_seconds() -> float | None:
    """Seconds of CPU 'steal' so far (Linux /proc/stat), or None where that is not known."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        os.environ.pop(name, None)
    names = args.only or list(BENCHMARKS)
    if len(names) > 1:
        # One process per benchmark: the stand-ins run in this process, and a large corpus left
        # over from one benchmark would slow the stand-ins of the next.
        failed = [name for name in names
                  if subprocess.run([sys.executable, __file__, "--only", name]).returncode != 0]
        print("\nall targets met" if not failed else f"\nmissed: {failed}")
        return 1 if failed else 0
    results = {}
    for name in names:
        print(f"{name}:", flush=True)
        stolen = cpu_steal_seconds()
        results[name] = BENCHMARKS[name]()
        if stolen is not None:
            # A virtual machine's host may take CPU time away: it shows here, not in the figures.
            print(f"    (CPU time taken by the host during this benchmark: {cpu_steal_seconds() - stolen:.1f} s)")
    print("\nall targets met" if all(results.values()) else f"\nmissed: {[n for n, ok in results.items() if not ok]}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
