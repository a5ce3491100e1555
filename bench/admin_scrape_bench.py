#!/usr/bin/env python3
"""
Does a /metrics scrape slow the proxy? Proxy latency with no scrapes, one scrape a second
and scrapes back to back, for three ways of rendering: on the reactor thread in slices
of half a millisecond, paced to a quarter of the CPU (what the router does); the same
steps in the reactor's thread pool, paced (what the router did before: the render holds
the GIL and starves the reactor thread); on the reactor thread in one go (what a naive
resource does).

The backend is Debian's nginx answering a fixed chat completion (as in router_bench.py).
The router runs in a child Python process (an in-process router built with
makeRouterService), pinned to CPU 0, with --models routes so that its registry holds
several thousand series, as a busy router's does; the load, nginx and the scraper share
CPU 1. The scraper asks as Prometheus does (OpenMetrics, gzip).

Two loads:

  --load rate (default): a fixed request rate (--rate, over --connections keep-alive
      connections, each request timed), well below saturation; every request is
      classed by whether it overlapped a scrape (sent or answered while a scrape was
      open), so the scrape's own effect shows even on a busy machine.
  --load wrk: wrk at saturation (--connections), for the throughput cost.

    apt-get install -y nginx-light wrk
    python3 bench/admin_scrape_bench.py [--load rate|wrk] [--duration 10] [--rounds 1]

Loopback only, ports of its own; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from router_bench import (  # noqa: E402
    BACKEND,
    BACKEND_PORT,
    ROUTER_PORT,
    nginx_conf,
    wait_for,
)
from router_bench import router_config as bench_config  # noqa: E402

# Addresses of its own (router_bench.py: 127.0.0.20 and 18080; accesslog_bench.py:
# 127.0.0.21 and 18081), so that they may run at the same time (all figures would be off).
BENCH_BACKEND = "127.0.0.22"
BENCH_ROUTER_PORT = 18092
ADMIN_PORT = 19092
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
"""What Prometheus 3 sends when it scrapes."""
SCRAPES = {"none": None, "every 1 s": 1.0, "back to back": 0.0}
RENDERINGS = ("sliced", "paced threads", "one go")


# -- the router process


def router_config(models: int) -> dict[str, Any]:
    text = bench_config(limits=False, redis=None)  # router_bench's, with its access log off
    text = text.replace(f"tcp:{ROUTER_PORT}:", f"tcp:{BENCH_ROUTER_PORT}:")
    raw: dict[str, Any] = yaml.safe_load(text.replace(BACKEND, BENCH_BACKEND))
    raw["observability"]["accessLog"] = {"enabled": False}
    raw["adminListen"] = f"tcp:{ADMIN_PORT}:interface=127.0.0.1"
    base = raw["resources"][0]
    for i in range(models):
        route = yaml.safe_load(yaml.safe_dump(base))
        route["metadata"]["name"] = f"bench-{i}"
        route["spec"]["modelName"] = f"bench-{i}"
        raw["resources"].append(route)
    return raw


def serve(rendering: str, models: int, workdir: Path) -> None:
    from collections import deque
    from collections.abc import Iterator

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.threads import deferToThreadPool

    from kthena.config.router import parse_config
    from kthena.observability.admin import at_once
    from kthena.service import makeRouterService

    def in_threads(steps: Iterator[None]) -> Deferred[Iterator[None]]:
        def run() -> Iterator[None]:
            deque(steps, maxlen=0)
            return steps

        return deferToThreadPool(reactor, reactor.getThreadPool(), run)  # type: ignore[arg-type]

    config = parse_config(router_config(models), "bench", workdir, [])
    router = makeRouterService(config, reactor)  # type: ignore[arg-type]
    resource = router.admin.metrics_resource
    if rendering == "paced threads":
        resource.runner = in_threads
    if rendering == "one go":  # the naive resource: no pacing either
        resource.runner = at_once
        resource.max_share = 1.0
    router.startService()
    reactor.addSystemEventTrigger("before", "shutdown", router.stopService)
    reactor.run()


# -- scrapes


class Scraper(threading.Thread):
    """Scrapes /metrics as Prometheus does, every C{interval} seconds (0: back to back)."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.stop = threading.Event()
        self.windows: list[tuple[float, float]] = []
        self.size = 0
        self.lines = 0

    def run(self) -> None:
        url = f"http://127.0.0.1:{ADMIN_PORT}/metrics"
        headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
        while not self.stop.is_set():
            started = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as r:
                body = r.read()
            self.windows.append((started, time.perf_counter()))
            self.size = len(body)
            self.lines = gzip.decompress(body).count(b"\n")
            if self.interval:
                self.stop.wait(self.interval)

    def summary(self) -> str:
        if not self.windows:
            return ""
        ms = [(b - a) * 1e3 for a, b in self.windows]
        return (
            f"  {len(ms)} scrapes of {self.lines} lines ({self.size / 1024:.0f} kB gzip), "
            f"{statistics.median(ms):.0f}/{max(ms):.0f} ms p50/max"
        )


