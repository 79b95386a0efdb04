"""The pod mutation: what an injected pod looks like, as pure functions."""

from __future__ import annotations

import copy

import jsonpatch
import pytest

from pgwarden.operator import injection as inj
from pgwarden.operator.settings import InjectionSettings

SETTINGS = InjectionSettings(image="example.org/pgwarden-proxy:test")
TARGET = inj.InjectionTarget.for_connection("orders-prod")


def pod(annotations: dict[str, str] | None = None, **spec: object) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent", "namespace": "agents",
                     "annotations": {"pgwarden.dev/inject": "orders-prod", **(annotations or {})}},
        "spec": {"containers": [{"name": "agent", "image": "agent:1", "env": [{"name": "PGHOST", "value": "db.prod"}]}],
                 **spec},
    }


def sidecar(p: dict) -> dict:
    found = [c for c in p["spec"].get("initContainers", []) + p["spec"]["containers"] if c["name"] == inj.PROXY_CONTAINER]
    assert len(found) == 1
    return found[0]


class TestNativeSidecar:
    def test_is_first_init_container_with_restart_always(self) -> None:
        out = inj.inject_pod(pod(initContainers=[{"name": "migrate", "image": "m"}]), TARGET, SETTINGS)
        first = out["spec"]["initContainers"][0]
        assert first["name"] == inj.PROXY_CONTAINER and first["restartPolicy"] == "Always"
        assert [c["name"] for c in out["spec"]["containers"]] == ["agent"]

    def test_runs_the_proxy_with_bundle_and_proxy_config(self) -> None:
        c = sidecar(inj.inject_pod(pod(), TARGET, SETTINGS))
        assert c["image"] == SETTINGS.image
        assert c["command"] == ["pgwarden"]
        assert c["args"] == ["proxy", "--config", "/etc/pgwarden/bundle", "--config", "/etc/pgwarden/proxy.yaml"]

    def test_hardened(self) -> None:
        sc = sidecar(inj.inject_pod(pod(), TARGET, SETTINGS))["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}

    def test_resources_and_probes(self) -> None:
        c = sidecar(inj.inject_pod(pod(), TARGET, SETTINGS))
        assert c["resources"]["requests"] and c["resources"]["limits"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "pgw-health"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "pgw-health"}
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"pgw-postgres": 5432, "pgw-health": 8081}

    def test_downward_api_env(self) -> None:
        env = {e["name"]: e for e in sidecar(inj.inject_pod(pod(), TARGET, SETTINGS))["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert env["SERVICE_ACCOUNT"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.serviceAccountName"
        assert "PGHOST" not in env


class TestVolumes:
    def test_projected_volume_holds_bundle_credentials_and_token(self) -> None:
        out = inj.inject_pod(pod(), TARGET, SETTINGS)
        vol = next(v for v in out["spec"]["volumes"] if v["name"] == inj.CONFIG_VOLUME)
        sources = vol["projected"]["sources"]
        cm = next(s["configMap"] for s in sources if "configMap" in s)
        assert cm["name"] == "orders-prod-pgwarden-bundle"
        assert {i["path"] for i in cm["items"]} == {"bundle/bundle.yaml", "proxy.yaml", "operator-ca.crt"}
        secret = next(s["secret"] for s in sources if "secret" in s)
        assert secret["name"] == "orders-prod-pgwarden-credentials"
        assert {"credentials/username", "credentials/password"} <= {i["path"] for i in secret["items"]}
        token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
        # the proxy's own audience, for the operator's approvals gateway; not the agents' `pgwarden`
        assert token["audience"] == "pgwarden-operator"

    def test_refuses_an_agent_token_for_the_proxys_audience(self) -> None:
        """Whoever holds a pgwarden-operator token is the proxy to the approvals gateway."""
        p = pod(volumes=[{"name": "mine", "projected": {"sources": [
            {"serviceAccountToken": {"audience": "pgwarden-operator", "path": "t"}}]}}])
        with pytest.raises(inj.InjectionError, match="only the pgwarden proxy may hold"):
            inj.inject_pod(p, TARGET, SETTINGS)
        ok = pod(volumes=[{"name": "mine", "projected": {"sources": [
            {"serviceAccountToken": {"audience": "pgwarden", "path": "t"}}]}}])
        assert sidecar(inj.inject_pod(ok, TARGET, SETTINGS))

    def test_credentials_mounted_into_the_proxy_only(self) -> None:
        out = inj.inject_pod(pod(initContainers=[{"name": "init", "image": "i"}]), TARGET, SETTINGS)
        for c in out["spec"]["containers"] + out["spec"]["initContainers"]:
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert (inj.CONFIG_VOLUME in mounts) == (c["name"] == inj.PROXY_CONTAINER)

    def test_refuses_agent_mounting_the_credentials_secret(self) -> None:
        p = pod(volumes=[{"name": "steal", "secret": {"secretName": TARGET.secret_name}}])
        p["spec"]["containers"][0]["volumeMounts"] = [{"name": "steal", "mountPath": "/x"}]
        with pytest.raises(inj.InjectionError, match="mounts the database credentials"):
            inj.inject_pod(p, TARGET, SETTINGS)

    def test_refuses_agent_env_from_the_credentials_secret(self) -> None:
        p = pod()
        p["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": TARGET.secret_name}}]
        with pytest.raises(inj.InjectionError, match="envFrom"):
            inj.inject_pod(p, TARGET, SETTINGS)

    def test_refuses_pre_declared_mount_of_our_volume(self) -> None:
        p = pod()
        p["spec"]["containers"][0]["volumeMounts"] = [{"name": inj.CONFIG_VOLUME, "mountPath": "/steal"}]
        with pytest.raises(inj.InjectionError):
            inj.inject_pod(p, TARGET, SETTINGS)


    @pytest.mark.parametrize("volume", [inj.TMP_VOLUME, inj.DATA_VOLUME, inj.RECORDINGS_VOLUME])
    def test_refuses_agent_mounting_the_proxys_scratch_volumes(self, volume: str) -> None:
        p = pod()
        p["spec"]["containers"][0]["volumeMounts"] = [{"name": volume, "mountPath": "/x"}]
        with pytest.raises(inj.InjectionError, match="only the pgwarden proxy"):
            inj.inject_pod(p, TARGET, SETTINGS)

    @pytest.mark.parametrize("field", ["shareProcessNamespace", "hostPID"])
    def test_refuses_a_process_namespace_shared_with_the_proxy(self, field: str) -> None:
        """/proc/<proxy pid>/root and /environ would hand the agent the credentials."""
        with pytest.raises(inj.InjectionError, match=field):
            inj.inject_pod(pod(**{field: True}), TARGET, SETTINGS)
        assert sidecar(inj.inject_pod(pod(**{field: False}), TARGET, SETTINGS))


