"""cluster/ manifests against KubeRay's CRD schemas and Ray's cluster-launcher schema.

Kubernetes' API server (kubectl's default strict field validation) rejects fields a CRD does not declare,
so the schema is tightened the same way: objects with declared properties and no
``x-kubernetes-preserve-unknown-fields`` get ``additionalProperties: false``.
"""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT.parent / "shared" / "kuberay-crds"
pytestmark = pytest.mark.skipif(not CRDS.is_dir(), reason=f"{CRDS} not present")


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


@pytest.mark.parametrize("manifest, crd, kind", [
    ("raycluster.yaml", "ray.io_rayclusters.yaml", "RayCluster"),
    ("rayjob.yaml", "ray.io_rayjobs.yaml", "RayJob"),
    ("rayjob-sweep.yaml", "ray.io_rayjobs.yaml", "RayJob"),
])
def test_kuberay_manifests_validate(manifest, crd, kind):
    doc = yaml.safe_load((ROOT / "cluster" / manifest).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert _errors(_validator(crd), doc) == []
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token", "token authentication must stay on"
    text = (ROOT / "cluster" / manifest).read_text()
    assert "AWS_SECRET_ACCESS_KEY:" not in text and "secretRef" in text, "credentials only from Secrets"


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
    import importlib.util
    import shlex

    spec = importlib.util.spec_from_file_location("tune_job", ROOT / "jobs" / "tune.py")
    tune_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune_job)

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
