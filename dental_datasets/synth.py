"""Procedural generator of SYNTHETIC demo datasets (no real patient data, no real images).

Everything written here is drawn from geometric primitives and noise so that a new user can run
the whole dentfed pipeline (data check, local training, federated simulation) on a laptop CPU in
minutes. The pictures only *resemble* dental images:

* `generate_anomalies`: RGB intraoral-photo-like images (gum, lips, a row of teeth) with ten
  multi-label dental anomalies, each drawn as its own small visual cue.
* `generate_implants`: grayscale periapical-radiograph-like images with one implant fixture whose
  thread pitch, taper and apex shape depend on one of three made-up implant systems.

Sites behave like different clinics/cameras (colour cast, exposure, noise, label mix), patients
have several images, and everything is deterministic for a given seed: each patient and each
image has its own random generator derived from (seed, patient, image), so the output does not
depend on anything else. Numbers and looks are invented; never use these sets to judge a model
for clinical use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from shared.atomic_files import atomic_file

_F32 = np.float32

ANOMALY_LABELS: tuple[str, ...] = (
    "agenesis", "hypoplasia", "hypocalcification", "impacted", "incisal_fissure",
    "mammelons", "microdontia", "supernumerary", "rotation", "displacement",
)
IMPLANT_SYSTEMS: tuple[str, ...] = ("system_a", "system_b", "system_c")

MANIFEST_NAME = "manifest.csv"

# Base patient-level prevalences (sites scale them mildly).
_PREVALENCE: dict[str, float] = {
    "agenesis": 0.10, "hypoplasia": 0.18, "hypocalcification": 0.26, "impacted": 0.09,
    "incisal_fissure": 0.14, "mammelons": 0.33, "microdontia": 0.11, "supernumerary": 0.09,
    "rotation": 0.22, "displacement": 0.17,
}
_SYSTEM_MIX = np.array([0.40, 0.35, 0.25])

# Stream tags so the two generators never share random numbers for the same seed.
_TAG_ANOM = 7411
_TAG_IMPL = 7412
_PLAN, _SITE, _PATIENT, _IMAGE, _MASK = 0, 1, 2, 3, 4

# Upper arch, left to right, of which a window of 6-8 teeth is visible.
_UPPER = ("premolar", "canine", "lateral", "central", "central", "lateral", "canine", "premolar")
_WIDTH = {"central": 1.0, "lateral": 0.78, "canine": 0.86, "premolar": 0.82}
_HEIGHT = {"central": 1.0, "lateral": 0.86, "canine": 0.95, "premolar": 0.78}


# --------------------------------------------------------------------------- shared helpers

def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *keys])


def _check(n: int, image_size: int, n_sites: int, per_patient: tuple[int, int]) -> None:
    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n})")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels (got {image_size})")
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1 (got {n_sites})")
    lo, hi = per_patient
    if lo < 1 or hi < lo:
        raise ValueError(f"images per patient range must satisfy 1 <= low <= high (got {lo}, {hi})")


def _plan(rng: np.random.Generator, n: int, n_sites: int,
          per_patient: tuple[int, int]) -> list[tuple[int, int]]:
    """(site, number of images) per patient, exactly n images in total."""
    weights = rng.dirichlet(np.full(n_sites, 6.0))
    out: list[tuple[int, int]] = []
    left = n
    while left > 0:
        k = min(int(rng.integers(per_patient[0], per_patient[1] + 1)), left)
        out.append((int(rng.choice(n_sites, p=weights)), k))
        left -= k
    return out


_GRIDS: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre x and y coordinates of a size x size image, multiplied by scale."""
    key = (size, scale)
    if key not in _GRIDS:
        ax = ((np.arange(size, dtype=np.float32) + 0.5) * scale).astype(np.float32)
        _GRIDS[key] = (ax[None, :].repeat(size, 0), ax[:, None].repeat(size, 1))
    return _GRIDS[key]


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise (about unit std) made by bicubic upsampling of a small random grid."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def _prepare(out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST_NAME
    manifest.unlink(missing_ok=True)  # a crashed rerun must not leave a stale manifest behind
    return out_dir, manifest


def _write_manifest(df: pd.DataFrame, manifest: Path) -> Path:
    with atomic_file(manifest) as tmp:
        df.to_csv(tmp, index=False, encoding="utf-8")
    return manifest


def _finish(img: np.ndarray, rng: np.random.Generator, blur: float, noise: float,
            mode: str) -> Image.Image:
    """Blur, add sensor noise and quantise a float image in 0..255."""
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if blur > 0.05:
        pil = pil.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(pil, dtype=np.float32)
    arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(noise)
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    return out.convert(mode) if out.mode != mode else out


# --------------------------------------------------------------------------- anomalies

def _anomaly_site(seed: int, site: int) -> dict[str, Any]:
    r = _rng(seed, _TAG_ANOM, _SITE, site)
    gain = r.uniform(0.9, 1.1, 3)
    return {
        "gain": gain / gain.mean() * r.uniform(0.95, 1.05),
        "brightness": r.uniform(-14, 14),
        "contrast": r.uniform(0.85, 1.2),
        "noise": r.uniform(2.0, 7.0),
        "blur": r.uniform(0.25, 0.75),
        "prev": {k: min(0.6, v * r.uniform(0.75, 1.3)) for k, v in _PREVALENCE.items()},
    }


