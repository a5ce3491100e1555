"""
kthena-router as a real process (C{twistd -n kthena-router}), with kthena-sim processes
(or simulators in the router's own config) behind it, driven by the official C{openai}
client and plain HTTP: the OpenAI API through the router, streaming, request ids, config
reloads (SIGHUP and file changes, invalid configs kept out), an invalid config at start,
draining on SIGTERM, and the README's demo command.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.conftest import SimProcess, start_sim, twistd_command, twistd_env, wait_until
from tests.integration.router_helpers import (
    ADMIN_LISTEN,
    LISTEN,
    LOOPBACK,
    REQUEST_ID,
    RouterProcess,
    bound_port,
    free_port,
    http_request,
    median_gap,
    spawn_router,
    start_router,
    wait_for_log,
    wait_listening,
    write_config,
)
from tests.unit.routerfixtures import Doc, pod, server, simple_route

FAST_MODEL = "sys/fast-upstream"
PACED_MODEL = "sys/paced-upstream"
PACED_ITL = 0.05
WORDS = [" alpha", " beta", " gamma", " delta", " epsilon", " zeta"]
PROMPT = "".join(WORDS).strip()


def messages(text: str = PROMPT) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def sim_pod(name: str, sim: SimProcess, labels: dict[str, str]) -> Doc:
    return pod(name, sim.host, labels, port=sim.port)


def router_config(resources: list[Any], **settings: Any) -> dict[str, Any]:
    return {
        "listen": LISTEN,
        "adminListen": ADMIN_LISTEN,
        "drainTimeout": "3s",
        "reloadInterval": "0s",
        **settings,
        "resources": resources,
    }


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, SimProcess]]:
    """A fast pod, and a paced one (one token per 50 ms, 400 tokens unless capped)."""
    workdir = tmp_path_factory.mktemp("router-sims")
    started: dict[str, SimProcess] = {}
    try:
        started["fast"] = start_sim(
            workdir, "--model", FAST_MODEL, "--itl", "0.002", "--output-tokens", "6"
        )
        started["paced"] = start_sim(
            workdir, "--model", PACED_MODEL, "--itl", str(PACED_ITL), "--output-tokens", "400"
        )
        yield started
    finally:
        for sim in started.values():
            sim.terminate()


def base_resources(sims: dict[str, SimProcess]) -> list[Any]:
    return [
        simple_route("chat", "chat-model", "fast"),
        simple_route("paced", "paced-model", "paced"),
        server("fast", {"app": "fast"}, FAST_MODEL),
        server("paced", {"app": "paced"}, PACED_MODEL),
        sim_pod("fast-0", sims["fast"], {"app": "fast"}),
        sim_pod("paced-0", sims["paced"], {"app": "paced"}),
    ]


@pytest.fixture(scope="module")
def router(
    sims: dict[str, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterProcess]:
    process = start_router(tmp_path_factory.mktemp("router"), router_config(base_resources(sims)))
    try:
        yield process
    finally:
        process.stop()


# -- the OpenAI client through the router


def test_openai_chat_and_completions(router: RouterProcess) -> None:
    client = router.client()
    chat = client.chat.completions.create(model="chat-model", messages=messages(), max_tokens=3)
    assert chat.model == FAST_MODEL  # rewritten to the ModelServer's spec.model
    assert chat.choices[0].message.content == "".join(WORDS[:3])
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 3
    assert chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 3

    text = client.completions.create(model="chat-model", prompt=PROMPT)
    assert text.model == FAST_MODEL
    assert text.choices[0].text == "".join(WORDS)
    assert text.choices[0].finish_reason == "stop"
    assert text.usage is not None
    assert text.usage.completion_tokens == 6


def test_openai_chat_streams_show_usage_only_when_asked(router: RouterProcess) -> None:
    client = router.client()
    pieces: list[str] = []
    with client.chat.completions.create(
        model="chat-model", messages=messages(), stream=True, max_tokens=4
    ) as stream:
        for chunk in stream:
            assert chunk.model == FAST_MODEL
            assert chunk.usage is None  # the usage chunk the router asked for is hidden
            assert chunk.choices, chunk
            pieces.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(pieces) == "".join(WORDS[:4])

    usage_chunks = []
    pieces = []
    with client.chat.completions.create(
        model="chat-model",
        messages=messages(),
        stream=True,
        max_tokens=4,
        stream_options={"include_usage": True},
    ) as stream:
        for chunk in stream:
            assert chunk.model == FAST_MODEL
            if chunk.usage is not None:
                assert chunk.choices == []
                usage_chunks.append(chunk.usage)
            pieces.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(pieces) == "".join(WORDS[:4])
    assert len(usage_chunks) == 1
    assert usage_chunks[0].completion_tokens == 4


def test_openai_completion_streams_show_usage_only_when_asked(router: RouterProcess) -> None:
    client = router.client()
    for include_usage in (False, True):
        texts: list[str] = []
        usages = []
        with client.completions.create(
            model="chat-model",
            prompt=PROMPT,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True} if include_usage else openai.omit,
        ) as stream:
            for chunk in stream:
                assert chunk.model == FAST_MODEL
                if chunk.usage is not None:
                    assert chunk.choices == []
                    usages.append(chunk.usage)
                texts.extend(c.text for c in chunk.choices)
        assert "".join(texts) == "".join(WORDS[:5])
        assert len(usages) == (1 if include_usage else 0)
        if include_usage:
            assert usages[0].completion_tokens == 5


def test_stream_events_arrive_one_by_one(router: RouterProcess) -> None:
    arrivals: list[float] = []
    with router.client().chat.completions.create(
        model="paced-model", messages=messages(), stream=True, max_tokens=8
    ) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 8
    assert median_gap(arrivals) >= PACED_ITL / 2
    assert arrivals[-1] - arrivals[0] >= 7 * PACED_ITL / 2


def test_closing_a_stream_early_frees_the_pod(
    router: RouterProcess, sims: dict[str, SimProcess]
) -> None:
    paced = sims["paced"]
    pieces = 0
    with router.client().chat.completions.create(
        model="paced-model", messages=messages(), stream=True
    ) as stream:  # 400 tokens: 20 s if nobody stops it
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
            if pieces == 3:
                break
        assert paced.metrics()["vllm:num_requests_running"] == 1
    wait_until(
        lambda: paced.metrics()["vllm:num_requests_running"] == 0,
        timeout=5,
        what="the pod to stop generating for the closed stream",
    )
    assert paced.metrics()["vllm:generation_tokens_total"] < 200


def test_request_ids_reach_the_pod_and_come_back(router: RouterProcess) -> None:
    client = router.client()
    raw = client.chat.completions.with_raw_response.create(
        model="chat-model", messages=messages(), max_tokens=1
    )
    request_id = raw.headers.get("x-request-id") or ""
    assert REQUEST_ID.match(request_id), raw.headers
    assert raw.parse().id == f"chatcmpl-{request_id}"

    given = client.chat.completions.with_raw_response.create(
        model="chat-model",
        messages=messages(),
        max_tokens=1,
        extra_headers={"x-request-id": "system-test-7"},
    )
    assert given.headers.get("x-request-id") == "system-test-7"
    assert given.parse().id == "chatcmpl-system-test-7"


def test_openai_client_reads_router_errors(router: RouterProcess) -> None:
    client = router.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=messages())
    assert missing.value.code == "route_not_found"
    assert "no-such-model" in missing.value.message
    reply = router.request("GET", "/v1/chat/completions")
    assert reply.status == 405
    assert reply.json()["error"]["code"] == "method_not_allowed"
    models = client.models.list()
    assert sorted(m.id for m in models.data) == ["chat-model", "paced-model"]
    assert all(m.owned_by for m in models.data)
    assert router.request("GET", "/healthz").json() == {"message": "ok"}
    assert router.request("GET", "/readyz").status == 200


def assert_clean_exit(router: RouterProcess) -> None:
    """Stopped by SIGTERM through the reactor's shutdown (twistd then re-raises the signal)."""
    assert router.process.returncode in (0, -signal.SIGTERM), router.log()
    assert "Server Shut Down." in router.log()


