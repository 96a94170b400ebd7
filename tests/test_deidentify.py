"""`dentfed data deidentify`: DICOM Basic Profile with pydicom, all-or-nothing output; and
reading DICOM for training keeps pixels only."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset

from shared.data.readers import read_image
from tests.test_readers import write_dicom

SECRETS = ("Doe^Jane", "SECRET-123", "19800101", "Dr^Who", "Tooth Clinic Ltd", "0123 456",
           "private note")


def _study(tmp_path):
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    arr = np.tile(np.linspace(0, 4000, 64).astype(np.uint16), (48, 1))
    observer = Dataset()
    observer.PersonName = "Dr^Who"
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i in range(2):
        write_dicom(tmp_path / "in" / "sub" / f"{i}.dcm", arr, PatientBirthDate="19800101",
                    StudyInstanceUID=study, SeriesInstanceUID=series,
                    ReferringPhysicianName="Dr^Who", InstitutionName="Tooth Clinic Ltd",
                    PatientTelephoneNumbers="0123 456", StudyDate="20240101",
                    ContentSequence=[observer])
        ds = pydicom.dcmread(tmp_path / "in" / "sub" / f"{i}.dcm")
        block = ds.private_block(0x0011, "ACME", create=True)
        block.add_new(0x01, "LO", "private note")
        ds.save_as(tmp_path / "in" / "sub" / f"{i}.dcm")
    (tmp_path / "in" / "notes.txt").write_text("Doe^Jane")  # not DICOM: not copied
    return study, arr


def test_deidentify_strips_identifiers_keeps_pixels_and_links(tmp_path):
    study, arr = _study(tmp_path)
    r = subprocess.run([sys.executable, "-m", "dentfed.cli", "data", "deidentify",
                        str(tmp_path / "in"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "out").rglob("*"))
    assert [f.relative_to(tmp_path / "out").as_posix() for f in files if f.is_file()] == \
        ["sub/0.dcm", "sub/1.dcm"]
    outs = [pydicom.dcmread(tmp_path / "out" / "sub" / f"{i}.dcm") for i in range(2)]
    for f, ds in zip(("0", "1"), outs, strict=True):
        blob = (tmp_path / "out" / "sub" / f"{f}.dcm").read_bytes()
        for s in SECRETS:
            assert s.encode() not in blob, s
        assert ds.PatientName == "" and ds.PatientID == "" and ds.PatientBirthDate == ""
        assert "InstitutionName" not in ds and "PatientTelephoneNumbers" not in ds
        assert ds.StudyDate == "" and ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.StudyInstanceUID != study
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert np.array_equal(ds.pixel_array, arr)
    # one study stays one study; instances stay distinct
    assert outs[0].StudyInstanceUID == outs[1].StudyInstanceUID
    assert outs[0].SOPInstanceUID != outs[1].SOPInstanceUID
    assert np.asarray(read_image(tmp_path / "out" / "sub" / "0.dcm")).shape == (48, 64, 3)


def test_deidentify_is_all_or_nothing(tmp_path):
    _study(tmp_path)
    write_dicom(tmp_path / "in" / "z.dcm", np.zeros((8, 8), np.uint16), BurnedInAnnotation="YES")
    r = subprocess.run([sys.executable, "-m", "dentfed.cli", "data", "deidentify",
                        str(tmp_path / "in"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "z.dcm: burned-in annotation" in r.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_reading_dicom_for_training_keeps_pixels_only(tmp_path):
    """The reader returns a bare image: no DICOM tag travels with it into the dataset cache,
    the model or anything derived from them."""
    from shared.config import DataConfig, TaskConfig
    from shared.data.dataset import ImageDataset
    from shared.data.manifest import read_manifest

    _study(tmp_path)
    img = read_image(tmp_path / "in" / "sub" / "0.dcm")
    assert img.info == {} and not img.getexif()
    (tmp_path / "in" / "m.csv").write_text("path,patient_id,a\nsub/0.dcm,p1,1\nsub/1.dcm,p2,0\n")
    m = read_manifest(tmp_path / "in" / "m.csv", TaskConfig(type="multilabel", labels=["a"]))
    ds = ImageDataset(m, DataConfig(image_size=32).image_size, train=False)
    x, y = ds[0]
    assert tuple(x.shape) == (3, 32, 32) and ds.cache is not None
    assert ds.cache and all(isinstance(v, torch.Tensor) for v in ds.cache.values())
