"""
Every command of C{docs/troubleshooting.md} and C{docs/operations.md}, run as written
against a real C{twistd kthena-router} process (never skipped).

The scenario is the demo's (C{kthena/demo.yaml}: the same models, routes, servers and
simulated pods, the pods moved to 127.0.80.x) with what the alert sections need to find
something: a request limit on C{deepseek-r1}, a Redis-global limit whose Redis is down on
C{sql-lora}, a fairness queue on C{qwen2.5-0.5b}, callers identified by a header, and a
model server C{llama} whose only pod nobody serves (its scrapes and requests fail). The
router listens on 127.0.0.1:8080 and :9090 as the docs say and writes its access log as
C{router.log} (JSON) in its working directory; a second router, on any ports, writes the
text format as C{router.log} in a directory of its own. A little traffic then produces a
success, an error, a 429, a 504 C{queue_timeout}, a failed prefill leg and upstream
failures.

The commands: every line of every fenced C{sh} block (lines ending in a backslash joined,
comments and blank lines left out), in the order of the file, each run with
C{bash -o pipefail -c} in the working directory of the router whose log it reads
(C{sh text-log} blocks: the text one). Each must exit 0 and print something that is not
only C{null} nor an error object. A line that only assigns a variable (C{name=$(...)})
must give it a value, and is run again before the later lines of its block, as a shell
reading the block would. Blocks fenced C{sh no-test} are not run: they need root or
systemd, change the installation, run until stopped, or read a component that is down
(the docs say so). The installed layout's paths of
C{docs/operations.md} (C{/etc/kthena/router.yaml}, C{/var/log/kthena/access.log}) are
the test's own files.

Also checked: every C{kthena_...} name the docs mention is a family or series the router
exposes, every C{/debug/...} path is one C{/debug/} lists, the sections and alert headings
are there (the alert rules link to their anchors), and rotation works as
C{docs/operations.md} says (SIGHUP keeps the file, SIGUSR1 reopens it by its path).

C{curl} and C{jq} must be installed (on Debian: C{apt-get install -y curl jq}); the test
fails, not skips, without them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from kthena.workers.supervisor import WorkerMetrics
from tests.integration.conftest import twistd_env, wait_until
from tests.integration.router_helpers import (
    ADMIN_LISTEN,
    LISTEN,
    LOOPBACK,
    HttpResult,
    RouterProcess,
    http_request,
    spawn_router,
    wait_for_log,
    wait_listening,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
OPERATIONS = ROOT / "docs" / "operations.md"
DEMO = ROOT / "kthena" / "demo.yaml"
ALERT_RULES = ROOT / "monitoring" / "alerts.yml"

PROXY_PORT = 8080
ADMIN_PORT = 9090
PROXY_LISTEN = f"tcp:{PROXY_PORT}:interface={LOOPBACK}"
ADMIN_ENDPOINT = f"tcp:{ADMIN_PORT}:interface={LOOPBACK}"
PODS_NET = "127.0.80."
"""The demo's pods (127.0.0.1x) move here, out of the way of other tests' addresses."""
DEAD_POD = "127.0.80.16"
"""The pod of the model server C{llama}: nothing listens there."""
DEAD_REDIS = "127.0.80.99:6379"
PREFILL_SIM = "127.0.80.14:8000"

BUDGET = 60.0
"""The whole test, router start to stop."""
PORT_WAIT = 20.0
"""How long to wait for 8080 and 9090 to be free (another test may be running the demo)."""
COMMAND_TIMEOUT = 10.0

ALERTS = tuple(
    rule["alert"]
    for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
    for rule in group["rules"]
    if "alert" in rule
)
"""The alerts of monitoring/alerts.yml: each has its section, its runbook."""
SECTIONS = (
    "High Error Rate Investigation",
    "Performance Issues",
    "Rate Limiting Analysis",
    "Request Tracing",
    "Error Analysis",
    "Configuration Verification",
    "Runtime State Inspection",
)
INSTALLED_PATHS = {
    "/etc/kthena/router.yaml": "router.yaml",
    "/var/log/kthena/access.log": "router.log",
}
"""docs/operations.md's installed layout, as the test's working directory holds it."""

FENCE = re.compile(r"^[ \t]*```([^\n`]*)\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=\$\(.*\)$")
METRIC_NAME = re.compile(r"\bkthena_[a-z0-9_]+(?P<next>.?)")
"""A name, or a prefix (C{kthena_router_active_(downstream|upstream)}, C{kthena_...});
followed by C{-} it is the package (C{kthena_router-0.1.0.whl})."""
ADMIN_PATH = re.compile(r"localhost:9090(/[^\s'\"`)]*)")
FLAGS = {"no-test", "text-log"}
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


# -- the docs' commands


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    section: str
    flags: frozenset[str]
    commands: tuple[str, ...]


def sh_blocks(path: Path) -> list[Block]:
    """The fenced C{sh} blocks of a Markdown file, each with its commands and section."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        words = match[1].split()
        if not words or words[0] != "sh":
            continue
        flags = frozenset(words[1:])
        line = text.count("\n", 0, match.start()) + 1
        assert flags <= FLAGS, f"{path.name}:{line}: unknown fence flags {set(flags - FLAGS)}"
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.MULTILINE)
        blocks.append(
            Block(path.name, line, headings[-1] if headings else "", flags, commands(match[2]))
        )
    return blocks


