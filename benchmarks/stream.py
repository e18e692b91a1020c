"""Streaming benchmark: VolumeStream (local Zarr, S3) against MONAI over .nii.gz, in one run.

On the same synthetic CT-like volumes (int16, HU), on this machine:

- the ceiling: decompressing every stored chunk from memory with numcodecs into its
  place in an int16 volume (2 threads; no I/O, no zarr, no float conversion), and zarr
  3.1 reading the same in-memory store (the ceiling recorded before the lean reader);
- ``VolumeStream`` whole volumes (z-scored float32, not resized) through a 2-worker
  DataLoader (persistent workers, ``collate_fn=collate_samples``), in the main process
  (``num_workers=0``, thread prefetch), through zarr instead of the lean reader, and from
  S3 (moto's server on loopback, a subprocess);
- the same with ``output="stored"``: int16 images plus each sample's normalisation
  parameters (in the main process also with ``reuse_buffers=5``: images written into
  released buffers instead of fresh memory), and, as its own row, ``normalize_on_device``
  turning those batches into the float32 images (here on the CPU, with torch's threads:
  on a GPU it is a few kernels);
- what users run today: MONAI ``LoadImaged`` over ``.nii.gz`` through a 2-worker
  DataLoader with persistent workers (float32 output, like the stream's);
- random 96^3 patches (patch mode), local and S3, with bytes fetched per patch counted by
  :class:`voxlake.volumes.counting.CountingStore` (read amplification);
- resident memory (main process + DataLoader workers) over 20 epochs.

MB/s always counts the stored volume's int16 bytes, so rows compare. Usage::

    python benchmarks/stream.py --volumes 12 --shape 128 256 256 --work /tmp/vxl-stream
    python benchmarks/stream.py --volumes 6 --quick --codec blosc-zstd   # no S3, 3 epochs

Figures and method are recorded in docs/performance.md ("Streaming").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

VOLUME_ID = "{:032x}"
REVISION = "00c0ffee"


def phantom(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """CT-like int16 volume: air, a soft-tissue ellipsoid with noise, a bone ring, organs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    _, cy, cx = (n / 2 for n in shape)
    r = ((y - cy) / (0.42 * shape[1])) ** 2 + ((x - cx) / (0.38 * shape[2])) ** 2
    body = np.broadcast_to(r < 1.0, shape)
    data = np.full(shape, -1000, np.int16)
    data[body] = 40
    data[np.broadcast_to((r > 0.8) & (r < 0.9), shape)] = 700
    for _ in range(4):  # organs
        oz, oy, ox = (rng.uniform(0.3, 0.7) * n for n in shape)
        rad = rng.uniform(0.06, 0.12) * shape[1]
        blob = (z - oz) ** 2 + (y - oy) ** 2 + (x - ox) ** 2 < rad**2
        data[blob] = int(rng.integers(60, 200))
    noise = rng.normal(0, 20, shape).astype(np.int16)
    return np.where(body, data + noise, data).astype(np.int16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_data(
    work: Path, count: int, shape: tuple[int, int, int], options: dict, codec: str | None
) -> Any:
    """Write the volumes as Zarr (local and S3) and .nii.gz; return the selection."""
    import nibabel as nib
    import pandas as pd

    from voxlake.config import StoreConfig
    from voxlake.volumes import write_volume

    config = StoreConfig(codec=codec) if codec else StoreConfig()  # type: ignore[arg-type]

    local = work / "volumes.zarr"
    shutil.rmtree(work, ignore_errors=True)
    (work / "nifti").mkdir(parents=True)
    rows, timings = [], {"zarr": 0.0, "s3": 0.0, "nifti": 0.0}
    for i in range(count):
        data = phantom(shape, i)
        vid, path = VOLUME_ID.format(i + 1), f"{VOLUME_ID.format(i + 1)}/{REVISION}"
        attrs = {"volume_id": vid, "spacing": [1.0, 1.0, 1.0], "affine": np.eye(4).tolist()}
        t = time.perf_counter()
        result = write_volume(local, path, data, attributes=attrs, config=config)
        timings["zarr"] += time.perf_counter() - t
        t = time.perf_counter()
        write_volume(
            "s3://bench/volumes.zarr",
            path,
            data,
            attributes=attrs,
            config=config,
            storage_options=options,
        )
        timings["s3"] += time.perf_counter() - t
        t = time.perf_counter()
        nifti = work / "nifti" / f"{vid}.nii.gz"
        # NIfTI stores (i, j, k) = (x, y, z): the transposed array is the same volume.
        nib.save(nib.Nifti1Image(data.T, np.eye(4)), nifti)
        timings["nifti"] += time.perf_counter() - t
        rows.append(
            {
                "volume_id": vid,
                "store_url": str(local),
                "store_path": path,
                "intensity_mean": result.stats.mean,
                "intensity_std": result.stats.std,
                "nifti": str(nifti),
                "stored_bytes": result.stored_bytes,
                "label": float(i % 2),
            }
        )
        print(f"  wrote {i + 1}/{count} volumes", end="\r", flush=True)
    print()
    return pd.DataFrame(rows), timings


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children, exited or alive
    (persistent DataLoader workers), moto's server excepted."""
    import psutil

    me = resource.getrusage(resource.RUSAGE_SELF)
    gone = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + gone.ru_utime + gone.ru_stime
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if not any("moto" in part for part in child.cmdline()):
                times = child.cpu_times()
                total += times.user + times.system
    return total


def timed_loader(loader: Any, epochs: int = 2) -> tuple[float, int, float]:
    """Seconds per epoch (best of ``epochs``, page cache warm after the first), items, and
    the CPU seconds of the best epoch."""
    best, items, cpu = float("inf"), 0, float("nan")
    for epoch in range(epochs):
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        start, used, items = time.perf_counter(), cpu_seconds(), 0
        for batch in loader:
            items += len(batch["image"])
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, cpu = elapsed, cpu_seconds() - used
    return best, items, cpu


def stream_loader(selection: Any, *, workers: int = 2, batch: int = 1, **kwargs: Any) -> Any:
    from torch.utils.data import DataLoader

    from voxlake.training import VolumeStream, collate_samples

    stream = VolumeStream(selection, batch_size=batch, **kwargs)
    return DataLoader(
        stream,
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate_samples,
        persistent_workers=workers > 0,
    )


def _memory_arrays(selection: Any) -> list[Any]:
    """The stored arrays, opened on an in-memory copy of their files (no I/O)."""
    import zarr

    from voxlake.volumes import open_volume

    memory = zarr.storage.MemoryStore()
    source = Path(selection.store_url[0])
    for path in selection.store_path:
        for file in (source / path).rglob("*"):
            if file.is_file():
                key = file.relative_to(source).as_posix()
                memory._store_dict[key] = zarr.core.buffer.cpu.Buffer.from_bytes(file.read_bytes())
    return [open_volume(memory, p) for p in selection.store_path]


def device_normalisation(
    selection: Any, *, patch: dict[str, Any] | None = None
) -> tuple[float, int, float]:
    """Seconds, items and CPU seconds of ``normalize_on_device`` over a stored-dtype
    epoch's batches already in memory (on the CPU here: no GPU on this machine)."""
    from voxlake.training import normalize_on_device

    kwargs: dict[str, Any] = dict(patch or {"shape": SHAPE, "shuffle": False})
    loader = stream_loader(selection, workers=0, output="stored", **kwargs)
    batches = list(loader)
    best, cpu = float("inf"), float("nan")
    for _ in range(2):
        start, used = time.perf_counter(), cpu_seconds()
        for batch in batches:
            normalize_on_device(batch, "cpu")
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, cpu = elapsed, cpu_seconds() - used
    return best, sum(len(b["image"]) for b in batches), cpu


def ceiling(selection: Any, threads: int = 2) -> tuple[float, float]:
    """Seconds to decompress every stored chunk from memory into its volume, on
    ``threads`` threads: numcodecs on payloads cut out of the shards beforehand, so
    nothing but decompression and the copy into place is timed."""
    import itertools

    from numcodecs import Zstd, blosc

    jobs = []
    for array in _memory_arrays(selection):
        sharding = array.metadata.codecs[0]
        chunks, shards = sharding.chunk_shape, array.metadata.chunk_grid.chunk_shape
        per = [s // c for s, c in zip(shards, chunks, strict=True)]
        index_bytes = 16 * int(np.prod(per)) + 4
        codec = type(sharding.codecs[1]).__name__
        store, prefix = array.store_path.store, array.store_path.path
        out = np.empty(array.shape, array.dtype)
        grid = [-(-n // s) for n, s in zip(array.shape, shards, strict=True)]
        for shard in itertools.product(*map(range, grid)):
            key = f"{prefix}/{array.metadata.encode_chunk_key(shard)}"
            raw = store._store_dict[key].to_bytes()
            table = np.frombuffer(raw[-index_bytes:-4], "<u8").reshape(*per, 2)
            for local in itertools.product(*map(range, per)):
                offset, nbytes = (int(v) for v in table[local])
                if offset == 2**64 - 1:
                    continue
                at = [(s * p + c) * e for s, p, c, e in zip(shard, per, local, chunks, strict=True)]
                view = out[tuple(slice(a, a + e) for a, e in zip(at, chunks, strict=True))]
                jobs.append((raw[offset : offset + nbytes], view))

    zstd = Zstd()

    def decode(job: tuple[bytes, np.ndarray]) -> None:
        payload, view = job
        chunk = np.empty(chunks, view.dtype)
        if codec == "BloscCodec":
            blosc.decompress(payload, chunk)
        else:
            zstd.decode(payload, chunk)
        view[...] = chunk[tuple(slice(0, n) for n in view.shape)]

    best, cpu = float("inf"), float("nan")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            start, used = time.perf_counter(), cpu_seconds()
            list(pool.map(decode, jobs))
            if time.perf_counter() - start < best:
                best, cpu = time.perf_counter() - start, cpu_seconds() - used
    return best, cpu


def zarr_from_memory(selection: Any, threads: int = 2) -> tuple[float, float]:
    """Seconds (and CPU seconds) for zarr itself to read every volume from memory."""
    arrays = _memory_arrays(selection)
    best, cpu = float("inf"), float("nan")
    for _ in range(3):
        start, used = time.perf_counter(), cpu_seconds()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda a: a[...], arrays))
        if time.perf_counter() - start < best:
            best, cpu = time.perf_counter() - start, cpu_seconds() - used
    return best, cpu


def monai_loader(selection: Any, workers: int = 2) -> Any:
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    files = [
        {"image": f, "label": lab} for f, lab in zip(selection.nifti, selection.label, strict=True)
    ]
    transform = Compose(
        [LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image")]
    )
    return DataLoader(
        Dataset(files, transform), batch_size=1, num_workers=workers, persistent_workers=True
    )


def amplification(selection: Any, patches: int, **kwargs: Any) -> dict[str, float]:
    """Bytes fetched per random 96^3 patch (one process, counted at the store)."""
    from voxlake.training import VolumeStream
    from voxlake.volumes.counting import CountingStore

    counters: list[CountingStore] = []

    def count(store: Any) -> CountingStore:
        counters.append(CountingStore(store))
        return counters[-1]

    per = max(1, patches // len(selection))
    stream = VolumeStream(
        selection,
        mode="patch",
        patch_size=(96, 96, 96),
        patches_per_volume=per,
        wrap_store=count,
        prefetch=0,
        **kwargs,
    )
    reader = stream._process_reader()
    for path in selection.store_path:  # open every array first: count chunk traffic only
        reader.array(0, path)
    counters[0].reset()
    n = sum(1 for _ in stream)
    fetched = counters[0].bytes_read / n
    patch_bytes = 96**3 * 2
    ratio = float(selection.stored_bytes.sum()) / (len(selection) * np.prod(SHAPE) * 2)
    return {
        "patches": n,
        "fetched_mb_per_patch": fetched / 1e6,
        "requests_per_patch": counters[0].requests / n,
        "vs_patch_raw_bytes": fetched / patch_bytes,
        "vs_patch_stored_bytes": fetched / (patch_bytes * ratio),
        "compression_ratio": 1 / ratio,
    }


def memory_over_epochs(selection: Any, epochs: int) -> dict[str, Any]:
    """Peak RSS (main + workers) per epoch of a 2-worker patch stream."""
    import psutil

    loader = stream_loader(
        selection, mode="patch", patch_size=(96, 96, 96), patches_per_volume=4, batch=2
    )
    me = psutil.Process()
    peaks: list[float] = []
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        peak, stop = [0.0], threading.Event()

        def sample(peak: list[float] = peak, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                total = me.memory_info().rss
                for child in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += child.memory_info().rss
                peak[0] = max(peak[0], total / 1e6)
                time.sleep(0.02)

        thread = threading.Thread(target=sample)
        thread.start()
        for _ in loader:
            pass
        stop.set()
        thread.join()
        peaks.append(peak[0])
    base = peaks[1] if len(peaks) > 1 else peaks[0]  # epoch 0 includes imports / warm-up
    return {
        "peak_rss_mb": peaks,
        "growth_pct": 100.0 * (peaks[-1] - base) / base,
        "main_rss_mb_end": me.memory_info().rss / 1e6,
    }


SHAPE: tuple[int, int, int] = (128, 256, 256)


def main() -> None:
    global SHAPE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE)
    parser.add_argument("--patches", type=int, default=480, help="patches per patch epoch")
    parser.add_argument("--memory-epochs", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vxl-stream-bench"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--codec",
        choices=["blosc-lz4", "blosc-zstd", "zstd"],
        help="store codec (default: the store's)",
    )
    parser.add_argument("--quick", action="store_true", help="skip S3 and the memory run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the compared rows")
    args = parser.parse_args()
    SHAPE = tuple(args.shape)  # type: ignore[assignment]

    port = free_port()
    moto = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    options = {
        "key": "x",
        "secret": "x",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="x",
            aws_secret_access_key="x",
            region_name="us-east-1",
        ).create_bucket(Bucket="bench")
        results = run(args, options)
    finally:
        moto.terminate()
        moto.wait()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run(args: argparse.Namespace, options: dict) -> dict[str, Any]:
    print(f"{args.volumes} volumes of {SHAPE} int16 on {os.cpu_count()} cores")
    selection, write_times = make_data(args.work, args.volumes, SHAPE, options, args.codec)
    s3 = selection.assign(store_url="s3://bench/volumes.zarr")
    mb = args.volumes * int(np.prod(SHAPE)) * 2 / 1e6
    stored = float(selection.stored_bytes.sum()) / 1e6
    print(
        f"dataset: {mb:.0f} MB raw, {stored:.0f} MB stored ({mb / stored:.2f}x); "
        f"write s: zarr {write_times['zarr']:.1f}, s3 {write_times['s3']:.1f}, "
        f"nii.gz {write_times['nifti']:.1f}"
    )
    rows: dict[str, dict[str, float]] = {}

    def record(name: str, seconds: float, items: int, cpu: float, unit: str, nbytes: float) -> None:
        # Repeated rows keep their best round: other jobs share the machine. CPU time per
        # item is the load-independent cost; 2 cores / that cost is what the row could
        # reach with both cores to itself.
        cpu_ms = 1e3 * cpu / items
        if name not in rows or seconds < rows[name]["seconds"]:
            rows[name] = {
                "seconds": seconds,
                f"{unit}_per_s": items / seconds,
                "mb_per_s": nbytes / seconds,
                "cpu_ms_per_item": cpu_ms,
                f"cpu_bound_{unit}_per_s_2_cores": 2e3 / cpu_ms,
            }
        print(
            f"  {name:<34} {items / seconds:8.1f} {unit}/s {nbytes / seconds:9.1f} MB/s "
            f"| CPU {cpu_ms:6.1f} ms/item -> {2e3 / cpu_ms:7.1f} {unit}/s on 2 free cores"
        )

    whole = dict(shape=SHAPE, shuffle=False)
    # The rows the targets compare, interleaved over rounds so that a burst of load from
    # other jobs does not land on one of them only.
    for round_ in range(args.rounds):
        print(f" round {round_ + 1} of {args.rounds}")
        seconds, cpu = ceiling(selection)
        record("ceiling: decode from memory", seconds, args.volumes, cpu, "volumes", mb)
        record(
            "voxlake zarr local (2 workers)",
            *timed_loader(stream_loader(selection, **whole)),
            "volumes",
            mb,
        )
        record(
            "voxlake zarr local (in-process)",
            *timed_loader(stream_loader(selection, workers=0, **whole)),
            "volumes",
            mb,
        )
        record(
            "voxlake stored int16 (2 workers)",
            *timed_loader(stream_loader(selection, output="stored", **whole)),
            "volumes",
            mb,
        )
        record(
            "voxlake stored int16 (in-process)",
            *timed_loader(stream_loader(selection, workers=0, output="stored", **whole)),
            "volumes",
            mb,
        )
        record(
            "voxlake stored int16 (in-process, reuse)",
            *timed_loader(
                stream_loader(selection, workers=0, output="stored", reuse_buffers=5, **whole)
            ),
            "volumes",
            mb,
        )
        record(
            "MONAI LoadImaged .nii.gz (2 workers)",
            *timed_loader(monai_loader(selection)),
            "volumes",
            mb,
        )
    record(
        "normalize_on_device, on the CPU",
        *device_normalisation(selection),
        "volumes",
        mb,
    )
    seconds, cpu = zarr_from_memory(selection)
    record("zarr 3.1 reading from memory", seconds, args.volumes, cpu, "volumes", mb)
    record(
        "voxlake local, zarr path (2 workers)",
        *timed_loader(stream_loader(selection, lean=False, **whole)),
        "volumes",
        mb,
    )
    if not args.quick:
        record(
            "voxlake zarr s3/moto (2 workers)",
            *timed_loader(stream_loader(s3, storage_options=options, **whole)),
            "volumes",
            mb,
        )

    per = max(1, args.patches // args.volumes)
    patch_mb = per * args.volumes * 96**3 * 2 / 1e6
    patch = dict(mode="patch", patch_size=(96, 96, 96), patches_per_volume=per, batch=4)
    for _ in range(args.rounds):
        record(
            "patches 96^3 local (2 workers)",
            *timed_loader(stream_loader(selection, **patch)),
            "patches",
            patch_mb,
        )
        record(
            "patches 96^3 local (in-process)",
            *timed_loader(stream_loader(selection, workers=0, **patch)),
            "patches",
            patch_mb,
        )
        record(
            "patches stored int16 (2 workers)",
            *timed_loader(stream_loader(selection, output="stored", **patch)),
            "patches",
            patch_mb,
        )
        record(
            "patches stored int16 (in-process)",
            *timed_loader(stream_loader(selection, workers=0, output="stored", **patch)),
            "patches",
            patch_mb,
        )
    record(
        "patches normalize_on_device, CPU",
        *device_normalisation(selection, patch=patch),
        "patches",
        patch_mb,
    )
    record(
        "patches 96^3 local, zarr path",
        *timed_loader(stream_loader(selection, lean=False, **patch)),
        "patches",
        patch_mb,
    )
    if not args.quick:
        record(
            "patches 96^3 s3/moto (2 workers)",
            *timed_loader(stream_loader(s3, storage_options=options, **patch)),
            "patches",
            patch_mb,
        )
        record(
            "patches 96^3 s3/moto + 256MB cache",
            *timed_loader(
                stream_loader(s3, storage_options=options, cache_bytes=256 << 20, **patch)
            ),
            "patches",
            patch_mb,
        )
    amp = amplification(selection, min(args.patches, 120))
    print(
        "  read amplification per 96^3 patch: "
        f"{amp['fetched_mb_per_patch']:.2f} MB fetched in {amp['requests_per_patch']:.1f} "
        f"requests = {amp['vs_patch_stored_bytes']:.2f}x the patch's stored bytes "
        f"({amp['vs_patch_raw_bytes']:.2f}x its raw bytes)"
    )
    memory = memory_over_epochs(selection, 3 if args.quick else args.memory_epochs)
    peaks = memory["peak_rss_mb"]
    print(
        f"  peak RSS epoch 1 -> {len(peaks) - 1}: {peaks[1]:.0f} -> {peaks[-1]:.0f} MB "
        f"({memory['growth_pct']:+.1f}%)"
    )

    ceil = rows["ceiling: decode from memory"]["mb_per_s"]
    local = rows["voxlake zarr local (2 workers)"]["mb_per_s"]
    monai = rows["MONAI LoadImaged .nii.gz (2 workers)"]["mb_per_s"]
    ratios = {
        "local_vs_monai": local / monai,
        "local_vs_ceiling": local / ceil,
        "s3_vs_monai": rows.get("voxlake zarr s3/moto (2 workers)", {}).get("mb_per_s", np.nan)
        / monai,
        "in_process_vs_monai": rows["voxlake zarr local (in-process)"]["mb_per_s"] / monai,
        "in_process_vs_ceiling": rows["voxlake zarr local (in-process)"]["mb_per_s"] / ceil,
    }
    # The same comparisons by CPU cost per volume, which other jobs' load does not skew.
    cost = {name: row["cpu_ms_per_item"] for name, row in rows.items()}
    monai_cost = cost["MONAI LoadImaged .nii.gz (2 workers)"]
    ceiling_cost = cost["ceiling: decode from memory"]
    for key, name in (
        ("local", "voxlake zarr local (2 workers)"),
        ("in_process", "voxlake zarr local (in-process)"),
    ):
        ratios[f"{key}_vs_monai_by_cpu"] = monai_cost / cost[name]
        ratios[f"{key}_vs_ceiling_by_cpu"] = ceiling_cost / cost[name]
    for key, name in (
        ("stored_local", "voxlake stored int16 (2 workers)"),
        ("stored_in_process", "voxlake stored int16 (in-process)"),
        ("stored_reuse", "voxlake stored int16 (in-process, reuse)"),
    ):
        ratios[f"{key}_vs_monai"] = rows[name]["mb_per_s"] / monai
        ratios[f"{key}_vs_ceiling"] = rows[name]["mb_per_s"] / ceil
        ratios[f"{key}_vs_monai_by_cpu"] = monai_cost / cost[name]
        ratios[f"{key}_vs_ceiling_by_cpu"] = ceiling_cost / cost[name]
    print(
        "by CPU cost per volume: "
        + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if k.endswith("_by_cpu"))
    )
    print(
        f"ratios: local/MONAI {ratios['local_vs_monai']:.1f}x (target >= 10x), "
        f"local/ceiling {100 * ratios['local_vs_ceiling']:.0f}% (target >= 70%), "
        f"in-process/MONAI {ratios['in_process_vs_monai']:.1f}x, in-process/ceiling "
        f"{100 * ratios['in_process_vs_ceiling']:.0f}%, "
        f"s3/MONAI {ratios['s3_vs_monai']:.1f}x; patches/s local "
        f"{rows['patches 96^3 local (2 workers)']['patches_per_s']:.0f} (target >= 250)"
    )
    print(
        f"stored int16: in-process/MONAI {ratios['stored_in_process_vs_monai']:.1f}x, "
        f"in-process/ceiling {100 * ratios['stored_in_process_vs_ceiling']:.0f}% (reused "
        f"buffers: {ratios['stored_reuse_vs_monai']:.1f}x, "
        f"{100 * ratios['stored_reuse_vs_ceiling']:.0f}%), 2 workers/"
        f"MONAI {ratios['stored_local_vs_monai']:.1f}x, 2 workers/ceiling "
        f"{100 * ratios['stored_local_vs_ceiling']:.0f}%; patches/s in-process "
        f"{rows['patches stored int16 (in-process)']['patches_per_s']:.0f}, 2 workers "
        f"{rows['patches stored int16 (2 workers)']['patches_per_s']:.0f}"
    )
    return {
        "volumes": args.volumes,
        "shape": SHAPE,
        "raw_mb": mb,
        "stored_mb": stored,
        "rows": rows,
        "amplification": amp,
        "memory": memory,
        "ratios": ratios,
    }


if __name__ == "__main__":
    main()
