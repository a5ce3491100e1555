"""
The proxy listener's resource: every request handed to the pipeline as an L{IExchange}
(L{kthena.proxy.exchange.WebExchange}); the pipeline answers it, now or later.
"""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from kthena.pipeline.pipeline import Pipeline
from kthena.proxy.exchange import WebExchange


class ProxyResource(Resource):
    isLeaf = True

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    def render(self, request: Request) -> int:
        self.pipeline.handle(WebExchange(request))
        return NOT_DONE_YET
