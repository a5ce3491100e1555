"""Reading engines' /metrics: the lean exposition reader, the dialects, pod state."""

from __future__ import annotations

import math

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from kthena.engines.dialects import MIB, SGLangDialect, VLLMDialect
from kthena.engines.exposition import samples, totals
from kthena.engines.state import PodState
from kthena.interfaces import IEngineDialect
from kthena.sim import metrics as sim_metrics
from kthena.sim.engine import EngineConfig, SimEngine

# vLLM V1 as it serves /metrics (abridged; two data-parallel engines).
VLLM_V1 = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 4.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 1000.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 250.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 2.0
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 100.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 3.0
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_count{engine="0",model_name="m"} 999.0
vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"} 999.0
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",waiting_lora_adapters="x"} 2e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.6e9
"""

# vLLM V0 names only.
VLLM_V0 = """\
vllm:num_requests_running{model_name="m"} 1
vllm:num_requests_waiting{model_name="m"} 0
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
vllm:time_per_output_token_seconds_count{model_name="m"} 4
vllm:time_per_output_token_seconds_sum{model_name="m"} 0.2
vllm:gpu_prefix_cache_queries_total{model_name="m"} 10
vllm:gpu_prefix_cache_hits_total{model_name="m"} 5
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-1",modelName="H100"} 87
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-2",modelName="H100"} 13
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-1"} 1024
"""

SGLANG = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen",tp_rank="0"} 7.0
sglang:num_queue_reqs{model_name="qwen",tp_rank="0"} 2.0
sglang:token_usage{model_name="qwen",tp_rank="0"} 0.4
sglang:cache_hit_rate{model_name="qwen",tp_rank="0"} 0.75
sglang:time_to_first_token_seconds_sum{model_name="qwen"} 1.5
sglang:time_to_first_token_seconds_count{model_name="qwen"} 3.0
sglang:inter_token_latency_seconds_sum{model_name="qwen"} 0.5
sglang:inter_token_latency_seconds_count{model_name="qwen"} 50.0
"""


def test_reader_handles_escapes_exemplars_and_special_values() -> None:
    text = (
        'a{x="q\\"uote, {brace}",y="line\\nbreak"} 1.5\n'
        "b 2 1700000000\n"
        'c_total{k="v"} 3.0 # {trace_id="abc"} 1.0\n'
        "d +Inf\n"
        "# a comment\n"
    )
    got = list(samples(text, {"a", "b", "c_total", "d"}))
    assert got[0].labels == {"x": 'q"uote, {brace}', "y": "line\nbreak"}
    assert [s.value for s in got[:3]] == [1.5, 2.0, 3.0]
    assert math.isinf(got[3].value)
    assert totals(text, {"a", "zzz"}) == {"a": 1.5}


def test_reader_rejects_malformed_wanted_lines() -> None:
    with pytest.raises(ValueError):
        list(samples('a{x="1" 3\n', {"a"}))
    with pytest.raises(ValueError):
        list(samples("a notanumber\n", {"a"}))
    assert list(samples("garbage line\n", {"a"})) == []  # unwanted lines are not read


def test_dialects_provide_the_interface() -> None:
    assert verifyObject(IEngineDialect, VLLMDialect())
    assert verifyObject(IEngineDialect, SGLangDialect())


def test_vllm_v1() -> None:
    snap = VLLMDialect().parse(VLLM_V1)
    assert (snap.running, snap.waiting, snap.kv_usage) == (5.0, 5.0, 0.25)
    assert (snap.ttft_sum, snap.ttft_count) == (2.0, 10.0)
    assert (snap.tpot_sum, snap.tpot_count) == (3.0, 100.0)  # current name preferred
    assert (snap.prefix_hits, snap.prefix_queries) == (250.0, 1000.0)
    assert snap.running_loras == ("sql", "chat")  # the newest series
    assert snap.waiting_loras == ("x",)


