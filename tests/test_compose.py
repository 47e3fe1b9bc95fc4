"""docker/compose.yaml as a real implementation of compose reads it (Debian's docker-compose validates and
resolves `config` without an engine), held to the Procfile: one service per process, running it through
`bin/procfile run`, and nothing else but PostgreSQL and Redis."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.debian import debian_program
from tests.procfile import procfile

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
DATA_STORES = {"postgres", "redis"}
# Runs once (the migrations); the other platform services wait for it.
RELEASE = "release"
SECRETS = {
    "SECRET_KEY": "compose-test-secret-key-" + "x" * 40,
    "POSTGRES_PASSWORD": "compose-test-database-password",
    "FLOWER_BASIC_AUTH": "admin:compose-test-flower-password",
}


def docker_compose() -> str:
    """Debian's docker-compose, installed with apt-get when it is missing (it validates without an engine)."""
    return debian_program("docker-compose", "docker-compose")


def compose_config(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """`docker-compose config` of docker/compose.yaml with these variables and no others of the platform's
    (an empty env file stands in for a developer's docker/.env)."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {name: value for name, value in os.environ.items() if name not in {*SECRETS, "ALLOWED_HOSTS"}}
    return subprocess.run(
        [docker_compose(), "--env-file", str(env_file), "--file", str(COMPOSE_FILE), "config"],
        cwd=ROOT, env={**env, **variables}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    return compose_config(tmp_path_factory.mktemp("compose"), **SECRETS)


@pytest.fixture(scope="module")
def services(resolved: subprocess.CompletedProcess) -> dict[str, dict]:
    assert resolved.returncode == 0, resolved.stderr
    return yaml.safe_load(resolved.stdout)["services"]


def platform_services(services: dict[str, dict]) -> dict[str, dict]:
    return {name: service for name, service in services.items() if name not in DATA_STORES}


def test_docker_compose_validates_the_compose_file(resolved):
    assert resolved.returncode == 0, resolved.stderr
    assert set(yaml.safe_load(resolved.stdout)["services"]) >= DATA_STORES


def test_every_procfile_process_runs_in_a_service_of_its_own_and_no_service_runs_anything_else(services):
    run = {name: service.get("command") for name, service in platform_services(services).items()}

    assert run == {name: ["bin/procfile", "run", name] for name in procfile()}
    for store in DATA_STORES:
        assert "bin/procfile" not in str(services[store].get("command", "")), store


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret_and_names_it(tmp_path, secret):
    done = compose_config(tmp_path, **{name: value for name, value in SECRETS.items() if name != secret})

    assert done.returncode != 0
    assert secret in done.stderr


def test_no_secret_is_written_in_the_compose_file():
    text = COMPOSE_FILE.read_text()

    for secret in SECRETS:
        assert re.search(rf"\$\{{{secret}:\?", text), f"{secret} must come from the environment, required"


def test_every_long_running_service_is_restarted_and_the_release_runs_once(services):
    policies = {name: service.get("restart") for name, service in services.items()}

    assert policies.pop(RELEASE) == "no"
    assert set(policies.values()) == {"unless-stopped"}, policies


def test_the_data_stores_are_health_checked_and_the_platform_starts_once_they_are_healthy(services):
    assert services["postgres"]["healthcheck"]["test"][-1].startswith("pg_isready")
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    for name, service in platform_services(services).items():
        conditions = {store: service["depends_on"][store]["condition"] for store in DATA_STORES}
        assert conditions == {"postgres": "service_healthy", "redis": "service_healthy"}, name


def test_every_process_but_the_release_starts_once_the_release_has_succeeded(services):
    for name, service in platform_services(services).items():
        if name != RELEASE:
            assert service["depends_on"][RELEASE]["condition"] == "service_completed_successfully", name


def test_each_worker_health_check_pings_the_worker_by_the_name_the_procfile_gives_it(services):
    workers = {name: command for name, command in procfile().items() if re.search(r"\bcelery .*\bworker\b", command)}

    assert workers
    for name, command in workers.items():
        node = re.search(r"-n (\S+)@%h", command).group(1)
        service = services[name]
        assert service["environment"]["WORKER_NAME"] == node, name
        assert "inspect ping --destination" in service["healthcheck"]["test"][-1], name


def test_the_servers_are_health_checked(services):
    for name in ("web", "events", "flower"):
        assert "docker/http_answers.py" in services[name]["healthcheck"]["test"], name


def test_postgresql_keeps_its_data_in_a_named_volume(resolved, services):
    volumes = yaml.safe_load(resolved.stdout)["volumes"]

    (mount,) = [volume for volume in services["postgres"]["volumes"] if ":/var/lib/postgresql/data" in volume]
    assert mount.split(":", 1)[0] in volumes


def test_every_process_counts_its_metrics_into_one_volume_shared_by_all(resolved, services):
    volumes = yaml.safe_load(resolved.stdout)["volumes"]

    for name, service in platform_services(services).items():
        directory = service["environment"]["PROMETHEUS_MULTIPROC_DIR"]
        assert f"metrics:{directory}:rw" in service["volumes"], name
    assert volumes["metrics"]["driver_opts"]["type"] == "tmpfs"


def test_published_ports_listen_on_the_hosts_loopback_only(services):
    published = [port for service in services.values() for port in service.get("ports", [])]

    assert published
    assert all(str(port).startswith("127.0.0.1:") for port in published), published
