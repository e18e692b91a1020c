"""File layouts and pixel encodings: gzip, no preamble, deflate, JPEG baseline, BitsStored
masking, DICOMDIR and palette colour, each checked against the generator's truth."""

from __future__ import annotations

import dataclasses
import gzip
import io
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ingest
from voxlake.keys import keyed_hash
from voxlake.testing import write_series
from voxlake.testing.profiles import sample_specs
from voxlake.volumes import read_volume

from ..conftest import SECRET

pytestmark = pytest.mark.integration


def _spec(name: str, modality: str = "MR", **changes):
    base = next(s for s in sample_specs(profile="tiny", seed=0) if s.modality == modality)
    return dataclasses.replace(
        base,
        rows=16,
        columns=12,
        n_slices=5,
        series_description=name,
        series_instance_uid=f"{base.series_instance_uid}.{sum(map(ord, name))}",
        **changes,
    )


def _rewrite(written, edit) -> None:
    for path in written.files:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, dask_client):
    """One folder holding a series per layout; ingested once. Returns (truth, catalog)."""
    root = tmp_path_factory.mktemp("layouts")
    src = root / "in"
    truth: dict[str, tuple[str, np.ndarray]] = {}

    gz = write_series(_spec("gzip"), src / "gz")
    for path in gz.files[::2]:  # half the files as .dcm.gz
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    truth["gzip"] = (gz.spec.series_instance_uid, gz.expected_volume())

    bare = write_series(_spec("bare"), src / "bare", preamble=False)
    truth["bare"] = (bare.spec.series_instance_uid, bare.expected_volume())

    deflated = write_series(_spec("deflate"), src / "deflate")

    def deflate(ds):
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    _rewrite(deflated, deflate)
    truth["deflate"] = (deflated.spec.series_instance_uid, deflated.expected_volume())

    masked = write_series(
        _spec(
            "masked",
            "CT",
            pixel_representation=1,
            bits_stored=12,
            rescale_intercept=0.0,
        ),
        src / "masked",
    )

    def garbage(ds):  # junk above BitsStored must be masked off, then sign-extended
        ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") | 0xA000).astype("<u2").tobytes()

    _rewrite(masked, garbage)
    truth["masked"] = (masked.spec.series_instance_uid, masked.expected_volume())
    assert truth["masked"][1].min() < 0  # the sign extension is exercised

    jpeg = write_series(_spec("jpeg"), src / "jpeg")
    decoded = []
    for path in jpeg.files:
        ds = pydicom.dcmread(path)
        eight = np.clip(ds.pixel_array // 8, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(eight).save(buffer, format="JPEG", quality=90)
        decoded.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))))
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.save_as(path, enforce_file_format=True)
    order = np.argsort([pydicom.dcmread(p).ImagePositionPatient[2] for p in jpeg.files])
    truth["jpeg"] = (jpeg.spec.series_instance_uid, np.stack([decoded[i] for i in order]))

    palette = write_series(_spec("palette"), src / "palette")
    # 16-bit indices through 2048-entry tables starting at index 100: indices below the
    # first entry take the first, above the last take the last (PS3.3 C.7.6.3.1.5).
    tables = np.random.default_rng(3).integers(0, 65536, (3, 2048)).astype(np.uint16)
    index = np.stack([pydicom.dcmread(p).pixel_array for p in palette.files]).astype(int)
    looked_up = tables[:, np.clip(index - 100, 0, 2047)]

    def to_palette(ds):
        ds.PhotometricInterpretation = "PALETTE COLOR"
        for element, table in zip((0x1101, 0x1102, 0x1103), tables, strict=True):
            ds.add_new((0x0028, element), "US", [2048, 100, 16])
            ds.add_new((0x0028, element + 0x100), "OW", table.tobytes())

    _rewrite(palette, to_palette)
    truth["palette"] = (palette.spec.series_instance_uid, looked_up)

    directory = pydicom.Dataset()
    directory.file_meta = pydicom.dataset.FileMetaDataset()
    directory.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    directory.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    directory.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    directory.FileSetID = "VXL"
    directory.DirectoryRecordSequence = pydicom.Sequence()
    directory.save_as(src / "DICOMDIR", enforce_file_format=True)
    shutil.copy(src / "DICOMDIR", src / "gz" / "DICOMDIR")

    report = ingest(
        [src],
        catalog=root / "c",
        store=root / "s",
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    return truth, report, open_catalog(root / "c")


@pytest.mark.parametrize("name", ["gzip", "bare", "deflate", "masked", "jpeg", "palette"])
def test_layout_decodes_to_the_truth(name, layouts):
    truth, _, catalog = layouts
    uid, expected = truth[name]
    rows = catalog.volumes[catalog.volumes.series_key == keyed_hash(SECRET, "series", uid)]
    (row,) = rows.itertuples()
    data, _ = read_volume(row.store_url, row.store_path)
    if name == "jpeg":  # lossy: decoders may round the inverse DCT differently by 1
        assert data.shape == expected.shape and data.dtype == np.uint8
        assert np.abs(data.astype(int) - expected.astype(int)).max() <= 1
        assert "1.2.840.10008.1.2.4.50" in row.decoder  # provenance names the codec
    else:
        assert np.array_equal(data, expected), name
    if name == "palette":  # colour channels first, recorded in the catalog and OME axes
        assert data.shape == (3, 5, 16, 12) and data.dtype == np.uint16
        assert row.axes == "czyx" and row.n_timepoints == 1 and row.n_slices == 5


def test_directories_are_skipped_with_codes(layouts):
    _, report, catalog = layouts
    codes = sorted((r.subject_kind, r.code) for r in catalog.failures.itertuples())
    assert codes == [("file", "dicomdir"), ("file", "dicomdir")]
    assert report.volumes_written == 6
