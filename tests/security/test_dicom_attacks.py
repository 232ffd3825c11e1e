"""DICOM attacks, sent for real: inflation bombs, header budgets, temp files, de-identification (issue 15, items 2, 13).

Limits under test (``medvlm.data.dicom``): ``MAX_HEADER_BYTES`` / ``MAX_HEADER_ELEMENTS`` bound the header read,
``max_pixels`` / ``max_decoded_bytes`` are checked from the header before any pixel is decoded, a Deflated
dataset is inflated only as far as the header and the declared pixels need.
"""

from __future__ import annotations

import base64
import builtins
import io
import tempfile
import zlib

import numpy as np
import pydicom
import pytest
from data_attack_helpers import deflated_zeros, grey_dataset, header_then_zeros, peak_rss_growth, to_bytes
from pydicom.data import get_testdata_file

from medvlm.data.dicom import (
    MAX_HEADER_ELEMENTS,
    DicomTooLargeError,
    decode_dicom_bytes,
    decoded_size,
    load_dicom,
    read_dicom_dataset,
)
from medvlm.data.dicom_deid import BASIC_PROFILE_KEYWORDS, is_identifying
from medvlm.data.images import load_image
from medvlm.errors import MedvlmError

CT = get_testdata_file("CT_small.dcm", download=False)
WARM_UP = f"from medvlm.data.images import load_image\nload_image({CT!r})\n"


def _inflated_size(data: bytes) -> int:
    """Bytes a Deflated file's dataset inflates to, counted in bounded chunks (proves the bomb is real)."""
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL, right after the 'DICM' prefix
    body = data[132 + 12 + group_length :]
    z, n, tail = zlib.decompressobj(-zlib.MAX_WBITS), 0, None
    for start in range(0, len(body), 1 << 16):
        tail = body[start : start + (1 << 16)]
        while tail:
            n += len(z.decompress(tail, 1 << 20))
            tail = z.unconsumed_tail
    return n


def test_deflated_zeros_bomb_is_refused_at_the_header_with_bounded_memory(tmp_path):
    bomb = deflated_zeros(100 << 20)
    assert len(bomb) < 150_000 and _inflated_size(bomb) >= 100 << 20  # ~100 KB that inflates to 100 MB
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb)
    url_file = tmp_path / "bomb.url"
    url_file.write_text("data:application/dicom;base64," + base64.b64encode(bomb).decode())
    attack = f"""
from medvlm.data.dicom import DicomTooLargeError
from medvlm.serve.images import ImageInputError, ImageLimits, image_from_url
result = []
try:
    load_image({str(path)!r})
except DicomTooLargeError as e:
    result.append(str(e))
try:
    image_from_url(open({str(url_file)!r}).read(), ImageLimits())
except ImageInputError as e:
    result.append([e.status, str(e)])
"""
    growth_mb, result = peak_rss_growth(WARM_UP, attack)
    assert result[0] == f"{path}: DICOM header has more than {MAX_HEADER_ELEMENTS} elements"
    assert result[1][0] == 413 and "DICOM header has more than" in result[1][1]
    assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB under a 100 KB DICOM bomb"


def test_deflated_header_then_400mb_pixel_element_inflates_only_what_the_header_needs(tmp_path):
    bomb = header_then_zeros(4, 4, declared=400 << 20)
    assert _inflated_size(bomb) > 400 << 20
    assert len(bomb) < 500_000
    path = tmp_path / "lying.dcm"
    path.write_bytes(bomb)
    attack = f"""
im = load_image({str(path)!r})
result = list(im.size)
"""
    growth_mb, result = peak_rss_growth(WARM_UP, attack)
    assert result == [4, 4]  # a 4x4 image, decoded from the first 16 bytes; the rest never inflated
    assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB"


def test_budget_counts_samples_bits_and_frames_before_decoding():
    # 100x100, 3 samples of 16 bits, 50 frames; the pixel data is 2 bytes: nothing could be decoded anyway
    data = to_bytes(grey_dataset(100, 100, frames=50, bits=16, samples=3, pixels=b"\0\0"))
    need = decoded_size(100, 100, 3, 16, 50)
    assert need == 100 * 100 * 3 * (2 * 50 + 8)
    with pytest.raises(DicomTooLargeError, match=r"3 samples of 16 bits, 50 frames\), over the limit of 3000000"):
        decode_dicom_bytes(data, max_decoded_bytes=3_000_000)
    with pytest.raises(DicomTooLargeError, match="100x100x50 frames pixels exceed the limit of 499999 pixels"):
        decode_dicom_bytes(data, max_pixels=499_999)
    # at exactly the budget the header passes, and the short pixel data is an ordinary decoding error
    with pytest.raises(MedvlmError) as e:
        decode_dicom_bytes(data, max_decoded_bytes=need, max_pixels=500_000)
    assert not isinstance(e.value, DicomTooLargeError) and "cannot decode the DICOM pixel data" in str(e.value)
    # 8-bit samples halve the raw part of the same header
    data8 = to_bytes(grey_dataset(100, 100, frames=50, bits=8, samples=3, pixels=b"\0\0"))
    with pytest.raises(MedvlmError, match="cannot decode"):
        decode_dicom_bytes(data8, max_decoded_bytes=3_000_000)


