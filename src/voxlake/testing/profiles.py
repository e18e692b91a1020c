"""The series sets written by ``voxlake sample-data``: a demo archive and a tiny one.

Both profiles hold the same kinds of series (oblique, shuffled instance numbers,
non-trivial rescale, unsigned 12-bit storage, feet-first, implicit VR, MR without
rescale tags); ``tiny`` is small enough for unit tests, ``demo`` is big enough to train
on. Identifying values are unique, greppable strings (every one contains ``VXL`` or is
a birth date) so tests can byte-scan outputs for leaks.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.uid import ImplicitVRLittleEndian

from voxlake.testing.phantoms import SeriesSpec, uid_from_bytes

__all__ = ["sample_specs"]

_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_FEET_FIRST = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Rotation by the integer quaternion (49, 7, 7, 1) / 50: about 23 degrees around the
# axis (7, 7, 1). Entries are k / 2500, so the decimal header strings are exact and the
# direction cosines are orthonormal to float precision.
_OBLIQUE = (0.96, 0.0784, -0.2688, 0.0, 0.96, 0.28)

_PATIENTS = (
    ("DOE", "JANE", "F"),
    ("ROE", "RICHARD", "M"),
    ("SMITH", "ALICE", "F"),
    ("NGUYEN", "BAO", "M"),
    ("GARCIA", "MARIA", "F"),
    ("MUELLER", "KLAUS", "M"),
    ("OKAFOR", "CHIDI", "M"),
    ("TANAKA", "YUKI", "F"),
)
_SITES = (
    ("VXL ST MARY HOSPITAL", "12 VXL AVENUE^RIVERTON"),
    ("VXL NORTHGATE CLINIC", "340 VXL ROAD^LAKESIDE"),
)
# manufacturer -> (CT model, CT kernel, CT software, MR model, MR field, MR software)
_VENDORS = {
    "SIEMENS": ("SOMATOM Definition AS+", "B31f", "syngo CT VA48A", "MAGNETOM Skyra", 3.0, "E11"),
    "GE MEDICAL SYSTEMS": ("Revolution CT", "STANDARD", "revo_ct_22", "SIGNA Explorer", 1.5, "27"),
    "Philips": ("iCT 256", "B", "4.1.5", "Ingenia", 3.0, "5.6.1"),
}
_STANDARD = (1.0, -1024.0, 1, 16)  # slope, intercept, pixel representation, bits stored
_HALF = (0.5, -1024.0, 1, 16)  # non-trivial slope: Hounsfield units need float32
_U12 = (1.0, -1024.0, 0, 12)  # unsigned 12-bit CT storage
_MR16 = (1.0, 0.0, 0, 16)
_MR12 = (1.0, 0.0, 0, 12)


@dataclass(frozen=True)
class _Row:
    patient: int
    study: int
    modality: str
    part: str
    shape: tuple[int, int, int]  # rows, columns, slices
    spacing: tuple[float, float, float]  # row spacing, column spacing, slice spacing
    vendor: str
    storage: tuple[float, float, int, int]
    lesion: bool
    orientation: tuple[float, float, float, float, float, float] = _AXIAL
    shuffle: bool = False
    reverse: bool = False
    implicit: bool = False
    thickness: float | None = None
    write_rescale: bool = True


_DEMO = (
    _Row(0, 0, "CT", "CHEST", (256, 256, 80), (0.703125, 0.703125, 2.0), "SIEMENS", _STANDARD,
         False),
    _Row(0, 1, "CT", "CHEST", (512, 512, 64), (0.625, 0.625, 2.5), "SIEMENS", _STANDARD, True,
         shuffle=True),
    _Row(1, 0, "CT", "HEAD", (256, 256, 48), (0.859375, 0.859375, 3.0), "GE MEDICAL SYSTEMS",
         _STANDARD, True, reverse=True),
    _Row(1, 1, "MR", "HEAD", (256, 224, 30), (0.859375, 0.859375, 5.0), "GE MEDICAL SYSTEMS",
         _MR12, False, thickness=4.0, write_rescale=False),
    _Row(2, 0, "CT", "ABDOMEN", (256, 256, 100), (0.78125, 0.78125, 1.5), "Philips", _HALF, True),
    _Row(2, 1, "CT", "ABDOMEN", (256, 256, 40), (0.78125, 0.78125, 5.0), "Philips", _STANDARD,
         False, implicit=True),
    _Row(3, 0, "CT", "CHEST", (256, 256, 60), (0.75, 0.75, 2.0), "SIEMENS", _STANDARD, False,
         orientation=_OBLIQUE),
    _Row(3, 1, "CT", "CHEST", (256, 256, 120), (0.6640625, 0.6640625, 1.0), "GE MEDICAL SYSTEMS",
         _U12, True, thickness=1.25),
    _Row(4, 0, "MR", "HEAD", (256, 256, 36), (0.9, 0.9, 4.0), "Philips", _MR16, False),
    _Row(4, 1, "CT", "HEAD", (256, 256, 44), (0.8, 0.8, 3.0), "SIEMENS", _STANDARD, True),
    _Row(5, 0, "CT", "CHEST", (256, 256, 96), (0.7, 0.7, 1.25), "Philips", _STANDARD, True,
         orientation=_FEET_FIRST),
    _Row(6, 0, "CT", "ABDOMEN", (256, 256, 72), (0.8, 0.8, 2.5), "SIEMENS", _STANDARD, False,
         shuffle=True),
    _Row(7, 0, "CT", "CHEST", (256, 256, 56), (0.9, 0.9, 3.0), "GE MEDICAL SYSTEMS", _STANDARD,
         True),
)  # fmt: skip

_TINY = (
    _Row(0, 0, "CT", "CHEST", (48, 48, 12), (4.0, 4.0, 3.0), "SIEMENS", _STANDARD, True),
    _Row(0, 0, "CT", "CHEST", (32, 32, 8), (5.0, 5.0, 5.0), "SIEMENS", _STANDARD, False,
         orientation=_OBLIQUE),
    _Row(1, 0, "CT", "ABDOMEN", (40, 48, 10), (4.5, 4.0, 4.0), "Philips", _HALF, True,
         shuffle=True),
    _Row(1, 1, "CT", "ABDOMEN", (48, 48, 6), (4.0, 4.0, 5.0), "GE MEDICAL SYSTEMS", _U12, False,
         implicit=True),
    _Row(2, 0, "MR", "HEAD", (48, 40, 16), (4.0, 4.4, 4.0), "Philips", _MR16, True),
    _Row(2, 1, "CT", "HEAD", (32, 32, 14), (5.0, 5.0, 3.0), "SIEMENS", _STANDARD, False,
         reverse=True),
    _Row(3, 0, "CT", "CHEST", (64, 64, 16), (3.5, 3.5, 2.5), "Philips", _STANDARD, True,
         orientation=_FEET_FIRST, shuffle=True),
    _Row(3, 1, "MR", "HEAD", (32, 32, 10), (5.0, 5.0, 5.0), "GE MEDICAL SYSTEMS", _MR12, False,
         thickness=4.0, write_rescale=False),
)  # fmt: skip


def sample_specs(*, seed: int = 0, profile: Literal["demo", "tiny"] = "demo") -> list[SeriesSpec]:
    """The series of a sample archive.

    Parameters
    ----------
    seed
        Fixes every UID, name token, date and (with :func:`write_series`) every pixel.
    profile
        ``"demo"``: 8 patients, 13 series, about 140 MB of 256x256 CT/MR (one 512x512).
        ``"tiny"``: 4 patients, 8 series of 32-64 pixels and 6-16 slices, for tests.

    Returns
    -------
    list of SeriesSpec
        Grouped by patient, then study; series numbers are unique within a study.
    """
    if profile not in ("demo", "tiny"):
        raise ValueError(f"profile must be 'demo' or 'tiny', got {profile!r}")
    rows = _DEMO if profile == "demo" else _TINY
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x56584C]))
    n_patients = max(r.patient for r in rows) + 1
    tokens = [int(t) for t in rng.choice(np.arange(1000, 10000), size=n_patients, replace=False)]
    births = [
        dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365))) for _ in tokens
    ]
    first_study = [
        dt.date(2018, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3 * 365))) for _ in tokens
    ]
    studies: dict[tuple[int, int], tuple[str, dt.date, str]] = {}
    specs: list[SeriesSpec] = []
    series_counter: dict[tuple[int, int], int] = {}
    for row in rows:
        key = (row.patient, row.study)
        if key not in studies:
            date = first_study[row.patient] + dt.timedelta(
                days=row.study * int(rng.integers(90, 500))
            )
            studies[key] = (
                _uid(rng),
                date,
                f"{9 + int(rng.integers(0, 8)):02d}{int(rng.integers(0, 60)):02d}00",
            )
        series_counter[key] = series_counter.get(key, 1) + 1
        patient = (tokens[row.patient], births[row.patient])
        specs.append(_spec(row, rng, patient, studies[key], series_counter[key]))
    return specs


def _uid(rng: np.random.Generator) -> str:
    return uid_from_bytes(rng.bytes(16))


def _spec(
    row: _Row,
    rng: np.random.Generator,
    patient: tuple[int, dt.date],
    study: tuple[str, dt.date, str],
    series_number: int,
) -> SeriesSpec:
    token, birth = patient
    study_uid, study_date, study_time = study
    last, first, sex = _PATIENTS[row.patient]
    ct_model, kernel, ct_sw, mr_model, field, mr_sw = _VENDORS[row.vendor]
    site_name, site_address = _SITES[row.patient % len(_SITES)]
    n_rows, n_cols, n_slices = row.shape
    ps_row, ps_col, spacing = row.spacing
    slope, intercept, pixel_rep, bits = row.storage
    years = (study_date - birth).days // 365
    origin = _origin(row, float(rng.uniform(-20.0, 20.0)))
    ct = row.modality == "CT"
    title = {"CHEST": "Thorax", "HEAD": "Head", "ABDOMEN": "Abdomen"}[row.part]
    description = f"{title} {spacing:g}mm" + (" Oblique" if row.orientation == _OBLIQUE else "")
    return SeriesSpec(
        patient_id=f"VXLPID{token}",
        patient_name=f"{last}^{first}^VXL{token}",
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_sex=sex,
        patient_age=f"{years:03d}Y",
        study_instance_uid=study_uid,
        series_instance_uid=_uid(rng),
        frame_of_reference_uid=_uid(rng),
        accession_number=f"VXLACC{token}{row.study + 1:02d}",
        study_id=f"VXLST{token}{row.study + 1}",
        study_date=study_date.strftime("%Y%m%d"),
        study_time=study_time,
        study_description=f"{row.modality} {title}",
        modality=row.modality,
        series_description=description if ct else f"Ax T1 SE {title}",
        series_number=series_number,
        rows=n_rows,
        columns=n_cols,
        n_slices=n_slices,
        pixel_spacing=(ps_row, ps_col),
        slice_spacing=spacing,
        slice_thickness=row.thickness,
        orientation=row.orientation,
        origin=origin,
        rescale_slope=slope,
        rescale_intercept=intercept,
        pixel_representation=pixel_rep,
        bits_stored=bits,
        write_rescale=row.write_rescale,
        lesion=row.lesion,
        shuffle_instance_numbers=row.shuffle,
        reverse_slice_direction=row.reverse,
        transfer_syntax=str(ImplicitVRLittleEndian) if row.implicit else SeriesSpec.transfer_syntax,
        noise_sd=float(rng.uniform(10.0, 20.0)),
        body_part=row.part,
        patient_position="FFS" if row.orientation == _FEET_FIRST else "HFS",
        manufacturer=row.vendor,
        manufacturer_model=ct_model if ct else mr_model,
        software_versions=ct_sw if ct else mr_sw,
        station_name=f"VXLSTN{token}{row.study + 1}",
        device_serial_number=f"VXLSN{token}{row.modality}",
        institution_name=site_name,
        institution_address=site_address,
        patient_address=f"{token % 97 + 1} VXL{token} STREET^SPRINGFIELD",
        referring_physician_name=f"VXLREF{token}^MORGAN",
        operators_name=f"VXLOP{token}^SAM",
        patient_weight=float(round(rng.uniform(50.0, 100.0), 1)),
        patient_size=float(round(rng.uniform(1.5, 1.95), 2)),
        kvp=100.0 if row.part == "HEAD" else 120.0,
        xray_tube_current=int(rng.integers(150, 400)),
        convolution_kernel=kernel,
        echo_time=15.0 if field < 2 else 9.5,
        repetition_time=float(rng.choice([450.0, 500.0, 600.0])),
        field_strength=field,
        flip_angle=90.0,
    )


def _origin(row: _Row, table_offset: float) -> tuple[float, float, float]:
    """First spatial slice position, chosen so the grid centre sits near the isocentre."""
    n_rows, n_cols, n_slices = row.shape
    ps_row, ps_col, spacing = row.spacing
    r = np.asarray(row.orientation[:3])
    c = np.asarray(row.orientation[3:])
    n = np.cross(r, c)
    centre = np.array(
        [0.0, round(table_offset, 1), {"HEAD": 40.0, "CHEST": -150.0}.get(row.part, -350.0)]
    )
    half = (
        r * ps_col * (n_cols - 1) / 2
        + c * ps_row * (n_rows - 1) / 2
        + n * spacing * (n_slices - 1) / 2
    )
    x, y, z = (round(float(v), 4) + 0.0 for v in centre - half)
    return (x, y, z)
