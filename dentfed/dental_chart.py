"""Pictures for the clinic: detections drawn on the radiograph, and a dental chart of the 32
permanent FDI positions (present / missing, coloured by condition where the task has one).

Findings are the dicts of `shared.fdi.finding`: {"label", "score", "box": [x1, y1, x2, y2]},
optionally "condition" (e.g. "implant", "caries") and "tooth" (the FDI number a non-tooth
finding sits on)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from shared import fdi
from shared.atomic_files import write_bytes_atomic

# Quadrant colours (RGB), and a palette for other classes and for conditions.
QUADRANT_COLOURS = {1: (230, 75, 60), 2: (52, 152, 219), 3: (46, 204, 113), 4: (241, 196, 15),
                    5: (230, 75, 60), 6: (52, 152, 219), 7: (46, 204, 113), 8: (241, 196, 15)}
PALETTE = [(230, 75, 60), (52, 152, 219), (46, 204, 113), (241, 196, 15), (155, 89, 182),
           (26, 188, 156), (230, 126, 34), (236, 112, 160), (149, 165, 166), (127, 140, 141)]
PRESENT = (236, 240, 241)
MISSING = (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def label_colour(label: str, classes: Sequence[str] = ()) -> tuple[int, int, int]:
    """FDI numbers by quadrant; other labels by their index in `classes` (or a stable hash)."""
    if fdi.is_fdi(label):
        return QUADRANT_COLOURS[fdi.quadrant(label)]
    k = list(classes).index(label) if label in classes else sum(map(ord, label))
    return PALETTE[k % len(PALETTE)]


def draw_findings(image: Image.Image, findings: Sequence[Mapping], *,
                  classes: Sequence[str] = (), show_scores: bool = True) -> Image.Image:
    """A copy of `image` (RGB) with each finding's box and label (and score) drawn."""
    out = image.convert("RGB")
    d = ImageDraw.Draw(out)
    w, h = out.size
    line = max(1, round(min(w, h) / 256))
    font = _font(max(10, round(min(w, h) / 40)))
    for f in findings:
        x1, y1, x2, y2 = (float(v) for v in f["box"])
        colour = label_colour(str(f["label"]), classes)
        d.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        text = str(f["label"]) + (f" {float(f['score']):.2f}" if show_scores and "score" in f
                                  else "")
        tb = d.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y1 - th - 2 * line if y1 - th - 2 * line >= 0 else y1
        tx = min(max(0.0, x1), max(0.0, w - tw - 2))
        d.rectangle([tx, ty, tx + tw + 2, ty + th + 2 * line], fill=colour)
        d.text((tx + 1, ty - tb[1] + line), text, fill=(0, 0, 0), font=font)
    return out


def chart_state(findings: Sequence[Mapping], score_threshold: float = 0.5
                ) -> dict[str, str | None]:
    """FDI number -> condition for every permanent tooth found at or above the threshold
    (None: present, no condition); absent numbers are missing. A finding whose label is not a
    tooth but that names one ("tooth") marks that tooth with its label as condition."""
    state: dict[str, str | None] = {}
    for f in findings:
        if float(f.get("score", 1.0)) < score_threshold:
            continue
        label = str(f["label"])
        tooth = label if label in fdi.PERMANENT else f.get("tooth")
        if tooth is None or str(tooth) not in fdi.PERMANENT:
            continue
        cond = f.get("condition") or (None if label in fdi.PERMANENT else label)
        state[str(tooth)] = cond if cond is not None else state.get(str(tooth))
    return state


def chart_cell(tooth: str, width: int = 800, titled: bool = False) -> list[float]:
    """Where `dental_chart` draws a tooth: [x1, y1, x2, y2] in its pixels."""
    cell = width / 17
    top = cell * (1.5 if titled else 0.7)
    upper = fdi.is_upper(tooth)
    row = fdi.UPPER_ROW if upper else fdi.LOWER_ROW
    k = row.index(tooth)
    x0 = cell * (0.5 + k) + (cell * 0.5 if k >= 8 else 0)  # a gap at the midline
    y0 = top + (0 if upper else cell * 1.6)
    return [x0 + 3, y0, x0 + cell - 3, y0 + cell * 1.2]


def dental_chart(state: Mapping[str, str | None], *, title: str | None = None,
                 width: int = 800) -> Image.Image:
    """The 32 permanent positions in the dentist's view (upper row 18..11 | 21..28, lower
    row 48..41 | 31..38): present teeth filled (in their condition's colour when they have
    one), missing teeth as dashed outlines with a cross; a legend of the conditions."""
    cell = width / 17
    conditions = sorted({c for c in state.values() if c})
    colours = {c: PALETTE[k % len(PALETTE)] for k, c in enumerate(conditions)}
    top = cell * (1.5 if title else 0.7)
    height = int(top + cell * 3.2 + (cell * 0.8 if conditions else 0) + cell * 0.6)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = _font(max(10, int(cell * 0.32)))
    small = _font(max(9, int(cell * 0.26)))
    if title:
        d.text((cell * 0.5, cell * 0.3), title, fill=(0, 0, 0), font=_font(int(cell * 0.4)))
    for row in (fdi.UPPER_ROW, fdi.LOWER_ROW):
        for name in row:
            box = chart_cell(name, width, bool(title))
            if name in state:
                cond = state[name]
                fill = colours[cond] if cond else PRESENT
                d.rounded_rectangle(box, radius=cell * 0.2, fill=fill, outline=(60, 60, 60),
                                    width=2)
            else:
                d.rounded_rectangle(box, radius=cell * 0.2, fill=MISSING,
                                    outline=(190, 190, 190), width=1)
                d.line([box[0] + 6, box[1] + 6, box[2] - 6, box[3] - 6], fill=(200, 200, 200),
                       width=2)
                d.line([box[0] + 6, box[3] - 6, box[2] - 6, box[1] + 6], fill=(200, 200, 200),
                       width=2)
            tb = d.textbbox((0, 0), name, font=font)
            d.text(((box[0] + box[2] - (tb[2] - tb[0])) / 2, (box[1] + box[3]) / 2 - tb[3] / 2),
                   name, fill=(0, 0, 0) if name in state else (170, 170, 170), font=font)
    side = "patient's right", "patient's left"
    d.text((cell * 0.5, top - cell * 0.38), side[0], fill=(90, 90, 90), font=small)
    d.text((width - cell * 0.5 - d.textlength(side[1], font=small), top - cell * 0.38), side[1],
           fill=(90, 90, 90), font=small)
    y = top + cell * 3.2
    mid = cell * 8.75
    d.line([mid, top - cell * 0.2, mid, y - cell * 0.2], fill=(120, 120, 120), width=1)
    present = sum(1 for n in fdi.PERMANENT if n in state)
    legend = [(PRESENT, f"present ({present})"), (MISSING, f"missing ({32 - present})")]
    legend += [(colours[c], f"{c} ({sum(v == c for v in state.values())})") for c in conditions]
    x = cell * 0.5
    for colour, text in legend:
        d.rectangle([x, y, x + cell * 0.35, y + cell * 0.35], fill=colour, outline=(60, 60, 60))
        d.text((x + cell * 0.45, y), text, fill=(0, 0, 0), font=small)
        x += cell * 0.6 + d.textlength(text, font=small) + cell * 0.3
    return img


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG all-or-nothing."""
    write_bytes_atomic(Path(path), png_bytes(image))
    return Path(path)
