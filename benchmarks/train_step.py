"""Training-step time and peak memory of MP-Former (r50 preset) against Hugging Face's Mask2Former.

Configurations (peak memory: each alone in a fresh subprocess; step times: see "Comparisons" below):
  ours-pilot-off   r50 preset with model.pilot.enabled=false (plain Mask2Former)
  ours-pilot-g1    r50 preset, pilot on, G=1 (the authors' default)
  ours-pilot-g3    r50 preset, pilot on, G=3
  hf-mask2former   transformers' Mask2FormerForUniversalSegmentation with the equivalent ResNet-50 config
                   (random init, 100 queries, 9 decoder layers, hidden 256, 6 encoder layers, 12544 points,
                   loss weights 2/5/5); needs the benchmark-only extra ``pip install transformers``

A training step is forward + backward + gradient clipping + fused AdamW step on the same random batch (a few
random masks per image).

Comparisons: each goal compares two configurations, pilot off vs G=1, pilot off vs G=3 and G=1 vs the
peer, timed alternating round by round so that machine drift (clock boost, neighbours on a shared host)
hits both alike. Each model runs in a worker process of its own, as users run one, and the workers take
turns: alternating two models inside one process changed both models' speed on the 2-core CPU, and
unevenly (glibc's malloc adapts its mmap threshold to all the allocations it sees; page faults took up
to half of the peer's step alone and less beside our model, ours more beside the peer). Pilot off is
timed as the piloted model's own step with its pilot switched off (same weights, same memory): two
instances of one model differ by up to 3% in speed on a CPU.

Eval-mode inference (``model(images)`` including post-processing) is timed for the pilot-off and pilot-on
models, alternating, with identical weights: the pilot must cost nothing at inference, and the script
checks that both produce identical outputs. Because whole-step times of one configuration
vary by several percent on a shared machine, the pilot's cost is also measured where it arises: the
transformer decoder, the criterion and their backward, from fixed pixel-decoder features, pilot off and
G=1 alternating.

    python benchmarks/train_step.py                      # GPU if present, else a small CPU run
    python benchmarks/train_step.py --device cuda --size 512 --batch 2 --iters 20 --json out.json
    python benchmarks/train_step.py --device cpu --size 512 --iters 10 --warmup 4 --json out.json   # README's CPU run
    python benchmarks/train_step.py --profile ours-pilot-g1    # only a torch.profiler table of one step
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray.model.criterion import total_loss  # noqa: E402 (needs the path above)

OURS = {
    "ours-pilot-off": ["model.pilot.enabled=false"],
    "ours-pilot-g1": ["model.pilot.enabled=true", "model.pilot.groups=1"],
    "ours-pilot-g3": ["model.pilot.enabled=true", "model.pilot.groups=3"],
}
PEER = "hf-mask2former"
INFERENCE = ("ours-pilot-off", "ours-pilot-g1")
# (first, second): each pair's steps are timed alternating, each model in its worker process; goal ratios
# are second / first
PAIRS = (("ours-pilot-off", "ours-pilot-g1"), ("ours-pilot-off", "ours-pilot-g3"), (PEER, "ours-pilot-g1"))
GOALS = {"step_vs_peer": 0.8, "pilot_g1_overhead": 0.05, "inference_change": 0.03}


def random_batch(batch: int, size: int, num_classes: int, device: torch.device, seed: int = 0):
    """Images [B, 3, S, S] and per image 3-6 random rectangles (labels in [0, num_classes))."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(3, 7, (1,), generator=g))
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for i in range(n):
            y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            h, w = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
            masks[i, y0:y0 + h, x0:x0 + w] = True
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    return images.to(device), targets


def build_peer(num_classes: int, cfg_model):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    backbone = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, use_pretrained_backbone=False, num_labels=num_classes,
        num_queries=cfg_model.num_queries, hidden_dim=cfg_model.hidden_dim, feature_size=cfg_model.hidden_dim,
        mask_feature_size=cfg_model.mask_dim, num_attention_heads=cfg_model.nheads,
        dim_feedforward=cfg_model.dim_feedforward, encoder_feedforward_dim=cfg_model.enc_dim_feedforward,
        encoder_layers=cfg_model.enc_layers,
        decoder_layers=cfg_model.dec_layers + 1,  # HF counts the prediction from the query init as a layer
        train_num_points=cfg_model.train_num_points, oversample_ratio=cfg_model.oversample_ratio,
        importance_sample_ratio=cfg_model.importance_sample_ratio, class_weight=cfg_model.class_weight,
        mask_weight=cfg_model.mask_weight, dice_weight=cfg_model.dice_weight,
        no_object_weight=cfg_model.no_object_weight,
    )
    return Mask2FormerForUniversalSegmentation(config)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _alternate(measures: dict, warmup: int, iters: int) -> dict[object, list]:
    """Call every measure (key -> no-argument function returning a figure) once per round, the order
    reversed every other round so that neither goes first throughout; the figures of the ``iters``
    rounds after ``warmup`` per key."""
    keys = list(measures)
    figures: dict[object, list] = {k: [] for k in keys}
    for i in range(warmup + iters):
        for k in keys if i % 2 else keys[::-1]:
            figure = measures[k]()
            if i >= warmup:
                figures[k].append(figure)
    return figures


