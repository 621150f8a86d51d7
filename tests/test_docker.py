"""The images and docker/compose.yaml.

Always: the compose file parses (docker-compose config) and keeps its promises; the Dockerfile avoids what
breaks on Docker 20.10 without a registry. Opt-in (TRITONCHAT_DOCKER_TESTS=1, root, docker.io, debootstrap;
about 4 minutes, most of it the base image and pip): a private Docker daemon (docker/dockerd.sh, stopped by
its pid file), the CPU image built from the checkout's files (never the working folder with its .venv),
started read-only as its non-root user until healthy, a streamed answer from it and a real Prometheus
scraping it; then the compose stack (tritonserver, gateway, Redis, Prometheus) up with host networking.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from e2e_helpers import STORIES, need
from test_monitoring import Prometheus, prometheus_config

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
COMPOSE = DOCKER_DIR / "compose.yaml"
DOCKER = os.environ.get("DOCKER_CLI", "/usr/bin/docker")  # Debian's CLI: BuildKit builds without buildx
IMAGE = "tritonchat:e2e"
PROMPT = "Once upon a time"
V1 = ", there was a little girl named Lily"


def compose_cmd() -> list[str]:
    path = shutil.which("docker-compose")
    if not path:
        pytest.skip("docker-compose not found: apt-get install docker-compose")
    return [path]


# ---------------------------------------------------------------------------------------------- always


def test_compose_file_keeps_its_promises(tmp_path):
    out = subprocess.run([*compose_cmd(), "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TRITONCHAT_REPO": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert set(services) == {"tritonserver", "gateway", "redis", "prometheus", "grafana"}
    for name, svc in services.items():
        assert svc["restart"] == "unless-stopped", name
        assert svc["network_mode"] == "host", name
        assert "healthcheck" in svc or name == "tritonserver", f"{name} has no healthcheck"  # the image has one
    triton = services["tritonserver"]
    assert triton["read_only"] is True
    assert mounts(triton)["/models"] == (str(tmp_path), True)
    # the kernel cache outlives the container (a named volume), and the engine is told to use it
    assert mounts(triton)["/var/cache/tritonchat"] == ("kernel-cache", False)
    assert {triton["environment"][k] for k in ("TRITONCHAT_TUNE_CACHE", "TRITON_CACHE_DIR")} == {
        "/var/cache/tritonchat/tuning", "/var/cache/tritonchat/triton"}
    assert services["gateway"]["depends_on"]["tritonserver"]["condition"] == "service_healthy"
    assert "--cache" in services["gateway"]["command"]
    assert mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"][0] == str(ROOT / "deploy" / "prometheus"
                                                                                      / "prometheus.yml")
    assert mounts(services["grafana"])["/etc/grafana/provisioning"][0] == str(ROOT / "deploy" / "grafana"
                                                                              / "provisioning")


def mounts(service: dict) -> dict:
    """{target: (source, read-only)} of a service's volumes, in either of compose's spellings."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
        else:
            out[v["target"]] = (v.get("source"), bool(v.get("read_only")))
    return out


