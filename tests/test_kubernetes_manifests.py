"""deploy/kubernetes/: every manifest is a valid resource, offline. Built-in kinds against
kubernetes-validate's bundled schemas for one pinned Kubernetes version, strictly (an unknown field is
an error); the LeaderWorkerSet against the openAPIV3Schema of its published CRD, committed under
deploy/kubernetes/schemas/. Each validator is also shown a broken copy, which it must refuse. And what
the manifests run is what our CLIs accept, with the ranks' rendezvous in torchrun's variables."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
SCHEMAS = DEPLOY / "schemas"
KUBERNETES_VERSION = "1.33.0"  # native gRPC probes (1.27+), LeaderWorkerSet's minimum is far below
CRD_SCHEMAS = {("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): SCHEMAS / "leaderworkerset.x-k8s.io_v1.json"}


def _manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def _resources() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in _manifests():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.relative_to(DEPLOY)}#{i}", doc))
    return out


def _validate(doc: dict[str, Any]) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[key].read_text())
        jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)
        if doc["kind"] == "LeaderWorkerSet":
            # A CRD's schema prunes unknown fields rather than refusing them: its pod templates are
            # checked again, strictly, as core PodTemplates.
            tmpl = doc["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                if role in tmpl:
                    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                                  "metadata": {"name": f"{doc['metadata']['name']}-{role}"},
                                                  "template": tmpl[role]}, KUBERNETES_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _by_kind(kind: str) -> dict[str, Any]:
    docs = [d for _, d in _resources() if d["kind"] == kind]
    assert docs, f"no {kind} in deploy/kubernetes"
    return docs[0]


def test_there_are_the_manifests_we_ship():
    kinds = sorted(d["kind"] for _, d in _resources())
    assert kinds == ["Deployment", "LeaderWorkerSet", "Service", "Service"]


@pytest.mark.parametrize("name,doc", _resources(), ids=[n for n, _ in _resources()])
def test_manifest_is_valid(name: str, doc: dict[str, Any]):
    _validate(doc)


def test_kustomizations_name_every_manifest():
    listed = set()
    for k in DEPLOY.rglob("kustomization.yaml"):
        spec = yaml.safe_load(k.read_text())
        for r in spec["resources"]:
            assert (k.parent / r).is_file(), f"{k}: {r}"
            listed.add((k.parent / r).resolve())
    assert listed == {p.resolve() for p in _manifests()}


def _broken_deployment() -> list[dict[str, Any]]:
    d = _by_kind("Deployment")
    unknown = copy.deepcopy(d)
    unknown["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    wrong_type = copy.deepcopy(d)
    wrong_type["spec"]["replicas"] = "two"
    no_image_name = copy.deepcopy(d)
    del no_image_name["spec"]["template"]["spec"]["containers"][1]["name"]
    return [unknown, wrong_type, no_image_name]


def _broken_lws() -> list[dict[str, Any]]:
    d = _by_kind("LeaderWorkerSet")
    bad_size = copy.deepcopy(d)
    bad_size["spec"]["leaderWorkerTemplate"]["size"] = "two"
    bad_policy = copy.deepcopy(d)
    bad_policy["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes"
    no_worker_template = copy.deepcopy(d)
    del no_worker_template["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    unknown_in_pod = copy.deepcopy(d)
    unknown_in_pod["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["imagee"] = "x"
    return [bad_size, bad_policy, no_worker_template, unknown_in_pod]


@pytest.mark.parametrize("doc", _broken_deployment() + _broken_lws(), ids=lambda d: d["kind"])
def test_a_broken_copy_fails(doc: dict[str, Any]):
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        _validate(doc)


def _containers(pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_spec["containers"]}


def _parse(container: dict[str, Any], substitutions: dict[str, str]) -> Any:
    argv = [*container["command"], *container.get("args", [])]
    for var, value in substitutions.items():
        argv = [a.replace(f"$({var})", value) for a in argv]
    module = argv[2]
    assert argv[:2] == ["python3", "-m"], argv
    if module == "scheduler_svc":
        from scheduler_svc.__main__ import parse_args

        return parse_args(argv[3:])
    assert module == "worker_svc", argv
    from worker_svc.__main__ import build_parser

    return build_parser().parse_args(argv[3:])


def test_replica_pods_run_a_linked_scheduler_and_worker_with_grpc_probes():
    spec = _by_kind("Deployment")["spec"]["template"]["spec"]
    c = _containers(spec)
    sched, worker = _parse(c["scheduler"], {}), _parse(c["worker"], {})
    assert sched.engine_address == worker.engine_address and sched.engine_address.startswith("ipc:///run/tandem/")
    assert sched.health_without_auth  # probes and client health checking carry no token
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c["scheduler"][probe]["grpc"]["port"] == 50051, probe
    assert c["worker"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    service = _by_kind("Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: dns:/// hands the client every pod
    assert service["spec"]["selector"].items() <= spec.get("labels", _by_kind("Deployment")["spec"]["template"]
                                                           ["metadata"]["labels"]).items()


def test_workers_wait_for_their_scheduler_with_a_health_check_our_cli_accepts():
    """The preStop hook that holds a worker back until its scheduler has drained runs `tandem health`."""
    import re

    from client.cli import build_parser

    hooks = [c["lifecycle"]["preStop"]["exec"]["command"] for _, d in _resources() if d["kind"] != "Service"
             for c in _pod_specs(d) if "lifecycle" in c]
    assert len(hooks) == 2  # the Deployment's worker and the leader's rank 0
    for hook in hooks:
        m = re.search(r"tandem (health [^)]*)\)", hook[-1])
        assert m, hook
        build_parser().parse_args(m.group(1).split())


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    tmpl = doc["spec"]["leaderWorkerTemplate"]
    return tmpl["leaderTemplate"]["spec"]["containers"] + tmpl["workerTemplate"]["spec"]["containers"]


def test_leaderworkerset_ranks_meet_in_torchruns_variables():
    lws = _by_kind("LeaderWorkerSet")["spec"]
    tmpl = lws["leaderWorkerTemplate"]
    size = tmpl["size"]
    leader, follower = _containers(tmpl["leaderTemplate"]["spec"]), _containers(tmpl["workerTemplate"]["spec"])
    assert set(leader) == {"scheduler", "worker"} and set(follower) == {"worker"}
    for c in (leader["worker"], follower["worker"]):
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["MASTER_ADDR"] == "$(LWS_LEADER_ADDRESS)" and env["RANK"] == "$(LWS_WORKER_INDEX)"
        assert env["WORLD_SIZE"] == "$(LWS_GROUP_SIZE)" and env["MASTER_PORT"].isdigit() and "LOCAL_RANK" in env
        args = _parse(c, {"LWS_GROUP_SIZE": str(size)})
        assert args.tensor_parallel_size == size
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    subst = {"LWS_GROUP_SIZE": str(size)}
    assert _parse(leader["scheduler"], {}).engine_address == _parse(leader["worker"], subst).engine_address
    assert tmpl["restartPolicy"] == "RecreateGroupOnPodRestart" and lws["startupPolicy"] == "LeaderCreated"
    leaders = [d for _, d in _resources() if d["kind"] == "Service" and "tandem-tp" in d["metadata"]["name"]]
    assert leaders and leaders[0]["spec"]["selector"].items() <= tmpl["leaderTemplate"]["metadata"]["labels"].items()
