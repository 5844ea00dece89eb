"""The BentoML service: routes only. The work is in `digitops.inference`; settings are
`DIGITOPS_*` environment variables (README.md, "Settings").

    bentoml serve serving.service:DigitService       # http://127.0.0.1:3000
"""

from __future__ import annotations

import gc
import hmac
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import anyio
import bentoml
import numpy as np
import torch
from bentoml import get_current_service  # looked up once: `bentoml.` is a lazy module
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BeforeValidator

from digitops import __version__
from digitops.files import png
from digitops.inference import contract, explain, http
from digitops.inference.access_log import BufferedAccessLog
from digitops.inference.errors import EmptyImageError, RequestError
from digitops.inference.journal import PredictionLog
from digitops.inference.metrics import ServiceMetrics
from digitops.inference.predictor import PredictionThread, Reply
from digitops.inference.preprocess import Preprocessed, add_noise, is_small_png, preprocess
from digitops.inference.reload import RegistryFollower, ReloadNotices
from digitops.inference.served import ModelUnavailable, ServedModel, load_served_model
from digitops.inference.settings import Settings, SettingsError, journal_directory
from digitops.inference.store import (
    FeedbackResult,
    PredictionStore,
    StoreError,
    UnknownPrediction,
)
from digitops.model import DigitCNN

T = TypeVar("T")

# BentoML configures handlers for its own logger tree only; a child of it reaches the server log.
log = logging.getLogger("bentoml.digitops")

try:
    SETTINGS = Settings.from_env()
except SettingsError as err:  # one line naming the variable, not a traceback
    sys.exit(f"digitops: {err}")
STATIC = Path(__file__).with_name("static")

# FastAPI's own docs pages load Swagger from a CDN; /docs serves a local copy instead.
app = FastAPI(
    title="digitops", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
)
app.mount("/static", StaticFiles(directory=STATIC), name="static")
http.install_error_handlers(app)


