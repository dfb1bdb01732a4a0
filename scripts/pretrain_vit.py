"""Pre-train the small `vit` / `convit` offline, on images disjoint from the continual sequence.

    python scripts/pretrain_vit.py --out pretrained/vit-digits
    mmcl run --task split_fmnist --backbone vit --pretrained pretrained/vit-digits ...

Data: scikit-learn's 1,797 handwritten digits (8x8, shipped with scikit-learn), upsampled to
the target size, with random affine augmentation (rotation, scale, shift, shear) drawn afresh
every epoch, 10-way supervised. Digits share no class with Fashion-MNIST, so a checkpoint made
here is fair for `split_fmnist`; it is NOT fair for `split_digits` (the same images), and
`pretrain.json` beside the weights says so.

The architecture comes from the same flags and the same registry as a run (`--backbone`,
`--vit_embed_dim`, `--vit_depth`, `--vit_heads`, `--patch_size`, `--vit_pool`, `--image_size`),
so `--pretrained DIR` loads into exactly that model; a mismatch is an error that names the file.
Writes DIR/model.safetensors (encoder only, no head) and DIR/pretrain.json, atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DISJOINT_FROM = ["split_fmnist"]
NOT_FAIR_FOR = ["split_digits"]


def digit_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All scikit-learn digits as (N, 1, size, size) floats in [-1, 1] (the backbones' input range)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    # a 1-pixel border first, so upsampled strokes do not touch the edge (as MNIST digits do not)
    x = F.pad(x, (1, 1, 1, 1))
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.mul(2).sub(1), torch.from_numpy(digits.target).long()


def random_affine(x: torch.Tensor, gen: torch.Generator, max_rot: float = 20.0, scale: tuple = (0.8, 1.15),
                  max_shift: float = 0.15, max_shear: float = 0.2) -> torch.Tensor:
    """One random affine warp per image (background -1 stays -1)."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    angle = u(-max_rot, max_rot) * math.pi / 180
    s = u(*scale)
    shear = u(-max_shear, max_shear)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + shear
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    theta[:, 0, 2], theta[:, 1, 2] = u(-max_shift, max_shift), u(-max_shift, max_shift)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def build_encoder(args):
    from mmcl.backbones import BackboneSpec, build_backbone
    from mmcl.config import RunConfig

    cfg = RunConfig.from_dict(dict(task="split_fmnist", backbone=args.backbone, vit_embed_dim=args.vit_embed_dim,
                                   vit_depth=args.vit_depth, vit_heads=args.vit_heads, patch_size=args.patch_size,
                                   vit_pool=args.vit_pool))
    return build_backbone(cfg, BackboneSpec(modalities=("image",), image_shape=(args.image_size, args.image_size)))


def pretrain(args) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = digit_images(args.image_size)
    perm = torch.randperm(len(y), generator=gen)
    n_val = int(len(y) * 0.1)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    backbone = build_encoder(args)
    head = torch.nn.Linear(backbone.feature_dim, 10)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / args.batch_size)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / max(1, steps_per_epoch)) * 0.5 * (1 + math.cos(math.pi * k / total)))
    t0 = time.time()
    for epoch in range(args.epochs):
        backbone.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        running = 0.0
        for i in range(0, len(order), args.batch_size):
            b = order[i : i + args.batch_size]
            loss = F.cross_entropy(head(backbone({"pixel_values": random_affine(x[b], gen)})), y[b],
                                   label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(b)
        if (epoch + 1) % max(1, args.epochs // 10) == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1}/{args.epochs} loss {running / len(order):.4f}", flush=True)
    backbone.eval()
    with torch.no_grad():
        val_acc = (head(backbone({"pixel_values": x[val_idx]})).argmax(-1) == y[val_idx]).float().mean().item()
    return {"backbone": backbone, "valid_acc": 100 * val_acc, "minutes": (time.time() - t0) / 60}


def save(out: Path, backbone, info: dict) -> None:
    from safetensors.torch import save_file

    from mmcl.reporting import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in backbone.model.state_dict().items() if not k.startswith("head")}
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "mmcl": "pretrain_vit"})
    os.replace(tmp, out / "model.safetensors")
    write_json_atomic(out / "pretrain.json", info)


def main(argv: list[str] | None = None) -> dict:
    from mmcl.backbones.vision import VitOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="pretrained/vit-digits")
    ap.add_argument("--backbone", default="vit", choices=["vit", "convit"])
    ap.add_argument("--image_size", type=int, default=28)
    # a run's own defaults, so that `--pretrained` fits `mmcl run` with the same (or no) architecture flags
    ap.add_argument("--vit_embed_dim", type=int, default=VitOptions.vit_embed_dim)
    ap.add_argument("--vit_depth", type=int, default=VitOptions.vit_depth)
    ap.add_argument("--vit_heads", type=int, default=VitOptions.vit_heads)
    ap.add_argument("--patch_size", type=int, default=VitOptions.patch_size)
    ap.add_argument("--vit_pool", default=VitOptions.vit_pool, choices=("token", "avg"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight_decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = pretrain(args)
    info = {
        "data": "sklearn.datasets.load_digits (1,797 images, 10 classes), upsampled, random affine augmentation",
        "disjoint_from": DISJOINT_FROM, "not_fair_for": NOT_FAIR_FOR,
        "architecture": {k: getattr(args, k) for k in
                         ("backbone", "image_size", "vit_embed_dim", "vit_depth", "vit_heads", "patch_size", "vit_pool")},
        "training": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "seed")},
        "valid_acc": round(result["valid_acc"], 2), "minutes": round(result["minutes"], 2),
    }
    save(Path(args.out), result["backbone"], info)
    print(f"wrote {args.out}/model.safetensors: digits valid acc {info['valid_acc']:.2f} % ({info['minutes']:.1f} min)")
    return info


if __name__ == "__main__":
    main()
