"""Read one image file (JPEG/PNG/... via Pillow, DICOM via pydicom) into an 8-bit RGB PIL image.

DICOM pixel data goes through the modality LUT (rescale slope/intercept) and the VOI LUT
(window centre/width) as a viewer would show it, MONOCHROME1 is inverted so bone is bright, and
the result is scaled to 8 bit. Only pixels are read: no DICOM tag (patient name, id, ...) leaves
this function.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.errors import ManifestError

DICOM_SUFFIXES = {".dcm", ".dicom"}
# Every suffix dentfed reads as an image (Pillow formats plus DICOM): the folder importer,
# `predict` on a folder and `serve` all use this one set.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"} | DICOM_SUFFIXES


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the 'DICM' magic at byte 128 for suffix-less files."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix == "":
        try:
            with path.open("rb") as fh:
                fh.seek(128)
                return fh.read(4) == b"DICM"
        except OSError:
            return False
    return False


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) / (hi - lo) * 255.0).astype(np.uint8)


def dicom_to_array(path: Path | BinaryIO) -> np.ndarray:
    """Pixels of a single-frame DICOM (a file or an open binary stream) as uint8, HxW
    (grayscale) or HxWx3 (colour)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(str(path) if isinstance(path, Path) else path)
    if "PixelData" not in ds:
        raise ValueError("DICOM file has no pixel data")
    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]  # multi-frame: take the first frame
    if photometric.startswith("MONOCHROME"):
        arr = apply_modality_lut(arr, ds)
        arr = apply_voi_lut(arr, ds, index=0)
        out = _to_uint8(arr)
        if photometric == "MONOCHROME1":
            out = 255 - out
        return out
    if photometric in {"RGB", "YBR_FULL", "YBR_FULL_422"}:
        if photometric != "RGB":
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        return arr.astype(np.uint8) if arr.dtype == np.uint8 else _to_uint8(arr)
    raise ValueError(f"unsupported DICOM PhotometricInterpretation {photometric}")


def read_image(path: str | Path) -> Image.Image:
    """Decode an image file into an RGB PIL image; grayscale becomes 3 identical channels.

    Raises ManifestError with one line naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: image file not found")
    try:
        if is_dicom(path):
            img = Image.fromarray(dicom_to_array(path))
        else:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        if img.mode == "I;16" or img.mode == "I":
            img = Image.fromarray(_to_uint8(np.asarray(img)))
        return img.convert("RGB")
    except ManifestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, AttributeError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ManifestError(f"{path}: unreadable or corrupt image ({reason})") from None
    except Exception as err:  # pydicom raises a variety of types on broken files
        raise ManifestError(f"{path}: unreadable or corrupt image ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None


def decode_image_bytes(data: bytes) -> Image.Image:
    """Decode an in-memory image (an upload; nothing is written to disk) like `read_image`:
    DICOM when the 'DICM' magic is at byte 128, else anything Pillow reads.

    Raises ManifestError with the reason (no file name: the caller knows what it sent)."""
    try:
        if len(data) > 132 and data[128:132] == b"DICM":
            img = Image.fromarray(dicom_to_array(io.BytesIO(data)))
        else:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                img = im.copy()
        if img.mode in ("I;16", "I"):
            img = Image.fromarray(_to_uint8(np.asarray(img)))
        return img.convert("RGB")
    except Exception as err:  # Pillow and pydicom raise many types on broken input
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ManifestError(f"unreadable or corrupt image ({reason})") from None
