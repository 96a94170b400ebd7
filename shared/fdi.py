"""FDI (ISO 3950) tooth numbers: quadrant, position, left/right mirror, the 32 permanent teeth.

A tooth number is two digits: quadrant then position from the midline. Permanent quadrants
1 (patient's upper right), 2 (upper left), 3 (lower left), 4 (lower right), positions 1-8;
deciduous quadrants 5-8 in the same order, positions 1-5.

Image convention (the dentist's view of a panoramic, as in UFBA-425): the patient's right is on
the image's left, so the upper row reads 18 ... 11 | 21 ... 28 from left to right and the lower
row 48 ... 41 | 31 ... 38. A horizontal flip of such an image turns every tooth into its
contralateral twin (18 <-> 28, 48 <-> 38): `flip_permutation` gives the label map for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The 32 permanent teeth in the usual chart order (also UFBA's class order): 11..18, 21..28,
# 31..38, 41..48.
PERMANENT: tuple[str, ...] = tuple(f"{q}{p}" for q in (1, 2, 3, 4) for p in range(1, 9))
_PERMANENT_SET = frozenset(PERMANENT)
_MAX_POSITION = {1: 8, 2: 8, 3: 8, 4: 8, 5: 5, 6: 5, 7: 5, 8: 5}
_MIRROR_QUADRANT = {1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5, 7: 8, 8: 7}


def is_fdi(name: object) -> bool:
    """True for a valid two-digit FDI tooth number ('11'..'48' permanent, '51'..'85'
    deciduous), given as a string or an int."""
    s = str(name).strip()
    if len(s) != 2 or not s.isdigit():
        return False
    q, p = int(s[0]), int(s[1])
    return q in _MAX_POSITION and 1 <= p <= _MAX_POSITION[q]


def _parse(name: object) -> tuple[int, int]:
    if not is_fdi(name):
        raise ValueError(f"'{name}' is not an FDI tooth number")
    s = str(name).strip()
    return int(s[0]), int(s[1])


def quadrant(name: object) -> int:
    """1-4 permanent (upper right, upper left, lower left, lower right of the patient), 5-8
    deciduous."""
    return _parse(name)[0]


def position(name: object) -> int:
    """1 (central incisor) .. 8 (third molar); deciduous 1..5."""
    return _parse(name)[1]


def is_upper(name: object) -> bool:
    return quadrant(name) in (1, 2, 5, 6)


def is_patient_right(name: object) -> bool:
    """The patient's right side: on the image's LEFT in the dentist's view."""
    return quadrant(name) in (1, 4, 5, 8)


def mirror(name: object) -> str:
    """The contralateral tooth (same position, other side): 18 -> 28, 36 -> 46, 55 -> 65."""
    q, p = _parse(name)
    return f"{_MIRROR_QUADRANT[q]}{p}"


def _mirror_map() -> dict[str, str]:
    return {f"{q}{p}": mirror(f"{q}{p}") for q, n in _MAX_POSITION.items()
            for p in range(1, n + 1)}


def image_order_key(name: object) -> float:
    """Left-to-right rank of a tooth in the dentist's view of its arch: 18 (-8) ... 11 (-1),
    21 (+1) ... 28 (+8); lower arch 48 (-8) ... 41, 31 ... 38 (+8)."""
    q, p = _parse(name)
    return -p if q in (1, 4, 5, 8) else p


def flip_permutation(class_names: Sequence[str]) -> list[int] | None:
    """For a horizontal image flip: index k of `class_names` becomes index perm[k].

    None when no class name is an FDI number (nothing to swap: e.g. implant systems). Names
    that are not FDI numbers map to themselves. Raises ValueError when an FDI class's mirror is
    not among the class names, because flipping would then produce a label the task does not
    have (the caller must not flip rather than corrupt the label)."""
    names = [str(n).strip() for n in class_names]
    if not any(is_fdi(n) for n in names):
        return None
    index = {n: k for k, n in enumerate(names)}
    perm: list[int] = []
    missing: list[str] = []
    for n in names:
        if not is_fdi(n):
            perm.append(index[n])
            continue
        m = mirror(n)
        if m not in index:
            missing.append(f"{n} (mirror {m})")
            perm.append(index[n])
        else:
            perm.append(index[m])
    if missing:
        raise ValueError("a horizontal flip would need the contralateral tooth of "
                         + ", ".join(missing) + ", which is not among the task's classes")
    return perm


