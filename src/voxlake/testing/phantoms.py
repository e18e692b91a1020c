"""Series specifications and the phantoms they describe.

A :class:`SeriesSpec` fixes everything about one synthetic series: who it belongs to,
its geometry in patient (LPS) coordinates, how pixels are stored, and whether the
phantom holds a lesion. :func:`make_phantom` turns a spec into intensities; the
anatomy is defined in patient coordinates and *sampled* on the spec's voxel grid, so an
oblique or feet-first series shows the same body as an axial one, and a reader that
gets the geometry wrong gets visibly wrong pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian

__all__ = [
    "SeriesSpec",
    "derive_uid",
    "make_phantom",
    "spec_rng",
    "stored_volume",
    "uid_from_bytes",
]

_ORTHO_TOL = 1e-6

# Tissue classes of the anatomy; values per modality live in the tables below.
_AIR, _FAT, _SOFT, _LUNG, _BONE, _CORTEX, _GREY, _WHITE, _CSF, _BLOOD, _LIVER = range(11)
_KIDNEY, _GAS, _CALC = 11, 12, 13
_CT_VALUES = np.array(
    [-1000, -100, 40, -820, 750, 1150, 36, 28, 8, 50, 60, 150, -950, 300], dtype=np.float64
)
_MR_VALUES = np.array(
    [0, 1200, 450, 40, 350, 40, 600, 780, 180, 200, 520, 480, 0, 60], dtype=np.float64
)


@dataclass(frozen=True, kw_only=True)
class SeriesSpec:
    """Everything that defines one synthetic DICOM series.

    Geometry follows DICOM: ``orientation`` is ImageOrientationPatient (row direction,
    then column direction, LPS), ``pixel_spacing`` is PixelSpacing (row spacing, column
    spacing), ``origin`` is the ImagePositionPatient of the first slice in *spatial*
    order, and slice ``k`` lies at ``origin + k * slice_spacing * normal`` with
    ``normal = cross(row_dir, col_dir)``.

    Attributes
    ----------
    shuffle_instance_numbers
        InstanceNumber is a random permutation of spatial order.
    reverse_slice_direction
        InstanceNumber 1 is the *last* slice in spatial order (numbering runs against the
        slice normal). Ignored when ``shuffle_instance_numbers`` is set.
    pixel_representation, bits_stored
        Storage: 1 = signed, 0 = unsigned; BitsAllocated is always 16. Stored values are
        clipped to what ``bits_stored`` can hold.
    write_rescale
        Write RescaleSlope/Intercept/Type. When false (as many MR scanners do) the
        values must be 1 and 0 and readers have to assume them.
    slice_thickness
        SliceThickness; ``None`` means equal to ``slice_spacing``.
    frame_of_reference_uid
        Empty means derived from ``series_instance_uid``.
    """

    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    patient_age: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str
    study_date: str
    modality: str
    series_description: str
    series_number: int
    rows: int
    columns: int
    n_slices: int
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    orientation: tuple[float, float, float, float, float, float]
    origin: tuple[float, float, float]
    rescale_slope: float
    rescale_intercept: float
    lesion: bool
    shuffle_instance_numbers: bool = False
    reverse_slice_direction: bool = False
    transfer_syntax: str = str(ExplicitVRLittleEndian)
    pixel_representation: int = 1
    bits_stored: int = 16
    write_rescale: bool = True
    noise_sd: float = 15.0
    body_part: str = "CHEST"
    patient_position: str = "HFS"
    slice_thickness: float | None = None
    study_time: str = "093000"
    study_description: str = ""
    study_id: str = "VXLSTUDY0"
    frame_of_reference_uid: str = ""
    manufacturer: str = "SIEMENS"
    manufacturer_model: str = "SOMATOM Definition AS+"
    software_versions: str = "syngo CT VA48A"
    station_name: str = "VXLSTATION00"
    device_serial_number: str = "VXLSN000000"
    institution_name: str = "VXL GENERAL HOSPITAL"
    institution_address: str = "1 VXL WAY^SPRINGFIELD"
    patient_address: str = "99 VXL LANE^SPRINGFIELD"
    referring_physician_name: str = "VXLREF^MORGAN"
    operators_name: str = "VXLOP^SAM"
    patient_weight: float = 70.0
    patient_size: float = 1.7
    # CT acquisition
    kvp: float = 120.0
    xray_tube_current: int = 200
    exposure_time: int = 500
    convolution_kernel: str = "B31f"
    # MR acquisition
    echo_time: float = 15.0
    repetition_time: float = 500.0
    field_strength: float = 1.5
    flip_angle: float = 90.0
    scanning_sequence: str = "SE"

    def __post_init__(self) -> None:
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be 'CT' or 'MR', got {self.modality!r}")
        if min(self.rows, self.columns, self.n_slices) < 1:
            raise ValueError("rows, columns and n_slices must be positive")
        if min(*self.pixel_spacing, self.slice_spacing) <= 0:
            raise ValueError("pixel_spacing and slice_spacing must be positive")
        if self.pixel_representation not in (0, 1) or not 8 <= self.bits_stored <= 16:
            raise ValueError("pixel_representation must be 0/1 and bits_stored in 8..16")
        if self.rescale_slope == 0:
            raise ValueError("rescale_slope must be non-zero")
        if not self.write_rescale and (self.rescale_slope, self.rescale_intercept) != (1, 0):
            raise ValueError("write_rescale=False needs slope 1 and intercept 0")
        if len(self.orientation) != 6 or len(self.origin) != 3:
            raise ValueError("orientation needs 6 values and origin 3")
        row, col = self.row_direction, self.column_direction
        if (
            abs(np.linalg.norm(row) - 1) > _ORTHO_TOL
            or abs(np.linalg.norm(col) - 1) > _ORTHO_TOL
            or abs(float(row @ col)) > _ORTHO_TOL
        ):
            raise ValueError("orientation must be two orthonormal direction cosines")
        for name in ("patient_birth_date", "study_date"):
            value = getattr(self, name)
            if len(value) != 8 or not value.isdigit():
                raise ValueError(f"{name} must be YYYYMMDD")

    @property
    def row_direction(self) -> np.ndarray:
        """Unit vector (LPS) along a row: the direction of increasing column index."""
        return np.asarray(self.orientation[:3], dtype=np.float64)

    @property
    def column_direction(self) -> np.ndarray:
        """Unit vector (LPS) down a column: the direction of increasing row index."""
        return np.asarray(self.orientation[3:], dtype=np.float64)

    @property
    def slice_normal(self) -> np.ndarray:
        """``cross(row_direction, column_direction)``: the spatial sort direction."""
        return np.cross(self.row_direction, self.column_direction)

    @property
    def frame_of_reference(self) -> str:
        """FrameOfReferenceUID written to the headers."""
        return self.frame_of_reference_uid or derive_uid(self.series_instance_uid, "for")

    @property
    def thickness(self) -> float:
        """SliceThickness written to the headers."""
        return self.slice_spacing if self.slice_thickness is None else self.slice_thickness

    def slice_positions(self) -> np.ndarray:
        """ImagePositionPatient of every slice, in spatial order.

        Returns
        -------
        numpy.ndarray
            Shape ``(n_slices, 3)``, float64, LPS millimetres.
        """
        k = np.arange(self.n_slices, dtype=np.float64)[:, None]
        step = self.slice_spacing * self.slice_normal
        return np.asarray(self.origin, dtype=np.float64)[None, :] + k * step[None, :]

    def ras_affine(self) -> np.ndarray:
        """The 4x4 RAS affine of the spatially sorted volume (see DESIGN.md).

        Returns
        -------
        numpy.ndarray
            Maps ``(i, j, k, 1)`` = (column, row, slice) to RAS millimetres.
        """
        lps = np.eye(4)
        lps[:3, 0] = self.row_direction * self.pixel_spacing[1]
        lps[:3, 1] = self.column_direction * self.pixel_spacing[0]
        lps[:3, 2] = self.slice_normal * self.slice_spacing
        lps[:3, 3] = self.origin
        ras: np.ndarray = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        return ras + 0.0  # no negative zeros

    def storage_range(self) -> tuple[int, int]:
        """The smallest and largest stored value that ``bits_stored`` allows."""
        if self.pixel_representation:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1


def derive_uid(base: str, purpose: str) -> str:
    """A ``2.25.`` UID that is a pure function of ``base`` and ``purpose``."""
    digest = hashlib.sha256(f"{base}|{purpose}".encode()).digest()
    return uid_from_bytes(digest[:16])


def uid_from_bytes(data: bytes) -> str:
    """A ``2.25.`` UID with exactly 39 digits, so no such UID is a prefix of another."""
    return f"2.25.{10**38 + int.from_bytes(data, 'big') % (9 * 10**38)}"


def spec_rng(spec: SeriesSpec, seed: int, stream: int) -> np.random.Generator:
    """A generator fixed by (seed, series UID, stream): independent streams per use."""
    digest = hashlib.sha256(spec.series_instance_uid.encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *words]))


def make_phantom(spec: SeriesSpec, *, seed: int) -> np.ndarray:
    """Intensities of the series before quantisation, noise included.

    Parameters
    ----------
    spec
        The series; its geometry decides where the anatomy is sampled.
    seed
        Fixes the noise and the lesion placement. The noise does not depend on
        ``spec.lesion``, so a phantom with and without lesion differ only in the lesion.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(n_slices, rows, columns)`` in spatial order: Hounsfield units
        for CT, arbitrary magnitude units for MR.
    """
    values = _CT_VALUES if spec.modality == "CT" else _MR_VALUES
    frame = _BodyFrame(spec)
    lesions = _place_lesions(spec, frame, spec_rng(spec, seed, 1)) if spec.lesion else []
    noise_rng = spec_rng(spec, seed, 2)
    out = np.empty((spec.n_slices, spec.rows, spec.columns), dtype=np.float32)
    jj, ii = np.meshgrid(
        np.arange(spec.rows, dtype=np.float64),
        np.arange(spec.columns, dtype=np.float64),
        indexing="ij",
    )
    along_row = ii * spec.pixel_spacing[1]
    down_col = jj * spec.pixel_spacing[0]
    row, col = spec.row_direction, spec.column_direction
    for k, pos in enumerate(spec.slice_positions()):
        xyz = [pos[a] + along_row * row[a] + down_col * col[a] for a in range(3)]
        u, v, w = frame.normalise(*xyz)
        img = values[_anatomy(spec.body_part, u, v, w, xyz[2])]
        for centre, radius, value in lesions:
            dist2 = sum((xyz[a] - centre[a]) ** 2 for a in range(3))
            img = np.where(dist2 <= radius * radius, value, img)
        noise = noise_rng.standard_normal((2, spec.rows, spec.columns)) * spec.noise_sd
        if spec.modality == "MR":  # magnitude images: Rician noise, never negative
            img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
        else:
            img = img + noise[0]
        out[k] = img
    return out


def stored_volume(spec: SeriesSpec, *, seed: int) -> np.ndarray:
    """The stored pixel values written to the files, in spatial order.

    ``round((phantom - intercept) / slope)`` clipped to the range ``bits_stored``
    allows, as int16 (signed) or uint16 (unsigned).
    """
    lo, hi = spec.storage_range()
    phantom = make_phantom(spec, seed=seed).astype(np.float64)
    scaled = np.rint((phantom - spec.rescale_intercept) / spec.rescale_slope)
    dtype = np.int16 if spec.pixel_representation else np.uint16
    return np.clip(scaled, lo, hi).astype(dtype)


class _BodyFrame:
    """Maps LPS millimetres to body coordinates (u, v, w), about -1..1 inside the FOV.

    u grows to the patient's left, v posterior, w superior; the anatomy is centred on
    the centre of the series' voxel grid and scaled by its field of view.
    """

    def __init__(self, spec: SeriesSpec) -> None:
        self.spec = spec
        self.half = np.array(
            [
                spec.pixel_spacing[1] * (spec.columns - 1) / 2,
                spec.pixel_spacing[0] * (spec.rows - 1) / 2,
                spec.slice_spacing * (spec.n_slices - 1) / 2,
            ]
        )
        self.axes = np.stack([spec.row_direction, spec.column_direction, spec.slice_normal])
        self.centre = np.asarray(spec.origin, dtype=np.float64) + self.half @ self.axes
        self.scale = max(float(min(self.half[0], self.half[1])), 1.0)
        self.zscale = max(float(self.half[2]), self.scale * 0.25)

    def normalise(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = self.centre
        u: np.ndarray = (x - c[0]) / self.scale
        v: np.ndarray = (y - c[1]) / self.scale
        w: np.ndarray = (z - c[2]) / self.zscale
        return u, v, w

    def to_patient(self, u: float, v: float, w: float) -> np.ndarray:
        point: np.ndarray = self.centre + np.array(
            [u * self.scale, v * self.scale, w * self.zscale]
        )
        return point

    def inside(self, point: np.ndarray, margin: float) -> bool:
        """Whether a sphere at ``point`` lies within the voxel grid's box."""
        local = self.axes @ (point - self.centre)
        return bool(np.all(np.abs(local) <= self.half - margin))


