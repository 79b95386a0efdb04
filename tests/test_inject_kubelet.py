"""The injected proxy can read its own volume as kubelet lays it out on a node.

No kubelet runs here: `kubelet_model` reproduces the ownership and mode rules of projected
volumes (see its docstring for the sources), writes the files as root, and the real proxy config
and credential loader then runs in a subprocess that has dropped to the proxy's UID 65532 —
the way the sidecar runs in the pod.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubelet_model import fs_user, projected_files, write_volume

from pgwarden.connection import parse_connection
from pgwarden.operator import bundle, credentials
from pgwarden.operator import injection as inj
from pgwarden.operator.settings import InjectionSettings
from pgwarden.resources import document_from_object

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="writing files owned by root and dropping to uid 65532 needs root (the CI container runs as root)",
)

SETTINGS = InjectionSettings(image="example.org/pgwarden-proxy:test")
PROXY_UID = SETTINGS.run_as_user
CONN_RAW = {
    "apiVersion": "pgwarden.dev/v1alpha1",
    "kind": "DatabaseConnection",
    "metadata": {"name": "orders-prod", "namespace": "agents", "uid": "u-1"},
    "spec": {
        "host": "orders-db.prod.svc",
        "port": 5432,
        "database": "orders",
        "sslMode": "verify-full",
        "adminSecretRef": {"name": "orders-db-admin"},
    },
}
CONN = parse_connection(document_from_object(CONN_RAW))
POLICY = {
    "apiVersion": "pgwarden.dev/v1alpha1",
    "kind": "AccessPolicy",
    "metadata": {"name": "readers", "namespace": "agents"},
    "spec": {
        "connectionRef": {"name": "orders-prod"},
        "subjects": [{"group": "ai-agents"}],
        "rules": [{"action": "allow", "operations": ["select"], "tables": ["public.orders"]}],
    },
}
TOKEN = "eyJhbGciOiJSUzI1NiJ9.pgwarden-audience.sig"

# Runs as root until the modules are imported (the interpreter lives under /root, 0700), then
# becomes the proxy's UID and does what `pgwarden proxy` does at start with the sidecar's paths.
LOADER = r"""
import json, os, sys
from dataclasses import replace
from pathlib import Path
import pgwarden.policy, pgwarden.masking, pgwarden.audit.config, pgwarden.identity.workload, pgwarden.identity.backoff
from pgwarden.proxy.main import build_server
from pgwarden.proxy.config import parse_proxy_config
from pgwarden.resources import load_documents, ResourceError

root, uid, groups = Path(sys.argv[1]), int(sys.argv[2]), [int(g) for g in sys.argv[3].split(",") if g]
os.setgroups(groups)
os.setgid(uid)
os.setuid(uid)
assert os.geteuid() == uid and os.getuid() == uid
try:
    docs = load_documents([root / "bundle", root / "proxy.yaml"])
    build_server(docs)
    config = parse_proxy_config(docs)
    # the config names /etc/pgwarden/credentials; the volume is mounted at `root` here
    assert config.upstream.credentials_dir == "/etc/pgwarden/credentials"
    user, password = replace(config.upstream, credentials_dir=str(root / "credentials")).resolve()
    token = (root / "token").read_text()
