"""deploy/k8s renders (``kubectl kustomize``, offline) and validates against the Kubernetes schemas
(kubernetes-validate, strict), and says what the deployment promises: probes, non-root, read-only
root filesystem, secrets for the key and the database URL, GPUs only in the gpu overlay."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBE_VERSION = "1.33.0"  # a current Kubernetes minor; the schemas ship inside kubernetes-validate
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (.ci/run installs it)")


def render(overlay: str) -> dict[str, dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out) if doc}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlay_renders_and_validates_strictly(overlay: str) -> None:
    docs = render(overlay)
    expected = {"ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service"}
    assert expected | {"HorizontalPodAutoscaler", "PodDisruptionBudget"} == set(docs)
    for doc in docs.values():
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)  # raises on any schema error


def test_a_broken_manifest_is_caught_by_the_validator() -> None:
    deployment = render("cpu")["Deployment"]
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_deployment_is_probed_hardened_and_wired(overlay: str) -> None:
    docs = render(overlay)
    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/state", "/data"} <= mounts  # the only writable paths are volumes
    secret = docs["Secret"]
    assert {"PROMPTDISTILL_API_KEY", "PROMPTDISTILL_DATABASE_URL"} <= set(secret["stringData"])
    refs = [e.get("secretRef", {}).get("name") for e in container["envFrom"]]
    assert secret["metadata"]["name"] in refs
    config = docs["ConfigMap"]["data"]
    assert config["PROMPTDISTILL_HOST"] == "0.0.0.0"
    assert config["PROMPTDISTILL_DEVICE"] == overlay.replace("gpu", "cuda")
    labels = pod["metadata"]["labels"]
    selectors = (docs["Service"]["spec"]["selector"], docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
    for selector in selectors:
        assert selector.items() <= labels.items()
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == "1") == (overlay == "gpu")
    assert container["image"] == f"promptdistill:{overlay}"
