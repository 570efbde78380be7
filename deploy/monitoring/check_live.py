#!/usr/bin/env python3
"""Evaluate the Grafana dashboard and the alerting rules against a real Prometheus that
scrapes a running coldgate.

Starts coldgate with one service ("demo", the simulated predictor with a 1.5 s model
load) and Prometheus, both on 127.0.0.1 only. Sends requests that cause two cold starts,
a 504 (held longer than queue_timeout) and a 503 (queue full) in each, and lets the
service scale to zero in between. Then queries every dashboard expression through
/api/v1/query and fails when one returns an error, no series, or only NaN. Also fails
when a metric name in the dashboard or the rule files is not one that coldgate exports,
or when Prometheus reports an error for a loaded alerting rule.

Run by scripts/check-monitoring.sh; uses the Python standard library only. Every
process it starts is stopped by pid before it exits, and dies with it
(PR_SET_PDEATHSIG) if it is killed.
"""

import argparse
import ctypes
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

SERVICE = "demo"
HOST_HEADER = "demo.local"
LOAD_MS = 1500
# The check takes about 15 s on two cores. The deadline stays below the 110 s backstop
# in scripts/check-monitoring.sh, so this script always gets to stop its processes.
DEADLINE_SECONDS = 90
# Values for Grafana's variables. Only stat panels use $__range, and every sample of the
# run falls inside 5 minutes.
VARIABLES = {
    "service": SERVICE,
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}
INFER_BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}
).encode()
PR_SET_PDEATHSIG = 1


class CheckError(Exception):
    """Failure of a check, with a message that names what failed and what to look at."""


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def remaining(self):
        return self.end - time.monotonic()

    def check(self, doing):
        if self.remaining() <= 0:
            raise CheckError(f"timed out after {DEADLINE_SECONDS} s while {doing}")


def die_with_parent():
    # Runs in the child between fork and exec: the kernel sends SIGTERM to the child
    # when this script dies, even by SIGKILL.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_process(name, argv, log_path):
    log = open(log_path, "wb")
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    log.close()
    print(f"started {name} (pid {process.pid}): {' '.join(argv)}")
    return process


def stop_process(name, process, grace_seconds=5):
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
        print(f"stopped {name} (pid {process.pid})")
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        print(f"killed {name} (pid {process.pid}): it did not exit within {grace_seconds} s of SIGTERM")


def free_loopback_port():
    # Another program can take the port before Prometheus binds it; Prometheus then
    # exits at once and the check reports its log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_request(port, method, path, body=None, headers=None, timeout=10.0):
    """Sends one request to 127.0.0.1:port and returns (status, body bytes).

    http.client ignores proxy variables, so requests never leave loopback.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def tail(path, lines=30):
    try:
        with open(path, "r", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError as error:
        return f"(cannot read {path}: {error})"


# --- coldgate ---------------------------------------------------------------------------


def coldgate_config(coldgate_bin):
    # queue_timeout (1 s) is shorter than the model load (1.5 s), so the first request of
    # a cold start gets 504 and a request sent after it is released. max_queued_requests
    # = 1 makes a second request during the cold start get 503 queue_full.
    args = ["predictor", "--port", "{port}", "--model", SERVICE, "--load-ms", str(LOAD_MS)]
    return "\n".join(
        [
            "[server]",
            'listen = "127.0.0.1:0"',
            'admin_listen = "127.0.0.1:0"',
            'drain_delay = "0s"',
            'shutdown_grace = "5s"',
            "",
            "[defaults]",
            'queue_timeout = "1s"',
            "max_queued_requests = 1",
            'idle_timeout = "1s"',
            "",
            "[[service]]",
            f'name = "{SERVICE}"',
            f'hosts = ["{HOST_HEADER}"]',
            f'readiness_path = "/v2/models/{SERVICE}/ready"',
            "",
            "[service.process]",
            f"command = {json.dumps(coldgate_bin)}",
            f"args = {json.dumps(args)}",
            'stop_grace = "5s"',
            "",
        ]
    )


def wait_for_coldgate_addresses(process, log_path, deadline):
    """Returns (data port, admin port) from coldgate's JSON "listening" log line."""
    while True:
        deadline.check("waiting for coldgate to listen")
        if process.poll() is not None:
            raise CheckError(
                f"coldgate exited with status {process.returncode} before listening; its log:\n{tail(log_path)}"
            )
        with open(log_path, "r", errors="replace") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("message") == "listening":
                    data = record["data_addr"].rsplit(":", 1)[1]
                    admin = record["admin_addr"].rsplit(":", 1)[1]
                    return int(data), int(admin)
        time.sleep(0.05)


