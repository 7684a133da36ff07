"""Adapted models over the Open Inference Protocol v2 REST API (KServe v2, as Triton, MLServer
and KServe speak it): ``protofuse serve-models ROOT``.

Each folder of ROOT is a model, named by the folder: an adapted model folder (version "1"), or
numbered version folders each holding one. Every model is loaded once at start, its signature
verified with the given key (or not, with ``unsigned_ok``, for models you made yourself).

    GET  /v2/health/live  /v2/health/ready  /v2
    GET  /v2/models/{name}[/versions/{v}]           metadata: inputs, outputs, classes
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer     one input (n, d) -> "proba" (n, K) FP32
                                                    and, when asked for, "label" (n,) BYTES

A request is checked before any work: its size (``max_body_bytes``) before it is read, then its
JSON, the input's shape against the model, ``max_rows`` and every value finite. A bad request is
answered 400 with ``{"error": ...}`` naming the field; an unknown model 404.
"""

from __future__ import annotations

import json
import logging
import re
import stat
import threading
import warnings
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from . import __version__, artifacts
from .adapted import AdaptedModel, load_adapted

log = logging.getLogger("protofuse.open_inference")

INPUT, PROBA, LABEL = "input", "proba", "label"
# The input datatypes accepted (every numeric one of the protocol); values are read as float64.
DATATYPES = frozenset(
    {"FP16", "FP32", "FP64"}
    | {f"{kind}{bits}" for kind in ("INT", "UINT") for bits in (8, 16, 32, 64)}
)
_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")


class RequestError(ValueError):
    """A request the server refuses; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request and all of them together may hold. A body's JSON numbers take about
    ten times their text in memory while parsed: ``max_body_bytes`` times ``max_working``
    bounds that (8 MiB x 4: a few hundred MiB at worst)."""

    max_body_bytes: int = 8 << 20  # a request's body, refused before it is read (1,000 MNIST rows)
    max_rows: int = 10_000  # inputs in one request
    max_connections: int = 64  # open at once; more are closed at once
    max_working: int = 4  # requests parsed or predicted at once; more wait (up to ``timeout_s``)
    timeout_s: float = 30.0  # a connection silent this long (between bytes) is closed


FLOAT32_MAX = float(np.finfo(np.float32).max)
_VERSION = re.compile(r"[1-9][0-9]{0,8}")  # a version folder: 1, 2, ... (no 0, no ², no 01)
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a model folder, as export names it


@dataclass
class Repository:
    """The served models: name -> version -> model."""

    models: dict[str, dict[str, AdaptedModel]] = field(default_factory=dict)

    def get(self, name: str, version: str | None) -> tuple[str, AdaptedModel]:
        versions = self.models.get(name)
        if versions is None:
            raise RequestError(
                f"no model named {name!r}; this server has {sorted(self.models)}",
                HTTPStatus.NOT_FOUND,
            )
        if version is None:
            version = max(versions, key=int)
        if version not in versions:
            raise RequestError(
                f"model {name!r} has no version {version!r}; it has {sorted(versions, key=int)}",
                HTTPStatus.NOT_FOUND,
            )
        return version, versions[version]


