"""Experts served over HTTP by a model server: the Open Inference Protocol (KServe v2, Triton,
MLServer) and MLflow's scoring protocol (``mlflow models serve``).

Organizations usually serve their models already; these adapters let the client query such a
server as its black box. Only the standard library is used (``urllib.request`` and ``json``):

    expert = model_server_expert("open-inference", "http://models.internal:8080", ["cat", "dog"],
                                 model="pets", output="predict_proba")
    probs = query_expert(expert, x, "pets")

Each call to ``predict_proba`` splits its rows into requests of at most ``batch_size`` rows, with
a per-request ``timeout`` and up to ``retries`` retries (exponential backoff) on connection
errors, timeouts, HTTP 429 and 5xx. Other 4xx answers are the caller's fault and fail at once.
Failures raise :class:`ModelServerError`, naming the URL, the model, the HTTP status, the
server's own message and what to check. The counters ``n_requests`` (answered requests),
``n_rows`` (answered rows) and ``n_attempts`` (HTTP attempts, retries and failures included)
tell how many black-box queries were made. An adapter is not meant to be shared across threads.
"""

from __future__ import annotations

import http.client
import json
import math
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .experts import Expert, ExpertOutputError, _label_tuple

PROTOCOLS = ("open-inference", "mlflow")
_MAX_ERROR_TEXT = 600  # characters of a server's error message kept in ours
_MAX_ERROR_BODY = 64 * 1024  # bytes of an error body read at most


class ModelServerError(ExpertOutputError):
    """A model server failed, refused a request, or answered with something unusable.

    Attributes: ``url`` (the endpoint), ``model`` (None for MLflow), ``status`` (the HTTP status,
    None when no HTTP answer came) and ``server_message`` (the server's own error text, or the
    connection error).
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        model: str | None = None,
        status: int | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.model = model
        self.status = status
        self.server_message = server_message


def _check_labels(labels: Sequence[Any] | None, who: str) -> tuple[str, ...]:
    out = _label_tuple(labels, who)
    if not out:
        raise ValueError(
            f"{who}: labels is empty; give the label names of the model's output columns, in order"
        )
    dup = sorted({label for label in out if out.count(label) > 1})
    if dup:
        raise ValueError(
            f"{who}: labels {dup} appear more than once in {list(out)}; each output column needs "
            "its own label name"
        )
    return out


def _check_url(url: Any, who: str, protocol: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ValueError(
            f"{who}: url is {url!r}; give the server's base address, e.g. 'http://localhost:8080'"
        )
    url = url.strip().rstrip("/")
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(
            f"{who}: url {url!r} must start with http:// or https:// (e.g. 'http://{url}')"
        )
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{who}: url {url!r} has no host; give e.g. 'http://localhost:8080'")
    if parts.username or parts.password:
        raise ValueError(
            f"{who}: url {_redact(url)} carries credentials; pass them as headers instead, e.g. "
            "headers={'Authorization': 'Bearer ...'}"
        )
    if parts.query or parts.fragment:
        raise ValueError(
            f"{who}: url {url!r} has a query or fragment; give only the server's base address"
        )
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError(f"{who}: url {url!r} has an invalid port") from None
    path = parts.path.lower()
    if protocol == "open-inference" and (path.endswith("/v2") or "/v2/models" in path):
        raise ValueError(
            f"{who}: url {url!r} already contains the /v2 path; give the server root (e.g. "
            "'http://host:8080'): the adapter adds /v2/models/<model>/infer"
        )
    if protocol == "mlflow" and path.endswith("/invocations"):
        raise ValueError(
            f"{who}: url {url!r} already ends with /invocations; give the server root (e.g. "
            "'http://host:5000'): the adapter adds /invocations"
        )
    return url


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc="***@" + host)
    return urllib.parse.urlunsplit(parts)


def _positive_number(value: Any, name: str, who: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{who}: {name} is {value!r}; give a positive number of seconds")
    return float(value)


def _count(value: Any, name: str, who: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{who}: {name} is {value!r}; give an integer >= {minimum}")
    return int(value)


def _check_headers(headers: Mapping[str, str] | None, who: str) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise TypeError(
            f"{who}: headers must be a mapping of header names to values, e.g. {{'Authorization': "
            "'Bearer ...'}"
        )
    out = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{who}: header {key!r} must map a string name to a string value")
        out[key] = value
    return out


def _server_text(body: bytes) -> str:
    """The useful part of an error body: the JSON error fields, or a traceback's last line."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        found = []
        for key in ("error", "message", "detail", "error_message", "msg"):
            if key in data and data[key] not in (None, ""):
                value = data[key]
                found.append(value if isinstance(value, str) else json.dumps(value))
        trace = data.get("stack_trace")
        if isinstance(trace, str) and trace.strip():
            found.append(
                trace.strip().splitlines()[-1].strip()
            )  # MLflow: the model's own exception
        if found:
            text = "; ".join(found)
    elif "Traceback (most recent call last)" in text:
        # A server in debug mode (MLServer's default) answers a failure with the traceback.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
    if len(text) > _MAX_ERROR_TEXT:
        text = text[:_MAX_ERROR_TEXT] + " ..."
    return text or "(empty answer)"


