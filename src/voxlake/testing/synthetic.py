"""Write synthetic DICOM series with known geometry and known pixels.

:func:`write_series` writes one :class:`SeriesSpec` as single-frame CT or MR Image
Storage files; :func:`generate_sample_data` writes a whole archive (DICOM tree plus
``labels.csv``) from :func:`sample_specs`. Everything is a pure function of the seed:
same seed, byte-identical files. What a correct ingest must produce is recomputed on
demand by :meth:`WrittenSeries.expected_volume` and :meth:`WrittenSeries.expected_affine`.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)
from pydicom.valuerep import format_number_as_ds

from voxlake.testing.phantoms import SeriesSpec, derive_uid, spec_rng, stored_volume
from voxlake.testing.profiles import sample_specs

__all__ = [
    "PRIVATE_CREATOR",
    "SampleManifest",
    "WrittenSeries",
    "generate_sample_data",
    "write_series",
]

PRIVATE_CREATOR = "VOXLAKE TEST"
_IMPLEMENTATION_UID = "2.25.255099226432011938219406383964313040906"
_TRANSFER_SYNTAXES = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), str(RLELossless))


@dataclass(frozen=True)
class WrittenSeries:
    """A series on disk and what a correct ingest must make of it.

    Attributes
    ----------
    spec
        What was written.
    files
        The files, in spatial order (sorted along the slice normal).
    seed
        The seed the pixels and SOPInstanceUIDs were made from.
    instance_numbers
        InstanceNumber of each file, in spatial order.
    sop_instance_uids
        SOPInstanceUID of each file, in spatial order.
    """

    spec: SeriesSpec
    files: tuple[Path, ...]
    seed: int = 0
    instance_numbers: tuple[int, ...] = ()
    sop_instance_uids: tuple[str, ...] = ()

    @property
    def label(self) -> int:
        """1 if the phantom holds a lesion, else 0."""
        return int(self.spec.lesion)

    def expected_volume(self) -> np.ndarray:
        """The volume a correct ingest stores: ``stored * slope + intercept``.

        Returns
        -------
        numpy.ndarray
            Shape ``(z, y, x)`` in spatial order; int16 when slope and intercept are
            integers and every value fits in int16, else float32. Recomputed on each
            call from (spec, seed), nothing is cached.
        """
        spec = self.spec
        values = stored_volume(spec, seed=self.seed).astype(np.float64)
        values = values * spec.rescale_slope + spec.rescale_intercept
        integral = (
            float(spec.rescale_slope).is_integer() and float(spec.rescale_intercept).is_integer()
        )
        info = np.iinfo(np.int16)
        if integral and values.min() >= info.min and values.max() <= info.max:
            return values.astype(np.int16)
        return values.astype(np.float32)

    def expected_affine(self) -> np.ndarray:
        """The 4x4 RAS affine of the spatially sorted volume (DESIGN.md, volume store).

        Returns
        -------
        numpy.ndarray
            Columns: row direction x PixelSpacing[1], column direction x
            PixelSpacing[0], slice normal x slice spacing, first slice position; all
            converted from LPS to RAS.
        """
        return self.spec.ras_affine()

    def identifiers(self) -> tuple[str, ...]:
        """Every identifying string value written into this series' headers."""
        spec = self.spec
        values = (
            spec.patient_name,
            spec.patient_id,
            spec.patient_birth_date,
            spec.patient_address,
            spec.accession_number,
            spec.study_id,
            spec.institution_name,
            spec.institution_address,
            spec.referring_physician_name,
            spec.operators_name,
            spec.station_name,
            spec.device_serial_number,
            spec.study_instance_uid,
            spec.series_instance_uid,
            spec.frame_of_reference,
            *self.sop_instance_uids,
        )
        return tuple(dict.fromkeys(v for v in values if v))


@dataclass(frozen=True)
class SampleManifest:
    """What :func:`generate_sample_data` wrote.

    Attributes
    ----------
    root
        The output folder; DICOM files are under ``root / "dicom"``.
    series
        Every series, in the order of :func:`sample_specs`.
    labels_csv
        ``PatientID,StudyInstanceUID,SeriesInstanceUID,label`` keyed by the original
        identifiers.
    planted_identifiers
        Every identifying string written into any header (names, IDs, birth dates,
        addresses, institutions, physicians, accession numbers, station names, serial
        numbers, all original UIDs), for leak scans of outputs.
    """

    root: Path
    series: tuple[WrittenSeries, ...]
    labels_csv: Path
    planted_identifiers: tuple[str, ...]