def test_dockerfile_builds_on_docker_20_10_without_a_registry():
    text = (DOCKER_DIR / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert not text.startswith("# syntax="), "a syntax line makes BuildKit pull a frontend image"
    assert not any("<<" in line for line in lines if line.startswith("RUN")), "Docker 20.10 has no RUN heredocs"
    assert "COPY . " not in text, "the source must not stay in a layer (a bind mount for one step)"
    assert "\nUSER 10001:10001\n" in text and "\nWORKDIR /\n" in text and "\nHEALTHCHECK " in text
    assert "/v2/health/ready" in text


# ---------------------------------------------------------------------------------------------- opt-in


def docker(*args: str, env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert out.returncode == 0, f"docker {' '.join(args)}:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def daemon():
    """DOCKER_HOST of a daemon: one already running (CI starts it with docker/dockerd.sh), else a private one
    started here and stopped by its pid file at the end."""
    if os.environ.get("TRITONCHAT_DOCKER_TESTS") != "1":
        pytest.skip("opt-in: TRITONCHAT_DOCKER_TESTS=1 builds and runs the images (root, docker.io, debootstrap; "
                    "about 4 minutes)")
    if os.geteuid() != 0 or not shutil.which("dockerd") or not Path(DOCKER).exists():
        pytest.skip("building images needs root, dockerd and /usr/bin/docker (apt-get install docker.io)")
    script = str(DOCKER_DIR / "dockerd.sh")
    running = subprocess.run([script, "status"], capture_output=True, text=True)
    started = running.returncode != 0
    out = subprocess.run([script, "start"], capture_output=True, text=True, timeout=120) if started else running
    assert out.returncode == 0, out.stderr
    env = {**os.environ, "DOCKER_HOST": out.stdout.strip().split("=", 1)[1]}
    try:
        yield env
    finally:
        if started:
            subprocess.run([script, "stop"], timeout=120)


@pytest.fixture(scope="module")
def image(daemon):
    t0 = time.monotonic()
    out = subprocess.run([str(DOCKER_DIR / "base-image.sh")], capture_output=True, text=True, timeout=600, env=daemon)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    t1 = time.monotonic()
    out = subprocess.run([str(DOCKER_DIR / "build-image.sh"), "cpu", IMAGE], capture_output=True, text=True,
                         timeout=900, env=daemon)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    print(f"\nbase image {t1 - t0:.0f} s, CPU image {time.monotonic() - t1:.0f} s")
    return IMAGE


def wait_healthy(container: str, env: dict, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(docker("inspect", container, env=env).stdout)[0]["State"]
        if state.get("Health", {}).get("Status") == "healthy":
            return
        if not state["Running"] or time.monotonic() > deadline:
            logs = docker("logs", container, env=env, check=False)
            pytest.fail(f"{container} is {state.get('Health', {}).get('Status', state['Status'])}:\n"
                        f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        time.sleep(1)


@pytest.mark.docker
@pytest.mark.slow
def test_cpu_image_serves_and_prometheus_scrapes_it(image, daemon, stories_repo, tmp_path):
    from tritonchat.client import ChatClient
    from tritonchat.server import free_ports

    need(STORIES)
    meta = json.loads(docker("image", "inspect", image, env=daemon).stdout)[0]["Config"]
    assert meta["User"] == "10001:10001" and meta["WorkingDir"] == "/" and meta["Healthcheck"]["Test"]
    http, grpc, metrics = free_ports(3)
    name = f"tritonchat-e2e-{os.getpid()}"
    docker("run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp", "--shm-size", "256m",
           "-e", f"TRITONCHAT_HEALTH_URL=http://127.0.0.1:{http}/v2/health/ready",
           "-v", f"{stories_repo}:/models:ro", image,
           "serve", "--model-repository", "/models", "--host", "127.0.0.1", "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), env=daemon)
    try:
        wait_healthy(name, daemon)
        with ChatClient(f"127.0.0.1:{grpc}", protocol="grpc") as client:
            deltas = list(client.stream(PROMPT, max_tokens=24))
        assert len(deltas) > 1 and "".join(d.text for d in deltas).startswith(V1), deltas
        with Prometheus(prometheus_config({"tritonserver": f"127.0.0.1:{metrics}"}), tmp_path / "prom") as prom:
            assert prom.wait_for('up{job="tritonserver"} == 1')
            assert prom.wait_for('tritonchat_generated_tokens_total{job="tritonserver"} > 0')
        uid = docker("exec", name, "id", "-u", env=daemon).stdout.strip()
        assert uid == "10001"
    finally:
        docker("rm", "-f", name, env=daemon, check=False)


@pytest.mark.docker
@pytest.mark.slow
def test_compose_stack_runs_with_host_networking(image, daemon, stories_repo, tmp_path):
    """tritonserver, gateway (its cache in Redis), Redis and Prometheus from docker/compose.yaml. Grafana has no
    image here (no registry; its dashboard is checked by tests/test_monitoring.py)."""
    import openai
    import redis
    from tritonchat.server import free_ports

    need(STORIES)
    docker("build", "--network", "host", "-q", "-f", str(DOCKER_DIR / "tools.Dockerfile"), "-t", "tritonchat-tools",
           str(DOCKER_DIR), env={**daemon, "DOCKER_BUILDKIT": "1"}, timeout=600)
    http, grpc, metrics, gw, redis_port, prom_port = free_ports(6)
    cfg = prometheus_config({"tritonserver": f"127.0.0.1:{metrics}", "tritonchat-gateway": f"127.0.0.1:{gw}",
                             "prometheus": f"127.0.0.1:{prom_port}"})
    cfg["rule_files"] = ["alerts.yml"]  # where compose mounts it
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    env = {**daemon, "TRITONCHAT_IMAGE": image, "TRITONCHAT_REPO": str(stories_repo),
           "TRITON_HTTP_PORT": str(http), "TRITON_GRPC_PORT": str(grpc), "TRITON_METRICS_PORT": str(metrics),
           "GATEWAY_PORT": str(gw), "REDIS_PORT": str(redis_port), "PROMETHEUS_PORT": str(prom_port),
           "PROMETHEUS_CONFIG": str(tmp_path / "prometheus.yml"),
           "REDIS_IMAGE": "tritonchat-tools", "PROMETHEUS_IMAGE": "tritonchat-tools"}
    project = ["-p", f"tritonchat-e2e-{os.getpid()}", "-f", str(COMPOSE)]
    services = ["tritonserver", "gateway", "redis", "prometheus"]
    try:
        up = subprocess.run([*compose_cmd(), *project, "up", "-d", *services], capture_output=True, text=True,
                            timeout=300, env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        ids = subprocess.run([*compose_cmd(), *project, "ps", "-q"], capture_output=True, text=True, env=env)
        for cid in ids.stdout.split():
            wait_healthy(cid, daemon)
        # the kernel cache's named volume is the image's user's to write (created from the image's folder)
        server = subprocess.run([*compose_cmd(), *project, "ps", "-q", "tritonserver"], capture_output=True, text=True,
                                env=env).stdout.strip()
        docker("exec", server, "python3", "-c", "open('/var/cache/tritonchat/written', 'w').write('ok')", env=daemon)
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{gw}/v1", api_key="unused", max_retries=0)
        answers = [sdk.completions.create(model="ensemble", prompt=PROMPT, max_tokens=12, temperature=0)
                   .choices[0].text for _ in range(2)]
        assert answers[0] == answers[1] and answers[0].startswith(V1[:20])
        assert redis.Redis(port=redis_port).dbsize() >= 1, "the gateway's answer is not in Redis"
        deadline = time.monotonic() + 60
        while True:
            query = urllib.parse.urlencode({"query": "up == 1"})
            body = json.load(urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/query?{query}", timeout=10))
            jobs = {r["metric"]["job"] for r in body["data"]["result"]}
            if jobs >= {"tritonserver", "tritonchat-gateway", "prometheus"}:
                break
            assert time.monotonic() < deadline, f"the stack's Prometheus sees up only for {jobs}"
            time.sleep(1)
    finally:
        subprocess.run([*compose_cmd(), *project, "down", "-v", "--timeout", "30"], capture_output=True, env=env,
                       timeout=300)


def test_gpu_image_requirements_leave_the_pytriton_server_out():
    """The GPU image installs pyproject's dependencies less nvidia-pytriton (NGC has its own server), also with
    the regex fallback that NGC 24.10's Python 3.10 (no tomllib) takes."""
    import importlib.util
    import sys
    import tomllib

    out = subprocess.run([sys.executable, str(DOCKER_DIR / "requirements.py"), str(ROOT / "pyproject.toml"),
                          "--without", "nvidia-pytriton"], capture_output=True, text=True, check=True)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    want = [d for d in deps if not d.startswith("nvidia-pytriton")]
    assert out.stdout.split("\n")[:-1] == want and len(want) == len(deps) - 1
    spec = importlib.util.spec_from_file_location("docker_requirements", DOCKER_DIR / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.tomllib = None
    assert module.dependencies((ROOT / "pyproject.toml").read_text()) == deps