def _describe_failure(err: BaseException, timeout: float) -> str:
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):
        return f"no answer within timeout={timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (nothing listens at that address and port)"
    return f"{type(reason).__name__}: {reason}"


class _HTTPExpert:
    """Batching, timeouts, retries, counters and error messages shared by the protocols."""

    protocol = ""
    backoff_base = 0.2  # seconds before the first retry; doubled for each further one
    backoff_cap = 5.0  # no single wait is longer (a server's Retry-After included)

    def __init__(
        self,
        url: str,
        labels: Sequence[str],
        *,
        timeout: float,
        retries: int,
        batch_size: int,
        headers: Mapping[str, str] | None,
        who: str,
    ) -> None:
        self.url = _check_url(url, who, self.protocol)
        self.labels = _check_labels(labels, who)
        self.timeout = _positive_number(timeout, "timeout", who)
        self.retries = _count(retries, "retries", who, 0)
        self.batch_size = _count(batch_size, "batch_size", who, 1)
        self.headers = _check_headers(headers, who)
        self.n_requests = 0  # requests answered successfully (one per batch)
        self.n_rows = 0  # rows answered successfully
        self.n_attempts = 0  # HTTP attempts, retries and failed attempts included

    # -- subclasses -------------------------------------------------------------------------
    def _endpoint(self) -> str:
        raise NotImplementedError

    def _payload(self, batch: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError

    def _parse(self, answer: Any, n: int) -> np.ndarray:
        raise NotImplementedError

    def _advice(self, status: int, batch: np.ndarray) -> str:
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(
                f"{self._where()}: queries have shape {x.shape}, expected (n, d): one flattened "
                "input per row"
            )
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise ValueError(f"{self._where()}: queries have dtype {x.dtype}; send real numbers")
        if not np.isfinite(x).all():
            row = int(np.argwhere(~np.isfinite(x))[0, 0])
            raise ValueError(
                f"{self._where()}: queries contain NaN or infinity (first in row {row}); JSON "
                "cannot carry them: clean or impute the inputs first"
            )
        out = np.empty((len(x), len(self.labels)), dtype=np.float64)
        for start in range(0, len(x), self.batch_size):
            batch = x[start : start + self.batch_size]
            answer = self._post(self._payload(batch), batch)
            out[start : start + len(batch)] = self._parse(answer, len(batch))
            self.n_requests += 1
            self.n_rows += len(batch)
        return out

    def _error(
        self, message: str, status: int | None = None, server_message: str | None = None
    ) -> ModelServerError:
        return ModelServerError(
            message,
            url=self._endpoint(),
            model=getattr(self, "model", None),
            status=status,
            server_message=server_message,
        )

    def _request(self, url: str, body: bytes | None, timeout: float) -> bytes:
        headers = {
            "Accept": "application/json",
            "User-Agent": "protofuse-client-sdk",
            **self.headers,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(
            url, data=body, headers=headers, method="POST" if body is not None else "GET"
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def _post(self, payload: dict[str, Any], batch: np.ndarray) -> Any:
        url = self._endpoint()
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode("utf-8")
        began = time.monotonic()
        failure = ""
        status: int | None = None
        server_message: str | None = None
        for attempt in range(self.retries + 1):
            wait = min(self.backoff_base * 2**attempt, self.backoff_cap)
            self.n_attempts += 1
            try:
                raw = self._request(url, body, self.timeout)
            except urllib.error.HTTPError as err:
                status = err.code
                try:
                    server_message = _server_text(err.read(_MAX_ERROR_BODY))
                except (OSError, http.client.HTTPException):
                    server_message = (
                        err.reason if isinstance(err.reason, str) else "(unreadable answer)"
                    )
                if status != 429 and status < 500:  # the caller's fault: retrying will not help
                    raise self._error(
                        f"{self._where()} answered HTTP {status} at {url}: "
                        f"{server_message.rstrip('.')}. {self._advice(status, batch)}",
                        status,
                        server_message,
                    ) from None
                failure = f"HTTP {status}: {server_message.rstrip('.')}"
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after and retry_after.strip().isdigit():
                    wait = min(float(retry_after.strip()), self.backoff_cap)
            except urllib.error.URLError as err:
                if isinstance(err.reason, ssl.SSLError):  # a certificate problem does not go away
                    raise self._error(
                        f"{self._where()}: TLS failure at {url}: {err.reason}. Check the server's "
                        "certificate, or the "
                        "system's trusted CA bundle (SSL_CERT_FILE) for a private CA",
                        None,
                        str(err.reason),
                    ) from None
                status, server_message, failure = (
                    None,
                    _describe_failure(err, self.timeout),
                    _describe_failure(err, self.timeout),
                )
            except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as err:
                status, server_message, failure = (
                    None,
                    _describe_failure(err, self.timeout),
                    _describe_failure(err, self.timeout),
                )
            else:
                try:
                    return json.loads(raw.decode("utf-8"))
                except ValueError:
                    snippet = raw[:200].decode("utf-8", errors="replace")
                    raise self._error(
                        f"{self._where()} answered at {url} with something that is not JSON: "
                        f"{snippet!r}; "
                        "check that url points at the model server itself (not a proxy or login "
                        "page)",
                        200,
                        snippet,
                    ) from None
            if attempt < self.retries:
                time.sleep(wait)
        spent = time.monotonic() - began
        tries = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        if status is None:
            hint = (
                f"Check that the server is running and reachable at {self.url}; for a slow model "
                "raise timeout= "
                f"(now {self.timeout:g} s) or lower batch_size= (now {self.batch_size})"
            )
        elif status == 429:
            hint = "The server is rate-limiting: lower the query rate, or raise retries="
        elif status in (502, 503, 504):
            hint = (
                "The server (or a proxy in front of it) is unavailable or overloaded: check that "
                "it is up and the "
                f"model loaded, or raise retries= (now {self.retries}) and timeout= (now "
                f"{self.timeout:g} s)"
            )
        else:
            hint = self._advice(status, batch)
        raise self._error(
            f"{self._where()} failed at {url} after {tries} in {spent:.1f} s; last: {failure}. "
            f"{hint}",
            status,
            server_message,
        )


def _float_matrix(values: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not numeric") from None


class OpenInferenceExpert(_HTTPExpert):
    """A model behind the Open Inference Protocol (KServe v2, Triton, MLServer, ...).

    Sends ``POST {url}/v2/models/{model}[/versions/{version}]/infer`` with one input tensor of
    shape [n, d] and reads the output named ``output`` (or the only output when ``output`` is
    None) as an (n, len(labels)) probability table. With MLServer's scikit-learn runtime pass
    ``output="predict_proba"``: it answers with ``predict`` (class labels) unless that output is
    requested (or its model-settings.json sets ``parameters.extra.predict_fn``). Triton checks the
    input's name and datatype against the model config: set ``input_name`` and ``datatype``
    ("FP32" or "FP64"; None sends FP64 for float64 queries and FP32 otherwise).
    """

    protocol = "open-inference"

    def __init__(
        self,
        url: str,
        model: str,
        labels: Sequence[str],
        *,
        version: str | int | None = None,
        output: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        batch_size: int = 256,
        headers: Mapping[str, str] | None = None,
        input_name: str = "input-0",
        datatype: str | None = None,
    ) -> None:
        who = "OpenInferenceExpert"
        if not isinstance(model, str) or not model.strip() or "/" in model:
            raise ValueError(
                f"{who}: model is {model!r}; give the model's name as the server knows it (e.g. "
                "the 'name' in MLServer's model-settings.json or Triton's model folder)"
            )
        if version is not None and (
            isinstance(version, bool)
            or not isinstance(version, (str, int))
            or not str(version).strip()
            or "/" in str(version)
        ):
            raise ValueError(
                f"{who}: version is {version!r}; give a version string such as '1' or 'v1', or "
                "None for the server's default"
            )
        if output is not None and (not isinstance(output, str) or not output.strip()):
            raise ValueError(
                f"{who}: output is {output!r}; give the name of the output holding the "
                "probabilities (e.g. 'predict_proba' for MLServer's scikit-learn runtime), or "
                "None to take the only output"
            )
        if not isinstance(input_name, str) or not input_name.strip():
            raise ValueError(
                f"{who}: input_name is {input_name!r}; give the name of the model's input tensor"
            )
        if datatype is not None and datatype not in ("FP32", "FP64"):
            raise ValueError(
                f"{who}: datatype is {datatype!r}; use 'FP32', 'FP64' or None (FP64 for float64 "
                "queries, FP32 otherwise)"
            )
        self.model = model.strip()
        self.version = None if version is None else str(version).strip()
        self.output = None if output is None else output.strip()
        self.input_name = input_name
        self.datatype = datatype
        super().__init__(
            url,
            labels,
            timeout=timeout,
            retries=retries,
            batch_size=batch_size,
            headers=headers,
            who=who,
        )

    def _model_path(self) -> str:
        path = "/v2/models/" + urllib.parse.quote(self.model, safe="")
        if self.version is not None:
            path += "/versions/" + urllib.parse.quote(self.version, safe="")
        return path

    def _endpoint(self) -> str:
        return self.url + self._model_path() + "/infer"

    def _where(self) -> str:
        version = f" version {self.version!r}" if self.version is not None else ""
        return f"Open Inference model {self.model!r}{version} at {self.url}"

    def _wire_type(self, batch: np.ndarray) -> str:
        if self.datatype is not None:
            return self.datatype
        return "FP64" if batch.dtype == np.float64 else "FP32"

    def _payload(self, batch: np.ndarray) -> dict[str, Any]:
        wire = self._wire_type(batch)
        data = batch.astype(np.float64 if wire == "FP64" else np.float32, copy=False)
        payload: dict[str, Any] = {
            "inputs": [
                {
                    "name": self.input_name,
                    "shape": [int(s) for s in data.shape],
                    "datatype": wire,
                    "data": data.ravel().tolist(),
                }
            ]
        }
        if self.output is not None:
            payload["outputs"] = [{"name": self.output}]
        return payload

    def _parse(self, answer: Any, n: int) -> np.ndarray:
        width = len(self.labels)
        outputs = answer.get("outputs") if isinstance(answer, dict) else None
        if (
            not isinstance(outputs, list)
            or not outputs
            or not all(isinstance(o, dict) for o in outputs)
        ):
            raise self._error(
                f"{self._where()} answered without an 'outputs' list ({str(answer)[:200]!r}); is "
                "this an Open Inference Protocol server?",
                200,
            )
        names = [o.get("name") for o in outputs]
        if self.output is not None:
            chosen = [o for o in outputs if o.get("name") == self.output]
            if not chosen:
                raise self._error(
                    f"{self._where()} answered with outputs {names}, not the requested "
                    f"{self.output!r}; pass output= one of {names}",
                    200,
                )
            out = chosen[0]
        elif len(outputs) == 1:
            out = outputs[0]
        else:
            raise self._error(
                f"{self._where()} answered with several outputs {names}; pass output= the one "
                "holding the probabilities",
                200,
            )
        name = out.get("name")
        if out.get("datatype") in ("BYTES", "BOOL"):
            raise self._error(
                f"{self._where()}: output {name!r} has datatype {out['datatype']}, not numbers; "
                f"{self._output_hint()}",
                200,
            )
        shape, data = out.get("shape"), out.get("data")
        if data is None:
            raise self._error(
                f"{self._where()}: output {name!r} carries no JSON 'data' (binary tensor data is "
                "not supported); ask for JSON outputs",
                200,
            )
        try:
            values = _float_matrix(data, f"output {name!r}").reshape(-1)
            dims = [int(s) for s in shape]
        except (TypeError, ValueError) as err:
            raise self._error(
                f"{self._where()}: output {name!r} cannot be read as numbers of shape {shape!r} "
                f"({err})",
                200,
            ) from None
        if math.prod(dims) != values.size:
            raise self._error(
                f"{self._where()}: output {name!r} declares shape {dims} but carries {values.size} "
                "values",
                200,
            )
        if values.size != n * width or not dims or dims[0] != n:
            if dims[:1] == [n] and values.size == n:
                raise self._error(
                    f"{self._where()}: output {name!r} has shape {dims}, one value per row, not "
                    f"({n}, {width}) probabilities: "
                    f"the server returned class predictions; {self._output_hint()}",
                    200,
                )
            raise self._error(
                f"{self._where()}: output {name!r} has shape {dims}, expected ({n}, {width}): one "
                "row per input, one column "
                f"per label {list(self.labels)}; check labels= and output=",
                200,
            )
        return values.reshape(n, width)

    def _output_hint(self) -> str:
        return (
            "request the probabilities output: for MLServer's scikit-learn runtime "
            "output='predict_proba' "
            "(or parameters.extra.predict_fn='predict_proba' in its model-settings.json); for "
            "other servers the "
            "output the model config names for probabilities"
        )

    def _served_models(self) -> list[str] | None:
        """Best effort: the model names the server lists (the repository extension), or None."""
        try:
            raw = self._request(self.url + "/v2/repository/index", b"{}", min(self.timeout, 5.0))
            index = json.loads(raw.decode("utf-8"))
        except (
            OSError,
            ValueError,
            http.client.HTTPException,
        ):  # an optional extension: many servers lack it
            return None
        if not isinstance(index, list):
            return None
        names = []
        for entry in index:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                label = entry["name"] + (
                    f" (version {entry['version']})" if entry.get("version") else ""
                )
                names.append(label)
        return names

    def _advice(self, status: int, batch: np.ndarray) -> str:
        sent = (
            f"sent {batch.shape[0]} rows x {batch.shape[1]} columns as "
            f"{self._wire_type(batch)} in input {self.input_name!r}"
        )
        if status == 404:
            version = f" version {self.version!r}" if self.version is not None else ""
            served = self._served_models()
            listing = (
                f" The server lists: {served}."
                if served
                else (" The server lists no models." if served == [] else "")
            )
            return (
                f"No model {self.model!r}{version} is served there. Check: the model name as "
                "registered on the server "
                "(MLServer: 'name' in model-settings.json; Triton: the model folder / config.pbtxt "
                "name; KServe: the "
                "InferenceService name), the version (omit version= for the default), that the "
                "model loaded (server "
                f"logs), and that url is the server root without /v2/...{listing}"
            )
        if status in (401, 403):
            return (
                "The server refused access: pass the credentials it needs in headers=, e.g. "
                "{'Authorization': 'Bearer <token>'}"
            )
        if status == 413:
            return (
                "The request is too large for the server: lower batch_size= (now "
                f"{self.batch_size})"
            )
        if status in (400, 422) or status >= 500:
            return (
                f"The model could not take the request ({sent}). Check that the rows have the "
                "width the model was "
                "trained on, the input name and datatype the model expects (input_name=, "
                "datatype=), and that output= "
                f"({self.output!r}) is an output the model has"
                + ("" if status < 500 else "; else see the server's logs")
            )
        return f"Check the request ({sent}) against the server's documentation"


class MLflowExpert(_HTTPExpert):
    """A model served by ``mlflow models serve`` (MLflow's scoring protocol).

    Sends ``POST {url}/invocations`` with ``{"inputs": [[...], ...]}`` and reads
    ``{"predictions": [[...], ...]}`` (or a bare list) as probabilities. Log a scikit-learn
    classifier with ``mlflow.sklearn.log_model(..., pyfunc_predict_fn="predict_proba")`` so
    that the server answers probabilities instead of class labels. Rows given as records
    (``[{"label": p, ...}, ...]``) are ordered by ``labels``.
    """

    protocol = "mlflow"

    def __init__(
        self,
        url: str,
        labels: Sequence[str],
        *,
        timeout: float = 30.0,
        retries: int = 3,
        batch_size: int = 256,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.model = None
        super().__init__(
            url,
            labels,
            timeout=timeout,
            retries=retries,
            batch_size=batch_size,
            headers=headers,
            who="MLflowExpert",
        )

    def _endpoint(self) -> str:
        return self.url + "/invocations"

    def _where(self) -> str:
        return f"MLflow model server at {self.url}"

    def _payload(self, batch: np.ndarray) -> dict[str, Any]:
        return {"inputs": batch.tolist()}

    def _parse(self, answer: Any, n: int) -> np.ndarray:
        width = len(self.labels)
        preds = answer.get("predictions") if isinstance(answer, dict) else answer
        if not isinstance(preds, list):
            keys = list(answer) if isinstance(answer, dict) else type(answer).__name__
            raise self._error(
                f"{self._where()} answered without a 'predictions' list (got {keys}); is this an "
                "MLflow scoring server?",
                200,
            )
        if preds and all(isinstance(row, dict) for row in preds):
            missing = [label for label in self.labels if label not in preds[0]]
            if missing:
                raise self._error(
                    f"{self._where()} answered with records whose columns {list(preds[0])} lack "
                    f"the labels {missing}; "
                    "give labels= the column names in order",
                    200,
                )
            preds = [[row.get(label) for label in self.labels] for row in preds]
        try:
            arr = _float_matrix(preds, "predictions")
        except ValueError:
            raise self._error(
                f"{self._where()} answered predictions that are not numbers "
                f"({str(preds)[:120]!r}); "
                "log the model with pyfunc_predict_fn='predict_proba' so it returns probabilities",
                200,
            ) from None
        if arr.ndim == 1 and len(arr) == n:
            raise self._error(
                f"{self._where()} answered one value per row (shape {arr.shape}), not ({n}, "
                f"{width}) probabilities: the model "
                "returns class predictions; log it with mlflow.sklearn.log_model(..., "
                "pyfunc_predict_fn='predict_proba')",
                200,
            )
        if arr.shape != (n, width):
            raise self._error(
                f"{self._where()} answered predictions of shape {arr.shape}, expected ({n}, "
                f"{width}): one row per input, "
                f"one column per label {list(self.labels)}; check labels=",
                200,
            )
        return arr

    def _advice(self, status: int, batch: np.ndarray) -> str:
        sent = f"sent {batch.shape[0]} rows x {batch.shape[1]} columns as 'inputs'"
        if status in (404, 405):
            return (
                f"No MLflow scoring endpoint at {self._endpoint()}: url must be the root of "
                "`mlflow models serve` (e.g. http://host:5000)"
            )
        if status in (401, 403):
            return (
                "The server refused access: pass the credentials it needs in headers=, e.g. "
                "{'Authorization': 'Bearer <token>'}"
            )
        if status == 413:
            return (
                "The request is too large for the server: lower batch_size= (now "
                f"{self.batch_size})"
            )
        if status == 415:
            return (
                "The server does not accept JSON; it must be MLflow's scoring server (content "
                "type application/json)"
            )
        return (
            f"The model could not take the request ({sent}). Check that the rows have the width "
            "the model was trained on "
            "and that the model's signature accepts a plain 2-D array"
            + ("" if status < 500 else "; else see the server's logs")
        )


def model_server_expert(
    protocol: str,
    url: str,
    labels: Sequence[str],
    *,
    model: str | None = None,
    version: str | int | None = None,
    output: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    batch_size: int = 256,
    headers: Mapping[str, str] | None = None,
    input_name: str | None = None,
    datatype: str | None = None,
) -> Expert:
    """An expert answered by a model server: protocol 'open-inference' (KServe v2, Triton,
    MLServer; needs ``model``) or 'mlflow' (``mlflow models serve``). See OpenInferenceExpert
    and MLflowExpert for the arguments."""
    if not isinstance(protocol, str) or protocol.strip().lower() not in PROTOCOLS:
        raise ValueError(
            f"protocol is {protocol!r}; use 'open-inference' (KServe v2, Triton, MLServer) or "
            "'mlflow' (mlflow models serve)"
        )
    protocol = protocol.strip().lower()
    if not isinstance(url, str) or not url.strip().lower().startswith(("http://", "https://")):
        raise ValueError(
            f"url is {url!r}; it must start with http:// or https://, e.g. 'http://localhost:8080'"
        )
    if protocol == "open-inference":
        if model is None:
            raise ValueError(
                "protocol 'open-inference' needs model=: the model's name as the server knows it"
            )
        return OpenInferenceExpert(
            url,
            model,
            labels,
            version=version,
            output=output,
            timeout=timeout,
            retries=retries,
            batch_size=batch_size,
            headers=headers,
            datatype=datatype,
            input_name="input-0" if input_name is None else input_name,
        )
    given = [
        name
        for name, value in (
            ("model", model),
            ("version", version),
            ("output", output),
            ("input_name", input_name),
            ("datatype", datatype),
        )
        if value is not None
    ]
    if given:
        raise ValueError(
            f"protocol 'mlflow' takes no {', '.join(given)}: an MLflow server serves one model at "
            f"{url.rstrip('/')}/invocations "
            "(log it with pyfunc_predict_fn='predict_proba' to get probabilities)"
        )
    return MLflowExpert(
        url, labels, timeout=timeout, retries=retries, batch_size=batch_size, headers=headers
    )