def commands(body: str) -> tuple[str, ...]:
    """The commands of a block: continuation lines joined, comments and blank lines out."""
    found: list[str] = []
    pending = ""
    for raw in body.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            found.append(stripped)
    assert not pending, f"a block ends in a continuation: {body!r}"
    return tuple(found)


def installed(command: str) -> str:
    for path, local in INSTALLED_PATHS.items():
        command = command.replace(path, local)
    return command


@dataclass
class Outcome:
    command: str
    returncode: int
    stdout: str
    stderr: str


def command_env() -> dict[str, str]:
    """The checkout's code first; C{python3} and C{twist} the ones running the tests."""
    env = twistd_env()
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def run(command: str, prelude: list[str], cwd: Path) -> Outcome:
    script = "\n".join([*prelude, installed(command)])
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", script],
        cwd=cwd,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    return Outcome(command, result.returncode, result.stdout, result.stderr)


def problem(outcome: Outcome) -> str | None:
    """Why a command's outcome is not one that worked, or C{None}."""
    if outcome.returncode != 0:
        return f"exit status {outcome.returncode}"
    out = outcome.stdout.strip()
    if not out:
        return "no output"
    if all(line.strip() == "null" for line in out.splitlines()):
        return "only null"
    try:
        value = json.loads(out)
    except ValueError:
        return None
    if isinstance(value, dict) and set(value) == {"error"}:
        return "an error object"
    return None


def run_blocks(blocks: list[Block], workdirs: dict[str, Path], deadline: float) -> list[str]:
    """Run every command; the failures, described."""
    failures: list[str] = []
    for block in blocks:
        cwd = workdirs["text" if "text-log" in block.flags else "json"]
        prelude: list[str] = []
        for command in block.commands:
            if time.monotonic() > deadline:
                return [*failures, "out of time: commands left unrun"]
            assignment = ASSIGNMENT.match(command)
            probe = f'{command}\nprintf %s "${assignment[1]}"' if assignment else command
            outcome = run(probe, prelude, cwd)
            why = problem(outcome)
            if why is not None:
                failures.append(
                    f"{block.doc}:{block.line} ({block.section}): {why}\n  $ {command}\n"
                    f"  stdout: {outcome.stdout[-800:]!r}\n  stderr: {outcome.stderr[-800:]!r}"
                )
            if assignment:
                prelude.append(command)
    return failures


# -- the scenario


def _docs(demo: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in demo["resources"] if d["kind"] == kind}


