"""Command line of ``python -m voxlake.training.train``: parse it and rebuild it."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from voxlake.training.train import TrainConfig

__all__ = ["STORAGE_OPTIONS_ENV", "build_parser", "config_kwargs", "config_to_argv"]

#: Environment variable carrying fsspec/delta storage options (JSON) to torchrun ranks:
#: they may hold credentials, which must not appear in a process list.
STORAGE_OPTIONS_ENV = "VOXLAKE_STORAGE_OPTIONS"


def config_to_argv(config: TrainConfig) -> list[str]:
    """Command-line arguments of :func:`main` that reproduce ``config``.

    ``storage_options`` are left out (see :data:`STORAGE_OPTIONS_ENV`).
    """
    argv = ["--out", config.out, "--epochs", str(config.epochs)]
    argv += ["--batch-size", str(config.batch_size), "--lr", repr(config.lr)]
    argv += ["--shape", *(str(n) for n in config.shape), "--seed", str(config.seed)]
    argv += ["--num-workers", str(config.num_workers), "--label", config.label]
    argv += ["--fractions", *(repr(f) for f in config.fractions)]
    argv += ["--prefetch", str(config.prefetch), "--mode", config.mode]
    argv += ["--patch-size", *(str(n) for n in config.patch_size)]
    argv += ["--patches-per-volume", str(config.patches_per_volume)]
    argv += ["--sampler", config.sampler, "--cache-bytes", str(config.cache_bytes)]
    argv += ["--output", config.output]
    optional = {
        "--catalog": config.catalog,
        "--store": config.store,
        "--catalog-version": config.catalog_version,
        "--max-steps-per-epoch": config.max_steps_per_epoch,
        "--selection": config.selection,
        "--checkpoint-every-steps": config.checkpoint_every_steps,
        "--split": config.split,
    }
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    return [*argv, "--resume"] if config.resume else argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m voxlake.training.train",
        description="Train CNN3D on a voxlake catalog selection.",
    )
    add = parser.add_argument
    add("--out", required=True, help="output directory")
    add("--catalog", help="catalog URL")
    add("--store", help="volume store URL (default: each row's store_url)")
    add("--selection", help="parquet selection used instead of the catalog")
    add("--epochs", type=int, default=2)
    add("--batch-size", type=int, default=2)
    add("--shape", type=int, nargs=3, default=(32, 64, 64), metavar=("D", "H", "W"))
    add("--lr", type=float, default=1e-4)
    add("--seed", type=int, default=0)
    add("--num-workers", type=int, default=0)
    add("--prefetch", type=int, default=2)
    add("--label", default="label")
    add("--fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15))
    add("--split", default=None, help="name of a split saved in the catalog")
    add("--catalog-version", type=int)
    add("--max-steps-per-epoch", type=int)
    add("--mode", choices=("volume", "patch"), default="volume")
    add("--patch-size", type=int, nargs=3, default=(96, 96, 96), metavar=("D", "H", "W"))
    add("--patches-per-volume", type=int, default=1)
    add("--sampler", choices=("uniform", "foreground"), default="uniform")
    add("--cache-bytes", type=int, default=0, help="per-worker chunk cache cap")
    add(
        "--output",
        choices=("auto", "float32", "stored"),
        default="auto",
        help="float32: normalised by the loader; stored: stored dtype, normalised on "
        "device; auto: stored on CUDA in patch mode, else float32",
    )
    add("--checkpoint-every-steps", type=int, help="also checkpoint within epochs")
    add(
        "--storage-options",
        type=json.loads,
        help=f"fsspec options as JSON (default: ${STORAGE_OPTIONS_ENV}, same format)",
    )
    add("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    return parser


def config_kwargs(ns: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """``TrainConfig`` keyword arguments from parsed arguments and the environment."""
    kwargs = dict(vars(ns))
    if kwargs["storage_options"] is None and environ.get(STORAGE_OPTIONS_ENV):
        kwargs["storage_options"] = json.loads(environ[STORAGE_OPTIONS_ENV])
    kwargs["shape"] = tuple(ns.shape)
    kwargs["patch_size"] = tuple(ns.patch_size)
    kwargs["fractions"] = tuple(ns.fractions)
    return kwargs
