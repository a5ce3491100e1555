"""
C{twistd kthena-router} / C{twist kthena-router}: run one router from a config file, or
the demo (the router with simulated pods in the same process).
"""

from __future__ import annotations

from importlib import resources

from twisted.application.service import IService
from twisted.python import usage

from kthena.config.validate import ConfigError


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
    try:
        config = load(path)
        router = makeRouterService(  # may open files the config names (the access log)
            config,
            reactor,  # type: ignore[arg-type]
            config_path=path,
            install_signal_handlers=True,
        )
    except ConfigError as e:
        raise SystemExit(f"kthena-router: invalid config: {e}") from e
    FrozenHeap().setServiceParent(router)
    return router