def scenario_config(log_format: str, *, simulators: bool) -> dict[str, Any]:
    """The demo's config, pods on 127.0.80.x, with what the docs' commands look at."""
    demo = yaml.safe_load(DEMO.read_text())
    for sim in demo["simulators"]:
        sim["listen"] = sim["listen"].replace("127.0.0.", PODS_NET)
    for pod in _docs(demo, "Pod").values():
        pod["status"]["podIP"] = pod["status"]["podIP"].replace("127.0.0.", PODS_NET)
    routes = _docs(demo, "ModelRoute")
    routes["deepseek"]["spec"]["rateLimit"] = {"requestsPerUnit": 3, "unit": "minute"}
    routes["qwen-sql-lora"]["spec"]["rateLimit"] = {
        "inputTokensPerUnit": 100000,
        "unit": "minute",
        "global": {"redis": {"address": DEAD_REDIS}},
    }
    llama = copy.deepcopy(routes["deepseek"])
    llama["metadata"]["name"] = "llama"
    llama["spec"] = {
        "modelName": "llama3-8b",
        "rules": [{"name": "default", "targetModels": [{"modelServerName": "llama"}]}],
    }
    server = copy.deepcopy(_docs(demo, "ModelServer")["qwen-lora"])
    server["metadata"]["name"] = "llama"
    server["spec"]["model"] = "meta-llama/Meta-Llama-3-8B-Instruct"
    server["spec"]["workloadSelector"] = {"matchLabels": {"app": "llama"}}
    pod = copy.deepcopy(_docs(demo, "Pod")["deepseek-0"])
    pod["metadata"] = {"name": "llama-0", "namespace": "default", "labels": {"app": "llama"}}
    pod["status"]["podIP"] = DEAD_POD
    demo["resources"] += [llama, server, pod]
    if not simulators:
        del demo["simulators"]
    return {
        **demo,
        "drainTimeout": "3s",
        "observability": {"accessLog": {"format": log_format, "output": "router.log"}},
        "identity": {"header": {"user": "x-user-id"}},
        "fairness": {
            "models": [{"model": "qwen2.5-0.5b", "maxConcurrency": 1, "timeout": "200ms"}]
        },
    }


def chat(router: RouterProcess, model: str, user: str | None = None, **extra: Any) -> HttpResult:
    body = {"model": model, "messages": [{"role": "user", "content": "hello docs"}], **extra}
    return router.request(
        "POST", "/v1/chat/completions", body, {"x-user-id": user} if user else None
    )


def concurrently(first: Callable[[], HttpResult], second: Callable[[], HttpResult]) -> list[int]:
    """C{first} in a thread, C{second} a moment later: both statuses."""
    statuses: list[int] = []
    thread = threading.Thread(target=lambda: statuses.append(first().status))
    thread.start()
    time.sleep(0.1)
    second_status = second().status
    thread.join(COMMAND_TIMEOUT)
    return [*statuses, second_status]


def traffic(router: RouterProcess, *, prefill_failure: bool) -> None:
    """A success, a 429, 503s from a dead pod, a PD request (and a failed one), a 504."""
    assert chat(router, "qwen2.5-0.5b", "alice", max_tokens=4).status == 200
    assert chat(router, "sql-lora", "bob", max_tokens=4).status == 200  # Redis down: fail open
    statuses = [chat(router, "deepseek-r1", "bob", max_tokens=4).status for _ in range(4)]
    assert 200 in statuses and statuses[-1] == 429, statuses  # 3 per minute
    for _ in range(2):
        assert chat(router, "llama3-8b", "carol", max_tokens=4).status == 503
    assert chat(router, "qwen2.5-0.5b-pd", "alice", max_tokens=4).status == 200
    if prefill_failure:
        host, port = PREFILL_SIM.split(":")
        faults = {"error_rate": 1, "error_status": 503}
        assert http_request(host, int(port), "PUT", "/sim/faults", faults).status == 200
        try:
            assert chat(router, "qwen2.5-0.5b-pd", "alice", max_tokens=4).status == 500
        finally:
            http_request(host, int(port), "DELETE", "/sim/faults")
    # One slot in qwen2.5-0.5b's queue: a whole answer (32 tokens) holds it past the
    # 200 ms another caller may wait.
    statuses = concurrently(
        lambda: chat(router, "qwen2.5-0.5b", "alice"),
        lambda: chat(router, "qwen2.5-0.5b", "carol", max_tokens=4),
    )
    assert sorted(statuses) == [200, 504], statuses


def metric_lines(admin_port: int, prefix: str) -> list[str]:
    body = http_request(LOOPBACK, admin_port, "GET", "/metrics").body.decode()
    return [line for line in body.splitlines() if line.startswith(prefix)]