class Subject:
    """One configuration's model, optimizer and batch; ``step()`` is a training step, ``infer()`` eval-mode
    inference with post-processing (returns its outputs)."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device):
        from mpformer_ray.config import load_config

        self.name, self.device = name, device
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        # COCO panoptic's 133 classes: the r50 preset takes its classes from the data
        self.cfg = cfg = load_config("r50", ["model.num_classes=133", *OURS.get(name, [])])
        torch.manual_seed(0)  # pilot-off and pilot-on models get identical weights (the pilot is built last)
        if name == PEER:
            self.model = build_peer(cfg.model.num_classes, cfg.model).to(device)
        else:
            from mpformer_ray.model import build_model

            self.model = build_model(cfg).to(device)
        self.images, self.targets = random_batch(args.batch, args.size, cfg.model.num_classes, device)
        self.peer_kwargs = {"mask_labels": [t["masks"].float() for t in self.targets],
                            "class_labels": [t["labels"] for t in self.targets]} if name == PEER else {}
        # the same optimizer for both models, fused as in our training loop
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.params = sum(p.numel() for p in self.model.parameters())

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def step(self, pilot: bool = True) -> None:
        """One training step; ``pilot=False`` runs it with this model's pilot queries switched off."""
        if not pilot and getattr(self.model, "pilot", None) is not None:
            module, self.model.pilot = self.model.pilot, None
            try:
                return self.step()
            finally:
                self.model.pilot = module
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            if self.name == PEER:
                loss = self.model(pixel_values=self.images, **self.peer_kwargs).loss
            else:
                loss = total_loss(self.model(self.images, self.targets))
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def infer(self):
        self.model.eval()
        with torch.no_grad(), self.autocast():
            return self.model(self.images)


def _digest(outputs) -> str:
    """SHA-256 of nested outputs (dicts / lists / tensors / numbers): equal digests = bit-identical outputs,
    comparable across processes."""
    h = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x):
                h.update(f"K{k}".encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"V{x!r}".encode())

    feed(outputs)
    return h.hexdigest()


