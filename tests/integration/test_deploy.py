"""Deployment files: they parse, and the container's entrypoint and config path work (run
outside Docker, which these machines cannot run). The metrics the dashboard and these files
name: tests/unit/test_grafana_dashboard.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pypooler.config import load_settings
from pypooler.embedded import EmbeddedPostgres, random_free_port
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
IMAGE_CONFIG = ROOT / "docker" / "pypooler.toml"
KUBERNETES = sorted((ROOT / "config" / "kubernetes").glob("*.yaml"))


free_port = random_free_port  # below the ephemeral range


def kubernetes_documents() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in KUBERNETES:
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return documents


# -- the files -------------------------------------------------------------------------------


def test_kubernetes_files_parse_and_probe_the_metrics_port() -> None:
    assert {path.name for path in KUBERNETES} >= {"sidecar.yaml", "deployment.yaml"}
    documents = kubernetes_documents()
    kinds = [doc["kind"] for doc in documents]
    assert kinds.count("Deployment") == 2 and "Service" in kinds
    for deployment in (doc for doc in documents if doc["kind"] == "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        poolers = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "pypooler"]
        assert len(poolers) == 1, deployment["metadata"]["name"]
        pooler = poolers[0]
        assert pooler["livenessProbe"]["httpGet"]["path"] == "/healthz"
        # The sidecar's readiness is its pod's: never "full" (README, "Readiness").
        ready = {"app": "/readyz", "pypooler": "/readyz?room"}[deployment["metadata"]["name"]]
        assert pooler["readinessProbe"]["httpGet"]["path"] == ready
        metrics_port = {p["name"]: p["containerPort"] for p in pooler["ports"]}["metrics"]
        assert metrics_port == 9127
        assert pooler["lifecycle"]["preStop"]["exec"]["command"][:2] == ["docker-entrypoint.sh", "drain"]
        assert spec["terminationGracePeriodSeconds"] > 30


def test_kubernetes_configmaps_are_valid_pypooler_configs(tmp_path: Path) -> None:
    configs = [doc["data"]["pypooler.toml"] for doc in kubernetes_documents() if doc["kind"] == "ConfigMap"]
    assert len(configs) == 2
    for index, text in enumerate(configs):
        path = tmp_path / f"config{index}.toml"
        path.write_text(text)
        settings = load_settings(path, env={})
        assert settings.metrics_port == 9127 and settings.metrics_addr == "0.0.0.0"
        assert "app" in settings.databases


def test_dockerfile_runs_pypooler_as_non_root_with_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", dockerfile, re.MULTILINE)
    assert re.search(r"^USER (?!root|0\b)\S+", dockerfile, re.MULTILINE)
    assert re.search(r"^EXPOSE 6432 9127$", dockerfile, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile and '"healthcheck"' in dockerfile
    assert "ENV PYPOOLER_CONFIG=/etc/pypooler/pypooler.toml" in dockerfile
    assert "COPY docker/pypooler.toml /etc/pypooler/pypooler.toml" in dockerfile
    image_settings = load_settings(IMAGE_CONFIG, env={})
    assert image_settings.listen_addr == "0.0.0.0" and image_settings.metrics_addr == "0.0.0.0"


# -- the entrypoint, outside Docker ------------------------------------------------------------


def entrypoint_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The image's environment, with loopback addresses and free ports instead of 0.0.0.0."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYPOOLER_", "PG"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYPOOLER_PYTHON=sys.executable,
        PYPOOLER_CONFIG=str(IMAGE_CONFIG),
        PYPOOLER_PIDFILE=str(tmp_path / "pypooler.pid"),
        PYPOOLER_LISTEN_ADDR="127.0.0.1",
        PYPOOLER_METRICS_ADDR="127.0.0.1",
        PYPOOLER_LOG_CONNECTIONS="false",
    )
    env.update(extra)
    return env


def entrypoint(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_entrypoint_runs_the_image_config_with_databases_from_the_environment(
    tmp_path: Path, postgres: EmbeddedPostgres, processes: list[subprocess.Popen[str]]
) -> None:
    port, metrics_port = free_port(), free_port()
    env = entrypoint_env(
        tmp_path,
        PYPOOLER_LISTEN_PORT=str(port),
        PYPOOLER_METRICS_PORT=str(metrics_port),
        PYPOOLER_DATABASES__PYPOOLER_TEST__HOST=postgres.host,
        PYPOOLER_DATABASES__PYPOOLER_TEST__PORT=str(postgres.port),
    )
    proc = subprocess.Popen(
        [str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    processes.append(proc)
    pidfile = tmp_path / "pypooler.pid"
    wait_until(lambda: entrypoint("healthcheck", env=env).returncode == 0)
    # exec kept the shell's PID: the pid file names the pooler itself, signals reach it.
    assert int(pidfile.read_text()) == proc.pid
    assert entrypoint("healthcheck", "/readyz", env=env).returncode == 0
    result = subprocess.run(
        ["psql", "-X", "-A", "-t", "-c", "SELECT 6 * 7",
         f"postgresql://postgres@127.0.0.1:{port}/pypooler_test"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.stdout.strip() == "42", result.stderr
    # The preStop hook: SIGTERM through the pid file, then it waits until pypooler is gone
    # (we reap it meanwhile, as a container runtime would).
    drain = subprocess.Popen([str(ENTRYPOINT), "drain"], env=env, stderr=subprocess.PIPE, text=True)
    assert proc.wait(20) == 0
    _, drain_stderr = drain.communicate(timeout=10)
    assert drain.returncode == 0, drain_stderr


def test_entrypoint_refuses_to_start_without_databases(tmp_path: Path) -> None:
    result = entrypoint("run", env=entrypoint_env(tmp_path))
    assert result.returncode == 2
    assert "no databases configured" in result.stderr
    assert "PYPOOLER_DATABASES__<NAME>__HOST" in result.stderr


def test_entrypoint_reports_config_errors_before_listening(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("listen_port = -1\n")
    result = entrypoint("run", "--config", str(config), env=entrypoint_env(tmp_path))
    assert result.returncode == 2
    assert "listen_port" in result.stderr


def test_entrypoint_passes_other_commands_through(tmp_path: Path) -> None:
    env = entrypoint_env(tmp_path, PYPOOLER_DATABASES__APP__HOST="127.0.0.1")
    assert entrypoint("check-config", env=env).stdout.strip() == "config ok: 1 database entries"
    assert entrypoint("echo", "hello", env=env).stdout.strip() == "hello"
    # Nothing listens there: the healthcheck fails instead of hanging.
    assert entrypoint("healthcheck", env={**env, "PYPOOLER_METRICS_PORT": str(free_port())}).returncode != 0


def test_userlist_example_secrets_match_the_passwords_it_names() -> None:
    """The example's comments name each password; its secrets must really be theirs."""
    import base64
    import hashlib

    import scramp

    def fields(pattern: str, text: str) -> tuple[str, ...]:
        match = re.fullmatch(pattern, text)
        assert match, text
        return match.groups()

    lines = (ROOT / "config" / "userlist.txt").read_text().splitlines()
    pairs = (fields(r'"([^"]+)" "([^"]+)"', line) for line in lines if line and line[0] not in "#;")
    entries = {user: secret for user, secret in pairs}
    assert set(entries) == {"app", "reporting", "batch"}
    assert entries["reporting"] == "md5" + hashlib.md5(b"example-md5-passwordreporting").hexdigest()
    assert entries["batch"] == "example-cleartext-password"
    iterations, salt, keys = fields(r"SCRAM-SHA-256\$(\d+):([^$]+)\$(.+)", entries["app"])
    stored_key, server_key = (base64.b64decode(key) for key in keys.split(":"))
    _, expected_stored, expected_server, _ = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        "example-scram-password", iteration_count=int(iterations), salt=base64.b64decode(salt)
    )
    assert (stored_key, server_key) == (expected_stored, expected_server)
