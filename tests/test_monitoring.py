"""Monitoring: the alert rules (promtool unit tests), the Grafana dashboard (its JSON type-checked against
@grafana/schema with tsc --strict, and every panel's PromQL answered with series by a real Prometheus
scraping a real tritonserver and the real OpenAI gateway).

Prometheus, the server and the gateway listen on free loopback ports and are stopped by pid."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tritonchat.json"
TYPECHECK = ROOT / "deploy" / "grafana" / "typecheck"

# metrics a panel may show before they exist, and who adds them; a panel that reads anything else must
# return series (once the metric exists, its panel is checked like every other)
PENDING = {
    "tritonchat_inter_token_seconds": "the generator (python_backend/metrics.py): an inter-token histogram",
    "tritonchat_cancelled_requests_total": "the entry model (EntryMetrics, python_backend/metrics.py)",
    "tritonchat_request_errors_total": "the entry model (EntryMetrics, python_backend/metrics.py)",
    "tritonchat_server_restarts": "the entry model (EntryMetrics, python_backend/metrics.py)",
}
GPU_ONLY = ("nv_gpu_",)


def need_tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} not found: {install}")
    return path


# ---------------------------------------------------------------------------------------------- Prometheus


class Prometheus:
    """A real Prometheus on a free loopback port with `config` (a dict), its data in `workdir`; stopped by pid."""

    def __init__(self, config: dict, workdir: Path):
        from tritonchat.server import free_ports

        self.port = free_ports(1)[0]
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Prometheus":
        binary = need_tool("prometheus", "apt-get install prometheus")
        log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen([binary, f"--config.file={self.config_path}",
                                      f"--storage.tsdb.path={self.workdir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("prometheus did not start: "
                                       + (self.workdir / "prometheus.log").read_text()[-2000:])
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, timeout: float = 60.0) -> list:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            assert time.monotonic() < deadline, f"no series for {expr} after {timeout:.0f} s"
            time.sleep(0.5)


def prometheus_config(targets: dict[str, str], interval: str = "1s") -> dict:
    """deploy/prometheus/prometheus.yml with its targets replaced ({job: host:port}) and a short interval;
    the alert rules are the shipped ones."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval=interval, evaluation_interval=interval)
    cfg["rule_files"] = [str(PROM_DIR / f) for f in cfg["rule_files"]]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    missing = set(targets) - set(jobs)
    assert not missing, f"deploy/prometheus/prometheus.yml has no job {missing}"
    for name, job in jobs.items():
        job["static_configs"] = [{"targets": [targets[name]]}] if name in targets else []
    return cfg


# ---------------------------------------------------------------------------------------------- rules