# -- reloading


def run_router_to_the_end(config_path: Path) -> subprocess.CompletedProcess[str]:
    """Run C{twistd -n kthena-router --config PATH} that is expected to exit by itself."""
    return subprocess.run(
        twistd_command("kthena-router", "--config", str(config_path)),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=config_path.parent,
        env=twistd_env(),
    )


def chat_status(router: RouterProcess, model: str) -> int:
    return router.request(
        "POST", "/v1/chat/completions", {"model": model, "messages": messages(), "max_tokens": 1}
    ).status


def first_resources(sims: dict[str, SimProcess]) -> list[Doc]:
    """One route, C{first-model}, to the fast pod."""
    return [
        simple_route("first", "first-model", "fast"),
        server("fast", {"app": "fast"}, FAST_MODEL),
        sim_pod("fast-0", sims["fast"], {"app": "fast"}),
    ]


def test_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_bad(
    sims: dict[str, SimProcess], tmp_path: Path
) -> None:
    first = first_resources(sims)
    router = start_router(tmp_path, router_config(first))
    try:
        assert chat_status(router, "first-model") == 200
        assert chat_status(router, "second-model") == 404
        assert router.config_path is not None

        second = [*first, simple_route("second", "second-model", "fast")]
        write_config(router.config_path, router_config(second))
        time.sleep(0.3)  # no reload without the signal (reloadInterval is 0)
        assert chat_status(router, "second-model") == 404
        router.signal(signal.SIGHUP)
        wait_until(lambda: chat_status(router, "second-model") == 200, 5, what="reload")
        assert "reload (SIGHUP) applied" in router.log()

        broken = router_config([*second, server("bad", {"app": "bad"}, "m", engine="TGI")])
        write_config(router.config_path, broken)
        router.signal(signal.SIGHUP)
        log = wait_for_log(router, "reload (SIGHUP) failed", 5)
        assert str(router.config_path) in log
        assert "(ModelServer default/bad): spec.inferenceEngine: must be one of" in log
        assert router.process.poll() is None
        assert chat_status(router, "first-model") == 200
        assert chat_status(router, "second-model") == 200
    finally:
        router.stop()
    assert_clean_exit(router)


