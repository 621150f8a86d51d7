"""Kubernetes: every overlay renders with `kubectl kustomize` and passes `kubernetes-validate --strict` for two
Kubernetes versions (offline schemas); a broken manifest fails; the rendered objects hold the promises of
docs/deploy.md (probes, non-root, read-only root, shm, GPU, autoscaling, disruption budget, network policy,
least privilege), and the commands they run parse with the real CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBE_VERSIONS = ("1.29.0", "1.33.0")
RENDERED = ("overlays/cpu", "overlays/gpu", "overlays/gpu-shared-cache", "monitoring")
SERVERS = ("overlays/cpu", "overlays/gpu", "overlays/gpu-shared-cache")


def _tool(name: str, install: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.skip(f"{name} not found: {install}")
    return path


def render(folder: Path) -> str:
    kubectl = _tool("kubectl", "install kubectl (its `kustomize` renders offline)")
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def validate(manifest: str, tmp_path: Path, version: str) -> subprocess.CompletedProcess:
    tool = _tool("kubernetes-validate", "pip install kubernetes-validate (pyproject's test extra)")
    path = tmp_path / f"rendered-{version}.yaml"
    path.write_text(manifest)
    return subprocess.run([tool, "--strict", "--quiet", "-k", version, str(path)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def objects() -> dict:
    """{overlay: [objects]} rendered once."""
    return {name: list(yaml.safe_load_all(render(K8S / name))) for name in RENDERED}


def find(objs: list, kind: str, name: str) -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert hits, f"no {kind}/{name}"
    return hits[0]


@pytest.mark.parametrize("overlay", RENDERED)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_rendered_overlay_passes_strict_validation(overlay, version, tmp_path):
    out = validate(render(K8S / overlay), tmp_path, version)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_broken_manifest_fails_validation(tmp_path):
    broken = tmp_path / "k8s"
    shutil.copytree(K8S, broken)
    dep = broken / "base" / "triton-deployment.yaml"
    text = dep.read_text()
    for typo in (("readinessProbe:", "readinesProbe:"), ("replicas: 2", 'replicas: "two"')):
        dep.write_text(text.replace(*typo, 1))
        out = validate(render(broken / "overlays" / "cpu"), tmp_path, KUBE_VERSIONS[0])
        assert out.returncode != 0, f"{typo[1]} passed validation"
        assert "tritonchat-triton" in out.stdout + out.stderr


def _pod(objs: list, name: str) -> dict:
    return find(objs, "Deployment", name)["spec"]["template"]["spec"]


def test_pods_run_locked_down(objects):
    for overlay in SERVERS:
        for name in ("tritonchat-triton", "tritonchat-gateway"):
            pod = _pod(objects[overlay], name)
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER
            assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "tritonchat"
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert c["resources"]["limits"] and c["resources"]["requests"]
                assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp"}  # the only writable place
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "\nUSER 10001:10001\n" in dockerfile


def test_server_pod_probes_volumes_and_gpu(objects):
    for overlay in SERVERS:
        gpu = overlay.startswith("overlays/gpu")
        pod = _pod(objects[overlay], "tritonchat-triton")
        c = pod["containers"][0]
        assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        # 10 minutes to load the models before liveness may restart the pod
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        assert mounts["/models"]["readOnly"] is True
        assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["readOnly"] is True
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus == "1") == gpu, (overlay, c["resources"])
        assert c["image"].endswith(":gpu" if gpu else ":cpu")
        # the grace period outlasts serve's own drain at shutdown
        grace = pod["terminationGracePeriodSeconds"]
        assert int(c["args"][c["args"].index("--shutdown-timeout") + 1]) < grace
        # GPU pods keep the kernel's tuning and Triton's compiled kernels in one volume: the pod's own by
        # default (any cluster schedules it), one claim all pods share with components/kernel-cache
        # (docs/deploy.md)
        env = {e["name"]: e["value"] for e in c["env"]}
        if gpu:
            cache = mounts["/var/cache/tritonchat"]
            assert not cache.get("readOnly")
            volume = volumes[cache["name"]]
            for name in ("TRITONCHAT_TUNE_CACHE", "TRITON_CACHE_DIR"):
                assert env[name].startswith("/var/cache/tritonchat/"), (name, env)
            if overlay == "overlays/gpu":
                assert set(volume) == {"name", "emptyDir"}, volume
                assert not [o for o in objects[overlay] if o["kind"] == "PersistentVolumeClaim"
                            and o["spec"]["accessModes"] == ["ReadWriteMany"]]
            else:  # the emptyDir replaced by the claim, not added to
                assert set(volume) == {"name", "persistentVolumeClaim"}, volume
                pvc = find(objects[overlay], "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
                assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes
        else:
            assert "/var/cache/tritonchat" not in mounts and "TRITON_CACHE_DIR" not in env


def test_autoscaling_disruption_budget_network_policy_and_role(objects):
    objs = objects["overlays/cpu"]
    hpa = find(objs, "HorizontalPodAutoscaler", "tritonchat-triton")
    assert hpa["apiVersion"] == "autoscaling/v2"
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["target"]["averageUtilization"] == 70
    custom = metrics["Pods"]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(find(objects["monitoring"], "ConfigMap", "prometheus-adapter-tritonchat")
                             ["data"]["config.yaml"])
    assert custom in {r["name"]["as"] for r in adapter["rules"]}, "the HPA's metric has no adapter rule"
    assert find(objs, "PodDisruptionBudget", "tritonchat-triton")["spec"]["maxUnavailable"] == 1

    policy = find(objs, "NetworkPolicy", "tritonchat-triton-ingress")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
    assert sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tritonchat",
                                                        "app.kubernetes.io/component": "gateway"}}},
                       {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    role = find(objs, "Role", "tritonchat-read-logs")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]


def test_container_commands_parse_with_the_real_cli(objects, tmp_path):
    """The args the pods run are flags `tritonchat` knows (serve prints its command line instead of running)."""
    pod = _pod(objects["overlays/cpu"], "tritonchat-triton")
    args = pod["containers"][0]["args"]
    repo = tmp_path / "models"
    (repo / "m").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text('name: "m"\n')
    args = [str(repo) if a == "/models" else a for a in args]
    out = subprocess.run([sys.executable, "-m", "tritonchat.cli", *args, "--print-command"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--http-address=0.0.0.0" in out.stdout
    gw_args = _pod(objects["overlays/cpu"], "tritonchat-gateway")["containers"][0]["args"]
    help_text = subprocess.run([sys.executable, "-m", "tritonchat.cli", gw_args[0], "--help"], capture_output=True,
                               text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}).stdout
    for flag in (a for a in gw_args if a.startswith("--")):
        assert flag in help_text, f"`tritonchat {gw_args[0]}` has no {flag}"
