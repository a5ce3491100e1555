"""
C{twistd -n kthena-router --workers 2}: real processes. The parent binds the proxy socket,
runs the simulated pod, starts two workers and tells systemd (a notify socket this test
reads) when both are ready; requests are served and counted once in the merged
C{/metrics}; C{/debug} answers for both; SIGHUP reloads both; a worker killed with
SIGKILL is started again and counted, and the totals do not go backwards; SIGTERM
drains a stream in flight and stops everything. Everything binds on 127.0.91.x.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import twistd_command, twistd_env
from tests.integration.router_helpers import (
    STOP_TIMEOUT,
    NotifySocket,
    RouterProcess,
    chat_body,
    free_port,
    http_request,
    spawn_router,
    write_config,
)
from tests.unit.routerfixtures import pod, server, simple_route

HOST = "127.0.91.10"
SIM_HOST = "127.0.91.11"
WAIT = 20.0


def _config(proxy: int, admin: int, sim: int, models: list[str]) -> dict[str, Any]:
    resources: list[Any] = [
        server("wk", {"app": "wk"}, model="wk-model"),  # requests for either model go to it
        pod("wk-0", SIM_HOST, {"app": "wk"}, port=sim),
    ]
    resources += [simple_route(f"wk-{i}", model, "wk") for i, model in enumerate(models)]
    return {
        "listen": f"tcp:{proxy}:interface={HOST}",
        "adminListen": f"tcp:{admin}:interface={HOST}",
        "drainTimeout": "10s",
        "reloadInterval": "0s",
        "observability": {"accessLog": {"enabled": False}},
        "simulators": [
            {
                "engine": "vllm",
                "model": "wk-model",
                "itl": 0.05,
                "listen": f"tcp:{sim}:interface={SIM_HOST}",
            }
        ],
        "resources": resources,
    }


def _metrics(admin: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = http_request(HOST, admin, "GET", "/metrics")
    assert reply.status == 200, reply.body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.body.decode())
        for s in family.samples
    }


def _served(admin: int) -> float:
    return sum(
        value
        for (name, labels), value in _metrics(admin).items()
        if name == "kthena_router_requests_total" and ("status_code", "200") in labels
    )


def _workers(admin: int) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = http_request(HOST, admin, "GET", "/debug/workers").json()[
        "workers"
    ]
    return workers


def _until(what: str, check: Any, router: RouterProcess) -> Any:
    deadline = time.monotonic() + WAIT
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {WAIT} s:\n{router.log()}")
        time.sleep(0.05)
    return result


def _ready(admin: int, router: RouterProcess) -> list[dict[str, Any]]:
    """The workers, once the parent answers and every one is ready."""

    def ready() -> list[dict[str, Any]] | None:
        try:
            workers = _workers(admin)
        except OSError:
            return None
        return workers if all(w["state"] == "ready" for w in workers) else None

    workers: list[dict[str, Any]] = _until("ready", ready, router)
    return workers


def _chat(proxy: int, model: str) -> None:
    reply = http_request(
        HOST, proxy, "POST", "/v1/chat/completions", chat_body(model, max_tokens=3)
    )
    assert reply.status == 200, reply.body


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_share_the_socket_and_the_parent_speaks_for_them(tmp_path: Path) -> None:
    proxy, admin, sim = free_port(HOST), free_port(HOST), free_port(SIM_HOST)
    config = tmp_path / "router.yaml"
    write_config(config, _config(proxy, admin, sim, ["wk-model"]))
    notify = NotifySocket(tmp_path / "notify")
    os.environ["NOTIFY_SOCKET"] = str(notify.path)
    try:
        router = spawn_router(tmp_path, "--config", str(config), "--workers", "2")
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        ready, _ = notify.until("READY", router)
        assert ready.fields["MAINPID"] == str(router.process.pid)
        assert ready.fields["STATUS"] == "2 of 2 workers ready"
        workers = _workers(admin)
        pids = {w["pid"] for w in workers}
        assert [w["state"] for w in workers] == ["ready", "ready"] and len(pids) == 2
        assert router.process.pid not in pids

        for _ in range(20):
            _chat(proxy, "wk-model")
        assert _served(admin) == 20
        metrics = _metrics(admin)
        assert metrics[("kthena_router_workers", ())] == 2
        assert metrics[("kthena_router_worker_restarts_total", (("worker", "0"),))] == 0

        fanned = http_request(HOST, admin, "GET", "/debug/routing/decisions").json()["workers"]
        assert {w["pid"] for w in fanned} == pids and {w["status"] for w in fanned} == {200}
        decisions = sum(len(w["body"]["decisions"]) for w in fanned)
        assert decisions == 20

        # SIGHUP: the config must load in the parent, then both workers reload
        write_config(config, _config(proxy, admin, sim, ["wk-model", "wk-new"]))
        router.signal(signal.SIGHUP)
        notify.until("RELOADING", router)
        after, _ = notify.until("READY", router)
        assert after.fields["STATUS"] == "2 of 2 workers ready"
        for _ in range(6):  # a connection each: whichever worker accepts knows the model
            _chat(proxy, "wk-new")
        total = _served(admin)
        assert total == 26

        # a worker killed is started again, counted, and what it counted stays counted
        victim = workers[0]["pid"]
        os.kill(victim, signal.SIGKILL)

        def restarted() -> bool:
            first = _workers(admin)[0]
            return bool(first["restarts"] == 1 and first["state"] == "ready")

        _until("restarted", restarted, router)
        assert _workers(admin)[0]["pid"] not in pids
        assert _served(admin) == total
        metrics = _metrics(admin)
        assert metrics[("kthena_router_worker_restarts_total", (("worker", "0"),))] == 1
        _chat(proxy, "wk-new")
        assert _served(admin) == total + 1

        # SIGTERM: the stream in flight ends whole, then everything stops
        events: list[bytes] = []
        connection = http.client.HTTPConnection(HOST, proxy, timeout=WAIT)
        body = json.dumps(chat_body("wk-model", max_tokens=30, stream=True))
        connection.request(
            "POST", "/v1/chat/completions", body, {"content-type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 200
        reader = threading.Thread(target=lambda: events.append(response.read()))
        reader.start()
        time.sleep(0.3)
        live = [w["pid"] for w in _workers(admin)]
        router.signal(signal.SIGTERM)
        notify.until("STOPPING", router)
        reader.join(WAIT)
        assert b"data: [DONE]" in b"".join(events)
        status = router.process.wait(WAIT)
        assert status in (0, -signal.SIGTERM), router.log()
        assert not any(_alive(pid) for pid in live)
        log = router.log()
        assert "Traceback" not in log
        assert "worker 0 (pid" in log and "killed by SIGKILL; starting it again" in log
        # the workers' own lines are in the parent's log
        assert "[worker 0 kthena.service#info] kthena-router started" in log
        assert "[worker 1 kthena.service#info] kthena-router started" in log
    finally:
        router.stop()
        notify.close()


def test_workers_need_a_tcp_listener(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    write_config(
        config, {"listen": f"unix:{tmp_path}/k.sock", "adminListen": f"tcp:0:interface={HOST}"}
    )
    router = spawn_router(tmp_path, "--config", str(config), "--workers", "2")
    try:
        status = router.process.wait(STOP_TIMEOUT * 2)
    finally:
        router.stop()
    assert status != 0
    assert "--workers shares the listen endpoint between processes" in router.log()
    assert not glob.glob(f"{tmp_path}/*.sock")


def test_workers_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    proxy, admin, sim = free_port(HOST), free_port(HOST), free_port(SIM_HOST)
    config = tmp_path / "router.yaml"
    write_config(config, _config(proxy, admin, sim, ["wk-model"]))
    router = spawn_router(tmp_path, "--config", str(config), "--workers", "1")
    try:
        pid = _ready(admin, router)[0]["pid"]
        _chat(proxy, "wk-model")
        router.process.send_signal(signal.SIGKILL)
        router.process.wait(WAIT)
        _until("the orphaned worker stopped", lambda: not _alive(pid), router)
        with pytest.raises(OSError):
            _chat(proxy, "wk-model")  # nobody holds the socket any more
    finally:
        router.stop()


def test_a_wedged_worker_is_killed_and_started_again(tmp_path: Path) -> None:
    """Under systemd's watchdog (2 s here) each worker pings the parent; one stopped
    (SIGSTOP: a wedged reactor) is killed once silent that long, and started again."""
    proxy, admin, sim = free_port(HOST), free_port(HOST), free_port(SIM_HOST)
    config = tmp_path / "router.yaml"
    write_config(config, _config(proxy, admin, sim, ["wk-model"]))
    notify = NotifySocket(tmp_path / "notify")
    os.environ.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
    try:
        router = spawn_router(tmp_path, "--config", str(config), "--workers", "2")
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
    try:
        notify.until("READY", router)
        wedged = _workers(admin)[1]["pid"]
        os.kill(wedged, signal.SIGSTOP)

        def replaced() -> bool:
            second = _workers(admin)[1]
            return bool(second["restarts"] == 1 and second["state"] == "ready")

        _until("replaced", replaced, router)
        assert "said nothing for" in router.log()
        assert not _alive(wedged)
        for _ in range(4):
            _chat(proxy, "wk-model")
    finally:
        router.stop()
        notify.close()


def test_ctrl_c_reaches_the_parent_only(tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals its foreground process group: the workers run in groups
    of their own, so the parent alone gets it and stops them in order (no restart)."""
    proxy, admin, sim = free_port(HOST), free_port(HOST), free_port(SIM_HOST)
    config = tmp_path / "router.yaml"
    write_config(config, _config(proxy, admin, sim, ["wk-model"]))
    log_path = tmp_path / "router.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            twistd_command("kthena-router", "--config", str(config), "--workers", "2"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=twistd_env(),
            start_new_session=True,  # the test's own group, as a shell's job
        )
    router = RouterProcess(process, log_path, config)
    try:
        pids = [w["pid"] for w in _ready(admin, router)]
        assert all(os.getpgid(pid) == pid for pid in pids)  # each a group of its own
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(WAIT) in (0, -signal.SIGINT), router.log()
        log = router.log()
        assert "starting it again" not in log
        assert "[worker 0 twisted.internet.base#info] Main loop terminated." in log
    finally:
        router.stop()
