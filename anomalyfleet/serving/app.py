"""HTTP API (FastAPI ingress on Ray Serve) and `build_app`, which wires the deployments together.

    POST /v1/lines/{line}/score         one image: raw bytes body, or multipart with one file
    POST /v1/lines/{line}/score-batch   multipart with several files
    GET  /v1/lines                      lines, detector versions and thresholds
    POST /v1/admin/reload               re-read the registry now (admin token)
    GET  /healthz
    GET  /openapi.json, /docs

Every result says which `source` scored it: "window" (a line's rolling window of its recent images,
batch zero-shot mode; see `WindowSettings`), or the bundle's "prompts", "memory" or "fused", and,
for lines with a window, how many images the window held. Window scores, thresholds and maps are on
the window's own scale (see `anomalyfleet.rolling_window`). A window of peers (`WindowSettings.peers`)
does not score: the bundle does, on its own scale, with the window's images completing its line
memory ("memory+peers", "fused+peers").

`?return_map=true` adds the overlay (PNG, base64), the map itself (8-bit PNG, value 255 =
`map_scale`) and defect boxes (connected regions of the map above the line's pixel threshold, in
the uploaded image's pixel coordinates).

The gateway authenticates, checks and decodes uploads, resizes them to the detector's input size
and hands them to the scorer replicas through a DeploymentHandle with the line's bundle as the
multiplexed model id. Every refusal is a 4xx with `{"detail": reason}`.
"""


import asyncio
import base64
import io
import logging
import math
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect
from ray import serve
from ray.serve.handle import DeploymentHandle
from scipy import ndimage

from anomalyfleet import __version__
from anomalyfleet.errors import AnomalyFleetError, StorageError
from anomalyfleet.scoring import overlay_png
from anomalyfleet.serving.auth import AuthError, Authenticator, Principal
from anomalyfleet.serving.config import ServiceConfig, WindowSettings
from anomalyfleet.serving.inputs import (
    RAW_TYPES,
    CheckedImage,
    InputError,
    Limits,
    Upload,
    decode_image,
    is_multipart,
    model_pixels,
    parse_multipart,
    too_large,
)
from anomalyfleet.serving.metrics import UNKNOWN_LINE, GatewayMetrics
from anomalyfleet.serving.registry import LineRegistry, LineState, RegistrySnapshot
from anomalyfleet.serving.service import DetectorScorer, ScoreItem, ScoreOutcome

logger = logging.getLogger("ray.serve")

MULTIPART_OVERHEAD = 64 * 1024  # part headers and boundaries on top of the image bytes
MAX_BOXES = 32
# nginx's code for a request the client abandoned (or Serve timed out) before the answer.
CLIENT_CLOSED = 499


# --- response models (they make the OpenAPI document) -----------------------------------------------


class DetectorInfo(BaseModel):
    bundle: str
    version: str = Field(description="digest of the bundle's manifest: changes whenever the bundle is republished")
    backbone: str


class DefectBox(BaseModel):
    x0: int
    y0: int
    x1: int = Field(description="exclusive")
    y1: int = Field(description="exclusive")
    peak: float = Field(description="highest map value in the region")
    area_fraction: float = Field(description="share of the map's pixels in the region")


class WindowFill(BaseModel):
    images: int = Field(description="images in the line's window when this one was scored (itself not among "
                                    "them): the scoring replica's own window, or the line's shared one")
    shared: bool = Field(False, description="one window for the line across replicas (window.shared)")
    size: int
    min_images: int = Field(description="images the window needs before it scores (or lends peers)")
    peers: bool = Field(False, description="the window completes the bundle's line memory instead of scoring "
                                           "(window.peers)")


class ImageResult(BaseModel):
    image: str
    score: float = Field(description="probability of 'abnormal' (0..1) from prompts; the calibrated scale of a "
                                     "line memory or of the window otherwise (see source)")
    source: str = Field("prompts", description="what scored it: window, prompts, memory or fused; memory+peers "
                                               "or fused+peers with a window of peers")
    window: WindowFill | None = Field(None, description="the line's rolling window, when it has one")
    anomalous: bool = Field(description="score >= threshold")
    threshold: float
    width: int
    height: int
    model_latency_ms: float
    batch_size: int = Field(description="images in the model batch that scored this one")
    overlay_png: str | None = Field(None, description="base64 PNG: the anomaly map blended over the image")
    map_png: str | None = Field(None, description="base64 8-bit PNG of the map; 255 = map_scale")
    map_scale: float | None = None
    pixel_threshold: float | None = None
    boxes: list[DefectBox] | None = None