def test_vllm_v0_names_and_dcgm() -> None:
    snap = VLLMDialect().parse(VLLM_V0)
    assert snap.kv_usage == 0.5
    assert (snap.tpot_sum, snap.tpot_count) == (0.2, 4.0)
    assert (snap.prefix_hits, snap.prefix_queries) == (5.0, 10.0)
    assert snap.gpu_utilization == {"0": 87.0, "1": 13.0}
    assert snap.gpu_memory_used == {"0": 1024 * MIB}


def test_sglang() -> None:
    snap = SGLangDialect().parse(SGLANG)
    assert (snap.running, snap.waiting, snap.kv_usage) == (7.0, 2.0, 0.4)
    assert snap.prefix_hit_rate == 0.75
    assert (snap.ttft_sum, snap.ttft_count, snap.tpot_count) == (1.5, 3.0, 50.0)


@pytest.mark.parametrize("dialect_name", ["vllm", "sglang"])
def test_reads_the_simulators_exposition(dialect_name: str) -> None:
    clock = Clock()
    engine = SimEngine(clock, EngineConfig(max_num_seqs=1, itl=0.5))
    dialect = sim_metrics.DIALECTS[dialect_name]
    registry = sim_metrics.build_registry(engine, dialect, "m", gpus=2)

    class Sink:
        def token(self, seq: object, index: int) -> None:
            pass

        def finished(self, seq: object) -> None:
            pass

    for _ in range(3):
        engine.submit(list(range(40)), 4, Sink())
    reader = VLLMDialect() if dialect_name == "vllm" else SGLangDialect()
    # The scraper asks for the text format, which keeps the engines' colon names.
    snap = reader.parse(sim_metrics.render(registry).decode())
    assert (snap.running, snap.waiting) == (1.0, 2.0)
    assert snap.kv_usage is not None and snap.kv_usage > 0
    assert set(snap.gpu_utilization) == {"0", "1"}


def test_period_means_and_restarts() -> None:
    state = PodState()
    reader = VLLMDialect()

    def scrape(ttft_sum: float, ttft_count: float, now: float) -> None:
        state.update(
            reader.parse(
                f'vllm:time_to_first_token_seconds_sum{{m="x"}} {ttft_sum}\n'
                f'vllm:time_to_first_token_seconds_count{{m="x"}} {ttft_count}\n'
            ),
            now,
        )

    scrape(10.0, 10.0, 1.0)
    assert state.ttft == 0.0  # one scrape: no period yet
    scrape(13.0, 12.0, 2.0)
    assert state.ttft == pytest.approx(1.5)  # (13-10)/(12-10)
    scrape(13.0, 12.0, 3.0)
    assert state.ttft == pytest.approx(1.5)  # nothing new: keep the last figure
    scrape(0.4, 2.0, 4.0)  # the engine restarted: counters went down
    assert state.ttft == pytest.approx(0.2)
    assert state.scrapes == 4 and state.scraped_at == 4.0


def test_prefix_hit_rate_over_the_period() -> None:
    state = PodState()
    reader = VLLMDialect()
    for hits, queries in ((0, 0), (30, 100), (30, 100), (130, 200)):
        state.update(
            reader.parse(
                f"vllm:prefix_cache_hits_total {hits}\nvllm:prefix_cache_queries_total {queries}\n"
            ),
            0.0,
        )
    assert state.prefix_hit_rate == pytest.approx(1.0)  # (130-30)/(200-100)
    assert state.prefix_period == (100, 100)  # the period's counts, for its PD group


def test_health_by_failures_and_staleness() -> None:
    state = PodState()
    assert not state.healthy(0.0, 3, 5.0)  # never scraped
    state.update(VLLMDialect().parse(VLLM_V0), 10.0)
    assert state.healthy(10.0, 3, 5.0)
    state.failed("timeout")
    state.failed("timeout")
    assert state.healthy(11.0, 3, 5.0)
    state.failed("connection refused")
    assert not state.healthy(11.0, 3, 5.0)
    assert state.last_error == "connection refused"
    state.update(VLLMDialect().parse(VLLM_V0), 12.0)
    assert state.healthy(12.0, 3, 5.0)
    assert not state.healthy(17.5, 3, 5.0)  # stale