def load_repository(
    root: str | Path, public_key: str | Path | None = None, unsigned_ok: bool = False
) -> Repository:
    """Every model folder under ``root``, verified as ``load_adapted`` verifies it. A folder that
    is neither a model nor numbered versions of one is refused, naming it."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder of adapted models")
    repo = Repository()
    for folder in sorted(p for p in root.iterdir() if _plain_folder(p)):
        if not _MODEL.fullmatch(folder.name):
            raise ValueError(
                f"{folder}: a model's folder name is letters, digits, '_', '.' and '-' (at most "
                "128); rename it"
            )
        if (folder / artifacts.META).exists():
            repo.models[folder.name] = {
                "1": load_adapted(folder, public_key, unsigned_ok=unsigned_ok)
            }
            continue
        versions = {
            v.name: load_adapted(v, public_key, unsigned_ok=unsigned_ok)
            for v in folder.iterdir()
            if _plain_folder(v) and _VERSION.fullmatch(v.name) and (v / artifacts.META).exists()
        }
        if not versions:
            raise ValueError(
                f"{folder}: neither an adapted model folder (meta.json, weights.npz) nor "
                "numbered versions of one (1/, 2/, ...); remove it or put a model in it"
            )
        repo.models[folder.name] = versions
    if not repo.models:
        raise ValueError(f"{root}: no adapted model folders in it (one folder per model)")
    return repo


def _plain_folder(path: Path) -> bool:
    """A folder itself, not a link to one (a link could bring in a model from anywhere)."""
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def metadata(name: str, version: str, model: AdaptedModel, versions: list[str]) -> dict[str, Any]:
    x_dim = int(model.bank_meta["x_dim"])
    return {
        "name": name,
        "versions": versions,
        "platform": "protofuse",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, x_dim]}],
        "outputs": [
            {"name": PROBA, "datatype": "FP32", "shape": [-1, len(model.classes_)]},
            {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {
            "classes": model.classes_.tolist(),
            "bank_version": str(model.bank_meta.get("version", "")),
            "version": version,
        },
    }


def parse_inputs(body: Any, x_dim: int, limits: Limits) -> tuple[np.ndarray, list[str]]:
    """The request's one input as an (n, x_dim) float array, and the outputs asked for."""
    if not isinstance(body, dict):
        raise RequestError('the body is not a JSON object; send {"inputs": [...]}')
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(f"inputs: give exactly one input tensor ({INPUT!r}, shape [n, {x_dim}])")
    tensor = inputs[0]
    shape, datatype, data = tensor.get("shape"), tensor.get("datatype"), tensor.get("data")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise RequestError(
            f"inputs[0].datatype: {str(datatype)[:20]!r}; use one of {sorted(DATATYPES)}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        or shape[1] != x_dim
        or not 1 <= shape[0] <= limits.max_rows
    ):
        raise RequestError(
            f"inputs[0].shape: {str(shape)[:60]}; give [n, {x_dim}] with 1 <= n <= "
            f"{limits.max_rows}"
        )
    if not isinstance(data, list):
        raise RequestError("inputs[0].data: give the values as a JSON list (flat or nested)")
    try:
        raw = np.asarray(data)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(
            "inputs[0].data: not a list of numbers (a ragged nesting, a string or a null)"
        ) from None
    if raw.dtype.kind not in "iuf":  # strings, booleans, nulls: numpy would turn some into numbers
        raise RequestError(
            f"inputs[0].data: holds {raw.dtype.kind!r}-kind values, not numbers only (strings, "
            "booleans and nulls are refused)"
        )
    if raw.size != shape[0] * shape[1]:
        raise RequestError(
            f"inputs[0].data: {raw.size} values for shape {shape} ({shape[0] * shape[1]})"
        )
    values = raw.astype(np.float64)
    if not np.isfinite(values).all():
        raise RequestError("inputs[0].data: holds a non-finite value (NaN or infinity)")
    if float(np.abs(values).max(initial=0.0)) > FLOAT32_MAX:  # the networks compute in float32
        raise RequestError(
            f"inputs[0].data: a value beyond float32's range (+-{FLOAT32_MAX:.3g}); send inputs "
            "preprocessed like the experts' queries"
        )
    outputs = body.get("outputs")
    if outputs is None:
        return values.reshape(shape), [PROBA]
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and o.get("name") in (PROBA, LABEL) for o in outputs
    ):
        raise RequestError(f"outputs: ask for {PROBA!r} and/or {LABEL!r} by name")
    return values.reshape(shape), [o["name"] for o in outputs] or [PROBA]


