#!/usr/bin/env python3
"""
Router throughput and added latency against direct access to the same backend.

The backend is Debian's nginx answering a fixed chat completion (JSON) and a fixed SSE
stream, so that it is never the bottleneck (it alone is shown to be many times faster).
The router runs as `twistd kthena-router`, pinned to one core, with everything on: the
metrics, the JSON access log to a file, Kthena's default scoring (least-request,
gpu-usage, least-latency, prefix-cache) on pods whose /metrics it scrapes every second;
wrk and nginx share the other core. Everything listens on loopback only; every run is
bounded in time.

    apt-get install -y nginx-light wrk
    python3 bench/router_bench.py [--duration 10] [--rounds 1] [--floor] [--connections 32]
        [--limits [--redis H:P]]
        [--pd] [--pods N] [--prompt-bytes N] [--client twisted|lean] [--server twisted|lean]

--limits puts token and request limits on the route, high enough never to refuse (the
cost of a check and a settle on every request); --redis keeps them in that Redis. --pd
makes the backend a prefill/decode group (two pods on the one nginx, the http connector):
two upstream legs per request, to measure what PD adds to the router. --pods N gives the
model N pods (all the one nginx, each scraped): what scheduling and health checks cost
per request with that many candidates. --prompt-bytes N sends a prompt of N bytes instead
of "hello world" (what parsing, prompt checks and prefix hashing cost per byte).

Prints one line per scenario: requests/s, latency p50/p99, and the router's added p50;
and the baseline of the same run: a bare Twisted proxy with no logic (bench/bare_proxy.py,
twisted.web + Agent, pinned to the router's core), with the router's req/s over its.
--rounds N runs the bare proxy and the router N times each, one after the other, and shows
each figure's median (and each round's ratio): this VM's speed drifts by 10-40% from one
minute to the next, which one run of each turns into a ratio off by as much. --floor adds
bench/floor_proxy.py (Twisted and httptools with no logic: the least any proxy on this
stack spends) to each round, and the router's CPU a request above it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BACKEND = "127.0.0.20"
BACKEND_PORT = 8000
ROUTER_PORT = 18080
BARE_PORT = 18090
FLOOR_PORT = 18095
PATH = "/v1/chat/completions"
ROOT = Path(__file__).resolve().parents[1]

CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello there"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    },
    separators=(",", ":"),
)


def sse_body(tokens: int = 16) -> str:
    head = '{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"m",'
    events = [
        f'data: {head}"choices":[{{"index":0,"delta":{{"content":" tok{i}"}},'
        '"finish_reason":null}],"usage":null}\n\n'
        for i in range(tokens)
    ]
    events.append(
        f'data: {head}"choices":[],"usage":{{"prompt_tokens":9,"completion_tokens":{tokens},'
        f'"total_tokens":{9 + tokens}}}}}\n\n'
    )
    events.append("data: [DONE]\n\n")
    return "".join(events)


def nginx_conf(workdir: Path) -> str:
    (workdir / "chat.json").write_text(CHAT_JSON)
    (workdir / "stream.sse").write_text(sse_body())
    (workdir / "metrics.txt").write_text(POD_METRICS)
    return f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 60s;
  server {{
    listen {BACKEND}:{BACKEND_PORT};
    location = /v1/chat/completions {{
      if ($http_x_bench_stream) {{ rewrite ^ /stream last; }}
      default_type application/json;
      alias {workdir}/chat.json;
      error_page 405 =200 $uri;
    }}
    location = /metrics {{
      default_type text/plain;
      alias {workdir}/metrics.txt;
    }}
    location = /stream {{
      internal;
      default_type text/event-stream;
      alias {workdir}/stream.sse;
      error_page 405 =200 $uri;
    }}
  }}
}}
"""


POD_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="bench-model"} 0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="bench-model"} 0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="bench-model"} 0.1
"""
"""What the pods' /metrics say (nginx serves it): the router's scrapes succeed, so the
pod is healthy and every score plugin has live numbers, as in production."""

ROUTER_CONFIG = f"""
listen: tcp:{ROUTER_PORT}:interface=127.0.0.1
adminListen: tcp:0:interface=127.0.0.1
reloadInterval: 0s
observability:
  accessLog: {{format: json, output: ACCESS_LOG}}
resources:
  - apiVersion: networking.serving.volcano.sh/v1alpha1
    kind: ModelRoute
    metadata: {{name: bench}}
    spec: {{modelName: bench, rules: [{{targetModels: [{{modelServerName: bench}}]}}]LIMITS}}
  - apiVersion: networking.serving.volcano.sh/v1alpha1
    kind: ModelServer
    metadata: {{name: bench}}
    spec:
      model: bench-model
      inferenceEngine: vLLM
      workloadSelector: {{matchLabels: {{app: bench}}}}
      workloadPort: {{port: {BACKEND_PORT}}}
  - apiVersion: v1
    kind: Pod
    metadata: {{name: bench-0, labels: {{app: bench}}}}
    status: {{podIP: {BACKEND}, phase: Running, conditions: [{{type: Ready, status: "True"}}]}}
