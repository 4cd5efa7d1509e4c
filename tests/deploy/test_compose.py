"""The container deployment (Dockerfile, docker-compose.yml, deploy/), checked without a
Docker engine: files parse, what compose references exists, ports and settings agree
across RabbitMQ, QueueMaster, Prometheus and Grafana, and the pieces that can run here
do: RabbitMQ 3.10 (Debian's package) accepts deploy/rabbitmq/*, qm-server and qm-worker
start from deploy/qm/config.yaml with the compose environment, write JSON logs, and answer
the image's HEALTHCHECK command. `docker compose config` runs when the CLI has the compose
plugin. Paths under deploy/prometheus and deploy/grafana are checked too.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import pathlib
import re
import shlex
import subprocess
import urllib.parse
import urllib.request

import pytest
import yaml

from qm.config import load_config, parse_host_port
from tests.processes import BIN_DIR, unique
from tests.requirements import missing, require_rabbitmq

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
QM_CONFIG = ROOT / "deploy" / "qm" / "config.yaml"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
ENABLED_PLUGINS = ROOT / "deploy" / "rabbitmq" / "enabled_plugins"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
COMPOSE_ENV = ROOT / "deploy" / "compose-env"
ENV_EXAMPLE = ROOT / "deploy" / "compose.env.example"

SERVICES = ("rabbitmq", "qm-server", "qm-worker", "prometheus", "grafana")
#: Where the image's config lives (Dockerfile ENV QM_CONFIG; compose mounts over it).
CONTAINER_CONFIG = "/etc/qm/config.yaml"


# ------------------------------------------------------------------ helpers ---

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service(name: str) -> dict:
    return compose()["services"][name]


def example_env() -> dict[str, str]:
    """deploy/compose.env.example as KEY=VALUE pairs (# comments skipped)."""
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {key: value for key, value in pairs}


_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::(?P<op>[?-])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error} against `env`."""
    def one(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        assert op == "-", f"${{{name}}} is not set (compose says: {arg})"
        return arg
    return _VARIABLE.sub(one, value)


def environment(spec: dict) -> dict[str, str]:
    """A service's environment as a dict (compose allows a mapping or KEY=VALUE items),
    interpolated with deploy/compose.env.example as compose would with that env file."""
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else interpolate(str(value), example_env()) for key, value in env.items()}


def qm_env(name: str) -> dict[str, str]:
    """The QM_* variables compose gives a service, QM_CONFIG pointed at the repo's file."""
    env = {k: v for k, v in environment(service(name)).items() if k.startswith("QM_")}
    assert env.get("QM_CONFIG") == CONTAINER_CONFIG, f"{name}: QM_CONFIG must be {CONTAINER_CONFIG}"
    env["QM_CONFIG"] = str(QM_CONFIG)
    return env


def environment_raw(name: str) -> dict[str, str]:
    """A service's environment as written in docker-compose.yml (not interpolated)."""
    return {key: str(value) for key, value in (service(name).get("environment") or {}).items()}


def deploy_config(name: str):
    """deploy/qm/config.yaml as service `name` sees it (file + its compose environment)."""
    return load_config(None, env=qm_env(name))


def rabbitmq_conf() -> dict[str, str]:
    """key = value lines of a RabbitMQ (cuttlefish) config; ## comments skipped."""
    entries = {}
    for line in RABBITMQ_CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, sep, value = line.partition("=")
            assert sep, f"rabbitmq.conf: not a key = value line: {line!r}"
            assert key.strip() not in entries, f"rabbitmq.conf sets {key.strip()} twice"
            entries[key.strip()] = value.strip()
    return entries


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1]
            continue
        logical.append(current + line)
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    result = []
    for line in logical:
        word, _, rest = line.strip().partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def healthcheck_command() -> str:
    """The shell command of the Dockerfile's HEALTHCHECK (CMD in shell form)."""
    [args] = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    match = re.search(r"(?:^|\s)CMD\s+(.*)$", args)
    assert match, f"HEALTHCHECK without CMD: {args}"
    command = match.group(1)
    assert not command.startswith("["), "keep the HEALTHCHECK in shell form (its python -c needs quoting)"
    return command


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, posix) out of the build context. Docker's
    rule: the last pattern matching the path or one of its parents decides."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        variants = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            excluded = not negated
    return excluded