class TestAgentEnv:
    def test_pghost_pgport_on_agents(self) -> None:
        out = inj.inject_pod(pod(initContainers=[{"name": "init", "image": "i"}]), TARGET, SETTINGS)
        for c in out["spec"]["containers"] + out["spec"]["initContainers"][1:]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["PGHOST"] == "127.0.0.1" and env["PGPORT"] == "5432"
            assert [e["name"] for e in c["env"]].count("PGHOST") == 1

    def test_opt_out(self) -> None:
        out = inj.inject_pod(pod({"pgwarden.dev/inject-env": "false"}), TARGET, SETTINGS)
        assert out["spec"]["containers"][0]["env"] == [{"name": "PGHOST", "value": "db.prod"}]


class TestModesAndIdempotence:
    def test_container_fallback(self) -> None:
        out = inj.inject_pod(pod({"pgwarden.dev/sidecar-mode": "container"}), TARGET, SETTINGS)
        assert "initContainers" not in out["spec"]
        c = out["spec"]["containers"][-1]
        assert c["name"] == inj.PROXY_CONTAINER and "restartPolicy" not in c

    def test_bad_mode(self) -> None:
        with pytest.raises(inj.InjectionError, match="native"):
            inj.inject_pod(pod({"pgwarden.dev/sidecar-mode": "sideways"}), TARGET, SETTINGS)

    def test_marks_and_leaves_injected_pods_alone(self) -> None:
        once = inj.inject_pod(pod(), TARGET, SETTINGS)
        assert once["metadata"]["annotations"]["pgwarden.dev/injected"] == "orders-prod"
        assert once["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "agent"
        assert inj.inject_pod(once, TARGET, SETTINGS) == once
        assert inj.pod_patch(once, TARGET, SETTINGS) == []

    def test_argument_not_modified(self) -> None:
        p = pod()
        before = copy.deepcopy(p)
        inj.inject_pod(p, TARGET, SETTINGS)
        assert p == before

    def test_json_patch_applies_to_the_injected_pod(self) -> None:
        p = pod()
        ops = inj.pod_patch(p, TARGET, SETTINGS)
        assert ops and all(op["op"] in ("add", "replace", "remove", "move", "copy") for op in ops)
        assert jsonpatch.apply_patch(p, ops) == inj.inject_pod(p, TARGET, SETTINGS)


class TestWorkloads:
    def deployment(self) -> dict:
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "cursor-agent", "annotations": {"pgwarden.dev/inject": "orders-prod"}},
                "spec": {"template": {"metadata": {"labels": {"app": "a"}},
                                      "spec": {"containers": [{"name": "agent", "image": "a"}]}}}}

    def test_carry_patch_for_deployment(self) -> None:
        patch = inj.carry_annotations_patch(self.deployment())
        assert patch == {"spec": {"template": {"metadata": {"annotations": {"pgwarden.dev/inject": "orders-prod"}}}}}

    def test_carry_patch_for_cronjob(self) -> None:
        cj = {"kind": "CronJob", "metadata": {"annotations": {"pgwarden.dev/inject": "c", "pgwarden.dev/sidecar-mode": "native"}},
              "spec": {"jobTemplate": {"spec": {"template": {"spec": {}}}}}}
        assert inj.carry_annotations_patch(cj) == {"spec": {"jobTemplate": {"spec": {"template": {"metadata": {
            "annotations": {"pgwarden.dev/inject": "c", "pgwarden.dev/sidecar-mode": "native"}}}}}}}

    def test_no_carry_when_already_there_or_not_annotated(self) -> None:
        d = self.deployment()
        d["spec"]["template"]["metadata"]["annotations"] = {"pgwarden.dev/inject": "orders-prod"}
        assert inj.carry_annotations_patch(d) is None
        d["metadata"]["annotations"] = {}
        assert inj.carry_annotations_patch(d) is None
        assert inj.carry_annotations_patch({"kind": "Service", "metadata": {"annotations": {"pgwarden.dev/inject": "x"}}}) is None

    def test_inject_manifest_deployment(self) -> None:
        out = inj.inject_manifest(self.deployment(), None, {}, SETTINGS)
        tpl = out["spec"]["template"]
        assert tpl["metadata"]["annotations"]["pgwarden.dev/injected"] == "orders-prod"
        assert tpl["metadata"]["labels"] == {"app": "a", inj.LABEL_PROXY_VERSION: "test"}
        assert tpl["spec"]["initContainers"][0]["name"] == inj.PROXY_CONTAINER


