"""Observability, proved with the real tools: the metrics of qm-server and qm-worker pass
`promtool check metrics`; a real Prometheus (Debian's `prometheus` package, run on
loopback by this module) scrapes them while tasks run, and its query API shows every
counter moved by exactly what the tasks did; every query of the Grafana dashboard
evaluates there (and returns data); the alert rules load and evaluate there, and pass
`promtool check rules` / `promtool test rules` with the config in deploy/prometheus/.

Without prometheus/promtool these tests skip locally (scripts/install-prometheus installs
them); under CI=true they fail instead.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import time
import types
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

import qm
from qm.client.client import RemoteError
from qm.testing.rabbitmq import free_port
from tests.processes import Launcher, wait_until
from tests.requirements import missing

REPO = pathlib.Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "queuemaster.json"

#: Bound on Prometheus answering /-/ready after start.
PROMETHEUS_START_TIMEOUT_S = 60.0
#: Bound on a graceful Prometheus stop before SIGKILL.
PROMETHEUS_STOP_TIMEOUT_S = 15.0
#: Bound on all submitted tasks reaching a terminal state.
TASKS_TIMEOUT_S = 120.0
#: Bound on Prometheus showing the final values (scrapes every second, rules every second).
SCRAPED_TIMEOUT_S = 30.0
#: What Grafana's $__rate_interval stands for when a dashboard query is sent to Prometheus
#: here: long enough to hold all the test's tasks, at a 1 s scrape interval.
RATE_INTERVAL = "1m"

#: The tasks run: type → number of tasks (each runs once unless noted).
MATH_TASKS = 20
FAILING_TASKS = 2          # test.fail, no retries: FAILED and dead-lettered
TIMED_OUT_TASKS = 1        # test.sleep 5 with timeout 1: TIMED_OUT (killed) and dead-lettered
RETRIED_TASKS = 1          # test.flaky failing once, one retry: RETRYING, then SUCCEEDED
#: A group of one test.echo member with a test.echo callback: two more tasks, run once each.
GROUP_TASKS = 2
#: Submissions refused by validation, by the field at fault.
INVALID_SUBMITS = {"type": 1, "queue": 1, "payload": 1}

#: The alerts deploy/prometheus/alerts.yml must have (the issue's list).
ALERTS = {"QMNoWorkerConsuming", "QMDeadLettersRising", "QMTaskFailureRatioHigh", "QMQueueWaitHigh",
          "QMQueueBacklog"}
#: Dashboard queries on RabbitMQ's rabbitmq_prometheus metrics: the tests' RabbitMQ node
#: does not run that plugin, so these must only parse and evaluate (to nothing).
RABBITMQ_ONLY_QUERIES = {
    r'sum by (queue) (rabbitmq_queue_messages_ready{queue=~"qm\\.tasks\\..+"})',
    r'sum by (queue) (rabbitmq_queue_messages_unacked{queue=~"qm\\.tasks\\..+"})',
}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed; scripts/install-prometheus installs Debian's "
                "prometheus package (prometheus and promtool)")
    return path


def promtool(*args: str, input: str | None = None,
             cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], input=input, capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def http_get(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode("utf-8")


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard, in panel order."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(target["expr"] for target in panel.get("targets", []) if target.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return exprs


# -- configuration files, checked with promtool -------------------------------------------


def test_alert_rules_and_prometheus_config_pass_promtool():
    checked = promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # rule_files in both are relative to the file itself; run from elsewhere to prove it
    tested = promtool("test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml"), cwd=REPO / "tests")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr
    config = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"), cwd=REPO / "tests")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout + config.stderr, config.stdout + config.stderr


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet():
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    unit_tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    firing, quiet = set(), set()
    for case in unit_tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts >= ALERTS
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


def test_prometheus_config_scrapes_the_compose_services():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {job["job_name"]: [t for static in job.get("static_configs", []) for t in static["targets"]]
               + [f"{name}:{dns['port']}" for dns in job.get("dns_sd_configs", []) for name in dns["names"]]
               for job in config["scrape_configs"]}
    # every qm-worker replica (compose --scale) through DNS; the others static
    assert targets == {"qm-server": ["qm-server:9464"], "qm-worker": ["qm-worker:9465"],
                       "rabbitmq": ["rabbitmq:15692"]}
    assert config["scrape_configs"][1]["dns_sd_configs"][0]["type"] == "A"
    assert config["rule_files"] == ["alerts.yml"]


def test_grafana_dashboard_is_provisioned_with_its_datasource():
    provisioning = GRAFANA_DIR / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    [datasource] = datasources["datasources"]
    assert (datasource["uid"], datasource["type"]) == ("prometheus", "prometheus")
    providers = yaml.safe_load((provisioning / "dashboards" / "qm.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "queuemaster"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            assert target["expr"].strip(), panel["title"]
    queries = "\n".join(dashboard_queries())
    for needed in ("qm_worker_tasks_finished_total", "qm_worker_task_run_seconds_bucket",
                   "qm_worker_task_queue_wait_seconds_bucket", "qm_worker_kills_total",
                   "rabbitmq_queue_messages_ready", "qm_worker_children_busy", "qm_worker_child_rss_bytes",
                   'state="RETRYING"',
                   "qm_server_dead_letters_total", "histogram_quantile"):
        assert needed in queries, f"no dashboard query uses {needed}"
    assert RABBITMQ_ONLY_QUERIES <= set(dashboard_queries())


# -- a real Prometheus scraping a real server and worker ----------------------------------


class Prometheus:
    """Debian's prometheus binary on 127.0.0.1:PORT, its data and log in `base`."""

    def __init__(self, base: pathlib.Path, scrape: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in scrape.items()],
        }
        base.mkdir(parents=True, exist_ok=True)
        (base / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = base / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [require_tool("prometheus"), f"--config.file={base / 'prometheus.yml'}",
                 f"--storage.tsdb.path={base / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def log(self) -> str:
        return f"--- prometheus log ---\n{self.log_path.read_text(errors='replace')[-5000:]}"

    def wait_ready(self, timeout_s: float = PROMETHEUS_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}\n{self.log}")
            try:
                http_get(f"{self.url}/-/ready", timeout_s=2)
                return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise AssertionError(f"prometheus not ready within {timeout_s} s\n{self.log}")
            time.sleep(0.2)

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/PATH; the answer's data (asserting status success)."""
        query = urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        except urllib.error.HTTPError as exc:  # 4xx/5xx carry a JSON error too
            body = json.loads(exc.read().decode("utf-8"))
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query's series (each {"metric": labels, "value": [t, "v"]})."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]

    def values(self, promql: str) -> dict[tuple, float]:
        """An instant query as {tuple of sorted labels (no __name__): value}."""
        return {tuple(sorted((k, v) for k, v in series["metric"].items() if k != "__name__")):
                float(series["value"][1]) for series in self.query(promql)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(PROMETHEUS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(PROMETHEUS_STOP_TIMEOUT_S)


def submit_all(client: qm.Client, queue: str, tmp: pathlib.Path) -> list[str]:
    """Submit the test's tasks and its invalid and duplicate submissions; the task ids."""
    ids = []
    key = "observe-duplicate-key"
    ids.append(client.submit("math", "1 + 1", queue=queue, idempotency_key=key))
    assert client.submit("math", "1 + 1", queue=queue, idempotency_key=key) == ids[0]  # a duplicate
    ids += [client.submit("math", f"{n} * 3 + 1", queue=queue) for n in range(MATH_TASKS - 1)]
    ids += [client.submit("test.fail", f"boom {n}", queue=queue, max_retries=0) for n in range(FAILING_TASKS)]
    ids += [client.submit("test.sleep", "5", queue=queue, timeout_s=1, max_retries=0, retry_on_timeout=False)
            for _ in range(TIMED_OUT_TASKS)]
    ids += [client.submit("test.flaky", f"{tmp / f'flaky-{n}'}:1", queue=queue, max_retries=1,
                          retry_backoff_s=0, retry_jitter=False) for n in range(RETRIED_TASKS)]
    invalid = [("type", "no.such.type", "x", queue), ("queue", "math", "1 + 1", "not a queue!"),
               ("payload", "math", "1 +", queue)]
    assert {field for field, *_ in invalid} == set(INVALID_SUBMITS)
    for field, task_type, payload, to_queue in invalid:
        for _ in range(INVALID_SUBMITS[field]):
            with pytest.raises(RemoteError) as refused:
                client.submit(task_type, payload, queue=to_queue)
            assert refused.value.code.name == "INVALID_ARGUMENT", refused.value
    return ids


@pytest.fixture(scope="module")
def observed(rabbitmq, tmp_path_factory):
    """A server and a worker (2 children) with metrics on, scraped every second by a real
    Prometheus that also evaluates deploy/prometheus/alerts.yml; the tasks of submit_all
    run to their end. Yields the Prometheus, the processes and their metrics URLs."""
    require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("observe")
    server_metrics, worker_metrics = free_port(), free_port()
    prometheus = Prometheus(tmp / "prometheus", {"qm-server": f"127.0.0.1:{server_metrics}",
                                                 "qm-worker": f"127.0.0.1:{worker_metrics}"})
    launcher = Launcher(tmp)
    try:
        queue = launcher.queue(rabbitmq.url)
        server = launcher.server(rabbitmq.url, extra_args=["--metrics-port", str(server_metrics)])
        launcher.track_queue(rabbitmq.url, f"qm.dead.{server.server_id}")
        worker = launcher.worker(rabbitmq.url, procs=2, queues=queue,
                                 extra_args=["--metrics-port", str(worker_metrics)])
        prometheus.wait_ready()
        idle = launcher.queue(rabbitmq.url)  # no worker: a schedule's tasks move no task counter
        with qm.Client(server.address) as client:
            client.add_schedule("math", "1 + 1", every_s=1, queue=idle, schedule_id="observe-each-second")
            ids = submit_all(client, queue, tmp)
            group_id = client.submit_group([("test.echo", "member")], then=("test.echo", None), queue=queue)
            final = {}
            for status in client.watch(ids, timeout_s=TASKS_TIMEOUT_S):
                final[status.task_id] = status
            wait_until(lambda: client.list_schedules()[0].fires >= 2, TASKS_TIMEOUT_S, message="2 schedule fires")
            schedule_fires = client.remove_schedule("observe-each-second").fires
            list(client.results(client.group_status(group_id).task_ids, timeout_s=TASKS_TIMEOUT_S))
            callback_id = client.group_status(group_id).callback_task_id
            assert client.result(callback_id, timeout_s=TASKS_TIMEOUT_S).startswith('{"group_id"')
        states = sorted(status.state for status in final.values())
        logs = f"{server.logs}\n{worker.logs}\n{prometheus.log}"
        assert len(final) == len(ids) and all(status.terminal for status in final.values()), logs
        expected_states = sorted(["SUCCEEDED"] * (MATH_TASKS + RETRIED_TASKS) + ["FAILED"] * FAILING_TASKS
                                 + ["TIMED_OUT"] * TIMED_OUT_TASKS)
        assert states == expected_states, logs
        yield types.SimpleNamespace(prometheus=prometheus, server=server, worker=worker, schedule_fires=schedule_fires,
                                    server_metrics=f"http://127.0.0.1:{server_metrics}/metrics",
                                    worker_metrics=f"http://127.0.0.1:{worker_metrics}/metrics")
    finally:
        try:
            launcher.cleanup()
        finally:
            prometheus.stop()


def wait_for_values(prometheus: Prometheus, expected: dict[str, dict[tuple, float]],
                    timeout_s: float = SCRAPED_TIMEOUT_S) -> None:
    """Poll Prometheus until every query returns exactly its expected series and values."""
    deadline = time.monotonic() + timeout_s
    while True:
        actual = {promql: prometheus.values(promql) for promql in expected}
        if actual == expected:
            return
        if time.monotonic() >= deadline:
            wrong = "\n".join(f"{promql}\n  expected {expected[promql]}\n  actual   {actual[promql]}"
                              for promql in expected if actual[promql] != expected[promql])
            raise AssertionError(f"Prometheus did not show these values within {timeout_s} s:\n{wrong}")
        time.sleep(0.5)


def test_metrics_exposition_passes_promtool_check_metrics(observed):
    for name, url in (("qm-server", observed.server_metrics), ("qm-worker", observed.worker_metrics)):
        exposition = http_get(url)
        assert "qm_" in exposition, f"{name}: {exposition[:500]}"
        checked = promtool("check", "metrics", input=exposition)
        assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), \
            f"promtool check metrics on {name}'s {url}:\n{checked.stdout}{checked.stderr}"


def test_prometheus_shows_counters_moved_by_exactly_the_tasks_run(observed):
    total = MATH_TASKS + FAILING_TASKS + TIMED_OUT_TASKS + RETRIED_TASKS
    attempts = total + RETRIED_TASKS + GROUP_TASKS
    dead = FAILING_TASKS + TIMED_OUT_TASKS
    invalid = sum(INVALID_SUBMITS.values())
    expected = {
        # qm-server
        'sum(qm_server_submissions_total{outcome="accepted"})': {(): total},
        'sum by (type) (qm_server_submissions_total{outcome="accepted"})': {
            (("type", "math"),): MATH_TASKS, (("type", "test.fail"),): FAILING_TASKS,
            (("type", "test.sleep"),): TIMED_OUT_TASKS, (("type", "test.flaky"),): RETRIED_TASKS},
        'sum(qm_server_submissions_total{outcome="duplicate"})': {(): 1},
        'sum(qm_server_submissions_total{outcome="invalid"})': {(): invalid},
        "sum(qm_server_validation_rejects_total)": {(): invalid},
        "sum by (field) (qm_server_validation_rejects_total)": {
            (("field", field),): count for field, count in INVALID_SUBMITS.items()},
        "sum(qm_server_dead_letters_total)": {(): dead},
        "sum by (type) (qm_server_dead_letters_total)": {
            (("type", "test.fail"),): FAILING_TASKS, (("type", "test.sleep"),): TIMED_OUT_TASKS},
        'sum(qm_server_grpc_handling_seconds_count{method="SubmitTask"})': {(): total + 1 + invalid},
        "sum(qm_server_publish_confirm_seconds_count)": {(): total + observed.schedule_fires},
        'sum by (outcome) (qm_server_schedule_fires_total)': {(("outcome", "fired"),): observed.schedule_fires},
        "max(qm_server_store_schedules)": {(): 0},
        "max(qm_server_store_dead_letters)": {(): dead},
        'sum(qm_server_groups_total{outcome="accepted"})': {(): 1},
        "sum(qm_server_group_members_total)": {(): 1},
        'sum by (outcome) (qm_server_group_callbacks_total)': {(("outcome", "all_succeeded"),): 1},
        "sum(qm_server_group_duration_seconds_count)": {(): 1},
        # qm-worker
        'sum(qm_worker_tasks_finished_total{state="SUCCEEDED",type="math"})': {(): MATH_TASKS},
        'sum(qm_worker_tasks_finished_total{state="FAILED"})': {(): FAILING_TASKS},
        'sum by (type, state) (qm_worker_tasks_finished_total)': {
            (("state", "SUCCEEDED"), ("type", "math")): MATH_TASKS,
            (("state", "FAILED"), ("type", "test.fail")): FAILING_TASKS,
            (("state", "TIMED_OUT"), ("type", "test.sleep")): TIMED_OUT_TASKS,
            (("state", "RETRYING"), ("type", "test.flaky")): RETRIED_TASKS,
            (("state", "SUCCEEDED"), ("type", "test.flaky")): RETRIED_TASKS,
            (("state", "SUCCEEDED"), ("type", "test.echo")): GROUP_TASKS},
        # every reason is exported from the start (at 0), so rate() sees a first kill
        'sum by (reason) (qm_worker_kills_total)': {
            (("reason", "timeout"),): TIMED_OUT_TASKS, (("reason", "memory"),): 0,
            (("reason", "crash"),): 0, (("reason", "cancel"),): 0},
        # the time limit is enforced by killing the child (no soft timeout asked for): each
        # timed-out task costs its child, and the pool starts a new one
        "sum(qm_worker_child_restarts_total)": {(): TIMED_OUT_TASKS},
        "sum(qm_worker_broker_reconnects_total)": {(): 0},
        "sum(qm_worker_task_run_seconds_count)": {(): attempts},
        "sum(qm_worker_task_queue_wait_seconds_count)": {(): attempts},
        'sum(qm_worker_task_run_seconds_count{type="math"})': {(): MATH_TASKS},
        'sum(qm_worker_task_run_seconds_bucket{type="test.sleep",le="0.5"})': {(): 0},
        'sum(qm_worker_task_run_seconds_bucket{type="test.sleep",le="+Inf"})': {(): TIMED_OUT_TASKS},
        "sum(qm_worker_children_busy)": {(): 0},
        "sum(qm_worker_children_idle)": {(): 2},
        "sum(qm_worker_busy_cpus)": {(): 0},
        "sum(qm_worker_cpus)": {(): 2},
        "sum(qm_worker_unacked_deliveries)": {(): 0},
        'count(qm_worker_child_rss_bytes > 1000000)': {(): 2},
        # both targets scraped by the jobs the dashboard and alerts name
        'sum by (job) (up{job=~"qm-server|qm-worker"})': {
            (("job", "qm-server"),): 1, (("job", "qm-worker"),): 1},
    }
    wait_for_values(observed.prometheus, expected)


def test_every_dashboard_query_evaluates_and_shows_data(observed):
    queries = dashboard_queries()
    assert len(queries) >= 10
    # Each qm_ query has data once Prometheus holds the final values and, for rate(),
    # two samples of each series: poll (bounded) until all have.
    deadline = time.monotonic() + SCRAPED_TIMEOUT_S
    while True:
        empty = []
        for expr in queries:
            promql = expr.replace("$__rate_interval", RATE_INTERVAL)
            assert "$" not in promql, f"unsubstituted Grafana variable in {expr}"
            series = observed.prometheus.query(promql)  # asserts it parses and evaluates
            if expr in RABBITMQ_ONLY_QUERIES:
                assert re.search(r"\brabbitmq_", expr) and not re.search(r"\bqm_", expr), expr
            elif not series:
                empty.append(expr)
        if not empty or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    assert empty == [], f"dashboard queries without data {SCRAPED_TIMEOUT_S} s after the tasks ran: {empty}"


def test_alert_rules_load_and_evaluate_on_the_real_metrics(observed):
    """In Prometheus every rule evaluates without error; the dead letters of this test fire
    QMDeadLettersRising (by type) and nothing else fires."""
    deadline = time.monotonic() + SCRAPED_TIMEOUT_S
    while True:
        groups = observed.prometheus.api("rules")["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        firing = sorted((alert["labels"]["alertname"], alert["labels"].get("type", ""))
                        for rule in rules.values() for alert in rule.get("alerts", [])
                        if alert["state"] == "firing")
        expected = [("QMDeadLettersRising", "test.fail"), ("QMDeadLettersRising", "test.sleep")]
        healthy = all(rule["health"] == "ok" for rule in rules.values())
        if healthy and firing == expected and rules["QMNoWorkerConsuming"]["state"] == "inactive":
            break
        if time.monotonic() >= deadline:
            raise AssertionError(f"rules not as expected within {SCRAPED_TIMEOUT_S} s (firing {firing}): "
                                 f"{json.dumps(rules, indent=1)[:6000]}")
        time.sleep(0.5)
    assert ALERTS <= set(rules)