def _anomaly_patient(r: np.random.Generator, site: dict[str, Any]) -> dict[str, Any]:
    labels = {k: bool(r.random() < site["prev"][k]) for k in ANOMALY_LABELS}
    n_teeth = int(r.choice([6, 7, 8], p=[0.3, 0.35, 0.35]))
    start = {6: 1, 7: int(r.integers(0, 2)), 8: 0}[n_teeth]
    types = _UPPER[start:start + n_teeth]
    enamel = np.array([226.0, 216.0, 190.0]) * r.uniform(0.9, 1.03) + r.normal(0, 4, 3)
    p: dict[str, Any] = {
        "labels": labels,
        "types": types,
        "tooth_col": (enamel[None, :] * (1 + r.normal(0, 0.025, (n_teeth, 1)))).astype(_F32),
        "wj": r.uniform(0.94, 1.06, n_teeth),
        "hj": r.uniform(0.95, 1.05, n_teeth),
        "gum": (np.array([198.0, 92.0, 104.0]) + r.normal(0, [12, 12, 10])).astype(_F32),
        "lips": (np.array([128.0, 42.0, 48.0]) + r.normal(0, 10, 3)).astype(_F32),
        "lower_p": r.uniform(0.3, 0.9),
    }
    # Which tooth carries which anomaly (shape anomalies get distinct teeth).
    free = list(range(n_teeth))
    incisors = [i for i, t in enumerate(types) if t in ("central", "lateral")]

    def take(cands: list[int], fallback: list[int] | None = None) -> int:
        c = [i for i in cands if i in free] or free or fallback or list(range(n_teeth))
        i = int(r.choice(c))
        if i in free:
            free.remove(i)
        return i

    a: dict[str, dict[str, Any]] = {}
    if labels["incisal_fissure"]:
        a["incisal_fissure"] = {"tooth": take(incisors), "depth": r.uniform(0.18, 0.3),
                                "width": r.uniform(0.32, 0.48), "off": r.uniform(-0.15, 0.15)}
    if labels["mammelons"]:
        a["mammelons"] = {"tooth": take(incisors), "bump": r.uniform(0.09, 0.13)}
    inner = list(range(1, n_teeth - 1))  # end teeth may be cut off by the frame
    for k in ("agenesis", "impacted", "microdontia", "rotation", "displacement"):
        if labels[k]:
            a[k] = {"tooth": take(inner)}
    if "agenesis" in a:
        a["agenesis"].update(slot=r.uniform(0.7, 0.95), ridge=r.uniform(0.3, 0.5))
    if "impacted" in a:
        a["impacted"].update(crown=r.uniform(0.42, 0.55))
    if "microdontia" in a:
        a["microdontia"].update(scale=r.uniform(0.5, 0.62), hscale=r.uniform(0.6, 0.75))
    if "rotation" in a:
        a["rotation"].update(width=r.uniform(0.55, 0.68), sign=float(r.choice([-1.0, 1.0])))
    if "displacement" in a:
        sign = 1.0 if r.random() < 0.6 else -1.0
        a["displacement"].update(dy=sign * r.uniform(0.22, 0.35))
    blocked = {a[k]["tooth"] for k in ("agenesis", "impacted") if k in a}
    for k in ("hypoplasia", "hypocalcification"):
        if labels[k]:
            ok = [i for i in range(n_teeth) if i not in blocked]
            c = [i for i in inner if i not in blocked] or ok
            a[k] = {"tooth": take(c, ok)}
    if "hypoplasia" in a:
        k = int(r.integers(3, 7))
        a["hypoplasia"].update(
            pits=np.stack([r.uniform(-0.6, 0.6, k), r.uniform(0.25, 0.85, k),
                           r.uniform(0.012, 0.018, k)], 1),
            groove=r.uniform(0.4, 0.7) if r.random() < 0.5 else None)
    if "hypocalcification" in a:
        k = int(r.integers(1, 3))
        brown = r.random() < 0.45
        col = (np.array([188.0, 148.0, 92.0]) if brown else np.array([252.0, 251.0, 243.0]))
        a["hypocalcification"].update(
            patches=np.stack([r.uniform(-0.35, 0.35, k), r.uniform(0.3, 0.7, k),
                              r.uniform(0.025, 0.04, k), r.uniform(0.022, 0.035, k)], 1),
            col=col + r.normal(0, 6, 3))
    if labels["supernumerary"]:
        centre = (n_teeth - 2) / 2
        gaps = np.arange(n_teeth - 1)
        w = np.exp(-0.5 * ((gaps - centre) / 1.5) ** 2)
        a["supernumerary"] = {"after": int(r.choice(gaps, p=w / w.sum())),
                              "w": r.uniform(0.4, 0.55), "h": r.uniform(0.45, 0.6)}
    p["anom"] = a
    return p


def _draw_tooth(d: ImageDraw.ImageDraw, tid: int, x0: float, x1: float, y0: float, y1: float,
                kind: str, lower: bool = False) -> None:
    """One crown: arched gingival end, rounded (canine: pointed) incisal end."""
    w = x1 - x0
    h = max(y1 - y0, 2.0)
    arch = min(0.6 * w, 0.5 * h)
    rad = (0.35 if kind == "premolar" else 0.4 if kind == "micro" else 0.2) * w
    if lower:
        d.ellipse([x0, y1 - arch, x1, y1], fill=tid)
        body = (y0, y1 - arch / 2)
    else:
        d.ellipse([x0, y0, x1, y0 + arch], fill=tid)
        body = (y0 + arch / 2, y1)
    rad = max(0.0, min(rad, w / 2 - 0.01, (body[1] - body[0]) / 2 - 0.01))
    if kind == "canine" and not lower:
        cusp = 0.16 * h
        d.rounded_rectangle([x0, body[0], x1, body[1] - cusp], radius=rad * 0.5, fill=tid)
        d.polygon([(x0 + 0.03 * w, body[1] - cusp - 1), (x1 - 0.03 * w, body[1] - cusp - 1),
                   (x0 + 0.55 * w, body[1])], fill=tid)
    elif kind == "super":
        d.polygon([(x0, body[0]), (x1, body[0]), (x0 + 0.68 * w, body[1] - 0.12 * w),
                   (x0 + 0.32 * w, body[1] - 0.12 * w)], fill=tid)
        d.ellipse([x0 + 0.3 * w, body[1] - 0.3 * w, x0 + 0.7 * w, body[1]], fill=tid)
    else:
        d.rounded_rectangle([x0, body[0], x1, body[1]], radius=rad, fill=tid)


