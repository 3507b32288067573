"""examples/z2jh-values.yaml agrees with what the crucible chart renders.

It is values for the zero-to-jupyterhub chart, which is not here (its repository and
images are out of reach offline), so it cannot be rendered; what it must agree on with
crucible's rendering (release ``crucible`` in namespace ``jhub``, the example's
assumption) is checked: the service's name, URL and token Secret, the user servers' URL,
the egress rules' selectors and port, and the scopes.
"""

from __future__ import annotations

import pytest
import yaml

from .chart import EXAMPLES, NAMESPACE, selector_matches

pytestmark = pytest.mark.helm


@pytest.fixture(scope="module")
def z2jh() -> dict:
    return yaml.safe_load((EXAMPLES / "z2jh-values.yaml").read_text())


@pytest.fixture(scope="module")
def rendered(helm):
    return helm.render()


def _service_url(rendered) -> str:
    service = rendered.one("Service")
    port = service["spec"]["ports"][0]["port"]
    return f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port}"


def test_service_registration(z2jh, rendered):
    config = rendered.config()["CrucibleService"]
    (name,) = z2jh["hub"]["services"]
    assert name == config["service_name"]
    assert z2jh["hub"]["services"][name]["url"] == _service_url(rendered)


def test_user_servers_url(z2jh, rendered):
    prefix = rendered.config()["CrucibleService"]["prefix"]
    url = z2jh["singleuser"]["extraEnv"]["CRUCIBLE_SERVICE_URL"]
    assert url == _service_url(rendered) + prefix


def test_token_comes_from_crucibles_secret(z2jh, rendered):
    secret = rendered.one("Secret", "-hub-token")
    ref = z2jh["hub"]["extraEnv"]["CRUCIBLE_API_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "api-token"}
    code = z2jh["hub"]["extraConfig"]["crucible-token"]
    (name,) = z2jh["hub"]["services"]
    assert f'service["name"] == "{name}"' in code
    assert 'os.environ["CRUCIBLE_API_TOKEN"]' in code


def test_token_code_hands_the_token_to_the_service(z2jh, monkeypatch):
    """The extraConfig snippet, run as z2jh runs it (exec with ``c``), sets api_token."""
    from traitlets.config import Config

    c = Config()
    c.JupyterHub.services = [{"name": "crucible", "api_token": "z2jh-generated"}, {"name": "x"}]
    monkeypatch.setenv("CRUCIBLE_API_TOKEN", "from-crucible-secret")
    exec(z2jh["hub"]["extraConfig"]["crucible-token"], {"c": c})
    assert c.JupyterHub.services[0]["api_token"] == "from-crucible-secret"
    assert "api_token" not in c.JupyterHub.services[1]


@pytest.mark.parametrize("component", ["singleuser", "hub"])
def test_egress_reaches_the_service_pod(z2jh, rendered, component):
    pod = rendered.one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    port = rendered.one("Service")["spec"]["ports"][0]["port"]
    rules = z2jh[component]["networkPolicy"]["egress"]
    assert any(
        any(selector_matches(peer["podSelector"], pod) for peer in rule["to"])
        and {"port": port, "protocol": "TCP"} in rule["ports"]
        for rule in rules
    )


def test_scopes(z2jh, rendered):
    service = rendered.config()["CrucibleService"]
    access = f"access:services!service={service['service_name']}"
    admin = service["admin_scope"]
    roles = z2jh["hub"]["loadRoles"]
    assert access in roles["user"]["scopes"]
    assert "self" in roles["user"]["scopes"]
    assert roles["crucible-admin"]["scopes"] == [admin]
    assert admin in z2jh["hub"]["config"]["JupyterHub"]["custom_scopes"]
    server_scopes = z2jh["hub"]["config"]["Spawner"]["server_token_scopes"]
    assert access in server_scopes
    assert admin in server_scopes
    assert {"users:activity!user", "access:servers!server"} <= set(server_scopes)


def test_hub_pods_are_the_ones_crucible_admits(z2jh, rendered):
    """crucible's NetworkPolicy names the hub release this example is for."""
    policy = rendered.one("NetworkPolicy", "crucible")
    releases = {
        peer["podSelector"]["matchLabels"]["release"]
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
    }
    assert releases == {"jupyterhub"}  # the release the example's comment installs
