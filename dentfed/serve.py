"""`dentfed serve`: a small FastAPI app around one saved model, for a dentist's browser.

- `GET /`: upload page (one image; JPEG, PNG, BMP, TIFF, WebP or DICOM), or a frame taken
  with the device's camera, sent through the same form.
- `POST /predict`: the same page with probabilities, decisions and saliency overlays.
- `POST /api/predict`: JSON (`?saliency=true` adds overlays as PNG data URIs).
- `GET /api/model`: the model card.

Uploads are decoded in memory: multipart spooling is raised above the size limit so no upload is
written to a temporary file, and nothing is saved unless `--keep-uploads DIR` is given (then
under a random name). Nothing about an upload (its file name included) is logged.
"""

from __future__ import annotations

import base64
import html
import json
import threading
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from dentfed.inference import (
    LoadedModel,
    detect_image,
    finalise_findings,
    load_model,
    numbers_teeth,
    predict_batch,
    preprocess,
)
from dentfed.saliency import (
    SHEET_CSS,
    SheetRow,
    compute_maps,
    data_uri,
    denormalise,
    display_image,
    methods_for,
    overlay,
    sheet_body,
)
from shared.atomic_files import write_bytes_atomic
from shared.data.readers import IMAGE_SUFFIXES, decode_image_bytes
from shared.errors import ManifestError
from shared.model_card import read_card

ALLOWED_TYPES = {"image/jpeg", "image/png", "image/bmp", "image/tiff", "image/webp",
                 "application/dicom", "application/octet-stream"}
ALLOWED_SUFFIXES = IMAGE_SUFFIXES | {""}  # suffix-less: DICOM by its magic bytes


class UploadRejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{SHEET_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{body}</body></html>")


def _form(loaded: LoadedModel, max_mb: float) -> str:
    labels = ", ".join(html.escape(x) for x in loaded.labels)
    return (f"<p>Model: {html.escape(loaded.cfg.model.name)} ({loaded.task_type}: {labels}), "
            f"trained on {loaded.cfg.data.modality}s. One image, at most {max_mb:g} MB: JPEG, "
            "PNG, BMP, TIFF, WebP or DICOM. The image is analysed in memory and not stored.</p>"
            '<form id="upload" action="predict" method="post" enctype="multipart/form-data">'
            '<input id="file" type="file" name="file" accept="image/*,.dcm,.dicom"> '
            + ('' if loaded.task_type == "detection" else
               '<label><input id="saliency" type="checkbox" name="saliency" value="1" '
               'checked> saliency maps</label> ')
            + '<button id="submit" type="submit">Predict</button></form>' + CAMERA_HTML)


# Live camera input (an intraoral camera or a phone): the browser shows the camera's video,
# "Capture" draws the current frame on a canvas, encodes it as JPEG and submits it through the
# upload form above, so a frame takes exactly the path of an uploaded file (decoded in memory,
# never stored). The camera is opened only when the user asks; getUserMedia needs a secure
# context (https, or http on localhost). Phones without getUserMedia get the file picker's
# `capture` input, which opens the camera app and hands the photo to the same form.
CAMERA_HTML = """
<h2>Or take a picture with the camera</h2>
<p><button id="camera-start" type="button">Use camera</button>
<button id="capture" type="button" disabled>Capture and predict</button>
<label>or a phone's camera app: <input id="camera-file" type="file" accept="image/*"
capture="environment"></label></p>
<p id="camera-error" class="err"></p>
<video id="camera" autoplay playsinline muted style="max-width:100%;display:none"></video>
<canvas id="frame" style="display:none"></canvas>
<script>
(() => {
  const form = document.getElementById("upload"), fileInput = document.getElementById("file");
  const video = document.getElementById("camera"), capture = document.getElementById("capture");
  const err = document.getElementById("camera-error");
  let stream = null;
  function submitFile(file) {
    const dt = new DataTransfer();
    dt.items.add(file);
    fileInput.files = dt.files;
    // form.submit is shadowed by the button with id "submit": call the form's own method
    HTMLFormElement.prototype.submit.call(form);
  }
  document.getElementById("camera-start").addEventListener("click", async () => {
    err.textContent = "";
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      err.textContent = "no camera access here (the page needs https or localhost)";
      return;
    }
    try {
      stream = await navigator.mediaDevices.getUserMedia(
        {video: {facingMode: "environment"}, audio: false});
    } catch (e) {
      err.textContent = "camera not available: " + e.name;
      return;
    }
    video.srcObject = stream;
    video.style.display = "block";
    video.onloadeddata = () => { capture.disabled = false; };
  });
  capture.addEventListener("click", () => {
    if (!video.videoWidth) return;
    const canvas = document.getElementById("frame");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    capture.disabled = true;
    canvas.toBlob((blob) => {
      if (stream) stream.getTracks().forEach((t) => t.stop());
      try {
        submitFile(new File([blob], "camera.jpg", {type: "image/jpeg"}));
      } catch (e) {
        err.textContent = "could not send the picture: " + e;
      }
    }, "image/jpeg", 0.92);
  });
  document.getElementById("camera-file").addEventListener("change", (ev) => {
    if (ev.target.files.length) submitFile(ev.target.files[0]);
  });
})();
</script>
"""


def _detection_body(res: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(f['label'])}</td><td>{f['score']:.2f}</td>"
                   f"<td>{', '.join(f'{v:.0f}' for v in f['box'])}</td></tr>"
                   for f in res["boxes"])
    chart = (f'<h2>Dental chart</h2><img id="chart" src="{res["chart"]}" alt="dental chart">'
             if res.get("chart") else "")
    return (f'<p id="result">{len(res["boxes"])} finding(s)'
            f'{" (FDI numbers made anatomically consistent)" if res["numbered"] else ""}</p>'
            f'<img id="boxes" src="{res["boxes_image"]}" alt="image with boxes" '
            f'style="max-width:100%">{chart}'
            f'<table id="findings"><tr><th>label</th><th>score</th><th>box (px)</th></tr>'
            f'{rows}</table><p><a href="./">analyse another image</a></p>')


