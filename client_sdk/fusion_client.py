"""``FusionClient``: ask a protofuse adaptation service for a model for a new task.

    from client_sdk import FusionClient
    with FusionClient("fusion.example.org:50051", certs="certs/") as client:
        client.bank().manifest.vocabulary            # what the bank knows
        model = client.adapt(x_support, y_support)   # verified against the server's signing key
        model.predict_proba(x)

``certs`` is a folder with ``ca.crt`` (the deployment's CA), ``client.crt``/``client.key`` (this
caller's certificate, for mutual TLS) and ``signing.pub`` (the server's artifact-signing key);
each can also be given on its own. Every model received is verified before it is returned: an
unsigned model, or one signed by another key, raises :class:`SignatureError` unless you pass
``unsigned_ok=True`` explicitly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from protofuse import artifacts
from protofuse.adapted import KIND, AdaptedModel, HeldBank, from_files, from_task_files
from protofuse.protocol.federation import WireError
from protofuse.protocol.service import (
    SERVICE,
    AdaptRequest,
    AdaptResponse,
    BankInfo,
    ExpertList,
    OnnxExport,
    decode_adapt_response,
    decode_bank_info,
    decode_expert_list,
    encode_adapt_request,
    encode_empty_request,
)
from protofuse.signing import SignatureError, load_public_key

__all__ = ["FusionClient", "FusionError", "SignatureError"]

_MiB = 1 << 20
RETRY_FIRST_DELAY, RETRY_MAX_DELAY = 0.05, 2.0  # seconds: a busy service's retries


class FusionError(RuntimeError):
    """The service refused or failed a call; ``code`` is the gRPC status (e.g. INVALID_ARGUMENT)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method, self.code, self.details = method, code, details


