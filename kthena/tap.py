"""
C{twistd kthena-router} / C{twist kthena-router}: run one router from a config file, or
the demo (the router with simulated pods in the same process).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata, resources
from typing import NoReturn

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from kthena.config.validate import ConfigError
from kthena.systemd import Systemd

log = Logger()

MAX_WORKERS = 64


def workers_count(value: str) -> int:
    """C{--workers}: a number, or C{auto} (the CPUs this process may run on)."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    return int(value)


def version() -> str:
    """The installed package's version (one place: setup.cfg)."""
    return metadata.version("kthena-router")


def demo_config_path() -> str:
    """The packaged demo config: two vLLM pods, one SGLang pod, a LoRA adapter."""
    return str(resources.files("kthena") / "demo.yaml")


class Options(usage.Options):
    synopsis = "(--config FILE | --demo)"
    longdesc = (
        "Run kthena-router: an OpenAI-compatible router in front of vLLM / SGLang pods. "
        "--demo runs it with simulated pods in the same process."
    )
    optParameters = [
        ["config", "c", None, "Router config file (YAML)."],
        [
            "workers",
            "w",
            0,
            "Run N router processes sharing the listen socket under this one (0: one "
            "process, no parent; auto: one per CPU this process may run on).",
            workers_count,
        ],
    ]
    optFlags = [
        ["demo", None, "Run the demo: the router plus simulated pods, no config needed."],
    ]

    def opt_version(self) -> NoReturn:
        """Print kthena-router's version and exit."""
        print(f"kthena-router {version()}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self["demo"] and self["config"]:
            raise usage.UsageError("give --config FILE or --demo, not both")
        if self["demo"]:
            self["config"] = demo_config_path()
        if not self["config"]:
            raise usage.UsageError("give --config FILE (or --demo)")
        if not 0 <= self["workers"] <= MAX_WORKERS:
            raise usage.UsageError(f"--workers takes 0 to {MAX_WORKERS}")


def makeService(options: Options) -> IService:
    """One router; or, with C{--workers N}, the parent of N; or, started by such a parent
    (C{$KTHENA_WORKER}), one of its workers."""
    from twisted.internet import reactor

    from kthena.heap import FrozenHeap
    from kthena.service import load, makeRouterService
    from kthena.workers.sockets import InheritedEndpoint, NotShareableError, shareable
    from kthena.workers.spec import WorkerSpec, worker_config

    path = options["config"]
    spec = WorkerSpec.from_environment()
    if spec is None:
        log.info("kthena-router {version}, config {path}", version=version(), path=path)
    try:
        config = load(path)
        if options["workers"] and spec is None:
            from kthena.workers.service import WorkersService

            if config.gateway_api.enabled:
                raise SystemExit(
                    "kthena-router: the gatewayAPI section's ports are not shared by "
                    "--workers (each worker would open them): run one process"
                )

            shareable(config.listen)
            return WorkersService(
                config,
                path,
                options["workers"],
                reactor,  # type: ignore[arg-type]
                Systemd.from_environment(),
            )
        loader = load
        endpoint = None
        if spec is not None:
            loader = lambda path: worker_config(load(path), spec)  # noqa: E731
            config = worker_config(config, spec)
            endpoint = InheritedEndpoint(reactor, spec.fd, spec.family)  # type: ignore[arg-type]
        router = makeRouterService(  # may open files the config names (the access log)
            config,
            reactor,  # type: ignore[arg-type]
            config_path=path,
            install_signal_handlers=True,
            systemd=Systemd.from_environment(),
            listen_endpoint=endpoint,
            loader=loader,
        )
    except ConfigError as e:
        raise SystemExit(f"kthena-router: invalid config: {e}") from e
    except NotShareableError as e:
        raise SystemExit(f"kthena-router: {e}") from e
    FrozenHeap().setServiceParent(router)
    if spec is not None:
        from kthena.workers.orphan import OrphanWatch

        OrphanWatch(reactor).setServiceParent(router)
    return router