def scraped_enough(admin_port: int) -> bool:
    """The dead pod failed 3 scrapes in a row and its server is down."""
    failures = metric_lines(admin_port, 'kthena_router_pod_scrape_failures{target="default/llama')
    health = metric_lines(
        admin_port, 'kthena_model_server_health_status{model_server="default/llama"'
    )
    return (
        bool(failures)
        and float(failures[0].split()[-1]) >= 3
        and bool(health)
        and health[0].endswith(" 0.0")
    )


def log_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_ports_free(ports: tuple[int, ...], timeout: float) -> None:
    def free() -> bool:
        for port in ports:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((LOOPBACK, port))
                except OSError:
                    return False
        return True

    wait_until(free, timeout, 0.2, f"127.0.0.1 ports {ports} to be free (the docs use them)")


@contextmanager
def routers(tmp_path: Path) -> Iterator[tuple[RouterProcess, RouterProcess, Path, Path]]:
    """The two routers (JSON on 8080/9090, text on any ports) and their directories."""
    json_dir, text_dir = tmp_path / "json", tmp_path / "text"
    json_dir.mkdir()
    text_dir.mkdir()
    main_config = {
        **scenario_config("json", simulators=True),
        "listen": PROXY_LISTEN,
        "adminListen": ADMIN_ENDPOINT,
    }
    text_config = {
        **scenario_config("text", simulators=False),
        "listen": LISTEN,
        "adminListen": ADMIN_LISTEN,
    }
    started: list[RouterProcess] = []
    try:
        started.append(start_on_fixed_ports(json_dir, main_config))
        write_config(text_dir / "router.yaml", text_config)
        started.append(spawn_router(text_dir, "--config", str(text_dir / "router.yaml")))
        wait_listening(started[1], text_config["listen"])
        yield started[0], started[1], json_dir, text_dir
    finally:
        for router in reversed(started):  # the text router's pods live in the other one
            router.stop()


def start_on_fixed_ports(workdir: Path, config: dict[str, Any]) -> RouterProcess:
    """
    The router on 8080 and 9090. Other tests use them too (the README's demo): wait until
    they are free, and start again when another process took one first.
    """
    path = workdir / "router.yaml"
    write_config(path, config)
    deadline = time.monotonic() + PORT_WAIT
    while True:
        wait_ports_free((PROXY_PORT, ADMIN_PORT), max(1.0, deadline - time.monotonic()))
        router = spawn_router(workdir, "--config", str(path))
        try:
            wait_listening(router, config["listen"])
        except pytest.fail.Exception:
            router.stop()
            if "Address already in use" not in router.log() or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        else:
            return router


# -- the test


