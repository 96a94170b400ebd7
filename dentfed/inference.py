"""Batched inference with a saved model: load a run folder, read inputs, predict, decide.

Works with both kinds of run folder: `dentfed train` (`model.pt`) and federated runs
(`model_final.pt`, `model_best.pt`). Decoding and resizing run in threads ahead of the model;
the model runs in ONNX Runtime when `dentfed export` wrote an export of this checkpoint, else in
PyTorch under `torch.inference_mode` with channels_last tensors; optionally in bf16 or int8
(`auto`: reduced-scale JPEG decoding and the fastest low precision whose scores stay close to
fp32's, with borderline images decoded in full and recomputed in fp32, so decisions do not
change).

Unreadable images do not stop a run: they are reported per image (reason only; the caller
already knows which file it was) and counted.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared.config import Config, TaskConfig
from shared.data.readers import IMAGE_SUFFIXES, read_image
from shared.data.transforms import resize_transform, tensor_transform
from shared.errors import DentfedError, ManifestError
from shared.fdi import finding
from shared.model_card import read_card
from shared.model_file import read_model_file
from shared.models import probabilities

log = logging.getLogger(__name__)



@dataclass
class LoadedModel:
    """A model ready for inference plus what is needed to turn scores into decisions."""

    model: nn.Module
    cfg: Config
    thresholds: list[float] | None
    checkpoint: Path
    card: dict | None = None
    onnx: dict = field(default_factory=dict)  # "fp32"/"int8" -> ONNX model (onnx_export.py)

    @property
    def labels(self) -> list[str]:
        return list(self.cfg.task.labels)

    @property
    def task_type(self) -> str:
        return self.cfg.task.type

    def decision_thresholds(self) -> list[float]:
        """Tuned thresholds when the checkpoint has them, else 0.5 (multilabel only)."""
        return list(self.thresholds) if self.thresholds else [0.5] * len(self.labels)


def load_model(model_path: str | Path) -> LoadedModel:
    """A run folder or model file (shared/model_file.py) ready for inference, with its card
    and its ONNX exports (`dentfed export`) when they match the model file."""
    from dentfed.onnx_export import load_exports

    mf = read_model_file(model_path)
    return LoadedModel(mf.model, mf.cfg, mf.thresholds, mf.path, read_card(mf.path.parent),
                       load_exports(mf.path, torch.get_num_threads()))


def check_task(loaded: LoadedModel, expected: TaskConfig) -> None:
    """The model must predict exactly the task the caller expects (type and labels, in order)."""
    have = loaded.cfg.task
    if have.type != expected.type or list(have.labels) != list(expected.labels):
        raise DentfedError(
            f"the model's task does not match: the model predicts {have.type} "
            f"[{', '.join(have.labels)}], the config expects {expected.type} "
            f"[{', '.join(expected.labels)}]")


@dataclass
class Inputs:
    """Images to predict: `names` as the user knows them, resolved `paths`."""

    names: list[str]
    paths: list[Path]
    modalities: list[str] = field(default_factory=list)  # from a manifest's column, if any


def collect_inputs(target: str | Path) -> Inputs:
    """One image, a folder (searched recursively for image files), or a manifest CSV with a
    `path` column (relative to the CSV's folder or absolute)."""
    t = Path(target)
    if t.is_dir():
        files = sorted(p for p in t.rglob("*") if p.is_file()
                       and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DentfedError(f"{t}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return Inputs([str(p.relative_to(t)) for p in files], files)
    if not t.is_file():
        raise DentfedError(f"{t}: no such image, folder or manifest")
    if t.suffix.lower() != ".csv":
        return Inputs([t.name], [t])
    try:
        df = pd.read_csv(t, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        raise ManifestError(f"{t}: not a readable CSV") from None
    df.columns = [c.strip() for c in df.columns]
    if "path" not in df.columns or len(df) == 0:
        raise ManifestError(f"{t}: a manifest needs a 'path' column and at least one row")
    names = [p.strip() for p in df["path"]]
    paths = [Path(n) if Path(n).is_absolute() else (t.parent / n).resolve() for n in names]
    mods = ([m.strip().lower() for m in df["modality"]] if "modality" in df.columns else [])
    return Inputs(names, paths, mods)


def check_modality(loaded: LoadedModel, inputs: Inputs) -> None:
    """A manifest that says its images are photos cannot go to a radiograph model."""
    want = loaded.cfg.data.modality
    other = [m for m in inputs.modalities if m and m != want]
    if other:
        raise DentfedError(f"the model's task does not match the images: it was trained on "
                           f"{want}s, but {len(other)} manifest row(s) are "
                           f"{', '.join(sorted(set(other)))}")


class PredictDataset(Dataset):
    """Decodes, resizes and normalises one image per item; an unreadable file gives a zero
    tensor and its reason, so one bad file never stops a batch. `reduced`: JPEGs at least twice
    the model's size are decoded at a reduced scale (faster; pixels differ slightly)."""

    def __init__(self, paths: list[Path], image_size: int, modality: str,
                 reduced: bool = False):
        self.paths = paths
        self.image_size = image_size
        self.draft = image_size if reduced else None
        self.resize = resize_transform(image_size)
        self.normalise = tensor_transform(modality, train=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        return self.item(i, self.draft)

    def item(self, i: int, draft: int | None) -> tuple[torch.Tensor, int, str]:
        try:
            return self.normalise(self.resize(read_image(self.paths[i], draft))), i, ""
        except ManifestError as err:  # the message starts with the path: keep only the reason
            reason = str(err).split(": ", 1)[-1]
            return torch.zeros(3, self.image_size, self.image_size), i, reason


Batch = tuple[torch.Tensor, np.ndarray, list[str], bool]


def _load_batch(ds: PredictDataset, rows: range | list[int]) -> Batch:
    """(normalised images, indices, reasons, whether decoded at reduced scale)."""
    draft = ds.draft  # one value per batch, even if the caller switches it meanwhile
    items = [ds.item(i, draft) for i in rows]
    return (torch.stack([it[0] for it in items]), np.array([it[1] for it in items]),
            [it[2] for it in items], draft is not None)


def iter_batches(ds: PredictDataset, batch_size: int, threads: int) -> Iterator[Batch]:
    """Batches (see _load_batch) in order. With `threads` > 0 the next batches are
    decoded in threads while the model runs on this one (Pillow and torch release the GIL);
    threads start in microseconds, unlike DataLoader worker processes, which pay a process
    start and torch's import for every call."""
    starts = iter(range(0, len(ds), batch_size))

    def rows(s: int) -> range:
        return range(s, min(s + batch_size, len(ds)))

    if threads <= 0:
        for s in starts:
            yield _load_batch(ds, rows(s))
        return
    with ThreadPoolExecutor(threads) as pool:
        pending = deque(pool.submit(_load_batch, ds, rows(s))
                        for s in itertools.islice(starts, threads + 1))
        while pending:
            batch = pending.popleft().result()
            s = next(starts, None)
            if s is not None:
                pending.append(pool.submit(_load_batch, ds, rows(s)))
            yield batch


def bf16_supported() -> bool:
    """bf16 autocast is only worth it on CPUs with native bf16 (AVX512-BF16 or AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def decide(probs: np.ndarray, task_type: str, thresholds: list[float]) -> np.ndarray:
    """0/1 decisions: probability >= the label's threshold (multilabel), or argmax class."""
    if task_type == "multilabel":
        return (probs >= np.asarray(thresholds)[None, :]).astype(np.int8)
    out = np.zeros_like(probs, dtype=np.int8)
    if len(probs):
        out[np.arange(len(probs)), probs.argmax(1)] = 1
    return out


@dataclass
class Predictions:
    probs: np.ndarray  # [N, L]; NaN rows for unreadable images
    decisions: np.ndarray  # [N, L] 0/1; -1 rows for unreadable images
    errors: list[str]  # "" = ok, else the reason
    precision: str  # what was used: fp32, bf16, int8, or "<fast mode> + fp32 re-check" (auto)
    auto_check: dict | None = None  # auto: the first-batch comparison and re-check count
    backend: str = "torch"  # of the fp32 (exact) model: torch, or onnx (an export exists)

    @property
    def n_failed(self) -> int:
        return sum(1 for e in self.errors if e)


def _forward(model: nn.Module, x: torch.Tensor, task_type: str, bf16: bool) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    logits = logits.float()
    return probabilities(logits, task_type)


Runner = Callable[[torch.Tensor], np.ndarray]  # normalised batch -> probabilities


def runners(loaded: LoadedModel) -> dict[str, Runner]:
    """Every way this model can run here: fp32 (ONNX Runtime when an export of this exact
    checkpoint exists, else PyTorch), bf16 (PyTorch autocast), int8 (the ONNX int8 export)."""
    model, task = loaded.model, loaded.task_type
    device = next(model.parameters()).device

    def torch_run(bf16: bool) -> Runner:
        def run(x: torch.Tensor) -> np.ndarray:
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            return _forward(model, x, task, bf16).cpu().numpy()
        return run

    def onnx_run(m: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
        return lambda x: probabilities(m(x).float(), task).numpy()

    out = {"fp32": torch_run(False), "bf16": torch_run(True)}
    if device.type == "cpu":
        for kind, m in loaded.onnx.items():
            out[kind] = onnx_run(m)
    return out


AUTO_MAX_DIFF = 0.1  # auto: a fast mode that moves scores more than this is never used
AUTO_MARGIN_FACTOR = 4  # re-check images within this x the first batch's max difference
AUTO_CHECK_IMAGES = 16  # images of the first batch auto compares and times the modes on


def borderline(probs: np.ndarray, task_type: str, thresholds: list[float],
               margin: float) -> np.ndarray:
    """Rows whose decision could flip if every score moved by up to `margin`."""
    if task_type == "multilabel":
        return (np.abs(probs - np.asarray(thresholds)[None, :]) < margin).any(axis=1)
    top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else probs
    return (top2[:, -1] - top2[:, 0]) < 2 * margin


def auto_modes(available: dict[str, Runner]) -> list[str]:
    """Fast modes auto considers: int8 (an int8 export and a CPU with VNNI) and bf16 (native
    bf16). Either runs on reduced-scale JPEG decodes."""
    from dentfed.onnx_export import vnni_supported

    modes = []
    if "int8" in available and vnni_supported():
        modes.append("int8")
    if bf16_supported():
        modes.append("bf16")
    return modes


def choose_mode(tried: dict[str, dict], exact_seconds: float) -> str | None:
    """The fast mode with the lowest estimated seconds per image (its own time plus the fp32
    re-checks of the borderline share), if that beats fp32 itself; None: fp32."""
    ok = {m: t for m, t in tried.items() if t["max_abs_prob_diff"] <= AUTO_MAX_DIFF}
    best = min(ok, key=lambda m: ok[m]["estimated_s_per_image"], default=None)
    if best is None or ok[best]["estimated_s_per_image"] >= exact_seconds:
        return None
    return best


def _auto_check(run: dict[str, Runner], x_fast: torch.Tensor, x_exact: torch.Tensor,
                task_type: str, thr: list[float]
                ) -> tuple[np.ndarray, str, float | None, dict]:
    """auto's first look: fp32 on the full decodes of a few images, each fast mode on their
    reduced-scale decodes, timed. Returns (the exact scores, the mode, its re-check margin or
    None for fp32, the record of what was compared)."""
    run["fp32"](x_exact[:2])  # warm-up: first calls allocate and compile kernels
    t0 = time.perf_counter()
    p = run["fp32"](x_exact)
    exact_s = (time.perf_counter() - t0) / len(x_exact)
    tried = {}
    for m in auto_modes(run):
        run[m](x_fast[:2])
        t0 = time.perf_counter()
        pm = run[m](x_fast)
        seconds = (time.perf_counter() - t0) / len(x_fast)
        diff = float(np.abs(p - pm).max())
        share = float(borderline(p, task_type, thr,
                                 max(AUTO_MARGIN_FACTOR * diff, 0.01)).mean())
        tried[m] = {"max_abs_prob_diff": diff, "s_per_image": seconds,
                    "borderline_share": share,
                    "estimated_s_per_image": seconds + share * exact_s}
    mode, margin = choose_mode(tried, exact_s), None
    if mode is not None:
        margin = max(AUTO_MARGIN_FACTOR * tried[mode]["max_abs_prob_diff"], 0.01)
    check = {"used": margin is not None,
             "mode": (mode + " (reduced-scale decode)") if mode else "fp32",
             "images_compared": len(x_exact), "tried": tried, "fp32_s_per_image": exact_s,
             "recheck_margin": margin, "rechecked_in_fp32": 0,
             "reason": "; ".join(
                 f"{k} moved scores by at most {v['max_abs_prob_diff']:.4f}, "
                 f"{v['borderline_share']:.0%} borderline, est. "
                 f"{v['estimated_s_per_image'] * 1e3:.1f} ms/image" for k, v in tried.items())
             + f"; fp32 {exact_s * 1e3:.1f} ms/image"}
    return p, mode or "fp32", margin, check


AUTO_VERIFY_IMAGES = 4  # a remembered choice is re-verified on this many images


def auto_memory_path(loaded: LoadedModel) -> Path:
    """Where auto remembers its choice for this model file (beside it, like the exports)."""
    return loaded.checkpoint.with_name(loaded.checkpoint.stem + ".auto.json")


def _auto_key(loaded: LoadedModel, modes: list[str]) -> dict:
    """What a remembered choice depends on: this exact model (its exports carry its sha256),
    the modes on offer, the CPU, the thread count and the library versions."""
    from shared.models import sha256_of

    shas = {m.sha() for m in loaded.onnx.values()} or {sha256_of(loaded.checkpoint)}
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                if line.startswith("model name")), "")
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"model_sha256": sorted(shas), "modes": modes, "cpu": cpu,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": ort_version}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _recall_auto(loaded: LoadedModel, key: dict) -> dict | None:
    import json

    try:
        saved = json.loads(auto_memory_path(loaded).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("key") == key else None


def _remember_auto(loaded: LoadedModel, key: dict, check: dict) -> None:
    """Best effort: a read-only model folder just means the next run compares again."""
    import json

    from shared.atomic_files import write_text_atomic

    keep = {k: check[k] for k in ("mode", "recheck_margin", "tried", "fp32_s_per_image",
                                  "reason")}
    try:
        write_text_atomic(auto_memory_path(loaded), json.dumps({"key": key, **keep}, indent=1))
    except OSError as err:
        log.debug("auto choice not remembered: %s", err)


def _auto_verify(run: dict[str, Runner], saved: dict, x_fast: torch.Tensor,
                 x_exact: torch.Tensor) -> tuple[np.ndarray, str, float | None, dict | None]:
    """A remembered choice, checked on a few images: (their exact scores, mode, margin,
    record), or a None record when the mode now moves scores by more than twice the largest
    difference it was chosen with (then auto compares afresh)."""
    p = run["fp32"](x_exact)
    mode = saved["mode"].split(" ")[0]
    if mode == "fp32":
        record = {**saved, "used": False, "reused": True, "images_compared": len(x_exact),
                  "rechecked_in_fp32": 0, "reason": f"remembered choice fp32 ({saved['reason']})"}
        return p, "fp32", None, record
    allowed = saved["tried"][mode]["max_abs_prob_diff"]
    diff = float(np.abs(p - run[mode](x_fast)).max())
    if diff > 2 * allowed:
        return p, "fp32", None, None
    record = {**saved, "used": True, "reused": True, "images_compared": len(x_exact),
              "verify_max_abs_prob_diff": diff, "rechecked_in_fp32": 0,
              "reason": f"remembered choice {mode}: moved scores by at most {diff:.4f} on "
                        f"{len(x_exact)} images (chosen at {allowed:.4f})"}
    return p, mode, saved["recheck_margin"], record


def predict_paths(loaded: LoadedModel, paths: list[Path], *, batch_size: int = 32,
                  workers: int = 1, precision: str = "fp32") -> Predictions:
    """Probabilities and decisions for every path; `workers` decode threads run ahead of the
    model.

    `precision`: fp32; bf16 (autocast everywhere); int8 (the ONNX int8 export); or auto, whose
    decisions are those of fp32: AUTO_CHECK_IMAGES images of the first batch run exactly (full
    decode, fp32) and in each mode of `auto_modes` (reduced-scale decode, low precision),
    timed; every other image runs in the mode `choose_mode` estimates fastest (fp32 when none
    beats it), and every image with a score within AUTO_MARGIN_FACTOR x that mode's largest
    difference on those images (at least 0.01) of a decision boundary is decoded again in full
    and recomputed in fp32.

    The choice is remembered beside the model file (`auto_memory_path`) for this model, CPU,
    thread count and library versions: a later run skips the comparison and only verifies
    the remembered mode on AUTO_VERIFY_IMAGES images of its first batch (fp32 on full decodes
    against the mode); if the mode moves their scores by more than twice what it did when it
    was chosen, the full comparison runs again."""
    if precision not in ("fp32", "bf16", "int8", "auto"):
        raise DentfedError(f"precision must be fp32, bf16, int8 or auto, not {precision}")
    model, task_type = loaded.model, loaded.task_type
    thr = loaded.decision_thresholds()
    model.eval()
    model.to(memory_format=torch.channels_last)
    run = runners(loaded)
    if precision not in run and precision != "auto":
        raise DentfedError(f"precision {precision} needs the model's int8 ONNX export: run "
                           "`dentfed export RUN --calibrate IMAGES` first")
    n, nl = len(paths), len(loaded.labels)
    probs = np.full((n, nl), np.nan, dtype=np.float32)
    errors = [""] * n
    size, modality = loaded.cfg.data.image_size, loaded.cfg.data.modality
    exact_ds = PredictDataset(paths, size, modality)  # full decode
    mode = "fp32" if precision == "auto" else precision
    margin = None  # auto with a fast mode in use: re-check scores this close to a boundary
    check: dict | None = None
    ds = PredictDataset(paths, size, modality, reduced=precision == "auto")
    with torch.inference_mode():
        for x, idx, errs, reduced in iter_batches(ds, batch_size, workers):
            ok = np.array([not e for e in errs])
            checked = np.zeros(0, dtype=int)  # rows of this batch already computed exactly
            if precision == "auto" and check is None and ok.any():
                key = _auto_key(loaded, auto_modes(run))
                saved = _recall_auto(loaded, key)
                if saved is not None:
                    checked = np.flatnonzero(ok)[:AUTO_VERIFY_IMAGES]
                    p_checked, mode, margin, check = _auto_verify(
                        run, saved, x[torch.from_numpy(checked)],
                        _load_batch(exact_ds, list(idx[checked]))[0])
                if check is None:
                    checked = np.flatnonzero(ok)[:AUTO_CHECK_IMAGES]
                    p_checked, mode, margin, check = _auto_check(
                        run, x[torch.from_numpy(checked)],
                        _load_batch(exact_ds, list(idx[checked]))[0], task_type, thr)
                    _remember_auto(loaded, key, check)
                if margin is None:  # fp32 it is: decode in full from now on
                    ds.draft = None
            if reduced and margin is None:  # decoded before auto settled on fp32
                x = _load_batch(exact_ds, list(idx))[0]
            p = run[mode](x)
            if len(checked):
                p[checked] = p_checked
            if margin is not None:
                near = borderline(p, task_type, thr, margin) & ok
                near[checked] = False
                if near.any():
                    p[near] = run["fp32"](_load_batch(exact_ds, list(idx[near]))[0])
                    check["rechecked_in_fp32"] += int(near.sum())
            probs[idx[ok]] = p[ok]
            for i, e in zip(idx, errs, strict=True):
                errors[int(i)] = e
    dec = np.full((n, nl), -1, dtype=np.int8)
    good = np.array([not e for e in errors], dtype=bool)
    if good.any():
        dec[good] = decide(probs[good], task_type, thr)
    used = f"{mode} + fp32 re-check" if margin is not None else mode
    return Predictions(probs, dec, errors, used, check,
                       "onnx" if "fp32" in loaded.onnx else "torch")


def preprocess(images: list[Image.Image], image_size: int, modality: str) -> torch.Tensor:
    """Decoded images -> the normalised batch the model saw in training (no augmentation)."""
    resize, normalise = resize_transform(image_size), tensor_transform(modality, train=False)
    return torch.stack([normalise(resize(img)) for img in images])


def predict_batch(loaded: LoadedModel, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and decisions for an already normalised batch (fp32; in ONNX Runtime
    when the model has an export)."""
    loaded.model.eval()
    with torch.inference_mode():
        p = runners(loaded)["fp32"](x)
    return p, decide(p, loaded.task_type, loaded.decision_thresholds())


def predictions_table(names: list[str], labels: list[str], pred: Predictions) -> pd.DataFrame:
    """One row per image: status, error, p_<label>, pred_<label>, predicted (';'-joined)."""
    rows = []
    for i, name in enumerate(names):
        row: dict = {"image": name, "status": "unreadable" if pred.errors[i] else "ok",
                     "error": pred.errors[i]}
        for j, lab in enumerate(labels):
            row[f"p_{lab}"] = None if pred.errors[i] else round(float(pred.probs[i, j]), 6)
        for j, lab in enumerate(labels):
            row[f"pred_{lab}"] = None if pred.errors[i] else int(pred.decisions[i, j])
        row["predicted"] = "" if pred.errors[i] else ";".join(
            lab for j, lab in enumerate(labels) if pred.decisions[i, j] == 1)
        rows.append(row)
    df = pd.DataFrame(rows)
    for lab in labels:  # 0/1 with blanks for unreadable images, not 0.0/1.0
        df[f"pred_{lab}"] = df[f"pred_{lab}"].astype("Int64")
    return df


class DetectImageDataset(Dataset):
    """One image per item as a detector takes it: 0-1 RGB at image_size x image_size (the
    model's own transform normalises), with the original (width, height) to scale boxes
    back; an unreadable file gives a zero tensor and its reason."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths, self.size = paths, image_size
        self.resize = resize_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str, tuple[int, int]]:
        try:
            img = read_image(self.paths[i])
            return (self.resize(img).float() / 255.0, i, "", img.size)
        except ManifestError as err:
            reason = str(err).split(": ", 1)[-1]
            return torch.zeros(3, self.size, self.size), i, reason, (0, 0)


def _detect_collate(batch: list) -> tuple:
    return tuple(list(col) for col in zip(*batch, strict=True))


@dataclass
class Detections:
    """Per image: the detector's boxes in original-image pixels, scores and class names."""

    findings: list[list[dict]]  # per image: shared.fdi.finding dicts (label, score, box)
    sizes: list[tuple[int, int]]  # per image (width, height); (0, 0) when unreadable
    errors: list[str]

    @property
    def n_failed(self) -> int:
        return sum(1 for e in self.errors if e)


def detect_images(loaded: LoadedModel, images: list[torch.Tensor],
                  sizes: list[tuple[int, int]], min_score: float = 0.0) -> list[list[dict]]:
    """Boxes for already resized 0-1 images, scaled back to each (width, height)."""
    s = loaded.cfg.data.image_size
    with torch.inference_mode():
        outs = loaded.model(images)
    result = []
    for out, (w, h) in zip(outs, sizes, strict=True):
        scale = torch.tensor([w / s, h / s, w / s, h / s])
        found = []
        for box, score, lab in zip(out["boxes"].cpu(), out["scores"].cpu(),
                                   out["labels"].cpu(), strict=True):
            if float(score) < min_score or not 1 <= int(lab) <= len(loaded.labels):
                continue
            found.append(finding(loaded.labels[int(lab) - 1],
                                 [round(float(v), 2) for v in box * scale], float(score)))
        result.append(found)
    return result


def detect_paths(loaded: LoadedModel, paths: list[Path], *, batch_size: int = 8,
                 workers: int = 1, min_score: float = 0.0) -> Detections:
    """A detector's boxes for every path (fp32); unreadable images are reported, not fatal."""
    loaded.model.eval()
    ds = DetectImageDataset(paths, loaded.cfg.data.image_size)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_detect_collate, persistent_workers=False)
    n = len(paths)
    findings: list[list[dict]] = [[] for _ in range(n)]
    sizes: list[tuple[int, int]] = [(0, 0)] * n
    errors = [""] * n
    for x, idx, errs, sz in loader:
        ok = [k for k, e in enumerate(errs) if not e]
        for i, e in zip(idx, errs, strict=True):
            errors[i] = e
        if not ok:
            continue
        found = detect_images(loaded, [x[k] for k in ok], [sz[k] for k in ok], min_score)
        for k, f in zip(ok, found, strict=True):
            findings[idx[k]], sizes[idx[k]] = f, tuple(sz[k])
    return Detections(findings, sizes, errors)


def finalise_findings(loaded: LoadedModel, found: list[dict], *, numbering: bool = True,
                      min_score: float = 0.5) -> list[dict]:
    """What a clinic sees of one image's detections (predict and serve alike): for a model
    that numbers teeth (`numbers_teeth`, and `numbering`), anatomically consistent numbers
    first (`shared.fdi.consistent_numbering`; every candidate is evidence, so before the score
    cut-off), then the boxes scoring at least `min_score`."""
    from shared import fdi

    if numbering and numbers_teeth(loaded):
        found = fdi.consistent_numbering(found)
    return [f for f in found if f["score"] >= min_score]


def numbers_teeth(loaded: LoadedModel) -> bool:
    """A detector that numbers teeth: its classes include the 32 permanent FDI numbers (the
    renumbering may give any of them, so a model that knows only some cannot be renumbered)."""
    from shared import fdi

    return loaded.task_type == "detection" and set(fdi.PERMANENT) <= set(loaded.labels)


def detect_image(loaded: LoadedModel, image: Image.Image) -> list[dict]:
    """One decoded image's raw detections (original pixels), e.g. an upload."""
    x = resize_transform(loaded.cfg.data.image_size)(image).float() / 255.0
    return detect_images(loaded, [x], [image.size])[0]
