"""
The simulator's metrics exposition (L{kthena.sim.metrics}): vLLM's and SGLang's names,
types, labels and buckets, and values driven by an engine on a L{Clock}.
"""

from __future__ import annotations

import math

import prometheus_client
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from kthena.sim import metrics
from kthena.sim.engine import EngineConfig, SimEngine, SimSequence
from tests.unit.simfixtures import MODEL, RecordingListener, SimHarness, parse_metrics

VLLM_GAUGES = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:lora_requests_info",
    "vllm:cache_config_info",
}
VLLM_HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": metrics.VLLM_TTFT_BUCKETS,
    "vllm:inter_token_latency_seconds": metrics.VLLM_ITL_BUCKETS,
    "vllm:time_per_output_token_seconds": metrics.VLLM_ITL_BUCKETS,
    "vllm:e2e_request_latency_seconds": metrics.VLLM_E2E_BUCKETS,
}
VLLM_COUNTERS = {
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:request_success",
}
SGLANG_GAUGES = {
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
    "sglang:token_usage",
    "sglang:cache_hit_rate",
}
SGLANG_HISTOGRAMS = {
    "sglang:time_to_first_token_seconds": metrics.SGLANG_TTFT_BUCKETS,
    "sglang:inter_token_latency_seconds": metrics.SGLANG_ITL_BUCKETS,
    "sglang:e2e_request_latency_seconds": metrics.SGLANG_E2E_BUCKETS,
}
SGLANG_COUNTERS = {"sglang:prompt_tokens", "sglang:generation_tokens"}
DCGM = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}
VLLM_LABELS = {"model_name": MODEL, "engine": "0"}
SGLANG_LABELS = {"model_name": MODEL}


def scrape(h: SimHarness) -> dict[str, Metric]:
    return parse_metrics(metrics.render(h.registry))


def family_types(families: dict[str, Metric]) -> dict[str, str]:
    """
    Family name -> type, leaving out the C{_created} gauges that prometheus_client adds
    (in the 0.0.4 text format) for each counter and histogram, after checking that each
    belongs to one.
    """
    types = {name: f.type for name, f in families.items()}
    created = {name for name in types if name.endswith("_created")}
    for name in created:
        assert types.get(name.removesuffix("_created")) in ("counter", "histogram"), name
    return {name: kind for name, kind in types.items() if name not in created}


def only(family: Metric, suffix: str = "") -> Sample:
    """The one sample of C{family} named C{family.name + suffix}."""
    found = [s for s in family.samples if s.name == family.name + suffix]
    assert len(found) == 1, found
    return found[0]


def value(families: dict[str, Metric], name: str, suffix: str = "") -> float:
    return only(families[name], suffix).value


def buckets(family: Metric) -> dict[float, float]:
    """Cumulative bucket counts by upper bound (+Inf included)."""
    return {
        float(s.labels["le"]): s.value for s in family.samples if s.name == family.name + "_bucket"
    }


def submit(
    h: SimHarness,
    prompt: list[int],
    max_tokens: int,
    listener: RecordingListener,
    *,
    lora: str | None = None,
    finish: str = "length",
) -> SimSequence:
    return h.engine.submit(prompt, max_tokens, listener, lora=lora, finish_reason_at_limit=finish)


# -- vLLM


def test_vllm_names_and_types() -> None:
    h = SimHarness()
    families = scrape(h)
    types = family_types(families)
    expected = (
        dict.fromkeys(VLLM_GAUGES, "gauge")
        | dict.fromkeys(VLLM_HISTOGRAMS, "histogram")
        | dict.fromkeys(VLLM_COUNTERS, "counter")
    )
    assert types == expected
    text = metrics.render(h.registry).decode()
    # Counters are exposed with _total, as vLLM's are.
    assert "# TYPE vllm:prompt_tokens_total counter" in text
    assert "\nvllm:generation_tokens_total{" in text


