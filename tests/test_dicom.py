"""DICOM loading with pydicom's own test files: windowing, inversion, frames, colour, privacy, errors."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut

from medvlm.data.dicom import load_dicom
from medvlm.data.images import load_image
from medvlm.data.readers import read_samples
from medvlm.data.validate import validate_file
from medvlm.errors import MedvlmError


def _local(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom's bundled test file {name} is missing"
    return path


def test_ct_uses_rescale_and_percentile_window():
    ds = pydicom.dcmread(_local("CT_small.dcm"))
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024.0
    a = np.asarray(load_dicom(_local("CT_small.dcm")))
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    # percentile window 0.5-99.5 of the HU values: ~0.5 % of pixels saturate at each end
    assert 0.002 < (a[..., 0] == 0).mean() < 0.02 and 0.002 < (a[..., 0] == 255).mean() < 0.02
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.corrcoef(hu.ravel(), a[..., 0].ravel())[0, 1] > 0.95  # monotone: bright = dense


def test_mr_uses_header_window():
    ds = pydicom.dcmread(_local("MR_small.dcm"))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array.astype(float)
    g = np.asarray(load_dicom(_local("MR_small.dcm")))[..., 0].astype(float)
    expected = np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255  # DICOM LINEAR window onto 0..255
    assert np.abs(g - expected).max() <= 1.0
    assert g.max() == 255 and g.min() > 0  # nothing is below the window here, the top saturates


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(_local("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    p = tmp_path / "mono1.dcm"
    ds.save_as(p)
    a2 = np.asarray(load_dicom(_local("MR_small.dcm")))
    a1 = np.asarray(load_dicom(p))
    assert (a1.astype(int) == 255 - a2.astype(int)).all()


def test_multiframe_middle_first_and_index():
    path = _local("rtdose.dcm")
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    assert frames.shape == (15, 10, 10)
    mid, first = np.asarray(load_dicom(path)), np.asarray(load_dicom(path, frame="first"))
    assert mid.shape == (10, 10, 3)
    # each frame is windowed on its own percentiles; ranks follow the chosen frame's values
    for img, frame in ((mid, frames[7]), (first, frames[0])):
        order = np.argsort(frame.ravel(), kind="stable")
        assert (np.diff(img[..., 0].ravel()[order].astype(int)) >= 0).all()
    assert not (mid == first).all()
    assert (np.asarray(load_dicom(path, frame=7)) == mid).all()
    with pytest.raises(MedvlmError, match="frame 99"):
        load_dicom(path, frame=99)
    with pytest.raises(MedvlmError, match="frame 'last'"):
        load_dicom(path, frame="last")


def test_rgb_and_palette():
    rgb = load_dicom(_local("SC_rgb_rle_2frame.dcm"))
    assert rgb.mode == "RGB" and rgb.size == (100, 100)
    a = np.asarray(rgb)
    assert not (a[..., 0] == a[..., 1]).all()  # real colour, not grey
    pal_path = _local("examples_palette.dcm")
    pal = load_dicom(pal_path)
    p = np.asarray(pal).astype(int)
    ds = pydicom.dcmread(pal_path)
    lut16 = apply_color_lut(ds.pixel_array, ds).astype(float)  # 16-bit palette entries
    assert pal.size == (800, 350) and p.shape == (350, 800, 3)
    assert np.abs(p - lut16 / 65535 * 255).max() <= 1.0
    assert len(np.unique(p[..., 0])) > 100  # the full grey ramp survives, not saturated
    big16 = np.asarray(load_dicom(_local("SC_rgb_rle_16bit.dcm")))
    assert big16.dtype == np.uint8 and big16.max() == 255


def test_load_image_and_validate_dispatch_dicom(tmp_path):
    img = load_image(_local("CT_small.dcm"))
    assert img.mode == "RGB" and img.size == (128, 128)
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "ct.dcm").write_bytes(open(_local("CT_small.dcm"), "rb").read())
    (d / "junk.dcm").write_bytes(b"not a dicom file at all" * 10)
    f = tmp_path / "d.json"
    f.write_text(
        json.dumps(
            [
                {
                    "id": i,
                    "image": n,
                    "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
                }
                for i, n in enumerate(["ct.dcm", "junk.dcm"])
            ]
        )
    )
    assert len(list(read_samples(f))) == 2
    rep = validate_file(f, image_folder=d)
    assert rep.images_found == 1 and rep.images_unreadable == 1
    assert rep.problem_lines()[0].startswith("record 1 (id 1): image: image 'junk.dcm' unreadable")


def test_errors_never_print_patient_identifiers(tmp_path):
    ds = pydicom.dcmread(_local("CT_small.dcm"))
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-778899"
    ds.PatientBirthDate = "19700101"
    ds.PixelData = ds.PixelData[:100]  # truncated pixel data
    p = tmp_path / "trunc.dcm"
    ds.save_as(p)
    with pytest.raises(MedvlmError) as e:
        load_dicom(p)
    msg = str(e.value)
    assert str(p) in msg and "pixel data" in msg
    for secret in ("Doe", "Jane", "PID-778899", "19700101"):
        assert secret not in msg


def test_no_pixel_data_and_not_dicom(tmp_path):
    ds = pydicom.dcmread(_local("CT_small.dcm"))
    del ds.PixelData
    p = tmp_path / "nopix.dcm"
    ds.save_as(p)
    with pytest.raises(MedvlmError, match="no pixel data"):
        load_dicom(p)
    q = tmp_path / "x.dcm"
    q.write_text("hello")
    with pytest.raises(MedvlmError, match=r"x\.dcm: not a readable DICOM file"):
        load_dicom(q)


def test_clear_error_without_pydicom(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError("No module named 'pydicom'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(MedvlmError, match=r"pip install 'medvlm\[dicom\]'"):
        load_dicom("/nonexistent/any.dcm")
