"""``protofuse serve``: the adaptation service (``protofuse.v1.Fusion`` over gRPC) beside a bank.

Consumers send a support set and get back a signed adapted model; nothing else leaves the server
but the bank's public description (GetBank, ListExperts). Requests are validated completely
before any work (``INVALID_ARGUMENT`` naming the field); limits are settings with safe defaults;
a new bank version written by the federation is served without a restart. Callers authenticate
with mutual TLS (a client certificate issued by the deployment's CA); insecure mode exists for
tests on a trusted host and says so in the log. The standard gRPC health service and server
reflection run beside Fusion.

Handlers take and return bytes: the codecs of :mod:`protofuse.protocol.service` do all conversion
and validation, so no generated stub is needed and the checks are the same on both sides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ConfigDict

from protofuse import artifacts, signing
from protofuse.protocol.federation import WireError
from protofuse.protocol.service import (
    METHODS,
    SERVICE,
    AdaptResponse,
    BankInfo,
    FitMetrics,
    OnnxExport,
    decode_adapt_request,
    decode_empty_request,
    encode_adapt_response,
    encode_bank_info,
    encode_expert_list,
)
from protofuse.settings import AdaptSettings

from ..metrics import ServiceMetrics
from .served_bank import ServedBank
from .settings import ServiceSettings

log = logging.getLogger("protofuse.service")
OPTION_NAMES = frozenset({"seed", *AdaptSettings.model_fields})
MiB = 1 << 20


class FusionService:
    """The Fusion methods over a :class:`ServedBank`; each handler takes and returns bytes."""

    def __init__(
        self,
        bank: ServedBank,
        settings: ServiceSettings,
        signing_key: Any | None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.bank = bank
        self.settings = settings
        self.signing_key = signing_key
        self._slots = threading.BoundedSemaphore(settings.max_concurrent)
        self._held: dict[str, int] = {}  # Adapt requests each caller has held now
        self._held_lock = threading.Lock()
        # The ONNX graph of each served bank version's encoder, exported once (the head of each
        # task is added to it per request: about a second saved on every export).
        self._encoders: dict[str, bytes | str] = {}  # bank version -> graph, or why none
        self._encoders_lock = threading.Lock()
        self.metrics = metrics
        if metrics is not None:
            metrics.held.set_function(self._held_total)
            metrics.watch_bank(self._served_version)

    def _held_total(self) -> int:
        with self._held_lock:
            return sum(self._held.values())

    def _served_version(self) -> tuple[str, float] | None:
        snapshot = self.bank.get()
        return None if snapshot is None else (snapshot.bank.version, snapshot.written_at)

    def _rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {"Adapt": self.adapt, "GetBank": self.get_bank, "ListExperts": self.list_experts}
        assert set(methods) == set(METHODS)
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(_logged(name, fn, self.metrics))
                for name, fn in methods.items()
            },
        )

    def _snapshot(self, context: grpc.ServicerContext):
        snapshot = self.bank.get()
        if snapshot is None:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the bank in {self.bank.bank_dir} cannot be served ({self.bank.error}); the "
                "operator must replace it"
                if self.bank.error
                else f"no bank yet in {self.bank.bank_dir}: the federation has not written one; "
                "try again after its first run",
            )
        return snapshot

    def get_bank(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        _decode(context, decode_empty_request, "GetBankRequest", request)
        snapshot = self._snapshot(context)
        return encode_bank_info(BankInfo(snapshot.manifest, snapshot.bank.meta.x_dim))

    def list_experts(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        _decode(context, decode_empty_request, "ListExpertsRequest", request)
        return encode_expert_list(self._snapshot(context).experts)

    def adapt(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._caller_slot(context):
            return self._adapt(request, context)

    @contextmanager
    def _caller_slot(self, context: grpc.ServicerContext) -> Iterator[None]:
        """One of the caller's max_per_caller places: no caller fills the queue alone."""
        caller = _caller_key(context)
        with self._held_lock:
            held = self._held.get(caller, 0)
            if held >= self.settings.max_per_caller:
                refused = True
            else:
                refused = False
                self._held[caller] = held + 1
        if refused:
            self._rejected("per_caller")
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller} already has {held} Adapt requests running or waiting, this service's "
                f"limit per caller (--max-per-caller); wait for one to finish",
            )
        try:
            yield
        finally:
            with self._held_lock:
                left = self._held[caller] - 1
                if left:
                    self._held[caller] = left
                else:
                    del self._held[caller]

    def _adapt(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        started = time.monotonic()
        snapshot = self._snapshot(context)
        bank = snapshot.bank
        req = _decode(
            context,
            decode_adapt_request,
            request,
            max_support=self.settings.max_support,
            input_width=bank.meta.x_dim,
            option_names=OPTION_NAMES,
            max_classes=self.settings.max_classes,
            max_work=self.settings.max_work,
        )
        self._check_sampling_work(context, bank, req)
        if req.onnx is not None:
            _check_onnx_possible(context, bank.family)
        options: dict[str, Any] = dict(req.options)
        seed = options.pop("seed", "0")
        try:
            seed = int(seed)
            if not 0 <= seed < 2**63:
                raise ValueError
        except ValueError:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"AdaptRequest.options['seed']: {seed!r} is not an integer in [0, 2**63)",
            )
        budget = self._budget(context, started)
        if not self._slots.acquire(timeout=budget):
            self._rejected("busy")
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"all {self.settings.max_concurrent} adaptation slots stayed busy for {budget:.0f} "
                "s; retry later",
            )
        try:
            if not context.is_active():  # the caller gave up while waiting
                context.abort(
                    grpc.StatusCode.CANCELLED, "the caller cancelled before adaptation started"
                )
            t0 = time.perf_counter()
            running = self.metrics.running if self.metrics is not None else None
            if running is not None:
                running.inc()
            try:
                model = bank.adapt(req.x, np.asarray(req.labels), seed=seed, **options)
            except ValueError as err:  # options the bank refuses, labels its family cannot fit
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, _request_error(str(err)))
            finally:
                if running is not None:
                    running.dec()
            seconds = time.perf_counter() - t0
            # The caller already holds this bank version's weights: send the task's arrays alone.
            omit = req.known_bank_weights_digest == snapshot.bank_weights_digest
            try:
                files = model.to_files(self.signing_key, snapshot.prefix, bank_weights=not omit)
            except artifacts.ArtifactError as err:  # NaN or infinite weights: never served
                log.warning("Adapt: the fitted model is not finite (%s)", err)
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "AdaptRequest.x: adaptation on these inputs gave NaN or infinite weights; "
                    "send inputs preprocessed like the experts' queries (the bank's range is "
                    f"{bank.meta.input_range or 'not recorded'})",
                )
            except ValueError:  # its bank's weights are not the served version's: send them all
                log.error("Adapt: a model's bank weights differ from the served version's")
                omit = False
                files = model.to_files(self.signing_key, snapshot.prefix)
            onnx = None if req.onnx is None else self._onnx(context, snapshot, model, *req.onnx)
        finally:
            self._slots.release()
            if len(req.x) * len(set(req.labels)) >= TRIM_AFTER_WORK:
                release_free_memory()
        metrics = FitMetrics(
            tuple(model.classes_.tolist()),
            len(req.x),
            model.info["support_accuracy"],
            seconds,
            model.info.get("method", ""),
            tuple(model.info.get("uncovered_labels", ())),
        )
        return encode_adapt_response(
            AdaptResponse(bank.version, files, metrics, snapshot.bank_weights_digest, omit, onnx)
        )

    def _onnx(
        self, context: grpc.ServicerContext, snapshot: Any, model: Any, name: str, version: int
    ) -> OnnxExport:
        """The adapted model as a signed ONNX export, its encoder's graph reused per version (a
        failed export of it too: the next request is refused at once, not after another try)."""
        from protofuse import export

        key = snapshot.bank_weights_digest
        wait = context.time_remaining()
        wait = self.settings.deadline_s if wait is None else max(0.0, wait)
        if not self._encoders_lock.acquire(timeout=wait):
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "AdaptRequest.onnx: the bank's encoder was still being exported when the "
                "deadline passed; retry",
            )
        try:  # one export of the encoder per version, whoever asks
            if key not in self._encoders:
                try:
                    encoder: bytes | str = export.encoder_onnx(model)
                except Exception as err:  # torch's exporter raises many kinds; all mean "cannot"
                    log.exception("Adapt: the bank's encoder cannot be exported as ONNX")
                    encoder = f"the bank's encoder cannot be exported as ONNX ({err})"
                self._encoders = {key: encoder}  # older versions go
            encoder = self._encoders[key]
        finally:
            self._encoders_lock.release()
        if isinstance(encoder, str):
            context.abort(grpc.StatusCode.INTERNAL, f"AdaptRequest.onnx: {encoder}")
            raise RuntimeError(encoder)  # abort raises; for the type checker
        try:
            return export.export_files(model, name, version, self.signing_key, encoder=encoder)
        except export.ExportError as err:  # the graph would not give the model's answers
            log.error("Adapt: ONNX export failed: %s", err)
            context.abort(grpc.StatusCode.INTERNAL, f"AdaptRequest.onnx: {err}")
            raise  # abort raises; for the type checker

    def _check_sampling_work(self, context: grpc.ServicerContext, bank: Any, req: Any) -> None:
        """A generative bank's adaptation samples n_z per example and class: a request raising
        n_z above the bank's own setting pays for it in the work limit."""
        if bank.family != "generative" or "n_z" not in req.options:
            return
        try:
            n_z = int(req.options["n_z"])
        except ValueError:
            return  # the bank's settings name the option and its range
        factor = max(1.0, n_z / bank.adapt_settings.n_z)
        work = len(req.x) * len(set(req.labels)) * factor
        if work > self.settings.max_work:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"AdaptRequest.options['n_z']: {n_z} samples ({factor:.0f}x the bank's "
                f"{bank.adapt_settings.n_z}) make {len(req.x)} examples x "
                f"{len(set(req.labels))} classes cost {work:.0f}, more than this service's limit "
                f"of {self.settings.max_work} per request; use a lower n_z or fewer examples",
            )

    def _budget(self, context: grpc.ServicerContext, started: float) -> float:
        """Seconds this request may still wait: the shorter of its caller's deadline and ours."""
        ours = self.settings.deadline_s - (time.monotonic() - started)
        theirs = context.time_remaining()
        return max(0.0, min(ours, theirs) if theirs is not None else ours)