SECRET_LINES = """\
  - apiVersion: networking.serving.volcano.sh/v1alpha1
    kind: ModelRoute
    metadata: {name: secret}
    spec:
      modelName: secret-model
      rateLimit: {inputTokensPerUnit: 10, global: {redis: {address: "redis://admin:S3cretPass@r:6379"}}}
      rules:
        - modelMatch: {headers: {authorization: {exact: "Bearer sk-live-0123456789"}}}
          targetModels: [{modelServerName: fast
"""


def test_no_secret_reaches_the_log_on_an_invalid_reload_or_start(
    sims: dict[str, SimProcess], tmp_path: Path
) -> None:
    first = first_resources(sims)
    router = start_router(tmp_path, router_config(first))
    try:
        assert router.config_path is not None
        text = router.config_path.read_text()
        broken = text.replace("resources:\n", "resources:\n" + SECRET_LINES, 1)
        assert broken != text
        router.config_path.write_text(broken)
        router.signal(signal.SIGHUP)
        log = wait_for_log(router, "reload (SIGHUP) failed", 5)
        assert "invalid YAML: line" in log
        for secret in ("S3cretPass", "sk-live-0123456789"):
            assert secret not in log
        assert chat_status(router, "first-model") == 200
    finally:
        router.stop()
    result = run_router_to_the_end(router.config_path)  # the same file at start
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "invalid YAML: line" in output, output
    for secret in ("S3cretPass", "sk-live-0123456789"):
        assert secret not in output


def test_changed_files_are_reloaded_without_a_signal(
    sims: dict[str, SimProcess], tmp_path: Path
) -> None:
    docs = tmp_path / "resources.yaml"
    first = first_resources(sims)
    docs.write_text(yaml.safe_dump_all(first))
    config = router_config(["resources.yaml"], reloadInterval="0.5s")
    router = start_router(tmp_path, config)
    try:
        assert chat_status(router, "later-model") == 404
        # A resource file changes: a new route.
        tmp = tmp_path / "resources.tmp"
        tmp.write_text(yaml.safe_dump_all([*first, simple_route("later", "later-model", "fast")]))
        tmp.replace(docs)
        wait_until(lambda: chat_status(router, "later-model") == 200, 5, what="file reload")
        assert "reload (a config file changed) applied" in router.log()

        # The router's own file changes: a smaller body limit.
        big = {"model": "first-model", "messages": messages("word " * 500), "max_tokens": 1}
        assert router.request("POST", "/v1/chat/completions", big).status == 200
        assert router.config_path is not None
        write_config(router.config_path, {**config, "maxBodyBytes": 1024})
        wait_until(
            lambda: router.request("POST", "/v1/chat/completions", big).status == 413,
            5,
            what="maxBodyBytes reload",
        )

        # A broken file is reported and the running config kept.
        docs.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\n")
        log = wait_for_log(router, "reload (a config file changed) failed", 5)
        assert f"{docs}: document 1" in log
        assert "metadata.name: must be a lower-case DNS name" in log
        assert chat_status(router, "later-model") == 200
    finally:
        router.stop()