def test_vllm_labels() -> None:
    h = SimHarness()
    listener = RecordingListener()
    submit(h, list(range(20)), 3, listener)
    h.run()
    families = scrape(h)
    for name in VLLM_GAUGES - {"vllm:lora_requests_info", "vllm:cache_config_info"}:
        [sample] = families[name].samples
        assert sample.labels == VLLM_LABELS, name
    for name in VLLM_HISTOGRAMS:
        for sample in families[name].samples:
            labels = dict(sample.labels)
            labels.pop("le", None)
            assert labels == VLLM_LABELS, sample
    for name in VLLM_COUNTERS - {"vllm:request_success"}:
        for sample in families[name].samples:
            assert sample.labels == VLLM_LABELS, sample
    for sample in families["vllm:request_success"].samples:
        assert sample.labels == VLLM_LABELS | {"finished_reason": "length"}
    [config] = families["vllm:cache_config_info"].samples
    assert config.value == 1
    assert config.labels == {
        "block_size": "16",
        "cache_dtype": "auto",
        "enable_prefix_caching": "True",
        "num_gpu_blocks": "4096",
        "engine": "0",
    }


def test_vllm_cache_config_follows_the_engine_config() -> None:
    h = SimHarness(engine_config=EngineConfig(block_size=32, kv_blocks=100, prefix_cache_blocks=0))
    [config] = scrape(h)["vllm:cache_config_info"].samples
    assert config.labels["block_size"] == "32"
    assert config.labels["num_gpu_blocks"] == "100"
    assert config.labels["enable_prefix_caching"] == "False"


def test_vllm_bucket_boundaries() -> None:
    h = SimHarness()
    families = scrape(h)
    for name, bounds in VLLM_HISTOGRAMS.items():
        assert list(buckets(families[name])) == [*bounds, math.inf], name
    assert metrics.VLLM_TTFT_BUCKETS[0] == 0.001
    assert metrics.VLLM_TTFT_BUCKETS[-1] == 2560.0
    assert metrics.VLLM_ITL_BUCKETS[-1] == 80.0
    assert metrics.VLLM_E2E_BUCKETS[-1] == 7680.0


def test_vllm_values_follow_the_clock() -> None:
    # One sequence at a time: the second and third wait for the one before them.
    config = EngineConfig(prefill_per_token=0.01, itl=0.07, max_num_seqs=1)
    h = SimHarness(engine_config=config)
    listener = RecordingListener()
    prompts = [list(range(0, 12)), list(range(100, 120)), list(range(200, 230))]
    seqs = [submit(h, p, 4, listener) for p in prompts]

    families = scrape(h)
    assert value(families, "vllm:num_requests_running") == 1
    assert value(families, "vllm:num_requests_waiting") == 2
    assert value(families, "vllm:time_to_first_token_seconds", "_count") == 0

    h.run()
    assert listener.done == seqs
    # Clock arithmetic: prefill 0.01 s per prompt token, then 3 more tokens 0.07 s apart.
    ends = [0.12 + 0.21, 0.33 + 0.20 + 0.21, 0.74 + 0.30 + 0.21]
    ttfts = [0.12, 0.33 + 0.20, 0.74 + 0.30]
    for seq, expected_ttft, end in zip(seqs, ttfts, ends, strict=True):
        assert seq.first_token_at is not None
        assert seq.first_token_at - seq.arrival == pytest.approx(expected_ttft)
        assert seq.finished_at == pytest.approx(end)

    families = scrape(h)
    ttft = families["vllm:time_to_first_token_seconds"]
    assert only(ttft, "_count").value == 3
    assert only(ttft, "_sum").value == pytest.approx(sum(ttfts))
    assert buckets(ttft) == {
        b: float(sum(t <= b for t in ttfts)) for b in [*metrics.VLLM_TTFT_BUCKETS, math.inf]
    }
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        family = families[name]
        assert only(family, "_count").value == 9
        assert only(family, "_sum").value == pytest.approx(9 * 0.07)
        counts = buckets(family)
        assert counts[0.05] == 0
        assert counts[0.075] == 9
    e2e = families["vllm:e2e_request_latency_seconds"]
    assert only(e2e, "_count").value == 3
    assert only(e2e, "_sum").value == pytest.approx(sum(ends))
    assert buckets(e2e)[0.3] == 0
    assert buckets(e2e)[0.5] == 1
    assert buckets(e2e)[0.8] == 2
    assert buckets(e2e)[1.5] == 3

    assert value(families, "vllm:prompt_tokens", "_total") == 12 + 20 + 30
    assert value(families, "vllm:generation_tokens", "_total") == 3 * 4
    assert value(families, "vllm:prefix_cache_queries", "_total") == 62
    assert value(families, "vllm:prefix_cache_hits", "_total") == 0
    [success] = [s for s in families["vllm:request_success"].samples if s.name.endswith("_total")]
    assert success.value == 3
    assert value(families, "vllm:num_requests_running") == 0
    assert value(families, "vllm:num_requests_waiting") == 0
    assert value(families, "vllm:kv_cache_usage_perc") == 0