def test_load_image_passes_its_limits_to_dicom(tmp_path):
    p = tmp_path / "ct.dcm"
    p.write_bytes(open(CT, "rb").read())
    with pytest.raises(DicomTooLargeError, match="128x128 pixels exceed the limit of 10000"):
        load_image(p, max_pixels=10_000)
    with pytest.raises(DicomTooLargeError, match="over the limit of 1000 bytes"):
        load_image(p, max_decoded_bytes=1000)
    with pytest.raises(DicomTooLargeError, match="larger than"):
        load_dicom(p, max_decoded_bytes=10 - (16 << 20))  # the file itself exceeds decoded + header limits


def test_deflated_file_decodes_like_its_explicit_copy():
    path = get_testdata_file("image_dfl.dcm", download=False)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf)
    a = np.asarray(load_dicom(path))
    assert a.shape == (512, 512, 3) and a.std() > 10
    assert (a == np.asarray(decode_dicom_bytes(buf.getvalue()))).all()


def test_dicom_is_decoded_without_writing_any_file(tmp_path, monkeypatch):
    from medvlm.serve.images import ImageLimits, image_from_url

    data = open(CT, "rb").read()
    src = tmp_path / "ct.dcm"
    src.write_bytes(data)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    writes: list[str] = []
    real_open = builtins.open

    def watching_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            writes.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    def no_temp(*args, **kwargs):
        raise AssertionError("a temp file was created while decoding a DICOM image")

    monkeypatch.setattr(builtins, "open", watching_open)
    for name in ("mkstemp", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_temp)
    reference = load_image(src).tobytes()
    url = "data:application/dicom;base64," + base64.b64encode(data).decode()
    assert image_from_url(url, ImageLimits()).tobytes() == reference
    assert decode_dicom_bytes(data).tobytes() == reference
    assert writes == [] and list(private_tmp.iterdir()) == []


def _identified() -> pydicom.Dataset:
    ds = grey_dataset(8, 8)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-778899"
    ds.PatientSex = "M"  # one character: the old scrub list skipped values this short
    ds.PatientAge = "042Y"
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "St Example Hospital"
    ds.StudyDate = "20240102"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.add_new(0x00091010, "LO", "private vendor note")
    item = pydicom.Dataset()
    item.CodeValue = "T-D1100"
    item.PatientName = "Nested^Name"  # identifying values inside a kept sequence are removed too
    ds.AnatomicRegionSequence = [item]
    return ds


def test_basic_profile_deletes_identifying_attributes_short_ones_included():
    assert {
        "PatientName",
        "PatientID",
        "PatientSex",
        "PatientAge",
        "PatientBirthDate",
        "InstitutionName",
        "StudyInstanceUID",
        "SOPInstanceUID",
        "AccessionNumber",
        "ReferringPhysicianName",
    } <= set(BASIC_PROFILE_KEYWORDS)
    ds = read_dicom_dataset(to_bytes(_identified()), max_pixels=10_000, max_decoded_bytes=1 << 20)
    left = []
    ds.walk(lambda d, el: left.append(el.keyword or hex(int(el.tag))) if is_identifying(int(el.tag)) else None)
    ds.file_meta.walk(lambda d, el: left.append(el.keyword) if is_identifying(int(el.tag)) else None)
    assert left == []
    for kw in ("PatientName", "PatientSex", "PatientAge", "StudyDate", "SOPInstanceUID"):
        assert kw not in ds
    assert 0x00091010 not in ds and "PatientName" not in ds.AnatomicRegionSequence[0]
    assert "MediaStorageSOPInstanceUID" not in ds.file_meta
    assert ds.AnatomicRegionSequence[0].CodeValue == "T-D1100" and ds.Rows == 8  # what is not identifying stays
    text = repr(ds) + repr(ds.file_meta)
    for secret in ("Doe", "PID-778899", "042Y", "19700101", "Example", "private vendor", "Nested"):
        assert secret not in text
    # the pixels are unchanged by the scrub
    plain = grey_dataset(8, 8)
    assert decode_dicom_bytes(to_bytes(_identified())).tobytes() == decode_dicom_bytes(to_bytes(plain)).tobytes()


def test_truncated_header_and_garbage_are_clear_errors(tmp_path):
    data = to_bytes(_identified())
    for cut in (100, 140, 300):
        with pytest.raises(MedvlmError) as e:
            decode_dicom_bytes(data[:cut], name="img.dcm")
        assert str(e.value).startswith("img.dcm: ") and "Doe" not in str(e.value)
    with pytest.raises(MedvlmError, match="not a readable DICOM file"):
        decode_dicom_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    good = deflated_zeros(1 << 20)
    start = 132 + 12 + int.from_bytes(good[140:144], "little")
    with pytest.raises(MedvlmError, match=r"^bad\.dcm: "):  # a corrupt deflate stream
        decode_dicom_bytes(good[:start] + b"\xff" * 64 + good[start + 64 :], name="bad.dcm")