def create_app(model_path: str | Path, *, max_bytes: int = 10 * 1024 * 1024,
               keep_uploads: Path | None = None) -> FastAPI:
    """The app for one model; `max_bytes` bounds an upload (413 above it)."""
    loaded = load_model(model_path)
    card = read_card(loaded.checkpoint.parent)
    detector = loaded.task_type == "detection"
    methods = [] if detector else methods_for(loaded.model)
    lock = threading.Lock()  # captum hooks the model: one attribution at a time
    # Keep uploads in memory: Starlette would spool parts above 1 MB to a temporary file.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_bytes + 1024 * 1024)
    max_mb = max_bytes / (1024 * 1024)
    app = FastAPI(title="dentfed", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def limit_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() and \
                int(length) > max_bytes + 64 * 1024:  # multipart overhead
            return _error(request, 413, f"upload too large: at most {max_mb:g} MB")
        return await call_next(request)

    def _error(request: Request, status: int, message: str):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        body = (f'<p class="err" id="error">{html.escape(message)}</p>'
                f"{_form(loaded, max_mb)}")
        return HTMLResponse(_page("dentfed: not analysed", body), status_code=status)

    async def _read(upload: UploadFile) -> bytes:
        suffix = Path(upload.filename or "").suffix.lower()
        ctype = (upload.content_type or "").split(";")[0].strip().lower()
        if suffix not in ALLOWED_SUFFIXES or (ctype and ctype not in ALLOWED_TYPES):
            raise UploadRejected(415, "unsupported file type: upload a JPEG, PNG, BMP, TIFF, "
                                 "WebP or DICOM image")
        data = await upload.read(max_bytes + 1)
        await upload.close()
        if len(data) > max_bytes:
            raise UploadRejected(413, f"upload too large: at most {max_mb:g} MB")
        if not data:
            raise UploadRejected(400, "empty upload: choose an image file")
        if keep_uploads is not None:
            keep_uploads.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(keep_uploads / f"{uuid.uuid4().hex}{suffix}", data)
        return data

    def _detect(img: Any, min_score: float = 0.5) -> dict[str, Any]:
        """A detector's boxes (FDI models: consistently numbered), the image with its boxes
        and, for a tooth-numbering model, the dental chart, as data URIs; nothing stored."""
        from dentfed.clinic_outputs import clinic_outputs

        with lock:
            found = detect_image(loaded, img)
        found = finalise_findings(loaded, found, min_score=min_score)
        outs = clinic_outputs(img, found, loaded.labels, score_threshold=min_score,
                              model_name=loaded.cfg.model.name)
        uri = {k: "data:image/png;base64," + base64.b64encode(v).decode("ascii")
               for k, v in outs.items() if k.endswith(".png")}
        return {"labels": loaded.labels, "task": "detection", "boxes": found,
                "numbered": numbers_teeth(loaded), "boxes_image": uri["boxes.png"],
                "chart": uri.get("chart.png"), "fhir": json.loads(outs["fhir.json"])}

    def _analyse(data: bytes, saliency: bool, with_input: bool = False) -> dict[str, Any]:
        try:
            img = decode_image_bytes(data)
        except ManifestError as err:
            raise UploadRejected(422, f"the file is not a readable image: {err}") from None
        if detector:
            return _detect(img)
        x = preprocess([img], loaded.cfg.data.image_size, loaded.cfg.data.modality)
        with lock:
            probs, dec = predict_batch(loaded, x)
            maps = compute_maps(loaded.model, x, list(range(len(loaded.labels))), methods) \
                if saliency else {}
        labels = loaded.labels
        res: dict[str, Any] = {
            "labels": labels,
            "probabilities": {lab: float(probs[0, j]) for j, lab in enumerate(labels)},
            "decisions": {lab: bool(dec[0, j]) for j, lab in enumerate(labels)},
            "predicted": [lab for j, lab in enumerate(labels) if dec[0, j]],
            "thresholds": (dict(zip(labels, loaded.decision_thresholds(), strict=True))
                           if loaded.task_type == "multilabel" else None),
        }
        image = denormalise(x[0])
        if saliency or with_input:
            res["input"] = data_uri(display_image(image))
        if saliency:
            res["saliency"] = {lab: {m: data_uri(overlay(image, maps[m][0, j]))
                                     for m in methods} for j, lab in enumerate(labels)}
        return res

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return _page("dentfed: image analysis", _form(loaded, max_mb))

    @app.get("/api/model")
    def model_info() -> dict:
        return {"labels": loaded.labels, "task": loaded.task_type,
                "architecture": loaded.cfg.model.name, "card": card}

    async def _upload(request: Request) -> tuple[UploadFile, Any]:
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception:  # malformed multipart, too many parts
            raise UploadRejected(400, "send one image as multipart form field 'file'") from None
        file = form.get("file")
        if not isinstance(file, UploadFile) or not file.filename:
            raise UploadRejected(400, "no image: choose an image file to upload")
        return file, form

    @app.post("/api/predict")
    async def api_predict(request: Request, saliency: bool = False):
        try:
            file, _ = await _upload(request)
            return _analyse(await _read(file), saliency)
        except UploadRejected as err:
            return _error(request, err.status, err.message)

    @app.post("/predict", response_class=HTMLResponse)
    async def page_predict(request: Request):
        try:
            file, form = await _upload(request)
            saliency = form.get("saliency") == "1"
            res = _analyse(await _read(file), saliency, with_input=True)
        except UploadRejected as err:
            return _error(request, err.status, err.message)
        if detector:
            return _page("dentfed: result", _detection_body(res))
        probs = res["probabilities"]
        shown = res["predicted"] or [max(probs, key=probs.get)]
        row = SheetRow(file.filename or "upload", res["input"], probs, res["predicted"],
                       shown if saliency else [], res.get("saliency", {}))
        verdict = ", ".join(res["predicted"]) or "none of the labels"
        body = (f'<p id="result">Predicted: <b>{html.escape(verdict)}</b></p>'
                f"{sheet_body([row], methods, res['thresholds'])}"
                f'<p><a href="./">analyse another image</a></p>')
        return _page("dentfed: result", body)

    return app


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000,
          max_mb: float = 10, keep_uploads: Path | None = None) -> None:
    import uvicorn

    app = create_app(model_path, max_bytes=int(max_mb * 1024 * 1024), keep_uploads=keep_uploads)
    uvicorn.run(app, host=host, port=port, log_level="info")