# For callers of the `classify` API, max latency is BentoML's dispatcher's budget before it sheds
# load (503).
BATCH_MAX_SIZE = http.MAX_CLASSIFY_IMAGES
BATCH_MAX_LATENCY_MS = 1000
LAST_CONV = DigitCNN.conv_layers[-1]  # Grad-CAM's layer
# How often the prediction store checkpoints and enforces retention, in a thread of its own.
STORE_UPKEEP_SECONDS = 1.0
# How long a read of the store (feedback, review queue, stats) waits for this worker's
# journaled predictions to reach it.
LOG_CATCH_UP_SECONDS = 2.0
# Feedback on a prediction the store does not have yet waits for it while the prediction is
# younger than this: another worker or replica journaled it, and commits it within its group
# window (journal.GROUP_SECONDS, 50 ms) unless its store is slow. Either way, so that a
# replica's clock a little ahead does not matter.
PEER_LOG_LAG_SECONDS = 2.0
# Worker processes share the cores; each gets its share for Grad-CAM's torch ops and for the
# CPU-bound steps of a request.
CORES_PER_WORKER = max(1, (os.cpu_count() or 1) // SETTINGS.workers)


def registry_follower() -> RegistryFollower | None:
    """The worker's follower of the registry alias, when DIGITOPS_REGISTRY_POLL_SECONDS is set."""
    return RegistryFollower.from_settings(SETTINGS) if SETTINGS.registry_poll_seconds else None


def starting_model(registry: RegistryFollower | None) -> ServedModel:
    """The alias's version when following the registry; else, or while the registry cannot
    give it, the newest store entry or the shipped model."""

    def unfollowed() -> ServedModel:
        return load_served_model(SETTINGS.model_tag, SETTINGS.shipped_model)

    return unfollowed() if registry is None else registry.first(unfollowed)


def _sampled_share() -> float:
    """BentoML's tracing.sample_rate, as configured for this server."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.tracing.sample_rate.get() or 0.0


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
        torch.set_num_threads(CORES_PER_WORKER)
        # With tracing on, each access line names its request's trace, which only the
        # request's own context knows: those lines are written as each reply goes out.
        buffered = SETTINGS.access_log and not SETTINGS.tracing
        self.access_log = BufferedAccessLog() if buffered else None
        # Reloads announced from now on are followed, including any during the load below.
        self.reloads = ReloadNotices()
        self.metrics = ServiceMetrics()
        self.registry = registry_follower()
        self._serve(starting_model(self.registry))
        self.max_bytes = SETTINGS.max_upload_bytes
        self.store: PredictionStore | None = None
        self.log: PredictionLog | None = None
        try:
            self.store = PredictionStore(
                SETTINGS.predictions_db,
                max_predictions=SETTINGS.max_predictions,
                upkeep_seconds=STORE_UPKEEP_SECONDS,
            )
            self.log = PredictionLog(self.store, journal_directory(SETTINGS), self._lost)
        except StoreError as err:  # predictions must go on without their log
            if self.store is not None:  # the store opened, its journal did not
                self.store.close()
            self.store = None
            log.warning("%s; predictions will not be logged and feedback is disabled", err)
        self.predictions = PredictionThread(self.log, self._unlogged)
        # Grad-CAM and feature maps get a thread per core: more would only contend for the
        # cores, and each decode in flight holds up to a full-size image.
        self.cpu_limiter = anyio.CapacityLimiter(CORES_PER_WORKER)
        self.feedback_limiter = http.RateLimiter(SETTINGS.feedback_per_minute)
        if self.registry is not None:  # each worker follows on its own: no notices needed
            self.registry.follow(lambda: self.served, self._followed)
        elif SETTINGS.workers > 1:
            self.reloads.follow(lambda: self.served.store_tag, self._switch_to)
        self._warm_up()
        if not SETTINGS.tracing and _sampled_share() > 0:
            log.warning(
                "tracing.sample_rate is set, but no request is traced: DIGITOPS_TRACING is off"
            )
        card = self.served.card()
        log.info(
            "serving model from %s (version %s, test accuracy %s)",
            self.served.source,
            card["version"],
            card["test_accuracy"],
        )
        # What is loaded by now (torch, BentoML, the model: ~270k objects) lives as long as the
        # worker. Out of the collector's sight, a full collection no longer walks it all: that
        # walk took ~220 ms and was the p99 of a lone client (README.md, "Serving").
        gc.collect()
        gc.freeze()

    def _warm_up(self) -> None:
        """Predict and explain once before the first request, unlogged and uncounted: the first
        call into each library (Pillow's plugins, ONNX Runtime's buffers, torch's autograd)
        costs milliseconds, which would otherwise land on some client's request."""
        stroke = np.zeros((28, 28), dtype=np.uint8)
        stroke[6:22, 13:15] = 255  # a "1", drawn on a 280x280 canvas
        data, options = png(stroke, scale=10), http.Options(log=False)
        prepared, input_png = self._prepare(data, options)
        probabilities = self.served.probabilities(prepared.pixels[None])[0]
        http.prediction_payload(
            probabilities.tolist(), input_png, prepared.inverted, self.served, None
        )
        self._explain(data, options, self.served)

    @bentoml.on_shutdown
    def close_log(self) -> None:
        """Commit the journaled predictions before the worker goes (what cannot be committed
        stays journaled, for the next worker to start), close the store, and write the held
        access lines and metrics."""
        if self.log is not None:
            self.log.close()
        if self.store is not None:
            self.store.close()
        if self.access_log is not None:
            self.access_log.close()
        self.metrics.close()

    @bentoml.on_deployment
    def check_model() -> None:
        """Runs once, before any worker starts: if the model this server would serve does not
        load, the server stops with one line saying why (workers would fail and restart
        forever)."""
        try:
            starting_model(registry_follower())
        except ModelUnavailable as err:
            sys.exit(f"digitops: cannot start: {err}")

    def _serve(self, served: ServedModel) -> None:
        """Switch to `served`: one reference swap, so requests in flight finish on the old one."""
        self.served = served
        identity = served.identity()
        self.metrics.serving(identity["name"], identity["version"], served.source)

    @bentoml.api(batchable=True, max_batch_size=BATCH_MAX_SIZE, max_latency_ms=BATCH_MAX_LATENCY_MS)
    def classify(
        self,
        pixels: Annotated[np.ndarray, BeforeValidator(http.pixel_array)],
    ) -> np.ndarray:
        """Probabilities [N, 10] for MNIST-style inputs [N, 28, 28] of 0-255, white ink on black.

        Adaptively batched. The shape is checked per request, before batching, so a bad call
        gets a 400 of its own and never fails its batch-mates.
        """
        return self.served.probabilities(pixels.astype(np.uint8))

    # Each route below does its CPU work - decoding, preprocessing, the forward pass, Grad-CAM,
    # the prediction log - in one trip off the event loop, and reads `self.served` once, so a
    # request finishes on the model it started with even if a reload swaps it meanwhile.
    async def _off_loop(self, work: Callable[[], T]) -> T:
        """Run `work` in a worker thread (at most one per core: more would only contend)."""
        return await self._counted(anyio.to_thread.run_sync(work, limiter=self.cpu_limiter))

    async def _predicted(self, images: Images) -> list[dict]:
        """Predict `images` (on the prediction thread, or here if it is one drawing and the
        thread is idle); their replies once logged."""
        light = len(images.images) == 1 and is_small_png(images.images[0])
        return await self._counted(self.predictions.run(images, light=light))

    async def _counted(self, pending: Awaitable[T]) -> T:
        """What `pending` gives; an image without a digit is counted on its way out."""
        try:
            return await pending
        except EmptyImageError:
            self.metrics.no_digit.inc()
            raise

    @staticmethod
    def _prepare(data: bytes, options: http.Options) -> tuple[Preprocessed, bytes]:
        """The model's 28x28 input (with the requested noise) and its PNG."""
        prepared = preprocess(data, invert=options.invert)
        if options.noise > 0:
            noisy = add_noise(prepared.pixels, options.noise, options.seed)
            prepared = Preprocessed(pixels=noisy, inverted=prepared.inverted)
        return prepared, png(prepared.pixels)

    async def _read_one(
        self, request: Request, allowed: tuple[str, ...]
    ) -> tuple[bytes, http.Options]:
        """The single image of a request and its options."""
        (data,), raw = await http.read_images(request, self.max_bytes, http.IMAGE_FIELD)
        return data, http.parse_options(raw, allowed)

    @app.post("/predict", **contract.PREDICT)
    async def predict(self, request: Request):
        """Digit, confidence, all ten probabilities and the 28x28 input the model saw."""
        data, options = await self._read_one(request, http.PREDICT_OPTIONS)
        (reply,) = await self._predicted(Images(self, [data], options, alone=True))
        return http.json_reply(reply)

    @app.post("/predict_batch", **contract.PREDICT_BATCH)
    async def predict_batch(self, request: Request):
        """Many images in one call (form field 'images', repeated): one result each, in order."""
        blobs, raw = await http.read_images(request, self.max_bytes, http.BATCH_FIELD)
        options = http.parse_options(raw, http.PREDICT_OPTIONS)
        results = await self._predicted(Images(self, blobs, options, alone=False))
        return http.json_reply({"results": results, "count": len(results)})

    def _reply(
        self,
        prepared: Preprocessed,
        input_png: bytes,
        probabilities: np.ndarray,
        original: bytes,
        options: http.Options,
        served: ServedModel,
    ) -> Reply:
        """The prediction's JSON, and its row for the prediction log (for feedback and review)
        unless the caller opted out."""
        p = probabilities.tolist()  # once, for the reply, the metrics and the log's row
        payload = http.prediction_payload(
            p, input_png, prepared.inverted, served, http.new_prediction_id()
        )
        digit = payload["digit"]
        self.metrics.prediction(digit, p[digit], prepared.inverted)
        if not options.log:
            payload["logged"] = False
            return payload, None
        if self.store is None:
            self._unlogged(StoreError("no prediction store"))
            payload["logged"] = False
            return payload, None
        row = self.store.record(
            payload["prediction_id"],
            input_png,
            p,
            prepared.inverted,
            payload["model"]["version"],
            original,
            options.noise,
        )
        return payload, row

    def _unlogged(self, err: StoreError) -> None:
        """A prediction answered without its row in the log (its reply says `logged: false`)."""
        self.metrics.store_failures.inc()
        log.warning("prediction not logged: %s", err)

    def _lost(self, row: dict, err: StoreError) -> None:
        """A journaled prediction (its reply said it was logged) that the store refused."""
        self.metrics.store_failures.inc()
        log.error("prediction %s was journaled but the store refused it: %s", row["id"], err)

    def _caught_up(self) -> bool:
        """Whether this worker's journaled predictions are all in the store, after waiting up
        to LOG_CATCH_UP_SECONDS for them (in a worker thread)."""
        return self.log.flush(LOG_CATCH_UP_SECONDS)

    async def _read_store(self, query: Callable[[], T]) -> T:
        """`query`, once this worker's journaled predictions are in the store, so that a client
        sees its own predictions; if the store cannot take them now, what it has."""

        def read() -> T:
            self._caught_up()  # if not, the log writer says why
            return query()

        return await anyio.to_thread.run_sync(read)

    async def _add_feedback(
        self, prediction_id: str, label: int, comment: str | None, client: str
    ) -> FeedbackResult:
        """Label a prediction once the store has it. One younger than PEER_LOG_LAG_SECONDS that
        it has not is waited for: another worker or replica journaled it, and is committing it.
        While this worker's own journaled predictions cannot reach the store, an id it does not
        find may be one of them: StoreError (retry later), not UnknownPrediction."""

        def labelled() -> FeedbackResult:
            caught_up = self._caught_up()
            try:
                return self.store.add_feedback(prediction_id, label, comment, client)
            except UnknownPrediction:
                if caught_up:
                    raise
                raise StoreError("journaled predictions are waiting for the store") from None

        while True:
            try:
                return await anyio.to_thread.run_sync(labelled)
            except UnknownPrediction:
                if abs(http.prediction_age(prediction_id)) >= PEER_LOG_LAG_SECONDS:
                    raise
                await anyio.sleep(0.02)

    def _explain(self, data: bytes, options: http.Options, served: ServedModel) -> tuple:
        """(prepared, its PNG, Grad-CAM heatmap, probabilities, the heatmap's overlay PNG)."""
        prepared, input_png = self._prepare(data, options)
        activations = served.onnx.run(prepared.pixels[None], LAST_CONV)
        cam, logits = explain.grad_cam(served.model, activations, options.target)
        overlay = explain.overlay_png(prepared.pixels, cam)
        probabilities = torch.softmax(torch.from_numpy(logits), dim=0).numpy()
        return prepared, input_png, cam, probabilities, overlay

    @app.post("/explain", **contract.EXPLAIN)
    async def explain(self, request: Request):
        """Grad-CAM of the last conv block for the predicted (or `target`) class."""
        data, options = await self._read_one(request, http.EXPLAIN_OPTIONS)
        served = self.served
        prepared, input_png, cam, probabilities, overlay = await self._off_loop(
            lambda: self._explain(data, options, served)
        )
        payload = http.prediction_payload(
            probabilities.tolist(),
            input_png,
            prepared.inverted,
            served,
            prediction_id=None,  # explanations are not logged: feedback goes through /predict
        )
        target = options.target if options.target is not None else payload["digit"]
        return http.json_reply(
            {
                **payload,
                "target": target,
                "layer": LAST_CONV,
                "cam": np.round(cam, 4).tolist(),
                "overlay_png": http.b64(overlay),
            }
        )

    @app.post("/feature_maps", **contract.FEATURE_MAPS)
    async def feature_maps(self, request: Request):
        """Every channel of one conv block (`layer`=conv1..conv3) as a PNG grid."""
        data, options = await self._read_one(request, http.FEATURE_MAP_OPTIONS)
        served = self.served

        def work():
            prepared, _ = self._prepare(data, options)
            maps = explain.feature_maps(served.onnx, prepared.pixels, options.layer)
            return prepared, maps, explain.grid_png(maps)

        prepared, maps, grid = await self._off_loop(work)
        reply = {
            "layer": options.layer,
            "channels": int(maps.shape[0]),
            "size": list(maps.shape[1:]),
            "grid_png": http.b64(grid),
            "inverted": prepared.inverted,
        }
        if options.arrays:
            reply["maps"] = np.round(maps, 4).tolist()
        return http.json_reply(reply)

    @app.post("/feedback", **contract.FEEDBACK)
    async def feedback(self, request: Request):
        """Say what the digit really was: JSON {prediction_id, label 0-9, comment?}, or an image
        (multipart field 'image', or a raw image body) with `label`. Idempotent."""
        client = request.client.host if request.client else "unknown"
        if not self.feedback_limiter.allow(client):
            raise RequestError("too much feedback from this client; wait a minute and retry", 429)
        if self.store is None:
            raise RequestError(
                "feedback is unavailable: the prediction store could not be opened "
                "(see the server log)",
                503,
            )
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("multipart/form-data", "image/")):
            # A labelled image that never went through /predict: predict (and log) it first,
            # so it is stored and validated exactly like every other correction.
            (data,), raw = await http.read_images(request, self.max_bytes, http.IMAGE_FIELD)
            http.parse_feedback({**raw, "prediction_id": "pending"})  # bad label: 400 first
            options = http.parse_options(raw, http.FEEDBACK_IMAGE_FIELDS)
            (logged,) = await self._predicted(Images(self, [data], options, alone=True))
            body = {**raw, "prediction_id": logged["prediction_id"]}
        else:
            try:
                body = await request.json()
            except Exception:
                raise RequestError(
                    'malformed JSON; send {"prediction_id": "...", "label": 0-9}'
                ) from None
        prediction_id, label, comment = http.parse_feedback(body)
        try:
            result = await self._add_feedback(prediction_id, label, comment, client)
        except UnknownPrediction:
            raise RequestError(
                f"unknown prediction_id {prediction_id!r}; use the id a "
                "/predict reply gave (predictions are kept for a limited time)",
                404,
            ) from None
        except StoreError as err:
            self.metrics.store_failures.inc()
            raise RequestError(
                f"feedback cannot be stored right now ({err}); please retry later", 503
            ) from None
        self.metrics.feedback.labels(result="relabelled" if result.replaced else "recorded").inc()
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

    @app.get("/review_queue", **contract.REVIEW_QUEUE)
    async def review_queue(
        self,
        k: Annotated[int, Query(ge=1, le=200, description="how many")] = 20,
        strategy: Annotated[contract.Strategy, Query(description="how to rank doubt")] = "entropy",
    ):
        """The unlabelled predictions the model is least sure of: label these first."""
        if self.store is None:
            raise RequestError("the review queue is unavailable: no prediction store", 503)
        items = await self._read_store(lambda: self.store.review_queue(k, strategy))
        for item in items:
            item["input_png"] = http.b64(item["input_png"])
        return {"strategy": strategy, "k": k, "items": items}

    @app.get("/feedback/stats", **contract.FEEDBACK_STATS)
    async def feedback_stats(self):
        """Counts of feedback by state (pending / ingested / rejected) and logged predictions."""
        if self.store is None:
            raise RequestError("feedback stats are unavailable: no prediction store", 503)
        return await self._read_store(self.store.stats)

    @app.post("/admin/reload", **contract.RELOAD)
    async def reload(self, request: Request):
        """Switch to the newest model in the BentoML store, or the version holding the registry
        alias when following it, without a restart (token required)."""
        given = request.headers.get("authorization", "").encode()
        if not given:
            raise RequestError("send the admin token: Authorization: Bearer <token>", 401)
        token = SETTINGS.admin_token
        if not token:
            raise RequestError("reload is disabled: set DIGITOPS_ADMIN_TOKEN on the server", 403)
        if not hmac.compare_digest(given, f"Bearer {token}".encode()):
            raise RequestError("missing or wrong admin token (Authorization: Bearer <token>)", 401)
        try:
            served = await anyio.to_thread.run_sync(self._newest)
        except RuntimeError as err:
            raise RequestError(
                f"reload failed, still serving {self.served.source}: {err}", 503
            ) from None
        previous = self.served.card()
        self._serve(served)
        log.info("reloaded: now serving %s (was %s)", served.source, previous["source"])
        if SETTINGS.workers > 1 and self.registry is None:
            self.reloads.announce(served.store_tag)  # the others switch within a second
        return {"previous": previous, "current": served.card(), "workers": SETTINGS.workers}

    def _newest(self) -> ServedModel:
        """What /admin/reload switches to. No fallback: a failed look-up must never swap the
        champion for the shipped model."""
        if self.registry is not None:
            return self.registry.load()
        return load_served_model(SETTINGS.model_tag, SETTINGS.shipped_model, fallback=False)

    def _switch_to(self, store_tag: str) -> None:
        """Serve the store entry another worker of this server reloaded."""
        self._serve(load_served_model(store_tag, None, fallback=False))
        log.info("followed a reload: now serving %s", self.served.source)

    def _followed(self, served: ServedModel) -> None:
        """Serve the version that now holds the registry alias."""
        previous = self.served.source
        self._serve(served)
        log.info("followed the registry: now serving %s (was %s)", served.source, previous)

    @app.get("/", include_in_schema=False)
    async def index(self):
        return FileResponse(STATIC / "index.html")

    @app.get(http.OPENAPI_PATH, include_in_schema=False)
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


class Images:
    """A request's images on the prediction thread (a `predictor.Job`): prepared, then answered
    from a forward pass that they share with the other requests of the thread's round. The
    request finishes on the model it started with, even if a reload swaps it meanwhile."""

    def __init__(
        self, service: DigitService, images: list[bytes], options: http.Options, *, alone: bool
    ):
        self.service, self.images, self.options = service, images, options
        self.model = service.served
        # A lone image's error is its request's (/predict); in a batch, each image answers
        # for itself, and one bad image does not fail its neighbours.
        self.alone = alone
        self.prepared: list[tuple[Preprocessed, bytes] | RequestError] = []

    def prepare(self) -> np.ndarray:
        for data in self.images:
            try:
                self.prepared.append(self.service._prepare(data, self.options))
            except RequestError as err:
                if self.alone:
                    raise
                if isinstance(err, EmptyImageError):
                    self.service.metrics.no_digit.inc()
                self.prepared.append(err)
        pixels = [p[0].pixels for p in self.prepared if not isinstance(p, RequestError)]
        return np.stack(pixels) if pixels else np.empty((0, 28, 28), dtype=np.uint8)

    def answer(self, probabilities: np.ndarray) -> list[Reply]:
        predicted = iter(probabilities)
        return [
            ({"error": str(p), "status": p.status}, None)
            if isinstance(p, RequestError)
            else self.service._reply(*p, next(predicted), data, self.options, self.model)
            for p, data in zip(self.prepared, self.images, strict=True)
        ]


async def _this_service() -> DigitService:
    return get_current_service()


def _self_from_the_loop(service_class: type) -> None:
    """Have the routes of `service_class` get their `self` from a coroutine.

    BentoML hands each route its `self` through a dependency on a plain function (a default
    `Depends` in the route's signature), which FastAPI runs in its thread pool: a thread hop
    each way on every request before the route starts (README.md, "Serving"). Overriding that
    dependency (`app.dependency_overrides`) avoids the hop, but while any override is set
    FastAPI rebuilds every route's dependencies from their signatures on every request. So the
    signature's default itself names the coroutine; FastAPI reads it as it builds the routes."""
    for method in vars(service_class).values():
        signature = getattr(method, "__signature__", None)
        if signature is None:
            continue
        first, *rest = signature.parameters.values()
        if getattr(first.default, "dependency", None) is get_current_service:
            loop_self = first.replace(default=Depends(_this_service))
            method.__signature__ = signature.replace(parameters=[loop_self, *rest])


_self_from_the_loop(DigitService.inner)
# BentoML answers /docs.json with a document of its own making, which cannot see our bodies.
DigitService.add_asgi_middleware(http.OwnOpenAPI)
DigitService.add_asgi_middleware(http.JSONOnly, paths=("/classify",))