def exported_metric_names(admin_port):
    """Returns the metric names coldgate exports: families and their histogram series."""
    status, body = http_request(admin_port, "GET", "/metrics")
    if status != 200:
        raise CheckError(f"GET /metrics on coldgate's admin port returned {status}")
    names = set()
    for line in body.decode().splitlines():
        match = re.match(r"# TYPE (\S+) (\S+)", line)
        if not match:
            continue
        name, kind = match.groups()
        names.add(name)
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    return names


def service_state(admin_port):
    status, body = http_request(admin_port, "GET", "/status")
    if status != 200:
        raise CheckError(f"GET /status on coldgate's admin port returned {status}")
    for entry in json.loads(body).get("services", []):
        if entry.get("name") == SERVICE:
            return entry.get("state")
    raise CheckError(f"GET /status did not list service {SERVICE!r}: {body[:300]!r}")


# --- Traffic ----------------------------------------------------------------------------


def infer(data_port):
    """Sends one inference request through coldgate and returns the status code."""
    headers = {"Host": HOST_HEADER, "Content-Type": "application/json"}
    status, _ = http_request(data_port, "POST", f"/v2/models/{SERVICE}/infer", INFER_BODY, headers, timeout=15)
    return status


def infer_in_background(data_port, results, key):
    def run():
        try:
            results[key] = infer(data_port)
        except OSError as error:
            results[key] = f"request failed: {error}"

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def cold_start_round(data_port, admin_port, number, deadline):
    """Causes one cold start with a 504, a 503 and released and warm requests."""
    state = service_state(admin_port)
    if state != "idle":
        raise CheckError(f"round {number}: service {SERVICE} is {state!r}, expected 'idle' before a cold start")

    results = {}
    started = time.monotonic()
    # First request: starts the service and is held longer than queue_timeout (504).
    first = infer_in_background(data_port, results, "held past queue_timeout")
    time.sleep(0.2)
    # max_queued_requests is 1 and the first request is held, so this one gets 503 queue_full.
    infer_in_background(data_port, results, "queue full").join()
    # After the first request timed out at 1 s, this one waits for the model (ready at
    # about 1.5 s) and is released.
    time.sleep(max(0.0, started + 1.2 - time.monotonic()))
    released = infer_in_background(data_port, results, "released after the cold start")
    first.join(timeout=10)
    released.join(timeout=10)
    for index in range(3):
        results[f"warm {index + 1}"] = infer(data_port)

    expected = {
        "held past queue_timeout": 504,
        "queue full": 503,
        "released after the cold start": 200,
        "warm 1": 200,
        "warm 2": 200,
        "warm 3": 200,
    }
    print(f"round {number}: " + ", ".join(f"{key} -> {results.get(key)}" for key in expected))
    wrong = {key: results.get(key) for key, status in expected.items() if results.get(key) != status}
    if wrong:
        raise CheckError(
            f"round {number}: unexpected responses {wrong} (expected {expected}). The scenario "
            f"relies on queue_timeout 1 s < model load {LOAD_MS} ms; a very slow machine can "
            "break that timing. coldgate's log is below."
        )

    # idle_timeout is 1 s, so the service scales to zero soon after the last request.
    while service_state(admin_port) != "idle":
        deadline.check(f"waiting for service {SERVICE} to scale to zero after round {number}")
        time.sleep(0.1)


# --- Prometheus -------------------------------------------------------------------------


def prometheus_config(admin_port, rules_path):
    # JSON is valid YAML, so no YAML library is needed.
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules_path],
        "scrape_configs": [
            {"job_name": "coldgate", "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}]}
        ],
    }
    return json.dumps(config, indent=2)


def prometheus_api(port, path, params=None):
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    status, body = http_request(port, "GET", f"{path}{query}")
    try:
        document = json.loads(body)
    except ValueError:
        raise CheckError(f"Prometheus returned {status} and no JSON for {path}{query}: {body[:300]!r}")
    if document.get("status") != "success":
        raise CheckError(f"Prometheus returned {document.get('errorType')}: {document.get('error')}")
    return document["data"]


def wait_for_prometheus(port, process, log_path, deadline):
    while True:
        deadline.check("waiting for Prometheus to become ready")
        if process.poll() is not None:
            raise CheckError(
                f"Prometheus exited with status {process.returncode} before it was ready; its log:\n{tail(log_path)}"
            )
        try:
            status, _ = http_request(port, "GET", "/-/ready", timeout=1)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)


