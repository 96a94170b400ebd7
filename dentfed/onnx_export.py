"""`dentfed export`: a saved model as ONNX (fp32, and int8 when calibration images are given),
and the ONNX Runtime sessions `dentfed predict` runs them with.

The exports sit beside the model file (`model.onnx`, `model.int8.onnx`; for `model_final.pt`:
`model_final.onnx`, ...) and carry the model file's sha256 in their metadata, so an export of an
older checkpoint is never used. ONNX Runtime's CPU kernels run ResNet-18 fp32 about 1.5-2x faster
than eager PyTorch on a 2-core VM, with the same scores (max |dp| ~1e-6), and let a clinic run
predictions without PyTorch. The int8 model (static quantisation, QDQ, per-channel weights,
calibrated on the clinic's own images) is faster again on CPUs with VNNI, but moves scores, so
`predict --precision auto` uses it only behind the decision-agreement gate (dentfed/inference.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from shared.atomic_files import atomic_file
from shared.models import sha256_of

log = logging.getLogger(__name__)

SHA_KEY = "dentfed_checkpoint_sha256"
INPUT, OUTPUT = "image", "logits"


def export_paths(checkpoint: Path) -> dict[str, Path]:
    """Where the exports of one model file live: {'fp32': ..., 'int8': ...}."""
    return {"fp32": checkpoint.with_suffix(".onnx"),
            "int8": checkpoint.with_suffix(".int8.onnx")}


def _set_sha(path: Path, sha: str) -> None:
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    m.metadata_props.add(key=SHA_KEY, value=sha)
    onnx.save(m, str(path))


def export_onnx(model: torch.nn.Module, image_size: int, checkpoint: Path,
                calibration: list[torch.Tensor] | None = None) -> dict[str, Path]:
    """Write the fp32 ONNX model (and the int8 one when `calibration`, normalised batches of
    the clinic's own images, is given) beside `checkpoint`; returns what was written."""
    from torch import nn

    paths = export_paths(checkpoint)
    sha = sha256_of(checkpoint)
    model = model.eval().to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(1, 3, image_size, image_size)

    class _Logits(nn.Module):  # the plain logits, whatever the wrapped model returns
        def __init__(self, m: nn.Module):
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x)

    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        import warnings

        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
            warnings.simplefilter("ignore")
            torch.onnx.export(_Logits(model), (dummy,), str(raw), dynamo=False,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                              opset_version=17)
        _set_sha(raw, sha)
        with atomic_file(paths["fp32"]) as dst:
            dst.write_bytes(raw.read_bytes())
        written["fp32"] = paths["fp32"]
        if calibration:
            q = Path(tmp) / "model.int8.onnx"
            _quantise(raw, q, calibration, Path(tmp))
            _set_sha(q, sha)
            with atomic_file(paths["int8"]) as dst:
                dst.write_bytes(q.read_bytes())
            written["int8"] = paths["int8"]
        elif paths["int8"].exists():
            paths["int8"].unlink()  # an int8 model of an older export would be stale
    return written


def _quantise(src: Path, dst: Path, batches: list[torch.Tensor], tmp: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{INPUT: b.numpy().astype(np.float32)} for b in batches])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    pre = tmp / "pre.onnx"
    quant_pre_process(str(src), str(pre))
    # The classifier head stays fp32: its error lands on the scores undamped, and it is a
    # negligible share of the compute. On the bench_inference ResNet-18 this cut the largest
    # score change on 16 images from 0.054 to 0.042 and the share of images auto re-checks in
    # fp32 from 15% to 6%, at no measurable cost in time.
    import onnx

    linear = [n.name for n in onnx.load(str(pre)).graph.node  # topologically sorted
              if n.op_type in ("Gemm", "MatMul")]
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=linear[-1:])


def vnni_supported() -> bool:
    """int8 dot products in hardware (AVX512-VNNI, AVX-VNNI or AMX): where int8 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


class OnnxModel:
    """One ONNX Runtime session: normalised float batch in, logits out."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # spinning threads would take the core the decode thread needs between batches
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def sha(self) -> str | None:
        return self.session.get_modelmeta().custom_metadata_map.get(SHA_KEY)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([OUTPUT], {INPUT: x.contiguous().numpy()})[0]
        return torch.from_numpy(out)


def load_exports(checkpoint: Path, threads: int) -> dict[str, OnnxModel]:
    """The exports of this model file that match it byte for byte ({} when there are none,
    ONNX Runtime is missing, or the export is of an older checkpoint)."""
    paths = {k: p for k, p in export_paths(checkpoint).items() if p.is_file()}
    if not paths:
        return {}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("onnxruntime is not installed: the ONNX export is not used")
        return {}
    sha = sha256_of(checkpoint)
    out: dict[str, OnnxModel] = {}
    for kind, p in paths.items():
        try:
            m = OnnxModel(p, threads)
        except Exception as err:  # a truncated or foreign file
            log.warning("%s: not used (%s)", p.name, type(err).__name__)
            continue
        if m.sha() != sha:
            log.warning("%s: exported from an older %s; run `dentfed export` again",
                        p.name, checkpoint.name)
            continue
        out[kind] = m
    return out

