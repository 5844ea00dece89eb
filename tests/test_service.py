"""The HTTP API through BentoML's ASGI app (in process, lifespan included)."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from digitops.data import mnist
from digitops.model import DigitCNN


@pytest.fixture(scope="module")
def digits(mnist_dir):
    images, labels = mnist.load(mnist_dir, "t10k")
    return images, labels


def png_bytes(pixels: np.ndarray, size: int = 280) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    w = h = 30000
    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * (w // 8) for _ in range(h)), 9)

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_predict_multipart_returns_full_breakdown(client, digits):
    images, labels = digits
    r = client.post("/predict", files={"image": ("d.png", png_bytes(images[0]), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-3
    assert body["digit"] == int(np.argmax(body["probabilities"]))
    assert body["confidence"] == max(body["probabilities"])
    assert body["inverted"] is False
    seen = Image.open(io.BytesIO(base64.b64decode(body["input_png"])))
    assert seen.size == (28, 28)
    assert set(body["model"]) == {"name", "version", "mlflow_run_id", "data_version"}
    assert len(body["prediction_id"]) == 32


def test_dark_ink_on_light_is_inverted_unless_the_form_says_not_to(client, digits):
    images, _ = digits
    files = {"image": ("d.png", png_bytes(255 - images[1]), "image/png")}
    r = client.post("/predict", files=files)
    assert r.status_code == 200 and r.json()["inverted"] is True
    r = client.post("/predict", files=files, data={"invert": "false"})
    assert r.status_code == 200 and r.json()["inverted"] is False


def test_noise_is_seeded_and_changes_the_input(client, digits):
    images, _ = digits
    files = {"image": ("d.png", png_bytes(images[2]), "image/png")}
    a = client.post("/predict", files=files, data={"noise": "0.5", "seed": "3"}).json()
    b = client.post("/predict", files=files, data={"noise": "0.5", "seed": "3"}).json()
    clean = client.post("/predict", files=files).json()
    assert a["input_png"] == b["input_png"] != clean["input_png"]


def test_explain_gives_normalised_cam_and_overlay(client, digits):
    images, _ = digits
    files = {"image": ("d.png", png_bytes(images[3]), "image/png")}
    body = client.post("/explain", files=files).json()
    cam = np.array(body["cam"])
    assert cam.shape == (28, 28) and cam.min() >= 0 and cam.max() <= 1
    assert body["target"] == body["digit"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.mode == "RGB" and overlay.size == (28, 28)
    other = client.post("/explain", files=files, data={"target": str((body["digit"] + 1) % 10)})
    assert other.json()["target"] == (body["digit"] + 1) % 10


def test_feature_maps_every_layer(client, digits):
    images, _ = digits
    files = {"image": ("d.png", png_bytes(images[4]), "image/png")}
    widths = client.get("/model").json()["model_args"]["channels"]  # the served network's
    for layer, channels, size in zip(DigitCNN.conv_layers, widths, (14, 7, 7), strict=True):
        body = client.post(
            "/feature_maps", files=files, data={"layer": layer, "arrays": "true"}
        ).json()
        assert body["channels"] == channels and body["size"] == [size, size]
        assert np.array(body["maps"]).shape == (channels, size, size)
        assert body["grid_png"]


def test_predict_batch_keeps_order_and_isolates_bad_items(client, digits):
    images, _ = digits
    files = [("images", (f"{i}.png", png_bytes(images[i]), "image/png")) for i in range(5)]
    files.insert(2, ("images", ("bad.png", b"not an image", "image/png")))
    body = client.post("/predict_batch", files=files).json()
    assert body["count"] == 6
    assert body["results"][2]["status"] == 400
    single = client.post("/predict", files={"image": ("0.png", png_bytes(images[0]), "image/png")})
    assert body["results"][0]["probabilities"] == pytest.approx(
        single.json()["probabilities"], abs=1e-4
    )


@pytest.mark.parametrize(
    ("name", "kwargs", "status"),
    [
        ("non-image", {"files": {"image": ("x.png", b"this is not an image", "image/png")}}, 400),
        ("empty file", {"files": {"image": ("x.png", b"", "image/png")}}, 400),
        (
            "truncated",
            {"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\n\x00\x00", "image/png")}},
            400,
        ),
        ("bomb", {"files": {"image": ("b.png", bomb_png(), "image/png")}}, 413),
        (
            "oversize",
            {"files": {"image": ("h.png", b"\x00" * (10 * 1024 * 1024 + 10), "image/png")}},
            413,
        ),
        ("wrong field", {"files": {"file": ("x.png", b"x", "image/png")}}, 400),
        ("no body", {}, 400),
        ("json body", {"json": {"image": "abc"}}, 415),
        ("raw image body", {"content": b"x", "headers": {"content-type": "image/png"}}, 415),
        (
            "option in the URL",
            {"files": {"image": ("x.png", b"x", "image/png")}, "params": {"noise": "0.1"}},
            400,
        ),
        (
            "misspelt option",
            {"files": {"image": ("x.png", b"x", "image/png")}, "data": {"nosie": "0.1"}},
            400,
        ),
        (
            "two images",
            {
                "files": [
                    ("image", ("a.png", b"x", "image/png")),
                    ("image", ("b.png", b"x", "image/png")),
                ]
            },
            400,
        ),
        (
            "bad invert",
            {"files": {"image": ("x.png", b"x", "image/png")}, "data": {"invert": "sideways"}},
            400,
        ),
        (
            "bad noise",
            {"files": {"image": ("x.png", b"x", "image/png")}, "data": {"noise": "7"}},
            400,
        ),
        (
            "bad target",
            {"files": {"image": ("x.png", b"x", "image/png")}, "data": {"target": "12"}},
            400,
        ),
    ],
)
def test_bad_input_gets_4xx_json_and_server_survives(client, digits, name, kwargs, status):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, (name, r.text)
    assert r.json()["error"], name
    ok = client.post("/predict", files={"image": ("d.png", png_bytes(digits[0][0]), "image/png")})
    assert ok.status_code == 200


def test_a_blank_image_is_answered_not_a_digit(client):
    blank = png_bytes(np.zeros((28, 28), np.uint8))
    r = client.post("/predict", files={"image": ("blank.png", blank, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        body["is_digit"] is False
        and body["digit_score"] < client.get("/model").json()["digit_threshold"]
    )
    assert len(body["probabilities"]) == 10


def test_health_openapi_and_model_card(client):
    # /metrics needs the real server's Prometheus setup: covered by the e2e test.
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    paths = client.get("/docs.json").json()["paths"]
    assert {"/predict", "/explain", "/feature_maps", "/predict_batch"} <= set(paths)
    card = client.get("/model").json()
    assert card["source"].startswith(("shipped", "bentoml model store"))


def test_monitor_reports_the_served_models_traffic(client, digits):
    images, _ = digits
    before = client.get("/monitor").json()
    for i in range(3):
        client.post("/predict", files={"image": ("d.png", png_bytes(images[i]), "image/png")})
    r = client.get("/monitor", params={"hours": 1, "bucket_minutes": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    served = next(v for v in body["versions"] if v["serving"])
    previous = next(v for v in before["versions"] if v["serving"])
    assert served["predictions"] >= previous["predictions"] + 3
    assert served["buckets"] and body["bucket_minutes"] == 5
    assert body["headline"].startswith(f"v{body['model']['version']}: ")
    assert body["reference"]["estimated_accuracy"] > 0.95
    # A window too long for its buckets is not refused: the buckets are widened.
    assert (
        client.get("/monitor", params={"hours": 2000, "bucket_minutes": 1}).json()["bucket_minutes"]
        == 60
    )
    for bad in ({"hours": 0}, {"hours": "soon"}, {"bucket_minutes": 0}):
        r = client.get("/monitor", params=bad)
        assert r.status_code == 400 and "error" in r.json(), r.text
