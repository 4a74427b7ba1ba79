"""Checks of deploy/ and the Dockerfile that need no Docker engine and no cluster:

* every metric the dashboard, the Prometheus rules and the autoscaler use exists in the real
  server's /metrics output (no dead panels, no alert on a series that never exists);
* promtool accepts the Prometheus configuration and rules; yamllint accepts every YAML file;
* the dashboard uses the provisioned data source; the k8s manifests have the expected kinds and
  native gRPC probes;
* scripts/docker-build, the script the Dockerfile's build stage runs, stages a runtime tree that
  runs on its own libraries (the image's layout, minus the Debian base).
"""
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "defkv.json"
RULE_FILES = sorted((COMPOSE / "prometheus" / "rules").glob("*.yml"))
GRPC_PORT, METRICS_PORT = 50051, 9464


# The integration tests' fixtures (generated gRPC stubs, a real server on free ports) are reused,
# not copied: their conftest is loaded under its own module name and its fixtures imported here.
def _load_integration_conftest():
    d = pathlib.Path(__file__).resolve().parent / "integration"
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))  # its `from server_harness import ...`
    spec = importlib.util.spec_from_file_location("defkv_integration_conftest", d / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_integration = _load_integration_conftest()
pb = _integration.pb
model_dir = _integration.model_dir
start_server = _integration.start_server
from server_harness import CONTEXT, QUESTION  # noqa: E402  (after the path insert above)


# ---- PromQL: which metric names an expression reads --------------------------------------------

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2", "start", "end"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects. Strings, label matchers, ranges, grouping clauses,
    Grafana variables and prometheus-adapter templates are removed first; what remains is
    function and aggregation names (followed by '('), keywords, numbers and metric names."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"<<[^>]*>>", " ", s)              # prometheus-adapter templates
    s = re.sub(r"\$\{?\w+\}?", " ", s)            # Grafana variables ($__rate_interval)
    s = re.sub(r"\{[^}]*\}", " ", s)              # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)             # ranges and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()", s):
        name = m.group(1)
        if name.lower() in _KEYWORDS or re.fullmatch(r"\d.*", name):
            continue
        names.add(name)
    return names


def test_promql_metric_names_parser():
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(defkv_x_bucket{code=~"a|b"}[$__rate_interval])))') \
        == {"defkv_x_bucket"}
    assert promql_metric_names("sum(rate(a_total[5m])) / ignoring(code) group_left b:rec offset 5m > bool 1e3") \
        == {"a_total", "b:rec"}
    assert promql_metric_names("max by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})") == set()
    assert promql_metric_names('up{job="defkv"} == 0') == {"up"}


# ---- where deploy/ uses metrics ----------------------------------------------------------------

