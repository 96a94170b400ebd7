"""Read one image file (JPEG/PNG/... via Pillow, DICOM via pydicom) into an 8-bit RGB PIL image.

DICOM pixel data goes through the modality LUT (rescale slope/intercept) and the VOI LUT
(window centre/width) as a viewer would show it, MONOCHROME1 is inverted so bone is bright, and
the result is scaled to 8 bit. Only pixels are read: no DICOM tag (patient name, id, ...) leaves
this function.

Colour DICOM: RGB; YBR_FULL and YBR_FULL_422 (pydicom >= 3 returns them as RGB); YBR_RCT and
YBR_ICT (JPEG 2000, whose decoder undoes the colour transform); PALETTE COLOR through its colour
lookup table. Compressed pixel data needs a decoder for its transfer syntax: pylibjpeg (with
pylibjpeg-libjpeg and pylibjpeg-openjpeg) and pyjpegls are dependencies, covering JPEG baseline,
extended, lossless (process 14), JPEG-LS and JPEG 2000. Multi-frame files (cine loops, stacks):
only the first frame is read, as a preview would show it. A file that cannot be read gives one
line with the decoder's own reason; pydicom's warnings are not printed.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
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


# Already RGB in what pydicom's pixel_array returns (see the module docstring).
_RGB_AS_DECODED = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"}


def one_line(err: BaseException) -> str:
    """An exception's whole text on one line (decoders list one reason per plugin per line)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def dicom_to_array(path: Path | BinaryIO) -> np.ndarray:
    """Pixels of a DICOM (a file or an open binary stream; the first frame of a multi-frame
    one) as uint8, HxW (grayscale) or HxWx3 (colour)."""
    # pydicom reports recoverable oddities as UserWarnings and on its logger; a reader in a
    # data check or a training loop gives one line per unreadable file instead.
    # (It logs every failed decoder plugin with a traceback at ERROR level.)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _dicom_to_array(path)


def _dicom_to_array(path: Path | BinaryIO) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(str(path) if isinstance(path, Path) else path)
    if "PixelData" not in ds:
        raise ValueError("DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        ds.pixel_array_options(index=0)  # multi-frame: decode only the first frame
    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        arr = apply_modality_lut(arr, ds)
        arr = apply_voi_lut(arr, ds, index=0)
        out = _to_uint8(arr)
        if photometric == "MONOCHROME1":
            out = 255 - out
        return out
    if photometric in _RGB_AS_DECODED:
        return arr.astype(np.uint8) if arr.dtype == np.uint8 else _to_uint8(arr)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        if rgb.dtype == np.uint8:
            return rgb
        # 16-bit LUT entries (the usual case): full scale is 65535
        return np.round(rgb.astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8)
    raise ValueError(f"unsupported DICOM PhotometricInterpretation {photometric}")


def read_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Decode an image file into an RGB PIL image; grayscale becomes 3 identical channels.

    `draft_size`: a JPEG at least twice that size on both sides is decoded at a reduced scale
    (libjpeg's DCT scaling by 1/2, 1/4 or 1/8, via Pillow's draft mode), never below
    `draft_size` on either side; the caller then resizes to `draft_size` as usual. Two to four
    times faster to decode; pixels differ slightly from a full decode + resize
    (tests/test_readers.py bounds the difference), so exact paths do not use it.

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
                if (draft_size and im.format == "JPEG"
                        and min(im.size) >= 2 * draft_size):
                    im.draft(im.mode, (draft_size, draft_size))
                im.load()
                img = im.copy()
        if img.mode == "I;16" or img.mode == "I":
            img = Image.fromarray(_to_uint8(np.asarray(img)))
        return img.convert("RGB")
    except ManifestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, AttributeError, KeyError) as err:
        raise ManifestError(f"{path}: unreadable or corrupt image ({one_line(err)})") from None
    except Exception as err:  # pydicom raises a variety of types on broken files
        raise ManifestError(f"{path}: unreadable or corrupt image ({type(err).__name__}: "
                            f"{one_line(err)})") from None


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
        raise ManifestError(f"unreadable or corrupt image ({one_line(err)})") from None


def read_manifest_csv(path: Path) -> pd.DataFrame:
    """A manifest CSV as strings (blanks kept as ''), header names stripped; one clear
    ManifestError line when the file is missing, empty or not CSV."""
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{path}: manifest is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    df.columns = [c.strip() for c in df.columns]
    return df