def _cover(mask: Image.Image, blur: float = 0.0) -> np.ndarray:
    """A 2x 'L' mask averaged down to output size (anti-aliased coverage in 0..1)."""
    im = mask.reduce(2)
    if blur > 0.05:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(im, dtype=np.float32) / 255


def _soft_ellipse(xs: np.ndarray, ys: np.ndarray, box: tuple[float, float, float, float],
                  edge: float) -> np.ndarray:
    """Ellipse inside `box` as a 0..1 mask with a linear edge about `edge` wide."""
    x0, y0, x1, y1 = box
    ax, ay = (x1 - x0) / 2, (y1 - y0) / 2
    e = np.sqrt(((xs - (x0 + ax)) / ax) ** 2 + ((ys - (y0 + ay)) / ay) ** 2)
    return np.clip(0.5 - (e - 1) * (min(ax, ay) / edge), 0, 1)


def _render_photo(p: dict[str, Any], r: np.random.Generator, size: int) -> np.ndarray:
    """Render one photo of a patient; returns float RGB channels-first (3, size, size), 0..255.

    The gum/teeth scene is drawn on a canvas with a margin of P pixels (so that the camera
    pose never reveals an edge), shapes at 2x (coordinates below are 2x pixels, R = 2 * size is
    the frame and o the margin) and averaged down; smooth parts are computed at output scale.
    """
    S, R = size, 2 * size
    P = max(4, round(0.12 * S))
    Sc, Rc, o = S + 2 * P, 2 * (S + 2 * P), 2 * P
    xs, ys = _grid(Sc, 2.0)
    a = p["anom"]
    types = p["types"]

    # --- layout of the upper arch (units of a central incisor width)
    unit = r.uniform(0.125, 0.15) * R
    h0 = 1.45 * unit
    y_gum = o + r.uniform(0.2, 0.27) * R
    cx0 = o + R / 2 + r.normal(0, 0.02) * R
    gap = 0.04
    slots: list[dict[str, Any]] = []
    for i, t in enumerate(types):
        w = _WIDTH[t] * p["wj"][i]
        s: dict[str, Any] = {"i": i, "kind": t, "slot": w, "tw": w, "h": _HEIGHT[t] * p["hj"][i]}
        if a.get("agenesis", {}).get("tooth") == i:
            s.update(kind="missing", slot=w * a["agenesis"]["slot"])
        elif a.get("microdontia", {}).get("tooth") == i:
            s.update(kind="micro", slot=w * 0.8, tw=w * a["microdontia"]["scale"],
                     h=s["h"] * a["microdontia"]["hscale"])
        elif a.get("rotation", {}).get("tooth") == i:
            s.update(slot=w * 0.8, tw=w * a["rotation"]["width"])
        slots.append(s)
        if a.get("supernumerary", {}).get("after") == i:
            sw = a["supernumerary"]["w"]
            slots.append({"i": -1, "kind": "super", "slot": sw * 0.8, "tw": sw,
                          "h": a["supernumerary"]["h"]})
    total = sum(s["slot"] for s in slots) + gap * (len(slots) - 1)
    x = cx0 - total * unit / 2
    for s in slots:
        s["x0"], x = x, x + s["slot"] * unit
        s["cx"] = (s["x0"] + x) / 2
        x += gap * unit
    y_inc = y_gum + h0

    # --- background: gum and oral cavity (output resolution); lips are added last
    lower = bool(r.random() < p["lower_p"])
    nl = _noise(r, Sc, 6)
    g_tex = 1 + 0.07 * _noise(r, Sc, 8) + 0.035 * _noise(r, Sc, 32)
    gum = p["gum"][:, None, None] * g_tex[None]  # colour arrays are channels-first (fast)
    img = gum.copy()

    lt = y_inc + r.uniform(0.05, 0.09) * R  # top of the lower incisors
    hl = 0.72 * h0
    half = 0.62 * total * unit
    cav_bot = lt + 0.35 * hl if lower else o + R * 1.05
    cav_m = _soft_ellipse(xs, ys, (cx0 - half, y_inc - 0.45 * h0, cx0 + half, cav_bot), 0.04 * S)
    cav = np.array([52.0, 14.0, 20.0], _F32)[:, None, None] * (1 + 0.2 * nl)[None]
    if not lower:  # tongue hint
        tongue = np.exp(-(((xs - cx0) / (0.32 * R)) ** 2 + ((ys - o - 0.9 * R) / (0.15 * R)) ** 2))
        cav = cav + (np.array([150.0, 62.0, 66.0], _F32)[:, None, None] - cav) * (0.75 * tongue)
    img = img + (cav - img) * cav_m

    # --- teeth into a 2x id map (lower arch first, the upper arch occludes it)
    ids = Image.new("L", (Rc, Rc), 0)
    dr = ImageDraw.Draw(ids)
    props: list[tuple[float, float, float, float, np.ndarray, float, float, bool]] = [
        (0, 1, 0, 1, np.zeros(3), 0, 1, False)]  # index 0 = no tooth
    if lower:
        lw = 0.7 * unit
        n_low = int(math.ceil(total * unit * 1.05 / (lw * 1.04)))
        x = cx0 - n_low * lw * 1.04 / 2
        col = p["tooth_col"].mean(0) * 0.93
        for _ in range(n_low):
            dx = (x + lw / 2 - cx0) / unit
            top = lt + 0.035 * unit * dx * dx
            hh = hl * (1 - 0.04 * abs(dx))
            props.append((x + lw / 2, lw / 2, top, hh, col * r.uniform(0.96, 1.03), 0.0,
                          1 - 0.03 * abs(dx), True))
            _draw_tooth(dr, len(props) - 1, x + 0.02 * lw, x + lw, top, top + hh, "lower",
                        lower=True)
            x += lw * 1.04
    gum_over = Image.new("L", (Rc, Rc), 0)
    gd = ImageDraw.Draw(gum_over)
    tooth_id: dict[int, int] = {}
    for s in slots:
        dx = (s["cx"] - cx0) / unit
        top = y_gum + 0.02 * unit * dx * dx
        hh = h0 * s["h"] * (1 - 0.045 * dx * dx * unit / h0)
        tw = s["tw"] * unit
        x0, x1 = s["cx"] - tw / 2, s["cx"] + tw / 2
        i = s["i"]
        if s["kind"] == "missing":
            gd.rounded_rectangle([s["x0"] - 0.03 * unit, top - 0.1 * unit,
                                  s["x0"] + s["slot"] * unit + 0.03 * unit,
                                  top + a["agenesis"]["ridge"] * h0],
                                 radius=0.3 * s["slot"] * unit, fill=255)
            continue
        col = p["tooth_col"][i] if i >= 0 else p["tooth_col"].mean(0) * 0.9
        asym = 0.0
        if s["kind"] == "super":
            top -= 0.06 * unit
            hh = h0 * s["h"]
        if i >= 0 and a.get("displacement", {}).get("tooth") == i:
            top += a["displacement"]["dy"] * h0
        if i >= 0 and a.get("impacted", {}).get("tooth") == i:
            hh = h0 * s["h"] * a["impacted"]["crown"]
            gd.ellipse([x0 - 0.15 * tw, top - 0.3 * unit, x1 + 0.15 * tw, top + 0.2 * hh],
                       fill=255)
        if i >= 0 and a.get("rotation", {}).get("tooth") == i:
            asym = a["rotation"]["sign"]
        props.append((s["cx"], tw / 2, top, hh, col, asym, 1 - 0.035 * abs(dx), False))
        tid = len(props) - 1
        if i >= 0:
            tooth_id[i] = tid
        kind = s["kind"] if s["kind"] in ("canine", "premolar", "micro", "super") else "incisor"
        _draw_tooth(dr, tid, x0, x1, top, top + hh, kind)
        y1 = top + hh
        if a.get("mammelons", {}).get("tooth") == i:
            bh = a["mammelons"]["bump"] * hh
            dr.rectangle([x0 - 1, y1 - bh, x1 + 1, y1 + 2], fill=0)
            for j in range(3):
                cxj = x0 + tw * (2 * j + 1) / 6
                dr.ellipse([cxj - tw / 6.3, y1 - 2 * bh, cxj + tw / 6.3, y1], fill=tid)
        if a.get("incisal_fissure", {}).get("tooth") == i:
            f = a["incisal_fissure"]
            fc = s["cx"] + f["off"] * tw
            fw = f["width"] * tw / 2
            dr.polygon([(fc - fw, y1 + 2), (fc + fw, y1 + 2), (fc, y1 - f["depth"] * hh)], fill=0)

    # --- surface marks (2x RGBA): specular highlights, pits/grooves, opaque patches
    pr = list(zip(*props, strict=True))
    cx_a, hw_a, top_a, h_a = (np.asarray(v, dtype=np.float32) for v in pr[:4])
    col_a = np.stack(pr[4]).astype(_F32)
    asym_a, bright_a = (np.asarray(v, dtype=np.float32) for v in pr[5:7])
    flip_a = np.asarray(pr[7], dtype=bool)
    marks = Image.new("RGBA", (Rc, Rc), (0, 0, 0, 0))
    mk = ImageDraw.Draw(marks)
    for t in range(1, len(props)):
        if not flip_a[t] and r.random() < 0.4:
            hx = cx_a[t] + r.uniform(-0.4, 0.4) * hw_a[t]
            hy = top_a[t] + r.uniform(0.25, 0.6) * h_a[t]
            rx, ry = 0.006 * R, r.uniform(0.02, 0.04) * R
            mk.ellipse([hx - rx, hy - ry, hx + rx, hy + ry],
                       fill=(255, 255, 255, int(r.integers(60, 120))))
    if "hypoplasia" in a:
        t = tooth_id[a["hypoplasia"]["tooth"]]
        f = a["hypoplasia"]
        for pu, pv, rr in f["pits"]:
            px, py = cx_a[t] + pu * hw_a[t], top_a[t] + pv * h_a[t]
            rr = rr * R * r.uniform(0.85, 1.15)
            mk.ellipse([px - rr, py - rr * 0.8, px + rr, py + rr * 0.8], fill=(82, 58, 42, 235))
        if f["groove"] is not None:
            gy = top_a[t] + f["groove"] * h_a[t]
            pts = [(cx_a[t] + q * hw_a[t], gy + 0.004 * R * math.sin(q * 6)) for q in
                   np.linspace(-0.85, 0.85, 9)]
            mk.line(pts, fill=(92, 68, 50, 210), width=max(2, round(0.012 * R)))
    if "hypocalcification" in a:
        t = tooth_id[a["hypocalcification"]["tooth"]]
        f = a["hypocalcification"]
        c = (*(int(q) for q in np.clip(f["col"], 0, 255)), 225)
        for pu, pv, rx, ry in f["patches"]:
            px, py = cx_a[t] + pu * hw_a[t], top_a[t] + pv * h_a[t]
            for _ in range(3):  # a few overlapping blobs -> irregular patch
                ox, oy = r.normal(0, 0.4, 2) * (rx * R, ry * R)
                sx, sy = r.uniform(0.5, 0.8) * rx * R, r.uniform(0.5, 0.8) * ry * R
                mk.ellipse([px + ox - sx, py + oy - sy, px + ox + sx, py + oy + sy], fill=c)

    # --- colour the teeth at 2x (only the band of rows holding teeth): cylinder shading,
    # cervical yellowing, incisal translucency, then the surface marks
    y_lo = max(0, int(np.min(top_a[1:])) - 4) // 2 * 2
    y_hi = min(Rc, (int(np.max(top_a[1:] + h_a[1:])) + 6) // 2 * 2)
    xx, yy = _grid(Rc, 1.0)
    xx, yy = xx[y_lo:y_hi], yy[y_lo:y_hi]
    idarr = np.asarray(ids)[y_lo:y_hi]
    m = idarr > 0
    sel = idarr[m].astype(np.intp)
    u = np.clip((xx[m] - cx_a[sel]) / hw_a[sel], -1, 1)
    v = np.clip((yy[m] - top_a[sel]) / h_a[sel], 0, 1)
    v = np.where(flip_a[sel], 1 - v, v)
    sa = asym_a[sel]
    shade = (1 - 0.24 * u * u - 0.42 * np.abs(sa) * (sa * u + 1) / 2) * bright_a[sel]
    col = col_a.T[:, sel] * shade  # (3, K)
    cerv = np.clip(1 - v / 0.35, 0, 1)
    col = col * (1 - cerv * np.array([[0.02], [0.06], [0.17]], dtype=_F32))
    tr = np.clip((v - 0.8) / 0.2, 0, 1) * 0.35
    col = col * (1 - tr) + np.array([[150.0], [156.0], [172.0]], dtype=_F32) * tr
    mm = np.asarray(marks.crop((0, y_lo, Rc, y_hi)))[m].T.astype(_F32)
    col = col + (mm[:3] - col) * (mm[3] / 255)
    t2 = np.zeros((y_hi - y_lo, Rc, 3), dtype=np.uint8)
    t2[m] = np.clip(col, 0, 255).astype(np.uint8).T
    b0, b1 = y_lo // 2, y_hi // 2
    teeth = np.asarray(Image.fromarray(t2).reduce(2), dtype=_F32)  # premultiplied by coverage
    alpha = _cover(Image.fromarray(m.view(np.uint8) * np.uint8(255)))
    img[:, b0:b1] = img[:, b0:b1] * (1 - alpha) + teeth.transpose(2, 0, 1)

    if "agenesis" in a or "impacted" in a:
        gm = _cover(gum_over, S / 200)
        img = img + (gum * np.array([1.02, 0.95, 0.95], _F32)[:, None, None] - img) * gm

    # --- camera pose (the teeth/gum scene moves, the lips framing stays), lips, lighting
    u8 = np.clip(img, 0, 255).astype(np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0)))
    th = math.radians(r.uniform(-6, 6))
    sc = r.uniform(0.94, 1.08)
    tx, ty = np.clip(r.normal(0, 0.035, 2), -0.06, 0.06) * S
    ca, sn = math.cos(th) / sc, math.sin(th) / sc
    c0 = S / 2
    coeffs = (ca, sn, P + c0 - ca * (c0 + tx) - sn * (c0 + ty),
              -sn, ca, P + c0 + sn * (c0 + tx) - ca * (c0 + ty))
    pil = pil.transform((S, S), Image.Transform.AFFINE, coeffs,
                        resample=Image.Resampling.BILINEAR,
                        fillcolor=tuple(int(q) for q in p["gum"]))
    img = np.ascontiguousarray(np.asarray(pil, dtype=_F32).transpose(2, 0, 1))
    xs, ys = _grid(S, 2.0)
    d2 = ((xs - R / 2) / (0.5 * R)) ** 2 + ((ys - R / 2) / (0.5 * R)) ** 2
    nl = nl[P:P + S, P:P + S]
    mouth = _soft_ellipse(xs, ys, (-r.uniform(0.05, 0.25) * R, r.uniform(0.01, 0.09) * R,
                                   R * (1 + r.uniform(0.05, 0.25)), R * r.uniform(0.88, 1.0)),
                          0.075 * S)
    lips = p["lips"][:, None, None] * ((1 + 0.08 * nl) * np.clip(1.3 - 0.55 * d2, 0.3, 1.15))
    img = lips + (img - lips) * mouth

    phi = r.uniform(0, 2 * math.pi)
    g = r.uniform(0.0, 0.25)
    light = 1 + g * ((xs - R / 2) * math.cos(phi) + (ys - R / 2) * math.sin(phi)) / R
    light = light - r.uniform(0.05, 0.2) * d2 / 2
    return img * light


