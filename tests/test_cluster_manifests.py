"""cluster/ manifests against KubeRay's CRD schemas and Ray's cluster-launcher schema; the image recipe,
the manifests and pyproject.toml agree on versions; every RayJob's command is a valid job command.

Kubernetes' API server (kubectl's default strict field validation) rejects fields a CRD does not declare,
so the schema is tightened the same way: objects with declared properties and no
``x-kubernetes-preserve-unknown-fields`` get ``additionalProperties: false``.
"""

import copy
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT.parent / "shared" / "kuberay-crds"
needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason=f"{CRDS} not present")
RAYJOBS = ["rayjob.yaml", "rayjob-sweep.yaml", "rayjob-evaluate.yaml"]


def _k8s_strict(node):
    if isinstance(node, dict):
        out = {k: _k8s_strict(v) for k, v in node.items()}
        if out.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_k8s_strict(v) for v in node]
    return node


def _validator(crd_file: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((CRDS / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _k8s_strict(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _errors(validator, manifest):
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


@needs_crds
@pytest.mark.parametrize("manifest, crd, kind", [("raycluster.yaml", "ray.io_rayclusters.yaml", "RayCluster")]
                         + [(job, "ray.io_rayjobs.yaml", "RayJob") for job in RAYJOBS])
def test_kuberay_manifests_validate(manifest, crd, kind):
    doc = yaml.safe_load((ROOT / "cluster" / manifest).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert _errors(_validator(crd), doc) == []
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token", "token authentication must stay on"
    text = (ROOT / "cluster" / manifest).read_text()
    assert "AWS_SECRET_ACCESS_KEY:" not in text and "secretRef" in text, "credentials only from Secrets"


@needs_crds
def test_a_manifest_the_operator_would_reject_fails():
    validator = _validator("ray.io_rayclusters.yaml")
    doc = yaml.safe_load((ROOT / "cluster" / "raycluster.yaml").read_text())
    typo = copy.deepcopy(doc)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    assert any("maxReplica" in e for e in _errors(validator, typo))
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    assert _errors(validator, wrong_type)
    bad_mode = copy.deepcopy(doc)
    bad_mode["spec"]["authOptions"]["mode"] = "password"
    assert _errors(validator, bad_mode)
    no_head = copy.deepcopy(doc)
    del no_head["spec"]["headGroupSpec"]
    assert _errors(validator, no_head)


def test_cluster_launcher_yaml_validates_against_ray_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    doc = yaml.safe_load((ROOT / "cluster" / "cluster-launcher.yaml").read_text())
    jsonschema.validate(doc, schema)
    bad = copy.deepcopy(doc)
    bad["max_workerz"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_sweep_rayjob_entrypoint_is_a_valid_sweep():
    """The sweep RayJob's command line parses, its config and sweep file load, and the sweep is
    checked against that config (as jobs/tune.py does before any trial starts)."""
    tune_job = _job_module("tune")

    from mpformer_ray.config import load_config
    from mpformer_ray.tune import load_sweep

    doc = yaml.safe_load((ROOT / "cluster" / "rayjob-sweep.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/tune.py"]
    args = tune_job.parse_args(argv[2:])
    cfg = load_config(str(ROOT / args.config), args.overrides)
    sweep = load_sweep(str(ROOT / args.space), cfg, num_samples=args.num_samples, max_concurrent=args.max_concurrent)
    assert sweep.num_samples == 32 and sweep.max_concurrent == 4 and cfg.train.use_gpu
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= sweep.max_concurrent * cfg.train.workers


def _job_module(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _find(node, key: str) -> list:
    """Every value of ``key`` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _find(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _find(v, key)]
    return []


def test_image_manifests_and_pyproject_agree_on_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(m.groups() for dep in project["dependencies"]
                if (m := re.fullmatch(r"([A-Za-z0-9_-]+)(?:\[[^]]*\])?==(\S+)", dep)))
    assert {"torch", "torchvision", "ray"} <= pins.keys(), project["dependencies"]
    image = f"REGISTRY/mpformer-ray:{project['version']}"

    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    ray_version, py_major, py_minor = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu", base).groups()
    assert ray_version == pins["ray"]
    min_python = tuple(map(int, re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"]).groups()))
    assert (int(py_major), int(py_minor)) >= min_python
    installs = dict(re.findall(r"\b(torch|torchvision)==(\S+)", " ".join(re.findall(r"^RUN .*", dockerfile, re.M))))
    assert installs == {"torch": pins["torch"], "torchvision": pins["torchvision"]}
    assert f"-t {image} " in dockerfile, "the build command in the Dockerfile tags the project's image"

    for manifest in ["raycluster.yaml", *RAYJOBS]:
        doc = yaml.safe_load((ROOT / "cluster" / manifest).read_text())
        assert _find(doc, "rayVersion") == [pins["ray"]], manifest
        assert set(_find(doc, "image")) == {image}, manifest
    launcher = yaml.safe_load((ROOT / "cluster" / "cluster-launcher.yaml").read_text())
    assert launcher["docker"]["image"] == image


def _pod_nodes(spec: dict) -> list[dict[str, float]]:
    """The Ray nodes a RayCluster spec makes (each worker group at maxReplicas): CPUs from num-cpus or
    the container's CPU limit, GPUs from its nvidia.com/gpu limit."""
    def node(group: dict) -> dict[str, float]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus = group["rayStartParams"].get("num-cpus", limits["cpu"])
        return {"CPU": float(cpus), "GPU": float(limits.get("nvidia.com/gpu", 0))}

    return [node(spec["headGroupSpec"])] + [node(g) for g in spec["workerGroupSpecs"] for _ in range(g["maxReplicas"])]


@pytest.mark.parametrize("manifest", RAYJOBS)
def test_every_rayjob_runs_a_valid_job_command_that_fits_its_cluster(manifest):
    """The entrypoint parses with its job's own parser and its config loads; a training job's workers
    and Ray Data fit the cluster at its maximum size (mpformer_ray.train.cluster); the evaluation job's
    driver asks for the GPU a worker pod has."""
    from mpformer_ray.config import load_config
    from mpformer_ray.train.cluster import data_cpu_problem

    doc = yaml.safe_load((ROOT / "cluster" / manifest).read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("jobs/"), argv
    name = Path(argv[1]).stem
    args = _job_module(name).parse_args(argv[2:])
    nodes = _pod_nodes(doc["spec"]["rayClusterSpec"])
    if name in ("train", "tune"):
        cfg = load_config(str(ROOT / args.config), args.overrides)
        assert data_cpu_problem(nodes, cfg) is None
        assert all(not v or v.startswith("s3://") for v in (cfg.storage.uri, cfg.data.train, cfg.data.val))
    else:
        assert name == "evaluate" and args.checkpoint.startswith("s3://") and args.data.startswith("s3://")
        assert doc["spec"]["entrypointNumGpus"] >= 1 and args.device == "cuda"
        assert any(n["GPU"] >= doc["spec"]["entrypointNumGpus"] and n["CPU"] >= doc["spec"]["entrypointNumCpus"]
                   for n in nodes)
