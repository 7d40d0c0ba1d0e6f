"""The Indexed Job of `unetpp predict` (docker/k8s/predict-job.yaml): valid for Kubernetes, and
a command line the CLI accepts, whose shards cover the data set."""

from __future__ import annotations

import kubernetes_validate

from tests.helpers import K8S_VERSION, documents
from unetpp.cli import build_parser

NAME = "predict-job.yaml"


def job() -> dict:
    return next(d for d in documents(NAME) if d["kind"] == "Job")


def test_every_document_is_valid() -> None:
    kinds = []
    for doc in documents(NAME):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["Job", "PersistentVolumeClaim"]


def test_each_index_runs_its_own_shard_of_completions() -> None:
    spec = job()["spec"]
    assert spec["completionMode"] == "Indexed"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    (container,) = spec["template"]["spec"]["containers"]
    argv = [*container["command"][1:], *container["args"]]
    assert "$(JOB_COMPLETION_INDEX)" in argv[argv.index("--shard") + 1]
    (index_env,) = [e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert "job-completion-index" in index_env["valueFrom"]["fieldRef"]["fieldPath"]
    shards = set()
    for k in range(spec["completions"]):
        concrete = [a.replace("$(JOB_COMPLETION_INDEX)", str(k)) for a in argv]
        args = build_parser().parse_args(concrete)
        assert args.command == "predict" and args.models and args.out
        shards.add(args.shard)
    assert shards == {(k, spec["completions"]) for k in range(spec["completions"])}


def test_outputs_go_to_the_shared_volume_and_models_are_read_only() -> None:
    pod = job()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    args = container["args"]
    out = args[args.index("--out") + 1]
    assert out.startswith(mounts["data"]["mountPath"] + "/")
    assert mounts["models"]["readOnly"] is True
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    pvc = next(d for d in documents(NAME) if d["kind"] == "PersistentVolumeClaim")
    assert claims["data"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert claims["models"] == documents("models.yaml")[0]["metadata"]["name"]
    # exit 1 (bad files) fails only that index; exit 2 (usage) fails the job
    actions = {
        r["action"]: r["onExitCodes"]["values"]
        for r in job()["spec"]["podFailurePolicy"]["rules"]
        if "onExitCodes" in r
    }
    assert actions == {"FailIndex": [1], "FailJob": [2]}
    assert pod["restartPolicy"] == "Never"
