"""The BentoML service: HTTP routes wired to digitops functions.

    bentoml serve serving.service:DigitService       # http://127.0.0.1:3000

Configuration (environment):
    DIGITOPS_MODEL_TAG          BentoML store tag to serve (default: latest `digit-cnn`,
                                else the shipped model)
    DIGITOPS_MAX_UPLOAD_BYTES   upload size limit (default 10 MB)
    DIGITOPS_PREDICTIONS_DB     prediction log + feedback queue (default var/predictions.db)
    DIGITOPS_MAX_PREDICTIONS    retention cap of unlabelled predictions (default 100000)
    DIGITOPS_FEEDBACK_PER_MINUTE  feedback rate limit per client (default 60)
    DIGITOPS_ADMIN_TOKEN        enables POST /admin/reload (Authorization: Bearer <token>)
    DIGITOPS_WORKERS            worker processes (default 1); each batches its own requests,
                                and the feedback rate limit applies per worker
    DIGITOPS_MLFLOW_UI          MLflow UI base URL, linked from the web page
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import anyio
import bentoml
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from digitops import api, explain
from digitops.batching import GreedyBatcher
from digitops.preprocess import (
    DEFAULT_MAX_BYTES,
    ImageError,
    Preprocessed,
    add_noise,
    normalize,
    preprocess,
)
from digitops.store import STRATEGIES, PredictionStore, StoreError, UnknownPrediction

# BentoML configures handlers for its own logger tree only; a child of it reaches the server log.
log = logging.getLogger("bentoml.digitops")

STATIC = Path(__file__).with_name("static")

# FastAPI's own docs pages load Swagger from a CDN; /docs serves a local copy instead.
app = FastAPI(title="digitops", docs_url=None, redoc_url=None, openapi_url=None)
app.mount("/static", StaticFiles(directory=STATIC), name="static")

# For callers of the `classify` API, max latency is BentoML's dispatcher's budget before it sheds
# load (503). The HTTP routes batch with GreedyBatcher (see digitops.batching for why).
BATCH_MAX_SIZE = 64
BATCH_MAX_LATENCY_MS = 1000
# Worker processes share the cores; each gets its share for torch and for the CPU-bound steps of
# a request. More than one pays on many cores; on few, one worker with batching does as well,
# and the workers share one listening socket, so a client's kept-alive connections are not
# spread evenly among them.
WORKERS = api.env_int("DIGITOPS_WORKERS", 1)
CORES_PER_WORKER = max(1, (os.cpu_count() or 1) // WORKERS)
# A reload is announced here to the other workers of the same server (they share its parent).
RELOAD_NOTICE = Path(tempfile.gettempdir()) / f"digitops-reload-{os.getppid()}.json"
RELOAD_POLL_SECONDS = 1.0
IMAGE_FIELD = "image"
BATCH_FIELD = "images"
MAX_BATCH_IMAGES = 256
SEND_INSTEAD = (
    f"send a PNG/JPEG/WebP/BMP/GIF as multipart form field '{IMAGE_FIELD}', "
    "or as the raw request body with an image/* Content-Type"
)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


@app.exception_handler(ImageError)
async def bad_input(request: Request, exc: ImageError) -> JSONResponse:
    return error(exc.status, str(exc))


@app.exception_handler(RequestValidationError)
async def bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()
    )
    return error(400, f"invalid request parameters: {problems}")


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = "no such endpoint; see /docs" if exc.status_code == 404 else str(exc.detail)
    return error(exc.status_code, message)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes `limit` (never buffered whole)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ImageError(f"upload of {int(declared)} bytes is over the {limit}-byte limit", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ImageError(f"upload is over the {limit}-byte limit", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request: Request, limit: int, field: str) -> tuple[list[bytes], dict]:
    """Image bytes and string options from multipart form fields, or a raw body + query."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options = dict(request.query_params)
    if content_type == "multipart/form-data":
        declared = request.headers.get("content-length")
        # Multipart overhead is small; the form parser would spool a huge upload to disk first.
        if (
            declared
            and declared.isdigit()
            and int(declared) > limit * (MAX_BATCH_IMAGES if field == BATCH_FIELD else 1) + 65536
        ):
            raise ImageError(f"upload of {int(declared)} bytes is over the {limit}-byte limit", 413)
        try:
            form = await request.form(max_files=MAX_BATCH_IMAGES, max_fields=64)
        except Exception as err:
            raise ImageError(f"malformed multipart body: {err}") from None
        files = [
            v
            for k, v in form.multi_items()
            if k in (field, IMAGE_FIELD) and isinstance(v, UploadFile)
        ]
        options.update({k: v for k, v in form.multi_items() if isinstance(v, str)})
        if not files:
            got = sorted({k for k, _ in form.multi_items()}) or "no fields"
            raise ImageError(f"no file in form field '{field}' (got {got}); {SEND_INSTEAD}")
        if field == IMAGE_FIELD and len(files) > 1:
            raise ImageError(
                f"{len(files)} files sent; send one image here, or many to /predict_batch"
            )
        blobs = []
        for upload in files:
            data = await upload.read(limit + 1)
            if len(data) > limit:
                raise ImageError(f"upload '{upload.filename}' is over the {limit}-byte limit", 413)
            blobs.append(data)
        return blobs, options
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [await read_body(request, limit)], options
    if not content_type and not request.headers.get("content-length", "").strip("0"):
        raise ImageError(f"empty request; {SEND_INSTEAD}")
    raise ImageError(f"unsupported Content-Type {content_type or '(none)'!r}; {SEND_INSTEAD}", 415)


