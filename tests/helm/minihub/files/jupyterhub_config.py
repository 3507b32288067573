# The hub of tests/helm/minihub: KubeSpawner user pods, the proxy in its own pod, and the
# zero-to-jupyterhub values applied the way z2jh's own jupyterhub_config.py applies them
# (hub.services, hub.loadRoles, hub.config, singleuser.extraEnv, hub.extraConfig last).
import json
import os

c = get_config()  # noqa: F821

with open("/usr/local/etc/jupyterhub/secret/values.json") as f:
    values = json.load(f)
hub, singleuser = values["hub"], values["singleuser"]
release = os.environ["HELM_RELEASE_NAME"]

c.JupyterHub.bind_url = "http://:8000"
c.JupyterHub.hub_bind_url = "http://:8081"
c.JupyterHub.hub_connect_url = "http://hub:8081"
c.JupyterHub.db_url = "sqlite:////srv/jupyterhub/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "/srv/jupyterhub/jupyterhub_cookie_secret"
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = "http://proxy-api:8001"
c.JupyterHub.cleanup_servers = False

c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = hub["dummyPassword"]
c.Authenticator.allow_all = True

c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
c.KubeSpawner.namespace = os.environ["POD_NAMESPACE"]
c.KubeSpawner.image = f"{singleuser['image']['name']}:{singleuser['image']['tag']}"
c.KubeSpawner.image_pull_policy = singleuser["image"]["pullPolicy"]
# z2jh's labels; KubeSpawner adds component: singleuser-server
c.KubeSpawner.common_labels = {"app": "jupyterhub", "heritage": "jupyterhub", "release": release}
c.KubeSpawner.uid = 1000
c.KubeSpawner.fs_gid = 100
c.KubeSpawner.port = 8888
c.KubeSpawner.start_timeout = 300
c.KubeSpawner.http_timeout = 120
c.KubeSpawner.cpu_guarantee = 0.05
c.KubeSpawner.mem_guarantee = "256M"
c.KubeSpawner.mem_limit = "1G"
c.KubeSpawner.container_security_context = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# z2jh: singleuser.serviceAccountName unset -> no service account token in user pods

# --- as z2jh's jupyterhub_config.py (which starts both lists empty) ---
c.JupyterHub.services = []
c.JupyterHub.load_roles = []
for key, service in hub.get("services", {}).items():
    service = dict(service)
    service.setdefault("name", key)
    if "apiToken" in service:
        service["api_token"] = service.pop("apiToken")
    if "oauthRedirectUri" in service:
        service["oauth_redirect_uri"] = service.pop("oauthRedirectUri")
    c.JupyterHub.services.append(service)

for key, role in hub.get("loadRoles", {}).items():
    role = dict(role)
    role.setdefault("name", key)
    c.JupyterHub.load_roles.append(role)

for section, settings in hub.get("config", {}).items():
    c[section].update(settings)

if singleuser.get("extraEnv"):
    c.KubeSpawner.environment.update(singleuser["extraEnv"])

for key, snippet in sorted(hub.get("extraConfig", {}).items()):
    print(f"Loading extra config: {key}")
    exec(snippet)