class TestPodsTheProxyCannotProtect:
    def test_refuses_host_network(self) -> None:
        """On the node's network the proxy's loopback is the node's: every process there would
        pass for this pod's service account (podIdentity)."""
        with pytest.raises(inj.InjectionError, match="hostNetwork"):
            inj.inject_pod(pod(hostNetwork=True), TARGET, SETTINGS)
        assert sidecar(inj.inject_pod(pod(hostNetwork=False), TARGET, SETTINGS))

    @pytest.mark.parametrize("port", [5432, 8081])
    def test_refuses_a_container_port_the_proxy_listens_on(self, port: int) -> None:
        p = pod()
        p["spec"]["containers"][0]["ports"] = [{"name": "pg", "containerPort": port}]
        with pytest.raises(inj.InjectionError, match=f"declares port {port}"):
            inj.inject_pod(p, TARGET, SETTINGS)

    def test_other_ports_and_udp_are_fine(self) -> None:
        p = pod()
        p["spec"]["containers"][0]["ports"] = [{"containerPort": 8080}, {"containerPort": 5432, "protocol": "UDP"}]
        assert sidecar(inj.inject_pod(p, TARGET, SETTINGS))


class TestVersionAndIdentity:
    def test_proxy_version_is_stamped_for_listing_stale_sidecars(self) -> None:
        out = inj.inject_pod(pod(), TARGET, SETTINGS)
        assert out["metadata"]["labels"][inj.LABEL_PROXY_VERSION] == "test"
        assert out["metadata"]["annotations"][inj.ANNOTATION_PROXY_IMAGE] == SETTINGS.image

    @pytest.mark.parametrize("image,label", [
        ("ghcr.io/pgwarden/pgwarden-proxy:0.2.0", "0.2.0"),
        ("registry:5000/pgwarden-proxy:1.0.0-rc.1", "1.0.0-rc.1"),
        ("registry:5000/pgwarden-proxy", "latest"),
        ("ghcr.io/pgwarden/pgwarden-proxy@sha256:0123456789abcdef0123", "sha256-0123456789abc"),
    ])
    def test_version_label_value(self, image: str, label: str) -> None:
        assert inj.proxy_version(image) == label

    def test_run_as_user_is_optional_but_non_root_stays(self) -> None:
        """OpenShift's restricted SCC assigns UIDs and refuses pods that pick their own."""
        from dataclasses import replace

        sc = sidecar(inj.inject_pod(pod(), TARGET, replace(SETTINGS, run_as_user=None)))["securityContext"]
        assert "runAsUser" not in sc and "runAsGroup" not in sc and sc["runAsNonRoot"] is True
        sc = sidecar(inj.inject_pod(pod(), TARGET, SETTINGS))["securityContext"]
        assert sc["runAsUser"] == sc["runAsGroup"] == 65532

    def test_run_as_user_from_the_charts_env(self) -> None:
        from pgwarden.operator.settings import OperatorSettings

        assert OperatorSettings.from_env({"PGWARDEN_SIDECAR_RUN_AS_USER": ""}).injection.run_as_user is None
        assert OperatorSettings.from_env({"PGWARDEN_SIDECAR_RUN_AS_USER": "1000"}).injection.run_as_user == 1000
        assert OperatorSettings.from_env({}).injection.run_as_user == 65532
        with pytest.raises(ValueError, match="never runs as root"):
            OperatorSettings.from_env({"PGWARDEN_SIDECAR_RUN_AS_USER": "0"})


