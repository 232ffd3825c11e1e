"""Attacks on the data path, built by hand: DICOM files (Deflated bombs), and a peak-RSS probe in a subprocess."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def grey_dataset(
    rows: int = 8, cols: int = 8, frames: int = 1, bits: int = 8, samples: int = 1, pixels: bytes | None = None
) -> Dataset:
    """A secondary-capture dataset with a synthetic gradient (or the given pixel bytes)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if pixels is None:
        dtype = np.uint8 if bits == 8 else np.uint16
        arr = (np.arange(rows * cols * frames * samples) % 251).astype(dtype)
        pixels = arr.tobytes()
    ds.PixelData = pixels
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deflated_file(body: bytes, level: int = 9) -> bytes:
    """A Part-10 file whose dataset ``body`` (explicit VR little endian bytes) is stored Deflated."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buf, meta, enforce_standard=True)
    z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return buf.getvalue() + z.compress(body) + z.flush()


def deflated_zeros(n_bytes: int) -> bytes:
    """A Deflated DICOM whose dataset inflates to ``n_bytes`` zero bytes (~1000:1), with no header at all."""
    return _deflate_parts(b"", n_bytes)


def header_then_zeros(rows: int, cols: int, declared: int) -> bytes:
    """A Deflated DICOM: a valid rows x cols 8-bit header, then a PixelData element of ``declared`` zero bytes."""
    raw = to_bytes(grey_dataset(rows, cols, pixels=b"\0\0"))
    group_length = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    dataset = raw[132 + 12 + group_length : raw.index(b"\xe0\x7f\x10\x00")]  # up to (7FE0,0010)
    element = b"\xe0\x7f\x10\x00OB\0\0" + declared.to_bytes(4, "little")  # explicit VR, 32-bit length
    return _deflate_parts(dataset + element, declared)


def _deflate_parts(prefix: bytes, zeros: int) -> bytes:
    """Preamble + meta + a raw-deflate stream of ``prefix`` then ``zeros`` zero bytes (whole MiB), built fast.

    After a full flush the compressor starts afresh, so one MiB of zeros compresses to the same bytes every
    time: that piece is repeated instead of compressing hundreds of megabytes in the test.
    """
    meta_and_head = deflated_file(b"")[:-2]
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = z.compress(prefix) + z.flush(zlib.Z_FULL_FLUSH)
    block = z.compress(b"\0" * (1 << 20)) + z.flush(zlib.Z_FULL_FLUSH)
    return meta_and_head + head + block * (zeros >> 20) + z.flush(zlib.Z_FINISH)


_PROBE = """
import json, resource, sys
sys.path[:0] = {paths!r}
{setup}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{attack}
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PROBE" + json.dumps({{"growth_kb": after - before, "result": result}}))
"""


def peak_rss_growth(setup: str, attack: str, timeout: float = 120) -> tuple[float, object]:
    """Run ``setup`` then ``attack`` (which sets ``result``) in a fresh Python; peak-RSS growth in MB over the attack.

    ``setup`` should warm up (import, decode a small file) so the growth is the attack's alone.
    """
    src = Path(__file__).resolve().parents[2] / "src"
    code = _PROBE.format(paths=[str(src), str(Path(__file__).resolve().parent)], setup=setup, attack=attack)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("PROBE"))
    data = json.loads(line[5:])
    return data["growth_kb"] / 1024, data["result"]


# --- tar archives built from raw 512-byte header blocks --------------------------------------------------------


def tar_header(name: bytes, size: int, typ: bytes, fields: dict[int, bytes] | None = None) -> bytes:
    """One ustar header block with a correct checksum; ``fields`` overwrite bytes at given offsets."""
    b = bytearray(512)
    b[0 : len(name)] = name
    b[100:108] = b"0000644\0"
    b[108:116] = b"0000000\0"
    b[116:124] = b"0000000\0"
    b[124:136] = b"%011o\0" % size
    b[136:148] = b"14000000000\0"
    b[156:157] = typ
    b[257:265] = b"ustar\x0000"
    for off, value in (fields or {}).items():
        b[off : off + len(value)] = value
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def pax_records(**kv: str) -> bytes:
    """Pax extended header data: ``"%d %s=%s\\n"`` records whose length counts itself."""
    out = b""
    for k, v in kv.items():
        body = f" {k.replace('__', '.')}={v}\n".encode()
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        out += str(n).encode() + body
    return out


def member(name: str, data: bytes) -> bytes:
    return tar_header(name.encode(), len(data), b"0") + pad(data)


def end_of_archive() -> bytes:
    return b"\0" * 1024


def gzip_with_zero_run(prefix: bytes, zeros: int, suffix: bytes = b"") -> bytes:
    """gzip of ``prefix + zeros x b"\\0" + suffix`` (``zeros`` a multiple of 1 MiB),
    built without compressing them all."""
    import struct as _struct

    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block_src = b"\0" * (1 << 20)
    head = z.compress(prefix) + z.flush(zlib.Z_FULL_FLUSH)
    block = z.compress(block_src) + z.flush(zlib.Z_FULL_FLUSH)
    tail = z.compress(suffix) + z.flush(zlib.Z_FINISH)
    crc = zlib.crc32(prefix)
    for _ in range(zeros >> 20):
        crc = zlib.crc32(block_src, crc)
    crc = zlib.crc32(suffix, crc)
    size = (len(prefix) + zeros + len(suffix)) & 0xFFFFFFFF
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + head + block * (zeros >> 20) + tail + _struct.pack("<II", crc & 0xFFFFFFFF, size)