# -- fixed-rate load


@dataclass
class Timings:
    requests: list[tuple[float, float]] = field(default_factory=list)  # (sent, seconds)
    errors: int = 0


def bodies(models: int) -> list[bytes]:
    return [
        json.dumps(
            {"model": f"bench-{i}", "messages": [{"role": "user", "content": "hello world"}]}
        ).encode()
        for i in range(models)
    ]


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> None:
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    if length is not None:
        await reader.readexactly(int(length.group(1)))
        return
    assert re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head), head
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def _connection(
    payloads: list[bytes], interval: float, duration: float, offset: int, timings: Timings
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", BENCH_ROUTER_PORT)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    due = loop.time() + interval * (offset % 97) / 97  # spread the connections' phases
    i = offset
    try:
        while loop.time() < deadline:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            due = max(due + interval, loop.time())
            body = payloads[i % len(payloads)]
            i += 1
            sent = time.perf_counter()
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            await _read_body(reader, head)
            timings.requests.append((sent, time.perf_counter() - sent))
            if not head.startswith(b"HTTP/1.1 200"):
                timings.errors += 1
    finally:
        writer.close()


def fixed_rate(args: argparse.Namespace, duration: float) -> Timings:
    timings = Timings()
    payloads = bodies(args.models)
    interval = args.connections / args.rate

    async def run() -> None:
        await asyncio.gather(
            *(
                _connection(payloads, interval, duration, i, timings)
                for i in range(args.connections)
            )
        )

    asyncio.run(run())
    return timings


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rate_row(timings: Timings, windows: list[tuple[float, float]], duration: float) -> str:
    def overlaps(sent: float, took: float) -> bool:
        return any(sent < end and sent + took > start for start, end in windows)

    during = [took * 1e3 for sent, took in timings.requests if overlaps(sent, took)]
    outside = [took * 1e3 for sent, took in timings.requests if not overlaps(sent, took)]
    everything = during + outside

    def stats(ms: list[float]) -> str:
        return f"{_pct(ms, 0.5):>7.2f}{_pct(ms, 0.99):>8.2f}{max(ms, default=float('nan')):>8.2f}"

    return (
        f"{len(everything) / duration:>7.0f}{timings.errors:>5}{stats(everything)}"
        f"{len(during):>7}{stats(during)}{stats(outside)}"
    )


RATE_HEADER = (
    f"{'rendering':<16}{'scrapes':<14}{'req/s':>7}{'err':>5}"
    f"{'all: p50':>9}{'p99':>8}{'max':>8}{'n in':>7}"
    f"{'in: p50':>8}{'p99':>8}{'max':>8}{'out: p50':>9}{'p99':>8}{'max':>8}"
)


# -- wrk at saturation


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_script(workdir: Path, models: int) -> Path:
    path = workdir / "models.lua"
    path.write_text(
        "local i = 0\n"
        f"local n = {models}\n"
        "request = function()\n"
        "  i = i + 1\n"
        '  local body = \'{"model":"bench-\' .. (i % n) .. '
        '\'","messages":[{"role":"user","content":"hello world"}]}\'\n'
        '  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)\n'
        "end\n"
    )
    return path


def run_wrk(script: Path, duration: float, connections: int) -> str:
    url = f"http://127.0.0.1:{BENCH_ROUTER_PORT}/v1/chat/completions"
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s",
         "--latency", "-s", str(script), url],
        capture_output=True, text=True, timeout=duration + 30, check=True,
    ).stdout  # fmt: skip
    found: dict[str, float] = {}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    found["rps"] = float(rps.group(1)) if rps else 0.0
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        found[pct] = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    m = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    found["max"] = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return (
        f"{found['rps']:>7.0f}{int(errors.group(1)) if errors else 0:>5}"
        f"{found['50']:>9.2f}{found['99']:>8.2f}{found['max']:>8.2f}"
    )


