"""
How many concurrent token streams one kthena-sim process sustains on one core.

Starts one C{twistd kthena-sim} pinned to one CPU (C{taskset -c}), opens N concurrent
streaming chat completions against it from this process pinned to another CPU (asyncio
and raw sockets: HTTP/1.1, chunked transfer decoding and SSE parsing by hand, so the
client costs little), then reports errors, completed requests, SSE events and events/s,
time to first token and inter-token gaps (p50/p99) as the client saw them against the
configured C{--itl}, and the CPU the simulator used.

Bounded: at most 5000 streams and 4096 tokens each, an overall deadline (C{--timeout}),
and only the loopback simulator it started itself is ever contacted.

    python3 bench/sim_streams.py                    # 500 streams, itl 20 ms, 128 tokens
    python3 bench/sim_streams.py --streams 200 --itl 0.05 --tokens 40
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import itertools
import json
import os
import re
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MAX_STREAMS = 5000
MAX_TOKENS = 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LISTENING = re.compile(
    rb"listening on \S+ \(IPv4Address\(type='TCP', host='[^']+', port=(\d+)\)\)"
)


@dataclass
class StreamResult:
    """What the client saw of one stream (times from C{time.perf_counter})."""

    started: float
    status: int = 0
    events: int = 0
    token_times: list[float] = field(default_factory=list)
    done: bool = False
    error: str | None = None


class StreamProtocol(asyncio.Protocol):
    """One HTTP/1.1 streaming request: parses the status, chunked framing and SSE events."""

    def __init__(self, request: bytes, result: StreamResult, finished: asyncio.Future[None]):
        self.request = request
        self.result = result
        self.finished = finished
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._headers_done = False
        self._chunk_left = -1  # -1: expecting a chunk-size line
        self._sse = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self._buffer += data
        try:
            if not self._headers_done and not self._read_headers():
                return
            self._read_chunks(now)
        except ValueError as e:
            self._end(f"protocol: {e}")

    def _read_headers(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        status_line, *header_lines = head.split(b"\r\n")
        self.result.status = int(status_line.split()[1])
        self._headers_done = True
        chunked = any(
            line.lower().replace(b" ", b"") == b"transfer-encoding:chunked" for line in header_lines
        )
        if self.result.status != 200 or not chunked:
            self._end(f"HTTP {self.result.status}")
            return False
        return True

    def _read_chunks(self, now: float) -> None:
        while True:
            if self._chunk_left < 0:
                line_end = self._buffer.find(b"\r\n")
                if line_end < 0:
                    return
                size = int(self._buffer[:line_end].split(b";")[0], 16)
                self._buffer = self._buffer[line_end + 2 :]
                if size == 0:
                    self._end(None if self.result.done else "body ended without [DONE]")
                    return
                self._chunk_left = size
            if len(self._buffer) < self._chunk_left + 2:
                return
            self._sse += self._buffer[: self._chunk_left]
            self._buffer = self._buffer[self._chunk_left + 2 :]
            self._chunk_left = -1
            self._read_events(now)

    def _read_events(self, now: float) -> None:
        result = self.result
        while (end := self._sse.find(b"\n\n")) >= 0:
            event, self._sse = self._sse[:end], self._sse[end + 2 :]
            if not event.startswith(b"data: "):
                continue
            result.events += 1
            payload = event[6:]
            if payload == b"[DONE]":
                result.done = True
            elif b'"error"' in payload and b'"choices"' not in payload:
                self._end("error event")
            elif b'"delta":{"content":' in payload:
                result.token_times.append(now)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed early"
        self._end(None if self.result.done else reason)

    def _end(self, error: str | None) -> None:
        if self.finished.done():
            return
        if error is not None:
            self.result.error = error
        if self.transport is not None:
            self.transport.close()
        self.finished.set_result(None)


async def run_stream(host: str, port: int, body: bytes, result: StreamResult) -> None:
    loop = asyncio.get_running_loop()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    finished: asyncio.Future[None] = loop.create_future()
    result.started = time.perf_counter()
    transport: asyncio.BaseTransport | None = None
    try:
        transport, _ = await loop.create_connection(
            lambda: StreamProtocol(request, result, finished), host, port
        )
        await finished
    except OSError as e:
        result.error = f"connect: {e.__class__.__name__}"
    finally:
        if transport is not None:
            transport.close()


async def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A minimal HTTP/1.0 GET (the server closes the connection after the body)."""

    async def get() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        raw = await reader.read()
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    return await asyncio.wait_for(get(), timeout)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process, from C{/proc}."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def metric_sum(text: str, name: str) -> float:
    """Sum of the samples of one metric in a text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Simulator:
    """The one kthena-sim process under test, and its log (kept, bounded, for errors)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0
        self.log: collections.deque[bytes] = collections.deque(maxlen=200)
        self.pinned = "not pinned"
        self.command: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        args = self.args
        command = [
            TWISTD,
            "-n",
            "--pidfile=",
            "kthena-sim",
            "--engine",
            args.engine,
            "--model",
            "bench-model",
            "--listen",
            f"tcp:0:interface={args.host}:backlog={max(1024, args.streams)}",
            "--max-num-seqs",
            str(max(args.streams, 1)),
            "--kv-blocks",
            str(args.streams * (args.tokens // 16 + 8) + 1024),
            "--itl",
            str(args.itl),
            "--output-tokens",
            str(args.tokens),
        ]
        taskset = shutil.which("taskset")
        if args.sim_cpu >= 0 and taskset:
            command = [taskset, "-c", str(args.sim_cpu), *command]
            self.pinned = f"CPU {args.sim_cpu} (taskset)"
        self.command = command
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        self.process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=tempfile.gettempdir(),
            start_new_session=True,
        )
        if args.sim_cpu >= 0 and not taskset and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self.process.pid, {args.sim_cpu})
            self.pinned = f"CPU {args.sim_cpu} (sched_setaffinity)"
        await asyncio.wait_for(self._wait_for_port(), 20)
        self._drain = asyncio.create_task(self._read_log())
        deadline = time.monotonic() + 20
        while True:
            try:
                if (await http_get(args.host, self.port, "/health", 2))[0] == 200:
                    return
            except (OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("kthena-sim did not become healthy:\n" + self.log_text())
            await asyncio.sleep(0.05)

    async def _wait_for_port(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.log.append(line)
            if match := _LISTENING.search(line):
                self.port = int(match[1])
                return
        raise RuntimeError("kthena-sim exited before listening:\n" + self.log_text())

    async def _read_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.log.append(line)

    def log_text(self) -> str:
        return b"".join(self.log).decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        if self._drain is not None:
            await asyncio.wait_for(self._drain, 5)


async def bench(args: argparse.Namespace) -> dict[str, object]:
    sim = Simulator(args)
    try:
        await sim.start()
        if args.client_cpu >= 0 and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {args.client_cpu})
        body = json.dumps(
            {
                "model": "bench-model",
                "messages": [{"role": "user", "content": "tell me about the sim " * 4}],
                "stream": True,
                "max_tokens": args.tokens,
            }
        ).encode()
        results = [StreamResult(0.0) for _ in range(args.streams)]
        cpu_before, own_before = cpu_seconds(sim.pid), own_cpu_seconds()
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(run_stream(args.host, sim.port, body, r)) for r in results]
        _, pending = await asyncio.wait(tasks, timeout=args.timeout)
        for task in pending:
            task.cancel()
        for result in results:
            if not result.done and result.error is None:
                result.error = f"unfinished after {args.timeout} s"
        wall = time.perf_counter() - started
        cpu_sim, own_cpu = cpu_seconds(sim.pid) - cpu_before, own_cpu_seconds() - own_before
        status, metrics_body = await http_get(args.host, sim.port, "/metrics", 10)
        metrics = metrics_body.decode() if status == 200 else ""
    finally:
        await sim.stop()

    errors = collections.Counter(r.error for r in results if r.error is not None)
    completed = [r for r in results if r.done and r.error is None]
    short = sum(1 for r in completed if len(r.token_times) != args.tokens)
    ttft = [r.token_times[0] - r.started for r in results if r.token_times]
    gaps = [b - a for r in results for a, b in itertools.pairwise(r.token_times)]
    events = sum(r.events for r in results)
    tokens = sum(len(r.token_times) for r in results)
    prefix = f"{args.engine}:"
    itl_count = metric_sum(metrics, prefix + "inter_token_latency_seconds_count")
    itl_sum = metric_sum(metrics, prefix + "inter_token_latency_seconds_sum")
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "sim_command": shlex.join(sim.command),
        "sim_pinned": sim.pinned,
        "client_cpu": args.client_cpu,
        "streams": args.streams,
        "itl": args.itl,
        "tokens_per_stream": args.tokens,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "completed": len(completed),
        "wrong_token_count": short,
        "sse_events": events,
        "token_events": tokens,
        "wall_s": wall,
        "events_per_s": events / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "gap_p50_ms": percentile(gaps, 50) * 1000,
        "gap_p99_ms": percentile(gaps, 99) * 1000,
        "sim_itl_mean_ms": itl_sum / itl_count * 1000 if itl_count else float("nan"),
        "sim_cpu_s": cpu_sim,
        "sim_cpu_pct": cpu_sim / wall * 100,
        "client_cpu_s": own_cpu,
        "client_cpu_pct": own_cpu / wall * 100,
    }


