"""
kthena-router under systemd: real processes run with the service unit's command line (its
C{ExecStart}) and what systemd would give them, a C{NOTIFY_SOCKET} (a datagram socket this
test reads) and C{WATCHDOG_USEC}, or listening sockets passed as fds 3 and 4
(C{LISTEN_FDS}); and the unit files, checked by C{systemd-analyze verify} and against the
configs. Everything binds on 127.0.90.x.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from kthena.systemd import Systemd
from tests.integration.conftest import twistd_env
from tests.integration.router_helpers import (
    STOP_TIMEOUT,
    NotifySocket,
    RouterProcess,
    bound_port,
    free_port,
    http_request,
    wait_for_log,
    write_config,
)
from tests.unit.routerfixtures import Doc, pod, server, simple_route

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "conf" / "systemd"
HOST = "127.0.90.10"
SIM_HOST = "127.0.90.11"
ACTIVATED_HOST = "127.0.90.20"
MODEL = "sysd-model"
WAIT = 20.0
TWIST = os.path.join(os.path.dirname(sys.executable), "twist")
VERSION = metadata.version("kthena-router")


def model_resources(pods: Sequence[Doc] = ()) -> list[Doc]:
    return [simple_route("sysd", MODEL, "sysd"), server("sysd", {"app": "sysd"}), *pods]


def timespan(value: str) -> float:
    """A systemd time span this test uses (C{60s}, C{30s}, C{5min})."""
    match = re.fullmatch(r"(\d+)(s|min)", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def unit_settings(unit: str) -> dict[str, list[str]]:
    """Every C{Key=value} of a unit file, by key (a key may come more than once)."""
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def unit_command(config: Path) -> list[str]:
    """The service unit's C{ExecStart}, with this Python's twist and C{config}."""
    (exec_start,) = unit_settings((UNITS / "kthena-router.service").read_text())["ExecStart"]
    program, *args = exec_start.split()
    assert program == "/usr/local/bin/twist", exec_start
    assert args[-2:] == ["--config", "/etc/kthena/router.yaml"], exec_start
    return [TWIST, *args[:-1], str(config)]


def spawn(
    workdir: Path,
    config: Path,
    env: Mapping[str, str],
    prefix: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
    args: Sequence[str] = (),
) -> RouterProcess:
    """The unit's command on C{config} (after C{prefix}, then C{args}) with C{env} added."""
    log_path = workdir / f"router-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*prefix, *unit_command(config), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env={**twistd_env(), **env},
            pass_fds=pass_fds,
        )
    return RouterProcess(process, log_path, config)


def stop_cleanly(router: RouterProcess) -> None:
    """
    SIGTERM: the drain, the reactor's shutdown, no traceback. Twisted then re-raises the
    signal, so the status is "terminated by SIGTERM" (which systemd counts as a clean exit,
    as it does 0).
    """
    router.signal(signal.SIGTERM)
    try:
        status = router.process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        router.stop()
        pytest.fail(f"kthena-router did not stop on SIGTERM:\n{router.log()}")
    log = router.log()
    assert status in (0, -signal.SIGTERM), log
    assert "Main loop terminated." in log
    assert "Traceback" not in log


# -- sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    assert len(str(path)) < 100, "AF_UNIX paths are short"
    listening = NotifySocket(path)
    yield listening
    listening.close()