def test_docs_commands_work_as_written(tmp_path: Path) -> None:
    missing = [tool for tool in ("bash", "curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"the docs' commands need {', '.join(missing)}: install them "
            "(Debian: apt-get install -y curl jq)"
        )
    deadline = time.monotonic() + BUDGET
    runnable = runnable_blocks()
    with routers(tmp_path) as (main, text, json_dir, text_dir):
        traffic(main, prefill_failure=True)
        traffic(text, prefill_failure=False)
        wait_until(lambda: scraped_enough(ADMIN_PORT), 10, 0.1, "the dead pod's 3 failed scrapes")
        wait_until(lambda: log_lines(json_dir / "router.log") >= 12, 5, what="the JSON log")
        wait_until(lambda: log_lines(text_dir / "router.log") >= 11, 5, what="the text log")
        check_names_and_paths()
        failures = run_blocks(runnable, {"json": json_dir, "text": text_dir}, deadline)
        assert not failures, "\n\n".join(failures)
        check_rotation(text, text_dir)
    assert time.monotonic() < deadline, f"over {BUDGET} s"


def runnable_blocks() -> list[Block]:
    """The sections and the alert headings are there: the blocks to run."""
    headings = re.findall(r"^(#+) (.+)$", TROUBLESHOOTING.read_text(), re.MULTILINE)
    for alert in ALERTS:
        assert ("###", alert) in headings, f"no '### {alert}' in {TROUBLESHOOTING.name}"
    titles = [title for _, title in headings]
    for section in SECTIONS:
        assert section in titles, section
    anchors = [title.lower() for title in titles]
    assert len(anchors) == len(set(anchors)), "two headings with one anchor"
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    for rule in (r for group in groups for r in group["rules"] if "alert" in r):
        url = rule["annotations"]["runbook_url"]  # each rule's runbook is its section here
        assert url == f"docs/troubleshooting.md#{rule['alert'].lower()}", url
    blocks = sh_blocks(TROUBLESHOOTING) + sh_blocks(OPERATIONS)
    runnable = [b for b in blocks if "no-test" not in b.flags]
    for title in (*SECTIONS, *ALERTS):
        assert any(b.section == title and b.commands for b in runnable), f"no command: {title}"
    assert sum(len(b.commands) for b in runnable) >= 60
    return runnable


def check_names_and_paths() -> None:
    """Every C{kthena_...} name and C{:9090} path the docs mention is the router's."""
    docs = TROUBLESHOOTING.read_text() + OPERATIONS.read_text()
    exposed = exposed_names(ADMIN_PORT)
    unknown = {
        m[0].removesuffix(m["next"])
        for m in METRIC_NAME.finditer(docs)
        if not mentions_exposed(m, exposed)
    }
    assert not unknown, f"metric names the router does not expose: {sorted(unknown)}"
    endpoints = http_request(LOOPBACK, ADMIN_PORT, "GET", "/debug/").json()["endpoints"]
    parent = ["/debug/workers"]  # what the parent of --workers adds
    patterns = [endpoint_pattern(e) for e in ["/metrics", "/debug/", *endpoints, *parent]]
    paths = {p.split("?", maxsplit=1)[0] for p in ADMIN_PATH.findall(docs)}
    wrong = [p for p in paths if not any(pattern.fullmatch(p) for pattern in patterns)]
    assert not wrong, f"admin paths the router does not serve: {sorted(wrong)}"


def check_rotation(router: RouterProcess, workdir: Path) -> None:
    """As docs/operations.md says: SIGHUP keeps the renamed file, SIGUSR1 reopens the path."""
    log, rotated = workdir / "router.log", workdir / "router.log.1"
    log.rename(rotated)
    router.signal(signal.SIGHUP)
    wait_for_log(router, "reload (SIGHUP) applied", 5)
    wait_for_line(router, rotated, "/v1/models/after-sighup")
    assert not log.exists()
    router.signal(signal.SIGUSR1)
    wait_until(log.exists, 5, what="the access log reopened by its path")
    wait_for_line(router, log, "/v1/models/after-sigusr1")
    assert "/v1/models/after-sigusr1" not in rotated.read_text()


def wait_for_line(router: RouterProcess, path: Path, probe: str) -> None:
    """Send requests to C{probe} until one of them is logged in C{path}."""

    def logged() -> bool:
        router.request("GET", probe)
        return path.exists() and probe in path.read_text()

    wait_until(logged, 5, 0.1, f"a {probe} line in {path.name}")


def exposed_names(admin_port: int) -> set[str]:
    """Every family (from the TYPE lines) and series name the router exposes, and those
    the parent of C{--workers} adds."""
    body = http_request(LOOPBACK, admin_port, "GET", "/metrics").body.decode()
    parent = CollectorRegistry()
    WorkerMetrics(parent).restarts.labels("0")
    body += generate_latest(parent).decode()
    names: set[str] = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
            names.add(family)
            names.update(family + suffix for suffix in SUFFIXES)
            if family.endswith("_total"):
                names.add(family.removesuffix("_total"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def mentions_exposed(match: re.Match[str], exposed: set[str]) -> bool:
    name, after = match[0].removesuffix(match["next"]), match["next"]
    if after == "-":  # the package: kthena_router-0.1.0-py3-none-any.whl
        return True
    if name.endswith("_") and after in ("(", "."):  # a prefix
        return any(e.startswith(name) for e in exposed)
    return name in exposed


def endpoint_pattern(endpoint: str) -> re.Pattern[str]:
    """C{/debug/model-servers/{name}/status?namespace=NS} -> a pattern of its paths."""
    path = endpoint.split("?", maxsplit=1)[0]
    parts = re.split(r"\{[^}]+\}", path)
    return re.compile("[^/?]+".join(re.escape(part) for part in parts))
