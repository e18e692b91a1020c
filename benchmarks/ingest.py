"""Ingest benchmark: voxlake against dcm2niix and a naive pydicom loop, in one run.

Generates (once, cached) an archive of 512x512 CT series with voxlake's synthetic factory,
then measures on the same files and the same machine:

- voxlake ingest with 1 and 2 local Dask workers (fresh catalog and store each time),
  cluster start included, and the ``ingest()`` call alone once the cluster is up and its
  workers have imported the stack (what a run on a running cluster waits for);
- the header-only catalog pass: `voxlake ingest --headers-only` with 2 workers (files/s
  per core of wall time, cluster start included) and `read_headers` in one process
  (files/s per core of CPU time), and on real scanner files (../shared's dcm_qa_nih,
  when it is there) against a plain pydicom header read of the same files;
- dcm2niix ``-z n`` (uncompressed NIfTI) and ``-z y`` (gzip), one process per series;
- the naive loop users write: pydicom read, sort by position, stack, ``np.save``;
- dcm2niix ``-z n`` and the naive loop with 1 process too: how far conversion work by
  other tools scales from 1 to 2 processes on this machine (its memory and caches).

Every file is read once before the first timed run, so that no tool pays the disk reads
for the others. Prints files/s, MB/s, CPU seconds and ratios against each peer. Usage::

    python benchmarks/ingest.py --gb 2.0 --work /tmp/vxl-bench [--rounds 3]

Figures and method are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_archive(root: Path, gb: float, seed: int = 0) -> list[Path]:
    """Write ~`gb` GB of 512x512 CT series (reused across runs); return series folders."""
    from voxlake.testing import sample_specs, write_series

    marker = root / f"archive-{gb}.json"
    if marker.exists():
        return [Path(p) for p in json.loads(marker.read_text())]
    shutil.rmtree(root / "dicom", ignore_errors=True)
    base = next(s for s in sample_specs(seed=seed, profile="demo") if s.rows == 512)
    slice_bytes = 512 * 512 * 2
    target = int(gb * 1e9)
    folders, written, index = [], 0, 0
    while written < target:
        n = 120
        spec = dataclasses.replace(
            base,
            series_instance_uid=f"2.25.{10**20 + index}",
            study_instance_uid=f"2.25.{2 * 10**20 + index}",
            patient_id=f"BENCH{index:04d}",
            n_slices=n,
            shuffle_instance_numbers=False,
        )
        folder = root / "dicom" / f"S{index:04d}"
        write_series(spec, folder, seed=index)
        folders.append(folder)
        written += n * slice_bytes
        index += 1
        print(f"  generated {written / 1e9:.2f} GB", end="\r", flush=True)
    print()
    marker.write_text(json.dumps([str(f) for f in folders]))
    return folders


def dir_stats(folders: list[Path]) -> tuple[int, int]:
    files = [f for folder in folders for f in folder.rglob("*") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def timed(label: str, func) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    func()
    elapsed = time.perf_counter() - start
    print(f"  {label}: {elapsed:.1f} s")
    return elapsed


def _own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


#: What a worker has imported once it has run a header task and a volume task.
STACK = (
    "voxlake.ingest.pipeline", "pydicom", "pydicom.pixels", "zarr", "zarr.codecs",
    "numcodecs.blosc", "pyarrow", "pandas", "voxlake.catalog.tables",
)  # fmt: skip


def import_stack() -> None:
    import importlib

    for name in STACK:
        importlib.import_module(name)


def run_voxlake(
    archive: Path, work: Path, workers: int, codec: str | None = None, *, headers_only: bool = False
) -> tuple[float, float, float]:
    """Wall time of an ingest (cluster start included), the CPU seconds it took (this
    process (driver and scheduler), every worker, and the forkserver the workers were
    forked from, which imported the stack for them), and the wall time of ``ingest()``
    alone on the started cluster whose workers have imported the stack: what a run on a
    cluster that is already up (``--scheduler``) waits for. ``headers_only``: the catalog
    pass alone (``voxlake ingest --headers-only``), no store."""
    import psutil

    from voxlake.cluster import dask_client
    from voxlake.config import IngestConfig, StoreConfig
    from voxlake.ingest import ingest

    out = work / f"voxlake-{workers}w{'-headers' if headers_only else ''}"
    shutil.rmtree(out, ignore_errors=True)
    store = StoreConfig(codec=codec) if codec else StoreConfig()  # type: ignore[arg-type]
    config = IngestConfig(
        secret="benchmark",
        workers=workers,
        dashboard_address=":0",
        memory_limit="6GiB",
        store=store,
        headers_only=headers_only,
    )
    cpu = [0.0]
    started = [0.0]

    def go() -> None:
        driver = _own_cpu()
        with dask_client(config) as client:
            # A forked worker imported the stack in the forkserver; a spawned one (1
            # worker) would import it in its first task. Done here for both, so the
            # ingest-only time compares like with like (it is in the total either way).
            client.run(import_stack)
            began = time.perf_counter()
            report = ingest(
                [archive], catalog=out / "catalog",
                store=None if headers_only else out / "volumes.zarr", client=client, config=config,
            )  # fmt: skip
            started[0] = time.perf_counter() - began
            assert report.failures == 0, report.failures_by_code
            worker_cpu = sum(client.run(_own_cpu).values())
            parents = set(client.run(os.getppid).values()) - {os.getpid()}
            for pid in parents:  # the forkserver: its own time only, not its children's
                times = psutil.Process(pid).cpu_times()
                worker_cpu += times.user + times.system
        cpu[0] = _own_cpu() - driver + worker_cpu

    label = f"voxlake ingest{' --headers-only' if headers_only else ''}, {workers} worker(s)"
    elapsed = timed(label, go)
    print(f"    of which ingest() on the started cluster: {started[0]:.1f} s")
    _stop_forkserver()  # not timed
    return elapsed, cpu[0], started[0]


def _stop_forkserver() -> None:
    """Stop this process's forkserver (a private multiprocessing API; benchmark only), so
    that every run starts one afresh and pays its imports once, as every `voxlake ingest`
    command does, and its CPU time is counted in that run alone."""
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # type: ignore[attr-defined]


def warm_page_cache(folders: list[Path]) -> None:
    """Read every file once, so that no tool's run pays the disk reads for the others."""
    for folder in folders:
        for path in sorted(folder.iterdir()):
            with open(path, "rb") as handle:
                while handle.read(1 << 20):
                    pass