def _check_onnx_possible(context: grpc.ServicerContext, family: str) -> None:
    """An ONNX export is refused before any work where it cannot be made."""
    if family != "discriminative":
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"AdaptRequest.onnx: this service's bank is of the {family} family, whose models "
            "predict by sampling; ONNX export covers the discriminative family (leave onnx unset)",
        )
    from protofuse.export import missing_libraries

    if missing_libraries():
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            "AdaptRequest.onnx: this service was installed without ONNX support; leave onnx "
            "unset, or ask the operator to install protofuse[server,onnx]",
        )


def _request_error(text: str) -> str:
    """The bank's refusal of a request, named by the request's field (x, labels, options)."""
    if "adaptation options" in text:
        return f"AdaptRequest.options: {text}"
    for prefix, field in (("x: ", "x"), ("y: ", "labels")):
        if text.startswith(prefix):
            return f"AdaptRequest.{field}: {text[len(prefix) :]}"
    return f"AdaptRequest: {text}"


def _decode(
    context: grpc.ServicerContext, decoder: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    try:
        return decoder(*args, **kwargs)
    except WireError as err:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))


def _logged(
    name: str,
    fn: Callable[[bytes, grpc.ServicerContext], bytes],
    metrics: ServiceMetrics | None = None,
) -> Callable[[bytes, grpc.ServicerContext], bytes]:
    """``fn`` with each call logged and, given ``metrics``, counted by status and timed."""

    def run(request: bytes, context: grpc.ServicerContext) -> bytes:
        t0 = time.perf_counter()
        code = "OK"
        try:
            return fn(request, context)
        except Exception:
            code = getattr(context.code(), "name", "UNKNOWN")
            raise
        finally:
            seconds = time.perf_counter() - t0
            log.info("%s from %s: %s in %.0f ms", name, _caller(context), code, 1000 * seconds)
            if metrics is not None:
                metrics.requests.labels(name, code).inc()
                metrics.latency.labels(name).observe(seconds)
                if code == "INVALID_ARGUMENT":
                    metrics.rejected.labels("invalid").inc()

    return run


