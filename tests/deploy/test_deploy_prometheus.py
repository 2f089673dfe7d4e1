"""deploy/prometheus and deploy/grafana: the scrape configs, recording and alert rules, their unit
tests, and the dashboard, checked by the real tools; then a real Prometheus on loopback scraping a
real ``cnnkit serve`` while it gets traffic.

* ``promtool check config`` / ``check rules`` / ``test rules`` (deploy/prometheus/tests: synthetic
  series, which alerts fire when).
* Every expression of the rules and of every dashboard panel names only series that exist: a
  metric the server exports (read from :class:`cnnkit.serve.Metrics`) or a recorded one.
* Live: ``prometheus`` (1 s scrapes and rule evaluation) scrapes ``cnnkit serve``; after
  predictions, its HTTP API shows ``cnnkit_requests_total`` and the recording rules' series with
  the requests, every rule evaluates without error, and every dashboard query runs.

promtool and prometheus are Debian's ``prometheus`` package; without them those tests skip and
say so (the static checks still run).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[deploy]')")

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "cnnkit.json"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"no {name}: apt-get install prometheus (Debian) to run this test")
    return path


def _run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


# --- series names -----------------------------------------------------------------------------

PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "offset", "inf", "nan", "atan2"}


def series_names(expr: str) -> set[str]:
    """The metric names an expression reads (a plain PromQL scan: strings, label matchers,
    grouping clauses, ranges and durations are dropped first; a name followed by "(" is a function)."""
    text = re.sub(r'"(\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        if match[2] is None and match[1].lower() not in PROMQL_WORDS:
            names.add(match[1])
    return names


def exported_series() -> set[str]:
    """Every series name cnnkit serve can export: its metric families with their suffixes."""
    from cnnkit.serve import Metrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
    names = set()
    for family in Metrics(drift=True).registry.collect():
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def recorded_series() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, expression)`` of every query of the dashboard, its variables' included."""
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"])
            assert match, variable
            queries.append((f"variable {variable['name']}", match[1]))
    return queries


def test_the_scan_finds_the_names_of_an_expression():
    assert series_names('sum by (job, le) (rate(a_bucket{endpoint=~"/p|/i", x="by(y)"}[5m]))') == {"a_bucket"}
    assert series_names("job:x:ratio_rate5m > (14.4 * 0.001) and on (job) b offset 5m or absent(up == 1)") == \
        {"job:x:ratio_rate5m", "b", "up"}
    assert series_names('max(c{job=~"$job"}) / 0.001 or vector(0)') == {"c"}


def test_every_rule_and_dashboard_query_names_only_series_that_exist():
    known = exported_series() | recorded_series() | {"up"}
    assert {"cnnkit_requests_total", "cnnkit_request_duration_seconds_bucket", "cnnkit_drift_psi",
            "cnnkit_workers_ready", "cnnkit_reference_confidence_mean"} <= known
    for rule in _rules():
        unknown = series_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule.get('alert')} reads series that do not exist: {unknown}"
    queries = dashboard_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        names = series_names(expr)
        assert names, f"{title}: {expr} reads no series"
        assert not names - known, f"panel {title!r} reads series that do not exist: {names - known}"


