"""docs/catalog-schema.md is generated from catalog/schema.py and never drifts from it."""

from __future__ import annotations

from pathlib import Path

from voxlake.catalog.schema import DICOM_COLUMNS, SCHEMAS, render_schema_markdown
from voxlake.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "catalog-schema.md"


def test_committed_schema_doc_matches_the_code():
    assert DOC.read_text() == render_schema_markdown(), (
        "docs/catalog-schema.md is stale: run `voxlake catalog schema-doc`"
    )


def test_schema_doc_command_writes_the_rendered_page(tmp_path, capsys):
    out = tmp_path / "schema.md"
    main(["catalog", "schema-doc", "--out", str(out)])
    assert out.read_text() == render_schema_markdown()
    assert str(out) in capsys.readouterr().out


def test_schema_covers_the_tags_people_filter_on():
    keywords = {c.keyword for c in DICOM_COLUMNS}
    wanted = {
        "Modality", "Manufacturer", "ManufacturerModelName", "BodyPartExamined",
        "SeriesDescription", "ProtocolName", "SliceThickness", "PixelSpacing", "KVP",
        "XRayTubeCurrent", "Exposure", "ConvolutionKernel", "ContrastBolusAgent",
        "MagneticFieldStrength", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
        "SequenceName", "ImageType", "Rows", "Columns", "NumberOfFrames", "SOPClassUID",
        "PatientAge", "PatientSex",
    }  # fmt: skip
    assert wanted <= keywords, sorted(wanted - keywords)
    assert len(DICOM_COLUMNS) >= 60
    instances = SCHEMAS["instances"].names
    assert {"transfer_syntax_uid", "header_json"} <= set(instances)
    # Nothing in the schema is named after an identifying attribute.
    for banned in ("patient_name", "patient_id", "patient_birth_date", "institution_name"):
        assert all(banned not in schema.names for schema in SCHEMAS.values())
