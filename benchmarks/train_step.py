"""Training-step time and peak memory of MP-Former (r50 preset) against Hugging Face's Mask2Former.

Configurations, each measured in a fresh subprocess so memory peaks are separable:
  ours-pilot-off   r50 preset with model.pilot.enabled=false (plain Mask2Former)
  ours-pilot-g1    r50 preset, pilot on, G=1 (the authors' default)
  ours-pilot-g3    r50 preset, pilot on, G=3
  hf-mask2former   transformers' Mask2FormerForUniversalSegmentation with the equivalent ResNet-50 config
                   (random init, 100 queries, 9 decoder layers, hidden 256, 6 encoder layers, 12544 points,
                   loss weights 2/5/5); needs the benchmark-only extra ``pip install transformers``

A training step is forward + backward + gradient clipping + AdamW step on the same random batch (a few
random masks per image). Eval-mode inference (``model(images)`` including post-processing) is timed for the
pilot-off and pilot-on models: the pilot must cost nothing at inference.

    python benchmarks/train_step.py                      # GPU if present, else a small CPU run
    python benchmarks/train_step.py --device cuda --size 512 --batch 2 --iters 20 --json out.json
    python benchmarks/train_step.py --no-peer --profile ours-pilot-g1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OURS = {
    "ours-pilot-off": ["model.pilot.enabled=false"],
    "ours-pilot-g1": ["model.pilot.enabled=true", "model.pilot.groups=1"],
    "ours-pilot-g3": ["model.pilot.enabled=true", "model.pilot.groups=3"],
}
PEER = "hf-mask2former"
INFERENCE = ("ours-pilot-off", "ours-pilot-g1")
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


def _timed(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run_worker(args: argparse.Namespace) -> dict:
    """Measure one configuration in this process; returns its figures."""
    from mpformer_ray.config import load_config

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    name = args.worker
    cfg = load_config("r50", OURS.get(name, []))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    if name == PEER:
        model = build_peer(cfg.model.num_classes, cfg.model).to(device)
    else:
        from mpformer_ray.model import build_model

        model = build_model(cfg).to(device)
    images, targets = random_batch(args.batch, args.size, cfg.model.num_classes, device)
    if name == PEER:
        peer_kwargs = {"mask_labels": [t["masks"].float() for t in targets],
                       "class_labels": [t["labels"] for t in targets]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def loss_fn() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if name == PEER:
                return model(pixel_values=images, **peer_kwargs).loss
            return sum(model(images, targets).values())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        scaler.step(optimizer)
        scaler.update()

    model.train()
    if args.profile == name:
        profile(step, device)
    times = _timed(step, device, args.warmup, args.iters)
    result = {
        "config": name,
        "params": sum(p.numel() for p in model.parameters()),
        "step_s_median": statistics.median(times),
        "step_s_mean": statistics.fmean(times),
        "step_s_all": times,
    }
    if device.type == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_rss_delta_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    if name in INFERENCE:
        model.eval()
        optimizer.zero_grad(set_to_none=True)

        def infer() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                 enabled=amp_dtype is not None):
                model(images)

        inf = _timed(infer, device, args.warmup, args.iters)
        result.update(infer_s_median=statistics.median(inf), infer_s_all=inf)
    return result


def profile(step, device: torch.device) -> None:
    """Print where one training step's time goes (top ops and our modules' record_function ranges)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with torch_profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        for _ in range(2):
            step()
            _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30), file=sys.stderr, flush=True)


def _run_subprocess(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--device", args.device, "--size", str(args.size),
           "--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--amp", args.amp]
    if args.profile:
        cmd += ["--profile", args.profile]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"config": name, "error": f"worker exited with {proc.returncode} (see stderr above)"}
    return json.loads(lines[-1][len("RESULT "):])


def summarize(results: dict[str, dict]) -> dict:
    """Goal figures from the per-configuration results (None where a configuration is missing)."""
    def get(name: str, key: str) -> float | None:
        return results.get(name, {}).get(key)

    out: dict = {}
    off, g1 = get("ours-pilot-off", "step_s_median"), get("ours-pilot-g1", "step_s_median")
    peer = get(PEER, "step_s_median")
    if g1 and peer:
        out["step_vs_peer"] = g1 / peer
        out["step_vs_peer_pilot_off"] = off / peer if off else None
    if off and g1:
        out["pilot_g1_overhead"] = g1 / off - 1
    g3 = get("ours-pilot-g3", "step_s_median")
    if off and g3:
        out["pilot_g3_overhead"] = g3 / off - 1
    i_off, i_g1 = get("ours-pilot-off", "infer_s_median"), get("ours-pilot-g1", "infer_s_median")
    if i_off and i_g1:
        out["inference_change"] = i_g1 / i_off - 1
    out["goals_met"] = {
        "step <= 0.8x peer": out["step_vs_peer"] <= GOALS["step_vs_peer"] if "step_vs_peer" in out else None,
        "pilot G=1 overhead <= 5%": (out["pilot_g1_overhead"] <= GOALS["pilot_g1_overhead"]
                                     if "pilot_g1_overhead" in out else None),
        "inference within 3%": (abs(out["inference_change"]) <= GOALS["inference_change"]
                                if "inference_change" in out else None),
    }
    return out


def print_table(results: dict[str, dict], summary: dict, args: argparse.Namespace) -> None:
    mem_key, mem_label = ("peak_mem_mib", "peak GPU MiB") if args.device.startswith("cuda") else \
        ("peak_rss_delta_mib", "peak RSS delta MiB")
    print(f"\ndevice={args.device} batch={args.batch} size={args.size}^2 amp={args.amp} "
          f"iters={args.iters} warmup={args.warmup}")
    print(f"{'config':<18}{'params':>12}{'step ms (median)':>18}{mem_label:>22}{'infer ms':>12}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18}  {r['error']}")
            continue
        infer = f"{1000 * r['infer_s_median']:.1f}" if "infer_s_median" in r else "-"
        print(f"{name:<18}{r['params']:>12,}{1000 * r['step_s_median']:>18.1f}{r.get(mem_key, 0):>22.0f}{infer:>12}")
    print()
    for key in ("step_vs_peer", "step_vs_peer_pilot_off", "pilot_g1_overhead", "pilot_g3_overhead", "inference_change"):
        if summary.get(key) is not None:
            signed = "overhead" in key or "change" in key  # relative changes print with their sign
            print(f"{key:<24}{summary[key]:+.3f}" if signed else f"{key:<24}{summary[key]:.3f}")
    for goal, met in summary["goals_met"].items():
        print(f"goal {goal:<28}{'n/a' if met is None else ('met' if met else 'MISSED')}")


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--size", type=int, default=None, help="square image side (default 512 on GPU, 128 on CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on GPU, 1 on CPU)")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default=None,
                   help="autocast dtype for both models (default bf16 on GPU, off on CPU)")
    p.add_argument("--no-peer", action="store_true", help="skip the Hugging Face model")
    p.add_argument("--profile", default=None, choices=[*OURS, PEER],
                   help="print a torch.profiler table of this configuration's training step")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.size = args.size or (512 if on_gpu else 128)
    args.iters = args.iters or (20 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.amp = args.amp or ("bf16" if on_gpu else "off")
    if args.size % 32:
        p.error(f"--size must be divisible by 32, got {args.size}")
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return
    names = [*OURS] + ([] if args.no_peer else [PEER])
    results = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = _run_subprocess(name, args)
    summary = summarize(results)
    print_table(results, summary, args)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "worker"}
        Path(args.json).write_text(json.dumps({"settings": settings, "results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