def test_vllm_request_success_by_finish_reason() -> None:
    h = SimHarness()
    listener = RecordingListener()
    submit(h, [1, 2, 3], 2, listener, finish="stop")
    submit(h, [4, 5, 6], 2, listener, finish="length")
    submit(h, [7, 8, 9], 5, listener, finish="length")
    aborted = submit(h, [10, 11], 5, listener)
    h.engine.abort(aborted)
    h.run()
    success = {
        s.labels["finished_reason"]: s.value
        for s in scrape(h)["vllm:request_success"].samples
        if s.name == "vllm:request_success_total"
    }
    assert success == {"stop": 1, "length": 2}


def test_vllm_prefix_cache_counters() -> None:
    h = SimHarness(engine_config=EngineConfig(block_size=16))
    listener = RecordingListener()
    prompt = list(range(40))
    submit(h, prompt, 2, listener)
    h.run()
    second = submit(h, prompt, 2, listener)
    h.run()
    assert second.cached_tokens == 32  # two full blocks of 16
    families = scrape(h)
    assert value(families, "vllm:prefix_cache_queries", "_total") == 80
    assert value(families, "vllm:prefix_cache_hits", "_total") == 32


def test_vllm_kv_usage_gauges() -> None:
    h = SimHarness(engine_config=EngineConfig(kv_blocks=10, block_size=16, itl=1.0))
    listener = RecordingListener()
    submit(h, list(range(50)), 20, listener)  # 50 prompt tokens
    h.advance(0.1)  # prefilled: 51 tokens, 4 blocks of 16
    families = scrape(h)
    assert value(families, "vllm:kv_cache_usage_perc") == pytest.approx(0.4)
    assert value(families, "vllm:gpu_cache_usage_perc") == pytest.approx(0.4)
    h.advance(13.0)  # 64 tokens: still 4 blocks; one more makes 5
    assert value(scrape(h), "vllm:kv_cache_usage_perc") == pytest.approx(0.4)
    h.advance(1.0)
    assert value(scrape(h), "vllm:kv_cache_usage_perc") == pytest.approx(0.5)


