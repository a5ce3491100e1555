#!/usr/bin/env python3
"""
How `--workers N` scales: the router of bench/router_bench.py (everything on, the nginx
backend, wrk at 32 connections, JSON and streams) as one process and as N workers under
a parent, in the same run.

This machine has two cores, and wrk and nginx need one of them, so the raw req/s at
N = 2 also measures wrk and nginx taking CPU from the workers. The bench therefore
prints, beside req/s, the CPU the router's processes used (parent and workers, from
/proc) and the requests per router CPU-second: with N workers each on a core, req/s
scales as N x that figure, so its ratio to the single process's is the scaling
efficiency that does not depend on the load generator (1.0: no cost of its own). The
share of the workers' CPU each took shows how evenly the shared socket spreads
connections.

    apt-get install -y nginx-light wrk
    python3 bench/workers_bench.py [--duration 10] [--workers 1 2]

Loopback only, ports of its own (router 18180, admin 18181); bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import router_bench

ROUTER_PORT = 18180
ADMIN_PORT = 18181


def worker_pids(count: int, timeout: float = 30.0) -> list[int]:
    """The workers' pids, once all C{count} are ready: a worker still starting when the
    load begins would take none of wrk's keep-alive connections."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN_PORT}/debug/workers") as reply:
            workers = json.load(reply)["workers"]
        if len(workers) == count and all(w["state"] == "ready" for w in workers):
            return [w["pid"] for w in workers]
        if time.monotonic() > deadline:
            raise SystemExit(f"the workers did not all become ready: {workers}")
        time.sleep(0.1)


def config(workdir: Path) -> Path:
    text = router_bench.router_config(False, None)
    text = text.replace(f"tcp:{router_bench.ROUTER_PORT}:", f"tcp:{ROUTER_PORT}:")
    text = text.replace("adminListen: tcp:0:", f"adminListen: tcp:{ADMIN_PORT}:")
    path = workdir / "router.yaml"
    path.write_text(text.replace("ACCESS_LOG", str(workdir / "access.log")))
    return path


def measure(workdir: Path, workers: int, duration: int, connections: int) -> list[str]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    cores = ",".join(str(i) for i in range(max(1, workers)))
    command = ["taskset", "-c", cores, twistd, "-n", "--pidfile=", "kthena-router"]
    command += ["--config", str(config(workdir))]
    if workers:
        command += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(router_bench.ROOT)}
    with (workdir / f"router-{workers}.log").open("w") as log:
        router = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    rows = []
    try:
        router_bench.wait_for(f"http://127.0.0.1:{ROUTER_PORT}/healthz", timeout=30)
        pids = [router.pid, *(worker_pids(workers) if workers else [])]
        for stream in (False, True):
            script = router_bench.wrk_script(workdir, stream)
            url = f"http://127.0.0.1:{ROUTER_PORT}/v1/chat/completions"
            before = [router_bench.cpu_seconds(pid) for pid in pids]
            result = router_bench.run_wrk(url, script, duration, connections)
            used = [router_bench.cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
            total = sum(used)
            requests = result["rps"] * duration
            shares = "/".join(f"{u / total:.0%}" for u in used[1:]) if workers else "-"
            name = "single process" if not workers else f"--workers {workers}"
            rows.append(
                f"{name + (' stream' if stream else ' json'):<24}{result['rps']:>9.0f}"
                f"{result['p50_ms']:>9.2f}{total / duration:>9.2f}"
                f"{requests / total if total else 0:>12.0f}  {shares}"
                + (f"  errors {result['errors']:.0f}" if result["errors"] else "")
            )
    finally:
        router_bench.stop(router, timeout=30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if any(not 1 <= n <= 8 for n in args.workers) or args.duration > 120:
        raise SystemExit("--workers 1 to 8, --duration at most 120")
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install -y nginx-light wrk util-linux")
    workdir = Path(tempfile.mkdtemp(prefix="kthena-workers-bench-"))
    workdir.chmod(0o755)  # nginx workers (www-data) read the bodies from here
    (workdir / "nginx.conf").write_text(router_bench.nginx_conf(workdir))
    nginx = subprocess.Popen(
        ["taskset", "-c", "1", "nginx", "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"]
    )
    try:
        router_bench.wait_for(f"http://{router_bench.BACKEND}:{router_bench.BACKEND_PORT}/metrics")
        header = f"{'router':<24}{'req/s':>9}{'p50 ms':>9}{'CPUs':>9}{'req/CPU-s':>12}"
        print(f"{header}  workers' shares of the CPU")
        for workers in (0, *args.workers):
            for row in measure(workdir, workers, args.duration, args.connections):
                print(row, flush=True)
    finally:
        router_bench.stop(nginx, signal.SIGQUIT)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