def write_series(
    spec: SeriesSpec, out_dir: str | os.PathLike[str], *, seed: int = 0, preamble: bool = True
) -> WrittenSeries:
    """Write one series as single-frame files ``IM0001.dcm``, ... in ``out_dir``.

    Files are numbered by InstanceNumber, which is not spatial order when
    ``spec.shuffle_instance_numbers`` or ``spec.reverse_slice_direction`` is set.

    Parameters
    ----------
    spec
        The series.
    out_dir
        Folder for the files; created if missing, existing files of the same name are
        overwritten.
    seed
        Fixes the pixels (noise, lesion) and the SOPInstanceUIDs.
    preamble
        ``True``: DICOM File Format (preamble, ``DICM``, file meta) in
        ``spec.transfer_syntax``. ``False``: the bare dataset in implicit VR little
        endian, no preamble and no file meta (readers need ``force=True``).

    Returns
    -------
    WrittenSeries
    """
    if spec.transfer_syntax not in _TRANSFER_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {spec.transfer_syntax}")
    if not preamble and spec.transfer_syntax == str(RLELossless):
        raise ValueError("files without preamble are written uncompressed (implicit VR)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = stored_volume(spec, seed=seed)
    numbers = _instance_numbers(spec, seed)
    uids = [derive_uid(spec.series_instance_uid, f"sop|{seed}|{k}") for k in range(spec.n_slices)]
    files = []
    for k, position in enumerate(spec.slice_positions()):
        ds = _slice_dataset(spec, stored[k], position, numbers[k], uids[k])
        path = out_dir / f"IM{numbers[k]:04d}.dcm"
        if preamble:
            ds.file_meta = _file_meta(spec, uids[k])
            if spec.transfer_syntax == str(RLELossless):
                ds.compress(RLELossless, stored[k], encoding_plugin="pydicom")
            dcmwrite(path, ds, enforce_file_format=True)
        else:
            dcmwrite(path, ds, implicit_vr=True, little_endian=True)
        files.append(path)
    return WrittenSeries(
        spec=spec,
        files=tuple(files),
        seed=seed,
        instance_numbers=tuple(numbers),
        sop_instance_uids=tuple(uids),
    )


def generate_sample_data(
    out: str | os.PathLike[str], *, seed: int = 0, profile: Literal["demo", "tiny"] = "demo"
) -> SampleManifest:
    """Write a sample archive: ``<out>/dicom/P001/ST01/SE002/IM0001.dcm`` and labels.

    Folder names are non-identifying (patient and study counters, SeriesNumber).
    Existing files of the same names are overwritten; nothing else is removed.

    Parameters
    ----------
    out
        Output folder, created if missing.
    seed
        Same seed, byte-identical files.
    profile
        ``"demo"`` (about 140 MB, what ``voxlake sample-data`` writes) or ``"tiny"``.

    Returns
    -------
    SampleManifest
    """
    root = Path(out)
    patients: dict[str, int] = {}
    studies: dict[str, int] = {}
    written = []
    for spec in sample_specs(seed=seed, profile=profile):
        patient = patients.setdefault(spec.patient_id, len(patients) + 1)
        study_numbers = [k for k in studies if k.startswith(f"{patient}|")]
        study = studies.setdefault(f"{patient}|{spec.study_instance_uid}", len(study_numbers) + 1)
        folder = (
            root / "dicom" / f"P{patient:03d}" / f"ST{study:02d}" / f"SE{spec.series_number:03d}"
        )
        written.append(write_series(spec, folder, seed=seed))
    labels = root / "labels.csv"
    with labels.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "label"])
        for ws in written:
            s = ws.spec
            writer.writerow([s.patient_id, s.study_instance_uid, s.series_instance_uid, ws.label])
    planted = dict.fromkeys(v for ws in written for v in ws.identifiers())
    return SampleManifest(
        root=root, series=tuple(written), labels_csv=labels, planted_identifiers=tuple(planted)
    )


def _ds(value: float) -> str:
    """A DS string that parses back to ``value`` when it fits in 16 characters."""
    value = float(value) + 0.0  # no "-0"
    text = str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return text if len(text) <= 16 else format_number_as_ds(value)


def _instance_numbers(spec: SeriesSpec, seed: int) -> list[int]:
    """InstanceNumber of each slice, indexed by spatial position."""
    n = spec.n_slices
    ordered = list(range(1, n + 1))
    if spec.shuffle_instance_numbers and n > 1:
        rng = spec_rng(spec, seed, 4)
        while True:
            perm = [int(p) + 1 for p in rng.permutation(n)]
            if perm != ordered and (n < 3 or perm != ordered[::-1]):
                return perm
    return ordered[::-1] if spec.reverse_slice_direction else ordered


def _time(base: str, seconds: float) -> str:
    start = dt.datetime.strptime(base[:6], "%H%M%S") + dt.timedelta(seconds=seconds)
    return start.strftime("%H%M%S.%f")[:10]


