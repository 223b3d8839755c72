#!/usr/bin/env python
"""Train the bundled demo model: CvT-tiny on scikit-learn's handwritten digits.

Reproduces cvt_deploy/demo/digits.npz and cvt_deploy/demo/cvt-tiny-digits.safetensors:

    python scripts/train_demo.py            # ~ a few minutes on 2 CPU cores

The 8x8 digits are upscaled to 64x64 by the model's own preprocessing (bicubic), so the
demo exercises the same input path as any CvT. Deterministic for a given torch build.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cvt_deploy.checkpoints import save_checkpoint
from cvt_deploy.config import PreprocessConfig, get_config
from cvt_deploy.demo import DEMO_DATA, DEMO_WEIGHTS, demo_split
from cvt_deploy.model import CvT
from cvt_deploy.preprocess import preprocess

IMG_SIZE = 64


def write_dataset(path: Path, seed: int) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=0.2, stratify=labels, random_state=seed)
    rng = np.random.default_rng(seed)
    calib_idx = np.sort(rng.choice(train_idx, size=256, replace=False))
    np.savez_compressed(path, images=images, labels=labels, names=np.array([str(i) for i in range(10)]),
                        train_idx=np.sort(train_idx), calib_idx=calib_idx, test_idx=np.sort(test_idx))


def shift(x: torch.Tensor, max_px: int, fill: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to max_px pixels, filled with the background value."""
    n, _, h, w = x.shape
    padded = fill.view(1, -1, 1, 1).expand(n, -1, h + 2 * max_px, w + 2 * max_px).clone()
    padded[:, :, max_px:max_px + h, max_px:max_px + w] = x
    dy, dx = torch.randint(0, 2 * max_px + 1, (2, n), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not DEMO_DATA.exists():
        write_dataset(DEMO_DATA, args.seed)

    train, test = demo_split("train"), demo_split("test")
    cfg = get_config("cvt-tiny", img_size=IMG_SIZE, num_classes=10, labels=train.names,
                     activation="quick_gelu", preprocess=PreprocessConfig(size=IMG_SIZE, resize="squash", crop_pct=1.0))
    xtr = torch.from_numpy(preprocess(list(train.images), cfg.preprocess))
    ytr = torch.from_numpy(train.labels)
    xte = torch.from_numpy(preprocess(list(test.images), cfg.preprocess))
    yte = torch.from_numpy(test.labels)
    fill = torch.from_numpy(preprocess([np.zeros((8, 8), np.uint8)], cfg.preprocess))[0, :, 0, 0]

    model = CvT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps_per_epoch = (len(ytr) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * steps_per_epoch, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        total = 0.0
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(model(shift(xtr[b], 4, fill, gen)), ytr[b], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(xte).argmax(1) == yte).float().mean().item()
            print(f"epoch {epoch + 1:3d}  loss {total / len(ytr):.4f}  held-out acc {acc:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    save_checkpoint(model, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); held-out accuracy {acc:.4f} on {len(yte)} images")


if __name__ == "__main__":
    main()