def worker_baseline_rss() -> int:
    """Current RSS (bytes) of an idle worker with voxlake's ingest modules imported."""
    from distributed import Client, LocalCluster

    def rss() -> int:
        import psutil

        import_stack()
        return int(psutil.Process().memory_info().rss)

    with (
        LocalCluster(n_workers=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        return int(next(iter(client.run(rss).values())))


class PeakWorkerRSS:
    """Samples the current RSS of this process's children (the Dask workers) every 50 ms.

    ``ru_maxrss`` is no use here: a child spawned by fork + exec starts from its parent's
    peak on Linux.
    """

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.05):
            for child in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    continue

    def __enter__(self) -> PeakWorkerRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_header_pass(folders: list[Path]) -> tuple[float, int, Any]:
    from voxlake.config import IngestConfig
    from voxlake.ingest.headers import read_headers
    from voxlake.ingest.sources import list_source

    refs = [r for folder in folders[:4] for r in list_source(folder)]
    config = IngestConfig(secret="benchmark")
    read_headers(refs[:8], secret="benchmark", config=config, run_id="warm-up")  # imports
    # In the page cache: this VM evicts files read minutes ago, and a disk read would be
    # counted as the parser's CPU.
    warm_page_cache(folders[:4])
    # CPU time of this process: "per core", and not inflated by other jobs on the machine.
    start = time.process_time()
    batch = read_headers(refs, secret="benchmark", config=config, run_id="bench")
    elapsed = time.process_time() - start
    assert not batch.failures
    return elapsed, len(refs), batch


#: Real scanner files for the header pass (GE and Siemens MR whose UIDs change length
#: from file to file): in ../shared beside the repository, when it is there.
REAL_HEADERS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "dcm_qa_nih" / "In"
)


def run_real_header_pass(root: Path = REAL_HEADERS) -> tuple[float, float, int] | None:
    """CPU seconds of `read_headers` on real files in one process, and of the peer: a
    plain pydicom header read (``dcmread(stop_before_pixels=True)``, no de-identification,
    hash or catalog row) of the same files; medians of 3, files in the page cache. None
    when the files are not there."""
    import pydicom

    from voxlake.config import IngestConfig
    from voxlake.ingest.headers import read_headers
    from voxlake.ingest.sources import list_source

    if not root.is_dir():
        return None
    refs = [ref for ref in list_source(root) if not ref.url.endswith(".txt")]  # READMEs
    paths = [ref.url for ref in refs]
    config = IngestConfig(secret="benchmark")
    read_headers(refs, secret="benchmark", config=config, run_id="warm-up")  # and the cache
    ours, theirs = [], []
    for _ in range(3):
        start = time.process_time()
        batch = read_headers(refs, secret="benchmark", config=config, run_id="bench")
        ours.append(time.process_time() - start)
        start = time.process_time()
        for path in paths:
            pydicom.dcmread(path, stop_before_pixels=True, force=True)
        theirs.append(time.process_time() - start)
    assert len(batch.instances) == len(refs), batch.failures
    return float(np.median(ours)), float(np.median(theirs)), len(refs)