def bind_mounts(spec: dict) -> list[tuple[str, str]]:
    """(host path, container path) of a service's bind mounts (short and long syntax)."""
    mounts = []
    for volume in spec.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, _, rest = volume.partition(":")
        if source.startswith((".", "/", "~")):
            mounts.append((source, rest.split(":")[0]))
    return mounts


def named_volumes(spec: dict) -> list[str]:
    names = []
    for volume in spec.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") == "volume":
                names.append(volume["source"])
        elif ":" in volume and not volume.startswith((".", "/", "~")):
            names.append(volume.split(":")[0])
    return names


def published(spec: dict) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of a service's published ports."""
    result = []
    for port in spec.get("ports") or []:
        if isinstance(port, dict):
            assert "published" in port, f"publish a fixed host port, got {port}"
            result.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
            continue
        text = str(port).split("/")[0]
        pieces = text.rsplit(":", 2)
        assert len(pieces) >= 2, f"publish a fixed host port (HOST:CONTAINER), got {port!r}"
        host_ip = pieces[0] if len(pieces) == 3 else ""
        result.append((host_ip, int(pieces[-2]), int(pieces[-1])))
    return result


def container_path(service_name: str, host_path: pathlib.Path) -> str:
    """Where `host_path` is bind-mounted in the service's container."""
    for source, target in bind_mounts(service(service_name)):
        if (ROOT / source).resolve() == host_path.resolve():
            return target
    raise AssertionError(f"{service_name} does not mount {host_path.relative_to(ROOT)}")


def prometheus_config_file() -> pathlib.Path:
    """The host file behind prometheus's --config.file."""
    spec = service("prometheus")
    command = spec.get("command") or []
    command = shlex.split(command) if isinstance(command, str) else command
    flags = [arg.split("=", 1)[1] for arg in command if arg.startswith("--config.file=")]
    inside = flags[0] if flags else "/etc/prometheus/prometheus.yml"
    for source, target in bind_mounts(spec):
        target = target.rstrip("/")
        if inside == target:
            return ROOT / source
        if inside.startswith(target + "/"):
            return ROOT / source / inside[len(target) + 1:]
    raise AssertionError(f"prometheus reads {inside}, which no bind mount provides")


def scrape_targets(config: dict) -> dict[str, set[int]]:
    """host → ports of every static target and DNS-SD name in a prometheus.yml."""
    targets: dict[str, set[int]] = {}
    for job in config.get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                host, port = parse_host_port(target)
                targets.setdefault(host, set()).add(port)
        for dns in job.get("dns_sd_configs") or []:
            for name in dns.get("names") or []:
                host = name.removeprefix("tasks.")
                if dns.get("port") is not None:
                    targets.setdefault(host, set()).add(int(dns["port"]))
                else:  # SRV records carry the port; only the name can be checked
                    targets.setdefault(host, set())
    return targets


def rabbitmq_credentials() -> tuple[str, str]:
    """The account compose has RabbitMQ create (its password from the example env file)."""
    env = environment(service("rabbitmq"))
    return env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"]


# ---------------------------------------------------------------- compose ---

def test_compose_parses_and_has_every_service():
    data = compose()
    assert set(SERVICES) <= set(data["services"]), sorted(data["services"])
    assert re.fullmatch(r"rabbitmq:3\.10\.\d+-management", service("rabbitmq")["image"])
    assert service("prometheus")["image"].startswith("prom/prometheus:")
    assert service("grafana")["image"].startswith("grafana/grafana:")
    assert service("qm-worker")["image"] == service("qm-server")["image"], "one image for server and worker"


def test_every_pulled_image_is_pinned_to_a_version():
    for name, spec in compose()["services"].items():
        if "build" in spec:
            continue
        repository, _, tag = spec["image"].rpartition(":")
        # PostgreSQL numbers its releases major.minor (15.10: the tenth of 15), not x.y.z.
        release = r"\d+\.\d+" if repository == "postgres" else r"v?\d+\.\d+\.\d+(-[\w.]+)?"
        assert repository and re.fullmatch(release, tag), \
            f"{name}: pin {spec['image']} to a release (x.y.z), not a moving tag"