def infer(model: AdaptedModel, x: np.ndarray, wanted: list[str]) -> list[dict[str, Any]]:
    """The outputs asked for, in that order; a prediction that is not finite is refused (422),
    never sent."""
    with warnings.catch_warnings():  # out-of-range inputs: the caller's concern
        warnings.simplefilter("ignore")
        proba = model.predict_proba(x).astype(np.float32)
    if not np.isfinite(proba).all():
        raise RequestError(
            "inputs[0].data: the model's prediction on these inputs is not finite (they lie far "
            "outside the bank's input range); send inputs preprocessed like the experts' queries",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    tensors = {
        PROBA: {
            "name": PROBA,
            "datatype": "FP32",
            "shape": list(proba.shape),
            "data": proba.ravel().tolist(),
        },
        LABEL: {
            "name": LABEL,
            "datatype": "BYTES",
            "shape": [len(proba)],
            "data": model.classes_[proba.argmax(axis=1)].tolist(),
        },
    }
    return [tensors[name] for name in dict.fromkeys(wanted)]  # in the order asked, once each


class _Handler(BaseHTTPRequestHandler):
    server: OpenInferenceServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # The socket's own timeout: a silent caller is dropped (the class's would be shared).
        self.request.settimeout(self.server.limits.timeout_s)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # through logging, not stderr
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route: Any) -> None:
        try:
            status, body = route(unquote(self.path.split("?", 1)[0]))
            data = json.dumps(body, allow_nan=False).encode()  # never a NaN in JSON
        except RequestError as err:
            status, data = err.status, json.dumps({"error": str(err)}).encode()
        except Exception:  # never a traceback to the caller; the log has it
            log.exception("request %s failed", self.path[:200])
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            data = json.dumps({"error": "internal error"}).encode()
        if status >= 400:  # the body may be unread: what follows on the connection is not a request
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _get(self, path: str) -> tuple[HTTPStatus, dict[str, Any]]:
        repo = self.server.repository
        if path in ("/v2/health/live", "/v2/health/ready"):
            key = path.rsplit("/", 1)[1]
            return HTTPStatus.OK, {key: True}
        if path == "/v2":
            return HTTPStatus.OK, {"name": "protofuse", "version": __version__, "extensions": []}
        match = _ROUTE.match(path)
        if match is None or match[3] == "/infer":
            raise RequestError(f"no such resource: GET {path[:200]}", HTTPStatus.NOT_FOUND)
        version, model = repo.get(match[1], match[2])
        if match[3] == "/ready":
            return HTTPStatus.OK, {"name": match[1], "ready": True}
        versions = sorted(repo.models[match[1]], key=int)
        return HTTPStatus.OK, metadata(match[1], version, model, versions)

    def _post(self, path: str) -> tuple[HTTPStatus, dict[str, Any]]:
        match = _ROUTE.match(path)
        if match is None or match[3] != "/infer":
            raise RequestError(f"no such resource: POST {path[:200]}", HTTPStatus.NOT_FOUND)
        version, model = self.server.repository.get(match[1], match[2])
        raw = self._body()
        limits = self.server.limits
        if not self.server.working.acquire(timeout=limits.timeout_s):
            raise RequestError(
                f"all {limits.max_working} places for requests stayed busy for "
                f"{limits.timeout_s:.0f} s; retry later",
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        try:
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as err:  # bad JSON, UTF-8, a 5,000-digit number
                raise RequestError(f"the body is not valid JSON ({str(err)[:120]})") from None
            del raw
            x, wanted = parse_inputs(body, int(model.bank_meta["x_dim"]), limits)
            outputs = infer(model, x, wanted)
        finally:
            self.server.working.release()
        answer: dict[str, Any] = {
            "model_name": match[1],
            "model_version": version,
            "outputs": outputs,
        }
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            answer["id"] = body["id"][:256]
        return HTTPStatus.OK, answer

    def _body(self) -> bytes:
        """The request's body, its declared length checked against the limit before reading."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(
                "Content-Length: missing or not a number", HTTPStatus.LENGTH_REQUIRED
            ) from None
        limit = self.server.limits.max_body_bytes
        if not 0 <= length <= limit:
            self.close_connection = True  # the body is not read: the connection cannot go on
            raise RequestError(
                f"the body is {length} bytes, more than {limit} (max_body_bytes); send fewer "
                "rows per request",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        # In chunks: a caller that declares megabytes and sends a trickle holds only what it
        # sent (and the socket's timeout drops it when it stops).
        parts, left = [], length
        while left:
            try:
                chunk = self.rfile.read(min(left, 1 << 20))
            except TimeoutError:
                chunk = b""
            if not chunk:
                self.close_connection = True
                raise RequestError(
                    f"the body ended after {length - left} of {length} bytes",
                    HTTPStatus.REQUEST_TIMEOUT,
                )
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)


class OpenInferenceServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection, at most ``max_connections`` of them (more are
    closed at once); the repository shared read-only."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], repository: Repository, limits: Limits) -> None:
        self.repository = repository
        self.limits = limits
        self.connections = threading.BoundedSemaphore(limits.max_connections)
        self.working = threading.BoundedSemaphore(limits.max_working)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.acquire(blocking=False):
            self.shutdown_request(request)  # full: the caller sees the connection closed
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


def serve(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    public_key: str | Path | None = None,
    unsigned_ok: bool = False,
    limits: Limits | None = None,
) -> OpenInferenceServer:
    """The server for the models under ``root``, bound and ready; call ``serve_forever()`` (in a
    thread, for tests) and ``shutdown()``."""
    repository = load_repository(root, public_key, unsigned_ok)
    return OpenInferenceServer((host, port), repository, limits or Limits())


def run_in_thread(server: OpenInferenceServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread
