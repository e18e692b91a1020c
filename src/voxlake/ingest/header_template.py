"""The header pass's parser: pydicom once per series, a walk over the elements after that.

The files of one series, as a scanner writes them, hold the same elements in the same
order with mostly the same values: SOPInstanceUID (also in the file meta),
InstanceNumber, ImagePositionPatient, SliceLocation, acquisition times and the pixel data
differ, and a UID one digit longer moves everything after it. pydicom's parse was about
a third of what the header pass spent on a 512 x 512 CT slice (py-spy, ad hoc).

:class:`TemplateParser` parses a file with :func:`~voxlake.ingest.dicom_bytes.parse_dicom_bytes`
and keeps it as a template: the tag and VR of each top-level element in file order, its
value's bytes and what pydicom made of it. A template is kept only if walking its own
bytes by those rules finds every element where pydicom found it. A next file is walked
the same way: it must hold the same elements with the same VRs (lengths may differ), end
where its last element ends, keep its transfer syntax and character set, and differ in
value only where pydicom left the element raw (undefined-length sequences, which pydicom
reads at once, must be the same bytes). pydicom would then read it as the same raw
elements at the walked offsets: its dataset is the template's elements with the
differing values and the offsets replaced, built with pydicom's own types.
Anything else is parsed by pydicom and becomes the template. The pixel data is left in
the file's bytes (a deferred value, read from them if asked): the header pass only needs
where it lies. Elements nested in an unchanged sequence keep the template's offsets
(nothing reads those).

Most next files need no walk either: a file of the same length as the last one read
(the *reference*) whose bytes, up to its pixel values, differ from the reference's only
inside element values has every element where the reference has it, which one numpy
comparison of the bytes shows. Its dataset is the reference's elements with those values
replaced (by the same rules as a walk). Walked or compared, the parser names the tags
whose value changed against the template or the reference (``TemplateParser.changed``
and ``.base``), so that the header pass cleans and converts only those again
(:class:`~voxlake.ingest.header_json.HeaderCleaner`); a CT slice changes six or seven
of its 80 elements, an MR slice of a GE scanner 14 of 340.

``tests/ingest/test_header_template.py`` checks that both ways give equal datasets and
equal catalog rows.
"""

from __future__ import annotations

import copy
import io
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import numpy as np

from voxlake.ingest.dicom_bytes import parse_dicom_bytes

if TYPE_CHECKING:
    import pydicom
    from pydicom.tag import BaseTag

__all__ = ["References", "TemplateParser"]

_UNDEFINED: Final = 0xFFFFFFFF
_PIXEL_DATA: Final = 0x7FE00010
_GROUP_LENGTH: Final = 0x00020000
_MEDIA_SOP_INSTANCE: Final = 0x00020003
#: Read by pydicom while it parses (the character set of the dataset's text).
_CHARSET: Final = 0x00080005
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD
#: Uncompressed little-endian syntaxes: the body's offsets are offsets in the file.
_SYNTAXES: Final = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS: Final = frozenset(
    b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split()
)  # fmt: skip
_META_START: Final = 132
_NESTING: Final = 16

_TAG = struct.Struct("<HH")
_TAG_LENGTH = struct.Struct("<HHL")
_SHORT = struct.Struct("<H")
_LONG = struct.Struct("<L")


@dataclass(frozen=True, slots=True)
class _Element:
    """A top-level element as the template holds it."""

    tag: int
    vr: bytes | None  # as written; None: implicit VR
    offset: int  # of the value
    length: int  # as written (_UNDEFINED for an undefined-length sequence)
    value: bytes  # the value's bytes (an undefined-length sequence: up to its end; the
    # pixel data: none, it is never compared)
    element: Any  # what pydicom made of it: a RawDataElement, or a DataElement


@dataclass(frozen=True, slots=True)
class _Same:
    """A file read from the template, as a next file of its length is compared with it.

    ``head`` is the file from the end of the preamble to its pixel values; ``starts`` and
    ``ends`` the value span of each element (file meta, then body, the pixel data left
    out), ``elements`` those elements and ``meta`` and ``body`` the file's elements as
    pydicom reads them (copied for each file built from them).
    """

    size: int
    head: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    elements: tuple[_Element, ...]
    n_meta: int
    meta: dict[Any, Any]
    body: dict[Any, Any]


@dataclass(frozen=True, slots=True)
class _Template:
    meta: tuple[_Element, ...]
    body: tuple[_Element, ...]
    implicit: bool
    encoding: Any
    #: An empty dataset of the template's encoding whose attributes the datasets of the
    #: files read from it are copied from (pydicom sets about 60, each through
    #: ``Dataset.__setattr__``); never handed out.
    prototype: pydicom.Dataset


def _tag_at(data: bytes, pos: int) -> int:
    group, element = _TAG.unpack_from(data, pos)
    return int(group << 16 | element)


def _header(data: bytes, pos: int, implicit: bool) -> tuple[bytes | None, int, int]:
    """``(VR, header size, length)`` of the element at `pos`."""
    if implicit:
        return None, 8, _LONG.unpack_from(data, pos + 4)[0]
    vr = data[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        return vr, 12, _LONG.unpack_from(data, pos + 8)[0]
    return vr, 8, _SHORT.unpack_from(data, pos + 6)[0]


def _sequence_end(data: bytes, pos: int, implicit: bool, depth: int = 0) -> int | None:
    """End of the undefined-length sequence whose items start at `pos` (None: unsure)."""
    end = len(data)
    while depth < _NESTING and pos + 8 <= end:
        group, element, length = _TAG_LENGTH.unpack_from(data, pos)
        tag, pos = group << 16 | element, pos + 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            return None
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements, then the item's end
            if pos + 8 > end:
                return None
            tag = _tag_at(data, pos)
            if tag == _ITEM_END:
                pos += 8
                break
            vr, header, length = _header(data, pos, implicit)
            pos += header
            if length == _UNDEFINED:
                if vr not in (None, b"SQ"):
                    return None  # encapsulated data or an undefined UN: not walked
                inner = _sequence_end(data, pos, implicit, depth + 1)
                if inner is None:
                    return None
                pos = inner
            else:
                pos += length
    return None


#: A walked element: (tag, VR as written, value offset, length as written, value end).
_Walked = tuple[int, bytes | None, int, int, int]


def _walk(
    data: bytes, pos: int, implicit: bool, expected: tuple[_Element, ...] | None, *, meta: bool
) -> tuple[list[_Walked], int] | None:
    """The elements from `pos` and where the last ends: the meta group's (group 2) or the
    body's (to the end of `data`). With `expected`, exactly those tags and VRs, or None."""
    end = len(data)
    out: list[_Walked] = []
    while pos + 8 <= end:
        tag = _tag_at(data, pos)
        if meta and tag >> 16 != 2:
            break
        vr, header, length = _header(data, pos, implicit)
        if expected is not None:
            if len(out) == len(expected):
                return None  # more elements than the template
            if tag != expected[len(out)].tag or vr != expected[len(out)].vr:
                return None
        offset = pos + header
        if length == _UNDEFINED:
            if vr not in (None, b"SQ"):
                return None  # encapsulated pixel data, an undefined UN: not walked
            stop = _sequence_end(data, offset, implicit)
            if stop is None:
                return None
        else:
            stop = offset + length
            if stop > end:
                return None
        out.append((tag, vr, offset, length, stop))
        pos = stop
    if expected is not None and len(out) != len(expected):
        return None
    if not meta and pos != end:
        return None  # bytes after the last element (or too few for one)
    return out, pos


def _elements(data: bytes, walked: list[_Walked], ds: Any) -> tuple[_Element, ...] | None:
    """The template's elements, if pydicom read each where the walk found it."""
    from pydicom.dataelem import DataElement, RawDataElement

    if [int(tag) for tag in ds.keys()] != [tag for tag, *_ in walked]:  # noqa: SIM118
        return None
    out = []
    for tag, vr, offset, length, value_end in walked:
        element = ds.get_item(tag, keep_deferred=True)
        if isinstance(element, RawDataElement):
            if element.value_tell != offset or element.length != length:
                return None
        elif not isinstance(element, DataElement) or element.file_tell != offset:
            return None
        value = data[offset:value_end]
        if tag == _PIXEL_DATA:  # never compared, and the template must not keep the pixels
            value = b""
            if isinstance(element, RawDataElement):
                element = element._replace(value=None)
        out.append(_Element(tag, vr, offset, length, value, element))
    return tuple(out)


def _template(ds: pydicom.Dataset, data: bytes) -> tuple[_Template, _Same | None] | None:
    """What a dataset pydicom just read from `data` offers as a template (and as the
    file the next one is compared with), or None."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import FileDataset

    file_meta = getattr(ds, "file_meta", None)
    if not isinstance(ds, FileDataset) or file_meta is None or ds.preamble is None:
        return None
    implicit, little = ds.original_encoding
    if str(file_meta.get("TransferSyntaxUID", "")) not in _SYNTAXES or not little:
        return None
    pixels = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if not isinstance(pixels, RawDataElement) or pixels.length == _UNDEFINED:
        return None
    walked_meta = _walk(data, _META_START, False, None, meta=True)
    if walked_meta is None:
        return None
    walked_body = _walk(data, walked_meta[1], bool(implicit), None, meta=False)
    if walked_body is None:
        return None
    meta = _elements(data, walked_meta[0], file_meta)
    body = _elements(data, walked_body[0], ds)
    if meta is None or body is None:
        return None
    template = _Template(
        meta=meta,
        body=body,
        implicit=bool(implicit),
        encoding=ds.original_character_set,
        prototype=_prototype(bool(implicit), ds.original_character_set),
    )
    # The template's own elements as a file read from it holds them (the pixel data
    # deferred), to compare the next file with.
    patched_meta = _patch(data, meta, walked_meta[0], changeable=_META_CHANGES)
    patched_body = _patch(data, body, walked_body[0], changeable=None)
    if patched_meta is None or patched_body is None:
        return template, None
    return template, _same(data, walked_meta[0], walked_body[0], patched_meta[0], patched_body[0])


def _same(
    data: bytes,
    walked_meta: list[_Walked],
    walked_body: list[_Walked],
    meta: dict[Any, Any],
    body: dict[Any, Any],
) -> _Same | None:
    """`data`'s elements as a next file of its length is compared with them, or None
    when its pixel values do not end the file (what follows them would not be compared)."""
    if walked_body[-1][0] != _PIXEL_DATA:
        return None
    walked = [*walked_meta, *walked_body[:-1]]
    stored = [*meta.values(), *body.values()][: len(walked)]
    elements = tuple(
        _Element(tag, vr, offset, length, data[offset:end], element)
        for (tag, vr, offset, length, end), element in zip(walked, stored, strict=True)
    )
    pixels = walked_body[-1][2]
    return _Same(
        size=len(data),
        # a copy of the header's bytes: a view would keep the whole file (pixels too) alive
        head=np.frombuffer(data[_META_START:pixels], np.uint8),
        starts=np.array([element.offset for element in elements], dtype=np.int64),
        ends=np.array([element.offset + len(element.value) for element in elements], np.int64),
        elements=elements,
        n_meta=len(walked_meta),
        meta=dict(meta),
        body=dict(body),
    )


def _looks_explicit(data: bytes, pos: int) -> bool:
    """pydicom's test of a body said to be implicit VR: an explicit VR (two capital
    letters) after the first tag makes it read the body as explicit VR."""
    vr = data[pos + 4 : pos + 6]
    return len(vr) == 2 and 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B


def _moved(element: Any, offset: int) -> Any:
    """`element` (raw or converted) with its value at `offset` in the file."""
    from pydicom.dataelem import RawDataElement

    if isinstance(element, RawDataElement):  # a tuple: built directly (_replace is slow)
        return RawDataElement(*element[:4], offset, *element[5:])
    moved = copy.copy(element)
    moved.file_tell = offset
    return moved


def _patch(
    data: bytes,
    template: tuple[_Element, ...],
    walked: list[_Walked],
    *,
    changeable: frozenset[int] | None,
) -> tuple[dict[BaseTag, Any], list[int]] | None:
    """The elements of `data` as pydicom would read them and the tags whose value differs
    from the template's, or None where pydicom must read them.

    `changeable`: the only tags whose value may differ (None: any pydicom left raw).
    """
    from pydicom.dataelem import RawDataElement

    out: dict[BaseTag, Any] = {}
    changed: list[int] = []
    for old, (tag, _, offset, length, value_end) in zip(template, walked, strict=True):
        element = old.element
        key = element.tag  # a BaseTag, as pydicom's own keys
        if tag == _PIXEL_DATA:
            if not isinstance(element, RawDataElement) or length == _UNDEFINED:
                return None
            out[key] = RawDataElement(key, element.VR, length, None, offset, *element[5:])
            continue  # deferred: read from the file's bytes if asked
        value = data[offset:value_end]
        if value == old.value:
            out[key] = element if offset == old.offset else _moved(element, offset)
            continue
        if changeable is not None and tag not in changeable:
            return None
        new = _changed(old, value, length, offset)
        if new is None:
            return None
        out[key] = new
        changed.append(tag)
    return out, changed


def _changed(old: _Element, value: bytes, length: int, offset: int) -> Any:
    """The element pydicom reads where `old` is, with another value; None when pydicom
    must read it (it converted `old` while reading, or the value changes how it reads
    the rest)."""
    from pydicom.dataelem import RawDataElement, convert_raw_data_element

    element = old.element
    if old.tag == _CHARSET:
        return None
    if isinstance(element, RawDataElement):
        return RawDataElement(element.tag, element.VR, length, value, offset, *element[5:])
    if old.tag == _GROUP_LENGTH and length == 4:  # pydicom converts it while reading
        raw = RawDataElement(element.tag, "UL", 4, value, offset, False, True)
        return convert_raw_data_element(raw)
    return None  # pydicom converted it while reading: not patched


def _same_layout(
    same: _Same, data: bytes
) -> tuple[dict[Any, Any], dict[Any, Any], frozenset[int]] | None:
    """The meta and body elements of a file of `same`'s length whose bytes differ from
    its only inside element values (one comparison of the bytes, no walk: every element
    then lies where `same`'s does), and the tags whose value differs; or None."""
    head = np.frombuffer(data, np.uint8, count=same.head.size, offset=_META_START)
    where = np.flatnonzero(head != same.head)
    meta, body = dict(same.meta), dict(same.body)  # pydicom converts in them in place
    if not where.size:
        return meta, body, frozenset()
    where += _META_START
    index = np.searchsorted(same.starts, where, side="right") - 1
    if index[0] < 0 or bool((where >= same.ends[index]).any()):
        return None  # a tag, VR or length differs
    changed = []
    for i in sorted(set(index.tolist())):
        old = same.elements[i]
        if i < same.n_meta and old.tag not in _META_CHANGES:
            return None
        new = _changed(old, data[old.offset : old.offset + len(old.value)], old.length, old.offset)
        if new is None:
            return None
        (meta if i < same.n_meta else body)[new.tag] = new
        changed.append(old.tag)
    return meta, body, frozenset(changed)


def _patched(
    template: _Template, same: _Same | None, data: bytes
) -> tuple[pydicom.Dataset, frozenset[int], _Same | None, bool] | None:
    """The dataset pydicom would read from `data`, or None when it must read it.

    With it: the tags whose value differs, what the next file is compared with (None:
    `same` still) and whether `data` was compared with `same` (the tags differ from
    `same`'s) rather than walked against the template (they differ from the template's).
    """
    if len(data) < _META_START or data[128:_META_START] != b"DICM":
        return None
    if same is not None and len(data) == same.size:
        found = _same_layout(same, data)
        if found is not None:
            meta, body, changed = found
            return _dataset(template, data, meta, body), changed, None, True
    walked = _walked(template, data)
    if walked is None:
        return None
    meta, body, walked_meta, walked_body, changed = walked
    new_same = _same(data, walked_meta, walked_body, meta, body)
    return _dataset(template, data, meta, body), changed, new_same, False


def _dataset(
    template: _Template, data: bytes, meta: dict[Any, Any], body: dict[Any, Any]
) -> pydicom.Dataset:
    """The dataset of `data` with these elements: the template's prototype, copied."""
    like = template.prototype
    ds: pydicom.Dataset = _copied(like, body)
    ds.__dict__.update(
        preamble=data[:128], buffer=io.BytesIO(data), file_meta=_copied(like.file_meta, meta)
    )
    return ds


def _prototype(implicit: bool, encoding: Any) -> pydicom.Dataset:
    """An empty dataset as pydicom sets one up for a little-endian file of this VR
    encoding and character set."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

    dataset = Dataset()
    dataset.set_original_encoding(implicit, True, encoding)
    ds = FileDataset(
        io.BytesIO(b""),
        dataset,
        preamble=bytes(128),
        file_meta=FileMetaDataset(),
        is_implicit_VR=implicit,
        is_little_endian=True,
    )
    ds.set_original_encoding(implicit, True, encoding)
    return ds


def _copied(like: Any, elements: dict[Any, Any]) -> Any:
    """A dataset of `like`'s class and attributes holding `elements` (its dictionaries
    and lists copied, not shared)."""
    out = object.__new__(type(like))
    state = {k: v.copy() if type(v) in (dict, list) else v for k, v in like.__dict__.items()}
    state["_dict"] = elements
    out.__dict__.update(state)
    return out


def _walked(
    template: _Template, data: bytes
) -> tuple[dict[Any, Any], dict[Any, Any], list[_Walked], list[_Walked], frozenset[int]] | None:
    """The meta and body elements of a file with the template's elements (lengths and
    offsets may differ), the walk that found them and the tags whose value differs from
    the template's; or None."""
    walked_meta = _walk(data, _META_START, False, template.meta, meta=True)
    if walked_meta is None:
        return None
    if template.implicit and _looks_explicit(data, walked_meta[1]):
        return None  # pydicom would read the body as explicit VR
    walked_body = _walk(data, walked_meta[1], template.implicit, template.body, meta=False)
    if walked_body is None:
        return None
    meta = _patch(data, template.meta, walked_meta[0], changeable=_META_CHANGES)
    body = _patch(data, template.body, walked_body[0], changeable=None)
    if meta is None or body is None:
        return None
    return meta[0], body[0], walked_meta[0], walked_body[0], frozenset(meta[1] + body[1])