class FusionClient:
    """A connection to one adaptation service (``protofuse serve``)."""

    def __init__(
        self,
        address: str,
        *,
        certs: str | os.PathLike | None = None,
        root_certificates: str | os.PathLike | None = None,
        certificate: str | os.PathLike | None = None,
        private_key: str | os.PathLike | None = None,
        public_key: Any = None,
        insecure: bool = False,
        unsigned_ok: bool = False,
        timeout: float = 120.0,
        retry_busy: bool = True,
    ) -> None:
        folder = Path(certs) if certs is not None else None

        def pick(given: str | os.PathLike | None, name: str) -> Path | None:
            """The path given, else the file ``name`` in the certs folder (None without either)."""
            if given is not None:
                return Path(given)
            return folder / name if folder is not None else None

        self.root_certificates = pick(root_certificates, "ca.crt")
        self.certificate = pick(certificate, "client.crt")
        self.private_key = pick(private_key, "client.key")
        found = pick(None, "signing.pub")
        key = (
            public_key
            if public_key is not None
            else (found if found is not None and (found.exists() or not unsigned_ok) else None)
        )
        self.public_key = load_public_key(key) if key is not None else None
        if self.public_key is None and not unsigned_ok:
            raise ValueError(
                "give the server's signing key (public_key= or certs= with signing.pub) so models "
                "can be verified, or unsigned_ok=True to accept unverified models"
            )
        self.unsigned_ok = unsigned_ok
        self.timeout = timeout
        # RESOURCE_EXHAUSTED (the service's queue or this caller's share of it is full) is tried
        # again after a random wait, doubling up to RETRY_MAX_DELAY, within ``timeout``.
        self.retry_busy = retry_busy
        self.address = address
        options = [
            ("grpc.max_receive_message_length", 512 * _MiB),
            ("grpc.max_send_message_length", 512 * _MiB),
        ]
        if insecure:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            if self.root_certificates is None:
                raise ValueError(
                    "give the deployment's CA certificate (root_certificates= or certs=), or "
                    "insecure=True for a service on a trusted host"
                )
            chain = (
                [
                    self._read(p, what)
                    for p, what in (
                        (self.private_key, "private_key"),
                        (self.certificate, "certificate"),
                    )
                ]
                if self.certificate is not None
                else [None, None]
            )
            creds = grpc.ssl_channel_credentials(
                self._read(self.root_certificates, "root_certificates"), chain[0], chain[1]
            )
            self._channel = grpc.secure_channel(address, creds, options=options)
        self._calls = {
            name: self._channel.unary_unary(f"/{SERVICE}/{name}")
            for name in ("Adapt", "GetBank", "ListExperts")
        }
        # The bank's arrays from the last full reply, by digest, and their bytes hashed: later
        # replies for the same bank version leave them out (a model's weights are mostly the
        # bank's, the same every time).
        self._bank_weights: tuple[str, HeldBank] | None = None

    # -- the service's methods --------------------------------------------------------------
    def bank(self) -> BankInfo:
        """The served bank's manifest (version, vocabulary, experts) and input width."""
        return decode_bank_info(self._call("GetBank", encode_empty_request("GetBankRequest")))

    def experts(self) -> ExpertList:
        """Every expert's label names, distribution over the prototypes, fidelity and trust."""
        return decode_expert_list(
            self._call("ListExperts", encode_empty_request("ListExpertsRequest"))
        )

    def adapt(
        self,
        x: np.ndarray,
        y: Any,
        *,
        out: str | os.PathLike | None = None,
        seed: int | None = None,
        onnx: str | os.PathLike | None = None,
        onnx_name: str = "model",
        onnx_version: int = 1,
        **options: Any,
    ) -> AdaptedModel:
        """A model for the task of the support set x (n, d), y (n,) label names, verified.

        ``options`` are the bank's adaptation settings (``prior_strength=...``); ``out`` also
        writes the model folder (the files exactly as the server signed them). ``onnx``: a model
        repository (Triton's, KServe's layout) the server's ONNX export of the model is also
        written to, as ``onnx_name/onnx_version/model.onnx`` with its ``labels.txt`` and
        ``config.pbtxt``; its signature is verified first, like the model's.
        """
        held = self._bank_weights  # read once: another thread may replace it meanwhile
        export_to = None if onnx is None else (str(onnx_name), onnx_version)
        source = f"model from {self.address}"
        prepared: list[torch.nn.Module] = []

        def prepare() -> None:
            """The held bank's networks for this model, copied while the service adapts (they
            do not depend on its reply; they are wasted only if it sends the whole model)."""
            if held is not None and not prepared:
                # Whatever fails here fails again where the networks are used, if they are: a
                # reply with the whole model needs none of the held bank's.
                with contextlib.suppress(Exception):
                    prepared.append(held[1].networks(source))

        response = self._adapt(x, y, held, seed=seed, onnx=export_to, meanwhile=prepare, **options)
        # Verified here (checksum and signature over the complete weights file) before any use.
        if response.bank_weights_omitted:
            if held is None or held[0] != response.bank_weights_digest:
                raise FusionError(
                    "Adapt",
                    grpc.StatusCode.DATA_LOSS,
                    f"the reply leaves out bank weights {response.bank_weights_digest[:16]}... "
                    "that this client does not hold",
                )
            try:
                task = artifacts.npz_arrays(
                    response.files["weights.npz"], f"{source}: task weights"
                )
                model, files = from_task_files(
                    response.files,
                    task,
                    held[1],
                    self.public_key,
                    unsigned_ok=self.unsigned_ok,
                    source=source,
                    networks=prepared[0] if prepared else None,
                )
            except ValueError:
                # Our copy may be what is wrong: the next reply brings all (unless another
                # thread has stored a newer copy meanwhile).
                if self._bank_weights is held:
                    self._bank_weights = None
                raise
        else:
            files = response.files
            model = from_files(files, self.public_key, unsigned_ok=self.unsigned_ok, source=source)
            self._keep_bank_weights(response, model)
        exported = None if export_to is None else self._checked_onnx(response, model, export_to)
        if out is not None:
            artifacts.write(out, files, KIND)
        if onnx is not None and exported is not None:
            from protofuse import export

            export.write_export(onnx, exported)
        return model

    def _checked_onnx(
        self, response: AdaptResponse, model: AdaptedModel, asked: tuple[str, int]
    ) -> OnnxExport:
        """The reply's ONNX export, once it is shown to be the verified ``model`` under the name
        and version asked for: signed by the trusted key, its labels and configuration those of
        the model, and (where onnxruntime is installed) its graph giving the model's answers."""
        from protofuse import export

        def refuse(why: str) -> FusionError:
            return FusionError("Adapt", grpc.StatusCode.DATA_LOSS, f"the ONNX export {why}")

        got = response.onnx
        if got is None:
            raise refuse("is missing from the reply, though asked for")
        if (got.name, got.version) != asked:
            raise refuse(
                f"is {got.name!r} version {got.version}, not {asked[0]!r} version {asked[1]}"
            )
        if self.public_key is not None:
            export.verify_export_files(got, self.public_key, f"ONNX export from {self.address}")
        labels = "".join(f"{c}\n" for c in model.classes_.tolist()).encode()
        config = export.triton_config(got.name, int(model.bank_meta["x_dim"]), len(model.classes_))
        if got.labels != labels or got.config != config:
            raise refuse("describes other classes or another input size than the adapted model")
        if importlib.util.find_spec("onnxruntime") is not None:
            try:
                export.check_parity(model, got.model)
            except Exception as err:  # onnxruntime refusing the file, or other answers
                raise refuse(f"does not give the adapted model's answers ({err})") from None
        return got

    def adapt_response(
        self,
        x: np.ndarray,
        y: Any,
        *,
        seed: int | None = None,
        onnx: tuple[str, int] | None = None,
        **options: Any,
    ) -> AdaptResponse:
        """The raw reply of Adapt (artifact files, fit metrics and, if ``onnx`` (name, version)
        asks, the ONNX export), not yet verified."""
        return self._adapt(x, y, self._bank_weights, seed=seed, onnx=onnx, **options)

    def _adapt(
        self,
        x: np.ndarray,
        y: Any,
        held: tuple[str, HeldBank] | None,
        *,
        seed: int | None = None,
        onnx: tuple[str, int] | None = None,
        meanwhile: Callable[[], None] | None = None,
        **options: Any,
    ) -> AdaptResponse:
        arr = np.asarray(x)
        if arr.dtype not in (np.float32, np.float64):
            if not np.issubdtype(arr.dtype, np.number):
                raise ValueError(f"x has dtype {arr.dtype}, expected numbers")
            arr = arr.astype(np.float64)
        labels = np.asarray(y)
        if labels.ndim != 1 or not (
            np.issubdtype(labels.dtype, np.str_) or np.issubdtype(labels.dtype, np.integer)
        ):
            raise ValueError(
                f"y has shape {labels.shape} and dtype {labels.dtype}; give one label name "
                "(string) per example"
            )
        opts = {k: str(v) for k, v in options.items()}
        if seed is not None:
            opts["seed"] = str(int(seed))
        known = held[0] if held else ""
        try:
            request = encode_adapt_request(
                AdaptRequest(arr, tuple(labels.astype(str).tolist()), opts, known, onnx)
            )
        except WireError as err:
            raise ValueError(str(err)) from None
        return decode_adapt_response(self._call("Adapt", request, meanwhile))

    def health(self, service: str = "") -> str:
        """The standard gRPC health status ("SERVING", "NOT_SERVING", ...) of the whole server or
        one service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=min(self.timeout, 10.0)
            )
        except grpc.RpcError as err:
            raise FusionError("Health/Check", err.code(), err.details() or "") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # -- plumbing ---------------------------------------------------------------------------
    def _keep_bank_weights(self, response: AdaptResponse, model: AdaptedModel) -> None:
        """Hold the bank part of a verified model when it is what the server will leave out of
        later replies (its .npz has the digest the server named)."""
        if not response.bank_weights_digest:
            return
        held = HeldBank.of(model)
        if held.prefix.whole_sha256 == response.bank_weights_digest:
            self._bank_weights = (response.bank_weights_digest, held)

    def _call(
        self, method: str, request: bytes, meanwhile: Callable[[], None] | None = None
    ) -> bytes:
        """One call within ``timeout``; a busy service (RESOURCE_EXHAUSTED) is asked again after
        a random wait (full jitter, doubling from RETRY_FIRST_DELAY) while time is left.
        ``meanwhile`` runs once, while the first attempt is in flight (work that does not need
        the reply, done on this thread while the service works on the request)."""
        deadline = time.monotonic() + self.timeout
        delay = RETRY_FIRST_DELAY
        while True:
            try:
                left = max(deadline - time.monotonic(), 0.001)
                if meanwhile is None:
                    return self._calls[method](request, timeout=left)
                call = self._calls[method].future(request, timeout=left)
                try:
                    meanwhile()
                except BaseException:
                    call.cancel()
                    raise
                meanwhile = None
                return call.result()
            except grpc.RpcError as err:
                # gRPC also says RESOURCE_EXHAUSTED for a message over a size limit: that one
                # never succeeds, so only the service's own "busy" is tried again.
                details = err.details() or ""
                busy = (
                    err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    and "larger than max" not in details
                )
                wait = random.uniform(0.0, delay)
                if not (busy and self.retry_busy) or time.monotonic() + wait >= deadline:
                    raise FusionError(method, err.code(), details) from None
            time.sleep(wait)
            delay = min(2 * delay, RETRY_MAX_DELAY)

    @staticmethod
    def _read(path: Path | None, what: str) -> bytes:
        if path is None:
            raise ValueError(f"{what}: not given; pass {what}= (or certs=, the folder holding it)")
        try:
            return path.read_bytes()
        except OSError as err:
            raise ValueError(f"{what}: cannot read {path} ({err.strerror})") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FusionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FusionClient({self.address!r})"