"""


PD_SERVER = (
    "workloadSelector: {matchLabels: {app: bench}, pdGroup: {groupKey: group, "
    "prefillLabels: {role: prefill}, decodeLabels: {role: decode}}}"
    "\n      kvConnector: {type: http}"
)
PD_PODS = """  - apiVersion: v1
    kind: Pod
    metadata: {name: bench-0, labels: {app: bench, role: prefill, group: g}}
    status: {podIP: BACKEND, phase: Running, conditions: [{type: Ready, status: "True"}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: bench-1, labels: {app: bench, role: decode, group: g}}
    status: {podIP: BACKEND, phase: Running, conditions: [{type: Ready, status: "True"}]}
""".replace("BACKEND", BACKEND)


def router_config(limits: bool, redis: str | None, pd: bool = False, pods: int = 1) -> str:
    """
    The router's config; with C{limits}, limits on the route that never refuse; with
    C{pd}, the backend is a prefill/decode group of two pods (the same nginx), so every
    request is a prefill leg then a decode leg (C{http} connector); C{pods} pods serve
    the model (all of them the one nginx).
    """
    config = ROUTER_CONFIG
    if pods > 1:
        pod = config[config.index("  - apiVersion: v1\n    kind: Pod") :]
        config = config.replace(
            pod, "".join(pod.replace("bench-0", f"bench-{i}") for i in range(pods))
        )
    if pd:
        config = config.replace("workloadSelector: {matchLabels: {app: bench}}", PD_SERVER)
        config = config[: config.index("  - apiVersion: v1\n    kind: Pod")] + PD_PODS
    if not limits:
        return config.replace("LIMITS", "")
    high = "inputTokensPerUnit: 1000000000, outputTokensPerUnit: 1000000000"
    shared = f", global: {{redis: {{address: '{redis}'}}}}" if redis else ""
    rule = f", rateLimit: {{{high}, requestsPerUnit: 1000000000, unit: second{shared}}}"
    return config.replace("LIMITS", rule)


def wrk_script(workdir: Path, stream: bool, prompt_bytes: int = 0) -> Path:
    """wrk's request: a chat completion of "hello world", or of C{prompt_bytes} of text."""
    content = "hello world"
    if prompt_bytes > len(content):
        words = "the quick brown fox jumps over the lazy dog " * (prompt_bytes // 44 + 1)
        content = words[:prompt_bytes]
    body = {"model": "bench", "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    path = workdir / ("stream.lua" if stream else "chat.lua")
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body, separators=(',', ':')))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        + ('wrk.headers["X-Bench-Stream"] = "1"\n' if stream else "")
    )
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(url: str, script: Path, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
         "-s", str(script), url],
        capture_output=True, text=True, timeout=duration + 30, check=True,
    ).stdout  # fmt: skip
    if os.environ.get("BENCH_DEBUG"):
        print(out)
    result: dict[str, float] = {}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(rps.group(1)) if rps else 0.0
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        result[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system time of process C{pid} so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def timed_wrk(
    pid: int, url: str, script: Path, duration: int, connections: int
) -> dict[str, float]:
    """L{run_wrk}, and the CPU process C{pid} spent per request meanwhile (C{cpu_us})."""
    before = cpu_seconds(pid)
    result = run_wrk(url, script, duration, connections)
    requests = result["rps"] * duration
    result["cpu_us"] = (cpu_seconds(pid) - before) / requests * 1e6 if requests else 0.0
    return result


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over C{runs} (of one scenario, taken in alternation)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def stop(process: subprocess.Popen[Any], signum: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Signal C{process} and wait for it; kill it past C{timeout}."""
    process.send_signal(signum)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()


def wait_for(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"127.0.0.1:{port} did not come up")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="runs of the bare proxy and the router, alternating; medians are shown",
    )  # fmt: skip
    parser.add_argument(
        "--floor", action="store_true",
        help="also the floor: bench/floor_proxy.py (Twisted + httptools, nothing else)",
    )  # fmt: skip
    parser.add_argument("--limits", action="store_true", help="limits on the route (never hit)")
    parser.add_argument("--redis", help="with --limits: the Redis (host:port) they live in")
    parser.add_argument("--pd", action="store_true", help="a prefill/decode group as backend")
    parser.add_argument("--pods", type=int, default=1, help="pods serving the model")
    parser.add_argument(
        "--prompt-bytes", type=int, default=0, help='the prompt\'s size (default: "hello world")'
    )
    parser.add_argument(
        "--client", choices=("twisted", "lean"), default="lean", help="upstream.client"
    )
    parser.add_argument(
        "--server", choices=("twisted", "lean"), default="lean", help="downstream.server"
    )
    return parser.parse_args()


def scenario(
    args: argparse.Namespace, script: Path, stream: bool, targets: dict[str, tuple[int, int]]
) -> None:
    """
    One scenario (JSON or stream): nginx directly, then each target (C{name: (pid,
    port)}) C{args.rounds} times in alternation; the medians, the ratios.
    """
    kind = "stream" if stream else "json"
    base = run_wrk(
        f"http://{BACKEND}:{BACKEND_PORT}{PATH}", script, args.duration, args.connections
    )
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for _ in range(args.rounds):  # alternating: the VM's speed drifts between runs
        for name, (pid, port) in targets.items():
            url = f"http://127.0.0.1:{port}{PATH}"
            runs[name].append(timed_wrk(pid, url, script, args.duration, args.connections))
    medians = {name: median_run(done) for name, done in runs.items()}
    proxy, via = medians["bare proxy"], medians["router"]
    for name, r in [("direct", base), *medians.items()]:
        cpu = f"{r['cpu_us']:>12.0f}" if "cpu_us" in r else ""
        print(f"{name + ' ' + kind:<28}{r['rps']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
              f"{r['errors']:>8.0f}{cpu}")  # fmt: skip
    added = via["p50_ms"] - base["p50_ms"]
    ratio = base["rps"] / max(via["rps"], 1)
    print(f"{'  added p50 ' + kind:<28}{'':>10}{added:>10.2f}{'':>18}"
          f"  backend alone is {ratio:.1f}x the router")  # fmt: skip
    bare_added = proxy["p50_ms"] - base["p50_ms"]
    print(f"{'  router / bare proxy ' + kind:<28}{via['rps'] / max(proxy['rps'], 1):>10.2f}"
          f"{added / bare_added if bare_added > 0 else float('nan'):>10.2f}"
          "  (req/s ratio, added-p50 ratio)")  # fmt: skip
    print(f"{'  bare / router CPU per req ' + kind:<28}"
          f"{proxy['cpu_us'] / max(via['cpu_us'], 1):>10.2f}")  # fmt: skip
    if "floor proxy" in medians:
        own = via["cpu_us"] - medians["floor proxy"]["cpu_us"]
        print(f"{'  router over the floor ' + kind:<28}{own:>10.0f}"
              "  (CPU us a request: the router's own work)")  # fmt: skip
    if args.rounds > 1:
        ratios = " ".join(
            f"{v['rps'] / max(p['rps'], 1):.2f}"
            for p, v in zip(runs["bare proxy"], runs["router"], strict=True)
        )
        print(f"{'  each round ' + kind:<28}{ratios}  (router / bare proxy req/s)")


def main() -> None:
    args = parse_args()
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install -y nginx-light wrk util-linux")
    workdir = Path(tempfile.mkdtemp(prefix="kthena-bench-"))
    workdir.chmod(0o755)  # nginx workers (www-data) read the bodies from here
    (workdir / "nginx.conf").write_text(nginx_conf(workdir))
    config = router_config(args.limits, args.redis, args.pd, args.pods).replace(
        "reloadInterval: 0s\n",
        f"reloadInterval: 0s\nupstream: {{client: {args.client}}}\n"
        f"downstream: {{server: {args.server}}}\n",
    )
    (workdir / "router.yaml").write_text(config.replace("ACCESS_LOG", str(workdir / "access.log")))
    nginx = subprocess.Popen(
        ["taskset", "-c", "1", "nginx", "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"]
    )
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (workdir / "router.log").open("w")
    router = subprocess.Popen(
        ["taskset", "-c", "0", twistd, "-n", "--pidfile=", "kthena-router", "--config",
         str(workdir / "router.yaml")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    bare = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, str(ROOT / "bench" / "bare_proxy.py"),
         "--listen", str(BARE_PORT), "--backend", f"http://{BACKEND}:{BACKEND_PORT}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    floor = None
    if args.floor:
        floor = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, str(ROOT / "bench" / "floor_proxy.py"),
             "--listen", str(FLOOR_PORT), "--backend", f"{BACKEND}:{BACKEND_PORT}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{ROUTER_PORT}/healthz")
        wait_for_port(BARE_PORT)
        print(f"{'scenario':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}"
              f"{'CPU us/req':>12}")  # fmt: skip
        targets = {"bare proxy": (bare.pid, BARE_PORT), "router": (router.pid, ROUTER_PORT)}
        if floor is not None:
            wait_for_port(FLOOR_PORT)
            targets["floor proxy"] = (floor.pid, FLOOR_PORT)
        for stream in (False, True):
            scenario(args, wrk_script(workdir, stream, args.prompt_bytes), stream, targets)
    finally:
        stop(router)
        stop(bare)
        if floor is not None:
            stop(floor)
        stop(nginx, signal.SIGQUIT)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
