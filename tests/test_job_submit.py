"""``ray job submit`` against a real local head with token authentication on (slow).

The head runs as ``RAY_AUTH_MODE=token ray start --head --block``; the client gets the token
through ``RAY_AUTH_MODE=token`` plus ``RAY_AUTH_TOKEN`` (or ``RAY_AUTH_TOKEN_PATH`` / the
default ``~/.ray/auth_token``). A submit without a token, or with a wrong one, is refused.

Teardown stops only the head this test started (its ``ray start --block`` process group), never
with ``ray stop``: that command stops every Ray process on the machine, other sessions' included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import client_env

from mpformer_ray.config import load_config, with_classes
from mpformer_ray.data.coco import convert_coco
from mpformer_ray.data.records import read_manifest
from mpformer_ray.model import build_model
from mpformer_ray.train.checkpoint import Checkpoint, save_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TINY = [
    "model.dec_layers=2", "model.enc_layers=1", "model.num_queries=8", "model.hidden_dim=32", "model.nheads=2",
    "model.dim_feedforward=64", "model.enc_dim_feedforward=64", "model.mask_dim=32", "model.train_num_points=256",
    "data.test_short_side=64", "data.test_max_size=64",
]


def _submit(ray_head, env: dict, entrypoint: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--working-dir", str(ROOT),
         "--", *entrypoint], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_submit_without_or_with_wrong_token_is_refused(ray_head):
    entry = ["python", "-c", "print('should not run')"]
    no_token = _submit(ray_head, client_env(ray_head["home"]), entry)
    assert no_token.returncode != 0
    assert "Unauthorized" in no_token.stderr or "Authentication" in no_token.stderr
    wrong = _submit(ray_head, client_env(ray_head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token"),
                    entry)
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stderr
    assert "should not run" not in no_token.stdout + wrong.stdout


def test_submit_evaluate_job_with_token(ray_head, synthetic_coco, tmp_path):
    val = str(tmp_path / "val")
    convert_coco(str(synthetic_coco), "val", val, task="panoptic", shard_size=2, num_workers=1, progress=False)
    classes = read_manifest(val)["classes"]
    cfg = with_classes(load_config("tiny", TINY + [f"data.val={val}"]), classes)
    torch.manual_seed(0)
    state = Checkpoint(iteration=1, model=build_model(cfg).state_dict(), config=cfg.to_dict(), classes=classes)
    save_checkpoint(state, str(tmp_path / "run"))
    # the token from a file, the way a workstation keeps it (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)
    token_file = tmp_path / "token"
    token_file.write_text(ray_head["token"])
    env = client_env(ray_head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    proc = _submit(ray_head, env, ["python", "jobs/evaluate.py", "--checkpoint", str(tmp_path / "run"),
                                   "--max-images", "2", "--device", "cpu"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    start = proc.stdout.index("{")
    metrics = json.loads(proc.stdout[start:proc.stdout.index("}", start) + 1])
    assert metrics["num_images"] == 2 and "panoptic/PQ" in metrics


def test_submit_train_job_with_token(ray_head, tmp_path):
    """The product's main job through `ray job submit`: synthetic data generated on first use,
    2 workers at 0.5 CPU on the head's 2 CPUs, checkpoints and a final evaluation."""
    env = client_env(ray_head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray_head["token"])
    sets = TINY + [
        f"data.synthetic.root={tmp_path / 'synthetic'}", "data.synthetic.num_train=8", "data.synthetic.num_val=2",
        "data.synthetic.image_size=64", "data.crop_size=[64,64]", "train.batch_size=2", "train.max_iters=4",
        "train.log_period=2", "train.checkpoint_period=2", "train.eval_period=0", f"storage.uri={tmp_path / 'runs'}",
        "run.name=submitted",
    ]
    proc = _submit(ray_head, env, ["python", "jobs/train.py", *[a for s in sets for a in ("--set", s)]])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "iter 4/4" in out and "final metrics" in out and "panoptic/PQ" in out
    pointer = json.loads((tmp_path / "runs" / "submitted" / "checkpoints" / "latest.json").read_text())
    assert pointer["iteration"] == 4 and pointer["latest"] == "model_0000004.pth"


def test_storage_options_set_in_the_driver_reach_the_clusters_workers(ray_head, tmp_path):
    """A driver joining a running cluster sets ``storage.region`` once (from its config); Ray's workers, which
    were started before it with an environment of their own, see the same options: tasks and Ray Data's."""
    script = """
import json, ray
from mpformer_ray import storage
from mpformer_ray.config import load_config
from mpformer_ray.train.trainer import init_ray

storage.configure(load_config("tiny", ["storage.region=eu-west-3"]).storage)
assert not init_ray()

@ray.remote(num_cpus=0)
def probe():
    return storage.options().region, storage.resolve("s3://bucket/key")[0].region

rows = ray.data.range(2).map(lambda row: {"region": storage.resolve("s3://bucket/key")[0].region}).take_all()
print("REGIONS", json.dumps([*ray.get(probe.remote()), *[r["region"] for r in rows]]))
"""
    env = client_env(ray_head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray_head["token"],
                     RAY_ADDRESS=ray_head["gcs"])
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("REGIONS ")]
    assert json.loads(line[len("REGIONS "):]) == ["eu-west-3"] * 4
