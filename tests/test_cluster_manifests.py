"""Every file under cluster/ is checked: KubeRay objects against KubeRay's CRD schemas (vendored with their version,
unknown fields rejected as `kubectl apply --validate=strict` does), the launcher file against Ray's own schema,
each Serve config against `ServeDeploySchema`, and what they say against each other and the Dockerfile: images,
shared storage, presets that resolve in an installed package, the index the job writes being the one the service
reads."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from trustray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY_SCHEMAS = CLUSTER / "schemas" / "kuberay-v1.7.0"
KUBERAY_FILES = ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "storage.yaml"]
CHECKED = {f"kuberay/{name}" for name in KUBERAY_FILES} | {"ray-cluster.yaml", "serve_config.yaml"}


def _documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc]


def _kuberay_objects() -> list[dict]:
    return [doc for name in KUBERAY_FILES for doc in _documents(f"kuberay/{name}") if doc["kind"].startswith("Ray")]


def _strict(schema: dict) -> dict:
    """The schema with unknown fields rejected wherever it lists the known ones (the API server would prune them
    silently; `kubectl apply --validate=strict` refuses them)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads(gzip.decompress((KUBERAY_SCHEMAS / f"{kind}.json.gz").read_bytes()))
    return jsonschema.Draft7Validator(_strict(schema))


def _pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(group, pod spec) of every pod template of a RayCluster, RayJob or RayService."""
    spec = obj["spec"]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        obj["kind"]]
    groups = [("head", cluster["headGroupSpec"])] + [(group["groupName"], group)
                                                     for group in cluster.get("workerGroupSpecs", [])]
    return [(name, group["template"]["spec"]) for name, group in groups]


def test_every_file_under_cluster_is_checked():
    found = {str(path.relative_to(CLUSTER)) for path in CLUSTER.rglob("*.yaml")}
    assert found == CHECKED, "a new file under cluster/ needs a check here"
    assert json.loads((KUBERAY_SCHEMAS / "source.json").read_text())["kuberay_version"] == "v1.7.0"


@pytest.mark.parametrize("obj", _kuberay_objects(), ids=lambda obj: obj["kind"])
def test_kuberay_objects_match_the_crd_schemas(obj):
    assert obj["apiVersion"] == "ray.io/v1"
    errors = [f"{'.'.join(map(str, error.path))}: {error.message}" for error in _validator(obj["kind"]).iter_errors(obj)]
    assert errors == []
    assert obj["spec"].get("rayClusterSpec", obj["spec"].get("rayClusterConfig", obj["spec"]))["rayVersion"] == \
        ray.__version__


def test_the_schema_check_can_fail():
    cluster = next(obj for obj in _kuberay_objects() if obj["kind"] == "RayCluster")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpec"] = typo["spec"].pop("workerGroupSpecs")
    assert not _validator("RayCluster").is_valid(typo)
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    assert not _validator("RayCluster").is_valid(wrong_type)


def test_pods_share_the_artifact_volume_and_use_the_dockerfile_images():
    (claim,) = _documents("kuberay/storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-${{VARIANT}}" in dockerfile
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    for obj in _kuberay_objects():
        for group, pod in _pod_specs(obj):
            volumes = {volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName")
                       for volume in pod.get("volumes", [])}
            for container in pod["containers"]:
                gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                # Heads run no work and carry no GPU packages; GPU workers get the gpu variant.
                assert container["image"] == ("trustray:gpu" if gpus else "trustray:cpu"), (obj["kind"], group)
                assert group != "head" or not gpus
                mounts = {mount["mountPath"]: volumes.get(mount["name"]) for mount in container["volumeMounts"]}
                assert mounts.get("/data") == claim["metadata"]["name"], (obj["kind"], group)


def test_the_launcher_file_matches_rays_schema_and_keeps_gpu_packages_off_the_head():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(launcher, schema)
    assert "[gpu]" not in " ".join(launcher["head_setup_commands"]) and "-cpu" in launcher["docker"]["head_image"]
    assert "[gpu]" in " ".join(launcher["worker_setup_commands"])
    assert any("/data" in command for command in launcher["initialization_commands"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**launcher, "head_node_typ": "head"}, schema)


def test_serve_configs_validate_and_the_rayservice_embeds_serve_config_yaml(tmp_path, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from trustray.pipelines import pipeline_module
    from trustray.serve_apps.config import ServeConfig

    serve_config = yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())
    (service,) = [obj for obj in _kuberay_objects() if obj["kind"] == "RayService"]
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == serve_config
    (application,) = ServeDeploySchema.model_validate(serve_config).applications
    assert application.import_path == "trustray.serve_apps.openai_app:app_builder"
    # An installed package run from any directory (a pod's) resolves the preset and applies the overrides.
    monkeypatch.chdir(tmp_path)
    served = load_config(ServeConfig, application.args["config"], application.args["overrides"])
    (job,) = [obj for obj in _kuberay_objects() if obj["kind"] == "RayJob"]
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "trustray.pipelines.build_index"]
    at = command.index("--config")
    index = load_config(pipeline_module("build_index").PIPELINE["config"], command[at + 1],
                        command[3:at] + command[at + 2:])
    assert served.rag.index_dir == index.output_dir and index.output_dir.startswith("/data/")
