"""The deployment assets a platform team applies: the Dockerfiles (hadolint), the Kubernetes manifests (rendered by
kustomize where kubectl is installed, validated against the Kubernetes API schemas offline) and the compose stack;
and for both, that every KEEL_* variable they set is a setting Keel accepts, with the value they give it."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "infra" / "docker").glob("*.Dockerfile"))
K8S = ROOT / "infra" / "k8s"
COMPOSE = ROOT / "infra" / "compose" / "compose.yaml"
K8S_VERSION = "1.33"


def keel_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """The settings Keel builds from these variables (a KEEL_* name Keel does not know is refused)."""
    from app.settings import Settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(home=Path("/data/keel"))


def test_dockerfiles_pass_hadolint() -> None:
    assert {p.name for p in DOCKERFILES} == {"api.Dockerfile", "vllm-cpu.Dockerfile"}
    hadolint = Path(sys.executable).with_name("hadolint")
    out = subprocess.run([str(hadolint), "--failure-threshold", "info", *map(str, DOCKERFILES)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_api_image_runs_as_a_user_with_a_health_check() -> None:
    text = (ROOT / "infra" / "docker" / "api.Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]  # the runtime stage
    assert re.search(r"^USER 10001$", final, re.M) and "HEALTHCHECK" in final and "/healthz" in final
    for folder in re.findall(r"^COPY (\S+) \1$", text, re.M):  # the sources it copies exist
        assert (ROOT / folder).exists(), folder


def manifests() -> list[dict]:
    """The kustomization rendered (kubectl), or its resources as written where kubectl is not installed; plus the
    fine-tuning worker Job and the example Secret, which are applied by hand."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        docs = list(yaml.safe_load_all(out.stdout))
    else:
        listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
        docs = [d for f in listed for d in yaml.safe_load_all((K8S / f).read_text())]
    for extra in ("finetune-worker-job.yaml", "secret.example.yaml"):
        docs += list(yaml.safe_load_all((K8S / extra).read_text()))
    return [d for d in docs if d]


def test_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    docs = manifests()
    kinds = sorted(f"{d['kind']}/{d['metadata'].get('name') or d['metadata']['generateName']}" for d in docs)
    assert kinds == ["Deployment/keel-api", "Deployment/keel-vllm", "HorizontalPodAutoscaler/keel-api",
                     "Job/keel-finetune-worker-", "PersistentVolumeClaim/keel-home", "PodDisruptionBudget/keel-api",
                     "Secret/keel", "Service/keel-api", "Service/keel-vllm"]
    for doc in docs:
        checked = copy.deepcopy(doc)
        checked["metadata"].setdefault("name", checked["metadata"].get("generateName", "x") + "0")  # generateName
        kubernetes_validate.validate(checked, K8S_VERSION, strict=True)


def test_the_api_workload_is_probed_bounded_and_fed_its_secrets(monkeypatch) -> None:
    docs = {(d["kind"], d["metadata"].get("name")): d for d in manifests()}
    api = docs[("Deployment", "keel-api")]
    pod = api["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = docs[(kind, "keel-api")]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    assert docs[("HorizontalPodAutoscaler", "keel-api")]["spec"]["scaleTargetRef"]["name"] == "keel-api"
    assert docs[("HorizontalPodAutoscaler", "keel-api")]["spec"]["minReplicas"] >= 2
    secret_refs = [e for e in container["env"] if "valueFrom" in e]
    assert {e["name"] for e in secret_refs} >= {"KEEL_DATABASE_URL"}  # the password never sits in a manifest
    env = {e["name"]: e.get("value", "postgresql://keel:pw@db:5432/keel") for e in container["env"]}
    settings = keel_settings(env, monkeypatch)
    assert settings.auth.url is not None and settings.jobs.url is not None and settings.rag.store == "qdrant"
    assert settings.backends["local"].base_url == "http://keel-vllm:8000/v1"
    assert settings.backends["local"].managed is None  # a URL: Keel connects, it does not start a server
    # the schema is brought to this release before the API container starts, with the API's stores
    [migrate] = pod["spec"]["initContainers"]
    assert migrate["command"] == ["keel", "migrate"] and migrate["volumeMounts"] == container["volumeMounts"]
    init_env = {e["name"]: e.get("value", "postgresql://keel:pw@db:5432/keel") for e in migrate["env"]}
    init = keel_settings(init_env, monkeypatch)
    for store in ("auth", "evals", "monitor", "releases", "prompts", "jobs"):
        assert getattr(settings, store).url == getattr(init, store).url, store
    assert init.rag.store == settings.rag.store and init.rag.url == settings.rag.url
    vllm = docs[("Deployment", "keel-vllm")]["spec"]["template"]["spec"]["containers"][0]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_compose_stack_is_complete_and_consistent(monkeypatch) -> None:
    stack = yaml.safe_load(COMPOSE.read_text())
    services = stack["services"]
    assert {"keel-a", "keel-b", "finetune-worker", "proxy", "vllm", "postgres", "qdrant", "mlflow",
            "otel-collector", "prometheus", "grafana"} <= set(services)
    here = COMPOSE.parent
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            assert (here / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if "models" in source:
                    continue  # made by `keel model prepare` on the host
                assert (here / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in stack["volumes"], f"{name} mounts undeclared volume {source}"
    upstreams = re.findall(r"server (\S+):8000", (here / "nginx.conf").read_text())
    assert upstreams == ["keel-a", "keel-b"]
    targets = yaml.safe_load((here / "prometheus.yml").read_text())["scrape_configs"]
    assert {t.split(":")[0] for job in targets for c in job["static_configs"] for t in c["targets"]} == {
        "keel-a", "keel-b", "vllm"}
    env = {k: v.replace("${POSTGRES_PASSWORD:-keel-dev-only}", "pw")
           for k, v in services["keel-a"]["environment"].items()}
    settings = keel_settings(env, monkeypatch)
    assert settings.auth.url is not None and settings.prompts.url is not None and settings.jobs.url is not None
    assert settings.rag.url == "http://qdrant:6333" and settings.otel.endpoint == "http://otel-collector:4318"
    assert settings.finetune.tracking_uri == "http://mlflow:5000"