def test_published_ports_are_bound_to_loopback_only():
    for name, spec in compose()["services"].items():
        for host_ip, host_port, _ in published(spec):
            assert host_ip == "127.0.0.1", f"{name} publishes {host_port} on {host_ip or 'every interface'}"


def test_credentials_come_only_from_the_uncommitted_env_file():
    text = COMPOSE.read_text() + QM_CONFIG.read_text() + RABBITMQ_CONF.read_text()
    assert "queuemaster:queuemaster" not in text and "default_pass" not in text
    assert "${QM_RABBITMQ_PASSWORD:?" in environment_raw("rabbitmq")["RABBITMQ_DEFAULT_PASS"]
    assert "${GRAFANA_ADMIN_PASSWORD:?" in environment_raw("grafana")["GF_SECURITY_ADMIN_PASSWORD"]
    for name in ("qm-server", "qm-worker"):
        assert "${QM_RABBITMQ_PASSWORD:?" in environment_raw(name)["QM_BROKER__URL"]
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, ".env must be in .gitignore"
    assert dockerignored(".env"), ".env must stay out of the image's build context"


def test_env_example_is_what_the_generator_prints_and_the_generator_makes_secrets(tmp_path):
    example = subprocess.run([str(COMPOSE_ENV), "--example"], capture_output=True, text=True, timeout=30)
    assert example.returncode == 0, example.stderr
    assert example.stdout == ENV_EXAMPLE.read_text(), "regenerate: deploy/compose-env --example > " \
                                                      "deploy/compose.env.example"
    written = []
    for attempt in range(2):
        target = tmp_path / f"env-{attempt}"
        made = subprocess.run([str(COMPOSE_ENV), "--output", str(target)], capture_output=True, text=True,
                              timeout=30)
        assert made.returncode == 0, made.stderr
        assert target.stat().st_mode & 0o777 == 0o600
        values = dict(line.split("=", 1) for line in target.read_text().splitlines()
                      if line and not line.startswith("#"))
        assert values.keys() == example_env().keys()
        written.append(values)
    for key in ("QM_RABBITMQ_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert written[0][key] != written[1][key] and len(written[0][key]) >= 32
        assert re.fullmatch(r"[A-Za-z0-9_-]+", written[0][key]), "must fit in an AMQP URL unquoted"
    kept = subprocess.run([str(COMPOSE_ENV), "--output", str(tmp_path / "env-0")], capture_output=True,
                          text=True, timeout=30)
    assert kept.returncode == 1 and "exists" in kept.stderr, "an existing .env is never overwritten silently"


def test_grafana_has_no_anonymous_access_and_no_sign_up():
    env = environment(service("grafana"))
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "false"
    assert env.get("GF_USERS_ALLOW_SIGN_UP") == "false"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] != "admin"


def test_workers_have_cpu_memory_and_process_limits_and_as_many_children_as_cpus():
    worker = service("qm-worker")
    env = example_env()
    assert float(interpolate(str(worker["cpus"]), env)) > 0
    assert re.fullmatch(r"\d+[kmg]", interpolate(str(worker["mem_limit"]), env))
    assert int(worker["pids_limit"]) > 0
    assert deploy_config("qm-worker").worker.procs == int(float(interpolate(str(worker["cpus"]), env)))


def test_rabbitmq_account_is_not_an_administrator_and_only_has_rights_on_qm_names():
    conf = rabbitmq_conf()
    assert conf.get("default_user_tags.administrator") == "false"
    for right in ("configure", "read", "write"):
        assert conf[f"default_permissions.{right}"] == "^qm\\.", right


def test_depends_on_names_existing_services_and_waits_for_a_healthy_rabbitmq():
    services = compose()["services"]
    for name, spec in services.items():
        depends = spec.get("depends_on") or []
        for other in depends:
            assert other in services, f"{name} depends on unknown service {other!r}"
            assert other != name
    for name in ("qm-server", "qm-worker"):
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
    check = services["rabbitmq"]["healthcheck"]["test"]
    check = " ".join(check[1:]) if isinstance(check, list) else check
    assert "rabbitmq-diagnostics -q ping" in check