def test_the_dashboard_covers_what_the_issue_lists():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "cnnkit" and board["panels"]
    text = json.dumps(board)
    for needle in ("job_endpoint_status:cnnkit_requests:rate5m", "job:cnnkit_prediction_errors:ratio_rate5m",
                   "p95_rate5m", "p99_rate5m", "job:cnnkit_batch_size:mean_rate5m", "job_label:cnnkit_predicted_class",
                   "job:cnnkit_prediction_confidence:mean_rate30m", "job_signal:cnnkit_drift_psi:max", "cnnkit_model_info"):
        assert needle in text, needle
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_alert_has_a_severity_a_summary_and_a_runbook_and_is_unit_tested():
    alerts = [rule for rule in _rules() if "alert" in rule]
    assert {a["alert"] for a in alerts} >= {"CnnkitErrorBudgetBurnFast", "CnnkitErrorBudgetBurnSlow", "CnnkitHighErrorRatio",
                                            "CnnkitLatencyP95High", "CnnkitNoReadyWorker", "CnnkitDriftMajor",
                                            "CnnkitDriftModerate", "CnnkitConfidenceCollapse"}
    tests = yaml.safe_load((PROMETHEUS_DIR / "tests" / "cnnkit-alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for group in tests for case in group.get("alert_rule_test", []) if case["exp_alerts"]}
    quiet = {case["alertname"] for group in tests for case in group.get("alert_rule_test", []) if not case["exp_alerts"]}
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        assert {"summary", "description", "runbook"} <= set(alert["annotations"]), alert["alert"]
        assert alert["alert"] in fired and alert["alert"] in quiet, f"{alert['alert']}: no unit test that it fires and that it does not"
    text = (PROMETHEUS_DIR / "rules" / "cnnkit-alerts.yml").read_text()
    for threshold in ("> 0.25", "> 0.1 ", "> 0.01", "> 0.5", "14.4", "(6 * 0.001)", "(3 * 0.001)"):
        assert threshold in text, threshold


# --- promtool ---------------------------------------------------------------------------------


def test_promtool_checks_the_scrape_configs():
    promtool = _tool("promtool")
    answer = _run(promtool, "check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    kubernetes = PROMETHEUS_DIR / "prometheus-kubernetes.yml"
    answer = _run(promtool, "check", "config", kubernetes)
    if answer.returncode != 0 and "field kubernetes_sd_configs not found" in answer.stdout + answer.stderr:
        # Debian's Prometheus is built without Kubernetes discovery: check the rest of the file
        # (the relabelling, the rule files) with a static target in its place
        config = yaml.safe_load(kubernetes.read_text())
        for job in config["scrape_configs"]:
            job.pop("kubernetes_sd_configs")
            job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
        stand_in = PROMETHEUS_DIR / ".prometheus-kubernetes.check.yml"  # beside it: rule_files are relative
        try:
            stand_in.write_text(yaml.safe_dump(config))
            answer = _run(promtool, "check", "config", stand_in)
        finally:
            stand_in.unlink(missing_ok=True)
    assert answer.returncode == 0, answer.stdout + answer.stderr


def test_promtool_checks_the_rules():
    answer = _run(_tool("promtool"), "check", "rules", *RULE_FILES)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert answer.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_unit_tests_of_the_alerts_pass():
    answer = _run(_tool("promtool"), "test", "rules", PROMETHEUS_DIR / "tests" / "cnnkit-alerts.test.yml")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "SUCCESS" in answer.stdout


# --- a real Prometheus scraping a real server ------------------------------------------------


def _query(base: str, expr: str) -> dict:
    from deploy_helpers import http

    answer = http(base, "GET", "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10)
    body = answer.json
    assert answer.status == 200 and body["status"] == "success", (expr, body)
    return body["data"]


def _value(base: str, expr: str) -> float | None:
    result = _query(base, expr)["result"]
    return float(result[0]["value"][1]) if result else None


def _wait_for(what: str, condition, shown: object = None, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"Prometheus never showed {what}: {shown}"
        time.sleep(0.25)


def test_a_real_prometheus_scrapes_a_real_server_and_records_its_series(container, tmp_path):
    from deploy_helpers import free_port, http, image_bytes, metric, metric_values, multipart, post_images

    prometheus_binary = _tool("prometheus")
    server = container
    prometheus = None
    try:
        # the deployed config, as it is, but for loopback, 1 s intervals and the rules' absolute paths
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROMETHEUS_DIR / path) for path in config["rule_files"]]
        (job,) = config["scrape_configs"]
        assert job["job_name"] == "cnnkit" and job["static_configs"][0]["targets"] == ["cnnkit:8080"]
        job["static_configs"] = [{"targets": [server.base.removeprefix("http://")]}]
        job["scrape_timeout"] = "1s"
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with open(tmp_path / "prometheus.log", "wb") as log:
            prometheus = subprocess.Popen(
                [prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)

        def target_up():
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                return _value(base, 'up{job="cnnkit"}') == 1
            except OSError:
                return False

        _wait_for("the server's target up", target_up)
        before = metric_values(http(server.base, "GET", "/metrics").text)  # the session's server: others sent requests too
        predicted = metric(before, "cnnkit_requests_total", endpoint="/predict", status="200")
        invoked = metric(before, "cnnkit_requests_total", endpoint="/invocations", status="200")
        refused = sum(v for (name, labels), v in before.items() if name == "cnnkit_requests_total" and ("status", "422") in labels)
        # traffic: 4 predictions of 30 images (the drift window reports from 100), 3 raw /invocations, one refused (4xx)
        for seed in range(4):
            assert post_images(server.base, [image_bytes(30 * seed + i) for i in range(30)]).status == 200
        for seed in range(3):
            assert http(server.base, "POST", "/invocations", image_bytes(seed, "JPEG"), "image/jpeg").status == 200
        assert http(server.base, "POST", "/predict", *multipart([("image", "x.png", b"no image")])).status == 422

        counts: dict[str, float | None] = {}

        def requests_counted() -> bool:
            counts.update(
                predict=_value(base, 'sum(cnnkit_requests_total{job="cnnkit",endpoint="/predict",status="200"})'),
                invocations=_value(base, 'sum(cnnkit_requests_total{job="cnnkit",endpoint="/invocations",status="200"})'),
                refused=_value(base, 'sum(cnnkit_requests_total{job="cnnkit",status="422"})'))
            return counts == {"predict": predicted + 4, "invocations": invoked + 3, "refused": refused + 1}

        _wait_for("cnnkit_requests_total counting the requests", requests_counted, counts)
        recorded = ("job:cnnkit_prediction_requests:rate5m", "job:cnnkit_images:rate5m", "job:cnnkit_batch_size:mean_rate5m",
                    "job:cnnkit_prediction_duration_seconds:p95_rate5m", "job:cnnkit_workers_ready:sum",
                    "job:cnnkit_reference_confidence:mean", "job:cnnkit_prediction_confidence:mean_rate30m")
        values: dict[str, float | None] = {}

        def recorded_series_show_the_traffic() -> bool:
            values.update({name: _value(base, f'{name}{{job="cnnkit"}}') for name in recorded})
            return all((value or 0) > 0 for value in values.values())

        _wait_for("the recording rules' series", recorded_series_show_the_traffic, values)
        # (each rule group is evaluated on its own tick: wait for the errors' one too; a 422 is no 5xx)
        _wait_for("an error ratio of 0", lambda: _value(base, 'job:cnnkit_prediction_errors:ratio_rate5m{job="cnnkit"}') == 0)
        _wait_for("the drift PSI of every signal", lambda: {r["metric"]["signal"] for r in _query(
            base, 'job_signal:cnnkit_drift_psi:max{job="cnnkit"}')["result"]} == {"class", "confidence", "brightness"},
            _query(base, "cnnkit_drift_psi"))

        # every rule evaluates without error; nothing fires on this healthy server
        groups = http(base, "GET", "/api/v1/rules").json["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == len(_rules())
        assert all(rule["health"] == "ok" and not rule.get("lastError") for rule in rules), \
            [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert [r["name"] for r in rules if r["type"] == "alerting" and r["state"] == "firing"] == []

        # every dashboard query runs (Grafana's variables filled in as it would)
        for title, expr in dashboard_queries():
            _query(base, expr.replace("$__rate_interval", "1m").replace("$job", "cnnkit"))
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