def test_vllm_lora_requests_info() -> None:
    config = EngineConfig(max_num_seqs=1, max_loras=3, itl=1.0)
    h = SimHarness(engine_config=config, loras={"a": "/a", "b": "/b"})
    listener = RecordingListener()

    def series() -> dict[tuple[str, str, str], float]:
        family = scrape(h)["vllm:lora_requests_info"]
        assert family.type == "gauge"
        return {
            (
                s.labels["max_lora"],
                s.labels["running_lora_adapters"],
                s.labels["waiting_lora_adapters"],
            ): s.value
            for s in family.samples
        }

    assert series() == {("3", "", ""): 0.0}
    h.advance(10)
    assert series() == {("3", "", ""): 10.0}  # same adapter sets: same series, newer stamp

    submit(h, [1, 2, 3], 3, listener, lora="a")
    submit(h, [4, 5, 6], 3, listener, lora="b")
    submit(h, [7, 8, 9], 3, listener, lora="a")
    submit(h, [10, 11], 3, listener)
    h.advance(0.5)
    now = series()
    assert now == {("3", "", ""): 10.0, ("3", "a", "a,b"): 10.5}

    h.run()
    h.advance(1)
    final = series()
    # vLLM never removes a series: readers take the newest, which is the current state.
    assert set(final) >= {("3", "", ""), ("3", "a", "a,b")}
    assert len(final) == len(set(final))
    newest = max(final, key=final.__getitem__)
    assert newest == ("3", "", "")
    assert final[newest] == h.clock.seconds()
    assert all(stamp < final[newest] for key, stamp in final.items() if key != newest)
    assert final[("3", "a", "a,b")] == 10.5


# -- SGLang


def test_sglang_names_types_and_labels() -> None:
    h = SimHarness(engine="sglang")
    listener = RecordingListener()
    submit(h, list(range(20)), 3, listener)
    h.run()
    families = scrape(h)
    types = family_types(families)
    expected = (
        dict.fromkeys(SGLANG_GAUGES, "gauge")
        | dict.fromkeys(SGLANG_HISTOGRAMS, "histogram")
        | dict.fromkeys(SGLANG_COUNTERS, "counter")
    )
    assert types == expected
    assert not any(name.startswith("vllm:") for name in families)
    for name in types:
        for sample in families[name].samples:
            labels = dict(sample.labels)
            labels.pop("le", None)
            assert labels == SGLANG_LABELS, sample
    for name, bounds in SGLANG_HISTOGRAMS.items():
        assert list(buckets(families[name])) == [*bounds, math.inf], name


def test_sglang_values() -> None:
    config = EngineConfig(prefill_per_token=0.01, itl=0.03, block_size=16)
    h = SimHarness(engine="sglang", engine_config=config)
    listener = RecordingListener()
    prompt = list(range(40))
    submit(h, prompt, 5, listener)
    families = scrape(h)
    assert value(families, "sglang:num_running_reqs") == 1
    assert value(families, "sglang:num_queue_reqs") == 0
    assert value(families, "sglang:cache_hit_rate") == 0
    h.run()
    second = submit(h, prompt, 5, listener)
    h.run()
    families = scrape(h)
    ttft = families["sglang:time_to_first_token_seconds"]
    assert only(ttft, "_count").value == 2
    # The second prompt finds two cached blocks: 8 tokens to prefill instead of 40.
    assert second.cached_tokens == 32
    assert only(ttft, "_sum").value == pytest.approx(0.40 + 0.08)
    itl = families["sglang:inter_token_latency_seconds"]
    assert only(itl, "_count").value == 8
    assert only(itl, "_sum").value == pytest.approx(8 * 0.03)
    e2e = families["sglang:e2e_request_latency_seconds"]
    assert only(e2e, "_sum").value == pytest.approx(0.40 + 0.12 + 0.08 + 0.12)
    assert value(families, "sglang:generation_tokens", "_total") == 10
    # Every prompt token counts, cached or not, as the engines count them.
    assert value(families, "sglang:prompt_tokens", "_total") == 40 + 40
    assert value(families, "sglang:cache_hit_rate") == pytest.approx(32 / 80)
    assert value(families, "sglang:token_usage") == 0


def test_sglang_token_usage_and_queue() -> None:
    config = EngineConfig(kv_blocks=8, block_size=16, max_num_seqs=2)
    h = SimHarness(engine="sglang", engine_config=config)
    listener = RecordingListener()
    for i in range(3):
        submit(h, list(range(i * 100, i * 100 + 30)), 2, listener)
    h.advance(0.01)
    families = scrape(h)
    assert value(families, "sglang:num_running_reqs") == 2
    assert value(families, "sglang:num_queue_reqs") == 1
    assert value(families, "sglang:token_usage") == pytest.approx(4 / 8)


