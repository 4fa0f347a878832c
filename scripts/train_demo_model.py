"""Train the demo generalist on procedural scenes and save it as a diffusers pipeline.

    .venv/bin/python scripts/train_demo_model.py                 # writes vb_batch/demo_model/
    .venv/bin/python scripts/train_demo_model.py --steps 50 --scenes 64 --out /tmp/m   # a smoke run

Seeded and reproducible on one machine (same seed, same thread count -> the same weights up to
floating-point summation order); CPU only, 2 threads, ~15 minutes with the defaults on a
2-core machine. Training uses only `vb_batch.scenes` seeds from TRAIN_SEED_START (never the
held-out seeds that `vb-batch demo` and the evaluation use); a quick validation on
VALIDATION_SEED_START scenes prints as it goes. The real evaluation goes through the pipeline:

    .venv/bin/vb-batch run conf/demo.yaml input.path=heldout.parquet output.path=out/heldout
    .venv/bin/vb-batch eval out/heldout

Recipe: one network for all tasks (shared U-Net trunk, task-conditioned head), every step
trains all three tasks on the same images; losses: L1 on log depth + BCE on "far" (sky),
L1 between unit normals, cross-entropy over the scene classes. AdamW with a one-cycle
schedule; augmentation: horizontal flips (normals' x flips with them) and colour jitter.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vb_batch import scenes
from vb_batch.metrics import DepthAccumulator, NormalsAccumulator, SegmentationAccumulator
from vb_batch.models.demo_generalist import SHIPPED_MODEL, TASKS, VBDemoNet, VBDemoPipeline, depth_from_output

VALIDATION_SEED_START = 500_000


def render(seeds: range, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Stacked scenes: rgb uint8 (N, H, W, 3), depth float32 (inf = sky), normals float32, class ids."""
    out: dict[str, list] = {"rgb": [], "depth": [], "normals": [], "classes": []}
    for seed in seeds:
        scene = scenes.render_scene(seed, *size)
        out["rgb"].append(scene.rgb)
        out["depth"].append(scene.depth_m)
        out["normals"].append(np.nan_to_num(scene.normals))
        out["classes"].append(scene.class_ids)
    return {k: np.stack(v) for k, v in out.items()}


def make_batch(data: dict[str, np.ndarray], index: np.ndarray, rng: np.random.Generator, augment: bool):
    rgb = torch.from_numpy(data["rgb"][index]).permute(0, 3, 1, 2).float() / 255.0
    depth = torch.from_numpy(data["depth"][index])
    normals = torch.from_numpy(data["normals"][index]).permute(0, 3, 1, 2)
    classes = torch.from_numpy(data["classes"][index]).long()
    if augment:
        flip = torch.from_numpy(rng.random(len(index)) < 0.5)
        rgb[flip] = rgb[flip].flip(-1)
        depth[flip] = depth[flip].flip(-1)
        classes[flip] = classes[flip].flip(-1)
        normals[flip] = normals[flip].flip(-1) * torch.tensor([-1.0, 1.0, 1.0])[:, None, None]
        n = len(index)
        gain = torch.from_numpy(rng.uniform(0.75, 1.25, (n, 3, 1, 1))).float()
        offset = torch.from_numpy(rng.uniform(-0.08, 0.08, (n, 1, 1, 1))).float()
        gamma = torch.from_numpy(rng.uniform(0.75, 1.33, (n, 1, 1, 1))).float()
        rgb = (rgb.clamp(1e-4, 1) ** gamma * gain + offset).clamp(0, 1)
        rgb = (rgb + torch.from_numpy(rng.normal(0, 0.01, rgb.shape)).float()).clamp(0, 1)
    return rgb, depth, normals, classes


def losses(net: VBDemoNet, rgb, depth, normals, classes) -> dict[str, torch.Tensor]:
    features = net.trunk(rgb)
    n = len(rgb)
    out = {task: net.head(features, torch.full((n,), TASKS.index(task), dtype=torch.long)) for task in TASKS}
    far = torch.isinf(depth)
    log_depth, far_logit = depth_from_output(out["depth"])
    surface = ~far
    valid_normals = normals.abs().sum(1) > 0
    unit = F.normalize(out["normals"][:, :3], dim=1)
    return {
        "depth": (log_depth - torch.log(torch.where(far, 1.0, depth).clamp(min=1e-3)))[surface].abs().mean(),
        "far": F.binary_cross_entropy_with_logits(far_logit, far.float()),
        "normals": (unit - normals).abs().sum(1)[valid_normals].mean(),
        "segmentation": F.cross_entropy(out["segmentation"][:, : len(scenes.SCENE_CLASSES)], classes),
    }