def test_build_contexts_and_dockerfiles_exist():
    builds = 0
    for name, spec in compose()["services"].items():
        build = spec.get("build")
        if build is None:
            continue
        builds += 1
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (ROOT / context).is_dir(), f"{name}: build context {context} missing"
        assert (ROOT / context / dockerfile).is_file(), f"{name}: {context}/{dockerfile} missing"
    assert builds >= 2, "qm-server and qm-worker are built from the repository"


def test_every_mounted_host_path_exists_and_named_volumes_are_declared():
    data = compose()
    declared = set(data.get("volumes") or {})
    missing = []
    for name, spec in data["services"].items():
        for source, target in bind_mounts(spec):
            if not (ROOT / source).exists():
                missing.append(f"{name}: {source} (→ {target})")
        for volume in named_volumes(spec):
            assert volume in declared, f"{name} uses volume {volume!r}, not declared under volumes:"
    assert not missing, "mounted host paths missing from the repository:\n" + "\n".join(missing)
    assert "rabbitmq-data" in named_volumes(service("rabbitmq"))
    data_dir = deploy_config("qm-server").server.data_dir
    server_volumes = [v.split(":") for v in service("qm-server")["volumes"] if isinstance(v, str)]
    assert any(target == data_dir and source in declared for source, target, *_ in server_volumes), \
        f"the server's data_dir {data_dir} must be a named volume"


def test_published_host_ports_do_not_collide():
    seen: dict[int, str] = {}  # host port → service (whatever the host IP: keep it simple)
    for name, spec in compose()["services"].items():
        for _, host_port, _ in published(spec):
            assert host_port not in seen, f"host port {host_port} published by {seen[host_port]} and {name}"
            seen[host_port] = name
    assert 50051 in [p for _, p, _ in published(service("qm-server"))]
    assert 3000 in [p for _, p, _ in published(service("grafana"))]


def test_qm_worker_is_scalable():
    worker = service("qm-worker")
    assert "container_name" not in worker, "a fixed container_name stops --scale qm-worker=N"
    assert not worker.get("ports"), "host port mappings collide between qm-worker replicas"
    assert "hostname" not in worker, "replicas must not share a hostname"


def test_ports_agree_with_the_qm_config():
    server, worker = deploy_config("qm-server"), deploy_config("qm-worker")
    host, port = parse_host_port(server.server.listen)
    assert host == "0.0.0.0", "the server must listen beyond the container's loopback"
    assert port in [target for _, _, target in published(service("qm-server"))]
    assert server.server.metrics_port == 9464
    assert worker.worker.metrics_port == 9465
    status_host, status_port = parse_host_port(worker.worker.status_listen)
    assert status_host == "0.0.0.0" and status_port == 50052
    # The image's HEALTHCHECK asks HEALTH_TARGET, by default the server's port.
    assert "'127.0.0.1:%d'" % port in healthcheck_command()
    assert environment(service("qm-worker"))["HEALTH_TARGET"] == f"127.0.0.1:{status_port}"
    assert "HEALTH_TARGET" not in environment(service("qm-server"))
    # A stable server id: it names the durable events queue and the SQLite file.
    assert server.server.id
    # Docker waits stop_grace_period before SIGKILL: a drain must fit.
    grace = service("qm-worker").get("stop_grace_period", "10s")
    assert grace.endswith("s") and float(grace[:-1]) > worker.worker.drain_timeout_s


