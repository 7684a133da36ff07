"""Prometheus metrics (server/metrics.py) scraped over HTTP from real servers: the adaptation
service counts every request by method and status, times it, shows its queue and rejections and
the bank it serves; the fusion ServerApp of a real simulation counts its rounds, clients, replies
and bytes (tests/integration/test_simulation.py, beside the other simulations). The scrape is
parsed with prometheus_client's own text parser."""

from __future__ import annotations

import socket
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from toys import toy_bank

from client_sdk import FusionClient, FusionError
from protofuse.bank import load_bank
from protofuse_server.metrics import ServiceMetrics, expose
from protofuse_server.service.server import build_server
from protofuse_server.service.settings import ServiceSettings


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_service_counts_times_and_describes_what_it_serves(tmp_path):
    bank, x, y = toy_bank()
    bank.save(tmp_path / "bank")
    metrics = ServiceMetrics.create()
    exporter = expose(metrics.registry, "127.0.0.1:0")
    port = exporter.server_address[1]
    server, grpc_port, _ = build_server(
        tmp_path / "bank", "127.0.0.1:0", ServiceSettings(max_classes=3), None, None, metrics
    )
    try:
        before = scrape(port)
        assert before[("protofuse_service_adapt_held", ())] == 0
        version = load_bank(tmp_path / "bank").version
        assert before[("protofuse_service_bank_info", (("version", version),))] == 1
        assert 0 <= before[("protofuse_service_bank_age_seconds", ())] < 600
        keep = np.isin(y, ("0", "1", "3"))
        with FusionClient(f"127.0.0.1:{grpc_port}", insecure=True, unsigned_ok=True) as client:
            for _ in range(3):
                client.adapt(x[keep][:12], y[keep][:12], out=tmp_path / "model")
            client.bank()
            with pytest.raises(FusionError):  # 4 classes: more than max_classes
                client.adapt(x[:40], y[:40], out=tmp_path / "refused")
        after = scrape(port)
    finally:
        server.stop(grace=None)
        exporter.shutdown()
    assert after[("protofuse_service_requests_total", (("code", "OK"), ("method", "Adapt")))] == 3
    assert after[("protofuse_service_requests_total", (("code", "OK"), ("method", "GetBank")))] >= 1
    invalid = (("code", "INVALID_ARGUMENT"), ("method", "Adapt"))
    assert after[("protofuse_service_requests_total", invalid)] == 1
    assert after[("protofuse_service_rejections_total", (("reason", "invalid"),))] == 1
    assert after[("protofuse_service_request_seconds_count", (("method", "Adapt"),))] == 4
    assert after[("protofuse_service_request_seconds_sum", (("method", "Adapt"),))] > 0
    assert after[("protofuse_service_adapt_held", ())] == 0
    assert after[("protofuse_service_adapt_running", ())] == 0


def test_a_metrics_address_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match=r"cannot serve metrics on 127\.0\.0\.1"):
            expose(ServiceMetrics.create().registry, f"127.0.0.1:{taken.getsockname()[1]}")
    with pytest.raises(ValueError, match="HOST:PORT"):
        expose(ServiceMetrics.create().registry, "9464")
    with pytest.raises(ValueError, match="up to 65535"):
        expose(ServiceMetrics.create().registry, "127.0.0.1:99999")


def test_a_run_whose_metrics_port_is_taken_goes_on_without_metrics(monkeypatch):
    from protofuse_server.fusion import server_app
    from protofuse_server.metrics import ADDRESS_ENV

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv(ADDRESS_ENV, f"127.0.0.1:{taken.getsockname()[1]}")
        with server_app._metrics() as metrics:
            assert metrics is None
