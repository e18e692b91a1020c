"""Long fuzz run: random mutants of real and generated DICOM through the ingest stages.

The CI tests (tests/hostile/test_fuzz.py) run a few hundred mutants; this runs for as
long as you let it. Each iteration mutates one seed file (voxlake.testing.mutate: bit
flips, truncation, element deletion, hostile values), runs the header stage on it, and
every fourth iteration also plans and builds a 4-slice series containing the mutant, in
process. A mutant is a *finding* when a stage raises anything but a coded VoxlakeError,
produces a code docs/reliability.md does not document, loses a file, or takes longer
than ``--slow`` seconds. Findings are saved under ``--out`` (mutant bytes + a JSON note,
no header values) so they can be replayed and added to the hostile corpus. Usage::

    python benchmarks/fuzz.py --minutes 60 --out /tmp/vxl-fuzz [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
REAL_SEEDS = [
    *(REAL / "dcm_qa_ts" / "In").glob("*.dcm"),
    REAL / "dcm_qa_enh" / "In" / "Siemens" / "XA10" / "6_1.dcm",
    REAL / "dcm_qa_enh" / "In" / "Philips" / "IM_0027_fMAP.dcm",
]


def documented_codes() -> set[str]:
    text = (REPO / "docs" / "reliability.md").read_text().split("## Re-running is safe")[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE))


def generated_series(root: Path) -> dict[str, list[Path]]:
    from voxlake.testing.hostile import spec_for
    from voxlake.testing.synthetic import write_series

    out = {}
    for name, syntax in (
        ("explicit", "1.2.840.10008.1.2.1"),
        ("implicit", "1.2.840.10008.1.2"),
        ("rle", "1.2.840.10008.1.2.5"),
    ):
        written = write_series(spec_for(f"fuzz-{name}", transfer_syntax=syntax), root / name)
        out[name] = list(written.files)
    return out


def header_stage(path: Path, config) -> list[str]:
    from voxlake.testing.mutate import run_stages

    return run_stages([path], path.parent, config, build=False).codes


def series_stage(files: list[Path], store: Path, config) -> list[str]:
    from voxlake.testing.mutate import run_stages

    return run_stages(files, store, config).codes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow", type=float, default=20.0, help="seconds per mutant")
    args = parser.parse_args()

    from voxlake.config import IngestConfig
    from voxlake.testing.mutate import mutate

    config = IngestConfig(secret="fuzz-secret", max_file_bytes=64 * 1024**2, max_voxels=10**8)
    known = documented_codes()
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="vxl-fuzz-"))
    series = generated_series(work / "seeds")
    seeds = {p.name: p.read_bytes() for p in REAL_SEEDS if p.exists()}
    seeds.update({f"generated-{k}": v[1].read_bytes() for k, v in series.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.minutes
    done = findings = 0
    codes: dict[str, int] = {}
    print(f"{len(seeds)} seeds, {args.minutes:g} min, findings -> {args.out}")
    while time.monotonic() < deadline:
        whole_series = done % 4 == 3
        name = rng.choice(sorted(series)) if whole_series else rng.choice(sorted(seeds))
        source = series[name][1].read_bytes() if whole_series else seeds[name]
        mutant, what = mutate(source, rng)
        start = time.monotonic()
        problem = None
        try:
            if whole_series:
                folder = work / "series"
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                files = []
                for index, path in enumerate(series[name]):
                    target = folder / path.name
                    target.write_bytes(mutant if index == 1 else path.read_bytes())
                    files.append(target)
                got = series_stage(files, work / "store", config)
            else:
                target = work / "mutant.dcm"
                target.write_bytes(mutant)
                got = header_stage(target, config)
            for code in got:
                codes[code] = codes.get(code, 0) + 1
            unknown = sorted(set(got) - known)
            if unknown:
                problem = f"undocumented codes {unknown}"
        except BaseException as exc:  # a finding, whatever it is (a Rust panic included)
            if isinstance(exc, KeyboardInterrupt):
                break
            problem = f"{type(exc).__name__}: {traceback.format_exc(limit=3)[-600:]}"
        elapsed = time.monotonic() - start
        if problem is None and elapsed > args.slow:
            problem = f"slow: {elapsed:.1f}s"
        if problem is not None:
            findings += 1
            stem = args.out / f"finding-{findings:04d}"
            stem.with_suffix(".dcm").write_bytes(mutant)
            note = {"seed": name, "mutation": what, "series": whole_series, "problem": problem}
            stem.with_suffix(".json").write_text(json.dumps(note, indent=1))
        done += 1
        if done % 200 == 0:
            print(f"  {done} mutants, {findings} findings", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"{done} mutants, {findings} findings; codes: {json.dumps(codes, sort_keys=True)}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