def test_the_router_tells_systemd_its_state(tmp_path: Path, notify_socket: NotifySocket) -> None:
    """READY=1 once both listeners accept and the pod is scraped; WATCHDOG=1 every 0.2 s;
    RELOADING=1 (with CLOCK_MONOTONIC) then READY=1 on SIGHUP; STOPPING=1 on SIGTERM,
    then a clean exit. And the startup lines say what listens where."""
    sim_port = free_port(SIM_HOST)
    listen, admin_listen = f"tcp:0:interface={HOST}", f"tcp:port=0:interface={HOST}"
    config = tmp_path / "router.yaml"
    write_config(
        config,
        {
            "listen": listen,
            "adminListen": admin_listen,
            "drainTimeout": "3s",
            "reloadInterval": "0s",
            "simulators": [
                {"engine": "vllm", "model": MODEL, "listen": f"tcp:{sim_port}:interface={SIM_HOST}"}
            ],
            "resources": model_resources([pod("sysd-0", SIM_HOST, {"app": "sysd"}, port=sim_port)]),
        },
    )
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"}
    router = spawn(tmp_path, config, env)
    try:
        ready, before = notify_socket.until("READY", router)
        assert {m.kind for m in before} <= {"WATCHDOG"}
        assert ready.fields["MAINPID"] == str(router.process.pid)
        assert ready.fields["STATUS"] == "generation 1: 1 routes, 1 servers, 1 pods"
        proxy, admin = bound_port(router, listen), bound_port(router, admin_listen)
        assert http_request(HOST, proxy, "GET", "/readyz").status == 200  # the pod is scraped
        assert http_request(HOST, admin, "GET", "/metrics").status == 200

        log = router.log()
        assert f"kthena-router {VERSION}, config {config}" in log
        assert "kthena-router started, generation 1: 1 routes, 1 servers, 1 pods" in log
        assert f"proxy: {listen} at {HOST}:{proxy} serves /v1/*, /healthz, /readyz" in log
        assert f"admin: {admin_listen} at {HOST}:{admin} serves /metrics, /debug/" in log
        assert "access log: stdout (json)" in log

        pings = [notify_socket.until("WATCHDOG", router)[0] for _ in range(5)]
        gap = statistics.median(b.at - a.at for a, b in itertools.pairwise(pings))
        assert 0.1 < gap < 0.4, gap

        hup = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        router.signal(signal.SIGHUP)
        reloading, _ = notify_socket.until("RELOADING", router)
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert hup <= int(reloading.fields["MONOTONIC_USEC"]) <= now
        after, between = notify_socket.until("READY", router)
        assert {m.kind for m in between} <= {"WATCHDOG"}
        assert after.fields["STATUS"] == "generation 2: 1 routes, 1 servers, 1 pods"

        stop_cleanly(router)
        stopping, _ = notify_socket.until("STOPPING", router)
        assert stopping.fields == {"STOPPING": "1", "STATUS": "draining"}
    finally:
        router.stop()


def test_abstract_notify_socket() -> None:
    """A NOTIFY_SOCKET starting with @ is in the abstract namespace."""
    name = f"kthena-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listening:
        listening.bind(b"\0" + name.encode())
        listening.settimeout(5)
        systemd = Systemd.from_environment({"NOTIFY_SOCKET": f"@{name}"})
        assert systemd is not None
        systemd.send("READY=1\nSTATUS=ok")
        assert listening.recv(4096) == b"READY=1\nSTATUS=ok"


# -- socket activation