# Every FDI number (permanent and deciduous) -> its contralateral tooth (18 -> 28, 55 -> 65).
MIRROR: dict[str, str] = _mirror_map()


# --------------------------------------------------------------------------- findings

def finding(label: str, box: Sequence[float], score: float = 1.0, **extra: object) -> dict:
    """One detected object as dentfed passes it around (predict output, numbering, dental
    chart, FHIR export): {"label", "score", "box": [x1, y1, x2, y2]} plus any extra keys
    (e.g. "condition")."""
    return {"label": str(label), "score": float(score),
            "box": [float(v) for v in box], **extra}


def findings_from_output(output: dict, class_names: Sequence[str]) -> list[dict]:
    """A torchvision detection model's output for one image ({"boxes", "labels" 1..K,
    "scores"} tensors or arrays) as findings with class names."""
    boxes = np.asarray(_to_numpy(output["boxes"]), dtype=float).reshape(-1, 4)
    labels = np.asarray(_to_numpy(output["labels"])).reshape(-1)
    scores = np.asarray(_to_numpy(output.get("scores", np.ones(len(labels)))),
                        dtype=float).reshape(-1)
    return [finding(class_names[int(k) - 1], b, s) for b, k, s in zip(boxes, labels, scores,
                                                                        strict=True)]


