"""
The access log through real requests: in-process routers and simulated pods on loopback
(and the official C{openai} client in a thread), then a C{twistd kthena-router} process
for what only a process shows (stdout, SIGUSR1 reopen after a rename, flush on SIGTERM).

Every router here writes its access log to a file; records are read after the router
stopped (stopping flushes), so "exactly one record per request" is checked exactly.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from twisted.internet.threads import deferToThread

from kthena.observability.accesslog import DROPPED_METRIC
from kthena.service import RouterService
from kthena.sim.service import SimService
from tests.integration.conftest import start_sim, wait_until
from tests.integration.router_helpers import (
    LISTEN,
    LOOPBACK,
    REQUEST_ID,
    Cluster,
    async_yield_fixture,
    chat_body,
    completion_body,
    http_request,
    inline,
    served,
    sim_sample,
    start_router,
)
from tests.unit.routerfixtures import Doc, pod, server, simple_route
from tests.unit.test_accesslog import in_record_order

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
UPSTREAM = "org/upstream-model"
DURATIONS = (
    "duration_request_processing",
    "duration_upstream_processing",
    "duration_response_processing",
)
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@async_yield_fixture
async def cluster() -> AsyncIterator[Cluster]:
    from twisted.internet import reactor

    running = Cluster(reactor)  # type: ignore[arg-type]
    try:
        yield running
    finally:
        await running.close()


def resources(cluster: Cluster, sims: list[SimService], **spec: Any) -> list[Doc]:
    return [
        simple_route("client", "client-model", "srv"),
        server("srv", {"app": "srv"}, UPSTREAM, **spec),
        *(cluster.pod(f"pod-{i}", sim, {"app": "srv"}) for i, sim in enumerate(sims)),
    ]


def logging_router(
    cluster: Cluster, path: Path, resources: list[Doc], **access_log: Any
) -> RouterService:
    return cluster.router(
        resources, observability={"accessLog": {"output": str(path), **access_log}}
    )


async def stopped(cluster: Cluster, router: RouterService) -> None:
    """Stop the router now (flushing its access log) rather than in the fixture."""
    cluster.routers.remove(router)
    await router.stopService()


def read_records(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        assert in_record_order(record), record
        assert TIMESTAMP.match(record["timestamp"]), record
        assert record["duration_total"] == sum(record[k] for k in DURATIONS), record
        assert all(isinstance(record[k], int) and record[k] >= 0 for k in DURATIONS), record
        assert ("error" in record) == (list(record)[-1] == "error")
    return records


def serving_pod(sims: list[SimService], before: list[int]) -> str:
    """The pod whose simulator finished one more request than before."""
    grown = [i for i, sim in enumerate(sims) if served(sim) == before[i] + 1]
    assert len(grown) == 1, (before, [served(s) for s in sims])
    return f"pod-{grown[0]}"


def prompt_tokens(sims: list[SimService]) -> int:
    return int(sum(sim_sample(sim, "vllm:prompt_tokens_total") for sim in sims))


def generation_tokens(sims: list[SimService]) -> int:
    return int(sum(sim_sample(sim, "vllm:generation_tokens_total") for sim in sims))


# -- in process


@inline
async def test_one_record_per_request_with_the_pods_usage(cluster: Cluster, tmp_path: Path) -> None:
    sims = [cluster.sim(UPSTREAM, output_tokens=5), cluster.sim(UPSTREAM, output_tokens=5)]
    path = tmp_path / "access.log"
    router = logging_router(cluster, path, resources(cluster, sims))
    expected: list[dict[str, Any]] = []

    async def send(path: str, body: dict[str, Any], stream: bool = False) -> Any:
        before = [served(s) for s in sims]
        prompts, generated = prompt_tokens(sims), generation_tokens(sims)
        if stream:
            reply: Any = await cluster.stream(router, path, body)
            assert reply.done
        else:
            reply = await cluster.post(router, path, body)
            assert reply.status == 200, reply.body
        expected.append(
            {
                "path": path,
                "selected_pod": serving_pod(sims, before),
                "request_id": reply.header("x-request-id"),
                # What the pod counted for this request.
                "input_tokens": prompt_tokens(sims) - prompts,
                "output_tokens": generation_tokens(sims) - generated,
            }
        )
        return reply

    for _ in range(3):
        chat = await send(CHAT, chat_body("client-model", max_tokens=3))
        usage = chat.json()["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
            expected[-1]["input_tokens"],
            expected[-1]["output_tokens"],
        )
    completion = await send(COMPLETIONS, completion_body("client-model"))
    assert completion.json()["usage"]["completion_tokens"] == expected[-1]["output_tokens"] == 5
    with_usage = await send(
        CHAT,
        chat_body("client-model", stream=True, stream_options={"include_usage": True}),
        stream=True,
    )
    usage = with_usage.chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        expected[-1]["input_tokens"],
        expected[-1]["output_tokens"],
    )
    hidden = await send(CHAT, chat_body("client-model", stream=True), stream=True)
    assert all(c["choices"] for c in hidden.chunks)  # the router hid the usage chunk

    missing = await cluster.post(router, CHAT, chat_body("no-such-model"))
    assert missing.status == 404
    await stopped(cluster, router)

    records = read_records(path)
    assert len(records) == len(expected) + 1 == 7
    for i, (record, want) in enumerate(zip(records, expected, strict=False)):
        assert record["status_code"] == 200
        assert "error" not in record, record
        assert (record["method"], record["protocol"]) == ("POST", "HTTP/1.1")
        assert record["model_name"] == "client-model"
        assert record["model_route"] == "default/client"
        assert record["model_server"] == "default/srv"
        assert {k: record[k] for k in want} == want, i
        assert REQUEST_ID.match(record["request_id"])
    assert [r["output_tokens"] for r in records[:-1]] == [3, 3, 3, 5, 5, 5]

    refused = records[-1]
    assert refused["request_id"] == missing.header("x-request-id")
    assert refused["status_code"] == 404
    assert refused["error"] == {
        "type": "route_not_found",
        "message": "the model `no-such-model` does not exist",
    }
    assert refused["model_name"] == "no-such-model"
    assert not {"model_route", "model_server", "selected_pod"} & set(refused)  # unknown: left out
    assert refused["duration_upstream_processing"] == refused["duration_response_processing"] == 0
    assert router.registry.get_sample_value(DROPPED_METRIC, {"reason": "buffer_full"}) == 0


@inline
async def test_client_hanging_up_mid_stream_is_one_error_record(
    cluster: Cluster, tmp_path: Path
) -> None:
    sim = cluster.sim(UPSTREAM, itl=0.05, output_tokens=400)
    path = tmp_path / "access.log"
    router = logging_router(cluster, path, resources(cluster, [sim]))
    reply = await cluster.stream(
        router, CHAT, chat_body("client-model", stream=True), hang_up_after=3
    )
    assert len(reply.token_times()) == 3
    await cluster.wait_for(lambda: not router.plane.inflight, 3, "the router to end the call")
    await stopped(cluster, router)

    [record] = read_records(path)
    assert record["request_id"] == reply.header("x-request-id")
    assert record["error"] == {
        "type": "client_disconnect",
        "message": "the client closed the connection",
    }
    assert record["selected_pod"] == "pod-0"
    assert record["duration_upstream_processing"] >= 50  # three tokens 50 ms apart


@inline
async def test_pod_timeout_is_one_error_record(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim(UPSTREAM, itl=0.1, output_tokens=30)  # 3 s for the answer
    path = tmp_path / "access.log"
    router = logging_router(
        cluster, path, resources(cluster, [sim], trafficPolicy={"timeout": "300ms"}), format="json"
    )
    reply = await cluster.post(router, CHAT, chat_body("client-model"))
    assert reply.status == 504
    await stopped(cluster, router)

    [record] = read_records(path)
    assert record["status_code"] == 504
    assert record["request_id"] == reply.header("x-request-id")
    assert record["error"]["type"] == "timeout"
    assert record["error"]["message"] == "pod pod-0 sent no response within 0.3s"
    assert record["selected_pod"] == "pod-0"
    assert 290 <= record["duration_upstream_processing"] < 2000
    assert "output_tokens" not in record  # none: left out, as Kthena does
    assert (record["upstream_attempts"], "upstream_status_code" in record) == (1, False)


@inline
async def test_the_openai_client_through_the_router(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim(UPSTREAM, output_tokens=4)
    path = tmp_path / "access.log"
    router = logging_router(cluster, path, resources(cluster, [sim]))
    client = openai.OpenAI(
        base_url=f"http://{LOOPBACK}:{router.proxy.bound_port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=10,
    )

    def non_stream() -> tuple[str, int, int]:
        raw = client.chat.completions.with_raw_response.create(
            model="client-model", messages=[{"role": "user", "content": "hello there"}]
        )
        completion = raw.parse()
        assert completion.usage is not None
        usage = completion.usage
        return raw.headers["x-request-id"], usage.prompt_tokens, usage.completion_tokens

    def stream() -> tuple[str, int, int]:
        raw = client.completions.with_raw_response.create(
            model="client-model",
            prompt="once upon a time",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(raw.parse())
        usage = chunks[-1].usage
        assert usage is not None
        return raw.headers["x-request-id"], usage.prompt_tokens, usage.completion_tokens

    def unknown_model() -> str:
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}]
            )
        return e.value.response.headers["x-request-id"]

    first = await deferToThread(non_stream)
    second = await deferToThread(stream)
    third = await deferToThread(unknown_model)
    client.close()
    await stopped(cluster, router)

    records = read_records(path)
    assert [(r["request_id"], r["input_tokens"], r["output_tokens"]) for r in records[:2]] == [
        first,
        second,
    ]
    assert [r["path"] for r in records] == [CHAT, COMPLETIONS, CHAT]
    assert records[2]["request_id"] == third
    assert records[2]["error"]["type"] == "route_not_found"
    assert len(records) == 3


@inline
async def test_text_format_lines(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim(UPSTREAM, output_tokens=2)
    path = tmp_path / "access.log"
    router = logging_router(cluster, path, resources(cluster, [sim]), format="text")
    ok = await cluster.post(router, CHAT, chat_body("client-model"), {"x-request-id": "my id"})
    missing = await cluster.post(router, CHAT, chat_body("no-such-model"))
    await stopped(cluster, router)

    success, error = path.read_text().splitlines()
    prompt = ok.json()["usage"]["prompt_tokens"]
    assert re.fullmatch(
        r'\[\S+Z\] "POST /v1/chat/completions HTTP/1.1" 200 model_name=client-model '
        r"model_route=default/client model_server=default/srv selected_pod=pod-0 "
        rf'request_id="my id" upstream=200/1 tokens={prompt}/2 '
        r"timings=(\d+)ms\((\d+)\+(\d+)\+(\d+)\)",
        success,
    ), success
    assert "selected_pod=pod-0" in success  # what e2e tools grep
    assert re.fullmatch(
        r'\[\S+Z\] "POST /v1/chat/completions HTTP/1.1" 404 '
        r'error=route_not_found:"the model `no-such-model` does not exist" '
        rf"model_name=no-such-model request_id={missing.header('x-request-id')} "
        r"timings=\d+ms\(\d+\+0\+0\)",
        error,
    ), error
    timings = re.search(r"timings=(\d+)ms\((\d+)\+(\d+)\+(\d+)\)", success)
    assert timings is not None
    total, *phases = (int(g) for g in timings.groups())
    assert total == sum(phases)


@inline
async def test_concurrent_requests_are_all_logged_and_flushed_on_stop(
    cluster: Cluster, tmp_path: Path
) -> None:
    sims = [cluster.sim(UPSTREAM, output_tokens=2) for _ in range(2)]
    path = tmp_path / "access.log"
    router = logging_router(cluster, path, resources(cluster, sims))
    replies = await cluster.many(
        60, 12, lambda i: cluster.post(router, CHAT, chat_body("client-model", max_tokens=2))
    )
    assert {r.status for r in replies} == {200}
    await stopped(cluster, router)
    records = read_records(path)
    assert sorted(r["request_id"] for r in records) == sorted(
        r.header("x-request-id") or "" for r in replies
    )
    assert {r["selected_pod"] for r in records} <= {"pod-0", "pod-1"}
    assert sum(r["output_tokens"] for r in records) == 120


@inline
async def test_disabled_access_log_writes_nothing(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim(UPSTREAM)
    path = tmp_path / "access.log"
    router = logging_router(cluster, path, resources(cluster, [sim]), enabled=False)
    assert router.access_log is None
    reply = await cluster.post(router, CHAT, chat_body("client-model"))
    assert reply.status == 200
    await stopped(cluster, router)
    assert not path.exists()


@inline
async def test_sampling_keeps_errors(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim(UPSTREAM, output_tokens=1)
    path = tmp_path / "access.log"
    router = logging_router(cluster, path, resources(cluster, [sim]), sampleRate=0)
    for _ in range(5):
        assert (await cluster.post(router, CHAT, chat_body("client-model"))).status == 200
        assert (await cluster.post(router, CHAT, chat_body("nope"))).status == 404
    await stopped(cluster, router)
    assert [r["status_code"] for r in read_records(path)] == [404] * 5


# -- a router process


def test_process_logs_to_stdout_and_reopens_its_file_on_sigusr1(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    workdir = tmp_path_factory.mktemp("accesslog-process")
    sim = start_sim(workdir, "--model", UPSTREAM, "--itl", "0.001", "--output-tokens", "2")
    routes = [
        simple_route("client", "client-model", "srv"),
        server("srv", {"app": "srv"}, UPSTREAM),
        pod("pod-0", sim.host, {"app": "srv"}, port=sim.port),
    ]
    (workdir / "stdout").mkdir()
    (workdir / "file").mkdir()
    stdout_router = start_router(workdir / "stdout", {"listen": LISTEN, "resources": routes})
    path = workdir / "access.log"
    file_router = start_router(
        workdir / "file",
        {
            "listen": LISTEN,
            "observability": {"accessLog": {"output": str(path), "format": "text"}},
            "resources": routes,
        },
    )
    try:
        # The default: JSON lines on stdout, not wrapped by the Twisted log.
        reply = stdout_router.request("POST", CHAT, chat_body("client-model"))
        assert reply.status == 200
        request_id = reply.headers["x-request-id"]

        def logged() -> dict[str, Any] | None:
            for line in stdout_router.log().splitlines():
                if line.startswith("{") and request_id in line:
                    value: dict[str, Any] = json.loads(line)
                    return value
            return None

        wait_until(lambda: logged() is not None, 10, what="the JSON record on stdout")
        record = logged()
        assert record is not None
        assert (record["request_id"], record["selected_pod"]) == (request_id, "pod-0")

        def ids(p: Path) -> list[str]:
            if not p.exists():
                return []
            # The chat requests' lines (health probes are logged too).
            chats = [line for line in p.read_text().splitlines() if CHAT in line]
            return [m for line in chats for m in re.findall(r"request_id=(\S+)", line)]

        def send() -> str:
            result = http_request(
                file_router.host, file_router.port, "POST", CHAT, chat_body("client-model")
            )
            assert result.status == 200
            return result.headers["x-request-id"]

        before = [send(), send()]
        wait_until(lambda: ids(path) == before, 10, what="two lines in the file")
        rotated = workdir / "access.log.1"
        path.rename(rotated)  # logrotate, then its postrotate kill -USR1
        file_router.signal(signal.SIGUSR1)
        after = send()
        wait_until(lambda: ids(path) == [after], 10, what="the next line in a new file")
        assert ids(rotated) == before
        assert file_router.process.poll() is None  # SIGUSR1 no longer kills the process

        # SIGTERM drains and flushes: the last request's line is there when it exits.
        last = send()
        file_router.stop()
        assert ids(path) == [after, last]
    finally:
        file_router.stop()
        stdout_router.stop()
        sim.terminate()