def generate_anomalies(out_dir: Path, n: int = 600, seed: int = 0, image_size: int = 128,
                       n_sites: int = 4, photos_per_patient: tuple[int, int] = (2, 4),
                       unknown_fraction: float = 0.02) -> Path:
    """Write a SYNTHETIC multi-label anomaly set of intraoral-photo-like RGB images.

    Writes out_dir/images/*.png and out_dir/manifest.csv (columns path, patient_id, site,
    modality, then the ANOMALY_LABELS as 0/1, a random `unknown_fraction` of label cells left
    blank = unknown); returns the manifest path.
    """
    _check(n, image_size, n_sites, photos_per_patient)
    if not 0.0 <= unknown_fraction < 1.0:
        raise ValueError(f"unknown_fraction must be in [0, 1) (got {unknown_fraction})")
    out_dir, manifest = _prepare(out_dir)
    plan = _plan(_rng(seed, _TAG_ANOM, _PLAN), n, n_sites, photos_per_patient)
    sites = [_anomaly_site(seed, s) for s in range(n_sites)]
    rows: list[dict[str, Any]] = []
    for pi, (site, k) in enumerate(plan):
        pid = pi + 1
        patient = _anomaly_patient(_rng(seed, _TAG_ANOM, _PATIENT, pid), sites[site])
        st = sites[site]
        for j in range(k):
            r = _rng(seed, _TAG_ANOM, _IMAGE, pid, j)
            img = _render_photo(patient, r, image_size)
            wb = r.uniform(0.96, 1.04, 3) * r.uniform(0.9, 1.1)
            img = (img - 128) * st["contrast"] + 128 + st["brightness"]
            img = img * (st["gain"] * wb).astype(_F32)[:, None, None]
            out = _finish(img.transpose(1, 2, 0), r, st["blur"] + r.uniform(-0.15, 0.25),
                          st["noise"] * r.uniform(0.8, 1.2), "RGB")
            rel = f"images/p{pid:04d}_{j}.png"
            out.save(out_dir / rel, format="PNG", compress_level=1)
            rows.append({"path": rel, "patient_id": f"P{pid:04d}", "site": f"site_{site}",
                         "modality": "photo",
                         **{lab: int(patient["labels"][lab]) for lab in ANOMALY_LABELS}})
    df = pd.DataFrame(rows)
    for lab in ANOMALY_LABELS:
        df[lab] = df[lab].astype("Int64")
    blank = _rng(seed, _TAG_ANOM, _MASK).random((len(df), len(ANOMALY_LABELS))) < unknown_fraction
    for j, lab in enumerate(ANOMALY_LABELS):
        df.loc[blank[:, j], lab] = pd.NA
    return _write_manifest(df, manifest)