def run_volume_stage(batch: Any, work: Path, codec: str | None) -> tuple[float, int]:
    """The volume tasks of ``batch``'s series in this process, in CPU time (with the
    pixel spans the header pass recorded, as an ingest run hands them over)."""
    import pandas as pd

    from voxlake.config import StoreConfig
    from voxlake.ingest.readers.dicom import build_volume
    from voxlake.ingest.readers.native import with_pixel_spans
    from voxlake.ingest.series import plan_volumes

    plans, failures = plan_volumes(pd.DataFrame(batch.instances))
    assert not failures
    plans = [with_pixel_spans(plan, batch.pixel_spans) for plan in plans]
    store = StoreConfig(codec=codec) if codec else StoreConfig()  # type: ignore[arg-type]
    out = work / "volume-stage"
    shutil.rmtree(out, ignore_errors=True)
    build_volume(plans[0], store_url=str(out / "warm-up"), store_config=store, run_id="warm-up",
                 max_file_bytes=1 << 30)  # fmt: skip
    start = time.process_time()
    for plan in plans:
        build_volume(plan, store_url=str(out), store_config=store, run_id="bench",
                     max_file_bytes=1 << 30)  # fmt: skip
    elapsed = time.process_time() - start
    shutil.rmtree(out, ignore_errors=True)
    return elapsed, sum(len(plan.slices) for plan in plans)


def run_dcm2niix(folders: list[Path], work: Path, compress: str, processes: int = 2) -> float:
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    out = work / f"dcm2niix-{compress}"

    def go() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        procs = []
        # ``processes`` at a time: dcm2niix is single-threaded per series.
        for folder in folders:
            procs.append(
                subprocess.Popen(
                    [
                        exe,
                        "-z",
                        compress,
                        "-b",
                        "n",
                        "-o",
                        str(out),
                        "-f",
                        folder.name,
                        str(folder),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            if len(procs) == processes:
                procs.pop(0).wait()
        for proc in procs:
            proc.wait()

    return timed(f"dcm2niix -z {compress} ({processes} process(es))", go)


def naive_series(folder: str, out: str) -> None:
    import pydicom

    slices = [pydicom.dcmread(f) for f in sorted(Path(folder).glob("*.dcm"))]
    normal = np.cross(*np.array(slices[0].ImageOrientationPatient, float).reshape(2, 3))
    slices.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))
    volume = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices]
    ).astype(np.int16)
    np.save(Path(out) / f"{Path(folder).name}.npy", volume)