#: File meta elements whose value may differ from the template's (the transfer syntax,
#: say, may not): the instance's UID and, when its length changes, the group's length.
_META_CHANGES: Final = frozenset({_GROUP_LENGTH, _MEDIA_SOP_INSTANCE})


class TemplateParser:
    """:func:`~voxlake.ingest.dicom_bytes.parse_dicom_bytes` for a batch of files, in order.

    Use one per batch, in one process. ``parsed`` and ``patched`` count the files read by
    pydicom and those built from a template, ``compared`` those of them built from the
    reference by a comparison of their bytes.

    Files are numbered: a file read by pydicom (the template) or walked against it (the
    *reference* next files are compared with) gets a new ``generation``; a file compared
    with the reference keeps the reference's. After each file, ``changed`` holds the tags
    (file meta and body) whose value differs from those of file number ``base``: the
    template for a walked file, the reference for a compared one; both None for a file
    read by pydicom. What depends on the other elements alone is what it was for ``base``.
    """

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.parsed = 0
        self.patched = 0
        self.compared = 0
        self.generation = 0
        self.base: int | None = None
        self.changed: frozenset[int] | None = None
        self._template: _Template | None = None
        self._template_number = 0
        self._same: _Same | None = None

    def parse(self, data: bytes) -> tuple[pydicom.Dataset, bool]:
        """Return ``(dataset, gzipped)`` as :func:`parse_dicom_bytes` does."""
        if self._template is not None:
            found = _patched(self._template, self._same, data)
            if found is not None:
                self.patched += 1
                ds, self.changed, same, compared = found
                if compared:
                    self.compared += 1
                    self.base = self.generation
                else:
                    self._same = same
                    self.base = self._template_number
                    self.generation += 1
                return ds, False
        # an unusable file must not leave the old template behind
        self._template = self._same = self.changed = self.base = None
        self.generation += 1
        ds, gzipped = parse_dicom_bytes(data, max_bytes=self.max_bytes)
        self.parsed += 1
        if not gzipped:
            found_template = _template(ds, data)
            if found_template is not None:
                self._template, self._same = found_template
                self._template_number = self.generation
        return ds, gzipped


_V = TypeVar("_V")


class References(Generic[_V]):
    """What was made of the last two numbered files of a :class:`TemplateParser` (the
    template and the reference next files are compared with), by number; the least
    recently used goes."""

    __slots__ = ("_by_number",)

    def __init__(self) -> None:
        self._by_number: dict[int, _V] = {}

    def get(self, number: int | None) -> _V | None:
        if number is None or number not in self._by_number:
            return None
        found = self._by_number[number] = self._by_number.pop(number)  # most recent last
        return found

    def put(self, number: int, value: _V) -> None:
        self._by_number.pop(number, None)
        self._by_number[number] = value
        while len(self._by_number) > 2:
            del self._by_number[next(iter(self._by_number))]
