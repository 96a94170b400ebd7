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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from dentfed.inference import LoadedModel, bf16_supported, decide, load_model, predict_paths
from shared.config import config_from_dict
from shared.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from shared.models import build_model, probabilities


def _images(n: int, shared: Path, tmp: Path) -> list[Path]:
    ufba = shared / "data/ufba425_panoramic/images"
    if ufba.is_dir():
        files = sorted(ufba.glob("*.jpg"))
        return [files[i % len(files)] for i in range(n)]
    from dental_datasets import synth

    manifest = synth.generate_anomalies(tmp / "synth", n=n, seed=0, image_size=256)
    return sorted(manifest.parent.rglob("*.png"))[:n]


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
    ap.add_argument("--n", type=int, default=256, help="images per measurement")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved; best time is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads (default: all cores)")
    ap.add_argument("--shared", type=Path,
                    default=Path(os.environ.get("DENTFED_SHARED", "../shared")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        loaded = load_model(args.model)
    else:
        cfg = config_from_dict({"task": {"type": "multilabel", "labels": list("abcde")},
                                "data": {"image_size": args.image_size},
                                "model": {"name": "resnet18"}})
        model = build_model(cfg.model, 5, args.image_size).eval()
        torch.nn.init.normal_(model.fc.weight, std=0.05)  # spread the scores a little
        loaded = LoadedModel(model, cfg, None, Path("resnet18 (random init)"))
    size, task = loaded.cfg.data.image_size, loaded.task_type
    thr = loaded.decision_thresholds()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _images(args.n, args.shared, Path(tmp))
        print(f"model {loaded.cfg.model.name} at {size} px, {len(paths)} images "
              f"({'UFBA JPEGs' if 'ufba' in str(paths[0]) else 'synthetic'}), batch "
              f"{args.batch_size}, {args.threads} torch threads, {args.workers} decode worker(s), "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, native bf16: "
              f"{bf16_supported()}")
        warm = paths[:args.batch_size]
        plain_loop(loaded.model, warm, size, args.batch_size, task)
        for precision in ("fp32", "bf16", "auto"):
            predict_paths(loaded, warm, batch_size=args.batch_size, workers=0,
                          precision=precision)
        # interleaved repeats, best time of each: a neighbour's burst hits all pipelines alike
        times: dict[str, float] = {}
        cpu: dict[str, float] = {}
        outputs: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            ref, t, c = _timed(lambda: plain_loop(loaded.model, paths, size, args.batch_size,
                                                  task))
            times["plain"], outputs["plain"] = min(times.get("plain", t), t), ref
            cpu["plain"] = min(cpu.get("plain", c), c)
            for precision in ("fp32", "bf16", "auto"):
                pred, t, c = _timed(lambda p=precision: predict_paths(
                    loaded, paths, batch_size=args.batch_size, workers=args.workers,
                    precision=p))
                times[precision] = min(times.get(precision, t), t)
                cpu[precision] = min(cpu.get(precision, c), c)
                outputs[precision] = pred.probs
                if precision == "auto":
                    auto_used = pred.precision + (
                        f", {pred.bf16_check['rechecked_in_fp32']} of {len(paths)} images "
                        "re-checked in fp32" if pred.bf16_check and pred.bf16_check["used"]
                        else "")
    dec = {k: decide(v, task, thr) for k, v in outputs.items()}

    def agree(a: str, b: str) -> str:
        """Share of images whose decisions on every label are equal, and max |prob diff|."""
        same = float((dec[a] == dec[b]).all(axis=1).mean())
        return f"{same:7.1%} ({np.abs(outputs[a] - outputs[b]).max():.4f})"

    names = {"plain": "plain torchvision loop (fp32)",
             "fp32": "dentfed predict (fp32, channels_last, inference_mode)",
             "bf16": "dentfed predict (bf16 autocast, channels_last)",
             "auto": "dentfed predict (auto: bf16, borderline in fp32)"}
    print(f"\n{'pipeline':55s} {'images/s':>9s} {'img/CPU-s':>9s}  {'same as plain (max |dp|)':25s}"
          f" {'same as dentfed fp32':20s}")
    for key, name in names.items():
        print(f"{name:55s} {len(paths) / times[key]:9.1f} {len(paths) / cpu[key]:9.1f}  "
              f"{agree(key, 'plain'):25s} {agree(key, 'fp32'):20s}")
    cores = os.cpu_count() or 1
    print(f"auto used: {auto_used}")
    print(f"\nimages/s: wall clock; img/CPU-s: images per CPU-second of this process and its "
          f"workers (x{cores} = what {cores} otherwise idle cores could do at best)")
    t_plain = times["plain"]
    print(f"speed-up fp32 {t_plain / times['fp32']:.2f}x, bf16 {t_plain / times['bf16']:.2f}x, "
          f"auto {t_plain / times['auto']:.2f}x "
          f"(same machine, same run, best of {args.repeats} interleaved repeats; load average "
          f"now {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
