"""FusionClient's calls against a real gRPC server on 127.0.0.1: a busy service is asked again
within the timeout, and work done while a call is in flight (``meanwhile``, the held bank's
networks copied while the service adapts) runs once, whatever the retries, and a failure in it
cancels the call."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from client_sdk import FusionClient, FusionError
from protofuse.protocol.service import SERVICE


class Service:
    """An Adapt method that is busy ``busy`` times, then echoes after ``delay`` seconds, noting
    calls cancelled while it waited."""

    def __init__(self) -> None:
        self.busy, self.delay, self.calls, self.cancelled = 0, 0.0, 0, 0
        self.lock = threading.Lock()

    def adapt(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            busy = self.busy > 0
            self.busy -= busy
        if busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the service is busy")
        stop = time.monotonic() + self.delay
        while time.monotonic() < stop:
            if not context.is_active():
                with self.lock:
                    self.cancelled += 1
                return b""
            time.sleep(0.01)
        return b"reply:" + request


@pytest.fixture
def served():
    service = Service()
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Adapt": grpc.unary_unary_rpc_method_handler(service.adapt)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with FusionClient(f"127.0.0.1:{port}", insecure=True, unsigned_ok=True, timeout=3.0) as c:
        yield service, c
    server.stop(None)


def test_work_meanwhile_runs_once_while_a_busy_service_is_asked_again(served):
    service, client = served
    service.busy = 2
    runs = []
    assert client._call("Adapt", b"a", lambda: runs.append(1)) == b"reply:a"
    assert service.calls == 3 and runs == [1]


def test_a_service_busy_past_the_timeout_gives_resource_exhausted_in_time(served):
    service, client = served
    service.busy = 10**6
    started = time.monotonic()
    with pytest.raises(FusionError) as err:
        client._call("Adapt", b"b", lambda: None)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - started < 3.5 and service.calls > 1


def test_a_failure_meanwhile_cancels_the_call_and_reaches_the_caller(served):
    service, client = served
    service.delay = 2.0

    def fail() -> None:  # once the service works on the call
        deadline = time.monotonic() + 2.0
        while service.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("meanwhile failed")

    with pytest.raises(RuntimeError, match="meanwhile failed"):
        client._call("Adapt", b"c", fail)
    deadline = time.monotonic() + 2.0
    while service.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert service.cancelled == 1
    service.delay = 0.0
    assert client._call("Adapt", b"d", lambda: None) == b"reply:d"  # the client carries on