def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((f"panel '{p['title']}'", t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query", "")
        if v.get("type") == "query" and q:
            out.append((f"variable {v['name']}", re.sub(r"^\w+\((.*)\)$", r"\1", q)))
    return out


def rules() -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def k8s_docs() -> dict[str, list[dict]]:
    return {f.name: [d for d in yaml.safe_load_all(f.read_text()) if d] for f in sorted(K8S.glob("*.yaml"))}


def autoscaling_exprs() -> list[tuple[str, str]]:
    """The HPA's metric names and the adapter rules' series queries."""
    out = []
    hpa = k8s_docs()["hpa.yaml"][0]
    for m in hpa["spec"]["metrics"]:
        out.append(("hpa.yaml", m[m["type"].lower()]["metric"]["name"]))
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    for r in adapter["rules"]["custom"]:
        out.append(("prometheus-adapter seriesQuery", r["seriesQuery"]))
        out.append(("prometheus-adapter metricsQuery", r["metricsQuery"]))
    return out


# Series Prometheus makes itself for every target: not the server's to export.
PROMETHEUS_SERIES = {"up"}


def parse_exposition(text: str) -> tuple[set[str], dict[str, str]]:
    """Sample names and the type of each metric family in Prometheus text format."""
    samples, types = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind.strip()
        elif line and not line.startswith("#"):
            samples.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return samples, types


@pytest.fixture(scope="module")
def scraped(start_server, pb):
    """/metrics of a real server after one streamed request with a press, so the series labelled
    by press and code exist (a labelled family has no samples before its first observation)."""
    server = start_server("--max_queue=8")
    req = pb.defkv.GenerateRequest(context=CONTEXT, question=QUESTION, press="snapkv", compression_ratio=0.5,
                                   max_new_tokens=8)
    stream = list(server.stub().GenerateStream(req, timeout=60))
    assert stream, "GenerateStream sent nothing"
    return parse_exposition(server.metrics())


def test_every_metric_used_by_deploy_is_exported(scraped):
    samples, types = scraped
    recorded = {r["record"] for r in rules() if "record" in r}
    uses = dashboard_exprs() + [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in rules()] \
        + autoscaling_exprs()
    assert len(uses) > 20
    missing = []
    for where, expr in uses:
        names = promql_metric_names(expr)
        assert names or where.endswith("metricsQuery"), f"{where}: no metric in {expr!r}"
        for name in names:
            if name in recorded or name in PROMETHEUS_SERIES:
                continue
            base, suffix = re.match(r"(.*?)(_bucket|_sum|_count)?$", name).groups()
            if suffix:
                # A histogram's series: the family must be a histogram (a counter named *_count
                # would also be a sample name, but not one these queries mean).
                ok = types.get(base) in ("histogram", "summary") and name in samples
                if suffix == "_bucket":
                    ok = ok and types.get(base) == "histogram"
            else:
                ok = name in samples and types.get(name) != "histogram"
            if not ok:
                missing.append(f"{where}: {name}")
    assert not missing, "metrics not exported by defkv-server:\n" + "\n".join(missing)


def test_recording_rules_are_used_or_documented():
    """Each recording rule feeds an alert, the dashboard or is named in docs/DEPLOY.md."""
    used = " ".join(e for _, e in dashboard_exprs()) + " ".join(r["expr"] for r in rules() if "alert" in r) \
        + (REPO / "docs" / "DEPLOY.md").read_text()
    for r in rules():
        if "record" in r:
            assert r["record"] in used, f"recording rule {r['record']} is used nowhere"


def test_dashboard_covers_the_issue():
    """The panels the deployment issue asks for read the metrics that answer them."""
    exprs = " ".join(e for _, e in dashboard_exprs())
    for metric in ("defkv_requests_total", "defkv_time_to_first_token_seconds_bucket",
                   "defkv_inter_token_latency_seconds_bucket", "defkv_e2e_request_latency_seconds_bucket",
                   "defkv_kv_cache_bytes_sum", "defkv_compression_ratio_sum", "defkv_num_requests_running",
                   "defkv_num_requests_waiting", "defkv_generation_tokens_total", "defkv_device_memory_used_bytes"):
        assert metric in exprs, f"no panel reads {metric}"
    assert "sum by (press, code)" in exprs
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in exprs


# ---- tools: promtool, yamllint ----------------------------------------------------------------

def _tool(name):
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed (scripts/lib/common.sh APT_PACKAGES lists it)")
    return path


def test_promtool_check_config():
    r = subprocess.run([_tool("promtool"), "check", "config", str(COMPOSE / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(RULE_FILES)} rule files found" in r.stdout + r.stderr


def test_promtool_check_rules():
    assert RULE_FILES
    r = subprocess.run([_tool("promtool"), "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rules_text = r.stdout + r.stderr
    assert "SUCCESS" in rules_text
    assert any("alert" in x for x in rules()) and any("record" in x for x in rules())


def test_yamllint():
    files = sorted(str(p) for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())
    assert len(files) >= 10
    r = subprocess.run([_tool("yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint"), *files],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- Grafana ----------------------------------------------------------------------------------

def test_dashboard_uses_the_provisioned_datasource():
    ds = yaml.safe_load((COMPOSE / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uid = source["uid"]
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
    # The dashboard provider reads the folder compose mounts the JSON into.
    prov = yaml.safe_load((COMPOSE / "grafana" / "provisioning" / "dashboards" / "defkv.yml").read_text())
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{prov['providers'][0]['options']['path']}:ro" in mounts


def test_compose_services():
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    s = compose["services"]
    assert s["defkv-server-gpu"]["profiles"] == ["gpu"] and s["defkv-server-cpu"]["profiles"] == ["cpu"]
    gpu = s["defkv-server-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    for name in ("defkv-server-gpu", "defkv-server-cpu"):
        assert "defkv-server" in s[name]["networks"]["default"]["aliases"]
        assert s[name]["build"]["context"] == "../.."
    prom = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "defkv")
    assert job["static_configs"][0]["targets"] == [f"defkv-server:{METRICS_PORT}"]


# ---- Kubernetes ---------------------------------------------------------------------------------

def test_k8s_manifests():
    docs = k8s_docs()
    kinds = {name: [d.get("kind") for d in ds] for name, ds in docs.items()}
    assert kinds["deployment.yaml"] == ["Deployment"]
    assert kinds["service.yaml"] == ["Service"]
    assert kinds["hpa.yaml"] == ["HorizontalPodAutoscaler"]
    assert kinds["servicemonitor.yaml"] == ["ServiceMonitor"]
    assert kinds["pvc.yaml"] == ["PersistentVolumeClaim"]
    assert kinds["kustomization.yaml"] == ["Kustomization"]
    assert kinds["prometheus-adapter-values.yaml"] == [None]  # Helm values, not a manifest
    kust = docs["kustomization.yaml"][0]
    for f in kust["resources"]:
        assert (K8S / f).is_file(), f

    dep = docs["deployment.yaml"][0]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == GRPC_PORT, probe
    assert c["readinessProbe"]["grpc"]["service"] == "defkv.v1.DefKV"
    assert c["livenessProbe"]["grpc"].get("service", "") == ""
    # preStop sleep + the server's drain grace must fit in the termination grace period.
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = next(float(a.split("=", 1)[1]) for a in c["args"] if a.startswith("--drain_grace_seconds="))
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["runAsNonRoot"] is True
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(METRICS_PORT)

    svc = docs["service.yaml"][0]
    assert svc["spec"]["clusterIP"] == "None"  # headless: client-side round robin
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    sm = docs["servicemonitor.yaml"][0]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()

    hpa = docs["hpa.yaml"][0]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "defkv"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "defkv_num_requests_waiting"
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    assert any(r["name"]["as"] == "defkv_num_requests_waiting" for r in adapter["rules"]["custom"])


# ---- the Dockerfile and the script its build stage runs ----------------------------------------

def test_dockerfile_conventions():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cuda$", text, re.M)
    assert "FROM build-${VARIANT} AS build" in text and "FROM runtime-${VARIANT} AS runtime" in text
    assert re.search(r"^RUN scripts/docker-build \"\$\{VARIANT\}\" /opt/defkv$", text, re.M)
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert re.search(rf"^EXPOSE {GRPC_PORT} {METRICS_PORT}$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"defkv\", .*\"health\"\]", text, re.M)
    assert "MODEL_DIR=/models" in text and '--model=\\"$MODEL_DIR\\"' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    for d in (".venv", ".deps", "build", ".git"):
        assert d in ignored


def test_docker_build_script_stages_a_runnable_tree(tmp_path, bin_dir, build_dir):
    """Runs scripts/docker-build cpu as the Dockerfile does (install and build are no-ops after
    scripts/test), then starts the staged server on the staged libraries only, the way the image's
    ENTRYPOINT does, and asks the HEALTHCHECK's question."""
    from server_harness import free_port

    stage = tmp_path / "opt-defkv"
    env = dict(os.environ, DEFKV_BUILD_DIR=str(build_dir))
    r = subprocess.run([str(REPO / "scripts" / "docker-build"), "cpu", str(stage)], capture_output=True, text=True,
                       env=env, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in (stage / "bin").iterdir()) == ["defkv", "defkv-server"]
    libs = {p.name for p in (stage / "lib").iterdir()}
    for lib in ("libdefkv_core.so", "libtorch_cpu.so", "libc10.so", "libprometheus-cpp-core.so.1.0",
                "libprometheus-cpp-pull.so.1.0"):
        assert lib in libs, f"{lib} not staged: {sorted(libs)}"
    packages = (stage / "runtime-packages.txt").read_text().split()
    assert "libgrpc++1.51" in packages or any(p.startswith("libgrpc++") for p in packages), packages
    assert not any(p.endswith("-dev") for p in packages), packages

    # Every library resolves inside the stage or to an installed Debian package's file.
    run_env = dict(os.environ, LD_LIBRARY_PATH=str(stage / "lib"), MODEL_DIR=str(REPO / "models" / "stories260K"),
                   DEFKV_VARIANT="cpu")
    ldd = subprocess.run(["ldd", str(stage / "bin" / "defkv-server")], capture_output=True, text=True, env=run_env)
    for line in ldd.stdout.splitlines():
        assert "not found" not in line, line
        if "=>" in line and "/" in line:
            path = line.split("=>")[1].split()[0]
            assert path.startswith(str(stage / "lib")) or not path.startswith(str(REPO)), line

    # The image's ENTRYPOINT, with the ports moved to free ones (the last flag wins).
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M).group(1))
    port, metrics_port = free_port(), free_port()
    run_env["PATH"] = f"{stage / 'bin'}:{os.environ['PATH']}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(entry + [f"--port={port}", f"--metrics_port={metrics_port}", "--host=127.0.0.1",
                                     "--threads=1"], env=run_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, rc = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            rc = subprocess.run([str(stage / "bin" / "defkv"), "--addr", f"127.0.0.1:{port}", "--timeout", "4",
                                 "health"], capture_output=True, text=True, env=run_env).returncode
            if rc == 0:
                break
            time.sleep(0.2)
        assert rc == 0, (tmp_path / "server.log").read_text()
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        log.close()
