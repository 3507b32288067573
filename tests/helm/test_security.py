"""Pod Security labels, the service pod's restrictions, and the hub API token's logic.

What is proven here without a cluster, and what is not: ``helm template`` has no cluster,
so the chart's ``lookup`` of the existing token Secret answers nothing and every rendering
makes a new token; these tests prove the generation, the wiring of the Secret into the
pod, and the use of an existing Secret. That ``helm upgrade`` keeps the token (the lookup
branch) is proven only against a real API server: tests/helm/test_chart_on_cluster.py.
"""

from __future__ import annotations

import base64

import pytest

from .chart import HelmFailed

pytestmark = pytest.mark.helm

PSA_MODES = ("enforce", "audit", "warn")


def test_executions_namespace_is_pod_security_restricted(helm):
    namespace = helm.render().one("Namespace")
    labels = namespace["metadata"]["labels"]
    for mode in PSA_MODES:
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
        assert labels[f"pod-security.kubernetes.io/{mode}-version"] == "latest"


def test_no_namespace_when_it_exists_already(helm):
    rendered = helm.render(values={"executions.createNamespace": False})
    assert "Namespace" not in rendered.kinds()
    # what lives in it is still rendered there
    assert rendered.one("Role")["metadata"]["namespace"] == "crucible-executions"
    assert rendered.one("NetworkPolicy", "deny-all")["metadata"]["namespace"] == (
        "crucible-executions"
    )


def test_service_pod_is_restricted(helm):
    """The service's pod meets Pod Security `restricted` itself, with a read-only root."""
    pod = helm.render().one("StatefulSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is True  # the one pod that needs the API
    assert pod["enableServiceLinks"] is False
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    for volume in pod["volumes"]:
        assert "hostPath" not in volume
    assert "resources" in container
    assert container["resources"]["limits"]


def test_service_account_mounts_no_token_by_default(helm):
    assert helm.render().one("ServiceAccount")["automountServiceAccountToken"] is False


def test_service_is_a_one_replica_statefulset(helm):
    """At most one dispatcher at any time: the service's workload is a StatefulSet with
    one replica, never a Deployment. A Deployment (even with ``strategy: Recreate``,
    which only governs rollouts) starts a deleted or evicted pod's replacement at once,
    beside the old pod in its shutdown grace: two dispatchers on one SQLite file were
    seen writing the same cell's events (``UNIQUE constraint failed: events.execution_id,
    events.seq``) and a cell reported failed while its record stayed ``running``. A
    StatefulSet starts the replacement (same name) only once the old pod is gone. On the
    cluster: tests/helm/test_hub_on_cluster.py::test_crucible_pod_deleted_mid_cell."""
    for values in ({}, {"storage.type": "postgresql",
                        "storage.postgresql.existingSecret.name": "db"}):  # fmt: skip
        rendered = helm.render(values=values)
        for kind in ("Deployment", "ReplicaSet", "DaemonSet", "Pod", "Job"):
            assert kind not in rendered.kinds(), f"{kind} in the chart: {rendered.kinds()}"
        workload = rendered.one("StatefulSet")
        spec = workload["spec"]
        assert spec["replicas"] == 1
        assert spec["serviceName"] == rendered.one("Service")["metadata"]["name"]
        assert spec["updateStrategy"] == {"type": "RollingUpdate"}
        assert "volumeClaimTemplates" not in spec  # the chart's own claim, kept by upgrades
        assert spec["selector"]["matchLabels"] == rendered.one("Service")["spec"]["selector"]


def test_service_pod_probes_and_grace(helm):
    rendered = helm.render()
    pod = rendered.one("StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/services/crucible/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/services/crucible/readyz"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > rendered.config()["CrucibleService"]["shutdown_grace_seconds"]


def test_grace_not_above_the_service_s_own_is_refused(helm):
    """The kill must come after the service's shutdown grace, also when server.config
    sets that grace directly (a value file test: bad-values/grace-not-above-shutdown)."""
    with pytest.raises(HelmFailed) as refused:
        helm.render(values={"server.config.CrucibleService.shutdown_grace_seconds": 45})
    assert "server.terminationGracePeriodSeconds (40) is not above" in str(refused.value)
    assert "(45, server.shutdownGraceSeconds)" in str(refused.value)


def _token(rendered) -> str:
    secret = rendered.one("Secret", "-hub-token")
    return base64.b64decode(secret["data"]["api-token"]).decode()


def _token_env(rendered) -> dict:
    (container,) = rendered.one("StatefulSet")["spec"]["template"]["spec"]["containers"]
    (env,) = [e for e in container["env"] if e["name"] == "JUPYTERHUB_API_TOKEN"]
    return env["valueFrom"]["secretKeyRef"]


def test_token_generated_and_wired_into_the_pod(helm):
    rendered = helm.render()
    token = _token(rendered)
    assert len(token) == 64
    assert token.isalnum()
    secret = rendered.one("Secret", "-hub-token")
    assert _token_env(rendered) == {"name": secret["metadata"]["name"], "key": "api-token"}


def test_without_a_cluster_each_rendering_makes_a_new_token(helm):
    """Offline, lookup finds no Secret: a new token each time. (On a cluster the existing
    one is kept: test_chart_on_cluster.py.)"""
    assert _token(helm.render()) != _token(helm.render())


def test_token_from_an_existing_secret(helm):
    """With hub.apiToken.existingSecret (z2jh's own `hub` Secret, say) no Secret is made
    and the pod reads that one."""
    rendered = helm.render(
        values={
            "hub.apiToken.existingSecret.name": "hub",
            "hub.apiToken.existingSecret.key": "hub.services.crucible.apiToken",
        }
    )
    assert rendered.all("Secret") == []
    assert _token_env(rendered) == {"name": "hub", "key": "hub.services.crucible.apiToken"}


def test_token_template_reuses_the_stored_value(helm):
    """The template's lookup branch, read: it reuses the existing Secret's `api-token`
    and only falls back to a random one when there is none (its behaviour against a real
    API server: test_chart_on_cluster.py)."""
    from .chart import CHART

    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    body = helpers[helpers.index('define "crucible.hubToken"') :]
    body = body[: body.index("{{- end }}\n\n")]
    assert 'lookup "v1" "Secret" .Release.Namespace (include "crucible.tokenSecretName" .)' in body
    assert body.index('index $data "api-token" | b64dec') < body.index("randAlphaNum 64")


def test_postgresql_url_from_the_secret_and_no_volume(helm):
    rendered = helm.render(
        values={"storage.type": "postgresql", "storage.postgresql.existingSecret.name": "db"}
    )
    pod = rendered.one("StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (env,) = [e for e in container["env"] if e["name"] == "CRUCIBLE_DB_URL"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "db", "key": "url"}
    assert "PersistentVolumeClaim" not in rendered.kinds()
    assert "db_url" not in rendered.config()["CrucibleDispatcher"]  # the env var decides


def test_sqlite_on_a_kept_claim(helm):
    rendered = helm.render()
    claim = rendered.one("PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = rendered.one("StatefulSet")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert rendered.config()["CrucibleDispatcher"]["db_url"] == "sqlite:////data/crucible.db"