except (ResourceError, RuntimeError, OSError) as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(0)
print(json.dumps({"user": user, "password": password, "token": token, "connection": config.connection.name}))
"""


@pytest.fixture
def volume_root() -> Iterator[Path]:
    # not under pytest's tmp_path: its parents are 0700 and uid 65532 could not even reach the files
    base = Path(tempfile.mkdtemp(prefix="pgw-kubelet-"))
    os.chmod(base, 0o755)
    try:
        yield base / "etc-pgwarden"
    finally:
        shutil.rmtree(base)


def agent_pod(
    *, agent_uid: int | None = 1000, fs_group: int | None = None, pod_uid: int | None = None
) -> dict[str, Any]:
    sc: dict[str, Any] = {}
    if fs_group is not None:
        sc["fsGroup"] = fs_group
    if pod_uid is not None:
        sc["runAsUser"] = pod_uid
    agent: dict[str, Any] = {"name": "agent", "image": "agent:1"}
    if agent_uid is not None:
        agent["securityContext"] = {"runAsUser": agent_uid}
    spec: dict[str, Any] = {"serviceAccountName": "cursor-agent", "containers": [agent]}
    if sc:
        spec["securityContext"] = sc
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "agent",
            "namespace": "agents",
            "annotations": {inj.ANNOTATION_INJECT: "orders-prod"},
        },
        "spec": spec,
    }


def cluster_objects() -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    result = bundle.compile_bundle(CONN_RAW, [POLICY], CONN, SETTINGS)
    cm = bundle.bundle_configmap(CONN, result, CONN_RAW)
    secret = credentials.credentials_secret(
        CONN, username="pgw_orders_prod_v3", password="s3cret-v3", version=3, owner=CONN_RAW
    )
    return {cm["metadata"]["name"]: cm["data"]}, {secret["metadata"]["name"]: secret["data"]}


def mount_and_load(
    root: Path, pod_spec: dict[str, Any], *, supplementary: tuple[int, ...] = ()
) -> dict[str, Any]:
    configmaps, secrets = cluster_objects()
    files = projected_files(pod_spec, inj.CONFIG_VOLUME, configmaps, secrets, TOKEN)
    write_volume(root, files)
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(root), str(PROXY_UID), ",".join(map(str, supplementary))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def proxy_groups(pod_spec: dict[str, Any]) -> tuple[int, ...]:
    """Container runtimes add the pod's fsGroup to every container's supplementary groups."""
    g = (pod_spec.get("securityContext") or {}).get("fsGroup")
    return (int(g),) if g is not None else ()


class TestModel:
    """The model's rules, each stated by the documentation it follows."""

    def volume(self, **projected: Any) -> dict[str, Any]:
        return {
            "volumes": [
                {
                    "name": "v",
                    "projected": {
                        "sources": [
                            {"configMap": {"name": "cm", "items": [{"key": "a", "path": "a"}]}},
                            {"serviceAccountToken": {"path": "token", "audience": "pgwarden"}},
                        ],
                        **projected,
                    },
                }
            ]
        }

    def test_different_uids_leave_files_root_owned_with_the_default_mode(self) -> None:
        spec = {
            **self.volume(defaultMode=0o440),
            "containers": [
                {"name": "a", "securityContext": {"runAsUser": 1000}},
                {"name": "b", "securityContext": {"runAsUser": 65532}},
            ],
        }
        files = {f.path: f for f in projected_files(spec, "v", {"cm": {"a": "x"}}, {}, "t")}
        assert fs_user(spec) is None
        assert {(f.uid, f.gid, f.mode) for f in files.values()} == {(0, 0, 0o440)}

    def test_a_container_without_run_as_user_makes_the_owner_root(self) -> None:
        spec = {
            **self.volume(),
            "containers": [{"name": "a"}, {"name": "b", "securityContext": {"runAsUser": 65532}}],
        }
        assert fs_user(spec) is None
        assert {f.uid for f in projected_files(spec, "v", {"cm": {"a": "x"}}, {}, "t")} == {0}

    def test_one_uid_for_every_container_owns_the_files_and_the_token_is_0600(self) -> None:
        spec = {
            **self.volume(defaultMode=0o444),
            "securityContext": {"runAsUser": 65532},
            "initContainers": [{"name": "i"}],
            "containers": [{"name": "a"}],
        }
        files = {f.path: f for f in projected_files(spec, "v", {"cm": {"a": "x"}}, {}, "t")}
        assert fs_user(spec) == 65532
        assert (files["token"].uid, files["token"].mode) == (65532, 0o600)
        assert (files["a"].uid, files["a"].mode) == (65532, 0o444)

    def test_fs_group_takes_the_group_and_adds_group_read(self) -> None:
        spec = {
            **self.volume(defaultMode=0o400),
            "securityContext": {"fsGroup": 2000},
            "containers": [{"name": "a", "securityContext": {"runAsUser": 1}}, {"name": "b"}],
        }
        files = {f.path: f for f in projected_files(spec, "v", {"cm": {"a": "x"}}, {}, "t")}
        assert (files["a"].uid, files["a"].gid, files["a"].mode) == (0, 2000, 0o440)
        assert files["token"].mode == 0o600 | 0o440

    def test_item_mode_overrides_the_default(self) -> None:
        spec = {
            "volumes": [
                {
                    "name": "v",
                    "projected": {
                        "defaultMode": 0o444,
                        "sources": [
                            {"configMap": {"name": "cm", "items": [{"key": "a", "path": "a", "mode": 0o400}]}}
                        ],
                    },
                }
            ],
            "containers": [],
        }
        (f,) = projected_files(spec, "v", {"cm": {"a": "x"}}, {}, "t")
        assert f.mode == 0o400

    def test_layout_goes_through_dotdot_data(self, volume_root: Path) -> None:
        spec = {**self.volume(), "containers": [{"name": "a"}]}
        write_volume(volume_root, projected_files(spec, "v", {"cm": {"a": "x"}}, {}, "t"))
        assert os.readlink(volume_root / "a") == "..data/a" and (volume_root / "..data").is_symlink()
        assert (volume_root / "a").read_text() == "x"