class TestEphemeralContainers:
    """`kubectl debug` adds ephemeral containers through pods/ephemeralcontainers (an UPDATE the
    pod webhook never sees): one that targets the proxy or mounts its volumes is refused."""

    def injected(self, **ephemeral: object) -> dict:
        p = pod(volumes=[{"name": "creds-copy", "secret": {"secretName": TARGET.secret_name}}])
        out = inj.inject_pod(pod(), TARGET, SETTINGS)
        out["spec"]["volumes"] += p["spec"]["volumes"]  # as if added some other way
        out["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox", **ephemeral}]
        return out

    def test_targeting_the_proxy_is_refused(self) -> None:
        with pytest.raises(inj.InjectionError, match="targets pgwarden-proxy"):
            inj.check_ephemeral_containers(self.injected(targetContainerName=inj.PROXY_CONTAINER))

    @pytest.mark.parametrize("volume", [inj.CONFIG_VOLUME, inj.DATA_VOLUME, inj.TMP_VOLUME, inj.RECORDINGS_VOLUME,
                                        "creds-copy"])
    def test_mounting_the_proxys_volumes_or_secret_is_refused(self, volume: str) -> None:
        with pytest.raises(inj.InjectionError, match="only the proxy may mount"):
            inj.check_ephemeral_containers(self.injected(volumeMounts=[{"name": volume, "mountPath": "/x"}]))

    def test_debugging_the_agent_is_fine(self) -> None:
        inj.check_ephemeral_containers(self.injected(targetContainerName="agent"))
        inj.check_ephemeral_containers(self.injected())

    def test_pods_without_the_proxy_are_not_pgwardens_business(self) -> None:
        p = pod()
        p["spec"]["ephemeralContainers"] = [{"name": "d", "image": "b", "targetContainerName": "pgwarden-proxy"}]
        p["metadata"]["annotations"] = {}
        inj.check_ephemeral_containers(p)