def test_broker_url_names_the_rabbitmq_service_and_its_configured_user():
    user, password = rabbitmq_credentials()
    conf = rabbitmq_conf()
    if user == "guest":
        assert conf.get("loopback_users") == "none", "guest may only connect over loopback unless " \
                                                     "loopback_users = none"
    for name in ("qm-server", "qm-worker"):
        url = urllib.parse.urlsplit(deploy_config(name).broker.url)
        assert url.hostname == "rabbitmq" and (url.port or 5672) == 5672, name
        assert (url.username, url.password) == (user, password), f"{name}: broker URL user differs " \
                                                                  "from RABBITMQ_DEFAULT_USER/PASS"
        file_url = urllib.parse.urlsplit(load_config(QM_CONFIG, env={}).broker.url)
        assert file_url.password is None, "no password in deploy/qm/config.yaml: it comes from .env"
        assert (file_url.username, file_url.hostname, file_url.port, file_url.path) == \
            (url.username, url.hostname, url.port, url.path), \
            "compose's QM_BROKER__URL and deploy/qm/config.yaml broker.url name another account or vhost"


def test_deploy_config_loads_alone_and_with_each_services_environment():
    load_config(QM_CONFIG, env={})
    for name in ("qm-server", "qm-worker"):
        config = deploy_config(name)
        assert config.log.format == "json", f"{name}: containers log JSON (QM_LOG__FORMAT)"
    assert dockerfile_env().get("QM_CONFIG") == CONTAINER_CONFIG
    assert container_path("qm-server", QM_CONFIG) == CONTAINER_CONFIG
    assert container_path("qm-worker", QM_CONFIG) == CONTAINER_CONFIG


def test_consumer_timeout_agrees_between_rabbitmq_and_qm():
    timeout_ms = int(rabbitmq_conf()["consumer_timeout"])
    for name in ("qm-server", "qm-worker"):
        assert timeout_ms == deploy_config(name).broker.consumer_timeout_s * 1000, name
    assert load_config(QM_CONFIG, env={}).broker.consumer_timeout_s * 1000 == timeout_ms


def test_enabled_plugins_has_management_and_prometheus():
    text = ENABLED_PLUGINS.read_text().strip()
    match = re.fullmatch(r"\[\s*([a-z_,\s]*)\]\s*\.", text)
    assert match, f"enabled_plugins must be an Erlang list ending with '.', got {text!r}"
    plugins = {p.strip() for p in match.group(1).split(",") if p.strip()}
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= plugins
    assert container_path("rabbitmq", ENABLED_PLUGINS) == "/etc/rabbitmq/enabled_plugins"
    assert container_path("rabbitmq", RABBITMQ_CONF) == "/etc/rabbitmq/rabbitmq.conf"


def test_prometheus_scrapes_the_configured_metrics_ports():
    config_file = prometheus_config_file()
    assert config_file.is_file(), f"{config_file.relative_to(ROOT)} (prometheus --config.file) missing"
    targets = scrape_targets(yaml.safe_load(config_file.read_text()) or {})
    services = compose()["services"]
    for host in targets:
        assert host in services or host in ("localhost", "127.0.0.1"), \
            f"scrape target host {host!r} is no compose service"
    expected = {"qm-server": deploy_config("qm-server").server.metrics_port,
                "qm-worker": deploy_config("qm-worker").worker.metrics_port,
                "rabbitmq": int(rabbitmq_conf().get("prometheus.tcp.port", 15692))}
    for host, port in expected.items():
        assert host in targets, f"prometheus does not scrape {host}"
        assert targets[host] <= {port}, f"prometheus scrapes {host} on {sorted(targets[host])}, " \
                                         f"but it serves metrics on {port}"


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus():
    provisioning, dashboards = GRAFANA_DIR / "provisioning", GRAFANA_DIR / "dashboards"
    assert container_path("grafana", provisioning) == "/etc/grafana/provisioning"
    dashboards_inside = container_path("grafana", dashboards).rstrip("/")
    assert (provisioning / "datasources").is_dir() and (provisioning / "dashboards").is_dir()
    assert (dashboards / "queuemaster.json").is_file()
    json.loads((dashboards / "queuemaster.json").read_text())
    for provider_file in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in (yaml.safe_load(provider_file.read_text()) or {}).get("providers") or []:
            path = (provider.get("options") or {}).get("path", "").rstrip("/")
            assert path == dashboards_inside or path.startswith(dashboards_inside + "/"), \
                f"{provider_file.name}: provider path {path!r} is not where compose mounts the " \
                f"dashboards ({dashboards_inside})"
    prometheus_port = [target for _, _, target in published(service("prometheus"))][0]
    for source_file in sorted((provisioning / "datasources").glob("*.y*ml")):
        for source in (yaml.safe_load(source_file.read_text()) or {}).get("datasources") or []:
            if source.get("type") == "prometheus":
                url = urllib.parse.urlsplit(source["url"])
                assert (url.hostname, url.port) == ("prometheus", prometheus_port), source_file.name