# -- DCGM


def dcgm(families: dict[str, Metric]) -> dict[str, dict[str, float]]:
    """DCGM gauges: family -> gpu -> value."""
    result: dict[str, dict[str, float]] = {}
    for name in DCGM:
        family = families[name]
        assert family.type == "gauge"
        result[name] = {s.labels["gpu"]: s.value for s in family.samples}
        assert len(result[name]) == len(family.samples)
    return result


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_no_dcgm_without_gpus(engine: str) -> None:
    families = scrape(SimHarness(engine=engine))
    assert not DCGM & set(families)
    assert not any(name.startswith("DCGM") for name in families)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("memory", [81_920, 1_035])
def test_dcgm_gauges(engine: str, memory: int) -> None:
    config = EngineConfig(kv_blocks=4, block_size=16, max_num_seqs=4, itl=1.0)
    h = SimHarness(engine=engine, engine_config=config, gpus=2, gpu_memory_mib=memory)
    families = scrape(h)
    idle = dcgm(families)
    assert {name: set(per_gpu) for name, per_gpu in idle.items()} == {
        name: {"0", "1"} for name in DCGM
    }
    for sample in families["DCGM_FI_DEV_FB_USED"].samples:
        assert set(sample.labels) == {"gpu", "UUID", "device", "modelName", "Hostname"}
    assert idle["DCGM_FI_DEV_GPU_UTIL"] == {"0": 0, "1": 0}
    for gpu in ("0", "1"):
        used = idle["DCGM_FI_DEV_FB_USED"][gpu]
        assert 0 < used < memory
        assert used + idle["DCGM_FI_DEV_FB_FREE"][gpu] == memory

    # One sequence whose prompt fills the whole KV cache once prefilled.
    listener = RecordingListener()
    submit(h, list(range(60)), 3, listener)
    h.advance(0.1)
    assert h.engine.kv_usage == 1.0
    busy = dcgm(scrape(h))
    for gpu in ("0", "1"):
        assert busy["DCGM_FI_DEV_FB_USED"][gpu] > idle["DCGM_FI_DEV_FB_USED"][gpu]
        assert busy["DCGM_FI_DEV_FB_FREE"][gpu] < idle["DCGM_FI_DEV_FB_FREE"][gpu]
        assert busy["DCGM_FI_DEV_FB_USED"][gpu] + busy["DCGM_FI_DEV_FB_FREE"][gpu] == memory
        assert 0 < busy["DCGM_FI_DEV_GPU_UTIL"][gpu] <= 100
    h.run()
    assert dcgm(scrape(h)) == idle


def test_dcgm_one_series_per_gpu() -> None:
    h = SimHarness(gpus=8)
    per_gpu = dcgm(scrape(h))
    for name in DCGM:
        assert set(per_gpu[name]) == {str(i) for i in range(8)}


# -- registries


def test_two_registries_do_not_collide() -> None:
    first = SimHarness(engine_config=EngineConfig(prefill_per_token=0.01))
    second = SimHarness(engine_config=EngineConfig(prefill_per_token=0.01))
    listener = RecordingListener()
    submit(first, list(range(10)), 2, listener)
    first.run()
    one, two = scrape(first), scrape(second)
    assert value(one, "vllm:time_to_first_token_seconds", "_count") == 1
    assert value(two, "vllm:time_to_first_token_seconds", "_count") == 0
    assert value(one, "vllm:generation_tokens", "_total") == 2
    assert value(two, "vllm:generation_tokens", "_total") == 0
    # A third registry in the same process, for another model and engine family.
    third = metrics.build_registry(
        SimEngine(first.clock, EngineConfig()), metrics.SGLANG, "other-model"
    )
    assert "sglang:num_running_reqs" in parse_metrics(metrics.render(third))
    # Nothing leaked into the process-wide default registry.
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "vllm:" not in default
    assert "sglang:" not in default
