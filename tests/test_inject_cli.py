"""`pgwarden inject` on Deployment, Job, CronJob and Pod manifests (multi-document)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pgwarden.cli import main
from pgwarden.operator import injection as inj

MANIFEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: cursor-agent, namespace: agents}
spec:
  template:
    metadata: {labels: {app: cursor-agent}}
    spec:
      serviceAccountName: cursor-agent
      containers: [{name: agent, image: "agent:1"}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: migrate-check, namespace: agents}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: ci, image: "ci:1"}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: agents}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: "report:1"}]
---
apiVersion: v1
kind: Service
metadata: {name: untouched}
spec: {ports: [{port: 80}]}
"""


def run(tmp_path: Path, manifest: str, *args: str) -> list[dict]:
    f = tmp_path / "m.yaml"
    f.write_text(manifest)
    out = subprocess.run([sys.executable, "-m", "pgwarden.cli", "inject", "-f", str(f), *args],
                         capture_output=True, text=True, check=True)
    return list(yaml.safe_load_all(out.stdout))


def templates(docs: list[dict]) -> dict[str, dict]:
    return {
        "Deployment": docs[0]["spec"]["template"],
        "Job": docs[1]["spec"]["template"],
        "CronJob": docs[2]["spec"]["jobTemplate"]["spec"]["template"],
    }


def test_deployment_job_cronjob(tmp_path: Path) -> None:
    docs = run(tmp_path, MANIFEST, "--connection", "orders-prod", "--image", "registry.example/proxy:9")
    assert len(docs) == 4
    for kind, tpl in templates(docs).items():
        ann = tpl["metadata"]["annotations"]
        assert ann[inj.ANNOTATION_INJECT] == "orders-prod" and ann[inj.ANNOTATION_INJECTED] == "orders-prod", kind
        sidecar = tpl["spec"]["initContainers"][0]
        assert sidecar["name"] == inj.PROXY_CONTAINER and sidecar["restartPolicy"] == "Always", kind
        assert sidecar["image"] == "registry.example/proxy:9"
        agent = tpl["spec"]["containers"][0]
        assert {"name": "PGHOST", "value": "127.0.0.1"} in agent["env"]
        assert not any(m["name"] == inj.CONFIG_VOLUME for m in agent.get("volumeMounts", []))
    assert docs[0]["metadata"]["annotations"][inj.ANNOTATION_INJECT] == "orders-prod"
    assert docs[3] == {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "untouched"},
                       "spec": {"ports": [{"port": 80}]}}


def test_same_as_the_webhook(tmp_path: Path) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "agents"},
           "spec": {"containers": [{"name": "agent", "image": "a"}]}}
    (out,) = run(tmp_path, yaml.safe_dump(pod), "--connection", "orders-prod")
    annotated = {**pod, "metadata": {**pod["metadata"], "annotations": {inj.ANNOTATION_INJECT: "orders-prod"}}}
    from pgwarden.operator.settings import OperatorSettings

    assert out == inj.inject_pod(annotated, inj.InjectionTarget.for_connection("orders-prod"),
                                 OperatorSettings.from_env().injection)


def test_idempotent(tmp_path: Path) -> None:
    once = run(tmp_path, MANIFEST, "--connection", "orders-prod")
    twice = run(tmp_path, yaml.safe_dump_all(once), "--connection", "orders-prod")
    assert once == twice


def test_secret_name_from_a_connection_in_the_input(tmp_path: Path) -> None:
    conn = ("apiVersion: pgwarden.dev/v1alpha1\nkind: DatabaseConnection\nmetadata: {name: orders-prod}\n"
            "spec: {host: db, credentials: {secretName: custom-creds}}\n---\n")
    docs = run(tmp_path, conn + MANIFEST, "--connection", "orders-prod")
    vol = next(v for v in docs[1]["spec"]["template"]["spec"]["volumes"] if v["name"] == inj.CONFIG_VOLUME)
    assert any(s.get("secret", {}).get("name") == "custom-creds" for s in vol["projected"]["sources"])


def test_refusal_is_a_user_error(tmp_path: Path, capsys) -> None:
    bad = ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: a\n    image: a\n"
           "    envFrom: [{secretRef: {name: orders-prod-pgwarden-credentials}}]\n")
    f = tmp_path / "bad.yaml"
    f.write_text(bad)
    assert main(["inject", "--connection", "orders-prod", "-f", str(f)]) == 2
    assert "envFrom" in capsys.readouterr().err