def memory_worker(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Peak memory of ``warmup + 1`` training steps of one configuration, alone in this process."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    subject = Subject(name, args, device)
    for _ in range(args.warmup + 1):
        subject.step()
    _sync(device)
    result = {"config": name, "params": subject.params, "ops_per_step": count_ops(subject.step)}
    if device.type == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["sync_sites"] = sync_sites(subject.step, device)
        result["syncs_per_step"] = sum(result["sync_sites"].values())
    else:
        result["peak_rss_delta_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return result


def count_ops(fn) -> int:
    """How many tensor ops (ATen calls that compute, i.e. not views) ``fn`` issues, forward, backward and
    optimizer together. Where a step is bound by the host issuing kernels (r50 at batch 2 on an H100),
    each costs host time whatever its size, so this count is the device-independent part of the cost."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return counter.n


def sync_sites(fn, device: torch.device) -> dict[str, int]:
    """Where and how often ``fn`` makes the host wait for the GPU (reading a device value, a blocking
    copy), as {"file:line": count}: each wait lets the GPU run dry while the host catches up, in a step
    bound by issuing kernels."""
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                    if "synchroniz" in str(w.message)))


def serve(name: str, args: argparse.Namespace, device: torch.device) -> None:
    """One configuration's model in this process, measured on request: reads one command per line on
    stdin ("step", "step-nopilot": a training step with the pilot switched off, "infer", "digest": of the
    inference outputs) and answers each with a "REPLY <json>" line (seconds, or the digest)."""
    subject = Subject(name, args, device)
    commands = {"step": subject.step, "step-nopilot": functools.partial(subject.step, pilot=False),
                "infer": subject.infer}
    print("READY", flush=True)
    for line in sys.stdin:
        command = line.strip()
        reply = _digest(subject.infer()) if command == "digest" else _timed_call(commands[command], device)
        print("REPLY " + json.dumps(reply), flush=True)


class Server:
    """A ``serve`` worker process: one configuration's model, stepped when the main process asks."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name = name
        self.proc = subprocess.Popen(_worker_cmd("serve", args, [name]), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self._read("READY")

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise SystemExit(f"benchmark worker for {self.name} exited with {self.proc.wait()} (its stderr is above)")

    def call(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("REPLY "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def time_group(names: list[str], args: argparse.Namespace) -> dict:
    """Step times of the given configurations (a pair, normally), alternating round by round, each model
    in a worker process of its own; with pilot off and G=1 among them, first eval-mode inference of the
    two, alternating, on freshly built models with identical weights, and whether their outputs are
    bit-identical. Pilot off against a piloted configuration is the piloted model's own step with its
    pilot switched off. Why one process per model and the toggle: "Comparisons" in the module docstring."""
    piloted = next((n for n in names if n in OURS and n != "ours-pilot-off"), None)
    toggled = "ours-pilot-off" in names and piloted is not None
    servers: dict[str, Server] = {}
    try:
        for name in names:
            if not (toggled and name == "ours-pilot-off"):
                servers[name] = Server(name, args)
        results: dict = {name: {} for name in names}
        if set(INFERENCE) <= set(names):  # then pilot off is toggled, and its own model serves inference only
            servers["ours-pilot-off"] = Server("ours-pilot-off", args)
            pair = [servers[n] for n in INFERENCE]
            results["inference_outputs_identical"] = len({s.call("digest") for s in pair}) == 1
            times = _alternate({s.name: functools.partial(s.call, "infer") for s in pair}, args.warmup, args.iters)
            for name, ts in times.items():
                results[name].update(infer_s_median=statistics.median(ts), infer_s_all=ts)
            servers.pop("ours-pilot-off").close()  # frees its memory before the steps
        measures = {name: functools.partial(servers[name].call, "step") for name in servers}
        if toggled:
            measures["ours-pilot-off"] = functools.partial(servers[piloted].call, "step-nopilot")
        steps = _alternate(measures, args.warmup, args.iters)
    finally:
        for server in servers.values():
            server.close()
    for name, ts in steps.items():
        results[name].update(step_s_median=statistics.median(ts), step_s_mean=statistics.fmean(ts), step_s_all=ts)
    return results


def pilot_breakdown(args: argparse.Namespace, device: torch.device) -> dict:
    """What pilot training adds to the parts it touches, measured apart from the backbone and pixel decoder
    (identical with and without pilot, and most of a step): transformer decoder forward, criterion, and
    their backward, from fixed pixel-decoder features, pilot off and G=1 alternating. Seconds, medians."""
    subject = Subject("ours-pilot-g1", args, device)
    model = subject.model
    model.train()
    with torch.no_grad(), subject.autocast():
        mask_features, multi_scale = model.pixel_decoder(model.backbone(subject.images))

    def run(pilot_on: bool) -> tuple[float, float, float]:
        features = mask_features.clone().requires_grad_()
        scales = [x.clone().requires_grad_() for x in multi_scale]
        _sync(device)
        t0 = time.perf_counter()
        with subject.autocast():
            out = model.decode_features(features, scales, subject.targets if pilot_on else None,
                                        tuple(subject.images.shape[-2:]))
            _sync(device)
            t1 = time.perf_counter()
            loss = total_loss(model.criterion(out, subject.targets))
        _sync(device)
        t2 = time.perf_counter()
        loss.backward()
        _sync(device)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    times = _alternate({False: functools.partial(run, False), True: functools.partial(run, True)},
                       args.warmup, args.iters)
    out = {}
    for on, rs in times.items():
        key = "pilot_g1" if on else "pilot_off"
        for k, part in enumerate(("decoder_s", "criterion_s", "backward_s")):
            out[f"{key}_{part}"] = statistics.median(r[k] for r in rs)
        out[f"{key}_total_s"] = statistics.median(sum(r) for r in rs)
    out["added_s"] = out["pilot_g1_total_s"] - out["pilot_off_total_s"]
    return out


def profile(name: str, args: argparse.Namespace, device: torch.device) -> None:
    """Print where one configuration's training step time goes (top ops by self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    subject = Subject(name, args, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    subject.step()
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(2):
            subject.step()
            _sync(device)
    # On a GPU both views matter: device time says which kernels are slow, CPU time whether the host
    # (launches, syncs, the Hungarian matcher) keeps the device waiting.
    keys = ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else [])
    for key in keys:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=30, max_shapes_column_width=80),
              flush=True)


def _worker_cmd(worker: str, args: argparse.Namespace, names: list[str]) -> list[str]:
    return [sys.executable, __file__, "--worker", worker, "--device", args.device, "--size", str(args.size),
            "--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--amp", args.amp, "--configs", *names]


def _run_subprocess(worker: str, args: argparse.Namespace, names: list[str]) -> dict:
    proc = subprocess.run(_worker_cmd(worker, args, names), stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"benchmark worker {worker} exited with {proc.returncode} (its stderr is above)")
    return json.loads(lines[-1][len("RESULT "):])


def summarize(results: dict[str, dict], timings: dict[tuple[str, str], dict]) -> dict:
    """Goal figures, each from the pair of configurations timed together (None where a pair is missing):
    ratios of medians, and medians of per-round ratios ("_paired").

    Goals are judged on the paired figures. The two calls of a round run back to back, so a slow phase
    of the machine that lasts several rounds slows both alike and cancels in their ratio; the ratio of
    medians does not cancel it. On the H100 virtual machine one configuration's steps ranged from 109 to
    202 ms within a run, in phases of several rounds, and the ratio of medians put G=3 (strictly more
    work) below G=1 in two of three runs."""
    def ratio(first: str, second: str, key: str = "step_s_all") -> tuple[float, float] | None:
        t = timings.get((first, second))
        if not t or key not in t[first] or key not in t[second]:
            return None
        a, b = t[first][key], t[second][key]
        return statistics.median(b) / statistics.median(a), statistics.median(y / x for x, y in zip(a, b))

    out: dict = {}
    for key, r, offset in (("step_vs_peer", ratio(PEER, "ours-pilot-g1"), 0.0),
                           ("pilot_g1_overhead", ratio("ours-pilot-off", "ours-pilot-g1"), 1.0),
                           ("pilot_g3_overhead", ratio("ours-pilot-off", "ours-pilot-g3"), 1.0),
                           ("inference_change", ratio(*INFERENCE, key="infer_s_all"), 1.0)):
        if r:
            out[key], out[f"{key}_paired"] = r[0] - offset, r[1] - offset
    if "step_vs_peer" in out and "pilot_g1_overhead" in out:
        # off / peer = (off / G=1, from their pair) x (G=1 / peer, from theirs)
        out["step_vs_peer_pilot_off"] = out["step_vs_peer"] / (1 + out["pilot_g1_overhead"])
    ops_off = results.get("ours-pilot-off", {}).get("ops_per_step")
    ops_g1 = results.get("ours-pilot-g1", {}).get("ops_per_step")
    if ops_off and ops_g1:
        out["pilot_g1_added_ops"] = ops_g1 / ops_off - 1

    def judged(key: str, ok) -> bool | None:
        return ok(out[f"{key}_paired"]) if f"{key}_paired" in out else None

    out["goals_met"] = {
        "step <= 0.8x peer": judged("step_vs_peer", lambda v: v <= GOALS["step_vs_peer"]),
        "pilot G=1 overhead <= 5%": judged("pilot_g1_overhead", lambda v: v <= GOALS["pilot_g1_overhead"]),
        "inference within 3%": judged("inference_change", lambda v: abs(v) <= GOALS["inference_change"]),
    }
    return out


def print_table(results: dict[str, dict], summary: dict, args: argparse.Namespace) -> None:
    mem_key, mem_label = ("peak_mem_mib", "peak GPU MiB") if args.device.startswith("cuda") else \
        ("peak_rss_delta_mib", "peak RSS delta MiB")
    print(f"\ndevice={args.device} batch={args.batch} size={args.size}^2 amp={args.amp} "
          f"iters={args.iters} warmup={args.warmup}")
    print(f"{'config':<18}{'params':>12}{'step ms (median)':>18}{'img/s':>8}{mem_label:>22}{'infer ms':>12}"
          f"{'ops/step':>10}{'syncs/step':>12}")
    for name, r in results.items():
        infer = f"{1000 * r['infer_s_median']:.1f}" if "infer_s_median" in r else "-"
        print(f"{name:<18}{r['params']:>12,}{1000 * r['step_s_median']:>18.1f}{args.batch / r['step_s_median']:>8.2f}"
              f"{r.get(mem_key, 0):>22.0f}{infer:>12}{r.get('ops_per_step', '-'):>10}"
              f"{r.get('syncs_per_step', '-'):>12}")
    print()
    for key in ("step_vs_peer", "step_vs_peer_paired", "step_vs_peer_pilot_off", "pilot_g1_overhead",
                "pilot_g1_overhead_paired", "pilot_g3_overhead", "pilot_g3_overhead_paired", "pilot_g1_added_ops",
                "inference_change", "inference_change_paired"):
        if summary.get(key) is not None:
            signed = any(w in key for w in ("overhead", "change", "added"))  # relative changes print with their sign
            print(f"{key:<26}{summary[key]:+.3f}" if signed else f"{key:<26}{summary[key]:.3f}")
    if "pilot_breakdown" in summary:
        b = summary["pilot_breakdown"]
        print(f"pilot G=1 adds {1000 * b['added_s']:.0f} ms to decoder + criterion + backward "
              f"({1000 * b['pilot_off_total_s']:.0f} -> {1000 * b['pilot_g1_total_s']:.0f} ms from fixed pixel-decoder "
              f"features) = {summary['pilot_g1_added_share_of_step']:+.3f} of a pilot-off step")
    for name, r in results.items():
        if r.get("sync_sites"):
            print(f"host waits for the GPU in a step of {name}: "
                  + ", ".join(f"{site} x{n}" for site, n in sorted(r["sync_sites"].items(), key=lambda x: -x[1])[:8]))
    if summary.get("inference_outputs_identical") is not None:
        print(f"inference outputs of pilot-off and pilot-on G=1 identical: {summary['inference_outputs_identical']}")
    for goal, met in summary["goals_met"].items():
        print(f"goal {goal:<28}{'n/a' if met is None else ('met' if met else 'MISSED')} (paired figure)")


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--size", type=int, default=None, help="square image side (default 512 on GPU, 128 on CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 5 on GPU, 3 on CPU, where the first steps run up to 40%% slower)")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default=None,
                   help="autocast dtype for both models (default bf16 on GPU, off on CPU)")
    p.add_argument("--no-peer", action="store_true", help="skip the Hugging Face model")
    p.add_argument("--profile", default=None, choices=[*OURS, PEER],
                   help="only print a torch.profiler table of this configuration's training step")
    p.add_argument("--configs", nargs="+", default=None, choices=[*OURS, PEER],
                   help="configurations to measure (default: all)")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.size = args.size or (512 if on_gpu else 128)
    args.iters = args.iters or (20 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 3)
    args.amp = args.amp or ("bf16" if on_gpu else "off")
    if args.size % 32:
        p.error(f"--size must be divisible by 32, got {args.size}")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    names = args.configs or [*OURS] + ([] if args.no_peer else [PEER])
    if args.worker == "serve":
        serve(names[0], args, device)
        return
    if args.worker == "pilot-breakdown":
        print("RESULT " + json.dumps(pilot_breakdown(args, device)), flush=True)
        return
    if args.worker:
        print("RESULT " + json.dumps(memory_worker(args.worker, args, device)), flush=True)
        return
    if args.profile:
        profile(args.profile, args, device)
        return
    results: dict[str, dict] = {}
    for name in names:
        print(f"peak memory: {name} ...", file=sys.stderr, flush=True)
        results[name] = _run_subprocess(name, args, [name])
    pairs = [pair for pair in PAIRS if set(pair) <= set(names)]
    # configurations in no pair (a --configs choice) are timed together
    alone = [name for name in names if not any(name in pair for pair in pairs)]
    timings: dict[tuple, dict] = {}
    for group in pairs + ([tuple(alone)] if alone else []):
        print(f"step times: {' vs '.join(group)}, alternating ...", file=sys.stderr, flush=True)
        timings[group] = time_group(list(group), args)
    identical = None
    for name in names:
        # a configuration's table figures come from the first group that timed it
        group = next(g for g in timings if name in g)
        results[name].update(timings[group][name],
                             timed_with=[n for n in group if n != name])
        identical = timings[group].get("inference_outputs_identical", identical)
    summary = summarize(results, timings)
    summary["inference_outputs_identical"] = identical
    if "ours-pilot-g1" in names and "ours-pilot-off" in names:
        print("pilot G=1 vs off in the decoder, criterion and their backward only ...", file=sys.stderr, flush=True)
        breakdown = _run_subprocess("pilot-breakdown", args, ["ours-pilot-g1"])
        summary["pilot_breakdown"] = breakdown
        summary["pilot_g1_added_share_of_step"] = breakdown["added_s"] / results["ours-pilot-off"]["step_s_median"]
    print_table(results, summary, args)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "worker"}
        Path(args.json).write_text(json.dumps({"settings": settings, "results": results, "summary": summary,
                                               "pairs": {" vs ".join(g): t for g, t in timings.items()}},
                                              indent=2))


if __name__ == "__main__":
    main()
