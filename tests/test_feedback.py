"""Feedback capture over HTTP: prediction log, labels, review queue, limits and faults."""

import concurrent.futures

import httpx
import numpy as np
import pytest

from digitops.data import mnist
from digitops.inference.contract import RateLimiter
from tests.servers import bentoml_serve
from tests.test_service import png_bytes


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.slow, pytest.mark.e2e])],
)
def client(request, tmp_path_factory):
    """The service on each store engine: in process on SQLite (the session's client), and a
    `bentoml serve` whose store is a database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        yield request.getfixturevalue("asgi_client")
        return
    database = request.getfixturevalue("postgres").create_database("feedback_http")
    workdir = tmp_path_factory.mktemp("serve-pg")
    settings = {
        "DIGITOPS_PREDICTIONS_DB": database,
        "DIGITOPS_FEEDBACK_PER_MINUTE": "100000",
    }
    with bentoml_serve(workdir, **settings) as (base, _), httpx.Client(base_url=base) as c:
        yield c


@pytest.fixture(scope="module")
def digits(mnist_dir):
    return mnist.load(mnist_dir, "t10k")


def predict(client, pixels) -> dict:
    r = client.post("/predict", files={"image": ("d.png", png_bytes(pixels), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def test_feedback_is_stored_idempotent_and_replaceable(client, digits):
    images, labels = digits
    before = client.get("/feedback/stats").json()
    pid = predict(client, images[0])["prediction_id"]
    first = client.post("/feedback", json={"prediction_id": pid, "label": 7}).json()
    assert first["status"] == "pending" and first["replaced"] is False
    again = client.post("/feedback", json={"prediction_id": pid, "label": 7}).json()
    assert again["feedback_id"] == first["feedback_id"] and again["replaced"] is False
    changed = client.post(
        "/feedback", json={"prediction_id": pid, "label": 1, "comment": "it is a one"}
    ).json()
    assert changed["replaced"] is True and changed["previous_label"] == 7
    assert client.get("/feedback/stats").json()["pending"] == before["pending"] + 1


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"prediction_id": "nope", "label": 3}, 404, "unknown prediction_id"),
        ({"prediction_id": "x", "label": 12}, 400, "label"),
        ({"prediction_id": "x", "label": "seven"}, 400, "label"),
        ({"label": 3}, 400, "prediction_id"),
        ("not json at all", 400, "malformed JSON"),
    ],
)
def test_bad_feedback_is_refused_clearly(client, body, status, words):
    if isinstance(body, str):
        r = client.post("/feedback", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/feedback", json=body)
    assert r.status_code == status and words in r.json()["error"]


def test_feedback_right_after_predicting_finds_the_prediction_on_any_worker(client, digits):
    """Each request on a new connection, so it may reach either worker: a prediction answered
    by one is labelled through the other as soon as its reply is in."""
    images, labels = digits
    fresh = {"Connection": "close"}
    for i in range(20, 26):  # few: the in-process server keeps the default rate limit
        files = {"image": ("d.png", png_bytes(images[i]), "image/png")}
        prediction = client.post("/predict", files=files, headers=fresh).json()
        body = {"prediction_id": prediction["prediction_id"], "label": int(labels[i])}
        reply = client.post("/feedback", json=body, headers=fresh)
        assert reply.status_code == 200, reply.text


def test_review_queue_is_least_certain_first_and_excludes_labelled(client, digits):
    images, _ = digits
    ids = [predict(client, images[i])["prediction_id"] for i in range(6)]
    client.post("/feedback", json={"prediction_id": ids[0], "label": 7})
    for strategy, key, descending in (
        ("entropy", "entropy", True),
        ("margin", "margin", False),
        ("least_confidence", "confidence", False),
    ):
        items = client.get(f"/review_queue?k=200&strategy={strategy}").json()["items"]
        queued = {i["prediction_id"] for i in items}
        assert ids[0] not in queued and set(ids[1:]) <= queued
        values = [i[key] for i in items]
        assert values == sorted(values, reverse=descending), strategy
        assert items[0]["input_png"]
    assert client.get("/review_queue?strategy=random").status_code == 400
    assert client.get("/review_queue?k=0").status_code == 400


def test_not_a_digit_has_its_own_queue_and_label(client, digits):
    images, _ = digits
    blank, digit = predict(client, np.zeros((28, 28), np.uint8)), predict(client, images[3])
    assert blank["is_digit"] is False and digit["is_digit"] is True

    def queued(queue: str) -> set[str]:
        reply = client.get(f"/review_queue?k=200&queue={queue}").json()
        assert reply["queue"] == queue
        return {item["prediction_id"] for item in reply["items"]}

    assert blank["prediction_id"] in queued("not-a-digit") - queued("digits")
    assert digit["prediction_id"] in queued("digits") - queued("not-a-digit")
    body = {"prediction_id": blank["prediction_id"], "label": "not-a-digit"}
    saved = client.post("/feedback", json=body).json()
    assert saved["label"] == "not-a-digit" and saved["status"] == "pending"
    changed = client.post("/feedback", json={**body, "label": 4}).json()
    assert changed["replaced"] and changed["previous_label"] == "not-a-digit"
    for wrong in ("letter", 10, -1):
        r = client.post("/feedback", json={**body, "label": wrong})
        assert r.status_code == 400 and "label" in r.json()["error"], wrong
    assert client.get("/review_queue?queue=letters").status_code == 400


def test_concurrent_feedback_from_many_clients_loses_nothing(client, digits):
    images, _ = digits
    before = client.get("/feedback/stats").json()["pending"]
    ids = [predict(client, images[i % 50])["prediction_id"] for i in range(40)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda pid: (
                    client.post("/feedback", json={"prediction_id": pid, "label": 3}).status_code
                ),
                ids,
            )
        )
    assert codes == [200] * 40
    assert client.get("/feedback/stats").json()["pending"] == before + 40


def test_rate_limiter_window_slides():
    limiter = RateLimiter(2, window=60)
    assert limiter.allow("a", 0) and limiter.allow("a", 1) and not limiter.allow("a", 2)
    assert limiter.allow("b", 2), "limits are per client"
    assert limiter.allow("a", 61)


def test_previews_are_not_logged_and_noisy_inputs_stay_out_of_the_queue(client, digits):
    images, _ = digits
    files = {"image": ("d.png", png_bytes(images[7]), "image/png")}
    preview = client.post("/predict", files=files, data={"log": "false"}).json()
    assert preview["logged"] is False
    r = client.post("/feedback", json={"prediction_id": preview["prediction_id"], "label": 9})
    assert r.status_code == 404
    noisy = client.post("/predict", files=files, data={"noise": "0.6", "seed": "1"}).json()
    queued = {i["prediction_id"] for i in client.get("/review_queue?k=200").json()["items"]}
    assert noisy["prediction_id"] not in queued
    # ...but a correction of a noisy input is still a real label.
    r = client.post("/feedback", json={"prediction_id": noisy["prediction_id"], "label": 9})
    assert r.status_code == 200


def test_feedback_with_an_image_and_label(client, digits):
    images, labels = digits
    before = client.get("/feedback/stats").json()
    files = {"image": ("d.png", png_bytes(images[9]), "image/png")}
    r = client.post("/feedback", files=files, data={"label": str(labels[9]), "comment": "mine"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending" and r.json()["label"] == int(labels[9])
    after = client.get("/feedback/stats").json()
    assert after["pending"] == before["pending"] + 1
    assert after["predictions"] == before["predictions"] + 1
    bad = client.post("/feedback", files=files, data={"label": "11"})
    assert bad.status_code == 400 and "label" in bad.json()["error"]
    assert client.get("/feedback/stats").json()["predictions"] == after["predictions"]