def _caller_key(context: grpc.ServicerContext) -> str:
    """Whom a per-caller limit counts: the caller's host (without the port: more connections are
    still one caller) and, under mutual TLS, its certificate's name (consumers of a deployment
    may share one client certificate, so the name alone would make them all one caller)."""
    peer = context.peer()  # "ipv4:10.0.0.5:51234", "ipv6:[::1]:51234", "unix:/path"
    host = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    names = context.auth_context().get("x509_common_name") or ()
    return f"caller {names[0].decode()!r} at {host}" if names else f"caller at {host}"


# Work (support examples x classes) above which the allocator is asked to hand freed memory back
# to the system: glibc keeps the arenas of a large adaptation's threads otherwise (measured: four
# large calls left 3 GB resident).
TRIM_AFTER_WORK = 5_000


def release_free_memory() -> None:
    """glibc's malloc_trim(0): give freed heap pages back to the system (elsewhere, nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return cast(Callable[[int], int], libc.malloc_trim)
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


def _caller(context: grpc.ServicerContext) -> str:
    """The caller's certificate name under mutual TLS, else its address."""
    names = context.auth_context().get("x509_common_name") or ()
    return names[0].decode() if names else context.peer()


# -- the server -------------------------------------------------------------------------------


class Credentials(BaseModel):
    """Where the service's TLS identity, the CA its callers' certificates must chain to, and the
    signing key are; ``from_folder`` reads the layout ``protofuse certs init`` writes."""

    model_config = ConfigDict(frozen=True)

    certificate: Path
    private_key: Path
    client_ca: Path
    signing_key: Path | None = None

    @classmethod
    def from_folder(cls, folder: Path) -> Credentials:
        creds = cls(
            certificate=folder / "server.crt",
            private_key=folder / "server.key",
            client_ca=folder / "ca.crt",
            signing_key=folder / "signing.key",
        )
        missing = [
            str(p)
            for p in (creds.certificate, creds.private_key, creds.client_ca, creds.signing_key)
            if p is not None and not p.exists()
        ]
        if missing:
            raise ValueError(
                f"--certs {folder}: missing {missing}; create the folder with `protofuse certs "
                f"init --out {folder}`"
            )
        return creds