class TestTheProxyReadsItsVolume:
    """The sidecar as injected, started as uid 65532 on the files kubelet would write."""

    @pytest.mark.parametrize(
        "pod_kwargs",
        [
            pytest.param({"agent_uid": 1000}, id="agent-runs-as-another-uid"),
            pytest.param({"agent_uid": None}, id="agent-uid-from-its-image"),
            pytest.param({"agent_uid": 0}, id="agent-runs-as-root"),
            pytest.param({"agent_uid": None, "pod_uid": 1000}, id="pod-level-run-as-user"),
            pytest.param({"agent_uid": 65532}, id="agent-shares-the-proxy-uid"),
            pytest.param({"agent_uid": 1000, "fs_group": 2000}, id="pod-has-an-fs-group"),
        ],
    )
    def test_starts_whatever_uids_the_agent_uses(self, volume_root: Path, pod_kwargs: dict[str, Any]) -> None:
        pod = inj.inject_pod(
            agent_pod(**pod_kwargs), inj.InjectionTarget.for_connection("orders-prod"), SETTINGS
        )
        out = mount_and_load(volume_root, pod["spec"], supplementary=proxy_groups(pod["spec"]))
        assert out == {
            "user": "pgw_orders_prod_v3",
            "password": "s3cret-v3",
            "token": TOKEN,
            "connection": "orders-prod",
        }

    def test_the_injection_adds_no_fs_group(self) -> None:
        """A pod fsGroup would re-own the agent's own volumes: injection must not set one."""
        pod = inj.inject_pod(agent_pod(), inj.InjectionTarget.for_connection("orders-prod"), SETTINGS)
        assert "fsGroup" not in (pod["spec"].get("securityContext") or {})

    def test_the_old_0440_volume_locked_the_proxy_out(self, volume_root: Path) -> None:
        """The check is not vacuous: with 0440 and root-owned files the proxy cannot start."""
        pod = inj.inject_pod(
            agent_pod(agent_uid=1000), inj.InjectionTarget.for_connection("orders-prod"), SETTINGS
        )
        (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == inj.CONFIG_VOLUME]
        vol["projected"]["defaultMode"] = 0o440
        out = mount_and_load(volume_root, pod["spec"])
        assert "Permission denied" in out["error"]

    def test_only_the_proxy_mounts_the_readable_volume(self) -> None:
        """0444 is safe because no agent container (init, regular) mounts the volume at all."""
        p = agent_pod()
        p["spec"]["initContainers"] = [{"name": "migrate", "image": "m"}]
        pod = inj.inject_pod(p, inj.InjectionTarget.for_connection("orders-prod"), SETTINGS)
        for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
            mounted = {m["name"] for m in c.get("volumeMounts") or []}
            assert (inj.CONFIG_VOLUME in mounted) == (c["name"] == inj.PROXY_CONTAINER), c["name"]