@bentoml.service(
    name="digitops",
    http={"host": "127.0.0.1", "port": 3000},
    traffic={"timeout": 30, "max_concurrency": 512},
    workers=WORKERS,
)
@bentoml.asgi_app(app, path="/")
class DigitService:
    def __init__(self) -> None:
        torch.set_num_threads(CORES_PER_WORKER)
        # Reloads announced from now on are followed, including any during the load below.
        self._started_ns = time.time_ns()
        self.served = api.load_served_model(os.environ.get("DIGITOPS_MODEL_TAG"))
        self.max_bytes = api.env_int("DIGITOPS_MAX_UPLOAD_BYTES", DEFAULT_MAX_BYTES)
        try:
            self.store: PredictionStore | None = PredictionStore(
                os.environ.get("DIGITOPS_PREDICTIONS_DB", "var/predictions.db"),
                max_predictions=api.env_int("DIGITOPS_MAX_PREDICTIONS", 100_000),
            )
        except StoreError as err:  # predictions must go on without their log
            self.store = None
            log.warning("%s; predictions will not be logged and feedback is disabled", err)
        # CPU-bound steps (decoding, filtering, Grad-CAM) get a thread per core: more would only
        # contend for the cores, and each decode in flight holds up to a full-size image.
        self.cpu_limiter = anyio.CapacityLimiter(CORES_PER_WORKER)
        self.feedback_limiter = api.RateLimiter(api.env_int("DIGITOPS_FEEDBACK_PER_MINUTE", 60))
        # Probabilities for pixels [N, 28, 28]; concurrent requests share batches. In process:
        # no round trip through the service's HTTP client, which cost more than the forward pass.
        self._probabilities = GreedyBatcher(self.classify.local, BATCH_MAX_SIZE)
        if WORKERS > 1:
            follower = threading.Thread(target=self._follow_reloads, name="reload", daemon=True)
            follower.start()
        card = self.served.card()
        log.info(
            "serving model from %s (version %s, test accuracy %s)",
            self.served.source,
            card["version"],
            card["test_accuracy"],
        )

    @bentoml.api(batchable=True, max_batch_size=BATCH_MAX_SIZE, max_latency_ms=BATCH_MAX_LATENCY_MS)
    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities [N, 10] for uint8 MNIST-style inputs [N, 28, 28]; adaptively batched."""
        x = np.asarray(pixels)
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise bentoml.exceptions.InvalidArgument(
                f"pixels must be [N, 28, 28], got {list(x.shape)}"
            )
        with torch.inference_mode():
            logits = self.served.model(normalize(torch.from_numpy(x.astype(np.uint8))))
            return torch.softmax(logits, dim=1).numpy()

    async def _prepare(self, data: bytes, options: api.Options) -> tuple[Preprocessed, bytes]:
        """The model's 28x28 input (with the requested noise) and its PNG, in one trip off the
        event loop: decoding and filtering are CPU work."""

        def work():
            prepared = preprocess(data, invert=options.invert)
            if options.noise > 0:
                noisy = add_noise(prepared.pixels, options.noise, options.seed)
                prepared = Preprocessed(pixels=noisy, inverted=prepared.inverted)
            return prepared, explain.png(prepared.pixels)

        return await anyio.to_thread.run_sync(work, limiter=self.cpu_limiter)

    async def _read_one(self, request: Request) -> tuple[bytes, api.Options, Preprocessed, bytes]:
        """The single image of a request, its options, and the 28x28 input made from it (+ PNG)."""
        (data,), raw = await read_images(request, self.max_bytes, IMAGE_FIELD)
        options = api.parse_options(raw)
        return data, options, *await self._prepare(data, options)

    @app.post("/predict")
    async def predict(self, request: Request):
        """Digit, confidence, all ten probabilities and the 28x28 input the model saw."""
        data, options, prepared, input_png = await self._read_one(request)
        probabilities = (await self._probabilities(prepared.pixels[None]))[0]
        return JSONResponse(await self._reply(prepared, input_png, probabilities, data, options))

    @app.post("/predict_batch")
    async def predict_batch(self, request: Request):
        """Many images in one call (form field 'images', repeated): one result each, in order."""
        blobs, raw = await read_images(request, self.max_bytes, BATCH_FIELD)
        options = api.parse_options(raw)
        results: list[dict | None] = [None] * len(blobs)
        ready: list[tuple[int, Preprocessed, bytes]] = []
        for i, data in enumerate(blobs):
            try:
                ready.append((i, *await self._prepare(data, options)))
            except ImageError as err:  # one bad image must not fail its neighbours
                results[i] = {"error": str(err), "status": err.status}
        if ready:
            probabilities = await self._probabilities(np.stack([p.pixels for _, p, _ in ready]))
            for (i, prepared, png), probs in zip(ready, probabilities, strict=True):
                results[i] = await self._reply(prepared, png, probs, blobs[i], options)
        return JSONResponse({"results": results, "count": len(results)})

    async def _reply(
        self,
        prepared: Preprocessed,
        input_png: bytes,
        probabilities: np.ndarray,
        original: bytes,
        options: api.Options,
    ) -> dict:
        """The prediction's JSON, recorded for feedback and review unless the caller opted out.

        A broken store never fails a prediction: the reply then says `logged: false`.
        """
        payload = api.prediction_payload(
            probabilities, input_png, prepared.inverted, self.served, api.new_prediction_id()
        )
        if not options.log:
            payload["logged"] = False
            return payload

        def write():
            if self.store is None:
                raise StoreError("no prediction store")
            self.store.log_prediction(
                payload["prediction_id"],
                input_png,
                probabilities,
                prepared.inverted,
                payload["model"]["version"],
                original,
                options.noise,
            )

        try:
            await anyio.to_thread.run_sync(write)
        except StoreError as err:
            payload["logged"] = False
            log.warning("prediction not logged: %s", err)
        return payload

    @app.post("/explain")
    async def explain(self, request: Request):
        """Grad-CAM of the last conv block for the predicted (or `target`) class."""
        _, options, prepared, input_png = await self._read_one(request)

        def work():
            cam, logits = explain.grad_cam(self.served.model, prepared.tensor(), options.target)
            return (
                cam,
                torch.softmax(logits, dim=0).numpy(),
                explain.overlay_png(prepared.pixels, cam),
            )

        cam, probabilities, overlay = await anyio.to_thread.run_sync(work, limiter=self.cpu_limiter)
        payload = api.prediction_payload(
            probabilities,
            input_png,
            prepared.inverted,
            self.served,
            prediction_id=None,  # explanations are not logged: feedback goes through /predict
        )
        target = options.target if options.target is not None else payload["digit"]
        return JSONResponse(
            {
                **payload,
                "target": target,
                "layer": "conv3",
                "cam": np.round(cam, 4).tolist(),
                "overlay_png": api.b64(overlay),
            }
        )

    @app.post("/feature_maps")
    async def feature_maps(self, request: Request):
        """Every channel of one conv block (`layer`=conv1..conv3) as a PNG grid."""
        _, options, prepared, _ = await self._read_one(request)

        def work():
            maps = explain.feature_maps(self.served.model, prepared.tensor(), options.layer)
            return maps, explain.grid_png(maps)

        maps, grid = await anyio.to_thread.run_sync(work, limiter=self.cpu_limiter)
        reply = {
            "layer": options.layer,
            "channels": int(maps.shape[0]),
            "size": list(maps.shape[1:]),
            "grid_png": api.b64(grid),
            "inverted": prepared.inverted,
        }
        if options.arrays:
            reply["maps"] = np.round(maps, 4).tolist()
        return reply

    @app.post("/feedback")
    async def feedback(self, request: Request):
        """Say what the digit really was: JSON {prediction_id, label 0-9, comment?}, or an image
        (multipart field 'image', or a raw image body) with `label`. Idempotent."""
        client = request.client.host if request.client else "unknown"
        if not self.feedback_limiter.allow(client):
            raise ImageError("too much feedback from this client; wait a minute and retry", 429)
        if self.store is None:
            raise ImageError(
                "feedback is unavailable: the prediction store could not be opened "
                "(see the server log)",
                503,
            )
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("multipart/form-data", "image/")):
            # A labelled image that never went through /predict: predict (and log) it first,
            # so it is stored and validated exactly like every other correction.
            (data,), raw = await read_images(request, self.max_bytes, IMAGE_FIELD)
            api.parse_feedback({**raw, "prediction_id": "pending"})  # bad label: 400 first
            options = api.parse_options(raw)
            prepared, input_png = await self._prepare(data, options)
            probabilities = (await self._probabilities(prepared.pixels[None]))[0]
            logged = await self._reply(prepared, input_png, probabilities, data, options)
            body = {**raw, "prediction_id": logged["prediction_id"]}
        else:
            try:
                body = await request.json()
            except Exception:
                raise ImageError(
                    'malformed JSON; send {"prediction_id": "...", "label": 0-9}'
                ) from None
        prediction_id, label, comment = api.parse_feedback(body)
        try:
            result = await anyio.to_thread.run_sync(
                lambda: self.store.add_feedback(prediction_id, label, comment, client)
            )
        except UnknownPrediction:
            raise ImageError(
                f"unknown prediction_id {prediction_id!r}; use the id a "
                "/predict reply gave (predictions are kept for a limited time)",
                404,
            ) from None
        except StoreError as err:
            raise ImageError(
                f"feedback cannot be stored right now ({err}); please retry later", 503
            ) from None
        reply = {
            "feedback_id": result.feedback_id,
            "prediction_id": result.prediction_id,
            "label": result.label,
            "status": result.status,
            "replaced": result.replaced,
        }
        if result.replaced:
            reply["previous_label"] = result.previous_label
        return reply

    @app.get("/review_queue")
    async def review_queue(self, k: int = 20, strategy: str = "entropy"):
        """The unlabelled predictions the model is least sure of: label these first."""
        if self.store is None:
            raise ImageError("the review queue is unavailable: no prediction store", 503)
        if strategy not in STRATEGIES:
            raise ImageError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if not 1 <= k <= 200:
            raise ImageError(f"k must be in [1, 200], got {k}")
        items = await anyio.to_thread.run_sync(lambda: self.store.review_queue(k, strategy))
        for item in items:
            item["input_png"] = api.b64(item["input_png"])
        return {"strategy": strategy, "k": k, "items": items}

    @app.get("/feedback/stats")
    async def feedback_stats(self):
        """Counts of feedback by state (pending / ingested / rejected) and logged predictions."""
        if self.store is None:
            raise ImageError("feedback stats are unavailable: no prediction store", 503)
        return await anyio.to_thread.run_sync(self.store.stats)

    @app.post("/admin/reload")
    async def reload(self, request: Request):
        """Switch to the newest model in the BentoML store without a restart (token required)."""
        token = os.environ.get("DIGITOPS_ADMIN_TOKEN")
        if not token:
            raise ImageError("reload is disabled: set DIGITOPS_ADMIN_TOKEN on the server", 403)
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {token}".encode()):
            raise ImageError("missing or wrong admin token (Authorization: Bearer <token>)", 401)
        try:
            # No fallback: a failed lookup must never swap the champion for the shipped model.
            served = await anyio.to_thread.run_sync(
                lambda: api.load_served_model(os.environ.get("DIGITOPS_MODEL_TAG"), fallback=False)
            )
        except RuntimeError as err:
            raise ImageError(
                f"reload failed, still serving {self.served.source}: {err}", 503
            ) from None
        previous, self.served = self.served.card(), served  # one reference swap: no gap
        log.info("reloaded: now serving %s (was %s)", served.source, previous["source"])
        if WORKERS > 1:  # the others switch to the same store entry within RELOAD_POLL_SECONDS
            notice = RELOAD_NOTICE.with_suffix(f".{os.getpid()}.tmp")
            notice.write_text(json.dumps({"tag": served.store_tag, "pid": os.getpid()}))
            notice.replace(RELOAD_NOTICE)  # atomic: followers never read half a notice
        return {"previous": previous, "current": served.card(), "workers": WORKERS}

    def _follow_reloads(self) -> None:
        """Switch to the model another worker of this server reloaded (runs in its own thread)."""
        seen = self._started_ns  # older notices are from an earlier server with the same parent
        while True:
            time.sleep(RELOAD_POLL_SECONDS)
            try:
                changed = RELOAD_NOTICE.stat().st_mtime_ns
                if changed <= seen:
                    continue
                seen = changed
                tag = json.loads(RELOAD_NOTICE.read_text())["tag"]
                if tag != self.served.store_tag:
                    self.served = api.load_served_model(tag, fallback=False)
                    log.info("followed a reload: now serving %s", self.served.source)
            except FileNotFoundError:
                continue
            except Exception as err:  # keep serving the current model, and keep following
                log.warning("could not follow a reload: %s", err)

    @app.get("/", include_in_schema=False)
    async def index(self):
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        return FileResponse(STATIC / "docs.html")

    @app.get("/model")
    async def model_card(self):
        """Which model is serving: version, accuracy, training date, data version, source."""
        return self.served.card()
