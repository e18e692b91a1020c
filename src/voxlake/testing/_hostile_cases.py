"""The cases of the hostile corpus (:func:`voxlake.testing.hostile.build_corpus`).

One section per family; each writes its files through the :class:`Builder` and records
what a correct ingest makes of them. The tables are kept one case per line on purpose.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from voxlake.testing.hostile import (
    MAX_FILE_BYTES,
    Builder,
    catalog_url,
    cut_tar_members,
    edit_dicom,
    read_dicom,
    save_dicom,
)
from voxlake.testing.phantoms import derive_uid

if TYPE_CHECKING:
    from collections.abc import Callable

    import pydicom

    from voxlake.testing.synthetic import WrittenSeries

    Change = Callable[[WrittenSeries], None]

__all__ = ["SECTIONS"]

_PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa75\x81\x84"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)
_JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(200)
_PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
_EXPLICIT_LE = b"1.2.840.10008.1.2.1\0"
_RLE = "1.2.840.10008.1.2.5"
_UNKNOWN_SYNTAX = b"1.2.3.4.5.6.7.8.9.10"  # same length: nothing else in the file moves
_ROWS_US_16 = b"\x28\x00\x10\x00US\x02\x00\x10\x00"  # (0028,0010) US 16, explicit VR LE
_ROWS_DS_TEXT = b"\x28\x00\x10\x00DS\x02\x00ab"  # the same element as DS "ab"


# -- changes applied to a written series ----------------------------------------------------


def _each(change: Callable[[pydicom.Dataset], None]) -> Change:
    def apply(written: WrittenSeries) -> None:
        for path in written.files:
            edit_dicom(path, change)

    return apply


def _one(index: int, change: Callable[[pydicom.Dataset], None]) -> Change:
    return lambda written: edit_dicom(written.files[index], change)


def _set(keyword: str, value: Any) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def _drop(*keywords: str) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)

    return change


def _bytes(old: bytes, new: bytes) -> Change:
    def change(written: WrittenSeries) -> None:
        for path in written.files:
            path.write_bytes(path.read_bytes().replace(old, new))

    return change


def _huge(ds: pydicom.Dataset) -> None:
    ds.Rows = ds.Columns = 40000


def _cmyk(ds: pydicom.Dataset) -> None:
    """Four samples per pixel (CMYK, retired from the standard): no colour model to store."""
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 4, "CMYK", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(ds.Rows * ds.Columns * 4)


def _shrink(ds: pydicom.Dataset) -> None:
    ds.Rows = ds.Columns = 8
    ds.PixelData = ds.PixelData[: 8 * 8 * 2]


def _mpeg2(ds: pydicom.Dataset) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"


def _rle_overrun(ds: pydicom.Dataset) -> None:
    """RLE segments that decode to 640 bytes where the frame holds 256: pylibjpeg-rle
    panics (a Rust ``PanicException``, which is not an ``Exception``)."""
    from pydicom.encaps import encapsulate

    segment = bytes([0x81, 0x00]) * 5  # five replicate runs of 128 zeros
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    ds.PixelData = encapsulate([header + segment + segment])


def _duplicate_sop(written: WrittenSeries) -> None:
    uid = read_dicom(written.files[0]).SOPInstanceUID
    edit_dicom(written.files[1], _set("SOPInstanceUID", uid))


def _unlink_middle(written: WrittenSeries) -> None:
    written.files[2].unlink()


def _nothing(written: WrittenSeries) -> None:
    return None


# -- series that must fail: (name, description, codes, stage, change, spec changes) ---------

_POS = "ImagePositionPatient"
_IOP = "ImageOrientationPatient"
# fmt: off
_SERIES: tuple[tuple[str, str, tuple[str, ...], str, Change, dict[str, Any]], ...] = (
    ("nan_pixel_spacing", "NaN PixelSpacing", ("bad_pixel_spacing",), "assemble",
     _each(_set("PixelSpacing", ["NaN", "NaN"])), {}),
    ("infinite_pixel_spacing", "infinite PixelSpacing", ("bad_pixel_spacing",), "assemble",
     _each(_set("PixelSpacing", ["inf", "inf"])), {}),
    ("zero_pixel_spacing", "zero PixelSpacing", ("bad_pixel_spacing",), "assemble",
     _each(_set("PixelSpacing", [0, 0])), {}),
    ("negative_pixel_spacing", "negative PixelSpacing", ("bad_pixel_spacing",), "assemble",
     _each(_set("PixelSpacing", [-1, -1])), {}),
    ("missing_pixel_spacing", "no PixelSpacing", ("bad_pixel_spacing",), "assemble",
     _each(_drop("PixelSpacing")), {}),
    ("non_orthonormal_orientation", "orientation vectors not orthonormal", ("bad_orientation",),
     "assemble", _each(_set(_IOP, [1, 0.5, 0, 0, 1, 0])), {}),
    ("zero_orientation", "orientation vectors of zeros", ("bad_orientation",), "assemble",
     _each(_set(_IOP, [0] * 6)), {}),
    ("nan_orientation", "NaN in ImageOrientationPatient", ("missing_geometry",), "assemble",
     _each(_set(_IOP, ["NaN", 0, 0, 0, 1, 0])), {}),
    ("missing_position", "one slice without ImagePositionPatient", ("missing_geometry",),
     "assemble", _one(1, _drop(_POS)), {}),
    ("nan_position", "NaN in one slice's ImagePositionPatient", ("missing_geometry",),
     "assemble", _one(2, _set(_POS, ["NaN", 0, 10])), {}),
    ("missing_middle_slice", "a series with its middle slice missing", ("missing_slice",),
     "assemble", _unlink_middle, {"n_slices": 5}),
    ("irregular_spacing", "slice steps of 2, 2 and 3.1 mm", ("irregular_spacing",), "assemble",
     _one(3, _set(_POS, [-16, -16, 17.1])), {}),
    ("off_line_positions", "slice positions that do not lie on one line", ("nonlinear_stack",),
     "assemble", _one(2, _set(_POS, [-6, -16, 14])), {}),
    ("single_slice_series", "a series of one slice", ("single_slice",), "assemble", _nothing,
     {"n_slices": 1}),
    ("same_slice_position", "two files at the same slice position", ("duplicate_position",),
     "assemble", _one(1, _set(_POS, [-16, -16, 10])), {}),
    ("duplicate_sop_instance", "one SOPInstanceUID in two files that differ",
     ("duplicate_sop_instance",), "assemble", _duplicate_sop, {}),
    ("mixed_matrix_sizes", "one 8x8 slice in a 16x16 series (split, each part refused)",
     ("missing_slice", "single_slice"), "assemble", _one(2, _shrink), {"n_slices": 5}),
    ("declared_dimensions_over_cap", "Rows and Columns declared 40000 (refused before "
     "allocating)", ("too_large",), "assemble", _each(_huge), {}),
    ("declared_frames_over_cap", "NumberOfFrames declared 10^9 (refused before allocating)",
     ("multiframe_geometry_unknown",), "assemble", _each(_set("NumberOfFrames", "1000000000")),
     {}),
    ("missing_rows_columns", "no Rows and no Columns", ("bad_pixel_description",), "assemble",
     _each(_drop("Rows", "Columns")), {}),
    ("wrong_vr_rows", "Rows written with VR DS holding text", ("bad_pixel_description",),
     "assemble", _bytes(_ROWS_US_16, _ROWS_DS_TEXT), {}),
    ("missing_bits_allocated", "no BitsAllocated", ("bad_pixel_description",), "assemble",
     _each(_drop("BitsAllocated")), {}),
    ("invalid_bits_allocated", "BitsAllocated of 12", ("bad_pixel_description",), "assemble",
     _each(_set("BitsAllocated", 12)), {}),
    ("bits_stored_over_allocated", "BitsStored 20 with BitsAllocated 16",
     ("bad_pixel_description",), "volume", _each(_set("BitsStored", 20)), {}),
    ("cmyk_colour", "CMYK colour slices (4 samples per pixel)", ("color_unsupported",),
     "assemble", _each(_cmyk), {}),
    ("pixel_data_too_short", "pixel data 64 bytes shorter than Rows x Columns",
     ("pixel_length_mismatch",), "volume",
     _one(1, lambda ds: setattr(ds, "PixelData", ds.PixelData[:-64])), {}),
    ("pixel_data_too_long", "pixel data one whole slice longer than declared",
     ("pixel_shape_mismatch",), "volume",
     _one(1, lambda ds: setattr(ds, "PixelData", ds.PixelData + bytes(512))), {}),
    ("codec_not_installed", "MPEG2 compressed slices (no decoder installed)",
     ("codec_unavailable",), "volume", _each(_mpeg2), {}),
    ("unknown_transfer_syntax", "a transfer syntax UID nobody defined",
     ("unknown_transfer_syntax",), "volume", _bytes(_EXPLICIT_LE, _UNKNOWN_SYNTAX), {}),
    ("rle_decoder_panic", "an RLE slice decoding past its frame (the decoder panics)",
     ("decode",), "volume", _one(1, _rle_overrun), {"transfer_syntax": _RLE}),
    ("rescale_slope_huge", "RescaleSlope 1e308 (no stored type holds the values)",
     ("value_overflow",), "volume", _each(_set("RescaleSlope", "1e308")), {}),
)
# fmt: on


def _failing_series(b: Builder) -> None:
    for name, description, codes, stage, change, spec in _SERIES:
        b.failing_series(name, description, codes, change, stage, **spec)


# -- good series beside the bad ones --------------------------------------------------------

# fmt: off
_CHARSETS = (
    ("charset_utf8", "ISO_IR 192", "Dürst^Zoë^VXLH", "UTF-8 (ISO_IR 192) text"),
    ("charset_latin1", "ISO_IR 100", "Müller^Jürgen^VXLH", "Latin-1 text"),
    ("charset_japanese", "\\ISO 2022 IR 87", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
     "Japanese text with ISO 2022 escape sequences"),
    ("charset_unknown", "ISO_IR 999", "Nobody^VXLH", "an unknown SpecificCharacterSet"),
)
# fmt: on


def _good(b: Builder) -> None:
    b.volume("good_control", "a clean series (control)", b.series("good_control"))
    written = b.series("exact_duplicate_file")
    (written.files[0].parent / "copy-of-first.dcm").write_bytes(written.files[0].read_bytes())
    b.volume("exact_duplicate_file", "a byte-identical copy of one slice beside it", written)

    folder = b.folder("non_utf8_names")
    written = b.series("non_utf8_names", folder)
    renamed = []
    for index, path in enumerate(written.files):
        target = os.path.join(os.fsencode(folder), b"\xe9t\xe9-\xff%d.dcm" % index)
        os.rename(path, target)
        renamed.append(Path(os.fsdecode(target)))
    written = dataclasses.replace(written, files=tuple(renamed))
    b.volume("non_utf8_names", "file names that are not valid UTF-8 (Latin-1 bytes)", written)

    written = b.series("no_preamble")
    _each(lambda ds: delattr(ds, "file_meta"))(written)
    b.volume("no_preamble", "files without preamble or file meta (implicit VR)", written)

    written = b.series("gzipped_dicom")
    for path in written.files:
        path.with_suffix(".dcm.gz").write_bytes(gzip.compress(path.read_bytes(), mtime=0))
        path.unlink()
    b.volume("gzipped_dicom", "gzip-compressed DICOM files", written)

    for name, charset, person, description in _CHARSETS:

        def text(ds: pydicom.Dataset, c: str = charset, p: str = person) -> None:
            ds.SpecificCharacterSet = c.split("\\") if "\\" in c else c
            ds.PatientName = p
            ds.SeriesDescription = "Thorax Lunge Übersicht"

        written = b.series(name)
        _each(text)(written)
        b.volume(name, description, written)

    written = b.series("charset_invalid_bytes")
    name_bytes = written.spec.patient_name.encode()
    _bytes(b"ISO_IR 100", b"ISO_IR 192")(written)
    _bytes(name_bytes, b"\xff\xfe\xfd" + name_bytes[3:])(written)
    b.volume("charset_invalid_bytes", "text declared UTF-8 that is not valid UTF-8", written)

    # UIDs that are not UIDs but text holding a name: pydicom's validation would quote it.
    written = b.series("text_in_uids")
    _each(lambda ds: setattr(ds, "SOPInstanceUID", f"VXLHUIDNAME^{ds.InstanceNumber}"))(written)
    b.plant(*(f"VXLHUIDNAME^{n}" for n in range(1, written.spec.n_slices + 1)))
    b.volume("text_in_uids", "SOPInstanceUIDs holding text with a name (invalid UI)", written)

    written = b.series("number_too_large")
    _each(_set("InstanceNumber", "1e308"))(written)
    b.volume("number_too_large", "InstanceNumber 1e308 (fits no integer column)", written)

    written = b.series("oversized_text")
    _each(_set("SeriesDescription", "x" * 60000))(written)
    b.volume("oversized_text", "a 60 000-character SeriesDescription", written)


# -- colour series: stored as channels (c, z, y, x) --------------------------------------


def _colour_volume(written: WrittenSeries, channels: np.ndarray) -> WrittenSeries:
    """``written`` whose expected volume is ``channels`` (c, z, y, x), not greyscale."""

    @dataclasses.dataclass(frozen=True, eq=False)
    class ColourSeries(type(written)):  # type: ignore[misc]
        def expected_volume(self) -> np.ndarray:
            return channels

    return ColourSeries(**{f.name: getattr(written, f.name) for f in dataclasses.fields(written)})


def _colour(b: Builder) -> None:
    rng = np.random.default_rng(b.seed)

    # RGB, 8 bits; planar configuration 0 (R1 G1 B1 R2...) and 1 (all R, all G, all B)
    # alternate between slices, so both byte layouts must decode to the same channels.
    written = b.series("rgb_colour")
    rgb = rng.integers(0, 256, (3, len(written.files), written.spec.rows, written.spec.columns))
    rgb = rgb.astype(np.uint8)
    for z, path in enumerate(written.files):

        def to_rgb(ds: pydicom.Dataset, z: int = z) -> None:
            planar = z % 2
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
            ds.PlanarConfiguration = planar
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit, ds.PixelRepresentation = 7, 0
            ds.PixelData = (rgb[:, z] if planar else rgb[:, z].transpose(1, 2, 0)).tobytes()
            for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
                if keyword in ds:
                    delattr(ds, keyword)

        edit_dicom(path, to_rgb)
    b.volume(
        "rgb_colour",
        "RGB slices, planar configuration 0 and 1 alternating",
        _colour_volume(written, rgb),
    )

    # YBR_FULL of grey pixels (Cb = Cr = 128): R = G = B = Y exactly (PS3.3 C.7.6.3.1.2).
    written = b.series("ybr_full_colour")
    luma = rng.integers(0, 256, (len(written.files), written.spec.rows, written.spec.columns))
    luma = luma.astype(np.uint8)
    for z, path in enumerate(written.files):

        def to_ybr(ds: pydicom.Dataset, z: int = z) -> None:
            ybr = np.stack([luma[z], np.full_like(luma[z], 128), np.full_like(luma[z], 128)], -1)
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL"
            ds.PlanarConfiguration = 0
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit, ds.PixelRepresentation = 7, 0
            ds.PixelData = ybr.tobytes()

        edit_dicom(path, to_ybr)
    b.volume(
        "ybr_full_colour",
        "YBR_FULL slices (converted to RGB)",
        _colour_volume(written, np.stack([luma] * 3)),
    )

    # PALETTE COLOR: 8-bit indices through 16-bit red, green and blue tables.
    written = b.series("palette_colour")
    index = rng.integers(0, 256, (len(written.files), written.spec.rows, written.spec.columns))
    index = index.astype(np.uint8)
    tables = rng.integers(0, 65536, (3, 256)).astype(np.uint16)
    for z, path in enumerate(written.files):

        def to_palette(ds: pydicom.Dataset, z: int = z) -> None:
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit, ds.PixelRepresentation = 7, 0
            ds.PixelData = index[z].tobytes()
            for tag, table in zip((0x1101, 0x1102, 0x1103), tables, strict=True):
                ds.add_new((0x0028, tag), "US", [256, 0, 16])  # descriptor
                ds.add_new((0x0028, tag + 0x100), "OW", table.tobytes())  # data
            for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
                if keyword in ds:
                    delattr(ds, keyword)

        edit_dicom(path, to_palette)
    b.volume(
        "palette_colour",
        "PALETTE COLOR slices (16-bit lookup tables)",
        _colour_volume(written, np.stack([t[index] for t in tables])),
    )


# -- files that are not (usable) DICOM ------------------------------------------------------


def _not_dicom(b: Builder) -> None:
    rng = np.random.default_rng(b.seed)
    bomb = gzip.compress(bytes(MAX_FILE_BYTES + 4096), mtime=0)
    # fmt: off
    b.file("zero_byte_file", "a file of zero bytes", "empty_file", b"")
    b.file("text_file", "a text file named .dcm", "not_dicom", b"not an image\n" * 40)
    b.file("png_file", "a PNG image", "not_dicom", _PNG, filename="x.png")
    b.file("jpeg_file", "a JPEG image", "not_dicom", _JPEG, filename="x.jpg")
    b.file("pdf_file", "a PDF report", "not_dicom", _PDF, filename="report.pdf")
    b.file("random_bytes", "4 KiB of random bytes", "not_dicom", rng.bytes(4096))
    b.file("preamble_only", "a 128-byte preamble and DICM, nothing after", "missing_uid",
           bytes(128) + b"DICM")
    b.file("preamble_then_garbage", "a DICM preamble followed by random bytes",
           "truncated_header", bytes(128) + b"DICM" + rng.bytes(2048))
    b.file("gzip_not_dicom", "a gzipped text file", "not_dicom",
           gzip.compress(b"hello\n" * 100, mtime=0), filename="x.dcm.gz")
    b.file("corrupt_gzip", "gzip magic followed by garbage", "corrupt_gzip",
           b"\x1f\x8b\x08\x00" + rng.bytes(512), filename="x.dcm.gz")
    b.file("gzip_bomb", f"a {len(bomb)}-byte gzip stream expanding beyond the size cap",
           "decompression_cap", bomb, filename="bomb.dcm.gz")
    b.file("file_over_size_cap", "a file larger than max_file_bytes", "file_too_large",
           rng.bytes(MAX_FILE_BYTES + 1))
    # fmt: on


def _broken_dicom(b: Builder) -> None:
    good = b.slice_bytes("source_slice")
    name_length = good.index(b"\x10\x00\x10\x00PN") + 6  # PatientName's 2-byte length
    pixel_length = good.index(b"\xe0\x7f\x10\x00OW\x00\x00") + 8
    nest = b""
    for _ in range(3000):  # ReferencedSeriesSequence > item > ..., all of undefined length
        nest = (
            b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
            + nest
            + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        )
    first = good.index(b"\x08\x00\x05\x00")  # the first element after the file meta
    ds = read_dicom(b.root / "scratch" / "source_slice" / "IM0001.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that "inf" is no valid DS
        ds.RescaleSlope = "inf"
    infinite_slope = io.BytesIO()
    save_dicom(ds, infinite_slope)
    del ds.SeriesInstanceUID
    no_series_uid = io.BytesIO()
    save_dicom(ds, no_series_uid)
    del ds.SOPInstanceUID
    no_uids = io.BytesIO()
    save_dicom(ds, no_uids)
    patient_name = good.index(b"\x10\x00\x10\x00PN")  # the first element of group 0010
    # fmt: off
    b.file("truncated_header", "a slice cut inside its header", "truncated_header", good[:300])
    b.file("truncated_file_meta", "a slice cut inside its file meta", "truncated_header",
           good[:150])
    b.file("truncated_pixel_data", "a slice missing the end of its pixel data",
           "truncated_pixel_data", good[:-100])
    b.file("value_length_overrun", "an element whose length runs past the end of the file",
           "truncated_header",
           good[:name_length] + struct.pack("<H", 0xFFF0) + good[name_length + 2 :])
    b.file("undefined_length_pixel_data", "native pixel data of undefined length, no "
           "delimiter", "truncated_header",
           good[:pixel_length] + b"\xff\xff\xff\xff" + good[pixel_length + 4 :])
    b.file("nested_sequence_bomb", "sequences nested 3000 deep (a parser recursion bomb)",
           "bad_header", good[:first] + nest + good[first:])
    b.file("dicomdir", "a DICOMDIR media index", "dicomdir", _dicomdir(), filename="DICOMDIR")
    b.file("missing_uids", "no SOPInstanceUID and no SeriesInstanceUID", "missing_uid",
           no_uids.getvalue())
    b.file("missing_series_uid", "a slice without SeriesInstanceUID (catalogued in no "
           "series: neither a volume nor a failure)", "missing_uid", no_series_uid.getvalue())
    b.file("cut_at_element_boundary", "a slice cut right before PatientName: a whole header "
           "without series or pixels (catalogued in no series)", "missing_uid",
           good[:patient_name])
    b.file("infinite_rescale_slope", "RescaleSlope inf (would be taken as 1)", "bad_rescale",
           infinite_slope.getvalue())
    # fmt: on


def _dicomdir() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, ExplicitVRLittleEndian

    ds = Dataset()
    ds.FileSetID = "VXLHFILESET"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    record = Dataset()
    record.DirectoryRecordType = "PATIENT"
    record.PatientID = "VXLHDIRPID"
    ds.DirectoryRecordSequence = Sequence([record])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.1.3.10")
    ds.file_meta.MediaStorageSOPInstanceUID = UID(derive_uid("dicomdir", "sop"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    save_dicom(ds, buffer)
    return buffer.getvalue()


_NON_IMAGE = (
    ("structured_report", "1.2.840.10008.5.1.4.1.1.88.11", "SR", "a structured report"),
    ("presentation_state", "1.2.840.10008.5.1.4.1.1.11.1", "PR", "a presentation state"),
    ("rt_structure_set", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", "an RT structure set"),
    ("key_object_selection", "1.2.840.10008.5.1.4.1.1.88.59", "KO", "a key object selection"),
)


def _non_image(b: Builder) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    for index, (name, sop_class, modality, description) in enumerate(_NON_IMAGE):
        ds = Dataset()
        ds.SOPClassUID = UID(sop_class)
        ds.SOPInstanceUID = UID(derive_uid(name, "sop"))
        ds.StudyInstanceUID = UID(derive_uid(name, "study"))
        ds.SeriesInstanceUID = UID(derive_uid(name, "series"))
        ds.PatientName = f"NONIMAGE^VXLHNI{index}"
        ds.PatientID = f"VXLHNIPID{index}"
        ds.Modality = modality
        ds.StudyDate = ds.ContentDate = "20240102"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        b.plant(f"VXLHNI{index}", f"VXLHNIPID{index}", ds.SOPInstanceUID, ds.SeriesInstanceUID)
        path = b.folder(name) / "x.dcm"
        save_dicom(ds, path)
        b.non_image(name, f"{description} (no pixel data)", catalog_url(path))


# -- archives, links and special files ------------------------------------------------------


def _archives(b: Builder) -> None:
    good = b.slice_bytes("archive_slice")
    folder = b.folder("archives")
    written = b.series("zip_good_series", b.root / "scratch" / "zip_good_series")
    archive = folder / "mixed.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in written.files:
            z.write(path, f"series/{path.name}")
        z.writestr("../../escape.dcm", good)
        z.writestr("/abs/absolute.dcm", good)
        z.writestr("bomb.dcm", bytes(MAX_FILE_BYTES + 4096))
        z.writestr("evil::/etc/hostname", good)
    zip_url = catalog_url(archive)
    bad_zip = folder / "corrupt.zip"
    bad_zip.write_bytes(b"PK\x03\x04" + np.random.default_rng(b.seed).bytes(1024))
    cut_series = b.series("truncated_tar_gz_series", b.root / "scratch" / "cut_series", n_slices=12)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in cut_series.files:
            tar.add(path, f"series/{path.name}")
    cut = folder / "truncated.tar.gz"
    cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    cut_url = catalog_url(cut)
    listed, cut_member = cut_tar_members(buffer.getvalue(), cut.read_bytes())
    assert len(listed) - bool(cut_member) >= 2, "whole members of the series precede the cut"
    zip_series = b.series("truncated_zip_series", b.root / "scratch" / "cut_zip", n_slices=12)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in zip_series.files:
            z.write(path, f"series/{path.name}")
    cut_zip = folder / "truncated.zip"
    cut_zip.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])
    links = folder / "links.tar"
    with tarfile.open(links, "w") as tar:
        for index, kind in enumerate((tarfile.SYMTYPE, tarfile.LNKTYPE)):
            info = tarfile.TarInfo(f"link-{index}.dcm")
            info.type, info.linkname = kind, ("/etc/passwd", "/etc/shadow")[index]
            tar.addfile(info)
    tar_url = catalog_url(links)
    b.volume("zip_good_series", "a good series inside a zip beside the hostile members", written)
    # fmt: off
    b.listed("zip_slip", "a zip member path climbing out with ..", "unsafe_member_path",
             f"zip://../../escape.dcm::{zip_url}")
    b.listed("zip_absolute_member", "a zip member with an absolute path", "unsafe_member_path",
             f"zip:///abs/absolute.dcm::{zip_url}")
    b.listed("zip_bomb", "a zip member expanding beyond the size cap", "decompression_cap",
             f"zip://bomb.dcm::{zip_url}")
    b.listed("zip_member_url_injection", "a zip member named 'evil::/etc/hostname' (fsspec "
             "would open the local file)", "unsafe_member_path",
             f"zip://evil::/etc/hostname::{zip_url}")
    b.listed("corrupt_zip", "a .zip that is not a zip", "corrupt_archive", catalog_url(bad_zip))
    b.listed("truncated_tar_gz", "a .tar.gz cut in half (and the member the cut runs "
             "through, if any)", "corrupt_archive", cut_url,
             *([f"tar://{cut_member}::{cut_url}"] if cut_member else []))
    b.series_fails("truncated_tar_gz_series", "a series whose first half is in a .tar.gz cut "
                   "in half (a shorter volume would lose its end without a word)",
                   ["archive_damaged"], cut_series)
    b.listed("truncated_zip", "a .zip cut short (its central directory lost)",
             "corrupt_archive", catalog_url(cut_zip))
    b.series_fails("truncated_zip_series", "a series whose first half is whole in a .zip cut "
                   "short", ["archive_damaged"], zip_series)
    b.listed("tar_links_outside", "tar symlink and hard link members to /etc/passwd and "
             "/etc/shadow", "unsafe_member_path", f"tar://link-0.dcm::{tar_url}",
             f"tar://link-1.dcm::{tar_url}")
    # fmt: on


def _links(b: Builder) -> None:
    folder = b.folder("links")
    (folder / "dangling.dcm").symlink_to(folder / "does-not-exist")
    (folder / "loop-a.dcm").symlink_to(folder / "loop-b.dcm")
    (folder / "loop-b.dcm").symlink_to(folder / "loop-a.dcm")
    sub = b.folder("links/sub")
    (sub / "up").symlink_to("..", target_is_directory=True)
    os.mkfifo(folder / "pipe.dcm")
    # fmt: off
    b.listed("dangling_symlink", "a symlink to nothing", "unreadable",
             catalog_url(folder / "dangling.dcm"))
    b.listed("file_symlink_loop", "two file symlinks pointing at each other", "unreadable",
             catalog_url(folder / "loop-a.dcm"), catalog_url(folder / "loop-b.dcm"))
    b.listed("folder_symlink_loop", "a folder symlink to its parent (not followed)",
             "symlink_not_followed", catalog_url(sub / "up"))
    b.listed("named_pipe", "a FIFO named .dcm (reading it would block)", "not_regular_file",
             catalog_url(folder / "pipe.dcm"))
    # fmt: on


def _nifti(b: Builder) -> None:
    import nibabel as nib

    data = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.int16), np.eye(4)).to_bytes()
    b.file(
        "nifti_truncated",
        "a NIfTI file missing the end of its voxels",
        "bad_image_file",
        data[:-40],
        filename="truncated.nii",
    )
    header = bytearray(data[:352])
    struct.pack_into("<8h", header, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    path = b.folder("nifti_declared_over_cap") / "huge.nii"
    path.write_bytes(bytes(header) + bytes(64))
    description = "a NIfTI header declaring 30000^3 voxels (refused before allocating)"
    b.listed("nifti_declared_over_cap", description, "too_large", catalog_url(path))
    b.cases[-1] = dataclasses.replace(b.cases[-1], stage="assemble")


def _permissions(b: Builder) -> None:
    good = b.slice_bytes("perm_slice")
    path = b.folder("unreadable_file", perm=True) / "x.dcm"
    path.write_bytes(good)
    path.chmod(0)
    locked = b.folder("unreadable_folder/locked", perm=True)
    (locked / "x.dcm").write_bytes(good)
    locked.chmod(0)
    archives = {
        kind: b.folder(f"unreadable_{kind.replace('.', '_')}", perm=True) / f"a.{kind}"
        for kind in ("zip", "tar.gz")
    }
    with zipfile.ZipFile(archives["zip"], "w") as zipped:
        zipped.writestr("x.dcm", good)
    with tarfile.open(archives["tar.gz"], "w:gz") as tarred:
        info = tarfile.TarInfo("x.dcm")
        info.size = len(good)
        tarred.addfile(info, io.BytesIO(good))
    for unreadable in archives.values():
        unreadable.chmod(0)
    # fmt: off
    b.listed("unreadable_file", "a file without read permission", "permission_denied",
             catalog_url(path), unprivileged=True)
    b.listed("unreadable_folder", "a folder without read permission", "unreadable",
             catalog_url(locked), unprivileged=True)
    for kind, unreadable in archives.items():
        b.listed(f"unreadable_{kind.replace('.', '_')}", f"a .{kind} without read permission "
                 "(the archive is not damaged)", "permission_denied", catalog_url(unreadable),
                 unprivileged=True)
    # fmt: on


SECTIONS: tuple[Callable[[Builder], None], ...] = (
    _good,
    _colour,
    _not_dicom,
    _broken_dicom,
    _non_image,
    _failing_series,
    _archives,
    _links,
    _nifti,
    _permissions,
)