def report(r: dict[str, object]) -> str:
    def f(key: str, spec: str = ".1f") -> str:
        value = r[key]
        assert isinstance(value, int | float)
        return format(value, spec)

    itl_ms = float(f("itl", ".6f")) * 1000
    return "\n".join(
        [
            f"command: {r['command']}",
            f"sim: {r['sim_command']}",
            f"sim pinned to {r['sim_pinned']}; client pinned to CPU {r['client_cpu']}",
            f"streams: {r['streams']} x {r['tokens_per_stream']} tokens, --itl {itl_ms:g} ms",
            f"errors: {r['errors']} {r['error_kinds'] or ''}".rstrip(),
            f"completed: {r['completed']} (wrong token count: {r['wrong_token_count']})",
            f"SSE events: {r['sse_events']} ({r['token_events']} tokens) in {f('wall_s', '.2f')} s"
            f" = {f('events_per_s', '.0f')} events/s",
            f"TTFT: p50 {f('ttft_p50_ms')} ms, p99 {f('ttft_p99_ms')} ms",
            f"inter-token gap at the client: p50 {f('gap_p50_ms')} ms, p99 {f('gap_p99_ms')} ms"
            f" (configured {itl_ms:g} ms; sim's own mean {f('sim_itl_mean_ms')} ms)",
            f"sim CPU: {f('sim_cpu_s', '.2f')} s = {f('sim_cpu_pct', '.0f')}% of one core;"
            f" client CPU: {f('client_cpu_s', '.2f')} s = {f('client_cpu_pct', '.0f')}%",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams (500)")
    parser.add_argument("--itl", type=float, default=0.02, help="sim --itl seconds (0.02)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream (128)")
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to use")
    parser.add_argument("--sim-cpu", type=int, default=0, help="CPU for the sim (-1: any)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU for the client (-1: any)")
    parser.add_argument("--timeout", type=float, default=120.0, help="overall deadline (s)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.streams <= MAX_STREAMS:
        parser.error(f"--streams must be 1..{MAX_STREAMS}")
    if not 1 <= args.tokens <= MAX_TOKENS:
        parser.error(f"--tokens must be 1..{MAX_TOKENS}")
    if not 0 < args.timeout <= 600:
        parser.error("--timeout must be in (0, 600] seconds")
    if args.itl < 0:
        parser.error("--itl must be >= 0")
    try:
        loopback = ipaddress.IPv4Address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        parser.error("--host must be an IPv4 loopback address (127.x.x.x)")
    cpus = os.cpu_count() or 1
    if cpus < 2 or args.sim_cpu >= cpus or args.client_cpu >= cpus:
        args.sim_cpu = args.client_cpu = -1  # not enough CPUs to separate them
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.streams + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            sys.exit(f"need {wanted} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    figures = asyncio.run(bench(args))
    print(json.dumps(figures, indent=2) if args.json else report(figures))
    return 1 if figures["errors"] or figures["wrong_token_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