# -- starting and stopping


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bad-port", ["resources.yaml: document 2 (ModelServer default/broken)",
                      "spec.workloadPort.port: must be at most 65535, not 70000"]),
        ("bad-key", ["router.yaml: lisen: unknown field; known fields:"]),
    ],
)  # fmt: skip
def test_invalid_config_at_start_exits_with_the_place_of_the_error(
    tmp_path: Path, name: str, expected: list[str]
) -> None:
    docs = [
        simple_route("r", "m", "broken"),
        server("broken", {"app": "x"}, "m", port=70000),
    ]
    (tmp_path / "resources.yaml").write_text(yaml.safe_dump_all(docs))
    config: dict[str, Any] = {"listen": LISTEN, "resources": ["resources.yaml"]}
    if name == "bad-key":
        docs[1] = server("broken", {"app": "x"}, "m")
        (tmp_path / "resources.yaml").write_text(yaml.safe_dump_all(docs))
        config["lisen"] = config.pop("listen")
    write_config(tmp_path / "router.yaml", config)
    result = run_router_to_the_end(tmp_path / "router.yaml")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "invalid config" in output
    for text in expected:
        assert text in output, output


@pytest.mark.parametrize("taken", ["listen", "adminListen"])
def test_a_port_taken_at_start_stops_the_process(tmp_path: Path, taken: str) -> None:
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = router_config([], podMetrics={"enabled": False})
    config[taken] = f"tcp:{port}:interface={LOOPBACK}"
    write_config(tmp_path / "router.yaml", config)
    try:
        result = run_router_to_the_end(tmp_path / "router.yaml")
    finally:
        holder.close()
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    lines = [line for line in output.splitlines() if "cannot listen" in line]
    assert len(lines) == 1, output
    assert f"cannot listen on tcp:{port}:interface={LOOPBACK}: Address already in use" in lines[0]
    assert "Traceback" not in output


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_the_stream_in_flight(tmp_path: Path) -> None:
    sim_port = free_port()
    config = router_config(
        [
            simple_route("drain", "drain-model", "drain"),
            server("drain", {"app": "drain"}, "drain/upstream"),
            pod("drain-0", LOOPBACK, {"app": "drain"}, port=sim_port),
        ],
        drainTimeout="15s",
        simulators=[
            {
                "engine": "vllm",
                "model": "drain/upstream",
                "listen": f"tcp:{sim_port}:interface={LOOPBACK}",
                "itl": 0.1,
                "outputTokens": 20,
            }
        ],
    )
    router = start_router(tmp_path, config)
    try:
        connection = http.client.HTTPConnection(router.host, router.port, timeout=10)
        body = {"model": "drain-model", "messages": messages(), "stream": True}
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 200
        events: list[bytes] = []
        buffer = b""

        def read_events(until: int) -> None:
            nonlocal buffer
            while len(events) < until:
                data = response.read1(65536)
                if not data:
                    return
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    events.append(event)

        read_events(3)  # the role event and two tokens: the stream is under way
        router.signal(signal.SIGTERM)
        wait_until(lambda: _refused(router.host, router.port), 5, what="the port to close")
        assert router.process.poll() is None  # still draining
        read_events(10_000)
        connection.close()
    finally:
        try:
            router.process.wait(20)
        finally:
            router.stop()
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    tokens = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(tokens) == 20
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"] for c in chunks)  # no usage chunk: the client did not ask
    assert_clean_exit(router)
    assert "drain timeout" not in router.log()


def test_sigterm_exits_promptly_idle_or_at_the_drain_timeout(
    tmp_path: Path, sims: dict[str, SimProcess]
) -> None:
    """
    Nothing in flight: the process exits at once. A stream in flight past the drain
    timeout: at the timeout, not later (a slow reader holding it, a keep-alive client
    connection open). Bounds are generous; they catch seconds, not milliseconds.
    """
    (tmp_path / "idle").mkdir()
    (tmp_path / "busy").mkdir()
    idle = start_router(tmp_path / "idle", router_config(base_resources(sims)))
    keep = http.client.HTTPConnection(idle.host, idle.port, timeout=5)
    keep.request("GET", "/healthz")
    keep.getresponse().read()  # an idle keep-alive connection stays open
    started = time.monotonic()
    idle.signal(signal.SIGTERM)
    idle.process.wait(10)
    idle_exit = time.monotonic() - started
    keep.close()
    assert_clean_exit(idle)
    assert idle_exit < 1.0, idle_exit

    busy = start_router(tmp_path / "busy", router_config(base_resources(sims), drainTimeout="2s"))
    reader = socket.create_connection((busy.host, busy.port))
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"model": "paced-model", "messages": messages(), "stream": True}).encode()
    reader.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert reader.recv(12) == b"HTTP/1.1 200"  # the stream is under way; nothing more is read
    started = time.monotonic()
    busy.signal(signal.SIGTERM)
    busy.process.wait(20)
    busy_exit = time.monotonic() - started
    reader.close()
    assert_clean_exit(busy)
    assert "drain timeout: cut 1 requests" in busy.log()
    assert 2.0 <= busy_exit < 2.8, busy_exit