# --------------------------------------------------------------------------- implants

def _implant_site(seed: int, site: int) -> dict[str, Any]:
    r = _rng(seed, _TAG_IMPL, _SITE, site)
    mix = _SYSTEM_MIX * r.uniform(0.75, 1.3, 3)
    return {
        "gain": r.uniform(0.85, 1.15),
        "offset": r.uniform(-12, 12),
        "gamma": r.uniform(0.8, 1.25),
        "noise": r.uniform(3.0, 9.0),
        "blur": r.uniform(0.3, 0.8),
        "mix": mix / mix.sum(),
    }


def _implant_patient(r: np.random.Generator, site: dict[str, Any]) -> dict[str, Any]:
    system = int(r.choice(3, p=site["mix"]))
    r0 = r.uniform(0.065, 0.085)
    pitch = r0 * (r.uniform(0.45, 0.7), r.uniform(0.6, 0.9), r.uniform(0.8, 1.2))[system]
    taper = (r.uniform(0.0, 0.12), r.uniform(0.25, 0.42), r.uniform(0.15, 0.35))[system]
    apex = (r.uniform(0.0, 0.25), r.uniform(0.7, 1.1), r.uniform(1.2, 1.8))[system]
    return {
        "system": system, "r0": r0, "L": r.uniform(0.45, 0.62), "pitch": pitch,
        "taper": taper, "apex": apex, "depth": r.uniform(0.1, 0.2),
        "collar": r.uniform(0.04, 0.12), "slant": r.uniform(0.1, 0.3),
        "channel": r.uniform(0.25, 0.4) if r.random() < 0.7 else 0.0,
        "abutment": r.uniform(0.6, 0.85) if r.random() < 0.6 else 0.0,
        "crown": r.random() < 0.5, "maxilla": r.random() < 0.4,
    }


