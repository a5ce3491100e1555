"""
Input-token counts from a model's own tokenizer (a local C{tokenizer.json}, through the
C{tokenizers} package), for the rate limits of the models that name one.

Both loading a tokenizer (tens of milliseconds to seconds) and encoding a prompt (about a
microsecond a character: a long prompt would stall every request for milliseconds) run
in the reactor's thread pool; encoding goes through C{encode_batch}, which releases the
GIL while it works (C{encode} does not). Until a model's tokenizer is loaded, or when its
file cannot be read, its estimate is Kthena's (ChatML characters / 4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kthena import prompt
from kthena.config.router import RouterConfig
from kthena.interfaces import IReconfigurable, ITokenEstimator

log = Logger()

InThread = Callable[..., Deferred[Any]]
"""Runs a function in a thread: C{(f, *args) -> Deferred} (L{deferToThread})."""


@implementer(IReconfigurable)
class Tokenizers(Service):
    """
    Each configured model's tokenizer, loaded off the reactor thread at start and on
    reloads that change the files.

    @ivar loaded: model name -> tokenizer (a C{tokenizers.Tokenizer}).
    """

    name = "tokenizers"

    def __init__(
        self, config: RouterConfig, in_thread: InThread, fallback: ITokenEstimator
    ) -> None:
        self.in_thread = in_thread
        self.fallback = fallback
        self.files: dict[str, str] = dict(config.tokenizers)
        self.loaded: dict[str, Any] = {}
        self._loading: dict[str, Deferred[None]] = {}

    def startService(self) -> None:
        super().startService()
        for model, path in self.files.items():
            self._load(model, path)

    def stopService(self) -> None:
        super().stopService()
        for d in list(self._loading.values()):
            d.cancel()

    def reconfigure(self, config: RouterConfig) -> None:
        files = dict(config.tokenizers)
        for model in set(self.loaded) - set(files):
            del self.loaded[model]
        changed = {m: p for m, p in files.items() if self.files.get(m) != p or m not in self.loaded}
        self.files = files
        if self.running:
            for model, path in changed.items():
                self._load(model, path)

    def _load(self, model: str, path: str) -> None:
        from tokenizers import Tokenizer

        previous = self._loading.pop(model, None)
        if previous is not None:
            previous.cancel()
        d: Deferred[Any] = self.in_thread(Tokenizer.from_file, path)
        self._loading[model] = d

        def finished(result: object) -> None:
            if self._loading.get(model) is d:
                del self._loading[model]
            if isinstance(result, Failure):
                if not result.check(CancelledError):
                    log.error(
                        "tokenizer for {model} cannot be loaded from {path} ({error}): its "
                        "input tokens are estimated as characters / 4",
                        model=model,
                        path=path,
                        error=result.getErrorMessage(),
                    )
            elif self.files.get(model) == path:
                self.loaded[model] = result
                log.info("tokenizer for {model} loaded from {path}", model=model, path=path)

        d.addBoth(finished)

    def count(self, model: str | None, body: dict[str, Any]) -> Deferred[int] | int:
        """
        The request's input tokens: its model's tokenizer on the rendered prompt (in a
        thread: a Deferred), else the fallback estimate at once.
        """
        tokenizer = self.loaded.get(model) if model is not None else None
        if tokenizer is None:
            return self.fallback.estimate(body)
        text = prompt.render(body)
        d: Deferred[int] = self.in_thread(_encoded_length, tokenizer, text)
        return d


def _encoded_length(tokenizer: Any, text: str) -> int:
    (encoding,) = tokenizer.encode_batch([text], add_special_tokens=False)
    return len(encoding.ids)