def test_slowloris_connections_are_answered_408_and_closed(
    tmp_path: Path, sims: dict[str, SimProcess]
) -> None:
    """50 clients sending one header byte every 0.2 s, against a 1 s head deadline."""
    router = start_router(
        tmp_path,
        router_config(base_resources(sims), downstream={"headerTimeout": "1s"}),
    )
    clients: list[socket.socket] = []
    try:
        for _ in range(50):
            client = socket.create_connection((router.host, router.port), timeout=5)
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nX-Slow: ")
            clients.append(client)
        answers: dict[int, bytes] = {}
        deadline = time.monotonic() + 5
        while len(answers) < len(clients) and time.monotonic() < deadline:
            for i, client in enumerate(clients):
                if i in answers:
                    continue
                with contextlib.suppress(OSError):  # closed by the router: read what it said
                    client.sendall(b"x")
                client.settimeout(0.0)
                try:
                    data = client.recv(65536)
                except BlockingIOError:
                    continue
                finally:
                    client.settimeout(5)
                answers[i] = data
            time.sleep(0.2)
        assert len(answers) == len(clients)
        assert all(a.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for a in answers.values())
        for client in clients:  # and the router closed each connection
            rest = b""
            while chunk := client.recv(65536):
                rest += chunk
        scrape = http_request(LOOPBACK, bound_port(router, ADMIN_LISTEN), "GET", "/metrics")
        timeouts = [
            line
            for line in scrape.body.decode().splitlines()
            if line.startswith("kthena_router_requests_total{") and 'status_code="408"' in line
        ]
        assert len(timeouts) == 1 and timeouts[0].endswith(" 50.0"), timeouts
    finally:
        for client in clients:
            client.close()
        router.stop()


def test_readme_demo_command(tmp_path: Path) -> None:
    """`twistd -n --pidfile= kthena-router --demo`, then the client on :8080 (never skipped)."""
    router = spawn_router(tmp_path, "--demo")
    try:
        wait_listening(router, "tcp:8080:interface=127.0.0.1")
        client = openai.OpenAI(
            base_url="http://127.0.0.1:8080/v1", api_key="demo", max_retries=0, timeout=15
        )
        expected = {
            "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
            "deepseek-r1": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
            "sql-lora": "sql-lora",
            "qwen2.5-0.5b-pd": "Qwen/Qwen2.5-0.5B-Instruct",  # a prefill and a decode pod
        }
        assert sorted(m.id for m in client.models.list().data) == sorted(expected)
        for model, upstream in expected.items():
            chat = client.chat.completions.create(
                model=model, messages=messages("hello demo"), max_tokens=4
            )
            assert chat.model == upstream
            assert chat.choices[0].message.content == " hello demo hello demo"
            assert chat.usage is not None
            assert chat.usage.completion_tokens == 4
        pieces: list[str] = []
        with client.chat.completions.create(
            model="deepseek-r1", messages=messages("hello demo"), stream=True, max_tokens=3
        ) as stream:
            for chunk in stream:
                pieces.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(pieces) == " hello demo hello"
        # The admin listener: the spec's /metrics on 9090, and /debug beside it.
        scrape = http_request(LOOPBACK, 9090, "GET", "/metrics")
        assert scrape.status == 200
        lines = scrape.body.decode().splitlines()
        assert any(
            line.startswith("kthena_router_requests_total{") and 'model="deepseek-r1"' in line
            for line in lines
        )
        legs = [line for line in lines if line.startswith("kthena_pd_group_requests_total{")]
        assert len(legs) == 2 and all(line.endswith(" 1.0") for line in legs)  # one each
        moved = {
            line.split('direction="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith('kthena_kv_cache_transfer_bytes_total{connector_type="nixl"')
        }  # the prefill sim's remote_block_ids x 16 tokens x 12288 bytes per token
        assert moved["send"] == moved["receive"] > 0 and moved["send"] % (16 * 12288) == 0
        pd = http_request(LOOPBACK, 9090, "GET", "/debug/pd-groups").json()["pd_groups"]
        assert [(g["group_key"], g["pairable"]) for g in pd] == [("pd-1", True)]
        state = http_request(LOOPBACK, 9090, "GET", "/debug/router/state").json()
        assert [(x["name"], x["host"], x["port"]) for x in state["listeners"]] == [
            ("proxy", "127.0.0.1", 8080),
            ("admin", "127.0.0.1", 9090),
        ]  # loopback only: a demo is not a service for the network
    finally:
        router.stop()
    assert_clean_exit(router)
