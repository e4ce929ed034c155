"""Settings: defaults, validation that names the key, presets, secrets from the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.util import BASE_CONFIG, ROOT, m2d, make_settings


def test_config_py_default_loads_with_every_documented_default() -> None:
    raw = m2d.load_config_module(ROOT / "config.py.default")
    # The two names defender_cloud sets are shown commented out, so that the preset can apply.
    assert set(raw) == set(m2d.DEFAULTS) - {"targetScope", "defender_api_url"}
    text = (ROOT / "config.py.default").read_text()
    assert "# targetScope = 'https://api.securitycenter.windows.com/.default'" in text
    assert '# defender_api_url = "https://api.securitycenter.microsoft.com"' in text
    for name, value in m2d.DEFAULTS.items():
        if name not in raw:
            continue
        if name == "graph_auth":
            assert {k: raw[name][k] for k in ("tenant", "client_id", "client_secret")} == value
        else:
            assert raw[name] == value, name


def test_defaults_match_the_original_readme() -> None:
    s = make_settings()
    assert (s.max_indicators_per_query, s.quota_requests, s.misp_page_size) == (450, 25, 100)
    assert s.target_scope == "https://api.securitycenter.windows.com/.default"
    assert s.api_url == "https://api.securitycenter.microsoft.com"
    assert s.authority == "https://login.microsoftonline.com"
    assert (s.days_to_expire, s.days_to_expire_tlpclear, s.expire_from_current_date) == (50, 7, False)
    assert (s.application, s.severity, s.action, s.recommended_actions) == ("MISP", "Medium", "Audit", "Block")
    assert s.misp_event_filters == {"published": True, "tags": ['workflow:state="complete"'],
                                    "enforceWarninglist": True, "publish_timestamp": "2d"}
    assert (s.remove_guard_percent, s.max_indicators) == (50, 15000)


@pytest.mark.parametrize("overrides, key", [
    ({"misp_domain": ""}, "misp_domain"),
    ({"misp_domain": "misp.local"}, "misp_domain"),
    ({"misp_key": ""}, "misp_key"),
    ({"graph_auth": {"tenant": "", "client_id": "c", "client_secret": "s"}}, "graph_auth['tenant']"),
    ({"graph_auth": {"tenant": "t", "client_id": "", "client_secret": "s"}}, "graph_auth['client_id']"),
    ({"graph_auth": {"tenant": "t", "client_id": "c", "client_secret": ""}}, "graph_auth['client_secret']"),
    ({"graph_auth": "t:c:s"}, "graph_auth"),
    ({"max_indicators_per_query": 501}, "max_indicators_per_query"),
    ({"max_indicators_per_query": "450"}, "max_indicators_per_query"),
    ({"quota_requests": 0}, "quota_requests"),
    ({"quota_requests": True}, "quota_requests"),
    ({"defender_severity": "Critical"}, "defender_severity"),
    ({"defender_action": "Deny"}, "defender_action"),
    ({"days_to_expire_start": "now"}, "days_to_expire_start"),
    ({"days_to_expire_mapping": {"Ip": 5}}, "days_to_expire_mapping"),
    ({"days_to_expire_mapping": {"IpAddress": -1}}, "days_to_expire_mapping['IpAddress']"),
    ({"misp_event_filters": ["published"]}, "misp_event_filters"),
    ({"misp_verifycert": "/nonexistent/ca.pem"}, "misp_verifycert"),
    ({"defender_cloud": "china"}, "defender_cloud"),
    ({"defender_api_url": "http://api.local"}, "defender_api_url"),
    ({"exclude_if_in_alienvault": True}, "otx_alienvault_api"),
    ({"remove_guard_percent": 150}, "remove_guard_percent"),
    ({"defender_application": " "}, "defender_application"),
    ({"vetted_attribute_classifier": "tag"}, "vetted_attribute_classifier"),
])
def test_bad_values_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(m2d.ConfigError) as error:
        make_settings(**overrides)
    assert key in str(error.value)


def test_dry_run_needs_no_defender_credentials() -> None:
    settings = make_settings(dry_run=True, graph_auth={"tenant": "", "client_id": "", "client_secret": ""})
    assert not settings.has_defender_credentials


def test_unknown_keys_are_warned_about_as_typos() -> None:
    settings = make_settings(days_to_expir=5)
    assert any("days_to_expir is not a misp2defender setting" in note for note in settings.notes)


def test_secrets_may_come_from_the_environment() -> None:
    raw = {**BASE_CONFIG, "misp_key": "", "graph_auth": {"tenant": "t", "client_id": "c"}}
    settings = m2d.build_settings(raw, environ={"MISP2DEFENDER_MISP_KEY": "env-misp",
                                                "MISP2DEFENDER_CLIENT_SECRET": "env-secret"})
    assert (settings.misp_key, settings.client_secret) == ("env-misp", "env-secret")


@pytest.mark.parametrize("cloud, api, authority, scope", [
    ("commercial", "https://api.securitycenter.microsoft.com", "https://login.microsoftonline.com",
     "https://api.securitycenter.windows.com/.default"),
    ("gcc", "https://api-gcc.securitycenter.microsoft.us", "https://login.microsoftonline.com",
     "https://api-gcc.securitycenter.microsoft.us/.default"),
    ("gcc-high", "https://api-gov.securitycenter.microsoft.us", "https://login.microsoftonline.us",
     "https://api-gov.securitycenter.microsoft.us/.default"),
    ("dod", "https://api-gov.securitycenter.microsoft.us", "https://login.microsoftonline.us",
     "https://api-gov.securitycenter.microsoft.us/.default"),
])
def test_cloud_presets(cloud: str, api: str, authority: str, scope: str) -> None:
    s = make_settings(defender_cloud=cloud)
    assert (s.api_url, s.authority, s.target_scope) == (api, authority, scope)


def test_config_py_default_with_a_gov_cloud_gets_the_gov_hosts() -> None:
    raw = {**m2d.load_config_module(ROOT / "config.py.default"), **BASE_CONFIG, "defender_cloud": "gcc-high"}
    s = m2d.build_settings(raw, environ={})
    assert (s.api_url, s.authority, s.target_scope) == (
        "https://api-gov.securitycenter.microsoft.us", "https://login.microsoftonline.us",
        "https://api-gov.securitycenter.microsoft.us/.default")


def test_dry_run_from_the_command_line_needs_no_credentials() -> None:
    raw = {**BASE_CONFIG, "graph_auth": {"tenant": "", "client_id": "", "client_secret": ""}}
    with pytest.raises(m2d.ConfigError):
        m2d.build_settings(raw, environ={})
    assert not m2d.build_settings(raw, environ={}, dry_run=True).has_defender_credentials


def test_explicit_urls_win_over_the_cloud_preset() -> None:
    s = make_settings(defender_cloud="gcc-high", defender_api_url="https://127.0.0.1:9/",
                      targetScope="custom/.default",
                      graph_auth={**BASE_CONFIG["graph_auth"], "authority": "https://127.0.0.1:8"})
    assert (s.api_url, s.authority, s.target_scope) == ("https://127.0.0.1:9", "https://127.0.0.1:8",
                                                        "custom/.default")


def test_lock_file_defaults_beside_the_log_file(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    s = make_settings(log_file=str(tmp_path / "logs" / "m2d.log"))
    assert s.lock_file == str(tmp_path / "logs" / "misp2defender.lock")


def test_config_py_default_explains_every_setting_it_accepts() -> None:
    """Every accepted key (and graph_auth's) is in config.py.default with a comment that explains it."""
    lines = (ROOT / "config.py.default").read_text().splitlines()
    for name in m2d.OPTIONS:
        found = [n for n, line in enumerate(lines) if line.lstrip("# ").startswith(f"{name} =")]
        assert found, f"{name} is not in config.py.default"
        n = found[0]
        explained = "#" in lines[n].split("=", 1)[1] or lines[n - 1].lstrip().startswith("#") or (
            n + 1 < len(lines) and lines[n + 1].lstrip().startswith("#"))
        assert explained, f"{name} has no comment in config.py.default"
    text = "\n".join(lines)
    for key in m2d.GRAPH_AUTH_KEYS:
        assert f"'{key}'" in text, f"graph_auth['{key}'] is not in config.py.default"
    documented = {m.group(1) for m in re.finditer(r"^#? ?([a-z]\w*) = ", text, flags=re.M)}
    assert documented - set(m2d.OPTIONS) == set(), "config.py.default documents keys the script does not accept"


def test_an_empty_user_agent_means_the_default() -> None:
    assert make_settings(custom_user_agent="").user_agent == m2d.DEFAULT_USER_AGENT
    assert make_settings(custom_user_agent=" ").user_agent == m2d.DEFAULT_USER_AGENT
    assert make_settings(custom_user_agent="acme-soc/2").user_agent == "acme-soc/2"
