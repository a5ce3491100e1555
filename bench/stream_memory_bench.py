"""
The router's memory with many slow token streams open at once.

Starts C{--pods} kthena-sim processes (C{twistd kthena-sim}, 127.0.90.1, 127.0.90.2, ...
port 17900, a large C{--itl}) and C{twistd kthena-router} (tcp:17990, admin tcp:17991, on
127.0.0.1) with everything on: the default lean HTTP layers, metrics, the JSON access log
to a file, Kthena's default scheduler plugins and pod scraping. It then opens N concurrent
streaming chat completions through the router (sim_streams.py's raw-socket client) and
reads the router's C{VmRSS} and C{VmHWM} and its open fds before the load, once every
stream has its first token (all N open at the router), and after they all end; and checks
that every stream ended with C{[DONE]} and the right token count.

C{--tracemalloc} runs the router under tracemalloc (this script's own twistd wrapper, via
an environment variable) and prints which lines allocated what was alive with all N open
and not before: the figures of that run are inflated by tracemalloc itself.

Bounded: at most 5000 streams, 16 pods, 4096 tokens and a 16 KiB prompt a stream, and an
overall deadline (C{--timeout}); only the loopback processes it started are contacted.

    python3 bench/stream_memory_bench.py                  # 1000 streams, 4 pods, itl 0.5 s
    python3 bench/stream_memory_bench.py --streams 200 --tokens 20 --tracemalloc
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import IO

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from router_bench import router_config
from sim_streams import (
    MAX_STREAMS,
    MAX_TOKENS,
    REPO_ROOT,
    TWISTD,
    StreamResult,
    cpu_seconds,
    http_get,
    run_stream,
)

POD_NET = "127.0.90."
POD_PORT = 17900
ROUTER = "127.0.0.1"
ROUTER_PORT = 17990
ADMIN_PORT = 17991
MAX_PODS = 16
MAX_PROMPT_BYTES = 16 * 1024  # ~3,700 tokens: within the sim's --max-model-len
TRACE_ENV = "KTHENA_BENCH_TRACEMALLOC"
"""Set (to a file) in the router's environment: this script runs twistd under tracemalloc
and, on each SIGUSR2, writes there what grew since the first SIGUSR2."""


def raise_nofile(wanted: int) -> None:
    """Lift this process's soft open-files limit to C{wanted} (its children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise SystemExit(f"need {wanted} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def pod_address(i: int) -> str:
    return f"{POD_NET}{i + 1}"


def bench_config(pods: int, access_log: Path) -> str:
    """router_bench's config (everything on) on this bench's ports and its C{pods} sims."""
    raw = yaml.safe_load(router_config(limits=False, redis=None))
    raw["listen"] = f"tcp:{ROUTER_PORT}:interface={ROUTER}:backlog=4096"
    raw["adminListen"] = f"tcp:{ADMIN_PORT}:interface={ROUTER}"
    raw["observability"]["accessLog"]["output"] = str(access_log)
    route, server, pod = raw["resources"]
    server["spec"]["workloadPort"]["port"] = POD_PORT
    replicas = []
    for i in range(pods):
        replica = json.loads(json.dumps(pod))
        replica["metadata"]["name"] = f"bench-{i}"
        replica["status"]["podIP"] = pod_address(i)
        replicas.append(replica)
    raw["resources"] = [route, server, *replicas]
    return yaml.safe_dump(raw)


def memory(pid: int) -> dict[str, int]:
    """C{VmRSS} and C{VmHWM} (KiB) and open fds of a process, from C{/proc}."""
    figures = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = int(value.split()[0])
    return figures


