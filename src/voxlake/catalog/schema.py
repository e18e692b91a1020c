"""The catalog's tables: pyarrow schemas and column descriptions, defined once.

Everything that writes or documents the catalog reads this module: the ingest workers
build rows from :data:`DICOM_COLUMNS`, the tables are created from :data:`SCHEMAS`,
``voxlake catalog schema-doc`` renders ``docs/catalog-schema.md`` from it, and every
column's description is stored in the Delta table's field metadata.

Column names are snake_case DICOM keywords where a column mirrors one attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

__all__ = [
    "DICOM_COLUMNS",
    "SCHEMAS",
    "TABLE_DESCRIPTIONS",
    "TABLE_KEYS",
    "Column",
    "render_schema_markdown",
    "schema_for",
]

Kind = Literal["str", "int", "float", "floats", "strs", "date", "bool"]

_ARROW: dict[str, pa.DataType] = {
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "floats": pa.list_(pa.float64()),
    "strs": pa.list_(pa.string()),
    "date": pa.date32(),
    "bool": pa.bool_(),
    "ints": pa.list_(pa.int64()),
    "ts": pa.timestamp("us", tz="UTC"),
}


@dataclass(frozen=True)
class Column:
    """One catalog column: name, arrow kind, description, and the DICOM keyword it mirrors."""

    name: str
    kind: str
    description: str
    keyword: str | None = None

    @property
    def arrow_type(self) -> pa.DataType:
        return _ARROW[self.kind]

    def field(self) -> pa.Field:
        return pa.field(
            self.name, self.arrow_type, nullable=True, metadata={"description": self.description}
        )


def _dicom(name: str, keyword: str, kind: str, description: str) -> Column:
    return Column(name, kind, description, keyword)


#: Typed columns copied from the (de-identified) header of every instance.
DICOM_COLUMNS: tuple[Column, ...] = (
    _dicom("sop_class_uid", "SOPClassUID", "str", "SOP Class UID (what kind of object)."),
    _dicom("modality", "Modality", "str", "Modality (CT, MR, PT, ...)."),
    _dicom("manufacturer", "Manufacturer", "str", "Equipment manufacturer."),
    _dicom("manufacturer_model_name", "ManufacturerModelName", "str", "Scanner model."),
    _dicom("software_versions", "SoftwareVersions", "strs", "Scanner software versions."),
    _dicom("body_part_examined", "BodyPartExamined", "str", "Body part examined."),
    _dicom("study_description", "StudyDescription", "str", "Study description (free text)."),
    _dicom("series_description", "SeriesDescription", "str", "Series description (free text)."),
    _dicom("protocol_name", "ProtocolName", "str", "Acquisition protocol name."),
    _dicom("series_number", "SeriesNumber", "int", "Series number within the study."),
    _dicom("instance_number", "InstanceNumber", "int", "Instance number (never used to sort)."),
    _dicom("acquisition_number", "AcquisitionNumber", "int", "Acquisition number."),
    _dicom(
        "temporal_position_identifier",
        "TemporalPositionIdentifier",
        "int",
        "Temporal position (dynamic / fMRI series).",
    ),
    _dicom("image_type", "ImageType", "strs", "Image type values (ORIGINAL/DERIVED, M/P, ...)."),
    _dicom("rows", "Rows", "int", "Rows per frame."),
    _dicom("columns", "Columns", "int", "Columns per frame."),
    _dicom("number_of_frames", "NumberOfFrames", "int", "Frames in a multi-frame instance."),
    _dicom("samples_per_pixel", "SamplesPerPixel", "int", "Samples per pixel (3 for RGB)."),
    _dicom(
        "photometric_interpretation",
        "PhotometricInterpretation",
        "str",
        "Photometric interpretation (MONOCHROME2, RGB, ...).",
    ),
    _dicom("bits_allocated", "BitsAllocated", "int", "Bits allocated per sample."),
    _dicom("bits_stored", "BitsStored", "int", "Bits stored per sample."),
    _dicom("pixel_representation", "PixelRepresentation", "int", "0 unsigned, 1 signed."),
    _dicom("pixel_spacing", "PixelSpacing", "floats", "Row and column spacing in mm."),
    _dicom("slice_thickness", "SliceThickness", "float", "Nominal slice thickness in mm."),
    _dicom(
        "spacing_between_slices", "SpacingBetweenSlices", "float", "Declared slice spacing in mm."
    ),
    _dicom(
        "image_position_patient",
        "ImagePositionPatient",
        "floats",
        "Centre of the first voxel in patient coordinates (LPS, mm).",
    ),
    _dicom(
        "image_orientation_patient",
        "ImageOrientationPatient",
        "floats",
        "Row and column direction cosines (LPS).",
    ),
    _dicom("slice_location", "SliceLocation", "float", "Slice location in mm (informative)."),
    _dicom("rescale_slope", "RescaleSlope", "float", "Rescale slope to output units."),
    _dicom("rescale_intercept", "RescaleIntercept", "float", "Rescale intercept."),
    _dicom("rescale_type", "RescaleType", "str", "Output units of the rescale (HU, US, ...)."),
    _dicom("window_center", "WindowCenter", "floats", "Suggested display window centre(s)."),
    _dicom("window_width", "WindowWidth", "floats", "Suggested display window width(s)."),
    _dicom("kvp", "KVP", "float", "CT peak kilovoltage."),
    _dicom("xray_tube_current", "XRayTubeCurrent", "float", "CT tube current in mA."),
    _dicom("exposure", "Exposure", "float", "CT exposure in mAs."),
    _dicom("exposure_time", "ExposureTime", "float", "Exposure time in ms."),
    _dicom("convolution_kernel", "ConvolutionKernel", "strs", "CT reconstruction kernel."),
    _dicom("reconstruction_diameter", "ReconstructionDiameter", "float", "Recon FOV in mm."),
    _dicom("gantry_detector_tilt", "GantryDetectorTilt", "float", "Declared gantry tilt (deg)."),
    _dicom("contrast_bolus_agent", "ContrastBolusAgent", "str", "Contrast agent, if any."),
    _dicom("magnetic_field_strength", "MagneticFieldStrength", "float", "MR field strength in T."),
    _dicom("repetition_time", "RepetitionTime", "float", "MR repetition time TR in ms."),
    _dicom("echo_time", "EchoTime", "float", "MR echo time TE in ms."),
    _dicom("inversion_time", "InversionTime", "float", "MR inversion time TI in ms."),
    _dicom("flip_angle", "FlipAngle", "float", "MR flip angle in degrees."),
    _dicom("echo_numbers", "EchoNumbers", "int", "MR echo number."),
    _dicom("echo_train_length", "EchoTrainLength", "int", "MR echo train length."),
    _dicom("imaging_frequency", "ImagingFrequency", "float", "MR imaging frequency in MHz."),
    _dicom("pixel_bandwidth", "PixelBandwidth", "float", "MR pixel bandwidth in Hz."),
    _dicom("scanning_sequence", "ScanningSequence", "strs", "MR scanning sequence (SE, GR...)."),
    _dicom("sequence_variant", "SequenceVariant", "strs", "MR sequence variant."),
    _dicom("sequence_name", "SequenceName", "str", "MR sequence name."),
    _dicom("pulse_sequence_name", "PulseSequenceName", "str", "MR pulse sequence (enhanced MR)."),
    _dicom("scan_options", "ScanOptions", "strs", "Scan options."),
    _dicom("mr_acquisition_type", "MRAcquisitionType", "str", "2D or 3D MR acquisition."),
    _dicom("diffusion_b_value", "DiffusionBValue", "float", "Diffusion b-value in s/mm^2."),
    _dicom("trigger_time", "TriggerTime", "float", "Trigger time in ms."),
    _dicom("patient_age", "PatientAge", "str", "Patient age at the study (e.g. 054Y)."),
    _dicom("patient_sex", "PatientSex", "str", "Patient sex (M, F, O)."),
    _dicom("patient_size", "PatientSize", "float", "Patient height in m."),
    _dicom("patient_weight", "PatientWeight", "float", "Patient weight in kg."),
    _dicom(
        "study_date",
        "StudyDate",
        "date",
        "Study date after de-identification (shifted per patient, or year only).",
    ),
    _dicom("series_date", "SeriesDate", "date", "Series date after de-identification."),
)

_FILE_COLUMNS: tuple[Column, ...] = (
    Column("url", "str", "Where the file was read (fsspec URL or path)."),
    Column("size", "int", "File size in bytes."),
    Column("mtime", "float", "File modification time (seconds since the epoch)."),
    Column(
        "content_hash",
        "str",
        "Hash of the file bytes: 'b3:' and 32 hex digits (BLAKE3, 128 bits), or 32 bare hex "
        "digits (BLAKE2b-128) in rows written by earlier versions; a changed file re-ingests.",
    ),
    Column("file_format", "str", "dicom, nifti, minc or analyze."),
    Column("transfer_syntax_uid", "str", "Transfer syntax of the pixel data."),
    Column("has_pixels", "bool", "Whether the instance carries image pixels."),
    Column("patient_key", "str", "Keyed hash (HMAC-SHA256) of PatientID."),
    Column("study_key", "str", "Keyed hash of StudyInstanceUID."),
    Column("series_key", "str", "Keyed hash of SeriesInstanceUID."),
    Column("instance_key", "str", "Keyed hash of SOPInstanceUID."),
    Column("frame_of_reference_key", "str", "Keyed hash of FrameOfReferenceUID."),
    Column("accession_key", "str", "Keyed hash of AccessionNumber."),
)

_RUN_COLUMNS: tuple[Column, ...] = (
    Column("run_id", "str", "Ingest run that wrote this row."),
    Column("ingested_at", "ts", "When the row was committed (UTC)."),
)

#: Derived on the worker from the original dataset (private tags and functional groups are
#: gone after de-identification) or from a NIfTI/MINC/Analyze header; never identifying.
_FRAME_COLUMNS: tuple[Column, ...] = (
    Column(
        "layout",
        "str",
        "classic, enhanced (multi-frame with functional groups), mosaic (Siemens),"
        " multiframe (without functional groups), nifti, minc or analyze.",
    ),
    Column(
        "frames_json",
        "str",
        "JSON: per-frame geometry, rescale, dimension index, echo, diffusion of a multi-frame"
        " or mosaic instance (see docs/series-assembly.md); null for single frames.",
    ),
    Column("mosaic_tiles", "int", "Siemens mosaic: slices tiled in the image (CSA header)."),
    Column("b_value", "float", "Diffusion b-value in s/mm^2 (standard or vendor tag)."),
    Column("b_vector", "floats", "Diffusion gradient direction, patient (LPS) coordinates."),
    Column("philips_scale_slope", "float", "Philips private MR scale slope (2005,100E)."),
    Column("array_shape", "ints", "Non-DICOM files: shape as stored in the file (i, j, k[, t])."),
    Column("array_affine", "floats", "Non-DICOM files: 4x4 RAS affine (row-major) of the file."),
    Column("array_dtype", "str", "Non-DICOM files: on-disk data type."),
)

#: Where a native single-frame file's pixel values lie: the volume stage reads them with
#: one ranged read instead of parsing the file again, in this run or a later one.
_PIXEL_COLUMNS: tuple[Column, ...] = (
    Column(
        "pixel_offset",
        "int",
        "Native single-frame DICOM read from a local path: byte offset of the pixel values"
        " in the file, read while its size and mtime are unchanged; null otherwise.",
    ),
    Column("pixel_length", "int", "Bytes of pixel values at pixel_offset."),
    Column("pixel_dtype", "str", "numpy dtype of the stored values at pixel_offset, e.g. '<i2'."),
    Column("pixel_shift", "int", "BitsAllocated - BitsStored: high bits cleared or sign-extended."),
)

_HEADER_JSON = Column(
    "header_json",
    "str",
    "The whole de-identified header in the DICOM JSON model (PS3.18 F), bulk data dropped.",
)

_WARNINGS = Column(
    "warnings",
    "strs",
    "Codes of the warnings the readers raised about the file (docs/reliability.md),"
    " sorted; empty when none, null in rows written before voxlake recorded them.",
)
_VOLUME_WARNINGS = Column(
    "warnings",
    "strs",
    "Codes of the warnings raised while the volume was built (decoding its pixel data:"
    " docs/reliability.md), sorted; its files' own are in instances.warnings.",
)

_VOLUME_COLUMNS: tuple[Column, ...] = (
    Column("volume_id", "str", "Stable id: digest of (series key, split key)."),
    Column("revision", "str", "Digest of the exact inputs; a rebuilt volume gets a new one."),
    Column("patient_key", "str", "Keyed hash of PatientID."),
    Column("study_key", "str", "Keyed hash of StudyInstanceUID."),
    Column("series_key", "str", "Keyed hash of SeriesInstanceUID."),
    Column("split_key", "str", "What distinguishes this volume within its series ('' if whole)."),
    Column("split_reason", "str", "Why the series was split (orientation, echo, ...) or ''."),
    Column("modality", "str", "Modality."),
    Column("manufacturer", "str", "Manufacturer."),
    Column("manufacturer_model_name", "str", "Scanner model."),
    Column("body_part_examined", "str", "Body part examined."),
    Column("study_description", "str", "Study description."),
    Column("series_description", "str", "Series description."),
    Column("protocol_name", "str", "Protocol name."),
    Column("series_number", "int", "Series number."),
    Column("slice_thickness", "float", "Nominal slice thickness in mm (SliceThickness)."),
    Column("study_date", "date", "De-identified study date."),
    Column("patient_age", "str", "Patient age."),
    Column("patient_sex", "str", "Patient sex."),
    Column("ndim", "int", "3 for (z, y, x), 4 for (t, z, y, x) or (c, z, y, x)."),
    Column(
        "axes",
        "str",
        "Axis names of the stored array, one letter each: zyx, tzyx (time), czyx (colour "
        "channels R, G, B first; the same names as the OME-Zarr axes).",
    ),
    Column("shape", "ints", "Array shape, in the order of `axes`."),
    Column("spacing", "floats", "Voxel spacing (z, y, x) in mm."),
    Column("affine", "floats", "4x4 RAS affine (row-major) mapping (i, j, k, 1) to mm."),
    Column("orientation", "str", "Axis codes of (i, j, k) in RAS+ terms (e.g. LPS for axial)."),
    Column("dtype", "str", "Stored dtype (int16 HU for exact CT rescales, else float32...)."),
    Column("units", "str", "Units of the values (HU for CT, empty when arbitrary)."),
    Column("rescale_slope", "float", "Slope applied at ingest (NaN if per-slice)."),
    Column("rescale_intercept", "float", "Intercept applied at ingest (NaN if per-slice)."),
    Column("n_instances", "int", "Source instances (files) used."),
    Column("n_slices", "int", "Slices along k."),
    Column("n_timepoints", "int", "Timepoints (1 for 3D)."),
    Column("slice_spacing_mean", "float", "Mean step between sorted slices in mm."),
    Column("slice_spacing_max_dev", "float", "Largest deviation of a step from the mean, mm."),
    Column("gantry_tilt_deg", "float", "Angle between the slice normal and the slice step."),
    Column("decoder", "str", "Pixel decoder used (native, pylibjpeg, nibabel)."),
    Column("source_instance_keys", "strs", "Keyed hashes of the source SOPInstanceUIDs, in order."),
    Column("source_hashes", "strs", "Content hashes of the source files, in slice order."),
    Column("store_url", "str", "Root URL of the volume store."),
    Column("store_path", "str", "Group path of the volume inside the store."),
    Column("nbytes", "int", "Uncompressed size in bytes."),
    Column("stored_bytes", "int", "Compressed size in the store."),
    Column("chunks", "ints", "Zarr chunk shape."),
    Column("shards", "ints", "Zarr shard shape."),
    Column("intensity_min", "float", "Minimum value (of the finite voxels, as every figure here)."),
    Column("intensity_max", "float", "Maximum value."),
    Column("intensity_mean", "float", "Mean value (for z-score normalisation)."),
    Column("intensity_std", "float", "Standard deviation."),
    Column("intensity_p01", "float", "1st percentile (strided sample)."),
    Column("intensity_p50", "float", "Median (strided sample)."),
    Column("intensity_p99", "float", "99th percentile (strided sample)."),
    Column(
        "intensity_non_finite",
        "int",
        "Voxels that are NaN or infinite (float images), left out of the intensity figures;"
        " the volume then carries the warning non_finite_values.",
    ),
    Column("preprocessing", "str", "JSON list of preprocessing steps applied."),
    Column("layout", "str", "Source layout: classic, enhanced, mosaic, nifti, minc, analyze."),
    Column("value_scaling", "str", "How values were derived: rescale, philips_precise, none..."),
    Column("source_frames", "ints", "Frame (or mosaic tile) of each source, parallel to hashes."),
    Column("repetition_time", "float", "MR repetition time TR in ms."),
    Column("echo_times", "floats", "MR echo time TE (ms) of each timepoint."),
    Column("b_values", "floats", "Diffusion b-value (s/mm^2) of each timepoint."),
    Column(
        "b_vectors_patient",
        "floats",
        "Diffusion directions per timepoint, patient LPS coordinates, flattened (t x 3).",
    ),
    Column(
        "b_vectors_image",
        "floats",
        "Diffusion directions per timepoint along the array axes (i, j, k), flattened (t x 3).",
    ),
    Column("resampled", "bool", "True for an equidistant resampled copy of irregular slices."),
)

_FAILURE_COLUMNS: tuple[Column, ...] = (
    Column("failure_id", "str", "Digest of (subject, stage): one row per failing thing."),
    Column("subject", "str", "File URL, or series / volume key, that failed."),
    Column("subject_kind", "str", "file, series or volume."),
    Column("stage", "str", "read, header, assemble, decode, write."),
    Column("code", "str", "Stable failure code (see docs/reliability.md)."),
    Column("message", "str", "What went wrong (never identifying values)."),
    Column("size", "int", "File size (file failures), so a re-run skips an unchanged file."),
    Column("mtime", "float", "File mtime (file failures)."),
)

_RUN_TABLE_COLUMNS: tuple[Column, ...] = (
    Column("run_id", "str", "Run id (time-ordered)."),
    Column("status", "str", "running, completed, failed or interrupted."),
    Column("started_at", "ts", "Start time (UTC)."),
    Column("finished_at", "ts", "End time (UTC)."),
    Column(
        "sources",
        "strs",
        "Source URLs given to the run, without passwords; a PACS query's filter values are"
        " replaced by * (a filter can name a patient).",
    ),
    Column("config_json", "str", "Ingest configuration (secret omitted)."),
    Column("versions_json", "str", "Versions of voxlake and its codecs."),
    Column("files_seen", "int", "Files listed."),
    Column("files_skipped", "int", "Files already in the catalog (unchanged)."),
    Column("instances", "int", "Instances catalogued."),
    Column("volumes_written", "int", "Volumes written."),
    Column("volumes_skipped", "int", "Volumes already up to date."),
    Column(
        "volumes_retired",
        "int",
        "Volume rows deleted because a file they were built from changed or was pruned.",
    ),
    Column(
        "files_missing",
        "int",
        "Catalogued files under the run's sources that its listing did not find (gone,"
        " moved or renamed); their rows stay unless the run pruned them.",
    ),
    Column("files_pruned", "int", "Rows of missing files the run deleted (--prune)."),
    Column("failures", "int", "Failure rows written."),
    Column("failures_by_code", "str", "JSON object: failure code to count."),
    Column(
        "warnings_by_code",
        "str",
        "JSON object: warning code to the number of files and volumes of the run carrying it.",
    ),
    Column("bytes_read", "int", "Bytes of source files read."),
    Column("duration_s", "float", "Wall-clock duration in seconds."),
    Column(
        "message",
        "str",
        "Error summary when the run failed; what stopped it when interrupted (Ctrl-C or SIGTERM).",
    ),
)

_LABEL_COLUMNS: tuple[Column, ...] = (
    Column(
        "key_kind",
        "str",
        "patient, accession, study or series: which key the label is attached to.",
    ),
    Column("key", "str", "Keyed hash of the original identifier (never the identifier)."),
    Column("name", "str", "Label name (e.g. 'label', 'lesion')."),
    Column("value", "float", "Label value."),
    Column("source", "str", "File or table the labels came from (basename)."),
    Column("attached_at", "ts", "When the label was attached (UTC)."),
)

_SPLIT_COLUMNS: tuple[Column, ...] = (
    Column("name", "str", "Split assignment name (e.g. 'default'); several can coexist."),
    Column("by", "str", "Volume column the split groups by (patient_key, study_key, ...)."),
    Column("key", "str", "Value of that column (a keyed hash, or a volume id)."),
    Column("split", "str", "train, validation or test; never changes once written."),
    Column("seed", "int", "Seed of the hash assignment."),
    Column("fractions", "floats", "Train, validation and test fractions asked for."),
    Column("assigned_at", "ts", "When the key was first assigned (UTC)."),
)

_TABLES: dict[str, tuple[Column, ...]] = {
    "instances": (
        *_FILE_COLUMNS,
        *DICOM_COLUMNS,
        *_FRAME_COLUMNS,
        *_PIXEL_COLUMNS,
        _HEADER_JSON,
        _WARNINGS,
        *_RUN_COLUMNS,
    ),
    "volumes": (*_VOLUME_COLUMNS, _VOLUME_WARNINGS, *_RUN_COLUMNS),
    "failures": (*_FAILURE_COLUMNS, *_RUN_COLUMNS),
    "runs": _RUN_TABLE_COLUMNS,
    "labels": _LABEL_COLUMNS,
    "splits": _SPLIT_COLUMNS,
}

#: Merge keys: a row with the same key replaces the old one (re-runs never duplicate).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "instances": ("url",),
    "volumes": ("volume_id",),
    "failures": ("failure_id",),
    "runs": ("run_id",),
    "labels": ("key_kind", "key", "name"),
    "splits": ("name", "key"),
}

TABLE_DESCRIPTIONS: dict[str, str] = {
    "instances": "One row per DICOM instance or image file read.",
    "volumes": "One row per assembled volume in the store; a volume exists once its row does.",
    "failures": "One row per quarantined file, series or volume, with a stable code.",
    "runs": "One row per ingest run: configuration, versions, counts, timings, status.",
    "labels": "Labels keyed by keyed hashes of patient / accession / study / series identifiers.",
    "splits": "Persisted train / validation / test assignments: a key keeps its split forever.",
}

SCHEMAS: dict[str, pa.Schema] = {
    name: pa.schema([c.field() for c in cols], metadata={"description": TABLE_DESCRIPTIONS[name]})
    for name, cols in _TABLES.items()
}


def schema_for(table: str) -> pa.Schema:
    """Return the arrow schema of ``table`` (KeyError with the known names otherwise)."""
    try:
        return SCHEMAS[table]
    except KeyError:
        raise KeyError(f"unknown catalog table {table!r}; known: {sorted(SCHEMAS)}") from None


def columns_for(table: str) -> tuple[Column, ...]:
    """Return the :class:`Column` definitions of ``table``."""
    return _TABLES[table]


def render_schema_markdown() -> str:
    """Render the catalog schema reference (``docs/catalog-schema.md``)."""
    lines = [
        "# Catalog schema",
        "",
        "Generated from `src/voxlake/catalog/schema.py` by `voxlake catalog schema-doc`;"
        " do not edit by hand (a test fails when this page and the code differ).",
        "",
        "Each table is a Delta Lake table under the catalog root (`<root>/<table>/`); every"
        " column's description below is also stored in the table's field metadata. One more"
        " table, `_commits`, holds one row per catalog commit with the Delta version of every"
        " table (`<table>_version`): the catalog version `N` that `open_catalog(url,"
        " version=N)` pins is the N-th row in commit-time order. Identifiers never appear:"
        " `*_key` columns are keyed hashes (HMAC-SHA256 with the project secret), and text"
        " and dates come from the de-identified header (DICOM PS3.15 Annex E).",
        "",
    ]
    for name, cols in _TABLES.items():
        keys = ", ".join(f"`{k}`" for k in TABLE_KEYS[name])
        lines += [f"## `{name}`", "", TABLE_DESCRIPTIONS[name], "", f"Merge key: {keys}.", ""]
        lines += ["| column | type | DICOM keyword | description |", "|---|---|---|---|"]
        for col in cols:
            keyword = f"`{col.keyword}`" if col.keyword else ""
            lines.append(f"| `{col.name}` | {col.arrow_type} | {keyword} | {col.description} |")
        lines.append("")
    return "\n".join(lines)