WRK_HEADER = f"{'rendering':<16}{'scrapes':<14}{'req/s':>7}{'err':>5}{'p50':>9}{'p99':>8}{'max':>8}"


# -- the runs


def measure(rendering: str, args: argparse.Namespace, workdir: Path) -> None:
    log = (workdir / "router.log").open("w")
    router = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, __file__, "--serve", rendering,
         "--models", str(args.models), "--workdir", str(workdir)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    script = wrk_script(workdir, args.models)
    try:
        wait_for(f"http://127.0.0.1:{BENCH_ROUTER_PORT}/healthz")
        wait_for(f"http://127.0.0.1:{ADMIN_PORT}/metrics")
        if router.poll() is not None:
            raise SystemExit(f"the router exited (a port in use?): see {workdir}/router.log")
        run_wrk(script, 3, 16)  # warm up; every model's series exists from here on
        for name, interval in SCRAPES.items():
            scraper = None if interval is None else Scraper(interval)
            if scraper is not None:
                scraper.start()
            if args.load == "wrk":
                line = run_wrk(script, args.duration, args.connections)
            else:
                timings = fixed_rate(args, args.duration)
            if scraper is not None:
                scraper.stop.set()
                scraper.join(30)
            if args.load != "wrk":
                windows = scraper.windows if scraper is not None else []
                line = rate_row(timings, windows, args.duration)
            summary = scraper.summary() if scraper is not None else ""
            print(f"{rendering:<16}{name:<14}{line}{summary}", flush=True)
    finally:
        router.send_signal(signal.SIGTERM)
        try:
            router.wait(15)
        except subprocess.TimeoutExpired:
            router.kill()
        log.close()


def checked(args: argparse.Namespace) -> list[str]:
    """The renderings asked for, once the arguments are within the bench's limits."""
    if not (
        1 <= args.models <= 1000
        and 1 <= args.duration <= 120
        and 1 <= args.rounds <= 5
        and 1 <= args.rate <= 5000
        and 1 <= args.connections <= 256
    ):
        raise SystemExit("limits: models 1000, duration 120, rounds 5, rate 5000, connections 256")
    renderings = args.renderings.split(",")
    if not set(renderings) <= set(RENDERINGS):
        raise SystemExit(f"--renderings: some of {', '.join(RENDERINGS)}")
    return renderings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--load", choices=("rate", "wrk"), default="rate")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rate", type=int, default=600, help="requests/s (--load rate)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--renderings", default=",".join(RENDERINGS), help=f"some of {', '.join(RENDERINGS)}"
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.models, Path(args.workdir))
        return
    renderings = checked(args)
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install -y nginx-light wrk util-linux")
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # load and scraper share CPU 1 with nginx
    workdir = Path(tempfile.mkdtemp(prefix="kthena-scrape-bench-"))
    workdir.chmod(0o755)
    conf = nginx_conf(workdir).replace(f"listen {BACKEND}:", f"listen {BENCH_BACKEND}:")
    (workdir / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen(
        ["taskset", "-c", "1", "nginx", "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"]
    )
    try:
        wait_for(f"http://{BENCH_BACKEND}:{BACKEND_PORT}/v1/chat/completions")
        if nginx.poll() is not None:
            raise SystemExit(f"nginx exited (is {BENCH_BACKEND}:{BACKEND_PORT} in use?)")
        if args.load == "wrk":
            print(f"wrk, {args.connections} connections; latency in ms\n{WRK_HEADER}")
        else:
            print(
                f"{args.rate} req/s over {args.connections} connections; latency in ms of "
                "all requests, those overlapping a scrape (in) and the others (out)\n" + RATE_HEADER
            )
        for _ in range(args.rounds):  # rounds interleave, so a busy moment hits every mode
            for rendering in renderings:
                measure(rendering, args, workdir)
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(15)
        except subprocess.TimeoutExpired:
            nginx.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