# --------------------------------------------------------------- Dockerfile ---

def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_dockerfile_slim_python_non_root_healthcheck_and_default_command():
    instructions = dockerfile_instructions()
    words = [word for word, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "run as a non-root USER"
    assert words.count("HEALTHCHECK") == 1
    cmd = [rest for word, rest in instructions if word == "CMD"][-1]
    assert json.loads(cmd) == ["qm-server"]
    installs = [rest for word, rest in instructions if word == "RUN" and "pip install" in rest]
    assert any(re.search(r"pip install --no-cache-dir \. plugins/qm-examples", r) for r in installs)
    assert "grpc_health.v1" in healthcheck_command()
    assert not [k for k in dockerfile_env() if k.startswith("QM_") and k != "QM_CONFIG"], \
        "a QM_* variable in the image must name a setting"


def test_dockerfile_copies_exist_and_are_in_the_build_context():
    copies = [shlex.split(rest) for word, rest in dockerfile_instructions() if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        args = [a for a in args if not a.startswith("--")]
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
            if (ROOT / source).is_dir():
                kept = [p for p in (ROOT / source).rglob("*.py")
                        if not dockerignored(p.relative_to(ROOT).as_posix())]
                assert kept, f"COPY {source}: .dockerignore leaves no Python file of it"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".run/server.log",
                  "qm/__pycache__/config.cpython-311.pyc", "plugins/qm-testtasks/pyproject.toml",
                  "plugins/qm-examples/qm_examples.egg-info/PKG-INFO"):
        assert dockerignored(heavy), f".dockerignore should keep {heavy} out of the build context"


# ---------------------------------------------------------- docker compose ---

def _compose_command() -> list[str]:
    """`docker compose` (v2 plugin), else the standalone `docker-compose`; if neither, skip
    locally and fail under CI=true (tests/requirements.py)."""
    for command in (["docker", "compose"], ["docker-compose"]):
        try:
            probe = subprocess.run(command + ["version"], capture_output=True, text=True, timeout=30)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return command
    missing("neither `docker compose` (the CLI's compose plugin) nor docker-compose is installed")


def test_docker_compose_config_validates(tmp_path):
    """Compose's own schema check and interpolation (needs the CLI only, no engine)."""
    command = _compose_command()
    empty = tmp_path / "empty.env"
    empty.write_text("")
    shell_env = {key: value for key, value in os.environ.items() if key not in example_env()}
    unset = subprocess.run(command + ["--env-file", str(empty), "-f", str(COMPOSE), "config", "--quiet"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, env=shell_env)
    assert unset.returncode != 0 and "deploy/compose-env" in unset.stderr, "no .env: compose must say what to run"
    command += ["--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE)]
    result = subprocess.run(command + ["config", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    services = subprocess.run(command + ["config", "--services"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    assert services.returncode == 0, services.stderr
    assert set(SERVICES) <= set(services.stdout.split())


# ------------------------------------------------------------ JSON logging ---

def test_json_log_lines(capsys):
    from qm.logs import setup_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("info", "qm-worker", "json")
        log = logging.getLogger("qm.worker.supervisor")
        log.info("task %s (%s) attempt %d: %s", "t-1", "math", 1, "SUCCEEDED")
        log.warning("drained\nsecond line", extra={"task_id": "t-2"})
        log.debug("not shown")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("handler failed")
        lines = capsys.readouterr().err.splitlines()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 3
    first, second, third = entries
    assert set(first) == {"ts", "level", "logger", "process", "pid", "message", "task_id"}
    assert first["level"] == "INFO" and first["logger"] == "qm.worker.supervisor"
    assert first["process"] == "qm-worker" and first["pid"] == os.getpid()
    assert first["message"] == "task t-1 (math) attempt 1: SUCCEEDED" and first["task_id"] == "t-1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["task_id"] == "t-2" and second["message"] == "drained\nsecond line"
    assert "task_id" not in third and "ValueError: boom" in third["exc"]
    with pytest.raises(ValueError):
        setup_logging("info", "qm-server", "xml")


# ------------------------------------------------ running the deploy config ---



@pytest.fixture
def deploy_rabbitmq(tmp_path_factory):
    """A private RabbitMQ node (Debian's 3.10, as in the rabbitmq:3.10 image) started with
    deploy/rabbitmq/rabbitmq.conf and enabled_plugins; only its listeners are moved to
    free loopback ports. RabbitMQ refuses to start on an unknown or malformed setting."""
    require_rabbitmq()
    from qm.testing.rabbitmq import LocalRabbitMQ, free_port

    class DeployRabbitMQ(LocalRabbitMQ):
        def __init__(self, base_dir):
            super().__init__(base_dir)
            self.management_port, self.prometheus_port = free_port(), free_port()

        def _write_config(self):
            self.base_dir.mkdir(parents=True, exist_ok=True)
            (self.base_dir / "log").mkdir(exist_ok=True)
            moved = {"listeners.tcp.default": f"127.0.0.1:{self.amqp_port}",
                     "management.tcp.ip": "127.0.0.1", "management.tcp.port": str(self.management_port),
                     "prometheus.tcp.ip": "127.0.0.1", "prometheus.tcp.port": str(self.prometheus_port),
                     "disk_free_limit.absolute": "50MB"}
            lines = [f"{key} = {value}" for key, value in rabbitmq_conf().items() if key not in moved]
            lines += [f"{key} = {value}" for key, value in moved.items()]
            (self.base_dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
            (self.base_dir / "enabled_plugins").write_text(ENABLED_PLUGINS.read_text())

        def _environment(self):  # the account, as compose creates it (docker-compose.yml)
            user, password = rabbitmq_credentials()
            return {**super()._environment(), "RABBITMQ_DEFAULT_USER": user, "RABBITMQ_DEFAULT_PASS": password}

    node = DeployRabbitMQ(tmp_path_factory.mktemp("deploy-rabbitmq"))
    node.start()
    yield node
    node.kill()


def _http_get(url: str, user: str | None = None, password: str | None = None) -> str:
    request = urllib.request.Request(url)
    if user is not None:
        import base64
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def _healthcheck(target: str) -> subprocess.CompletedProcess:
    """The Dockerfile's HEALTHCHECK command, run by sh as Docker runs it, against `target`."""
    env = {"PATH": f"{BIN_DIR}:{os.environ.get('PATH', '')}", "HEALTH_TARGET": target}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(["/bin/sh", "-c", healthcheck_command()], env=env, capture_output=True,
                          text=True, timeout=60)


def _assert_rights_only_on_qm_names(broker_url: str) -> None:
    """The account may declare a qm.* queue, and is refused (403) anything else."""
    import pika

    with pika.BlockingConnection(pika.URLParameters(broker_url)) as connection:
        channel = connection.channel()
        name = unique("qm.rights")
        channel.queue_declare(name, auto_delete=True)
        channel.queue_delete(name)
        for kind, declare in (("queue", lambda ch: ch.queue_declare(unique("other"), auto_delete=True)),
                              ("exchange", lambda ch: ch.exchange_declare(unique("other"), "fanout"))):
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                declare(connection.channel())
            assert refused.value.reply_code == 403, (kind, refused.value)


@pytest.mark.rabbitmq
def test_deploy_config_runs_a_stack_on_the_deploy_rabbitmq(deploy_rabbitmq, launcher):
    """RabbitMQ with deploy/rabbitmq/*; qm-server and qm-worker with deploy/qm/config.yaml and
    their compose environment (only addresses moved to loopback): the deployment's user
    works, both log JSON, serve metrics, pass the image's HEALTHCHECK, and run a task."""
    import qm
    from qm.testing.rabbitmq import free_port

    user, password = rabbitmq_credentials()
    whoami = json.loads(_http_get(f"http://127.0.0.1:{deploy_rabbitmq.management_port}/api/whoami",
                                  user, password))
    assert whoami["name"] == user and "administrator" not in str(whoami.get("tags")), whoami
    assert "management" in str(whoami.get("tags")), whoami
    broker_url = f"amqp://{user}:{password}@127.0.0.1:{deploy_rabbitmq.amqp_port}/%2F"
    _assert_rights_only_on_qm_names(broker_url)
    assert "rabbitmq_" in _http_get(f"http://127.0.0.1:{deploy_rabbitmq.prometheus_port}/metrics")

    launcher.forget_queues(broker_url)  # a private node, gone after the test
    server_metrics, worker_metrics, status_port = free_port(), free_port(), free_port()
    server_env = {**qm_env("qm-server"), "QM_BROKER__URL": broker_url}
    worker_env = {**qm_env("qm-worker"), "QM_BROKER__URL": broker_url}
    queue = unique("q")
    server = launcher.server(broker_url, env=server_env, extra_args=["--metrics-port", str(server_metrics)])
    worker = launcher.worker(broker_url, procs=1, queues=queue, env=worker_env,
                             extra_args=["--status-listen", f"127.0.0.1:{status_port}",
                                         "--metrics-port", str(worker_metrics)])

    with qm.Client(server.address) as client:
        assert client.result(client.submit("math", "6 * 7", queue=queue), timeout_s=60) == "42"
        # A failure logs at INFO (a success at DEBUG only): its line carries the task id.
        task_id = client.submit("test.fail", "", queue=queue, max_retries=0)
        assert [status.state for status in client.results([task_id], timeout_s=60)] == ["FAILED"]
    assert "qm_" in _http_get(f"http://127.0.0.1:{server_metrics}/metrics")
    assert "qm_" in _http_get(f"http://127.0.0.1:{worker_metrics}/metrics")

    for target in (server.address, f"127.0.0.1:{status_port}"):
        result = _healthcheck(target)
        assert result.returncode == 0, f"HEALTHCHECK against {target}: {result.stdout}{result.stderr}"
    closed = _healthcheck(f"127.0.0.1:{free_port()}")
    assert closed.returncode != 0, "HEALTHCHECK must fail when nothing answers"

    worker.wait_for_line(re.escape(task_id), 30)
    text_line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} qm-")  # the text format
    for process in (server, worker):
        lines = process.stderr.splitlines()
        assert not [line for line in lines if text_line.match(line)], f"text log lines:\n{process.logs}"
        # Only Python's logging writes lines starting with "{" (grpc's C core may add others).
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        assert entries, process.logs
        for entry in entries:
            assert {"ts", "level", "logger", "process", "pid", "message"} <= set(entry), entry
            assert entry["process"] == process.name.split()[0]
        if process is worker:
            assert any(entry.get("task_id") == task_id for entry in entries), process.logs


def test_the_shared_store_profile_runs_two_servers_on_its_postgresql():
    services = compose()["services"]
    postgres = services["postgres"]
    assert postgres["profiles"] == ["shared-store"] and postgres["image"].startswith("postgres:")
    env = environment(postgres)
    shared = ("qm-server-a", "qm-server-b")
    ids, data_volumes, host_ports = set(), set(), set()
    for name in shared:
        spec = services[name]
        assert spec["profiles"] == ["shared-store"], f"{name} only runs with --profile shared-store"
        assert spec["depends_on"]["postgres"]["condition"] == "service_healthy", name
        config = deploy_config(name)
        url = urllib.parse.urlsplit(config.server.store_url)
        assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432), name
        assert (url.username, url.password, url.path) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"],
                                                          "/" + env["POSTGRES_DB"]), name
        ids.add(config.server.id)
        data_volumes.update(v for v in named_volumes(spec))
        host_ports.update(port for _, port, _ in published(spec))
    assert len(ids) == 2, "each server of the store needs its own id"
    assert len(data_volumes) == 2, "and its own data dir (it holds the server's lock)"
    assert len(host_ports) == 2
    assert "profiles" not in services["qm-server"], "the default stack stays one server on SQLite"
    assert "${QM_POSTGRES_PASSWORD:?" in environment_raw("postgres")["POSTGRES_PASSWORD"]
