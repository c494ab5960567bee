"""A real PostgreSQL server for the test session: initdb + pg_ctl into a temp dir, on a free port.

Use the `postgres_url` fixture (a fresh database per call of `postgres_db_url`); it skips with the reason
when the PostgreSQL binaries are not installed. initdb refuses to run as root, so under root the server
runs as the unprivileged `nobody` user (via runuser) in a directory it owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    if shutil.which("pg_ctl") and shutil.which("initdb"):
        return Path(shutil.which("pg_ctl")).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """(host, port, user) of a PostgreSQL server that lives for the whole test session."""
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: install postgresql to run these tests")
    root = tmp_path_factory.mktemp("pg")
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user: list[str] = []
    user = os.environ.get("USER") or "postgres"
    if os.geteuid() == 0:
        user = "nobody"
        os.chmod(root, 0o755)
        for p in (root.parent, root.parent.parent):  # nobody must be able to reach the dir
            os.chmod(p, os.stat(p).st_mode | 0o011)
        shutil.chown(root, user)
        shutil.chown(sock, user)
        as_user = ["runuser", "-u", user, "--"]
    port = _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8", "--no-sync")
    log = root / "server.log"
    if as_user:
        log.touch()
        shutil.chown(log, user)
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield "127.0.0.1", port, user
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)


@pytest.fixture
def postgres_url(postgres_server):
    """A URL to a new, empty database on the session's server."""
    import psycopg

    host, port, user = postgres_server
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=host, port=port, user=user, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{user}@{host}:{port}/{name}"
