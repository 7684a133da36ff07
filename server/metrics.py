"""Prometheus metrics of the server's two processes, each in a registry of its own (two servers in
one process, as in the tests, never share a count), exposed over HTTP where the operator asks:
``protofuse serve --metrics-address``, and for the fusion ServerApp the environment variable
``PROTOFUSE_METRICS_ADDRESS`` of the process that runs it (compose sets both on the internal
network only). Flower has no exporter of its own.

The adaptation service: requests by method and status, latency, the Adapt queue (held, running),
rejections by reason, the bank's version and age. The fusion server: rounds completed, the
current round, clients per round, replies by status, bytes received.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

ADDRESS_ENV = "PROTOFUSE_METRICS_ADDRESS"
# Seconds: an Adapt call costs 20-40 ms on MNIST-5k, a large one seconds; the deadline is 120 s.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    30,
    120,
)


@dataclass
class ServiceMetrics:
    registry: CollectorRegistry
    requests: Counter  # (method, code): gRPC status names, OK included
    latency: Histogram  # (method)
    held: Gauge  # Adapt requests held, running or waiting for a slot: the queue
    running: Gauge  # adaptations running now
    rejected: Counter  # (reason): per_caller, busy, invalid
    bank: Gauge  # (version): 1 for the version served
    bank_age: Gauge  # seconds since the served version was written

    @classmethod
    def create(cls) -> ServiceMetrics:
        r = CollectorRegistry()
        # Collected in this order: the age first, its reading of the bank sets the version's.
        bank_age = Gauge(
            "protofuse_service_bank_age_seconds",
            "Seconds since the bank served now was written (-1: no bank)",
            registry=r,
        )
        return cls(
            registry=r,
            requests=Counter(
                "protofuse_service_requests",
                "Requests answered, by method and gRPC status",
                ["method", "code"],
                registry=r,
            ),
            latency=Histogram(
                "protofuse_service_request_seconds",
                "Time to answer a request, waiting included, by method",
                ["method"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            held=Gauge(
                "protofuse_service_adapt_held",
                "Adapt requests held now, running or waiting for an adaptation slot",
                registry=r,
            ),
            running=Gauge("protofuse_service_adapt_running", "Adaptations running now", registry=r),
            rejected=Counter(
                "protofuse_service_rejections",
                "Requests refused before any work, by reason (per_caller: the caller's limit; "
                "busy: no slot within the deadline; invalid: INVALID_ARGUMENT)",
                ["reason"],
                registry=r,
            ),
            bank=Gauge(
                "protofuse_service_bank_info",
                "The bank version served (1 for the version served now)",
                ["version"],
                registry=r,
            ),
            bank_age=bank_age,
        )

    def watch_bank(self, current: Callable[[], tuple[str, float] | None]) -> None:
        """Read the bank's (version, written at) at each scrape."""
        seen: list[str] = []

        def age() -> float:
            now = current()
            if now is None:
                return -1.0
            version, written = now
            if seen != [version]:
                for old in seen:
                    self.bank.remove(old)
                self.bank.labels(version).set(1)
                seen[:] = [version]
            return max(0.0, time.time() - written)

        self.bank_age.set_function(age)


@dataclass
class FusionMetrics:
    registry: CollectorRegistry
    rounds: Counter  # rounds completed (checkpointed)
    round: Gauge  # the last round completed
    clients: Gauge  # usable replies in the last round
    replies: Counter  # (status): ok, error (Flower's error reply or unknown node), invalid
    bytes: Counter  # bytes of the usable replies
    round_bytes: Gauge  # bytes of the last round's usable replies

    @classmethod
    def create(cls) -> FusionMetrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            rounds=Counter(
                "protofuse_fusion_rounds_completed", "Rounds completed and checkpointed", registry=r
            ),
            round=Gauge("protofuse_fusion_round", "The last round completed", registry=r),
            clients=Gauge(
                "protofuse_fusion_clients",
                "Clients with a usable reply in the last round",
                registry=r,
            ),
            replies=Counter(
                "protofuse_fusion_replies",
                "Replies to training rounds, by status (ok; error: Flower's error reply or an "
                "unknown node; invalid: refused by the checks, a strike)",
                ["status"],
                registry=r,
            ),
            bytes=Counter(
                "protofuse_fusion_reply_bytes", "Bytes of the usable replies received", registry=r
            ),
            round_bytes=Gauge(
                "protofuse_fusion_round_reply_bytes",
                "Bytes of the last round's usable replies",
                registry=r,
            ),
        )

    def round_done(self, r: int, clients: int, reply_bytes: int) -> None:
        self.rounds.inc()
        self.round.set(r)
        self.clients.set(clients)
        self.bytes.inc(reply_bytes)
        self.round_bytes.set(reply_bytes)


def expose(registry: CollectorRegistry, address: str) -> Any:
    """Serve ``registry`` at ``http://ADDRESS/metrics`` from a daemon thread; returns the HTTP
    server (its ``server_address`` holds the port bound, ``shutdown()`` stops it)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"metrics address {address!r}: give HOST:PORT with a port up to 65535, e.g. "
            "0.0.0.0:9464"
        )
    try:
        server, _ = start_http_server(int(port), host.strip("[]"), registry=registry)
    except OSError as err:
        raise OSError(f"cannot serve metrics on {address}: {err.strerror}") from None
    return server