class ScoreResponse(ImageResult):
    line: str
    detector: DetectorInfo
    latency_ms: float = Field(description="end to end inside the service")


class BatchResponse(BaseModel):
    line: str
    detector: DetectorInfo
    threshold: float | None = Field(None, description=(
        "the threshold every result was decided with; absent when they differ (a line's rolling "
        "window filled up within the batch): each result carries its own"))
    results: list[ImageResult]
    latency_ms: float


class LineInfo(BaseModel):
    line: str
    bundle: str
    version: str
    threshold: float
    threshold_source: str
    pixel_threshold: float
    map_scale: float
    image_size: int
    backbone: str
    created_at: str
    calibrated: bool
    description: str = ""
    window: WindowSettings | None = None
    notes: list[str] = Field(default_factory=list, description="what to know about the line's scores, e.g. a bundle "
                             "threshold set with peers on a line served without them")


class LinesResponse(BaseModel):
    lines: list[LineInfo]
    unavailable: dict[str, str] = Field(description="line -> why it cannot serve (or still serves its previous bundle)")
    registry_version: str


class Health(BaseModel):
    status: str
    lines: int
    unavailable: int = Field(description="lines not served: their bundle could not be read")
    stale: int = Field(0, description="lines still served by their previous bundle: the new one failed to load")
    registry_version: str
    version: str = __version__


class ErrorBody(BaseModel):
    detail: str


ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 408, 413, 415, 422, 503)}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}}
               for t in ("image/png", "image/jpeg", "image/bmp", "image/tiff", "application/octet-stream")},
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": {"type": "string", "format": "binary"}}}},
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
        }}},
    }
}

api = FastAPI(
    title="anomalyfleet",
    version=__version__,
    description="Zero-shot anomaly scoring per production line: score, decision against the line's "
                "threshold, and on request the anomaly map and defect boxes.",
)
@api.exception_handler(RequestValidationError)
async def _invalid_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422 (a query parameter of the wrong type) in the API's one error shape."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body")) or "request"
    return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid value')}"}, status_code=422)


# Declared for the OpenAPI document; the header itself is parsed by the Authenticator so that a
# missing and a malformed token get distinct reasons.
bearer = HTTPBearer(auto_error=False, description="a client's or a line's token")


class Refusal(Exception):
    def __init__(self, status: int, kind: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.kind = kind
        self.reason = reason


def _refusal(exc: Exception) -> Refusal:
    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, (AuthError, InputError)):
        return Refusal(exc.status, exc.kind, exc.reason)
    raise exc


def _error_response(refusal: Refusal) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
    return JSONResponse({"detail": refusal.reason}, status_code=refusal.status, headers=headers)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def defect_boxes(amap: np.ndarray, threshold: float, width: int, height: int) -> list[DefectBox]:
    """Connected regions of the map at or above `threshold`, scaled to the upload's pixel grid."""
    labels, count = ndimage.label(amap >= threshold)
    if count == 0:
        return []
    side_y, side_x = amap.shape
    sy, sx = height / side_y, width / side_x
    peaks = ndimage.maximum(amap, labels, index=np.arange(1, count + 1))
    areas = ndimage.sum_labels(np.ones_like(amap), labels, index=np.arange(1, count + 1))
    boxes = []
    for index, region in enumerate(ndimage.find_objects(labels)):
        if region is None:
            continue
        ys, xs = region
        boxes.append(DefectBox(
            x0=int(math.floor(xs.start * sx)), y0=int(math.floor(ys.start * sy)),
            x1=min(width, int(math.ceil(xs.stop * sx))), y1=min(height, int(math.ceil(ys.stop * sy))),
            peak=float(peaks[index]), area_fraction=float(areas[index]) / amap.size,
        ))
    boxes.sort(key=lambda b: b.peak, reverse=True)
    return boxes[:MAX_BOXES]