def run_naive(folders: list[Path], work: Path, processes: int = 2) -> float:
    from concurrent.futures import ProcessPoolExecutor

    out = work / "naive"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def go() -> None:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(naive_series, [str(f) for f in folders], [str(out)] * len(folders)))

    return timed(f"naive pydicom loop ({processes} process(es))", go)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="archive size in GB")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vxl-bench"))
    parser.add_argument("--codec", default=None, help="store codec (default: the config's)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of every timed run (medians reported)"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"archive of ~{args.gb} GB of 512x512 CT in {args.work}")
    folders = make_archive(args.work, args.gb)
    n_files, n_bytes = dir_stats(folders)
    mb = n_bytes / 1e6
    print(f"{len(folders)} series, {n_files} files, {mb:.0f} MB; {os.cpu_count()} cores")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"store codec: {args.codec or 'default'}")
    warm_page_cache(folders)
    # Every tool once per round, in the same order: a machine that slows down mid-run
    # slows every tool of that round, and the medians keep one bad minute out.
    rounds: list[dict[str, float]] = []
    cpu: dict[int, list[float]] = {1: [], 2: []}
    running: dict[int, list[float]] = {1: [], 2: []}  # ingest() alone, cluster started
    peak = 0
    for number in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"round {number} of {args.rounds}")
        with PeakWorkerRSS() as memory:  # the Dask workers only, not the peers' processes
            one, cpu1, running1 = run_voxlake(args.work / "dicom", args.work, 1, args.codec)
            two, cpu2, running2 = run_voxlake(args.work / "dicom", args.work, 2, args.codec)
        peak = max(peak, memory.peak)
        cpu[1].append(cpu1)
        cpu[2].append(cpu2)
        running[1].append(running1)
        running[2].append(running2)
        rounds.append(
            {
                "voxlake 1 worker": one,
                "voxlake 2 workers": two,
                "voxlake headers only": run_voxlake(
                    args.work / "dicom", args.work, 2, args.codec, headers_only=True
                )[0],
                "dcm2niix -z n": run_dcm2niix(folders, args.work, "n"),
                "dcm2niix -z y": run_dcm2niix(folders, args.work, "y"),
                "naive pydicom loop": run_naive(folders, args.work),
                # The peers' own 1 -> 2 process scaling on this machine, in the same round:
                # how far two cores' memory and caches let conversion work scale at all.
                "dcm2niix -z n, 1 proc": run_dcm2niix(folders, args.work, "n", processes=1),
                "naive loop, 1 proc": run_naive(folders, args.work, processes=1),
            }
        )
    times = {name: float(np.median([r[name] for r in rounds])) for name in rounds[0]}
    cpu1, cpu2 = float(np.median(cpu[1])), float(np.median(cpu[2]))
    header_s, header_files, batch = run_header_pass(folders)
    real = run_real_header_pass()
    volume_s, volume_slices = run_volume_stage(batch, args.work, args.codec)
    baseline = worker_baseline_rss()
    largest = 120 * 512 * 512 * 2  # every generated series: 120 int16 slices of 512 x 512
    print()
    print(f"{'run':<22} {'s':>7} {'files/s':>9} {'MB/s':>8}")
    for name, seconds in times.items():
        print(f"{name:<22} {seconds:7.1f} {n_files / seconds:9.0f} {mb / seconds:8.0f}")
    cores = os.cpu_count() or 1
    print(
        f"header-only ingest (2 workers, wall, cluster start included): "
        f"{n_files / times['voxlake headers only'] / cores:.0f} files/s per core"
    )
    print(f"header-only pass (1 process, CPU time): {header_files / header_s:.0f} files/s per core")
    if real is not None:
        ours, theirs, n_real = real
        print(
            f"header-only pass on real MR (dcm_qa_nih, {n_real} files, 1 process, CPU time):"
            f" {n_real / ours:.0f} files/s per core; plain pydicom header read"
            f" {n_real / theirs:.0f} files/s per core ({theirs / ours:.2f}x)"
        )
    print(f"volume stage (1 process, CPU time): {volume_slices / volume_s:.0f} slices/s per core")
    print(f"CPU seconds (driver + workers): 1 worker {cpu1:.1f}, 2 workers {cpu2:.1f}")
    if args.rounds > 1:
        print(f"timed runs: medians of {args.rounds} rounds")
    print(
        f"peak worker RSS {peak / 1e6:.0f} MB; idle worker {baseline / 1e6:.0f} MB;"
        f" growth {(peak - baseline) / largest:.2f}x the largest volume ({largest / 1e6:.0f} MB)"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    best = times["voxlake 2 workers"]
    medians = "medians of the rounds; in brackets: lowest and highest within one round"
    print("\nratios (voxlake 2 workers as numerator, higher is better for voxlake):")
    if args.rounds > 1:
        print(f"  ({medians})")
    for peer in ("dcm2niix -z n", "dcm2niix -z y", "naive pydicom loop", "voxlake 1 worker"):
        label = "scaling 1 -> 2 workers" if peer == "voxlake 1 worker" else f"vs {peer}"
        within = [r[peer] / r["voxlake 2 workers"] for r in rounds]
        spread = f"  [{min(within):.2f}x to {max(within):.2f}x]" if args.rounds > 1 else ""
        print(f"  {label:<23} {times[peer] / best:5.2f}x{spread}")
    # Not the measure (that is the line above, cluster start included): what a run
    # on a cluster that is already up sees, from the same runs.
    within = [a / b for a, b in zip(running[1], running[2], strict=True)]
    spread = f"  [{min(within):.2f}x to {max(within):.2f}x]" if args.rounds > 1 else ""
    ratio = float(np.median(running[1])) / float(np.median(running[2]))
    print(f"  {'scaling, cluster up':<23} {ratio:5.2f}x{spread}")
    print("1 -> 2 processes for the peers (same machine and rounds; higher is better):")
    for two, one in (
        ("dcm2niix -z n", "dcm2niix -z n, 1 proc"), ("naive pydicom loop", "naive loop, 1 proc")
    ):  # fmt: skip
        within = [r[one] / r[two] for r in rounds]
        spread = f"  [{min(within):.2f}x to {max(within):.2f}x]" if args.rounds > 1 else ""
        print(f"  {two:<23} {times[one] / times[two]:5.2f}x{spread}")


if __name__ == "__main__":
    main()