LAUNCH = (
    "import fcntl, os, sys\n"
    "moved = []\n"
    "for inherited in map(int, sys.argv[1:3]):\n"
    "    moved.append(fcntl.fcntl(inherited, fcntl.F_DUPFD, 10))\n"
    "    os.close(inherited)\n"
    "for fd, socket in enumerate(moved, start=3):\n"
    "    os.dup2(socket, fd)\n"
    "    os.close(socket)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)
"""What systemd does before it starts the service: the sockets as fds 3 and 4 (moved out
of the way first: either may be 3 or 4 already), and C{LISTEN_PID} the pid that C{exec}s
the router."""


def listening_socket(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(64)
    return s


def activated(
    workdir: Path, config: Path, sockets: Sequence[socket.socket], args: Sequence[str] = ()
) -> RouterProcess:
    """The router on C{sockets} as systemd passes them. Twisted needs C{LISTEN_FDNAMES}
    (systemd 227 and later always set it: the socket unit's name for each, by default)."""
    fds = [s.fileno() for s in sockets]
    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "kthena-router.socket:kthena-router.socket"}
    prefix = [sys.executable, "-c", LAUNCH, *map(str, fds)]
    return spawn(workdir, config, env, prefix, pass_fds=fds, args=args)


def socket_config(workdir: Path) -> Path:
    """conf/systemd/router-socket.yaml installed in C{workdir}: its resources beside it, the
    access log in C{workdir}."""
    raw: dict[str, Any] = yaml.safe_load((UNITS / "router-socket.yaml").read_text())
    raw["observability"]["accessLog"]["output"] = str(workdir / "access.log")
    (workdir / "resources").mkdir()
    (workdir / "resources" / "models.yaml").write_text(yaml.safe_dump_all(model_resources()))
    config = workdir / "router.yaml"
    write_config(config, raw)
    return config


def serving(router: RouterProcess, port: int) -> None:
    wait_for_log(router, "kthena-router started", WAIT)
    assert http_request(ACTIVATED_HOST, port, "GET", "/healthz").status == 200


def test_socket_activation_restarts_lose_no_connection(tmp_path: Path) -> None:
    """router-socket.yaml on two sockets passed as fds 3 and 4: /v1/models on the first,
    /metrics on the second; a connection made while no router runs is answered by the next
    one, since the sockets stay open (here in the test, as in systemd) across restarts."""
    proxy_socket, admin_socket = listening_socket(ACTIVATED_HOST), listening_socket(ACTIVATED_HOST)
    proxy, admin = proxy_socket.getsockname()[1], admin_socket.getsockname()[1]
    config = socket_config(tmp_path)
    waiting: socket.socket | None = None
    router = activated(tmp_path, config, [proxy_socket, admin_socket])
    try:
        serving(router, proxy)
        assert bound_port(router, "systemd:domain=INET:index=0") == proxy
        assert bound_port(router, "systemd:domain=INET:index=1") == admin
        models = http_request(ACTIVATED_HOST, proxy, "GET", "/v1/models")
        assert models.status == 200
        assert [m["id"] for m in models.json()["data"]] == [MODEL]
        metrics = http_request(ACTIVATED_HOST, admin, "GET", "/metrics")
        assert metrics.status == 200
        assert b"kthena_router_requests_total" in metrics.body
        assert http_request(ACTIVATED_HOST, admin, "GET", "/v1/models").status == 404
        stop_cleanly(router)

        waiting = socket.create_connection((ACTIVATED_HOST, proxy), timeout=WAIT)
        waiting.sendall(b"GET /v1/models HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n")
        router = activated(tmp_path, config, [proxy_socket, admin_socket])
        serving(router, proxy)
        answer = b""
        while chunk := waiting.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert MODEL.encode() in answer
        stop_cleanly(router)
    finally:
        router.stop()
        for s in (waiting, proxy_socket, admin_socket):
            if s is not None:
                s.close()


def test_workers_share_the_sockets_systemd_passed(tmp_path: Path) -> None:
    """The socket unit with --workers 2: the parent takes both sockets (the proxy's, shared
    by the workers; the admin one, its own merged /metrics) and the workers serve."""
    proxy_socket, admin_socket = listening_socket(ACTIVATED_HOST), listening_socket(ACTIVATED_HOST)
    proxy, admin = proxy_socket.getsockname()[1], admin_socket.getsockname()[1]
    config = socket_config(tmp_path)
    router = activated(tmp_path, config, [proxy_socket, admin_socket], ["--workers", "2"])
    try:
        wait_for_log(router, "[worker 1 kthena.service#info] kthena-router started", WAIT)
        for _ in range(6):
            assert http_request(ACTIVATED_HOST, proxy, "GET", "/v1/models").status == 200
        reply = http_request(ACTIVATED_HOST, admin, "GET", "/metrics")
        assert reply.status == 200
        assert b"kthena_router_workers 2.0" in reply.body
        stop_cleanly(router)
    finally:
        router.stop()
        proxy_socket.close()
        admin_socket.close()


# -- the command line


@pytest.mark.parametrize("program", ["twistd", "twist"])
def test_version(program: str) -> None:
    path = os.path.join(os.path.dirname(sys.executable), program)
    result = subprocess.run(
        [path, "kthena-router", "--version"],
        capture_output=True,
        text=True,
        env=twistd_env(),
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, f"kthena-router {VERSION}\n"), result.stderr


# -- the unit files


def test_the_units_verify(tmp_path: Path) -> None:
    """C{systemd-analyze verify} finds nothing to say about either unit. It needs no
    running systemd, but it does need ExecStart's program to exist: the unit names the
    installed /usr/local/bin/twist, so the copy verified names this Python's twist."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: on Debian, apt-get install -y systemd")
    service = (UNITS / "kthena-router.service").read_text()
    twist = os.path.join(os.path.dirname(sys.executable), "twist")
    (tmp_path / "kthena-router.service").write_text(service.replace("/usr/local/bin/twist", twist))
    shutil.copy(UNITS / "kthena-router.socket", tmp_path)
    result = subprocess.run(
        [analyze, "verify", "kthena-router.service", "kthena-router.socket"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    # It exits 0 for unknown keys and bad values, and warns: warnings fail the test too.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_units_agree_with_the_configs() -> None:
    """The stop timeout outlasts the drain; the socket unit passes the proxy's socket first
    and the admin's second, IPv4 as domain=INET reads them (the router runs on
    router-socket.yaml in the socket activation test above)."""
    service = unit_settings((UNITS / "kthena-router.service").read_text())
    assert service["Type"] == ["notify"]
    for path in (ROOT / "conf" / "router.yaml", UNITS / "router-socket.yaml"):
        drain = yaml.safe_load(path.read_text())["drainTimeout"]
        assert timespan(service["TimeoutStopSec"][0]) > timespan(drain), path
    sockets = unit_settings((UNITS / "kthena-router.socket").read_text())
    assert sockets["ListenStream"] == ["0.0.0.0:8080", "0.0.0.0:9090"]
    raw = yaml.safe_load((UNITS / "router-socket.yaml").read_text())
    assert (raw["listen"], raw["adminListen"]) == (
        "systemd:domain=INET:index=0",
        "systemd:domain=INET:index=1",
    )
