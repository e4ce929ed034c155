"""Several tenants from one MISP read (issue 10): one Entra and one Defender stand-in per tenant.

The tenants share one multi-tenant Entra app (client id and secret written once at the top of
config.py, a directory id per tenant), as an MSSP would set it up.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness import Tool
from tests.standins.defender import DefenderStandIn
from tests.standins.entra import EntraStandIn
from tests.util import (
    DEFENDER_TIME_SCALE,
    EVENT_03,
    EVENT_03_ONLY,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    SAMPLE_KEYS,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    m2d,
    serving,
    wait_for,
)

EVENT_01 = {  # event 01 carries misp:threat-level="high-risk" (tests/data/README.md)
    ("IpAddress", "185.225.17.88"), ("IpAddress", "91.215.85.147"), ("IpAddress", "46.101.155.38"),
    ("IpAddress", "2a01:4f8:c17:2b1:0:0:0:3"), ("DomainName", "evil-domain.top"),
    ("DomainName", "login-verify-account.xyz"), ("DomainName", "mail.cdn-update-check.top"),
    ("Url", "http://cdn-update-check.top/wp-content/plugins/wpx-cache/loader.php"),
    ("FileSha256", "d2f1da0889b90a130e36f0da535bd9b6fd299e2f9573e6a627a5c540997ab424"),
    ("FileSha256", "bb9008e38301becb5406cdbd3f88f5f789ad9c82b43a750cfc2592a783fc3d92"), ("IpAddress", "194.87.31.12"),
}
D2F1 = ("FileSha256", "d2f1da0889b90a130e36f0da535bd9b6fd299e2f9573e6a627a5c540997ab424")  # events 01 and 03
CERT_05 = ("CertificateThumbprint", "5c55b651f4dd773e0f599ea4ba99cc869c61dd1c")  # Block admits it; 03's goes with 03
QAKBOT = 'misp-galaxy:malpedia="QakBot"'
HIGH = 'misp:threat-level="high-risk"'


@dataclass
class Customer:
    name: str
    entra: EntraStandIn
    defender: DefenderStandIn

    def entry(self, **overrides: object) -> dict:
        return {"name": self.name, "graph_auth": {"tenant": self.entra.tenant, "authority": self.entra.url},
                "defender_api_url": self.defender.url, **overrides}

    def held(self, client_id: str = TEST_CLIENT_ID) -> set[tuple[str, str, str]]:
        return {(i["indicatorType"], i["indicatorValue"], i["action"]) for i in self.defender.owned_by(client_id)}

    def keys(self) -> set[tuple[str, str]]:
        return {(t, v) for t, v, _ in self.held()}


@pytest.fixture
def customers(pki) -> Iterator[list[Customer]]:
    """Three customer tenants, each with its own Entra directory and Defender."""
    with contextlib.ExitStack() as stack:
        found = []
        for number, name in enumerate(("acme", "globex", "initech"), start=1):
            entra = stack.enter_context(serving(EntraStandIn(
                pki, tenant=f"{number}0000000-1111-4222-8333-444444444444",
                clients={TEST_CLIENT_ID: TEST_CLIENT_SECRET, OTHER_CLIENT_ID: OTHER_CLIENT_SECRET})))
            defender = stack.enter_context(serving(DefenderStandIn(pki, entra, time_scale=DEFENDER_TIME_SCALE)))
            found.append(Customer(name, entra, defender))
        yield found


def main_read_pages(tool: Tool) -> list[int]:
    """Pages of the selection read (published events), leaving out the other MISP queries."""
    return [c.body.get("page") for c in tool.misp.calls("events") if c.body.get("published") is True
            and not c.body.get("metadata")]


def test_three_tenants_from_one_read_each_get_their_own_set(tool: Tool, customers: list[Customer]) -> None:
    acme, globex, initech = customers
    result = tool.run(misp_event_limit_per_page=2, tenants=[
        acme.entry(),
        globex.entry(defender_action="Block", exclude_tags=[QAKBOT], defender_max_indicators=5000),
        initech.entry(include_tags=[HIGH], defender_max_indicators=11),
    ])
    assert result.code == 0, result.stderr
    assert acme.keys() == SAMPLE_KEYS and {a for _, _, a in acme.held()} <= {"Audit", "Block"}
    assert globex.keys() == SAMPLE_KEYS - EVENT_03_ONLY | {CERT_05}
    assert initech.keys() == EVENT_01
    assert tool.defender.calls() == []  # the top-level Defender is nobody's tenant here
    pages = main_read_pages(tool)
    assert {1, 2, 3} <= set(pages) and len(pages) == len(set(pages))  # five events, two a page: each page once
    report = result.report
    assert set(report["tenants"]) == {"acme", "globex", "initech"}
    assert [report["tenants"][n]["counts"]["created"] for n in ("acme", "globex", "initech")] == [36, 30, 11]
    assert report["counts"]["created"] == 36 + 30 + 11 and report["counts"]["events"] == 5
    assert all(t["exit_code"] == 0 for t in report["tenants"].values())
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == [f"misp2defender [{n}]" for n in ("acme", "globex",
                                                                                             "initech")]
    assert lines[3].startswith("misp2defender: 3 tenants:")
    for name in ("acme", "globex", "initech"):  # per-Defender files carry the tenant's name
        assert (tool.tmp / f"misp2defender_indicators.{name}.json").is_file()
        assert (tool.tmp / f"defender.{name}.jsonl").is_file()
    log = (tool.tmp / "misp2defender.log").read_text()
    assert "[globex] Plan:" in log and "[initech] Plan:" in log
    again = tool.run(misp_event_limit_per_page=2, tenants=[
        acme.entry(), globex.entry(defender_action="Block", exclude_tags=[QAKBOT], defender_max_indicators=5000),
        initech.entry(include_tags=[HIGH], defender_max_indicators=11)])
    assert again.code == 0 and again.counts["created"] == again.counts["deleted"] == 0
    edited_reads = [c for c in tool.misp.calls("events") if c.body.get("published") is False]
    assert len(edited_reads) == 1  # the events being edited: read once for the three tenants, as the selection


def test_tenants_with_their_own_filters_read_and_confirm_with_their_own(tool: Tool, customers: list[Customer]) -> None:
    acme, globex, _ = customers
    qakbot_only = {**tool.defaults["misp_event_filters"], "tags": [QAKBOT]}
    for tenants in ([globex.entry(misp_event_filters=qakbot_only), acme.entry()],  # the narrower view first
                    [acme.entry(), globex.entry(misp_event_filters=qakbot_only)]):  # and second
        result = tool.run("--full-sync", tenants=tenants)
        assert result.code == 0, result.stderr
        assert globex.keys() == EVENT_03_ONLY | {D2F1} and acme.keys() == SAMPLE_KEYS
    # Event 03 leaves globex's selection but stays in acme's: MISP is asked with globex's own
    # filters whether its values are still selected for globex (they are not: they go).
    tool.misp.untag_event(EVENT_03, QAKBOT)
    tool.misp.publish(EVENT_03)
    result = tool.run("--full-sync", "--force", tenants=[acme.entry(), globex.entry(misp_event_filters=qakbot_only)])
    assert result.code == 0, result.stderr
    assert globex.keys() == set() and acme.keys() == SAMPLE_KEYS


def test_one_tenant_failing_never_stops_or_changes_the_others(tool: Tool, customers: list[Customer]) -> None:
    acme, globex, initech = customers
    initech.defender.inject("import", status=503, times=2)
    result = tool.run(max_indicators_per_query=10, tenants=[
        acme.entry(),
        globex.entry(graph_auth={"tenant": globex.entra.tenant, "authority": globex.entra.url,
                                 "client_secret": "not-the-secret-of-this-app"}),
        initech.entry(),
    ])
    assert result.code == 1
    assert acme.keys() == SAMPLE_KEYS and initech.keys() == SAMPLE_KEYS
    assert globex.held() == set() and globex.defender.calls() == []
    assert len(initech.defender.calls("import", status=503)) == 2
    tenants = result.report["tenants"]
    assert (tenants["acme"]["exit_code"], tenants["globex"]["exit_code"], tenants["initech"]["exit_code"]) == (0, 2, 0)
    assert "client secret" in tenants["globex"]["fatal"]
    [globex_line] = [line for line in result.stdout.splitlines() if line.startswith("misp2defender [globex]")]
    assert "exit 2" in globex_line and "client secret" in globex_line
    written = [p.read_text() for p in tool.written_files() if not p.name.startswith("config")]
    for text in (result.stdout, result.stderr, *written):  # every tenant's secrets are redacted
        assert "not-the-secret-of-this-app" not in text and TEST_CLIENT_SECRET not in text


def test_tenant_option_touches_only_that_tenant(tool: Tool, customers: list[Customer]) -> None:
    acme, globex, _ = customers
    entries = [acme.entry(), globex.entry()]
    result = tool.run("--tenant", "acme", tenants=entries)
    assert result.code == 0, result.stderr
    assert acme.keys() == SAMPLE_KEYS
    assert globex.defender.calls() == [] and globex.entra.calls() == []
    unknown = tool.run("--tenant", "umbrella", tenants=entries)
    assert unknown.code == 2 and "--tenant umbrella: no such tenant" in unknown.stderr


def test_an_indicator_another_tenants_app_made_is_foreign_here(tool: Tool, customers: list[Customer]) -> None:
    acme, globex, _ = customers
    # globex runs under its own app; acme's app once wrote into globex's Defender.
    [stray] = globex.defender.seed([{"indicatorType": "DomainName", "indicatorValue": "office-docs-share.xyz",
                                     "action": "Audit", "title": "acme's", "description": "acme's",
                                     "generateAlert": True}], created_by=TEST_CLIENT_ID, application="MISP")
    before = json.dumps(globex.defender.indicators[stray], sort_keys=True)
    globex_app = {"tenant": globex.entra.tenant, "authority": globex.entra.url, "client_id": OTHER_CLIENT_ID,
                  "client_secret": OTHER_CLIENT_SECRET}
    for args in ((), ("--full-sync",)):
        result = tool.run(*args, remove_guard_percent=100, tenants=[acme.entry(), globex.entry(graph_auth=globex_app)])
        assert result.code == 0, result.stderr
        assert json.dumps(globex.defender.indicators[stray], sort_keys=True) == before
    assert globex.keys() == {("DomainName", "office-docs-share.xyz")}  # only the stray: acme's app made it
    assert {(t, v) for t, v, _ in globex.held(OTHER_CLIENT_ID)} == SAMPLE_KEYS - {("DomainName",
                                                                                  "office-docs-share.xyz")}


def test_dry_run_prints_one_plan_per_tenant(tool: Tool, customers: list[Customer]) -> None:
    acme, globex, _ = customers
    result = tool.run("--dry-run", tenants=[acme.entry(), globex.entry(defender_action="Block")])
    assert result.code == 0, result.stderr
    out = result.stdout
    assert out.index("== tenant acme ==") < out.index("== tenant globex ==")
    assert out.count("Plan: 36 to create") == 1 and out.count("Plan: 38 to create") == 1
    assert acme.held() == set() and globex.held() == set()


def test_check_checks_misp_once_and_every_tenant(tool: Tool, customers: list[Customer]) -> None:
    acme, globex, _ = customers
    globex.defender.forbid(TEST_CLIENT_ID)
    result = tool.run("--check", tenants=[acme.entry(), globex.entry()])
    assert result.code == 2
    out = result.stdout.splitlines()
    assert sum(1 for line in out if "answers (MISP" in line) == 1
    acme_block = out.index("  tenant acme:")
    globex_block = out.index("  tenant globex:")
    assert out[acme_block + 1].startswith("    ✓ MISP:")
    assert any(line.startswith("    ✓ Defender:") for line in out[acme_block:globex_block])
    assert any(line.startswith("    ✗ Defender:") and "Ti.ReadWrite.All" in line for line in out[globex_block:])


def test_check_counts_each_tenants_own_selection(tool: Tool, customers: list[Customer]) -> None:
    acme, globex, _ = customers
    qakbot_only = {**tool.defaults["misp_event_filters"], "tags": [QAKBOT]}
    result = tool.run("--check", tenants=[acme.entry(misp_event_filters=qakbot_only), globex.entry()])
    assert result.code == 0, result.stdout
    out = result.stdout.splitlines()
    acme_block, globex_block = out.index("  tenant acme:"), out.index("  tenant globex:")
    assert "    ✓ MISP: 1 events match this tenant's misp_event_filters" in out[acme_block:globex_block]
    assert "    ✓ MISP: 5 events match this tenant's misp_event_filters" in out[globex_block:]


def test_a_tenants_own_credential_replaces_the_top_levels_managed_identity(tmp_path) -> None:
    raw = {"misp_domain": "https://misp.example/", "misp_key": "k" * 40, "log_file": str(tmp_path / "m2d.log"),
           "graph_auth": {"managed_identity": True},
           "tenants": [{"name": "home"},
                       {"name": "acme", "graph_auth": {"tenant": "acme-directory", "client_id": "acme-app",
                                                       "client_secret": "s" * 24}}]}
    home, acme = m2d.build_tenants(raw, environ={"MISP2DEFENDER_CLIENT_SECRET": "top-level-secret-0123"})
    assert home.managed_identity is not None
    assert acme.managed_identity is None and acme.client_secret == "s" * 24 and acme.tenant == "acme-directory"
    assert acme.credential.startswith("client secret")


def test_a_tenants_own_cloud_names_its_hosts_over_the_top_levels(tmp_path) -> None:
    raw = {"misp_domain": "https://misp.example/", "misp_key": "k" * 40, "log_file": str(tmp_path / "m2d.log"),
           "defender_api_url": "https://api-eu.securitycenter.microsoft.com",  # a regional host, commercial
           "graph_auth": {"tenant": "home-directory", "client_id": "app", "client_secret": "s" * 24},
           "tenants": [{"name": "home"}, {"name": "agency", "defender_cloud": "gcc-high",
                                          "graph_auth": {"tenant": "agency-directory"}}]}
    home, agency = m2d.build_tenants(raw, environ={})
    assert home.api_url == "https://api-eu.securitycenter.microsoft.com"
    assert agency.api_url == "https://api-gov.securitycenter.microsoft.us"
    assert agency.authority == "https://login.microsoftonline.us"
    assert agency.target_scope == "https://api-gov.securitycenter.microsoft.us/.default"


def test_a_tenants_proxies_carry_only_its_own_entra_and_defender(tool: Tool, customers: list[Customer],
                                                                 monkeypatch) -> None:
    from tests.standins.proxy import ProxyStandIn

    acme, globex, _ = customers
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.delenv("no_proxy")
    with ProxyStandIn() as proxy:
        result = tool.run(tenants=[acme.entry(proxies={"https": proxy.url, "http": proxy.url}), globex.entry()])
    assert result.code == 0, result.stderr
    assert acme.keys() == globex.keys() == SAMPLE_KEYS
    acme_hosts = {f"CONNECT {url.split('//')[1]}" for url in (acme.entra.url, acme.defender.url)}
    assert set(proxy.targets) == acme_hosts  # not MISP, not globex


BAD_TENANTS = [
    ({"tenants": {"name": "acme"}}, "config key tenants must be a list"),
    ({"tenants": {}}, "config key tenants must be a list"),
    ({"tenants": ""}, "config key tenants must be a list"),
    ({"tenants": ["acme"]}, "entry 1 must be a dict"),
    ({"tenants": [{"graph_auth": {}}]}, "entry 1 needs a 'name'"),
    ({"tenants": [{"name": "bad name!"}]}, "not 'bad name!'"),
    ({"tenants": [{"name": "acme"}, {"name": "acme"}]}, "the name 'acme' is used twice"),
    ({"tenants": [{"name": "acme", "misp_domain": "https://elsewhere/"}]}, "tenant 'acme': key 'misp_domain'"),
    ({"tenants": [{"name": "acme", "defender_max_indicators": "many"}]},
     "tenant 'acme': config key defender_max_indicators must be a whole number"),
    ({"tenants": [{"name": "acme", "graph_auth": {"tenant": ""}}]}, "tenant 'acme': config key graph_auth['tenant']"),
    ({"tenants": [{"name": "acme", "graph_auth": "tenant-id"}]}, "tenant 'acme': config key graph_auth must be"),
]


@pytest.mark.parametrize("overrides,message", BAD_TENANTS, ids=[m for _, m in BAD_TENANTS])
def test_a_malformed_tenants_list_stops_before_anything_is_contacted(tool: Tool, overrides: dict,
                                                                     message: str) -> None:
    if "graph_auth['tenant']" in message:  # a missing directory id: the top level names none either
        tool.defaults["graph_auth"] = {k: v for k, v in tool.defaults["graph_auth"].items() if k != "tenant"}
    result = tool.run(**overrides)
    assert result.code == 2
    assert message in result.stderr
    assert tool.misp.calls() == [] and tool.entra.calls() == [] and tool.defender.calls() == []


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_every_tenant_at_its_next_call(tool: Tool, customers: list[Customer], how: int) -> None:
    acme, globex, _ = customers
    for customer in (acme, globex):
        customer.defender.inject("import", delay=1.0, times=100)  # 8 slow batches each
    child, _ = tool.spawn(max_indicators_per_query=5, tenants=[acme.entry(), globex.entry()])
    assert wait_for(lambda: acme.defender.calls("import") and globex.defender.calls("import"), seconds=30)
    started = time.monotonic()
    child.send_signal(how)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 1 and "interrupted" in err
    assert time.monotonic() - started < 5, "the tenants' threads went on importing after SIGTERM"
    assert len(acme.defender.calls("import")) < 8 and len(globex.defender.calls("import")) < 8
