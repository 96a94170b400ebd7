"""`dentfed serve`: the JSON API and its limits through FastAPI's TestClient, and the upload page
driven end to end in headless Chromium (skipped with a reason where Chromium is absent)."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dentfed.inference import load_model, predict_paths
from dentfed.serve import create_app
from simulations.engine import free_port

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _png(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture
def client(tiny_run: Path, tmp_path: Path, monkeypatch):
    """The app with a 3 MB limit; temporary files are redirected to an empty folder and every
    spooled upload that rolls over to a disk file is recorded, so tests can check that no
    upload touches the disk."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    rolled = []
    original = tempfile.SpooledTemporaryFile.rollover

    def rollover(self):
        rolled.append(self)
        return original(self)

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", rollover)
    app = create_app(tiny_run, max_bytes=3 * 1024 * 1024)
    with TestClient(app) as c:
        c.spool, c.rolled = spool, rolled
        yield c


def test_api_predict_equals_dentfed_predict(client, tiny_run: Path):
    img = tiny_run.parent / "data/img/3.png"
    r = client.post("/api/predict", files={"file": ("P0042_x.png", _png(img), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = predict_paths(load_model(tiny_run), [img], workers=0)
    assert np.allclose([body["probabilities"][lab] for lab in body["labels"]],
                       expected.probs[0], atol=1e-5)
    assert body["predicted"] == [lab for j, lab in enumerate(body["labels"])
                                 if expected.decisions[0, j]]
    assert "saliency" not in body and "P0042" not in r.text
    r = client.post("/api/predict?saliency=true",
                    files={"file": ("x.png", _png(img), "image/png")})
    sal = r.json()["saliency"]
    assert set(sal) == {"bright", "stripe"} and set(sal["bright"]) == {"gradient", "gradcam"}
    assert sal["bright"]["gradcam"].startswith("data:image/png;base64,")
    assert list(client.spool.iterdir()) == [] and client.rolled == []


def test_uploads_over_the_limit_of_the_wrong_type_or_broken_are_refused(client):
    big = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1100, 1100, 3), dtype=np.uint8)).save(big, "PNG")
    assert big.tell() > 3 * 1024 * 1024
    r = client.post("/api/predict", files={"file": ("big.png", big.getvalue(), "image/png")})
    assert r.status_code == 413 and "at most 3 MB" in r.json()["error"]
    r = client.post("/api/predict", files={"file": ("notes.pdf", b"%PDF-1.4", "application/pdf")})
    assert r.status_code == 415 and "unsupported file type" in r.json()["error"]
    r = client.post("/api/predict", files={"file": ("x.jpg", b"\xff\xd8 broken", "image/jpeg")})
    assert r.status_code == 422 and "not a readable image" in r.json()["error"]
    r = client.post("/predict", files={"file": ("x.jpg", b"\xff\xd8 broken", "image/jpeg")})
    assert r.status_code == 422 and 'id="error"' in r.text and "<form" in r.text
    medium = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(medium, "PNG")
    assert 1024 * 1024 < medium.tell() < 3 * 1024 * 1024  # Starlette spools > 1 MB to disk
    r = client.post("/api/predict", files={"file": ("m.png", medium.getvalue(), "image/png")})
    assert r.status_code == 200
    assert list(client.spool.iterdir()) == [] and client.rolled == []  # not even temporarily


@pytest.fixture
def live_server(tiny_run: Path):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_run), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.05)
    assert server.started, "the live test server did not start within 10 s"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow  # headless Chromium
def test_upload_page_in_headless_chromium(live_server: str, tiny_run: Path, tmp_path: Path):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        why = (f"Chromium not installed ({CHROMIUM}, {CHROMEDRIVER}): run scripts/setup.sh "
               "as root, or apt-get install chromium chromium-driver")
        if os.environ.get("CI", "").lower() == "true":  # CI must not go green without it
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--user-data-dir={tmp_path / 'profile'}",
                # a fake camera (a moving test pattern) that the page may open without asking
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(live_server)
        assert "bright, stripe" in driver.find_element(By.TAG_NAME, "body").text
        image = tmp_path / "upload.png"
        shutil.copy(tiny_run.parent / "data/img/1.png", image)
        driver.find_element(By.ID, "file").send_keys(str(image))
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.ID, "result")))
        text = driver.find_element(By.TAG_NAME, "body").text
        assert "Predicted:" in text and "bright: 0." in text and "stripe: 0." in text
        overlays = [i for i in driver.find_elements(By.TAG_NAME, "img")
                    if i.get_attribute("src").startswith("data:image/png")]
        assert len(overlays) >= 3  # the input plus gradient and Grad-CAM for a label
        assert all(driver.execute_script("return arguments[0].naturalWidth", i) == 224
                   for i in overlays)  # the browser decoded every overlay
        driver.get(live_server)
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.ID, "error")))
        assert "unsupported file type" in driver.find_element(By.ID, "error").text

        # A picture straight from the device's camera: open it, capture a frame, and the frame
        # (a 640x480 JPEG of the fake camera's pattern) gets a prediction on the result page.
        driver.get(live_server)
        capture = driver.find_element(By.ID, "capture")
        assert not capture.is_enabled()  # nothing to capture before the camera is opened
        driver.find_element(By.ID, "camera-start").click()
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return document.getElementById('camera').videoWidth") > 0 and capture.is_enabled())
        assert driver.find_element(By.ID, "camera-error").text == ""
        capture.click()
        WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.ID, "result")))
        text = driver.find_element(By.TAG_NAME, "body").text
        assert "Predicted:" in text and "bright: 0." in text and "stripe: 0." in text
        assert "camera.jpg" in text  # the page's name for a captured frame: it came from there
        shown = [i for i in driver.find_elements(By.TAG_NAME, "img")
                 if i.get_attribute("src").startswith("data:image/png")]
        assert shown and driver.execute_script("return arguments[0].naturalWidth",
                                               shown[0]) == 224
    finally:
        driver.quit()