class Children:
    """
    The sims and the router, logging to files. They inherit this process's open-files
    limit, raised in L{main} for both ends of every stream (a C{preexec_fn} would do the
    same, but is unsafe in a process that may run threads).
    """

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        self.env.pop(TRACE_ENV, None)
        self.processes: list[tuple[subprocess.Popen[bytes], Path, IO[bytes]]] = []

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> int:
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=self.workdir, start_new_session=True,
        )  # fmt: skip
        self.processes.append((process, log_path, log))
        return process.pid

    def start_sims(self) -> list[str]:
        a = self.args
        commands = []
        for i in range(a.pods):
            command = [
                TWISTD, "-n", "--pidfile=", "kthena-sim", "--engine", a.engine,
                "--model", "bench-model",
                "--listen", f"tcp:{POD_PORT}:interface={pod_address(i)}:backlog=4096",
                "--max-num-seqs", str(a.streams),  # however the scheduler spreads them
                "--kv-blocks", str(a.streams * ((a.tokens + a.prompt_bytes // 4) // 16 + 8) + 1024),
                "--prefill-per-token", "0",  # all streams open at once, whatever the prompt
                "--itl", str(a.itl), "--output-tokens", str(a.tokens),
            ]  # fmt: skip
            self.spawn(f"sim-{i}", command, self.env)
            commands.append(shlex.join(command))
        return commands

    def start_router(self, config: Path, trace: Path | None) -> tuple[int, str]:
        command = [TWISTD, "-n", "--pidfile=", "kthena-router", "--config", str(config)]
        env = self.env
        if trace is not None:  # this script, as twistd under tracemalloc
            command = [sys.executable, str(Path(__file__).resolve()), *command[1:]]
            env = dict(env, **{TRACE_ENV: str(trace)})
        return self.spawn("router", command, env), shlex.join(command)

    def log_tail(self, lines: int = 30) -> str:
        tails = []
        for _, path, _ in self.processes:
            tail = path.read_bytes().decode(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(tails)

    def stop(self) -> None:
        for process, _, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _, log in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


async def wait_healthy(host: str, port: int, path: str, children: Children) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if (await http_get(host, port, path, 2))[0] == 200:
                return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{host}:{port}{path} never answered 200:\n{children.log_tail()}")


async def trace_point(pid: int, trace: Path) -> None:
    """Ask the tracemalloc router for a snapshot and wait until it has written it."""
    before = trace.stat().st_mtime_ns if trace.exists() else 0
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 120
    while (not trace.exists() or trace.stat().st_mtime_ns == before) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)  # let the write finish


def chat(i: int, tokens: int, prompt_bytes: int) -> bytes:
    """
    A streaming request with a prompt of its own, about C{prompt_bytes} long (one shared
    prefix would pile every stream on one pod).
    """
    words = "tell me about the sim "
    content = f"stream {i}: " + words * max(1, prompt_bytes // len(words))
    message = {"role": "user", "content": content}
    request = {"model": "bench", "messages": [message], "stream": True, "max_tokens": tokens}
    return json.dumps(request).encode()


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    children = Children(args, workdir)
    trace = workdir / "tracemalloc.txt" if args.tracemalloc else None
    points: dict[str, dict[str, float]] = {}
    try:
        sim_commands = children.start_sims()
        config = workdir / "router.yaml"
        config.write_text(bench_config(args.pods, workdir / "access.log"))
        pid, router_command = children.start_router(config, trace)
        for i in range(args.pods):
            await wait_healthy(pod_address(i), POD_PORT, "/health", children)
        await wait_healthy(ROUTER, ROUTER_PORT, "/readyz", children)
        await asyncio.sleep(args.settle)  # a few pod scrapes; imports done

        def point(name: str, **extra: float) -> None:
            points[name] = {**memory(pid), "cpu_s": cpu_seconds(pid), **extra}

        point("before load")
        if trace is not None:
            await trace_point(pid, trace)
        results = [StreamResult(0.0) for _ in range(args.streams)]
        started = time.perf_counter()
        tasks = [
            asyncio.ensure_future(
                run_stream(ROUTER, ROUTER_PORT, chat(i, args.tokens, args.prompt_bytes), r)
            )
            for i, r in enumerate(results)
        ]
        deadline = started + args.timeout
        peak = most_open = 0
        while not all(t.done() for t in tasks) and time.perf_counter() < deadline:
            peak = max(peak, memory(pid)["VmRSS"])
            open_now = sum(1 for r in results if r.token_times and not r.done)
            most_open = max(most_open, open_now)
            if "all open" not in points and open_now == args.streams:
                point("all open", t_s=time.perf_counter() - started)
                if trace is not None:
                    await trace_point(pid, trace)
            await asyncio.sleep(0.25)
        for task in tasks:
            task.cancel()
        wall = time.perf_counter() - started
        point("all ended", t_s=wall)
        await asyncio.sleep(args.settle + 5)  # past the pool's idle timeout (4 s)
        point("idle after", t_s=time.perf_counter() - started)
        points["sampled peak"] = {"VmRSS": peak}
    finally:
        children.stop()
    errors = collections.Counter(r.error for r in results if r.error is not None)
    for r in results:
        if not r.done and r.error is None:
            errors[f"unfinished after {args.timeout} s"] += 1
    completed = [r for r in results if r.done and r.error is None]
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "router_command": router_command,
        "sim_command": sim_commands[0],
        "streams": args.streams,
        "pods": args.pods,
        "tokens": args.tokens,
        "itl": args.itl,
        "prompt_bytes": args.prompt_bytes,
        "tracemalloc": args.tracemalloc,
        "errors": dict(errors),
        "completed": len(completed),
        "wrong_token_count": sum(1 for r in completed if len(r.token_times) != args.tokens),
        "wall_s": wall,
        "most_open": most_open,
        "points": points,
        "trace": trace.read_text() if trace is not None and trace.exists() else None,
    }


def report(r: dict[str, object], limit_mib: float) -> str:
    points = r["points"]
    assert isinstance(points, dict)
    before = points["before load"]["VmRSS"]
    lines = [
        f"command: {r['command']}",
        f"router: {r['router_command']}",
        f"sim (1 of {r['pods']}): {r['sim_command']}",
        f"{r['streams']} streams x {r['tokens']} tokens at --itl {r['itl']} s over {r['pods']}"
        f" pods, prompts of ~{r['prompt_bytes']} bytes, {r['wall_s']:.1f} s"
        + (" (under tracemalloc)" if r["tracemalloc"] else ""),
        f"completed with [DONE] and {r['tokens']} tokens: {r['completed']}"
        f" (wrong token count: {r['wrong_token_count']}); errors: {r['errors'] or 0}",
        f"most streams open at once (first token seen, no [DONE] yet): {r['most_open']}",
        "",
        f"{'router':<14}{'at s':>7}{'VmRSS MiB':>11}{'VmHWM MiB':>11}{'+RSS MiB':>10}"
        f"{'fds':>7}{'CPU s':>8}",
    ]
    for name, p in points.items():
        at = f"{p['t_s']:.1f}" if "t_s" in p else "-"
        hwm = f"{p['VmHWM'] / 1024:.1f}" if "VmHWM" in p else "-"
        fds = f"{p['fds']:.0f}" if "fds" in p else "-"
        cpu = f"{p['cpu_s']:.1f}" if "cpu_s" in p else "-"
        lines.append(
            f"{name:<14}{at:>7}{p['VmRSS'] / 1024:>11.1f}{hwm:>11}"
            f"{(p['VmRSS'] - before) / 1024:>10.1f}{fds:>7}{cpu:>8}"
        )
    if "all open" in points:
        per_stream = (points["all open"]["VmRSS"] - before) / int(str(r["streams"]))
        lines.append(f"per open stream: {per_stream:.1f} KiB of RSS")
    hwm = max(p.get("VmHWM", 0) for p in points.values()) / 1024
    verdict = "within" if hwm <= limit_mib else "OVER"
    lines.append(f"peak (VmHWM) {hwm:.1f} MiB: {verdict} the {limit_mib:g} MiB limit")
    if r["trace"]:
        lines += ["", "tracemalloc, grown between 'before load' and 'all open':", str(r["trace"])]
    return "\n".join(lines)


def traced_twistd(trace: Path) -> None:
    """The router under tracemalloc: SIGUSR2 marks a baseline, then writes what grew."""
    from twisted.scripts.twistd import run

    tracemalloc.start()  # one frame: the report groups by line
    baseline: list[tracemalloc.Snapshot] = []

    def on_signal(signum: int, frame: object) -> None:
        snapshot = tracemalloc.take_snapshot()
        if not baseline:
            baseline.append(snapshot)
            trace.write_text("baseline\n")
            return
        stats = snapshot.compare_to(baseline[0], "lineno")
        root = str(REPO_ROOT) + "/"
        lines = [str(s).replace(root, "") for s in stats[:40]]
        total = sum(s.size_diff for s in stats)
        trace.write_text("\n".join([*lines, f"total grown: {total / 1024:.0f} KiB"]))

    signal.signal(signal.SIGUSR2, on_signal)
    sys.argv = [TWISTD, *sys.argv[1:]]
    run()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams (1000)")
    parser.add_argument("--pods", type=int, default=4, help="sim processes (4)")
    parser.add_argument("--itl", type=float, default=0.5, help="sim --itl seconds (0.5)")
    parser.add_argument("--tokens", type=int, default=60, help="tokens per stream (60)")
    parser.add_argument("--prompt-bytes", type=int, default=100, help="prompt size (100)")
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before load")
    parser.add_argument("--limit-mib", type=float, default=100.0, help="RSS limit to check")
    parser.add_argument("--tracemalloc", action="store_true", help="where router memory goes")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of the load (s)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.streams <= MAX_STREAMS:
        parser.error(f"--streams must be 1..{MAX_STREAMS}")
    if not 1 <= args.pods <= MAX_PODS:
        parser.error(f"--pods must be 1..{MAX_PODS}")
    if not 1 <= args.tokens <= MAX_TOKENS:
        parser.error(f"--tokens must be 1..{MAX_TOKENS}")
    if not 0 < args.timeout <= 600 or not 0 <= args.settle <= 60:
        parser.error("--timeout must be in (0, 600] seconds, --settle in [0, 60]")
    if args.itl < 0:
        parser.error("--itl must be >= 0")
    if not 0 <= args.prompt_bytes <= MAX_PROMPT_BYTES:
        parser.error(f"--prompt-bytes must be 0..{MAX_PROMPT_BYTES}")
    return args


def main(argv: list[str] | None = None) -> int:
    if trace := os.environ.get(TRACE_ENV):
        traced_twistd(Path(trace))
        return 0
    args = parse_args(argv)
    raise_nofile(2 * args.streams + 1024)  # the router holds both ends of every stream
    with tempfile.TemporaryDirectory(prefix="kthena-stream-memory-") as workdir:
        figures = asyncio.run(bench(args, Path(workdir)))
    print(json.dumps(figures, indent=2) if args.json else report(figures, args.limit_mib))
    failed = figures["errors"] or figures["wrong_token_count"]
    return 1 if failed or figures["completed"] != args.streams else 0


if __name__ == "__main__":
    sys.exit(main())
