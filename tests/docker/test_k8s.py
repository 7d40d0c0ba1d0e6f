"""Kubernetes manifests validated offline against the Kubernetes OpenAPI schemas."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

from tests.helpers import K8S, K8S_VERSION, documents, drain_budget_s, start, stop
from unetpp.server.jobs import JobSettings
from unetpp.server.settings import Settings


def core_manifests() -> list[tuple[str, dict]]:
    files = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return [(f"{f}:{d['kind']}", d) for f in files for d in documents(f)]


@pytest.mark.parametrize(
    ("name", "doc"), core_manifests(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_manifest_is_valid(name: str, doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_catches_mistakes() -> None:
    deployment = documents("deployment.yaml")[0]
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_deployment_probes_limits_and_volume() -> None:
    pod = documents("deployment.yaml")[0]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert server["resources"]["requests"] and server["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {documents(f)[0]["metadata"]["name"] for f in ("models.yaml", "jobs.yaml")}
    hpa = documents("hpa.yaml")[0]
    assert (
        hpa["spec"]["scaleTargetRef"]["name"] == documents("deployment.yaml")[0]["metadata"]["name"]
    )


def test_every_replica_mounts_the_shared_jobs_directory() -> None:
    """/v1/jobs needs one directory for all replicas: a ReadWriteMany claim, mounted writable
    where UNETPP_JOBS_DIR points, with its byte limit below the claim's size."""
    (claim,) = documents("jobs.yaml")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    deployment = documents("deployment.yaml")[0]
    assert deployment["spec"]["replicas"] > 1
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    env = {e["name"]: e["value"] for e in server["env"]}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "jobs"]
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    (mount,) = [m for m in server["volumeMounts"] if m["name"] == "jobs"]
    assert mount["mountPath"] == env["UNETPP_JOBS_DIR"] and not mount.get("readOnly")
    size = claim["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi") and int(env["UNETPP_JOBS_MAX_BYTES"]) < int(size[:-2]) << 30
    JobSettings(
        **{
            k.removeprefix("UNETPP_JOBS_").lower(): v
            for k, v in env.items()
            if k.startswith("UNETPP_JOBS_")
        }
    )


def test_inference_service_pod_part_is_valid() -> None:
    """The CRD's own schema is KServe's; its predictor embeds a pod spec, checked here."""
    (isvc,) = documents("inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "predictor"},
        "spec": {
            key: predictor[key]
            for key in ("containers", "volumes", "terminationGracePeriodSeconds")
        },
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert {"name": "PROTOCOL", "value": "v2"} in container["env"]
    for pod in (predictor, documents("deployment.yaml")[0]["spec"]["template"]["spec"]):
        assert pod["terminationGracePeriodSeconds"] > drain_budget_s()
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_every_probe_is_a_route_of_the_server() -> None:
    pods = [
        documents("deployment.yaml")[0]["spec"]["template"]["spec"],
        documents("inferenceservice.yaml")[0]["spec"]["predictor"],
    ]
    probes = {
        c[probe]["httpGet"]["path"]
        for pod in pods
        for c in pod["containers"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe")
        if probe in c
    }
    assert probes >= {"/readyz", "/healthz", "/v2/health/ready", "/v2/health/live"}
    server = start(Settings(), ready=False)  # no model: alive, never ready
    try:
        answers = {path: server.client.get(path).status_code for path in probes}
    finally:
        stop(server)
    assert answers == {path: 503 if "ready" in path else 200 for path in probes}
