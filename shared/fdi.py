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

# The 32 permanent teeth in the usual chart order (also UFBA's class order): 11..18, 21..28,
# 31..38, 41..48.
PERMANENT: tuple[str, ...] = tuple(f"{q}{p}" for q in (1, 2, 3, 4) for p in range(1, 9))
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