def test_alert_rules_check_and_pass_their_unit_tests(tmp_path):
    promtool = need_tool("promtool", "apt-get install prometheus (it ships promtool)")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        out = subprocess.run([promtool, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"
    # every alert has a unit test
    alerts = {r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"
    # the unit tests can fail: a threshold moved from 500 ms to 5 s is caught
    broken = tmp_path / "rules"
    shutil.copytree(PROM_DIR, broken)
    rules = broken / "alerts.yml"
    rules.write_text(rules.read_text().replace("[5m]))) > 0.5", "[5m]))) > 5", 1))
    out = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=broken, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "TritonchatTimeToFirstTokenP99High" in out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------- dashboard JSON


def _typecheck(dashboards: Path) -> subprocess.CompletedProcess:
    node = need_tool("node", "apt-get install nodejs npm")
    tsc = TYPECHECK / "node_modules" / ".bin" / "tsc"
    gen = subprocess.run([node, "generate.mjs", str(dashboards)], cwd=TYPECHECK, capture_output=True, text=True,
                         timeout=120)
    if gen.returncode != 0:
        return gen
    return subprocess.run([str(tsc), "-p", "tsconfig.json"], cwd=TYPECHECK, capture_output=True, text=True,
                          timeout=300)


def test_dashboard_type_checks_against_grafana_schema(tmp_path):
    npm = need_tool("npm", "apt-get install nodejs npm")
    if not (TYPECHECK / "node_modules" / "@grafana" / "schema").is_dir():
        # the pinned devDependencies (package-lock.json) into the git-ignored node_modules
        out = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=TYPECHECK, capture_output=True, text=True,
                             timeout=600)
        if out.returncode != 0:
            pytest.skip(f"npm ci in {TYPECHECK} failed (is the npm registry reachable?): {out.stderr[-500:]}")
    out = _typecheck(DASHBOARD.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    # and it catches mistakes: a misspelled field, a value outside an enum, a string for a number
    dash = json.loads(DASHBOARD.read_text())
    panel = next(p for p in dash["panels"] if p["type"] == "timeseries")
    panel["gridpos"] = panel.pop("gridPos")
    panel["options"]["tooltip"]["mode"] = "multiple"
    panel["fieldConfig"]["defaults"]["custom"]["lineWidth"] = "1"
    (tmp_path / "broken.json").write_text(json.dumps(dash))
    out = _typecheck(tmp_path)
    _typecheck(DASHBOARD.parent)  # leave generated/ as the real dashboard's
    errors = out.stdout + out.stderr
    assert out.returncode != 0
    for what in ("'\"gridpos\"' does not exist", "'\"multiple\"' is not assignable", "'string' is not assignable"):
        assert what in errors, f"tsc did not report {what}:\n{errors}"


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for every target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for p in [panel] + panel.get("panels", []):
            for t in p.get("targets", []):
                expr = t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
                assert "$" not in expr, f"{p['title']}: a variable the test does not fill: {expr}"
                out.append((p["title"], expr))
    return out


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    ds = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    var = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert var["current"]["value"] == ds["datasources"][0]["uid"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("tokens", "first token", "inter-token", "running", "waiting", "rejected", "cancelled", "errors",
                  "cache hit", "cpu", "gpu utilisation", "gpu memory"):
        assert topic in titles, f"no panel about {topic}"


# ---------------------------------------------------------------------------------------------- live series


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A real tritonserver (2 slots, requests waiting > 50 ms for one refused) and the gateway, scraped
    every second by a real Prometheus, after traffic of every kind the panels show: answers, a cancelled
    stream, an invalid request, refusals for overload, a cache miss and a hit through the gateway."""
    from e2e_helpers import STORIES, build_repo, need

    need(STORIES)
    need_tool("prometheus", "apt-get install prometheus")
    from tritonchat.gateway import GatewayConfig
    from tritonchat.gateway.process import GatewayProcess
    from tritonchat.server import TritonServer

    tmp = tmp_path_factory.mktemp("monitoring")
    repo = build_repo(STORIES, tmp / "repo", max_batch_size=2, models={"generator": {"queue_timeout_ms": 50}})
    with TritonServer(repo) as srv, \
            GatewayProcess(GatewayConfig(triton_url=srv.grpc_url, metrics_url=srv.metrics_url, port=0)) as gw:
        gw_addr = f"{gw.config.host}:{gw.config.port}"
        cfg = prometheus_config({"tritonserver": srv.metrics_url, "tritonchat-gateway": gw_addr})
        with Prometheus(cfg, tmp / "prometheus") as prom:
            cfg["scrape_configs"][-1]["static_configs"] = [{"targets": [f"127.0.0.1:{prom.port}"]}]
            prom.wait_for('up{job="tritonserver"} == 1')
            prom.wait_for('up{job="tritonchat-gateway"} == 1')
            _traffic(srv, gw)
            time.sleep(4)  # a few scrapes after the last event: rates see two samples of every new series
            yield prom


def _traffic(srv, gw) -> None:
    import concurrent.futures as cf

    import openai
    from tritonchat.client import ChatClient, InvalidRequest, RequestTimeout, ServerUnavailable

    with ChatClient(srv.grpc_url, protocol="grpc") as client:
        for i in range(6):
            client.generate("Once upon a time", max_tokens=16 + i)
        stream = client.stream("Once upon a time", max_tokens=400, min_tokens=400)
        next(iter(stream))
        stream.cancel()
        with pytest.raises(InvalidRequest):
            client.generate("Once upon a time", max_tokens=8, temperature=-1.0)

    def long_stream(_):
        with ChatClient(srv.grpc_url, protocol="grpc") as c:
            try:
                c.generate("Once upon a time", max_tokens=300, min_tokens=300)
                return "ok"
            except (ServerUnavailable, RequestTimeout):  # full waiting line; waited past queue_timeout_ms
                return "refused"

    with cf.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(long_stream, range(8)))
    assert "refused" in outcomes, f"8 streams on 2 slots with a 50 ms wait limit: none refused ({outcomes})"

    sdk = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0)
    for _ in range(2):  # the second one is a cache hit
        sdk.chat.completions.create(model="ensemble", messages=[{"role": "user", "content": "Hello"}],
                                    max_tokens=8, temperature=0)
    for _ in sdk.chat.completions.create(model="ensemble", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=8, stream=True):
        pass


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:tritonchat|nv)_[a-z0-9_]+?)(?:_bucket|_sum|_count)?\b(?=\s*[{\[)])", expr))


def _exposed(prom: Prometheus) -> set[str]:
    return set(prom.api("label/__name__/values"))


def test_every_panel_query_returns_series(live):
    exposed = _exposed(live)
    empty = []
    checked = 0
    for title, expr in panel_queries():
        names = _metric_names(expr)
        if any(n.startswith(GPU_ONLY) for n in names) or any(n in PENDING and not _has(n, exposed) for n in names):
            live.query(expr)  # Prometheus parses it (an error fails here); the series: the two tests below
            continue
        checked += 1
        if not live.query(expr):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels whose query returns no series:\n" + "\n".join(empty)
    assert checked >= 18
    print(f"\n{checked} panel queries returned series")


def _has(name: str, exposed: set[str]) -> bool:
    return any(e == name or e.startswith(name + "_") for e in exposed)


def test_panels_for_metrics_still_to_come(live):
    exposed = _exposed(live)
    waiting = {n: who for n, who in PENDING.items() if not _has(n, exposed)}
    for title, expr in panel_queries():
        names = _metric_names(expr)
        if names & set(PENDING) and not (names & set(waiting)):
            assert live.query(expr), f"{title}: its metric exists now, but the query returns nothing: {expr}"
    if waiting:
        pytest.skip("panels that await metrics not exported yet: "
                    + "; ".join(f"{n} ({who})" for n, who in sorted(waiting.items())))


def test_gpu_panels(live):
    exposed = _exposed(live)
    if not any(e.startswith(GPU_ONLY) for e in exposed):
        pytest.skip("no GPU on this machine: tritonserver exports no nv_gpu_* series, so the GPU panels "
                    "cannot be checked here (Prometheus parsed their PromQL in the test above)")
    for title, expr in panel_queries():
        if any(n.startswith(GPU_ONLY) for n in _metric_names(expr)):
            assert live.query(expr), f"{title}: {expr}"


def test_alert_rules_evaluate_on_live_series(live):
    groups = live.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert len(rules) >= 9
    bad = {name: r.get("lastError") for name, r in rules.items() if r["health"] != "ok"}
    assert not bad, f"rules that fail to evaluate: {bad}"
    # a healthy server: it is up and serves the entry model
    for quiet in ("TritonserverDown", "TritonchatModelNotReady", "TritonchatGatewayDown"):
        assert rules[quiet]["state"] == "inactive", (quiet, rules[quiet])


def test_autoscaling_adapter_rules_query_live_series(live):
    """The Prometheus adapter's queries (deploy/k8s/monitoring) with its templates filled in as it would
    for the pods of one namespace (here: the scraped server's job)."""
    cm = yaml.safe_load((ROOT / "deploy" / "k8s" / "monitoring" / "prometheus-adapter-rules.yaml").read_text())
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    assert rules
    for rule in rules:
        series = re.match(r"\w+", rule["seriesQuery"]).group(0)
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'job="tritonserver"').replace("<<.GroupBy>>", "instance"))
        assert live.query(query), f"{rule['name']['as']}: {query}"
