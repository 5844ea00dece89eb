"""The BentoML service: routes and wiring. The work is in `digitops.inference`; settings are
`DIGITOPS_*` environment variables (README.md, "Settings").

    bentoml serve serving.service:DigitService       # http://127.0.0.1:3000

A prediction's way: route (the form, parsed and checked by FastAPI) -> the prediction thread
(preprocess, forward pass, journal) -> reply.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI, File, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BeforeValidator

from digitops import __version__
from digitops.files import png
from digitops.inference import contract, explain, monitor
from digitops.inference.errors import RequestError, install_error_handlers
from digitops.inference.journal import open_log
from digitops.inference.metrics import ServiceMetrics
from digitops.inference.predictor import Job, PredictionThread, b64
from digitops.inference.preprocess import Options, prepare
from digitops.inference.reload import ReloadNotices, newest_model, registry_follower, starting_model
from digitops.inference.served import ModelUnavailable, ServedModel, load_served_model
from digitops.inference.settings import Settings, SettingsError, sampled_share
from digitops.inference.store import StoreError, UnknownPrediction

# BentoML configures handlers for its own logger tree only; a child of it reaches the server log.
log = logging.getLogger("bentoml.digitops")

try:
    SETTINGS = Settings.from_env()
except SettingsError as err:  # one line naming the variable, not a traceback
    sys.exit(f"digitops: {err}")
STATIC = Path(__file__).with_name("static")
MAX_BYTES = SETTINGS.max_upload_bytes
# Worker processes share the cores; each gets its share for Grad-CAM and feature maps.
CORES_PER_WORKER = max(1, (os.cpu_count() or 1) // SETTINGS.workers)

# FastAPI's own docs pages load Swagger from a CDN; /docs serves a local copy instead.
app = FastAPI(
    title="digitops", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
)
app.mount("/static", StaticFiles(directory=STATIC), name="static")
install_error_handlers(app)


async def current_service():
    """BentoML hands routes their `self` through a dependency on a plain function, which FastAPI
    calls in its thread pool: a thread hand-off per request. Declared async, it runs on the loop."""
    return bentoml.get_current_service()


app.dependency_overrides[bentoml.get_current_service] = current_service


@bentoml.service(
    name="digitops",
    http={"host": "127.0.0.1", "port": 3000},
    traffic={"timeout": 30, "max_concurrency": 512},
    logging={"access": {"enabled": SETTINGS.access_log}},
    # An excluded URL skips the whole middleware; "." matches every one.
    tracing={} if SETTINGS.tracing else {"excluded_urls": ["."]},
    workers=SETTINGS.workers,
)
@bentoml.asgi_app(app, path="/")
class DigitService:
    def __init__(self) -> None:
        # Reloads announced from now on are followed, including any during the load below.
        self.reloads = ReloadNotices()
        self.metrics = ServiceMetrics()
        self.registry = registry_follower(SETTINGS)
        self._serve(starting_model(SETTINGS, self.registry))
        self.journal = open_log(SETTINGS, self.metrics.store_failures.inc)
        self.store = self.journal.store if self.journal else None
        self.predictions = PredictionThread(self.journal, self.metrics, MAX_BYTES)
        # Grad-CAM and feature maps get a thread per core: more would only contend for them.
        self.cpu_limiter = anyio.CapacityLimiter(CORES_PER_WORKER)
        self.feedback_limiter = contract.RateLimiter(SETTINGS.feedback_per_minute)
        thresholds = (SETTINGS.monitor_drift_score, SETTINGS.monitor_accuracy_drop)
        self.monitor_report = lambda hours=24, bucket_minutes=60: monitor.report(
            self.store, self.served, hours, bucket_minutes, *thresholds
        )
        if self.store is not None:  # the Monitor's gauges and warnings, off the request path
            monitor.Watch(self.monitor_report, self.metrics, SETTINGS.monitor_seconds)
        if self.registry is not None:  # each worker follows on its own: no notices needed
            self.registry.follow(
                lambda: self.served, lambda m: self._serve(m, "followed the registry")
            )
        elif SETTINGS.workers > 1:
            self.reloads.follow(lambda: self.served.store_tag, self._switch_to)
        # First calls into each library are slow: made here, they land on no client's request.
        stroke = np.pad(np.full((16, 2), 255, np.uint8), ((6, 6), (13, 13)))  # a "1"
        prepared = prepare(png(stroke, scale=10), Options())
        self.served.answers(prepared.pixels[None])
        explain.explanation(self.served, prepared, None)
        if not SETTINGS.tracing and sampled_share() > 0:
            log.warning("tracing.sample_rate is set, but DIGITOPS_TRACING is off: nothing traced")
        accuracy = self.served.card()["test_accuracy"]
        log.info("serving model from %s (test accuracy %s)", self.served.source, accuracy)
        # What is loaded by now (torch, BentoML, the model) lives as long as the worker. Out of
        # the collector's sight, a full collection no longer walks it all, which otherwise
        # stalls a request now and then.
        gc.collect()
        gc.freeze()

    @bentoml.on_shutdown
    def close_store(self) -> None:
        if self.journal is not None:
            self.journal.close()  # and its store

    @bentoml.on_deployment
    def check_model() -> None:
        """Runs once, before any worker starts: if the model this server would serve does not
        load, the server stops with one line saying why (workers would fail and restart
        forever)."""
        try:
            starting_model(SETTINGS, registry_follower(SETTINGS))
        except ModelUnavailable as err:
            sys.exit(f"digitops: cannot start: {err}")

    def _serve(self, served: ServedModel, why: str = "started") -> None:
        """Switch to `served`: one reference swap, so requests in flight finish on the old one."""
        if why != "started":
            log.info("%s: now serving %s (was %s)", why, served.source, self.served.source)
        self.served = served
        identity = served.identity()
        self.metrics.serving(identity["name"], identity["version"], served.source)

    def _switch_to(self, store_tag: str) -> None:
        """Serve the store entry another worker of this server reloaded."""
        self._serve(load_served_model(store_tag, None, fallback=False), "followed a reload")

    @bentoml.api(batchable=True, max_batch_size=contract.MAX_CLASSIFY_IMAGES, max_latency_ms=1000)
    def classify(
        self, pixels: Annotated[np.ndarray, BeforeValidator(contract.pixel_array)]
    ) -> np.ndarray:
        """Calibrated probabilities [N, 10] for MNIST-style inputs [N, 28, 28] of 0-255, white
        ink on black.

        Adaptively batched. The shape is checked per request, before batching, so a bad call
        gets a 400 of its own and never fails its batch-mates.
        """
        return self.served.answers(pixels.astype(np.uint8))[0]

    @app.post("/predict", **contract.upload_route(contract.PREDICT))
    async def predict(self, form: Annotated[contract.PredictForm, File()]):
        """Digit, confidence, all ten probabilities and the 28x28 input the model saw."""
        job = Job([await form.image.read()], form.options(), self.served, log=form.log)
        (reply,) = await self.predictions.run(job)
        return JSONResponse(reply)  # plain JSON types already: nothing for FastAPI to encode

    @app.post(
        "/predict_batch",
        **contract.upload_route(contract.PREDICT_BATCH, contract.MAX_BATCH_IMAGES),
    )
    async def predict_batch(self, form: Annotated[contract.BatchForm, File()]):
        """Many images in one call (form field 'images', repeated): one result each, in order."""
        images = [await image.read() for image in form.images]
        job = Job(images, form.options(), self.served, log=form.log, alone=False)
        results = await self.predictions.run(job)
        return JSONResponse({"results": results, "count": len(results)})

    @app.post("/explain", **contract.upload_route(contract.EXPLAIN))
    async def explain(self, form: Annotated[contract.ExplainForm, File()]):
        """Grad-CAM of the last conv block for the predicted (or `target`) class."""
        data, options, served = await form.image.read(), form.options(), self.served

        def work() -> dict:
            return explain.explanation(served, prepare(data, options, MAX_BYTES), form.target)

        return await anyio.to_thread.run_sync(work, limiter=self.cpu_limiter)

    @app.post("/feature_maps", **contract.upload_route(contract.FEATURE_MAPS))
    async def feature_maps(self, form: Annotated[contract.FeatureMapsForm, File()]):
        """Every channel of one conv block (`layer`=conv1..conv3) as a PNG grid."""
        data, options, served = await form.image.read(), form.options(), self.served

        def work() -> dict:
            prepared = prepare(data, options, MAX_BYTES)
            return explain.feature_map_reply(served, prepared, form.layer, form.arrays)

        return await anyio.to_thread.run_sync(work, limiter=self.cpu_limiter)

    @app.post("/feedback", **contract.FEEDBACK)
    async def feedback(self, request: Request):
        """Say what the digit really was: JSON {prediction_id, label 0-9 or "not-a-digit",
        comment?}, or an image (multipart field 'image') with `label`. Idempotent."""
        client = request.client.host if request.client else "unknown"
        if not self.feedback_limiter.allow(client):
            raise RequestError("too much feedback from this client; wait a minute and retry", 429)
        if self.store is None:
            raise RequestError("feedback is unavailable: no prediction store (see its log)", 503)
        body = await contract.feedback_body(request)
        if isinstance(body, contract.LabelledImage):  # never predicted: predict (and log) it first
            job = Job([await body.image.read()], body.options(), self.served)
            (logged,) = await self.predictions.run(job)
            body = contract.FeedbackRequest(
                prediction_id=logged["prediction_id"], label=body.label, comment=body.comment
            )
        label = contract.stored_label(body.label)
        try:
            result = await anyio.to_thread.run_sync(
                self.journal.add_feedback, body.prediction_id, label, body.comment, client
            )
        except UnknownPrediction:
            raise RequestError(
                f"unknown prediction_id {body.prediction_id!r}; use the id a /predict reply "
                "gave (predictions are kept for a limited time)",
                404,
            ) from None
        except StoreError as err:
            self.metrics.store_failures.inc()
            raise RequestError(f"feedback cannot be stored now ({err}); retry later", 503) from None
        self.metrics.feedback.labels(
            result="relabelled" if result["replaced"] else "recorded"
        ).inc()
        return contract.feedback_reply(result)

    @app.get("/review_queue", **contract.REVIEW_QUEUE)
    async def review_queue(
        self,
        k: Annotated[int, Query(ge=1, le=200, description="how many")] = 20,
        strategy: Annotated[contract.Strategy, Query(description="how to rank doubt")] = "entropy",
        queue: Annotated[
            contract.Queue,
            Query(description="digits, or the inputs judged not a digit (most digit-like first)"),
        ] = "digits",
    ):
        """The unlabelled predictions the model is least sure of: label these first."""
        if self.store is None:
            raise RequestError("the review queue is unavailable: no prediction store", 503)
        ranked, digits = self.store.review_queue, queue == "digits"
        items = await anyio.to_thread.run_sync(self.journal.read, ranked, k, strategy, digits)
        for item in items:
            item["input_png"] = b64(item["input_png"])
        return {"queue": queue, "strategy": strategy, "k": k, "items": items}

    @app.get("/monitor", **contract.MONITOR)
    async def monitor(
        self,
        hours: Annotated[float, Query(gt=0, le=24 * 90, description="the window")] = 24,
        bucket_minutes: Annotated[
            int, Query(ge=1, le=24 * 60, description="bucket size; widened to fit 2,000 buckets")
        ] = 60,
    ):
        """How the served model is doing: traffic, estimated and measured accuracy, drift."""
        if self.store is None:
            raise RequestError("the monitor is unavailable: no prediction store", 503)
        try:
            figures = await anyio.to_thread.run_sync(
                self.journal.read, self.monitor_report, hours, bucket_minutes
            )
        except StoreError as err:
            raise RequestError(
                f"the monitor cannot read the store now ({err}); retry", 503
            ) from None
        return JSONResponse(figures)

    @app.get("/feedback/stats", **contract.FEEDBACK_STATS)
    async def feedback_stats(self):
        """Counts of feedback by state (pending / ingested / rejected) and logged predictions."""
        if self.store is None:
            raise RequestError("feedback stats are unavailable: no prediction store", 503)
        return await anyio.to_thread.run_sync(self.journal.read, self.store.stats)

    @app.post("/admin/reload", **contract.RELOAD)
    async def reload(self, request: Request):
        """Switch to the newest model in the BentoML store, or the version holding the registry
        alias when following it, without a restart (token required)."""
        contract.check_admin_token(request.headers.get("authorization", ""), SETTINGS.admin_token)
        try:
            served = await anyio.to_thread.run_sync(newest_model, SETTINGS, self.registry)
        except RuntimeError as err:
            raise RequestError(
                f"reload failed, still serving {self.served.source}: {err}", 503
            ) from None
        previous = self.served.card()
        self._serve(served, "reloaded")
        if SETTINGS.workers > 1 and self.registry is None:
            self.reloads.announce(served.store_tag)  # the others switch within a second
        return {"previous": previous, "current": served.card(), "workers": SETTINGS.workers}

    @app.get("/", include_in_schema=False)
    async def index(self):
        return FileResponse(STATIC / "index.html")

    @app.get(contract.OPENAPI_PATH, include_in_schema=False)
    async def openapi(self):
        """The contract (BentoML's /docs.json is routed here): our routes, bodies and errors."""
        return contract.document(app, self.served.card())

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        return FileResponse(STATIC / "docs.html")

    @app.get("/model", **contract.MODEL)
    async def model_card(self):
        """Which model is serving: version, accuracy, training date, data version, source."""
        return {**self.served.card(), "mlflow_ui_url": SETTINGS.mlflow_ui}


# BentoML answers /docs.json with a document of its own making, which cannot see our bodies.
DigitService.add_asgi_middleware(contract.OwnOpenAPI)
DigitService.add_asgi_middleware(contract.JSONOnly, paths=("/classify",))
ONE_IMAGE = MAX_BYTES + contract.MULTIPART_OVERHEAD
BATCH = MAX_BYTES * contract.MAX_BATCH_IMAGES + contract.MULTIPART_OVERHEAD
UPLOADS = ("/predict", "/explain", "/feature_maps", "/feedback")
DigitService.add_asgi_middleware(
    contract.BodyLimit, limits={**dict.fromkeys(UPLOADS, ONE_IMAGE), "/predict_batch": BATCH}
)
