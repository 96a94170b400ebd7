"""DICOM files written here with pydicom read back as the viewer would show them."""

from __future__ import annotations

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