class TestMcpSidecar:
    """pgwarden.dev/mcp: the gate as an MCP server on the pod's loopback, beside the proxy."""

    def mcp(self, p: dict) -> dict | None:
        found = [c for c in p["spec"].get("initContainers", []) + p["spec"]["containers"] if c["name"] == inj.MCP_CONTAINER]
        return found[0] if found else None

    def test_absent_unless_asked_for(self) -> None:
        assert self.mcp(inj.inject_pod(pod(), TARGET, SETTINGS)) is None
        assert self.mcp(inj.inject_pod(pod({"pgwarden.dev/mcp": "false"}), TARGET, SETTINGS)) is None

    def test_serves_mcp_on_loopback_after_the_proxy_as_the_pods_identity(self) -> None:
        out = inj.inject_pod(pod({"pgwarden.dev/mcp": "true"}), TARGET, SETTINGS)
        names = [c["name"] for c in out["spec"]["initContainers"]]
        assert names[:2] == [inj.PROXY_CONTAINER, inj.MCP_CONTAINER]  # native sidecars start in order
        c = self.mcp(out)
        assert c is not None and c["restartPolicy"] == "Always" and c["image"] == SETTINGS.image
        assert c["args"] == ["mcp", "--http", "127.0.0.1:8765", "--host", SETTINGS.listen_host,
                             "--port", str(SETTINGS.listen_port), "--database", "orders-prod"]
        # no credentials, no configuration, no token: it is a client of the proxy like the agent
        mounted = {m["name"] for m in c["volumeMounts"]}
        assert mounted == {inj.MCP_TMP_VOLUME}
        assert "env" not in c or not any("TOKEN" in e["name"] or "PASSWORD" in e["name"] for e in c["env"])
        assert c["securityContext"] == sidecar(out)["securityContext"]

    def test_a_port_of_ones_own(self) -> None:
        c = self.mcp(inj.inject_pod(pod({"pgwarden.dev/mcp": "9100"}), TARGET, SETTINGS))
        assert c is not None and "127.0.0.1:9100" in c["args"] and c["ports"][0]["containerPort"] == 9100

    @pytest.mark.parametrize("value", ["yes", "80", "70000", "-1"])
    def test_a_bad_value_is_refused(self, value: str) -> None:
        with pytest.raises(inj.InjectionError, match="pgwarden.dev/mcp"):
            inj.inject_pod(pod({"pgwarden.dev/mcp": value}), TARGET, SETTINGS)

    def test_an_agent_port_on_the_mcp_port_is_refused(self) -> None:
        p = pod({"pgwarden.dev/mcp": "true"})
        p["spec"]["containers"][0]["ports"] = [{"containerPort": 8765}]
        with pytest.raises(inj.InjectionError, match="8765"):
            inj.inject_pod(p, TARGET, SETTINGS)

    def test_container_mode_and_carried_from_the_deployment(self) -> None:
        out = inj.inject_pod(pod({"pgwarden.dev/mcp": "true", "pgwarden.dev/sidecar-mode": "container"}), TARGET, SETTINGS)
        assert [c["name"] for c in out["spec"]["containers"]] == ["agent", inj.PROXY_CONTAINER, inj.MCP_CONTAINER]
        assert "pgwarden.dev/mcp" in inj.CARRIED_ANNOTATIONS

    def test_the_injected_pod_is_a_valid_pod(self) -> None:
        import kubernetes_validate

        out = inj.inject_pod(pod({"pgwarden.dev/mcp": "true"}), TARGET, SETTINGS)
        for version in ("1.29.0", kubernetes_validate.utils.latest_version()):
            kubernetes_validate.validate(out, version, strict=True)
