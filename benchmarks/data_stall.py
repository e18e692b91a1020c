"""Data-stall fraction of training fed by VolumeStream (DS-Analyzer's method).

For each model the same training step (forward, backward, optimizer) is timed twice:

1. **synthetic**: the batch is a tensor already on the device, so the step rate is what
   the model can ingest (the GPU-bound ceiling);
2. **fed**: batches come from ``VolumeStream`` in patch mode through a DataLoader
   (pinned memory and non-blocking copies on CUDA), from a local Zarr store.

``stall = 1 - fed_rate / synthetic_rate`` is the share of the step time the device spends
waiting for data (DS-Analyzer, Mohan et al., VLDB 2021). Models: the tutorial CNN3D
(classification) and a 3D U-Net of nnU-Net-like size on 128^3 patches (segmentation-like
per-voxel loss, synthetic target). On CPU, use small settings to check the script works;
the CPU figures are not stall figures for a GPU. Usage::

    python benchmarks/data_stall.py                                   # GPU defaults
    python benchmarks/data_stall.py --device cpu --patch 32 --width 4 --steps 6 --batch 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class UNet3D(nn.Module):
    """A plain 3D U-Net: 5 levels, ``width`` * (1, 2, 4, 8, 16) channels (nnU-Net uses 32)."""

    def __init__(self, width: int = 32, classes: int = 2) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(5)]
        self.down = nn.ModuleList([block(1, widths[0])])
        self.down.extend(block(a, b) for a, b in itertools.pairwise(widths))
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(b, a, 2, stride=2) for a, b in itertools.pairwise(widths)
        )
        self.merge = nn.ModuleList(block(2 * a, a) for a in widths[:-1])
        self.head = nn.Conv3d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.down):
            x = down(x if i == 0 else nn.functional.max_pool3d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.merge[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        out: torch.Tensor = self.head(x)
        return out


def make_store(work: Path, count: int, shape: tuple[int, int, int]) -> Any:
    import pandas as pd

    from voxlake.volumes import write_volume

    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for i in range(count):
        rng = np.random.default_rng(i)
        data = rng.normal(40, 30, shape).astype(np.int16)
        vid, path = f"{i + 1:032x}", f"{i + 1:032x}/00c0ffee"
        result = write_volume(work, path, data, attributes={"volume_id": vid, "spacing": [1] * 3})
        rows.append(
            {
                "volume_id": vid,
                "store_path": path,
                "label": float(i % 2),
                "intensity_mean": result.stats.mean,
                "intensity_std": result.stats.std,
            }
        )
    return pd.DataFrame(rows)


def step_fn(model: nn.Module, kind: str, device: torch.device) -> Any:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast if autocast is not None else torch.enable_grad():
            out = model(images)
        if kind == "unet":  # per-voxel loss against a synthetic mask
            target = (images[:, 0] > 0).long()
            loss = nn.functional.cross_entropy(out.float(), target)
        else:
            loss = nn.functional.binary_cross_entropy_with_logits(out.float().squeeze(1), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_rates(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Host-to-device GB/s of one batch of patches, pinned against pageable host memory."""
    rates = {}
    for dtype in (torch.int16, torch.float32):
        host = torch.zeros(args.batch, 1, *(args.patch,) * 3, dtype=dtype)
        for name, source in (("pageable", host), ("pinned", host.pin_memory())):
            for _ in range(3):
                source.to(device, non_blocking=True)
            sync(device)
            start = time.perf_counter()
            for _ in range(20):
                source.to(device, non_blocking=True)
            sync(device)
            seconds = (time.perf_counter() - start) / 20
            rates[f"{name}_{str(dtype).removeprefix('torch.')}_gb_per_s"] = (
                host.nbytes / seconds / 1e9
            )
    return rates


def measure(
    args: argparse.Namespace, kind: str, selection: Any, device: torch.device, workers: int
) -> dict:
    from torch.utils.data import DataLoader

    from voxlake.training import CNN3D, VolumeStream, normalize_on_device

    patch = (args.patch,) * 3
    torch.manual_seed(0)
    model = (UNet3D(args.width) if kind == "unet" else CNN3D(1, patch)).to(device)
    step = step_fn(model, kind, device)
    images = torch.randn(args.batch, 1, *patch, device=device)
    labels = torch.ones(args.batch, device=device)
    for _ in range(args.warmup):
        step(images, labels)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(images, labels)
    sync(device)
    synthetic = args.steps / (time.perf_counter() - start)

    stream = VolumeStream(
        selection,
        args.work,
        mode="patch",
        patch_size=patch,
        patches_per_volume=10_000,
        batch_size=args.batch,
        prefetch=args.prefetch,
        output=args.output,
    )
    loader = DataLoader(
        stream,
        batch_size=args.batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    batches = iter(loader)
    waited = 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync(device)
            start, waited = time.perf_counter(), 0.0
        before = time.perf_counter()
        batch = next(batches)
        # Normalises stored-dtype batches on the device (--output stored); moves float32.
        batch = normalize_on_device(batch, device)
        images, labels = batch["image"], batch["label"]
        waited += time.perf_counter() - before
        step(images, labels)
    sync(device)
    fed = args.steps / (time.perf_counter() - start)
    del batches
    return {
        "model": kind,
        "workers": workers,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "synthetic_steps_per_s": synthetic,
        "fed_steps_per_s": fed,
        "stall_fraction": max(0.0, 1.0 - fed / synthetic),
        "data_wait_fraction": waited * fed / args.steps,
        "samples_per_s": fed * args.batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=int, default=32, help="U-Net base channels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[4], help="one row per count")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="rows per model and worker count")
    parser.add_argument(
        "--output",
        choices=["float32", "stored"],
        default="float32",
        help="stream float32 images, or the stored int16 normalised on the device",
    )
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 256, 256))
    parser.add_argument("--models", nargs="+", default=["cnn3d", "unet"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vxl-stall"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = tuple(max(n, args.patch) for n in args.shape)
    selection = make_store(args.work, args.volumes, shape)  # type: ignore[arg-type]
    print(
        f"device {device}, patches {args.patch}^3, batch {args.batch}, output {args.output}, "
        f"volumes {shape}"
    )
    copies = copy_rates(args, device) if device.type == "cuda" else {}
    if copies:
        print("  host-to-device copy of one batch, GB/s: " + ", ".join(
            f"{name.removesuffix('_gb_per_s')} {rate:.1f}" for name, rate in copies.items()
        ))  # fmt: skip
    results = [
        measure(args, kind, selection, device, workers)
        for kind in args.models
        for workers in args.workers
        for _ in range(args.repeat)
    ]
    for r in results:
        print(
            f"  {r['model']:<6} {r['workers']:2d} workers {r['parameters_m']:6.1f} M params  "
            f"synthetic "
            f"{r['synthetic_steps_per_s']:7.2f} steps/s  fed {r['fed_steps_per_s']:7.2f} "
            f"steps/s  stall {100 * r['stall_fraction']:5.1f}%  "
            f"(waiting for data {100 * r['data_wait_fraction']:.1f}% of the fed time)"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"device": str(device), "copies": copies, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
