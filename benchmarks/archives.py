"""Archive benchmark: voxlake ingest straight from zip, tar and tar.gz, against extracting
the archive first and ingesting the folder (what users do otherwise), in one run.

Generates (once, cached) 512x512 CT series with voxlake's synthetic factory (the
archive of ``benchmarks/ingest.py``), packs them into ``.zip`` (stored, as DICOM exports
usually are: the pixels barely compress), ``.tar`` and ``.tar.gz`` (member order as on
disk), then measures with 2 local workers, cluster start included, fresh catalog and
store each time:

- voxlake ingest of the folder (the reference: no archive at all);
- voxlake ingest of each archive, member by member;
- for the tar.gz: ``tar xzf`` into a scratch folder, then voxlake ingest of that folder.

Every archive and file is read once before the first timed run (page cache). Prints
seconds, files/s and ratios. Usage::

    python benchmarks/archives.py --gb 0.5 --work /tmp/vxl-bench [--rounds 3]

Figures and method are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import dir_stats, make_archive  # the same generated series


def pack(folders: list[Path], work: Path) -> dict[str, Path]:
    """The series as .zip, .tar and .tar.gz under `work` (made once)."""
    root = folders[0].parent
    out = {}
    for kind in ("zip", "tar", "tar.gz"):
        path = work / f"archive-{len(folders)}.{kind}"
        out[kind] = path
        if path.exists():
            continue
        partial = path.with_name(path.name + ".partial")
        if kind == "zip":
            with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
                for folder in folders:
                    for file in sorted(folder.iterdir()):
                        archive.write(file, file.relative_to(root).as_posix())
        else:
            with tarfile.open(partial, "w:gz" if kind == "tar.gz" else "w") as archive:
                for folder in folders:
                    archive.add(folder, folder.relative_to(root).as_posix())
        partial.replace(path)
    return out


def read_once(path: Path) -> None:
    for file in [path] if path.is_file() else sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb") as handle:
                while handle.read(1 << 20):
                    pass


def ingest_seconds(sources: list[Path], work: Path) -> float:
    out = work / "archives-out"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable, "-m", "voxlake.cli", "ingest", *map(str, sources),
            "--catalog", str(out / "catalog"), "--store", str(out / "volumes.zarr"),
            "--workers", "2", "--secret", "benchmark",
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - start


def extract_then_ingest(archive: Path, work: Path) -> float:
    scratch = work / "archives-extracted"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    start = time.perf_counter()
    subprocess.run(["tar", "xzf", str(archive), "-C", str(scratch)], check=True)
    extracted = time.perf_counter() - start
    total = extracted + ingest_seconds([scratch], work)
    shutil.rmtree(scratch)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=0.5, help="size of the series in GB")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vxl-bench"))
    parser.add_argument("--rounds", type=int, default=1, help="rounds (medians reported)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = make_archive(args.work, args.gb)
    n_files, n_bytes = dir_stats(folders)
    archives = pack(folders, args.work)
    sizes = ", ".join(f"{kind} {p.stat().st_size / 1e6:.0f} MB" for kind, p in archives.items())
    print(f"{len(folders)} series, {n_files} files, {n_bytes / 1e6:.0f} MB; {sizes}")
    print(f"{os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.2f}")
    for folder in folders:  # not their parent: it holds every size's series made so far
        read_once(folder)
    for path in archives.values():
        read_once(path)
    runs: dict[str, list[float]] = {}
    for number in range(1, args.rounds + 1):
        print(f"round {number} of {args.rounds}")
        timings = {
            "folder": ingest_seconds(folders, args.work),
            **{kind: ingest_seconds([path], args.work) for kind, path in archives.items()},
            "tar xzf, then folder": extract_then_ingest(archives["tar.gz"], args.work),
        }
        for name, seconds in timings.items():
            print(f"  {name}: {seconds:.1f} s")
            runs.setdefault(name, []).append(seconds)
    median = {name: float(np.median(values)) for name, values in runs.items()}
    print(f"\n{'source':<22} {'s':>7} {'files/s':>9} {'vs folder':>10}")
    for name, seconds in median.items():
        ratio = median["folder"] / seconds
        print(f"{name:<22} {seconds:7.1f} {n_files / seconds:9.0f} {ratio:9.2f}x")
    direct, extracted = median["tar.gz"], median["tar xzf, then folder"]
    print(f"\ntar.gz read directly against extracting it first: {extracted / direct:.2f}x")
    if args.rounds > 1:
        print(f"(medians of {args.rounds} rounds)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
