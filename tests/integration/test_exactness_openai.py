"""
Exactness through the official openai client: after a known mix of requests (chat and
completions, streamed and not, with and without usage asked for, and error paths), the
router's counters, histogram counts, token counters and access-log records add up to
exactly what was sent and what the pods reported.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.threads import deferToThread

from kthena.service import RouterService
from tests.integration.router_helpers import LOOPBACK, Cluster, inline, sim_sample
from tests.unit.routerfixtures import server, simple_route


def totals(router: RouterService, name: str, label: str | None = None) -> Counter[str]:
    text = generate_latest(router.registry).decode()
    found: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels[label] if label else ""] += int(sample.value)
    return found


@inline
async def test_counters_tokens_and_log_records_are_exact(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim("org/m", output_tokens=5)
    slow = cluster.sim("org/slow", prefill_per_token=0.05)
    log_path = tmp_path / "access.log"
    router = cluster.router(
        [
            simple_route("m", "m", "srv"),
            simple_route("slow", "slow", "slow"),
            server("srv", {"app": "srv"}, model="org/m"),
            server("slow", {"app": "slow"}, model="org/slow", trafficPolicy={"timeout": "200ms"}),
            cluster.pod("pod-0", sim, {"app": "srv"}),
            cluster.pod("slow-0", slow, {"app": "slow"}),
        ],
        maxBodyBytes=4000,
        observability={"accessLog": {"format": "json", "output": str(log_path)}},
    )
    client = openai.OpenAI(
        base_url=f"http://{LOOPBACK}:{router.proxy.bound_port}/v1", api_key="-", max_retries=0
    )
    messages: Any = [{"role": "user", "content": "alpha beta gamma delta"}]
    seen_usage: list[tuple[int, int]] = []

    def traffic() -> dict[str, int]:
        errors: Counter[str] = Counter()
        for _ in range(4):
            reply = client.chat.completions.create(model="m", messages=messages, max_tokens=3)
            assert reply.usage is not None
            seen_usage.append((reply.usage.prompt_tokens, reply.usage.completion_tokens))
        for _ in range(3):
            text = client.completions.create(model="m", prompt="one two three", max_tokens=2)
            assert text.usage is not None
            seen_usage.append((text.usage.prompt_tokens, text.usage.completion_tokens))
        for _ in range(3):
            usage = None
            for chunk in client.chat.completions.create(
                model="m", messages=messages, stream=True, stream_options={"include_usage": True}
            ):
                usage = chunk.usage or usage
            assert usage is not None
            seen_usage.append((usage.prompt_tokens, usage.completion_tokens))
        for _ in range(2):  # no usage asked: the router asks, the client sees none
            chunks = list(client.chat.completions.create(model="m", messages=messages, stream=True))
            assert all(c.usage is None for c in chunks)
        for model, kind in (("nobody", openai.NotFoundError), ("slow", openai.APIStatusError)):
            with pytest.raises(kind):
                client.chat.completions.create(model=model, messages=messages)
            errors[model] += 1
        with pytest.raises(openai.APIStatusError) as too_large:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x" * 5000}]
            )
        assert too_large.value.status_code == 413
        return dict(errors)

    await deferToThread(traffic)
    await cluster.wait_for(lambda: not router.plane.inflight, 5, "calls to end")
    sent = 4 + 3 + 3 + 2 + 3
    ok = 12
    assert sum(totals(router, "kthena_router_requests_total").values()) == sent
    assert totals(router, "kthena_router_requests_total", "error_type") == {
        "successful_request": ok,
        "route_not_found": 1,
        "timeout": 1,
        "request_too_large": 1,
    }
    assert sum(totals(router, "kthena_router_request_duration_seconds_count").values()) == sent
    tokens = totals(router, "kthena_router_tokens_total", "token_type")
    assert tokens["input"] == sim_sample(sim, "vllm:prompt_tokens_total")
    assert tokens["output"] == sim_sample(sim, "vllm:generation_tokens_total")
    assert tokens["input"] >= sum(p for p, _ in seen_usage)  # + the streams without usage
    assert sum(totals(router, "kthena_router_active_downstream_requests").values()) == 0
    assert sum(totals(router, "kthena_router_active_upstream_requests").values()) == 0

    assert router.access_log is not None
    stopped = router.access_log.stopService()
    if stopped is not None:
        await stopped
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(records) == sent
    assert Counter(r["status_code"] for r in records) == {200: ok, 404: 1, 504: 1, 413: 1}
    successes = [r for r in records if r["status_code"] == 200]
    assert sum(r["input_tokens"] for r in successes) == tokens["input"]
    assert sum(r["output_tokens"] for r in successes) == tokens["output"]
    for record in records:
        phases = (
            record["duration_request_processing"]
            + record["duration_upstream_processing"]
            + record["duration_response_processing"]
        )
        assert record["duration_total"] == phases
    assert {r["selected_pod"] for r in successes} == {"pod-0"}
    timeout = next(r for r in records if r["status_code"] == 504)
    assert timeout["error"]["type"] == "timeout"