def _to_numpy(x: object) -> np.ndarray:
    detach = getattr(x, "detach", None)
    return detach().cpu().numpy() if detach is not None else np.asarray(x)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes."""
    a = np.asarray(a, dtype=float).reshape(-1, 4)
    b = np.asarray(b, dtype=float).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# --------------------------------------------------------------------------- numbering

# Left-to-right FDI sequences of the two arches in the dentist's view.
UPPER_ROW: tuple[str, ...] = tuple([f"1{p}" for p in range(8, 0, -1)]
                                   + [f"2{p}" for p in range(1, 9)])
LOWER_ROW: tuple[str, ...] = tuple([f"4{p}" for p in range(8, 0, -1)]
                                   + [f"3{p}" for p in range(1, 9)])
_OPPOSITE_QUADRANT = {1: 4, 4: 1, 2: 3, 3: 2}


def _opposite(name: str) -> str:
    """The tooth in the other arch at the same place (16 <-> 46, 25 <-> 35)."""
    q, p = _parse(name)
    return f"{_OPPOSITE_QUADRANT[q]}{p}"


def _clusters(cands: list[dict], iou: float) -> list[list[dict]]:
    """Greedy class-agnostic grouping (as NMS does): the best-scored candidate starts a tooth,
    every candidate overlapping its box by >= iou joins it."""
    order = sorted(cands, key=lambda c: -c["score"])
    groups: list[list[dict]] = []
    for c in order:
        for g in groups:
            if box_iou(g[0]["box"], c["box"])[0, 0] >= iou:
                g.append(c)
                break
        else:
            groups.append([c])
    return groups


def _occlusal_upper(centres: np.ndarray, boxes: np.ndarray, evidence_upper: np.ndarray
                    ) -> np.ndarray:
    """Which teeth lie above the occlusal curve. The curve (a parabola in x: a panoramic's
    'smile') is fitted through the bottom edges of the teeth the detector calls upper and the
    top edges of those it calls lower; each tooth is then upper or lower by where its centre
    lies, so a tooth whose number names the wrong arch is moved by its position."""
    n = len(centres)
    up = evidence_upper > 0
    if n < 4 or up.all() or (~up).all():
        return up
    edge = np.where(up, boxes[:, 3], boxes[:, 1])
    x = centres[:, 0]
    deg = 2 if n >= 8 and np.ptp(x) > 0 else (1 if np.ptp(x) > 0 else 0)
    coef = np.polyfit(x, edge, deg)
    return centres[:, 1] < np.polyval(coef, x)


def _monotone_assignment(score: np.ndarray) -> list[int]:
    """Order-preserving assignment: teeth (rows, sorted left to right) to numbers (columns,
    in left-to-right order), each used at most once, a tooth i < j only gets a number left of
    j's; maximises the total score (cells <= 0 are never taken). Returns each row's column,
    -1 for none. Exact dynamic programming over (teeth x numbers)."""
    n, m = score.shape
    best = np.zeros((n + 1, m + 1))
    take = np.zeros((n + 1, m + 1), dtype=np.int8)  # 0 skip tooth, 1 skip number, 2 match
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            options = (best[i - 1, j], best[i, j - 1],
                       best[i - 1, j - 1] + score[i - 1, j - 1]
                       if score[i - 1, j - 1] > 0 else -np.inf)
            k = int(np.argmax(options))
            best[i, j], take[i, j] = options[k], k
    out = [-1] * n
    i, j = n, m
    while i > 0 and j > 0:
        if take[i, j] == 2:
            out[i - 1] = j - 1
            i, j = i - 1, j - 1
        elif take[i, j] == 0:
            i -= 1
        else:
            j -= 1
    return out


def _left_to_right(idx: np.ndarray, boxes: np.ndarray, centres: np.ndarray, ev: np.ndarray,
                   row: Sequence[str], col: dict[str, int], overlap: float = 0.5) -> list[int]:
    """The arch's teeth in left-to-right order: by box centre, except that two neighbours
    whose x-extents overlap by >= `overlap` of the narrower box (one above the other: an
    impacted third molar over the second, a high canine over the lateral incisor) are in the
    order their numbers say, since their position does not tell."""
    order = [int(i) for i in idx[np.argsort(centres[idx, 0], kind="stable")]]
    seq = np.array([[ev[t, col[n]] + ev[t, col[_opposite(n)]] for n in row] for t in order])
    rank = {t: (int(np.argmax(seq[k])) if seq[k].max() > 0 else None)
            for k, t in enumerate(order)}
    for _ in range(len(order)):
        swapped = False
        for k in range(len(order) - 1):
            a, b = order[k], order[k + 1]
            if rank[a] is None or rank[b] is None or rank[b] >= rank[a]:
                continue
            inter = min(boxes[a, 2], boxes[b, 2]) - max(boxes[a, 0], boxes[b, 0])
            narrow = min(boxes[a, 2] - boxes[a, 0], boxes[b, 2] - boxes[b, 0])
            if narrow > 0 and inter >= overlap * narrow:
                order[k], order[k + 1] = b, a
                swapped = True
        if not swapped:
            break
    return order


def consistent_numbering(findings: Sequence[dict], *, iou: float = 0.5,
                         neighbour_weight: float = 0.3, opposite_weight: float = 0.5,
                         keep_bonus: float = 0.5) -> list[dict]:
    """Anatomically consistent FDI numbers for one panoramic's detections.

    1. Candidates that overlap (IoU >= `iou`, any label) are one tooth: the best-scored box,
       with the score of each FDI number its candidates gave.
    2. Upper or lower by position: above or below the occlusal curve (`_occlusal_upper`).
    3. Per arch, the teeth sorted left to right (`_left_to_right`: by centre, unless two
       neighbours stand one above the other) are matched to the 16 numbers in their
       left-to-right order (18..11, 21..28; 48..41, 31..38) by an order-preserving assignment
       that maximises the total evidence: a number's own score, plus `neighbour_weight` x
       the score of the numbers next to it (a detector is often off by one) and
       `opposite_weight` x the score of the same tooth in the other arch, plus `keep_bonus`
       x the tooth's detection score (so a confident tooth keeps some number rather than
       being dropped). Each number is used at most once and numbers increase left to right;
       a gap (a missing tooth) is kept, not filled.

    Labels that are not permanent FDI numbers (implants, deciduous teeth) pass through
    unchanged. A tooth no number fits is dropped. Each result keeps its best candidate's
    box and detection score (how sure the detector is that a tooth is there); its original
    label is in "detected_label"."""
    teeth_cands = [f for f in findings if f["label"] in _PERMANENT_SET]
    others = [dict(f) for f in findings if f["label"] not in _PERMANENT_SET]
    if not teeth_cands:
        return others
    groups = _clusters(teeth_cands, iou)
    col = {n: k for k, n in enumerate(PERMANENT)}
    ev = np.zeros((len(groups), len(PERMANENT)))
    for t, g in enumerate(groups):
        for c in g:
            ev[t, col[c["label"]]] = max(ev[t, col[c["label"]]], c["score"])
    boxes = np.array([g[0]["box"] for g in groups], dtype=float)
    conf = np.array([g[0]["score"] for g in groups])
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    upper_cols = [col[n] for n in PERMANENT if is_upper(n)]
    lower_cols = [col[n] for n in PERMANENT if not is_upper(n)]
    is_up = _occlusal_upper(centres, boxes, ev[:, upper_cols].max(1) - ev[:, lower_cols].max(1))
    out = others
    for row, upper in ((UPPER_ROW, True), (LOWER_ROW, False)):
        idx = np.flatnonzero(is_up == upper)
        if len(idx) == 0:
            continue
        idx = _left_to_right(idx, boxes, centres, ev, row, col)
        score = np.zeros((len(idx), len(row)))
        for j, name in enumerate(row):
            own = ev[idx, col[name]]
            near = [ev[idx, col[row[k]]] for k in (j - 1, j + 1) if 0 <= k < len(row)]
            score[:, j] = (own + neighbour_weight * np.max(near, axis=0)
                           + opposite_weight * ev[idx, col[_opposite(name)]]
                           + keep_bonus * conf[idx])
        for t, j in zip(idx, _monotone_assignment(score), strict=True):
            if j >= 0:
                g = groups[t][0]
                out.append({**g, "label": row[j], "detected_label": g["label"]})
    return out



# --------------------------------------------------------------------------- numbering metrics

def match_teeth(pred_boxes: np.ndarray, gt_boxes: np.ndarray, iou: float = 0.5
                ) -> list[tuple[int, int]]:
    """One-to-one matching of predicted to true boxes, any label, maximising total IoU over
    pairs with IoU >= iou (Hungarian, scipy's linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment

    m = box_iou(pred_boxes, gt_boxes)
    if m.size == 0:
        return []
    w = np.where(m >= iou, m, 0.0)
    rows, cols = linear_sum_assignment(-w)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if m[r, c] >= iou]