def _file_meta(spec: SeriesSpec, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if spec.modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(spec.transfer_syntax)
    meta.ImplementationClassUID = UID(_IMPLEMENTATION_UID)
    meta.ImplementationVersionName = "VOXLAKE_TEST"
    return meta


def _slice_dataset(
    spec: SeriesSpec, pixels: np.ndarray, position: np.ndarray, number: int, sop_uid: str
) -> Dataset:
    ct = spec.modality == "CT"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    oblique = not np.allclose(np.abs(spec.orientation), np.round(np.abs(spec.orientation)))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OBLIQUE" if oblique else "AXIAL"]
    if not ct:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = CTImageStorage if ct else MRImageStorage
    ds.SOPInstanceUID = sop_uid
    series_time = _time(spec.study_time, 60 * spec.series_number)
    acquisition_time = _time(spec.study_time, 60 * spec.series_number + 0.5 * number)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = spec.study_date
    ds.InstanceCreationDate = spec.study_date
    ds.StudyTime = _time(spec.study_time, 0)
    ds.SeriesTime = ds.InstanceCreationTime = series_time
    ds.AcquisitionTime = ds.ContentTime = acquisition_time
    ds.AccessionNumber = spec.accession_number
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.InstitutionName = spec.institution_name
    ds.InstitutionAddress = spec.institution_address
    ds.ReferringPhysicianName = spec.referring_physician_name
    ds.StationName = spec.station_name
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = spec.series_description
    ds.OperatorsName = spec.operators_name
    ds.ManufacturerModelName = spec.manufacturer_model
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    ds.PatientAge = spec.patient_age
    ds.PatientSize = _ds(spec.patient_size)
    ds.PatientWeight = _ds(spec.patient_weight)
    ds.PatientAddress = spec.patient_address
    ds.BodyPartExamined = spec.body_part
    ds.SliceThickness = _ds(spec.thickness)
    ds.DeviceSerialNumber = spec.device_serial_number
    ds.SoftwareVersions = spec.software_versions
    ds.PatientPosition = spec.patient_position
    if ct:
        ds.KVP = _ds(spec.kvp)
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds(round(spec.columns * spec.pixel_spacing[1], 4))
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "160"
        ds.RotationDirection = "CW"
        ds.ExposureTime = str(spec.exposure_time)
        ds.XRayTubeCurrent = str(spec.xray_tube_current)
        ds.Exposure = str(spec.xray_tube_current * spec.exposure_time // 1000)
        ds.FilterType = "BODY FILTER"
        ds.ConvolutionKernel = spec.convolution_kernel
    else:
        ds.ScanningSequence = spec.scanning_sequence
        ds.SequenceVariant = "SK"
        ds.ScanOptions = "SAT"
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = _ds(spec.repetition_time)
        ds.EchoTime = _ds(spec.echo_time)
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = _ds(round(42.577478 * spec.field_strength, 6))
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.MagneticFieldStrength = _ds(spec.field_strength)
        ds.SpacingBetweenSlices = _ds(spec.slice_spacing)
        ds.EchoTrainLength = "1"
        ds.PixelBandwidth = "190"
        ds.ReceiveCoilName = "HEAD"
        ds.FlipAngle = _ds(spec.flip_angle)
    ds.StudyInstanceUID = spec.study_instance_uid
    ds.SeriesInstanceUID = spec.series_instance_uid
    ds.StudyID = spec.study_id
    ds.SeriesNumber = str(spec.series_number)
    ds.AcquisitionNumber = "1"
    ds.InstanceNumber = str(number)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in spec.orientation]
    ds.FrameOfReferenceUID = spec.frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(round(float(position @ spec.slice_normal), 6))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = [_ds(v) for v in spec.pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = spec.pixel_representation
    centre, width = _window(spec)
    ds.WindowCenter = _ds(centre)
    ds.WindowWidth = _ds(width)
    if spec.write_rescale:
        ds.RescaleIntercept = _ds(spec.rescale_intercept)
        ds.RescaleSlope = _ds(spec.rescale_slope)
        ds.RescaleType = "HU" if ct else "US"
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", spec.patient_name)
    block.add_new(0x02, "LO", spec.patient_id)
    block.add_new(0x10, "SH", "SYNTHETIC")
    dtype = "<i2" if spec.pixel_representation else "<u2"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _window(spec: SeriesSpec) -> tuple[float, float]:
    if spec.modality == "MR":
        return 600.0, 1200.0
    return {"HEAD": (40.0, 80.0), "CHEST": (-600.0, 1500.0)}.get(spec.body_part, (40.0, 400.0))