LOSS_WEIGHTS = {"depth": 1.0, "far": 0.5, "normals": 1.0, "segmentation": 0.5}


@torch.no_grad()
def validate(net: VBDemoNet, data: dict[str, np.ndarray]) -> dict[str, float]:
    """Quick metrics on raw outputs (not through the codecs; `vb-batch eval` does that)."""
    net.eval()
    depth_acc, normals_acc = DepthAccumulator(), NormalsAccumulator()
    seg_acc = SegmentationAccumulator(scenes.SCENE_CLASSES)
    for start in range(0, len(data["rgb"]), 32):
        index = np.arange(start, min(start + 32, len(data["rgb"])))
        rgb = make_batch(data, index, None, augment=False)[0]
        features = net.trunk(rgb)
        n = len(index)
        out = {t: net.head(features, torch.full((n,), TASKS.index(t), dtype=torch.long)) for t in TASKS}
        log_depth, far_logit = depth_from_output(out["depth"])
        pred_depth = torch.exp(log_depth).where(far_logit <= 0, torch.inf).numpy()
        pred_normals = F.normalize(out["normals"][:, :3], dim=1).permute(0, 2, 3, 1).numpy()
        pred_classes = out["segmentation"][:, : len(scenes.SCENE_CLASSES)].argmax(1).numpy()
        for i in range(n):
            depth_acc.add(pred_depth[i], data["depth"][index[i]])
            truth_normals = np.where(np.isinf(data["depth"][index[i]])[..., None], np.nan, data["normals"][index[i]])
            normals_acc.add(pred_normals[i], truth_normals)
            seg_acc.add(pred_classes[i], data["classes"][index[i]])
    net.train()
    d, nm, s = depth_acc.result(), normals_acc.result(), seg_acc.result()
    return {"delta1": d["delta1"], "abs_rel": d["abs_rel"], "normals_mean_deg": nm["mean_deg"], "miou": s["miou"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(SHIPPED_MODEL), help="where to save the pipeline (default: the shipped one)")
    parser.add_argument("--scenes", type=int, default=3000, help="training scenes, rendered once up front")
    parser.add_argument("--validation-scenes", type=int, default=96)
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=28.0,
                        help="stop early (and say so) past this much training time; breaks exact reproducibility")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    size = scenes.DEFAULT_SIZE
    started = time.time()
    print(f"rendering {args.scenes} training and {args.validation_scenes} validation scenes at {size} ...", flush=True)
    train = render(range(scenes.TRAIN_SEED_START, scenes.TRAIN_SEED_START + args.scenes), size)
    val = render(range(VALIDATION_SEED_START, VALIDATION_SEED_START + args.validation_scenes), size)
    render_seconds = time.time() - started
    print(f"  {render_seconds:.0f} s", flush=True)

    net = VBDemoNet(class_names=scenes.SCENE_CLASSES, trained_size=size)
    print(f"VBDemoNet: {sum(p.numel() for p in net.parameters()):,} parameters", flush=True)
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    train_started = time.time()
    stopped_early = False
    running: dict[str, float] = {}
    for step in range(1, args.steps + 1):
        index = rng.integers(0, args.scenes, args.batch_size)
        parts = losses(net, *make_batch(train, index, rng, augment=True))
        loss = sum(LOSS_WEIGHTS[k] * v for k, v in parts.items())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        for k, v in parts.items():
            running[k] = 0.95 * running.get(k, v.item()) + 0.05 * v.item()
        if step % 100 == 0 or step == args.steps:
            minutes = (time.time() - train_started) / 60
            shown = " ".join(f"{k} {v:.3f}" for k, v in running.items())
            line = f"step {step}/{args.steps} {minutes:.1f} min  loss: {shown}"
            if step % 500 == 0 or step == args.steps:
                line += "  val: " + " ".join(f"{k} {v:.3f}" for k, v in validate(net, val).items())
            print(line, flush=True)
        if (time.time() - train_started) / 60 > args.max_minutes:
            print(f"stopping at step {step}: past --max-minutes {args.max_minutes}", flush=True)
            stopped_early = True
            break
    train_seconds = time.time() - train_started
    final = validate(net, val)

    pipe = VBDemoPipeline(net=net.eval())
    pipe.save_pretrained(args.out, safe_serialization=True)
    record = {
        "script": "scripts/train_demo_model.py", "args": vars(args), "steps_done": step, "stopped_early": stopped_early,
        "render_seconds": round(render_seconds, 1), "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in net.parameters()), "validation": final,
        "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
    }
    (Path(args.out) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