def numbering_metrics(predictions: Sequence[Sequence[dict]],
                      truths: Sequence[Sequence[Sequence]], *, iou: float = 0.5,
                      score_threshold: float = 0.5) -> dict[str, float]:
    """Tooth numbering quality over images. `predictions`: per image a list of findings
    (`finding`); `truths`: per image the manifest's boxes [label, x1, y1, x2, y2]. Only
    permanent FDI teeth count; predictions below `score_threshold` are ignored.

    tooth_precision / tooth_recall: a predicted tooth is a true positive when it overlaps a
    true tooth (any number) at IoU >= iou, one-to-one. numbering_accuracy: of those matched
    pairs, the fraction with the right FDI number. present_teeth_accuracy: per image, the
    fraction of the 32 positions whose present/absent state the prediction gets right,
    averaged over images. NaN where undefined (no predictions, no truths, no matches)."""
    tp = n_pred = n_true = correct = 0
    present = []
    for preds, truth in zip(predictions, truths, strict=True):
        p = [f for f in preds if f["label"] in _PERMANENT_SET and f["score"] >= score_threshold]
        g = [b for b in truth if str(b[0]) in _PERMANENT_SET]
        pairs = match_teeth(np.array([f["box"] for f in p]).reshape(-1, 4),
                            np.array([b[1:5] for b in g], dtype=float).reshape(-1, 4), iou)
        tp += len(pairs)
        n_pred += len(p)
        n_true += len(g)
        correct += sum(p[i]["label"] == str(g[j][0]) for i, j in pairs)
        have_p = {f["label"] for f in p}
        have_g = {str(b[0]) for b in g}
        present.append(np.mean([(n in have_p) == (n in have_g) for n in PERMANENT]))
    nan = float("nan")
    return {
        "tooth_precision": tp / n_pred if n_pred else nan,
        "tooth_recall": tp / n_true if n_true else nan,
        "numbering_accuracy": correct / tp if tp else nan,
        "present_teeth_accuracy": float(np.mean(present)) if present else nan,
    }