def _draw_root(img: np.ndarray, xx: np.ndarray, yy: np.ndarray, rx: float, ry: float,
               rw: float, rl: float, rt: float, R: float, r: np.random.Generator) -> np.ndarray:
    """A natural tooth root: tapered, with a dark ligament line and a faint canal."""
    dx, dy = xx - rx, yy - ry
    yl = dx * math.sin(rt) + dy * math.cos(rt)
    xl = np.abs(dx * math.cos(rt) - dy * math.sin(rt))
    t = np.clip(yl / rl, 0, 1)
    rad = rw * (1 - 0.75 * t ** 1.5)
    inside = (yl > 0) & (yl < rl) & (xl < rad)
    pdl = (yl > 0) & (yl < rl + 0.012 * R) & (xl >= rad) & (xl < rad + 0.014 * R)
    img = img + inside * r.uniform(25, 45) - pdl * 22
    return img - (inside & (xl < 0.012 * R)) * 15


def _draw_fixture(img: np.ndarray, xx: np.ndarray, yy: np.ndarray, p: dict[str, Any],
                  x0: float, y0: float, th: float, L: float, r0: float, pitch: float, td: float,
                  R: float, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one implant fixture (thread pitch, taper and apex of its system), with its
    abutment and crown when the patient has them, its top at (x0, y0) tilted by th. Returns
    the image and the fixture's own pixels (its box; abutment and crown not included)."""
    # implant fixture in local (along-axis) coordinates
    dx, dy = xx - x0, yy - y0
    yl = dx * math.sin(th) + dy * math.cos(th)
    xl = np.abs(dx * math.cos(th) - dy * math.sin(th))
    t = np.clip(yl / L, 0, 1)
    sys_ = p["system"]
    if sys_ == 2:
        core = r0 * (1 - p["taper"] * np.clip((t - 0.5) / 0.5, 0, 1))
    else:
        core = r0 * (1 - p["taper"] * t)
    ph = (yl - p["collar"] * L) / pitch
    tri = 1 - 2 * np.abs(ph - np.floor(ph) - 0.5)
    rad = np.where(yl > p["collar"] * L, core - td * (1 - tri), core)
    r_end = r0 * (1 - p["taper"])
    if sys_ == 0:  # flat apex with a small chamfer
        rad = np.minimum(rad, (L - yl) + r_end * (1 - p["apex"]))
    elif sys_ == 1:  # rounded apex
        a = r_end * p["apex"]
        q = np.clip((yl - (L - a)) / a, 0, 1)
        rad = rad * np.sqrt(np.clip(1 - q * q, 0, 1))
    else:  # pointed apex
        a = r_end * p["apex"]
        rad = rad * np.clip((L - yl) / a, 0, 1) ** 0.85
    inside = (yl >= 0) & (yl <= L) & (xl <= rad)
    level = r.uniform(210, 248)
    thick = np.sqrt(np.clip(1 - (xl / np.maximum(core, 1)) ** 2, 0, 1))
    helix = 1 + 0.05 * np.cos(2 * math.pi * (yl + p["slant"] * xl) / pitch)
    val = level * (0.82 + 0.18 * thick) * helix
    if p["channel"] > 0:
        val = val - ((xl < 0.3 * r0) & (yl < p["channel"] * L)) * r.uniform(20, 45)
    img = np.where(inside, val, img)
    if p["abutment"] > 0:
        ab_len = 0.12 * R
        ab = (yl < 0) & (yl > -ab_len) & (xl < p["abutment"] * r0)
        img = np.where(ab, r.uniform(185, 230), img)
        if p["crown"]:
            cr = (yl <= -ab_len) & (yl > -ab_len - 0.25 * R) & (xl < r0 * 2.0)
            img = np.where(cr, img * 0.3 + r.uniform(120, 160), img)
    return img, inside


def _render_radiograph(p: dict[str, Any], r: np.random.Generator, size: int) -> np.ndarray:
    """One periapical-like view of a patient's implant, float grey (size, size)."""
    R = 2 * size
    xx, yy = _grid(R)
    mag = r.uniform(0.93, 1.07) * R
    L, r0, pitch, td = p["L"] * mag, p["r0"] * mag, p["pitch"] * mag, p["depth"] * p["r0"] * mag
    x0 = R * r.uniform(0.4, 0.6)
    crest_y = R * r.uniform(0.18, 0.3)
    y0 = crest_y - R * r.uniform(-0.01, 0.04)
    th = math.radians(r.uniform(-9, 9))

    # soft tissue above a wavy bone crest, trabecular bone below
    knots = crest_y + R * 0.03 * r.standard_normal(6)
    crest = np.interp(xx[0], np.linspace(0, R, 6), knots).astype(np.float32)
    bone_m = 1 / (1 + np.exp(-(yy - crest[None, :]) / (0.012 * R)))
    trab = np.tanh(1.5 * (0.5 * _noise(r, R, 6) + 0.4 * _noise(r, R, 22)
                          + 0.3 * _noise(r, R, 56)))
    bone = r.uniform(100, 140) * (1 + 0.16 * trab)
    soft = r.uniform(40, 65) * (1 + 0.08 * _noise(r, R, 5)) * np.clip(0.55 + yy / R * 1.6, 0, 1)
    img = soft + (bone - soft) * bone_m

    # neighbouring roots: tapered, with a dark ligament line and a faint canal
    for side in (-1.0, 1.0):
        if r.random() < 0.75:
            rx = x0 + side * R * r.uniform(0.3, 0.42)
            rw = R * r.uniform(0.07, 0.1)
            rl = R * r.uniform(0.55, 0.8)
            ry = crest_y - R * r.uniform(0.15, 0.3)
            rt = math.radians(r.uniform(-8, 8))
            img = _draw_root(img, xx, yy, rx, ry, rw, rl, rt, R, r)

    img, _ = _draw_fixture(img, xx, yy, p, x0, y0, th, L, r0, pitch, td, R, r)
    if p["maxilla"]:
        img = img[::-1]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(pil.reduce(2), dtype=np.float32)


def generate_implants(out_dir: Path, n: int = 450, seed: int = 0, image_size: int = 128,
                      n_sites: int = 3, images_per_patient: tuple[int, int] = (1, 3)) -> Path:
    """Write a SYNTHETIC implant-system set of periapical-radiograph-like grayscale images.

    Writes out_dir/images/*.png ('L' mode) and out_dir/manifest.csv (columns path, patient_id,
    site, modality, implant_system); returns the manifest path.
    """
    _check(n, image_size, n_sites, images_per_patient)

    def render(patient: dict[str, Any], r: np.random.Generator) -> tuple[np.ndarray, dict]:
        return (_render_radiograph(patient, r, image_size),
                {"implant_system": IMPLANT_SYSTEMS[patient["system"]]})

    return _radiograph_set(out_dir, seed, _TAG_IMPL, n, n_sites, images_per_patient,
                           _implant_patient, render)


def _radiograph_set(out_dir: Path, seed: int, tag: int, n: int, n_sites: int,
                    images_per_patient: tuple[int, int],
                    make_patient: Callable[[np.random.Generator, dict[str, Any]], dict[str, Any]],
                    render: Callable[[dict[str, Any], np.random.Generator],
                                     tuple[np.ndarray, dict[str, Any]]]) -> Path:
    """The loop both implant sets share: patients planned over the implant sites, each image
    rendered (`render` -> float grey image and the row's label columns), given its site's
    exposure (gamma, gain, offset), blur and noise, and written as an 'L' PNG; returns the
    manifest path."""
    out_dir, manifest = _prepare(out_dir)
    plan = _plan(_rng(seed, tag, _PLAN), n, n_sites, images_per_patient)
    sites = [_implant_site(seed, s) for s in range(n_sites)]
    rows: list[dict[str, Any]] = []
    for pi, (site, k) in enumerate(plan):
        pid = pi + 1
        st = sites[site]
        patient = make_patient(_rng(seed, tag, _PATIENT, pid), st)
        for j in range(k):
            r = _rng(seed, tag, _IMAGE, pid, j)
            img, labels = render(patient, r)
            img = 255 * (np.clip(img, 0, 255) / 255) ** (st["gamma"] * r.uniform(0.92, 1.08))
            img = img * st["gain"] * r.uniform(0.92, 1.08) + st["offset"]
            out = _finish(img, r, st["blur"] + r.uniform(-0.2, 0.3),
                          st["noise"] * r.uniform(0.8, 1.2), "L")
            rel = f"images/p{pid:04d}_{j}.png"
            out.save(out_dir / rel, format="PNG", compress_level=1)
            rows.append({"path": rel, "patient_id": f"P{pid:04d}", "site": f"site_{site}",
                         "modality": "radiograph", **labels})
    return _write_manifest(pd.DataFrame(rows), manifest)


# --------------------------------------------------------------------------- implant detection

_TAG_IDET = 7413


def _implant_detection_patient(r: np.random.Generator, site: dict[str, Any]) -> dict[str, Any]:
    """1-4 fixtures along one arch; mostly one system per patient (one surgeon, one kit),
    sometimes a second one."""
    k = int(r.choice(4, p=[0.3, 0.3, 0.25, 0.15])) + 1
    first = int(r.choice(3, p=site["mix"]))
    fixtures = []
    for _ in range(k):
        f = _implant_patient(r, site)
        if r.random() < 0.75:  # same system as the first fixture: redraw its shape for it
            f = _implant_patient_of(r, first)
        fixtures.append(f)
    return {"fixtures": fixtures, "maxilla": r.random() < 0.4,
            "slots": np.sort(r.uniform(0, 1, k))}


def _implant_patient_of(r: np.random.Generator, system: int) -> dict[str, Any]:
    """A fixture of the given system (same parameter ranges as `_implant_patient`)."""
    mix = np.zeros(3)
    mix[system] = 1.0
    return _implant_patient(r, {"mix": mix})


def _render_implant_scene(p: dict[str, Any], r: np.random.Generator, size: int
                          ) -> tuple[np.ndarray, list[list]]:
    """A wide radiograph-like view of one arch with the patient's fixtures and natural roots
    between them. Returns the float grey image (size, size) and [system, x1, y1, x2, y2] per
    fixture in its pixels."""
    R = 2 * size
    xx, yy = _grid(R)
    crest_y = R * r.uniform(0.22, 0.32)
    knots = crest_y + R * 0.025 * r.standard_normal(8)
    crest = np.interp(xx[0], np.linspace(0, R, 8), knots).astype(np.float32)
    bone_m = 1 / (1 + np.exp(-(yy - crest[None, :]) / (0.01 * R)))
    trab = np.tanh(1.5 * (0.5 * _noise(r, R, 8) + 0.4 * _noise(r, R, 30)
                          + 0.3 * _noise(r, R, 72)))
    bone = r.uniform(100, 140) * (1 + 0.16 * trab)
    soft = r.uniform(40, 65) * (1 + 0.08 * _noise(r, R, 6)) * np.clip(0.55 + yy / R * 1.6, 0, 1)
    img = soft + (bone - soft) * bone_m

    k = len(p["fixtures"])
    # fixture centres: the patient's slots spread over the width, kept apart
    xs = R * (0.12 + 0.76 * (np.arange(k) + 0.5) / k)
    xs = xs + R * 0.04 * (p["slots"] - 0.5) + R * r.uniform(-0.015, 0.015, k)
    # natural roots in the gaps (and at the ends) not taken by a fixture
    edges = np.concatenate([[0.0], xs, [float(R)]])
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        gap = b - a
        m = int(gap // (0.14 * R))
        for j in range(m):
            if r.random() < 0.8:
                rx = a + gap * (j + 1) / (m + 1) + R * r.uniform(-0.01, 0.01)
                img = _draw_root(img, xx, yy, rx, crest_y - R * r.uniform(0.1, 0.2),
                                 R * r.uniform(0.035, 0.05), R * r.uniform(0.4, 0.55),
                                 math.radians(r.uniform(-6, 6)), R, r)
    boxes = []
    mag = R * r.uniform(0.52, 0.6)
    for f, x0 in zip(p["fixtures"], xs, strict=True):
        L, r0 = f["L"] * mag, f["r0"] * mag
        pitch, td = f["pitch"] * mag, f["depth"] * f["r0"] * mag
        y0 = crest_y - R * r.uniform(-0.01, 0.03)
        th = math.radians(r.uniform(-8, 8))
        # abutment and crown lengths scale with the smaller fixture (its R)
        img, inside = _draw_fixture(img, xx, yy, f, float(x0), y0, th, L, r0, pitch, td,
                                    0.55 * R, r)
        ys, xs_ = np.nonzero(inside)
        boxes.append([f["system"], xs_.min() / 2, ys.min() / 2, (xs_.max() + 1) / 2,
                      (ys.max() + 1) / 2])
    if p["maxilla"]:
        img = img[::-1]
        boxes = [[s, x1, size - y2, x2, size - y1] for s, x1, y1, x2, y2 in boxes]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(pil.reduce(2), dtype=np.float32), boxes


def generate_implant_detection(out_dir: Path, n: int = 300, seed: int = 0,
                               image_size: int = 256, n_sites: int = 3,
                               images_per_patient: tuple[int, int] = (1, 3)) -> Path:
    """Write a SYNTHETIC implant detection set: wide radiograph-like grayscale views of one arch
    with 1-4 implant fixtures of the three made-up systems (drawn as in `generate_implants`)
    among natural roots, each fixture boxed and labelled with its system.

    Writes out_dir/images/*.png ('L' mode) and out_dir/manifest.csv, a detection manifest
    (path, patient_id, site, modality, boxes: JSON [system, x1, y1, x2, y2] in pixels); a
    patient's images show the same fixtures from slightly different views. Returns the
    manifest path."""
    from shared.data.detection import boxes_to_json

    _check(n, image_size, n_sites, images_per_patient)
    if image_size < 96:
        raise ValueError(f"image_size must be at least 96 pixels for implant detection "
                         f"(got {image_size}): smaller fixtures lose their threads")

    def render(patient: dict[str, Any], r: np.random.Generator) -> tuple[np.ndarray, dict]:
        img, boxes = _render_implant_scene(patient, r, image_size)
        return img, {"boxes": boxes_to_json([[IMPLANT_SYSTEMS[s], *b] for s, *b in boxes])}

    return _radiograph_set(out_dir, seed, _TAG_IDET, n, n_sites, images_per_patient,
                           _implant_detection_patient, render)


# What `dentfed data synth --task` and a config's `data.synth.task` generate.
GENERATORS = {"anomalies": generate_anomalies, "implants": generate_implants,
              "implant-detection": generate_implant_detection}
