"""Fidelity benchmark: voxlake's volumes against every reference NIfTI in a data folder.

Runs :func:`voxlake.ingest.verify.verify` (the same as ``voxlake verify``) and prints one
line per reference, ``matched N of M`` and the wall-clock time. With no arguments it uses
``../shared/data/real`` (dcm2niix and dicom2nifti references; see its SOURCES.md)::

    python benchmarks/fidelity.py                      # ../shared/data/real
    python benchmarks/fidelity.py INPUT_DIR REFERENCE_DIR --workers 2

Exits 1 unless every reference matches. docs/series-assembly.md explains the rules and
the references that cannot match.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("reference_dir", nargs="?", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    from voxlake.config import IngestConfig
    from voxlake.ingest.verify import verify

    started = time.perf_counter()
    report = verify(
        args.input_dir,
        args.reference_dir or args.input_dir,
        config=IngestConfig(workers=args.workers, dashboard_address=":0"),
    )
    for line in report.lines():
        print(line)
    print(f"{time.perf_counter() - started:.1f} s for {report.total} references")
    return 0 if report.matched == report.total else 1


if __name__ == "__main__":
    sys.exit(main())
