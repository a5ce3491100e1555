#!/usr/bin/env python3
"""
What scraping costs the router: N pods (default 100), each a listener on its own loopback
address (127.0.1.x:8000) serving a realistic vLLM /metrics page (the simulator's, with a
LoRA gauge, ~25 kB) and /v1/models, all from one helper process; a router
(`twistd kthena-router`) scraping them every second; the router's CPU time measured from
/proc over a bounded window with no traffic, and reported as a share of one core and as
microseconds per pod scrape.

    python3 bench/scrape_bench.py [--pods 100] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "127.0.1."


def serve(pods: int) -> None:
    """The helper process: N static pods."""
    from twisted.internet import reactor
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from kthena.sim import metrics
    from kthena.sim.engine import EngineConfig, SimEngine

    engine = SimEngine(Clock(), EngineConfig(max_num_seqs=8))
    engine.load_lora("sql", "/adapters/sql")
    registry = metrics.build_registry(engine, metrics.VLLM, "meta-llama/Llama-3.1-8B", gpus=8)
    page = metrics.render(registry)
    models = (
        b'{"object":"list","data":[{"id":"meta-llama/Llama-3.1-8B","object":"model",'
        b'"parent":null},{"id":"sql","object":"model","parent":"meta-llama/Llama-3.1-8B"}]}'
    )

    class Static(Resource):
        isLeaf = True

        def render_GET(self, request: object) -> bytes:
            return page if request.path == b"/metrics" else models  # type: ignore[attr-defined]

    site = Site(Static())
    site.log = lambda request: None  # type: ignore[method-assign]
    for i in range(pods):
        reactor.listenTCP(8000, site, interface=f"{BASE}{i + 2}")  # type: ignore[attr-defined]
    print(f"serving {pods} pods, /metrics is {len(page)} bytes", flush=True)
    reactor.run()  # type: ignore[attr-defined]


def config(pods: int) -> str:
    lines = [
        "listen: tcp:18090:interface=127.0.0.1",
        "adminListen: tcp:19090:interface=127.0.0.1",
        "reloadInterval: 0s",
        "observability: {accessLog: {enabled: false}}",
        "podMetrics: {interval: 1s, timeout: 800ms}",
        "resources:",
        "  - {apiVersion: networking.serving.volcano.sh/v1alpha1, kind: ModelServer,"
        " metadata: {name: s}, spec: {inferenceEngine: vLLM,"
        " workloadSelector: {matchLabels: {a: s}}, workloadPort: {port: 8000}}}",
    ]
    for i in range(pods):
        lines.append(
            f"  - {{apiVersion: v1, kind: Pod, metadata: {{name: p{i}, labels: {{a: s}}}},"
            f" status: {{podIP: '{BASE}{i + 2}', phase: Running,"
            " conditions: [{type: Ready, status: 'True'}]}}"
        )
    return "\n".join(lines) + "\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if not 1 <= args.pods <= 250 or not 1 <= args.seconds <= 120:
        raise SystemExit("--pods 1..250, --seconds 1..120")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workdir = Path(tempfile.mkdtemp(prefix="kthena-scrape-"))
    (workdir / "router.yaml").write_text(config(args.pods))
    pods = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, __file__, "--serve", str(args.pods)], env=env
    )
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    log = (workdir / "router.log").open("w")
    router = subprocess.Popen(
        ["taskset", "-c", "0", twistd, "-n", "--pidfile=", "kthena-router", "--config",
         str(workdir / "router.yaml")],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if urllib.request.urlopen("http://127.0.0.1:18090/readyz", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the router never became ready (first scrape round)")
            time.sleep(0.2)
        time.sleep(2)  # settle
        start, before = time.monotonic(), cpu_seconds(router.pid)
        time.sleep(args.seconds)
        used = cpu_seconds(router.pid) - before
        elapsed = time.monotonic() - start
        scrapes = args.pods * elapsed  # one round a second
        metrics_page = urllib.request.urlopen("http://127.0.0.1:19090/metrics", timeout=5).read()
        healthy = metrics_page.count(b"kthena_lb_target_health{") and metrics_page.count(b"} 1.0\n")
        print(f"pods {args.pods}, {elapsed:.1f} s: router CPU {used:.2f} s = "
              f"{100 * used / elapsed:.1f}% of a core, {1e6 * used / scrapes:.0f} us per pod "
              f"scrape (metrics + models every 5 s); gauges present: {bool(healthy)}")  # fmt: skip
    finally:
        for proc in (router, pods):
            proc.send_signal(signal.SIGTERM)
        for proc in (router, pods):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


if __name__ == "__main__":
    main()