def query_vector(port, expression):
    data = prometheus_api(port, "/api/v1/query", {"query": expression})
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    if data["resultType"] != "vector":
        raise CheckError(f"{expression} returned a {data['resultType']}, expected an instant vector")
    return data["result"]


def wait_for_value(port, expression, expected, deadline, doing):
    while True:
        deadline.check(doing)
        result = query_vector(port, expression)
        if result and float(result[0]["value"][1]) == expected:
            return
        time.sleep(0.25)


# --- Dashboard --------------------------------------------------------------------------


def dashboard_targets(dashboard):
    """Yields (panel title, refId, expression) for every query target, rows included."""

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield panel.get("title", "(untitled)"), target.get("refId", "?"), target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard.get("panels", []))


def substitute_variables(expression):
    def replace(match):
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            raise CheckError(f"expression uses ${name}, which this check has no value for: {expression}")
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expression)


def check_dashboard_structure(dashboard):
    problems = []
    variables = {variable["name"]: variable for variable in dashboard.get("templating", {}).get("list", [])}
    datasource = variables.get("datasource")
    if not datasource or datasource.get("type") != "datasource" or datasource.get("query") != "prometheus":
        problems.append("templating needs a variable 'datasource' of type datasource with query 'prometheus'")
    service = variables.get("service")
    if not service or service.get("type") != "query":
        problems.append("templating needs a query variable 'service'")
    ids = [panel.get("id") for panel in dashboard.get("panels", [])]
    if len(ids) != len(set(ids)):
        problems.append(f"panel ids are not unique: {ids}")
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            continue
        uid = panel.get("datasource", {}).get("uid")
        if uid != "${datasource}":
            problems.append(f"panel {panel.get('title')!r} uses data source {uid!r}, expected '${{datasource}}'")
    if problems:
        raise CheckError("the dashboard structure is invalid:\n  " + "\n  ".join(problems))
    return service


def unknown_metric_names(text, exported):
    used = set(re.findall(r"\bcoldgate_[a-z0-9_]*[a-z0-9]", text))
    return sorted(used - exported)


def check_metric_names(admin_port, paths):
    """Returns a failure for each file that names a coldgate_* metric coldgate does not export.

    Labelled series without a start value (requests, upstream latency) appear only after
    traffic, so call this after the requests.
    """
    exported = exported_metric_names(admin_port)
    failures = []
    for path in paths:
        with open(path) as handle:
            names = unknown_metric_names(handle.read(), exported)
        if names:
            failures.append(f"{path} uses metric names that coldgate does not export: {', '.join(names)}")
    if failures:
        print("coldgate exports: " + ", ".join(sorted(exported)))
    else:
        print(f"every coldgate_* name in {', '.join(paths)} is exported by coldgate")
    return failures


def check_service_variable(prometheus_port, variable):
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    match = re.fullmatch(r"\s*label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*", query or "")
    if not match:
        raise CheckError(f"variable 'service' has query {query!r}; expected label_values(METRIC, LABEL)")
    metric, label = match.groups()
    values = prometheus_api(prometheus_port, f"/api/v1/label/{label}/values", {"match[]": metric})
    print(f"variable service: {query} -> {values}")
    if SERVICE not in values:
        raise CheckError(f"variable 'service' ({query}) returned {values}, which lacks {SERVICE!r}")


def evaluate_dashboard(prometheus_port, dashboard):
    failures = []
    targets = list(dashboard_targets(dashboard))
    print(f"evaluating {len(targets)} dashboard expressions")
    for title, ref_id, expression in targets:
        concrete = substitute_variables(expression)
        try:
            result = query_vector(prometheus_port, concrete)
        except CheckError as error:
            print(f"  ERROR      [{title} / {ref_id}] {concrete}\n             {error}")
            failures.append(f"{title} / {ref_id}: {error}")
            continue
        numbers = [sample for sample in result if not math.isnan(float(sample["value"][1]))]
        print(f"  {len(result):2d} series ({len(numbers)} not NaN)  [{title} / {ref_id}] {concrete}")
        if not result:
            failures.append(f"{title} / {ref_id}: no data for {concrete}")
        elif not numbers:
            failures.append(f"{title} / {ref_id}: only NaN for {concrete}")
    return failures


