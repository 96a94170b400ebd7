"""Inference throughput: dentfed's batched predictor next to a plain torchvision loop, in one run.

Both read the same JPEG files from disk and run the same model. The plain loop decodes in the
main process with classic torchvision transforms and runs fp32 batches under `torch.no_grad`.
dentfed's path (`dentfed.inference.predict_paths`) decodes in DataLoader workers, runs under
`torch.inference_mode` with channels_last, fp32 and optionally bf16 autocast. Prints images/s and
whether decisions (the model's thresholds, or argmax) equal the plain loop's and dentfed's fp32
ones. The plain loop resizes with PIL, dentfed with torchvision.transforms.v2 on tensors (as in
training), so their probabilities differ slightly even in fp32.

    .venv/bin/python -m simulations.bench_inference --n 256      # ResNet-18, 224 px
    .venv/bin/python -m simulations.bench_inference --model runs/ufba-mnv2  # a trained model

Images: UFBA panoramics from ../shared when present (real 512 px JPEGs), else synthetic photos.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from dentfed.inference import (
    auto_memory_path,
    bf16_supported,
    decide,
    load_model,
    predict_paths,
)
from dentfed.onnx_export import vnni_supported
from dentfed.predict import run_export
from shared.config import config_from_dict
from shared.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from shared.model_file import find_model_file, save_model_file
from shared.models import build_model, probabilities


def _images(n: int, shared: Path, tmp: Path) -> tuple[list[Path], list[Path]]:
    """(n images to predict, up to 64 others to calibrate the int8 model on; the benchmark's own
    images when there are no others)."""
    ufba = shared / "data/ufba425_panoramic/images"
    if ufba.is_dir():
        files = sorted(ufba.glob("*.jpg"))
        bench = [files[i % len(files)] for i in range(n)]
        return bench, files[n:][-64:] or bench[:64]
    from dental_datasets import synth

    manifest = synth.generate_anomalies(tmp / "synth", n=n, seed=0, image_size=256)
    bench = sorted(manifest.parent.rglob("*.png"))[:n]
    return bench, bench[:64]


def plain_loop(model: torch.nn.Module, paths: list[Path], size: int, batch: int,
               task_type: str) -> np.ndarray:
    """The textbook loop: PIL + torchvision.transforms in the main process, fp32, no_grad."""
    tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN,
                                                                        IMAGENET_STD)])
    model = model.to(memory_format=torch.contiguous_format).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(paths), batch):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[s:s + batch]])
            logits = model(x)
            out.append(probabilities(logits, task_type).numpy())
    return np.concatenate(out)


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the DataLoader's decode workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn):
    """(result, wall seconds, CPU seconds). On a machine shared with other jobs the wall time
    depends on the neighbours; CPU seconds per image much less so."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0, _cpu_seconds() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="run folder; default: ResNet-18 (random init, 5 labels)")
    ap.add_argument("--image-size", type=int, default=224, help="for the default ResNet-18")
    ap.add_argument("--head-std", type=float, default=0.5,
                    help="std of the random ResNet-18 head's weights: 0.5 spreads the scores "
                    "over about 0.1-0.9 like a trained model's; 0.05 puts all of them within "
                    "0.1 of the 0.5 threshold, so auto re-checks most images in fp32")
    ap.add_argument("--n", type=int, default=256, help="images per measurement")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="decode threads")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved; best time is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads (default: all cores)")
    ap.add_argument("--shared", type=Path,
                    default=Path(os.environ.get("DENTFED_SHARED", "../shared")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            src = find_model_file(args.model)
            ckpt = Path(tmp) / src.name  # the export goes beside a copy, not into the run
            shutil.copy(src, ckpt)
        else:
            cfg = config_from_dict({"task": {"type": "multilabel", "labels": list("abcde")},
                                    "data": {"image_size": args.image_size},
                                    "model": {"name": "resnet18"}})
            model = build_model(cfg.model, 5, args.image_size).eval()
            torch.nn.init.normal_(model.fc.weight, std=args.head_std)
            ckpt = Path(tmp) / "model.pt"
            save_model_file(ckpt, model, cfg, None)
        paths, calib = _images(args.n, args.shared, Path(tmp))
        t0 = time.perf_counter()
        run_export(ckpt, calib)
        t_export = time.perf_counter() - t0
        loaded = load_model(ckpt)  # with its ONNX exports (fp32 and int8)
        torch_only = replace(loaded, onnx={})
        size, task = loaded.cfg.data.image_size, loaded.task_type
        thr = loaded.decision_thresholds()
        print(f"model {loaded.cfg.model.name} at {size} px, {len(paths)} images "
              f"({'UFBA JPEGs' if 'ufba' in str(paths[0]) else 'synthetic'}), batch "
              f"{args.batch_size}, {args.threads} torch threads, {args.workers} decode "
              f"thread(s), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, native "
              f"bf16: {bf16_supported()}, VNNI: {vnni_supported()}; ONNX export (fp32 + int8 "
              f"calibrated on {len(calib)} other images) {t_export:.1f} s, once per model")
        # (name, model, precision)
        pipes = {"torch fp32": (torch_only, "fp32"), "onnx fp32": (loaded, "fp32"),
                 "torch bf16": (torch_only, "bf16"), "onnx int8": (loaded, "int8"),
                 "auto": (loaded, "auto"), "auto remembered": (loaded, "auto")}
        warm = paths[:args.batch_size]
        plain_loop(loaded.model, warm, size, args.batch_size, task)
        for lm, precision in pipes.values():
            predict_paths(lm, warm, batch_size=args.batch_size, workers=0, precision=precision)
        # interleaved repeats, best time of each: a neighbour's burst hits all pipelines alike
        times: dict[str, float] = {}
        auto_used: dict[str, str] = {}
        cpu: dict[str, float] = {}
        outputs: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            ref, t, c = _timed(lambda: plain_loop(loaded.model, paths, size, args.batch_size,
                                                  task))
            times["plain"], outputs["plain"] = min(times.get("plain", t), t), ref
            cpu["plain"] = min(cpu.get("plain", c), c)
            for key, (lm, precision) in pipes.items():
                if key == "auto":  # a first run: the modes are compared on the first batch
                    auto_memory_path(lm).unlink(missing_ok=True)
                pred, t, c = _timed(lambda lm=lm, p=precision: predict_paths(
                    lm, paths, batch_size=args.batch_size, workers=args.workers,
                    precision=p))
                times[key] = min(times.get(key, t), t)
                cpu[key] = min(cpu.get(key, c), c)
                outputs[key] = pred.probs
                if key.startswith("auto"):
                    chk = pred.auto_check or {}
                    auto_used[key] = pred.precision + (
                        f", {chk['rechecked_in_fp32']} of {len(paths)} images decoded in full "
                        "and re-checked in fp32" if chk.get("used") else "") + (
                        f" ({chk['reason']})" if chk else "")
    dec = {k: decide(v, task, thr) for k, v in outputs.items()}

    def agree(a: str, b: str) -> str:
        """Share of images whose decisions on every label are equal, and max |prob diff|."""
        same = float((dec[a] == dec[b]).all(axis=1).mean())
        return f"{same:7.1%} ({np.abs(outputs[a] - outputs[b]).max():.4f})"

    names = {"plain": "plain torchvision loop (fp32)",
             "torch fp32": "dentfed predict fp32, PyTorch (no export)",
             "onnx fp32": "dentfed predict fp32, ONNX Runtime (exported)",
             "torch bf16": "dentfed predict bf16 autocast",
             "onnx int8": "dentfed predict int8, ONNX Runtime",
             "auto": "dentfed predict auto (fast mode, borderline fp32)",
             "auto remembered": "dentfed predict auto, a later run (remembered)"}
    print(f"\n{'pipeline':50s} {'images/s':>9s} {'img/CPU-s':>9s}  {'same as plain (max |dp|)':25s}"
          f" {'same as torch fp32':20s}")
    for key, name in names.items():
        print(f"{name:50s} {len(paths) / times[key]:9.1f} {len(paths) / cpu[key]:9.1f}  "
              f"{agree(key, 'plain'):25s} {agree(key, 'torch fp32'):20s}")
    cores = os.cpu_count() or 1
    for key, used in auto_used.items():
        print(f"{key} used: {used}")
    print(f"\nimages/s: wall clock; img/CPU-s: images per CPU-second of this process "
          f"(x{cores} = what {cores} otherwise idle cores could do at best)")
    t_plain = times["plain"]
    print("speed-up vs plain: " + ", ".join(f"{k} {t_plain / times[k]:.2f}x"
                                            for k in names if k != "plain")
          + f" (same machine, same run, best of {args.repeats} interleaved repeats; load "
          f"average now {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