def _ellipse(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float | np.ndarray, b: float | np.ndarray
) -> np.ndarray:
    r2: np.ndarray = ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2
    return r2


def _anatomy(
    part: str, u: np.ndarray, v: np.ndarray, w: np.ndarray, z_mm: np.ndarray
) -> np.ndarray:
    """Tissue class per pixel. Deliberately asymmetric left/right, front/back, up/down."""
    lab = np.full(u.shape, _AIR, dtype=np.intp)
    if part == "HEAD":
        s = np.sqrt(np.clip(1.0 - 0.45 * ((w + 1) / 2) ** 2, 0.05, None))
        head = _ellipse(u, v, 0.0, 0.02, 0.78 * s, 0.92 * s)
        lab[head <= 1] = _SOFT
        lab[head <= 0.93] = _CORTEX
        lab[head <= 0.80] = _GREY
        lab[head <= 0.45] = _WHITE
        for cu in (-0.09, 0.1):  # ventricles, the left one a little larger
            size = 0.05 if cu < 0 else 0.06
            lab[(_ellipse(u, v, cu, -0.05, size, 0.2) <= 1) & (np.abs(w) < 0.6)] = _CSF
        lab[_ellipse(u, v, 0.2, 0.3, 0.035, 0.035) <= 1] = _CALC
        return lab
    abdomen = part == "ABDOMEN"
    body = _ellipse(u, v, 0.0, 0.05, 0.88 if abdomen else 0.85, 0.62)
    lab[body <= 1] = _FAT
    lab[body <= (0.78 if abdomen else 0.86)] = _SOFT
    spine = _ellipse(u, v, 0.0, 0.38, 0.1, 0.09)
    if abdomen:
        liver = _ellipse(u, v, -0.33, -0.05, 0.32 * (0.85 + 0.15 * w), 0.33)
        lab[liver <= 1] = _LIVER
        for cu in (-0.33, 0.35):
            lab[(_ellipse(u, v, cu, 0.32, 0.09, 0.13) <= 1) & (w < 0.4)] = _KIDNEY
        lab[_ellipse(u, v, 0.3, -0.25, 0.07, 0.06) <= 1] = _GAS
    else:
        ribs = (body > 0.62) & (body <= 0.70) & (np.sin(2 * np.pi * z_mm / 24.0) > 0.2)
        lab[ribs] = _BONE
        grow = 0.27 - 0.05 * w
        lab[_ellipse(u, v, 0.34, 0.0, grow * 0.92, 0.38) <= 1] = _LUNG
        lab[_ellipse(u, v, -0.33, 0.0, grow, 0.4) <= 1] = _LUNG
        heart = _ellipse(u, v, 0.12, -0.16, 0.22, 0.2 * (1.0 - 0.3 * w))
        lab[(heart <= 1) & (w < 0.7)] = _SOFT
    lab[spine <= 1] = _BONE
    lab[_ellipse(u, v, 0.0, 0.52, 0.035, 0.035) <= 1] = _CSF
    lab[_ellipse(u, v, 0.09, 0.23, 0.05, 0.05) <= 1] = _BLOOD
    return lab