def evaluate_rules(prometheus_port, deadline):
    """Waits until Prometheus has evaluated every loaded rule and returns the failures."""
    while True:
        deadline.check("waiting for Prometheus to evaluate the alerting rules")
        groups = prometheus_api(prometheus_port, "/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(not rule.get("lastEvaluation", "").startswith("0001-") for rule in rules):
            break
        time.sleep(0.25)
    failures = []
    print(f"evaluated {len(rules)} alerting rules in Prometheus")
    for rule in rules:
        print(f"  {rule['name']}: health {rule['health']}, state {rule.get('state', '-')}")
        if rule["health"] != "ok":
            failures.append(f"rule {rule['name']}: {rule.get('lastError') or rule['health']}")
    return failures


# --- Main -------------------------------------------------------------------------------


def run(arguments, workdir, processes):
    deadline = Deadline(DEADLINE_SECONDS)
    with open(arguments.dashboard) as handle:
        dashboard = json.load(handle)
    service_variable = check_dashboard_structure(dashboard)

    config_path = os.path.join(workdir, "coldgate.toml")
    with open(config_path, "w") as handle:
        handle.write(coldgate_config(arguments.coldgate))
    coldgate_log = os.path.join(workdir, "coldgate.log")
    processes["coldgate"] = start_process(
        "coldgate",
        [arguments.coldgate, "serve", "--config", config_path, "--log-format", "json"],
        coldgate_log,
    )
    data_port, admin_port = wait_for_coldgate_addresses(processes["coldgate"], coldgate_log, deadline)
    print(f"coldgate listens on 127.0.0.1:{data_port} (data) and 127.0.0.1:{admin_port} (admin)")

    prometheus_port = free_loopback_port()
    prometheus_config_path = os.path.join(workdir, "prometheus.yml")
    with open(prometheus_config_path, "w") as handle:
        handle.write(prometheus_config(admin_port, os.path.abspath(arguments.rules)))
    prometheus_log = os.path.join(workdir, "prometheus.log")
    processes["prometheus"] = start_process(
        "prometheus",
        [
            arguments.prometheus,
            f"--config.file={prometheus_config_path}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            f"--storage.tsdb.path={os.path.join(workdir, 'tsdb')}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        prometheus_log,
    )
    wait_for_prometheus(prometheus_port, processes["prometheus"], prometheus_log, deadline)
    print(f"Prometheus is ready on 127.0.0.1:{prometheus_port}")
    wait_for_value(prometheus_port, 'up{job="coldgate"}', 1, deadline, "waiting for the first scrape of coldgate")

    for number in (1, 2):
        cold_start_round(data_port, admin_port, number, deadline)

    # 4 requests per round got 200. Wait until Prometheus has scraped the final counts.
    wait_for_value(
        prometheus_port,
        f'sum(coldgate_requests_total{{service="{SERVICE}", status="200"}})',
        8,
        deadline,
        "waiting for Prometheus to scrape the final request counts",
    )

    failures = check_metric_names(admin_port, [arguments.dashboard, arguments.rules, arguments.rule_tests])
    try:
        check_service_variable(prometheus_port, service_variable)
    except CheckError as error:
        failures.append(str(error))
    failures += evaluate_dashboard(prometheus_port, dashboard)
    failures += evaluate_rules(prometheus_port, deadline)
    if failures:
        raise CheckError("failed:\n  " + "\n  ".join(failures))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coldgate", required=True, help="coldgate binary")
    parser.add_argument("--prometheus", required=True, help="prometheus binary (2.x or newer)")
    parser.add_argument("--dashboard", required=True, help="Grafana dashboard JSON")
    parser.add_argument("--rules", required=True, help="Prometheus rule file")
    parser.add_argument("--rule-tests", required=True, help="promtool rule test file; only its metric names are checked here")
    arguments = parser.parse_args()

    # SIGTERM (from timeout) unwinds like Ctrl-C, so the processes are stopped below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"check_live: stopped by signal {signum}"))

    workdir = tempfile.mkdtemp(prefix="coldgate-monitoring-")
    processes = {}
    status = 0
    try:
        run(arguments, workdir, processes)
        print("check_live: every dashboard expression and alerting rule returned data without errors")
    except (CheckError, OSError) as error:
        # OSError: a request to coldgate or Prometheus on 127.0.0.1 failed.
        print(f"check_live: {error}", file=sys.stderr)
        for name in ("coldgate", "prometheus"):
            path = os.path.join(workdir, f"{name}.log")
            if os.path.exists(path):
                print(f"--- last lines of {name}'s log ---\n{tail(path)}", file=sys.stderr)
        status = 1
    finally:
        for name in ("prometheus", "coldgate"):
            stop_process(name, processes.get(name))
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