def map_png(amap: np.ndarray, scale: float) -> bytes:
    grey = np.clip(amap / max(scale, 1e-8), 0.0, 1.0) * 255.0
    buffer = io.BytesIO()
    Image.fromarray(np.round(grey).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# Defined before the Gateway: `serve.ingress` freezes the FastAPI app, and with it the globals the
# endpoints use, while the class is being created, so a helper defined after it would be missing
# in the replica (a NameError, i.e. a 500, in place of the 503 below).
SCORE_QUERY = frozenset({"return_map"})


def check_query(given, known: frozenset) -> None:
    """A misspelt option (`?return_maps=true`) is refused, not silently ignored (FastAPI's default)."""
    unknown = sorted(set(given) - known)
    if unknown:
        raise InputError(422, "bad_query", f"unknown query parameter {', '.join(map(repr, unknown))} "
                                           f"(known: {', '.join(sorted(known))})")


def shared_threshold(results: list[dict]) -> float | None:
    """The threshold all of a batch's results were decided with, or None when they differ."""
    thresholds = {result["threshold"] for result in results}
    return thresholds.pop() if len(thresholds) == 1 else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in reversed(text.splitlines()):
        # Ray wraps remote errors in a traceback; the last line names the cause.
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__


@serve.deployment(name="Gateway", max_ongoing_requests=64)
@serve.ingress(api)
class Gateway:
    def __init__(self, scorer: DeploymentHandle, config: ServiceConfig):
        self.config = config
        self.scorer = scorer
        self.limits = Limits(config.max_bytes, config.max_pixels, config.max_batch_files)
        self.registry = LineRegistry(config.registry)
        # A registry that cannot be read at start is a deployment error; later read failures
        # only keep the last good registry serving.
        self.snapshot: RegistrySnapshot = self.registry.load()
        self.auth = self._authenticator(self.snapshot)
        self.metrics = GatewayMetrics()
        self.metrics.thresholds(self.snapshot.lines)
        self._handles: dict[str, DeploymentHandle] = {}
        self._last_check = time.monotonic()
        self._refreshing: asyncio.Task | None = None
        self._stale: dict[str, str] = {}

    # --- registry ---------------------------------------------------------------------------------
    def _authenticator(self, snapshot: RegistrySnapshot) -> Authenticator:
        return Authenticator([*self.config.tokens, *snapshot.document.grants()], required=self.config.require_auth)

    def _handle(self, model_id: str) -> DeploymentHandle:
        handle = self._handles.get(model_id)
        if handle is None:
            if len(self._handles) > 256:
                self._handles.clear()
            handle = self._handles[model_id] = self.scorer.options(multiplexed_model_id=model_id)
        return handle

    async def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._last_check < self.config.registry_check_interval_s:
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        self._last_check = now
        # In the background: reading a registry in object storage can block for as long as the
        # storage retries (seconds when it is unreachable), which must not stall requests.
        self._refreshing = asyncio.create_task(self._check_then_refresh())

    async def _check_then_refresh(self) -> AnomalyFleetError | None:
        if await asyncio.to_thread(self.registry.changed, self.snapshot):
            return await self._refresh()
        return None

    async def _refresh(self) -> AnomalyFleetError | None:
        """Load the changed registry, warm every changed line's new bundle, then switch at once.

        Requests keep using the previous snapshot (and its model ids) until the switch, so a
        reload never makes a request wait for, or fail on, a bundle that is still loading. A
        line whose new bundle fails to load keeps serving its previous one. Returns why the
        registry as a whole was refused (the previous one stays), else None.
        """
        old = self.snapshot
        try:
            new = await asyncio.to_thread(self.registry.load, old)
        except AnomalyFleetError as exc:
            logger.warning("registry reload failed, keeping the previous registry: %s", exc)
            self.metrics.reload("_registry", ok=False)
            return exc
        stale: dict[str, str] = {}
        for name, state in list(new.lines.items()):
            previous = old.lines.get(name)
            if previous is not None and previous.model_id == state.model_id and previous.window == state.window:
                continue
            try:
                # The window goes along: a window of peers needs a line memory in the bundle.
                await self._handle(state.model_id).warm.remote(state.window)
                self.metrics.reload(name, ok=True)
            except Exception as exc:  # any failure to load the new bundle: keep the old one
                self.metrics.reload(name, ok=False)
                reason = f"new bundle or window failed to load: {_first_line(exc)}"
                if previous is not None:
                    new.lines[name] = previous
                    stale[name] = reason + " (still serving the previous bundle)"
                else:
                    del new.lines[name]
                    new.errors[name] = reason
        for name, reason in list(new.errors.items()):
            if name in old.lines:  # unreadable now (e.g. mid-publication): keep the old bundle
                new.lines[name] = old.lines[name]
                stale[name] = reason + " (still serving the previous bundle)"
                del new.errors[name]
        try:
            auth = self._authenticator(new)
        except AnomalyFleetError as exc:
            logger.warning("registry reload refused: %s", exc)
            self.metrics.reload("_registry", ok=False)
            return exc
        self.snapshot, self.auth, self._stale = new, auth, stale
        self.metrics.thresholds(new.lines)
        return None

    # --- request plumbing -------------------------------------------------------------------------
    def _principal(self, request: Request) -> Principal:
        return self.auth.authenticate(request.headers.get("authorization"))

    def _line(self, request: Request, line: str, snapshot: RegistrySnapshot) -> tuple[LineState, str]:
        known = line in snapshot.lines or line in snapshot.errors
        label = line if known else UNKNOWN_LINE
        try:
            principal = self._principal(request)
        except AuthError as exc:
            raise Refusal(exc.status, exc.kind, exc.reason) from None
        if not known:
            raise Refusal(404, "unknown_line", f"unknown line {line!r}")
        try:
            self.auth.authorize(principal, line)
        except AuthError as exc:
            raise Refusal(exc.status, exc.kind, exc.reason) from None
        state = snapshot.lines.get(line)
        if state is None:
            raise Refusal(503, "unavailable", f"line {line!r} is unavailable: {snapshot.errors[line]}")
        return state, label

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_bytes + MULTIPART_OVERHEAD
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        chunks, total = [], 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > limit:
                        raise too_large(limit)
                    chunks.append(chunk)
        except TimeoutError:
            raise Refusal(408, "timeout", f"request body not received within {self.config.body_timeout_s:g} s "
                                          f"({total} bytes arrived)") from None
        return b"".join(chunks)

    async def _uploads(self, request: Request, batch: bool) -> list[Upload]:
        content_type = request.headers.get("content-type")
        if is_multipart(content_type):
            uploads = parse_multipart(await self._read_body(request), content_type or "")
            if not uploads:
                raise Refusal(400, "empty", "multipart body holds no file part (name it 'file')")
            if not batch and len(uploads) > 1:
                raise Refusal(400, "too_many_files", "score takes one image; use score-batch for several")
            if len(uploads) > self.limits.max_files:
                raise Refusal(413, "too_many_files", f"{len(uploads)} files exceed the limit of {self.limits.max_files}")
            return uploads
        if batch:
            raise Refusal(415, "wrong_type", "score-batch takes multipart/form-data with one or more files")
        if content_type and not content_type.lower().startswith(RAW_TYPES):
            raise Refusal(415, "wrong_type", f"unsupported content type {content_type.split(';')[0]!r} "
                                             "(send image bytes or multipart/form-data)")
        return [Upload(name="body", data=await self._read_body(request))]

    def _prepare(self, upload: Upload, size: int) -> tuple[CheckedImage, np.ndarray]:
        checked, image = decode_image(upload, self.limits)
        return checked, model_pixels(image, size)

    async def _score(self, state: LineState, pixels: np.ndarray, want_map: bool) -> ScoreOutcome:
        try:
            return await self._handle(state.model_id).score.remote(ScoreItem(state.name, pixels, want_map, state.window))
        except Exception as exc:  # load failures and lost replicas both mean: try again later
            logger.warning("scoring on line %s failed: %s", state.name, exc)
            raise Refusal(503, "unavailable", f"detector for line {state.name!r} unavailable: {_first_line(exc)}") from None

    @staticmethod
    def _scale(state: LineState, outcome: ScoreOutcome) -> tuple[float, float, float]:
        """(threshold, pixel threshold, map scale) of the source that scored `outcome`."""
        if outcome.source == "window" and state.window is not None:
            return state.window.threshold, state.window.pixel_threshold, state.window.map_scale
        # A registry threshold is the line's; otherwise the threshold of the bundle that answered.
        if state.threshold_source == "registry" or outcome.bundle_threshold is None:
            threshold = state.threshold
        else:
            threshold = outcome.bundle_threshold
        return threshold, state.pixel_threshold, state.map_scale

    def _result(self, state: LineState, checked: CheckedImage, outcome: ScoreOutcome, want_map: bool) -> dict:
        threshold, pixel_threshold, map_scale = self._scale(state, outcome)
        result: dict[str, Any] = {
            "image": checked.name, "score": outcome.score, "anomalous": bool(outcome.score >= threshold),
            "threshold": threshold, "source": outcome.source, "width": checked.width, "height": checked.height,
            "model_latency_ms": outcome.model_ms, "batch_size": outcome.batch_size,
        }
        if state.window is not None and outcome.window_images is not None:
            result["window"] = {"images": outcome.window_images, "size": state.window.size,
                                "min_images": state.window.min_images, "shared": state.window.shared,
                                "peers": state.window.peers}
        if want_map and outcome.map is not None:
            amap = outcome.map
            result.update(
                overlay_png=_b64(overlay_png(io.BytesIO(checked.data), amap)),
                map_png=_b64(map_png(amap, map_scale)),
                map_scale=map_scale,
                pixel_threshold=pixel_threshold,
                boxes=[b.model_dump() for b in defect_boxes(amap, pixel_threshold, checked.width, checked.height)],
            )
        return result

    def _detector(self, state: LineState, outcome: ScoreOutcome | None) -> dict:
        version = outcome.version if outcome is not None else state.version
        return {"bundle": state.bundle, "version": version, "backbone": state.backbone}

    def _record(self, label: str, results: list[dict]) -> None:
        for result in results:
            self.metrics.scored(label, result["score"], result["anomalous"], result["source"])

    # --- endpoints ----------------------------------------------------------------------------------
    async def _line_request(self, request: Request, line: str, endpoint: str, handle):
        """Run `handle(state, started)` for a request on `line`: refusals become a 4xx with a JSON
        reason, bugs a counted 500, and every request is recorded with its line and status."""
        started = time.perf_counter()
        label, code = UNKNOWN_LINE, 200
        try:
            await self._maybe_refresh()
            state, label = self._line(request, line, self.snapshot)
            check_query(request.query_params.keys(), SCORE_QUERY)
            return await handle(state, started)
        except (Refusal, AuthError, InputError) as exc:
            refusal = _refusal(exc)
            code = refusal.status
            self.metrics.error(label, refusal.kind)
            return _error_response(refusal)
        except ClientDisconnect:
            # The client hung up while sending its image: nobody reads this answer, and it is
            # not a bug of ours (an 'internal' error would page someone).
            code = CLIENT_CLOSED
            self.metrics.error(label, "cancelled")
            return JSONResponse({"detail": "client closed the request"}, status_code=CLIENT_CLOSED)
        except asyncio.CancelledError:
            # The client went away or Serve's request timeout cut it off (a BaseException, which the
            # clause below would miss and count as a 200); 499 is the usual code for it.
            code = CLIENT_CLOSED
            self.metrics.error(label, "cancelled")
            raise
        except Exception:
            code = 500  # a bug, not bad input: counted, and Serve logs the traceback
            self.metrics.error(label, "internal")
            raise
        finally:
            self.metrics.request(label, endpoint, code, (time.perf_counter() - started) * 1000.0)

    @api.post("/v1/lines/{line}/score", response_model=ScoreResponse, response_model_exclude_none=True,
              responses=ERRORS, openapi_extra=IMAGE_BODY, summary="Score one image for a line")
    async def score(self, line: str, request: Request, return_map: bool = False,
                    _credentials: HTTPAuthorizationCredentials | None = Security(bearer)):
        async def handle(state: LineState, started: float) -> dict:
            uploads = await self._uploads(request, batch=False)
            checked, pixels = await asyncio.to_thread(self._prepare, uploads[0], state.image_size)
            outcome = await self._score(state, pixels, return_map)
            result = await asyncio.to_thread(self._result, state, checked, outcome, return_map)
            self._record(state.name, [result])
            latency = (time.perf_counter() - started) * 1000.0
            return {**result, "line": line, "detector": self._detector(state, outcome), "latency_ms": latency}

        return await self._line_request(request, line, "score", handle)

    @api.post("/v1/lines/{line}/score-batch", response_model=BatchResponse, response_model_exclude_none=True,
              responses=ERRORS, openapi_extra=BATCH_BODY, summary="Score several images for a line")
    async def score_batch(self, line: str, request: Request, return_map: bool = False,
                          _credentials: HTTPAuthorizationCredentials | None = Security(bearer)):
        async def handle(state: LineState, started: float) -> dict:
            uploads = await self._uploads(request, batch=True)
            # All files are checked before any is scored: a batch is accepted or refused whole.
            prepared = await asyncio.to_thread(lambda: [self._prepare(u, state.image_size) for u in uploads])
            tasks = [asyncio.ensure_future(self._score(state, pixels, return_map)) for _, pixels in prepared]
            try:
                outcomes = await asyncio.gather(*tasks)
            except BaseException:
                # The batch is refused whole: stop its other images too, so fewer of them enter the
                # line's rolling window only to be sent again by the client's retry.
                for task in tasks:
                    task.cancel()
                raise
            results = await asyncio.to_thread(
                lambda: [self._result(state, checked, outcome, return_map) for (checked, _), outcome in zip(prepared, outcomes)]
            )
            self._record(state.name, results)
            return {
                "line": line, "detector": self._detector(state, outcomes[0]),
                "threshold": shared_threshold(results), "results": results,
                "latency_ms": (time.perf_counter() - started) * 1000.0,
            }

        return await self._line_request(request, line, "score-batch", handle)

    @api.get("/v1/lines", response_model=LinesResponse, responses={401: {"model": ErrorBody}},
             summary="Lines this token may use, with detector versions and thresholds")
    async def lines(self, request: Request, _credentials: HTTPAuthorizationCredentials | None = Security(bearer)):
        try:
            await self._maybe_refresh()
            principal = self._principal(request)
        except AuthError as exc:
            self.metrics.error(UNKNOWN_LINE, exc.kind)
            return _error_response(_refusal(exc))
        snapshot = self.snapshot
        visible = [state.public() for name, state in sorted(snapshot.lines.items()) if principal.may_use(name)]
        unavailable = {**snapshot.errors, **self._stale}
        return {
            "lines": visible,
            "unavailable": {k: v for k, v in sorted(unavailable.items()) if principal.may_use(k)},
            "registry_version": snapshot.digest,
        }

    @api.post("/v1/admin/reload", response_model=LinesResponse,
              responses={code: {"model": ErrorBody} for code in (401, 403, 422, 503)},
              summary="Re-read the registry and bundles now (this gateway replica; others follow on their next check)")
    async def reload(self, request: Request, _credentials: HTTPAuthorizationCredentials | None = Security(bearer)):
        try:
            self.auth.require_admin(self._principal(request))
        except AuthError as exc:
            self.metrics.error(UNKNOWN_LINE, exc.kind)
            return _error_response(_refusal(exc))
        if self._refreshing is not None and not self._refreshing.done():
            await self._refreshing
        self._refreshing = asyncio.create_task(self._refresh())
        failure = await self._refreshing
        self._last_check = time.monotonic()
        if failure is not None:
            # The admin asked for this registry: say why it was not taken (the previous one keeps
            # serving). Unreachable storage is the service's problem (503), a bad file the admin's (422).
            status = 503 if isinstance(failure, StorageError) else 422
            return JSONResponse({"detail": f"registry not reloaded, still serving the previous one: {failure}"},
                                status_code=status)
        return await self.lines(request, _credentials)

    @api.get("/healthz", response_model=Health, summary="Liveness and registry state")
    async def healthz(self):
        snapshot = self.snapshot
        return {"status": "ok", "lines": len(snapshot.lines), "unavailable": len(snapshot.errors),
                "stale": len(self._stale), "registry_version": snapshot.digest}


def build_app(config: ServiceConfig):
    """The Serve application: a Gateway ingress composed with an autoscaled DetectorScorer."""
    scorer_autoscaling = {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
        "upscale_delay_s": config.upscale_delay_s,
        "downscale_delay_s": config.downscale_delay_s,
    }
    if config.initial_replicas is not None:
        scorer_autoscaling["initial_replicas"] = config.initial_replicas
    scorer = DetectorScorer.options(
        autoscaling_config=scorer_autoscaling,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    ).bind(
        max_batch_size=config.max_batch_size,
        batch_wait_timeout_s=config.batch_wait_timeout_s,
        max_models_per_replica=config.max_models_per_replica,
        torch_threads=config.torch_threads,
        device="auto",
        window_num_cpus=config.window_num_cpus,
        window_state=config.window_state,
        window_snapshot_every=config.window_snapshot_every,
        window_timeout_s=config.window_timeout_s,
    )
    gateway = Gateway.options(
        autoscaling_config={
            "min_replicas": config.gateway_min_replicas,
            "max_replicas": config.gateway_max_replicas,
            "target_ongoing_requests": max(2.0, config.target_ongoing_requests * 4),
        },
        max_ongoing_requests=config.gateway_max_ongoing_requests,
        ray_actor_options={"num_cpus": config.gateway_num_cpus},
    )
    return gateway.bind(scorer, config)


__all__ = ["Gateway", "api", "build_app", "defect_boxes"]
