"""The install docs a platform engineer follows: every link resolves, every command names files
and flags that exist, and the README points at them without losing its two opening commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ["install.md", "security.md", "operating.md", "troubleshooting.md", "crd-reference.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", md.read_text(), re.M)}


@pytest.mark.parametrize("name", OURS + ["../README.md"])
def test_relative_links_resolve(name: str) -> None:
    doc = (ROOT / "docs" / name).resolve()
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        assert dest.exists(), f"{name}: link to {target} — {dest} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{name}: no heading #{anchor} in {dest.name}"


@pytest.mark.parametrize("name", OURS[:4])
def test_repository_paths_named_in_docs_exist(name: str) -> None:
    text = (ROOT / "docs" / name).read_text()
    for path in set(re.findall(r"\b((?:examples|crds|charts|docs|e2e|requirements)/[\w./-]+\.(?:ya?ml|md|sh|py|lock))", text)):
        assert (ROOT / path).exists(), f"{name} names {path}, which does not exist"


def test_chart_values_named_in_install_guide_exist() -> None:
    import yaml

    values = yaml.safe_load((ROOT / "charts" / "pgwarden" / "values.yaml").read_text())
    text = (ROOT / "docs" / "install.md").read_text()
    for key in set(re.findall(r"--set(?:-json)? '?([a-zA-Z.]+)=", text)) | set(re.findall(r"^\| `([a-z][\w.]+)`", text, re.M)):
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"install.md names value {key}, not in values.yaml"
            node = node[part]


def test_readme_keeps_its_two_commands_first_and_links_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert first_block and readme.index("```sh") < readme.index("\n## "), "the two commands come first"
    commands = [ln for ln in first_block.group(1).splitlines() if ln.strip()]
    assert len(commands) == 2 and "pgwarden demo" in commands[0] and "pytest" in commands[1]
    docs_section = readme.split("## Documentation", 1)
    assert len(docs_section) == 2, "README needs a Documentation section"
    for name in OURS:
        assert f"docs/{name}" in docs_section[1], f"README's Documentation section does not link docs/{name}"


def test_examples_applied_together_govern_one_connection() -> None:
    """install.md applies database-connection, access-policy and masking-rule together and annotates
    the agent with orders-prod: every policy and rule must name that connection."""
    import yaml

    connections, refs = set(), {}
    for name in ("database-connection.yaml", "access-policy.yaml", "masking-rule.yaml"):
        for doc in yaml.safe_load_all((ROOT / "examples" / name).read_text()):
            if not doc:
                continue
            if doc["kind"] == "DatabaseConnection":
                connections.add(doc["metadata"]["name"])
            elif "connectionRef" in (doc.get("spec") or {}):
                refs[f"{name}: {doc['kind']} {doc['metadata']['name']}"] = doc["spec"]["connectionRef"]["name"]
    assert connections == {"orders-prod"}
    assert {k: v for k, v in refs.items() if v not in connections} == {}


def test_standalone_example_runs_with_the_policy_and_masking_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/standalone.yaml says to add access-policy.yaml and masking-rule.yaml: the proxy's
    own entry point accepts the three together, and the policy and the masks govern its connection."""
    proxy_main = pytest.importorskip("pgwarden.proxy.main")
    from pgwarden.resources import load_documents

    for name in ("PGWARDEN_UPSTREAM_PASSWORD", "PGWARDEN_AGENT_PASSWORD", "PGWARDEN_MASKING_HASH_KEY"):
        monkeypatch.setenv(name, "example-secret-value")
    docs = load_documents([ROOT / "examples" / n for n in ("standalone.yaml", "access-policy.yaml", "masking-rule.yaml")])
    server = proxy_main.build_server(docs)
    assert server.config.connection.name == "orders-prod"
    refs = {d.spec["connectionRef"]["name"] for d in docs if d.kind in ("AccessPolicy", "MaskingRule", "ProxyConfig")}
    assert refs == {"orders-prod"}
