"""
Rate limits seen through the official openai client against simulated pods: every 429
the client saw is one count in C{kthena_router_rate_limit_exceeded_total}, one
C{requests_total{status_code="429"}} and one access-log line with a rate-limit error, and
the client is told when to retry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
from twisted.internet.threads import deferToThread

from tests.integration.router_helpers import LOOPBACK, Cluster, inline
from tests.integration.test_exactness_openai import totals
from tests.unit.routerfixtures import server, simple_route


@inline
async def test_every_429_is_counted_and_logged_once(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim("org/m", output_tokens=4)
    log_path = tmp_path / "access.log"
    router = cluster.router(
        [
            simple_route(
                "m", "m", "srv",
                rateLimit={"requestsPerUnit": 5, "outputTokensPerUnit": 12, "unit": "hour"},
            ),
            server("srv", {"app": "srv"}, model="org/m"),
            cluster.pod("pod-0", sim, {"app": "srv"}),
        ],
        observability={"accessLog": {"format": "json", "output": str(log_path)}},
    )  # fmt: skip
    client = openai.OpenAI(
        base_url=f"http://{LOOPBACK}:{router.proxy.bound_port}/v1", api_key="-", max_retries=0
    )
    messages: Any = [{"role": "user", "content": "alpha beta"}]

    def traffic() -> tuple[int, list[str], list[str]]:
        passed, retry_after, codes = 0, [], []
        for _ in range(8):
            try:
                client.chat.completions.create(model="m", messages=messages, max_tokens=4)
                passed += 1
            except openai.RateLimitError as e:
                retry_after.append(e.response.headers.get("retry-after", ""))
                codes.append(e.code or "")
        return passed, retry_after, codes

    passed, retry_after, codes = await deferToThread(traffic)
    # 4 output tokens each: the fourth request finds the output bucket at 0.
    assert passed == 3
    assert codes == ["rate_limit_exceeded"] * 5
    assert all(value is not None and int(value) > 0 for value in retry_after)
    await cluster.wait_for(lambda: not router.plane.inflight, 5, "calls to end")
    assert totals(router, "kthena_router_rate_limit_exceeded_total", "limit_type") == {
        "output_tokens": 5
    }
    assert totals(router, "kthena_router_requests_total", "status_code") == {"200": 3, "429": 5}
    assert router.access_log is not None
    stopped = router.access_log.stopService()
    if stopped is not None:
        await stopped
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    refused = [r for r in records if r["status_code"] == 429]
    assert len(refused) == 5
    assert {r["error"]["type"] for r in refused} == {"rate_limit"}
    assert all("output-token limit of route default/m" in r["error"]["message"] for r in refused)
