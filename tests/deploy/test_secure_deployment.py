"""The secured deployment as local processes on 127.0.0.1 (the fast variant of
tests/deploy/test_compose.py): a SuperLink with TLS and SuperNode authentication, the Fleet-only
nginx proxy rendered from
deploy/proxy/fleet.conf.template, three SuperNodes that reach the SuperLink only through the proxy,
the federation submitted on the internal Control API, then the adaptation service over the run
folder with mutual TLS: a held-out task adapted through FusionClient, its signature verified.

Needs nginx on the host (`.ci/run` installs Debian's). Every process is stopped by process group.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from polling import wait_until

from bench.organizations import held_out_task
from client_sdk import FusionClient, FusionError
from protofuse.flower.launcher import (
    flower_bin,
    flower_env,
    free_port,
    start_superlink,
    stop,
    write_connection,
)
from protofuse.flower.simulation import app_dir
from protofuse_server.certs import init

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "proxy" / "fleet.conf.template"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

pytestmark = pytest.mark.skipif(
    not Path(NGINX).exists() and os.environ.get("CI") is None,
    reason="nginx is not installed (apt-get install nginx; .ci/run does)",
)


def render(template: Path, **values: str) -> str:
    """Replace every ${NAME} of the template; a placeholder left unset is an error."""
    text = "\n".join(
        line for line in template.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    missing = sorted(set(re.findall(r"\$\{([A-Z_]+)\}", text)) - set(values))
    assert not missing, f"no value for {missing}"
    return re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], text)


def start_proxy(tmp: Path, certs: Path, listen: int, superlink: int) -> subprocess.Popen:
    run = tmp / "proxy"
    run.mkdir()
    conf = run / "nginx.conf"
    conf.write_text(
        render(
            TEMPLATE,
            LISTEN=f"127.0.0.1:{listen}",
            SUPERLINK=f"127.0.0.1:{superlink}",
            SUPERLINK_TLS_NAME="superlink",
            CA_CERT=str(certs / "ca.crt"),
            TLS_CERT=str(certs / "server.crt"),
            TLS_KEY=str(certs / "server.key"),
            MAX_BODY_SIZE="64m",
            RUN_DIR=str(run),
        )
    )
    check = subprocess.run(
        [NGINX, "-t", "-q", "-c", str(conf), "-p", str(run), "-e", "stderr"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    # Run as root, nginx's workers would become `nobody`, who cannot enter pytest's private tmp.
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    with open(tmp / "proxy.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [NGINX, "-c", str(conf), "-p", str(run), "-e", "stderr", "-g", directives],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    assert wait_until(
        lambda: _status(f"https://localhost:{listen}/health", certs) == 200, 30, interval=0.3
    ), (tmp / "proxy.log").read_text()
    return proc


def _status(url: str, certs: Path, method: str = "GET", body: bytes | None = None) -> int | None:
    tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=body, method=method), timeout=5, context=tls
        ) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def test_secured_federation_through_the_fleet_proxy_then_a_signed_model_from_the_service(
    folders, tmp_path
):
    tmp, specs, server_spec, splits = folders
    certs = tmp / "certs"
    init(certs, supernodes=4)  # node-3 is never registered
    home = tmp / "flwr-home"
    link_port, proxy_port, service_port = free_port(), free_port(), free_port()
    write_connection(home, "internal", link_port, root_certificates=certs / "ca.crt")
    # A second connection that goes through the proxy, as an outsider holding the CA would try.
    with open(home / "config.toml", "a") as f:
        f.write(
            f'\n[superlink.outside]\naddress = "127.0.0.1:{proxy_port}"\nroot-certificates = '
            f'"{certs / "ca.crt"}"\n'
        )
    env = flower_env(home)
    flwr = flower_bin("flwr")
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            start_superlink(
                home, link_port, simulation=False, log_file=tmp / "superlink.log", certs=certs
            )
        )
        procs.append(start_proxy(tmp, certs, proxy_port, link_port))

        # The control routes are unreachable through the proxy; Fleet and health are reachable.
        assert (
            _status(f"https://localhost:{proxy_port}/v1/control/list-runs", certs, "POST", b"")
            == 404
        )
        assert (
            _status(f"https://localhost:{proxy_port}/v1/control/register-node", certs, "POST", b"")
            == 404
        )
        assert (
            _status(
                f"https://localhost:{proxy_port}/v1/fleet/..%2fcontrol/list-runs",
                certs,
                "POST",
                b"",
            )
            == 404
        )
        assert _status(f"https://localhost:{proxy_port}/docs", certs) == 404
        assert (
            _status(f"https://localhost:{link_port}/docs", certs) == 200
        )  # the internal port has them
        outside = subprocess.run(
            [flwr, "supernode", "register", str(certs / "supernodes" / "node-3.pub"), "outside"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        told = outside.stdout + outside.stderr
        assert (
            outside.returncode != 0
            and "404 Not Found" in told
            and "/v1/control/register-node" in told
        ), told
        outside_run = subprocess.run(
            [
                flwr,
                "run",
                str(app_dir()),
                "outside",
                "--run-config",
                f'spec="{server_spec}" out="{tmp / "stolen"}"',
            ],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (
            outside_run.returncode != 0
            and "404 Not Found" in outside_run.stdout + outside_run.stderr
            and not (tmp / "stolen").exists()
        ), outside_run.stdout + outside_run.stderr

        for i in range(3):  # the operator registers each organization's public key, internally
            reg = subprocess.run(
                [
                    flwr,
                    "supernode",
                    "register",
                    str(certs / "supernodes" / f"node-{i}.pub"),
                    "internal",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert reg.returncode == 0, reg.stdout + reg.stderr
        cli = [sys.executable, "-m", "protofuse_cli.main", "client"]
        secure = [
            "--superlink",
            f"127.0.0.1:{proxy_port}",
            "--root-certificates",
            str(certs / "ca.crt"),
        ]
        for i, spec in enumerate(specs):
            cmd = [
                *cli,
                str(spec),
                *secure,
                "--port",
                str(free_port()),
                "--auth-supernode-private-key",
                str(certs / "supernodes" / f"node-{i}.key"),
            ]
            with open(tmp / f"client{i}.log", "wb") as log:  # the child keeps its own copy
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        # A SuperNode whose key nobody registered is refused and stops.
        stranger_log = tmp / "stranger.log"
        with open(stranger_log, "wb") as log:
            stranger = subprocess.Popen(
                [
                    *cli,
                    str(specs[0]),
                    *secure,
                    "--port",
                    str(free_port()),
                    "--auth-supernode-private-key",
                    str(certs / "supernodes" / "node-3.key"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(stranger)

        result = subprocess.run(
            [
                flwr,
                "run",
                str(app_dir()),
                "internal",
                "--stream",
                "--run-config",
                f'spec="{server_spec}" out="{tmp / "run"}"',
            ],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert (tmp / "run" / "bank" / "meta.json").exists(), (
            result.stdout[-4000:] + result.stderr[-2000:]
        )
        # (Its SuperExec child keeps retrying until the group is stopped: Flower's behaviour.)
        try:
            stranger.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "the SuperNode with an unregistered key kept "
                f"running:\n{stranger_log.read_text()[-3000:]}"
            )
        assert stranger.returncode != 0
        assert "Failed to activate SuperNode" in stranger_log.read_text(), stranger_log.read_text()[
            -3000:
        ]
        assert re.search(
            r'"POST /v1/fleet/\S+ HTTP/1.1" 412', (tmp / "proxy.log").read_text()
        )  # unknown key: 412 from the SuperLink

        # The adaptation service over the run folder, with mutual TLS.
        with open(tmp / "service.log", "wb") as log:  # the child keeps its own copy
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "protofuse_cli.main",
                        "serve",
                        str(tmp / "run"),
                        "--address",
                        f"127.0.0.1:{service_port}",
                        "--certs",
                        str(certs),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        address = f"127.0.0.1:{service_port}"
        with FusionClient(address, certs=certs) as client:
            assert wait_until(lambda: _healthy(client), 60, interval=0.3), (
                tmp / "service.log"
            ).read_text()
            sx, sy, tx, ty = held_out_task(splits)
            model = client.adapt(sx, sy, out=tmp / "model")
            accuracy = float((model.predict(tx) == ty).mean())
            # A sanity bound (the benchmark measures accuracy): with layer norm, a federation\'s
            # default, this 10-round federation measured 0.86 (0.79 at 4 rounds).
            assert accuracy > 0.8, accuracy
            assert model.bank_meta["version"] == client.bank().manifest.version
            assert sorted(e.expert.pseudonym for e in client.experts().experts) == [
                "east",
                "north",
                "west",
            ]
            with pytest.raises(FusionError) as bad:
                client.adapt(sx[:, :10], sy)  # the SDK sends it; the server refuses it
            assert (
                bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
                and "AdaptRequest.x.shape" in bad.value.details
            )
            assert (
                client.health() == "SERVING" and client.health("protofuse.v1.Fusion") == "SERVING"
            )
        with FusionClient(
            address,
            root_certificates=certs / "ca.crt",
            public_key=certs / "signing.pub",
            timeout=10,
        ) as anonymous:
            with pytest.raises(FusionError) as refused:
                anonymous.adapt(sx, sy)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        for proc in reversed(procs):
            stop(proc)
    assert not [p.pid for p in procs if p.poll() is None]


def _healthy(client: FusionClient) -> bool:
    try:
        return client.health("protofuse.v1.Fusion") == "SERVING"
    except FusionError:
        return False
