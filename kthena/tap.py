"""
C{twistd kthena-router} / C{twist kthena-router}: run one router from a config file, or
the demo (the router with simulated pods in the same process).
"""

from __future__ import annotations

import sys
from importlib import metadata, resources
from typing import NoReturn

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from kthena.config.validate import ConfigError
from kthena.systemd import Systemd

log = Logger()


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


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from kthena.heap import FrozenHeap
    from kthena.service import load, makeRouterService

    path = options["config"]
    log.info("kthena-router {version}, config {path}", version=version(), path=path)
    try:
        config = load(path)
        router = makeRouterService(  # may open files the config names (the access log)
            config,
            reactor,  # type: ignore[arg-type]
            config_path=path,
            install_signal_handlers=True,
            systemd=Systemd.from_environment(),
        )
    except ConfigError as e:
        raise SystemExit(f"kthena-router: invalid config: {e}") from e
    FrozenHeap().setServiceParent(router)
    return router