def _place_lesions(
    spec: SeriesSpec, frame: _BodyFrame, rng: np.random.Generator
) -> list[tuple[np.ndarray, float, float]]:
    """One or two spheres (centre LPS, radius mm, value) inside the organ of interest."""
    if spec.modality == "CT":
        base = 32.0 if spec.body_part == "HEAD" else 40.0
    else:
        base = float(_MR_VALUES[_GREY if spec.body_part == "HEAD" else _SOFT])
    sites = {"HEAD": (0.0, -0.1, 0.3), "ABDOMEN": (-0.33, -0.05, 0.1)}
    cu, cv, spread = sites.get(spec.body_part, (0.33 if rng.random() < 0.5 else -0.33, 0.0, 0.1))
    min_radius = 1.6 * max(*spec.pixel_spacing, spec.slice_spacing)
    lesions = []
    for n in range(1 + int(rng.random() < 0.35)):
        radius = max(rng.uniform(0.06, 0.1) * frame.scale * (0.7 if n else 1.0), min_radius)
        radius = min(radius, max(float(frame.half.min()) * 0.8, 0.5))
        u = cu + rng.uniform(-spread, spread)
        v = cv + rng.uniform(-0.12, 0.12)
        w = rng.uniform(-0.4, 0.4)
        centre = frame.to_patient(u, v, w)
        for _ in range(20):  # pull towards the centre until the sphere fits the grid
            if frame.inside(centre, radius):
                break
            centre = frame.centre + 0.8 * (centre - frame.centre)
        if spec.modality == "CT":
            value = base + rng.uniform(60.0, 90.0)
        else:
            value = base * rng.uniform(1.3, 1.45)
        lesions.append((centre, float(radius), float(value)))
    return lesions