def build_server(
    bank_path: Path,
    address: str,
    settings: ServiceSettings,
    credentials: Credentials | None,
    signing_key_path: Path | None = None,
    metrics: ServiceMetrics | None = None,
) -> tuple[grpc.Server, int, ServedBank]:
    """A started gRPC server; returns it, the port it bound and its bank holder. ``metrics``
    (``server.metrics.expose`` serves its registry) counts every request."""
    key_path = signing_key_path or (credentials.signing_key if credentials else None)
    signing_key = signing.load_private_key(key_path) if key_path else None
    if signing_key is None:
        log.warning(
            "no signing key: adapted models are sent unsigned, and SDKs that verify will refuse "
            "them"
        )
    served = ServedBank(bank_path, settings.reload_interval_s)
    fusion = FusionService(served, settings, signing_key, metrics)
    limit = int(settings.max_message_mb * MiB)
    server = grpc.server(
        # A worker per request held: Adapt calls waiting for a slot must not starve health checks
        # and GetBank. One torch thread each (OpenMP's count is per calling thread: set in every
        # worker).
        futures.ThreadPoolExecutor(
            max_workers=settings.max_queued + 4,
            thread_name_prefix="fusion",
            initializer=torch.set_num_threads,
            initargs=(1,),
        ),
        handlers=[fusion.handler()],
        maximum_concurrent_rpcs=settings.max_queued,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", 512 * MiB),
            ("grpc.so_reuseport", 0),
            # A stream holds one of max_queued places from its headers on, before its body (and
            # so before any per-caller count): no connection opens more streams than a caller
            # may hold, and none lives longer than a request may take, so a caller that sends
            # headers and never a body frees its places within deadline_s.
            ("grpc.max_concurrent_streams", settings.max_per_caller),
            ("grpc.max_connection_age_ms", int(1000 * settings.deadline_s)),
            ("grpc.max_connection_age_grace_ms", int(1000 * settings.deadline_s)),
        ],
    )
    checker = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection(
        (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if credentials is None:
            log.warning(
                "insecure mode: no TLS and no caller authentication; anyone who reaches %s can "
                "adapt models and read the bank's description",
                address,
            )
            port = server.add_insecure_port(address)
        else:
            tls = grpc.ssl_server_credentials(
                [(credentials.private_key.read_bytes(), credentials.certificate.read_bytes())],
                root_certificates=credentials.client_ca.read_bytes(),
                require_client_auth=True,
            )
            port = server.add_secure_port(address, tls)
    except (
        RuntimeError
    ) as err:  # grpc raises this for a port in use, a bad address, unusable TLS files
        raise OSError(
            f"cannot listen on {address}: {err} (is the port in use, the address one of this "
            "host's, the certificate and key a pair in PEM?)"
        ) from None
    server.start()
    _track_health(checker, served, settings.reload_interval_s or 1.0)
    return server, port, served


def _track_health(checker: health.HealthServicer, served: ServedBank, interval: float) -> None:
    """The process is SERVING once started; the Fusion service only while it has a bank."""
    checker.set("", health_pb2.HealthCheckResponse.SERVING)

    def watch() -> None:
        while True:
            try:
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if served.get() is not None
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
            except Exception:
                log.exception("checking the bank failed")
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            checker.set(SERVICE, status)
            time.sleep(interval)

    threading.Thread(target=watch, name="fusion-health", daemon=True).start()
