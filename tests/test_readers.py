"""DICOM files written here with pydicom read back as the viewer would show them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from shared.data.readers import read_image
from shared.errors import ManifestError


def write_dicom(path, arr: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    ds.Modality = "IO"
    ds.set_pixel_data(arr, photometric_interpretation=photometric, bits_stored=12)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


def _ramp() -> np.ndarray:
    return np.tile(np.linspace(0, 4000, 64).astype(np.uint16), (48, 1))


def test_monochrome2_reads_as_rgb_scaled_to_8bit(tmp_path):
    write_dicom(tmp_path / "a.dcm", _ramp())
    img = read_image(tmp_path / "a.dcm")
    a = np.asarray(img)
    assert img.mode == "RGB" and a.shape == (48, 64, 3)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255
    assert np.all(np.diff(a[0, :, 0].astype(int)) >= 0)  # brightness follows the ramp


def test_monochrome1_is_inverted(tmp_path):
    write_dicom(tmp_path / "m2.dcm", _ramp(), "MONOCHROME2")
    write_dicom(tmp_path / "m1.dcm", _ramp(), "MONOCHROME1")
    m2 = np.asarray(read_image(tmp_path / "m2.dcm"))[..., 0].astype(int)
    m1 = np.asarray(read_image(tmp_path / "m1.dcm"))[..., 0].astype(int)
    assert np.array_equal(m1, 255 - m2)
    assert m1[0, 0] == 255  # lowest stored value is white in MONOCHROME1


def test_voi_window_is_applied(tmp_path):
    # window 1000..2000 of the 0..4000 ramp: values below clip to black, above to white
    write_dicom(tmp_path / "w.dcm", _ramp(), WindowCenter=1500, WindowWidth=1000)
    row = np.asarray(read_image(tmp_path / "w.dcm"))[0, :, 0].astype(int)
    values = np.linspace(0, 4000, 64)
    assert (row[values < 950] == 0).all() and (row[values > 2050] == 255).all()
    mid = (values > 1100) & (values < 1900)
    assert ((row[mid] > 0) & (row[mid] < 255)).all()


def test_modality_lut_rescale_is_applied(tmp_path):
    # a negative slope flips the order of stored values: the reader must follow the LUT
    write_dicom(tmp_path / "r.dcm", _ramp(), RescaleSlope=-1, RescaleIntercept=4000)
    row = np.asarray(read_image(tmp_path / "r.dcm"))[0, :, 0].astype(int)
    assert row[0] == 255 and row[-1] == 0


def test_grayscale_png_becomes_three_channels(tmp_path):
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(tmp_path / "g.png")
    a = np.asarray(read_image(tmp_path / "g.png"))
    assert a.shape == (16, 16, 3) and (a[..., 0] == a[..., 2]).all()


def test_corrupt_and_missing(tmp_path):
    (tmp_path / "bad.dcm").write_bytes(b"\x00" * 200)
    with pytest.raises(ManifestError, match="bad.dcm: unreadable or corrupt image"):
        read_image(tmp_path / "bad.dcm")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(ManifestError, match="bad.jpg: unreadable or corrupt image"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(ManifestError, match="image file not found"):
        read_image(tmp_path / "none.png")


# pydicom's own shipped test files that no viewer can show either, and why (the reason our
# one-line error must carry). Everything else in pydicom's test_files with pixel data must read.
PYDICOM_BROKEN = {
    "MR_truncated.dcm": "less than expected",  # pixel data cut short
    "badVR.dcm": "invalid literal for int()",  # a VR IS value of '1A'
    "meta_missing_tsyntax.dcm": "Transfer Syntax UID",  # no transfer syntax in the meta
    "nested_priv_SQ.dcm": "Bits Allocated",  # no image description at all
    # 12-bit JPEG Extended whose scan has a misplaced marker segment (libjpeg; GDCM and Pillow
    # refuse 12-bit JPEG Extended outright)
    "JPEG-lossy.dcm": "misplaced marker segment",
    # a sequence delimiter inside the encapsulated J2K codestream: no valid J2K header
    "JPEG2000-embedded-sequence-delimiter.dcm": "failed to read the header",
}


def _pydicom_test_files() -> list[Path]:
    import pydicom
    from pydicom.data import DATA_ROOT

    files = []
    for p in sorted((Path(DATA_ROOT) / "test_files").rglob("*")):
        if not p.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, force=True)
        except Exception:
            continue
        if "PixelData" in ds:
            files.append(p)
    return files


def test_pydicom_shipped_test_files_read_or_give_one_line(tmp_path, capfd, caplog):
    """Every DICOM with pixel data that pydicom ships (DCMTK, GDCM, ... writers; JPEG baseline,
    extended, lossless, JPEG-LS, JPEG 2000, RLE; RGB, YBR_*, PALETTE COLOR; multi-frame) reads
    as 8-bit RGB, except the truly broken ones, which give one line with the decoder's reason;
    nothing else is printed."""
    files = _pydicom_test_files()
    assert len(files) >= 50
    capfd.readouterr()
    caplog.clear()  # from listing the files above, not from the reader
    read, refused = [], {}
    for src in files:
        p = tmp_path / (src.stem + ".dcm")  # the reader knows DICOM by suffix or magic
        p.write_bytes(src.read_bytes())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a pydicom UserWarning escaping would fail here
            try:
                img = read_image(p)
            except ManifestError as e:
                refused[src.name] = str(e)
                continue
        assert img.mode == "RGB" and img.size[0] > 0, src.name
        read.append(src.name)
    assert capfd.readouterr() == ("", ""), "pydicom or a decoder printed something"
    logged = [r for r in caplog.records if r.name.startswith("pydicom")]
    assert not logged, logged[0].getMessage()  # e.g. a traceback per failed decoder plugin
    assert set(refused) == set(PYDICOM_BROKEN), sorted(refused)
    for name, msg in refused.items():
        assert "\n" not in msg and PYDICOM_BROKEN[name] in msg, msg
    assert {"examples_palette.dcm", "examples_jpeg2k.dcm", "GDCMJ2K_TextGBR.dcm",
            "SC_rgb_jpeg_gdcm.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
            "JPEGLSNearLossless_16.dcm", "SC_rgb_rle_2frame.dcm"} <= set(read)


def test_colour_dicom_matches_the_uncompressed_rgb_original():
    """YBR_FULL (JPEG), YBR_FULL_422 and JPEG-LS copies of one RGB test image decode to the same
    colours (pydicom >= 3 already returns RGB: converting again would swap the colours)."""
    from pydicom.data import DATA_ROOT

    root = Path(DATA_ROOT) / "test_files"
    ref = np.asarray(read_image(root / "SC_rgb_rle.dcm"), dtype=int)
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm",
                 "SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle_2frame.dcm"):
        img = np.asarray(read_image(root / name), dtype=int)
        assert np.abs(img - ref).mean() < 2, name


def _photo_like(h: int, w: int) -> np.ndarray:
    """Smooth shading plus sharp edges and fine texture: what a dental photo or radiograph has,
    and where a reduced-scale decode would differ most."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 80 * np.sin(xx / 37.0), 128 + 80 * np.cos(yy / 23.0),
                    (xx + yy) % 256 * 0.8], axis=-1)
    img[h // 4:h // 2, w // 3:w // 2] = 240  # a bright block with hard edges
    img += rng.normal(0, 6, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def test_reduced_scale_jpeg_decode_keeps_the_shape_and_stays_close(tmp_path):
    """Draft mode decodes a JPEG at least twice the model's size at 1/2, 1/4 or 1/8 scale;
    after the usual resize the tensor has the same shape and its pixels stay within a few
    grey levels of a full decode + resize. Smaller JPEGs and PNGs are decoded in full."""
    import torch

    from shared.data.transforms import resize_transform

    resize = resize_transform(64)
    big = tmp_path / "big.jpg"
    Image.fromarray(_photo_like(300, 520)).save(big, quality=92)
    full, reduced = read_image(big), read_image(big, draft_size=64)
    assert full.size == (520, 300) and reduced.size == (130, 75)  # 1/4: the smaller side >= 64
    a, b = resize(full).to(torch.int16), resize(reduced).to(torch.int16)
    assert a.shape == b.shape == (3, 64, 64)
    diff = (a - b).abs().float()
    assert diff.mean() < 1.5 and diff.quantile(0.99) < 8, (diff.mean(), diff.max())
    assert diff.max() > 0  # it did decode at a reduced scale
    small = tmp_path / "small.jpg"  # under twice the size: decoded in full
    Image.fromarray(_photo_like(100, 120)).save(small, quality=92)
    assert np.array_equal(np.asarray(read_image(small, draft_size=64)),
                          np.asarray(read_image(small)))
    png = tmp_path / "big.png"
    Image.fromarray(_photo_like(300, 520)).save(png)
    assert read_image(png, draft_size=64).size == (520, 300)
