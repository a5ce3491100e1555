"""
C{kthena-sim} as a real process, driven by the official C{openai} client: the OpenAI API
with usage, SSE pacing, both engines' metrics, queueing past C{--max-num-seqs}, fault
injection, client disconnects, and prefill/decode across two processes (vLLM NIXL and
SGLang bootstrap rooms).  Timing checks are loose on purpose: they tell a paced stream
from a burst, nothing finer.
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from tests.integration.conftest import (
    SHARED_ITL,
    SHARED_OUTPUT_TOKENS,
    TWISTD,
    SimFactory,
    SimProcess,
    twistd_command,
    twistd_env,
    wait_until,
)

MODEL = "sim-model"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
ECHO = [" " + word for word in WORDS.split()]

# running, waiting, KV-cache usage gauges by engine
GAUGES = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"),
    "sglang": ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"),
}


def messages(text: str = WORDS) -> list[ChatCompletionMessageParam]:
    return [
        {"role": "system", "content": "You are a simulated model."},
        {"role": "user", "content": text},
    ]


def chat_prompt_tokens(sim: SimProcess, text: str = WORDS) -> int:
    """The prompt's token count as C{POST /tokenize} tells it (chat template applied)."""
    return sim.tokenize({"model": MODEL, "messages": list(messages(text))})


@dataclass
class StreamRecord:
    """What a client saw of one stream: token pieces and when each arrived."""

    pieces: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    usage: CompletionUsage | None = None
    usage_chunk_was_last: bool = False
    error: Exception | None = None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.arrivals)]


def stream_chat(
    sim: SimProcess, max_tokens: int | None = None, include_usage: bool = True, text: str = WORDS
) -> StreamRecord:
    """Stream one chat completion; a transport error ends the record instead of raising."""
    record = StreamRecord()
    try:
        with sim.client().chat.completions.create(
            model=MODEL,
            messages=messages(text),
            stream=True,
            stream_options={"include_usage": include_usage},
            max_tokens=max_tokens,  # null: the model's own length
        ) as stream:
            for chunk in stream:
                now = time.monotonic()
                assert chunk.model == MODEL
                record.usage_chunk_was_last = False
                if chunk.usage is not None:
                    assert chunk.choices == []
                    record.usage = chunk.usage
                    record.usage_chunk_was_last = True
                for choice in chunk.choices:
                    if choice.delta.content:
                        record.pieces.append(choice.delta.content)
                        record.arrivals.append(now)
                    if choice.finish_reason is not None:
                        record.finish_reasons.append(choice.finish_reason)
    except (AssertionError, openai.APIStatusError):
        raise
    except Exception as e:  # a cut stream: openai's APIConnectionError, or httpx's own error
        record.error = e
    return record


# -- the command line


def test_twistd_lists_kthena_sim() -> None:
    result = subprocess.run(
        [TWISTD, "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=twistd_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "kthena-sim" in result.stdout
    options = subprocess.run(
        twistd_command("kthena-sim", "--help"),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=twistd_env(),
    )
    assert options.returncode == 0, options.stderr
    for option in ("--engine", "--max-num-seqs", "--itl", "--role", "--bootstrap-listen"):
        assert option in options.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--engine", "foo"), "--engine must be one of vllm, sglang"),
        (("--role", "middle"), "--role must be prefill, decode or both"),
        (("--max-num-seqs", "0"), "0 is not a whole number >= 1"),
        (("--error-rate", "2"), "error_rate must be a number from 0 to 1"),
    ],
)
def test_invalid_option_exits_with_a_clear_message(args: tuple[str, ...], message: str) -> None:
    result = subprocess.run(
        twistd_command("kthena-sim", *args, "--listen", "tcp:0:interface=127.0.0.1"),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=twistd_env(),
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


# -- the OpenAI API, on both engines


def test_chat_non_streaming_usage(engine_sim: SimProcess) -> None:
    client = engine_sim.client()
    response = client.chat.completions.create(model=MODEL, messages=messages(), max_tokens=5)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(ECHO[:5])
    assert choice.finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 5
    assert response.usage.prompt_tokens == chat_prompt_tokens(engine_sim)
    assert response.usage.total_tokens == response.usage.prompt_tokens + 5

    limited = client.chat.completions.create(
        model=MODEL, messages=messages(), max_completion_tokens=3
    )
    assert limited.usage is not None
    assert limited.usage.completion_tokens == 3


def test_model_stops_by_itself_after_output_tokens(engine_sim: SimProcess) -> None:
    response = engine_sim.client().chat.completions.create(model=MODEL, messages=messages())
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None
    assert response.usage.completion_tokens == SHARED_OUTPUT_TOKENS
    # The echo wraps around the prompt's words.
    expected = "".join(ECHO[i % len(ECHO)] for i in range(SHARED_OUTPUT_TOKENS))
    assert response.choices[0].message.content == expected


def test_completions_non_streaming_usage(engine_sim: SimProcess) -> None:
    prompt = "Once upon a time there was a router"
    response = engine_sim.client().completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert response.choices[0].text == " Once upon a time"
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 4
    assert response.usage.prompt_tokens == engine_sim.tokenize({"model": MODEL, "prompt": prompt})


def test_chat_stream_is_paced_by_itl_and_ends_with_usage(engine_sim: SimProcess) -> None:
    record = stream_chat(engine_sim, max_tokens=8)
    assert record.error is None
    assert record.pieces == ECHO[:8]
    assert record.finish_reasons == ["length"]
    assert record.usage is not None
    assert record.usage_chunk_was_last
    assert record.usage.completion_tokens == 8
    assert record.usage.prompt_tokens == chat_prompt_tokens(engine_sim)
    # One event per token, spread out by the inter-token latency, not sent in a burst.
    assert statistics.median(record.gaps) >= SHARED_ITL / 2
    assert record.arrivals[-1] - record.arrivals[0] >= 7 * SHARED_ITL / 2


def test_stream_without_include_usage_has_no_usage_chunk(engine_sim: SimProcess) -> None:
    record = stream_chat(engine_sim, max_tokens=3, include_usage=False)
    assert record.error is None
    assert len(record.pieces) == 3
    assert record.usage is None


def test_completions_stream_with_usage(engine_sim: SimProcess) -> None:
    prompt = "one two three four five six"
    texts: list[str] = []
    arrivals: list[float] = []
    usage = None
    with engine_sim.client().completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                texts.append(choice.text)
                arrivals.append(time.monotonic())
    assert "".join(texts) == " " + prompt
    assert len(texts) == 6
    assert usage is not None
    assert usage.completion_tokens == 6
    assert usage.prompt_tokens == engine_sim.tokenize({"model": MODEL, "prompt": prompt})
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert statistics.median(gaps) >= SHARED_ITL / 2


def test_metrics_use_the_engines_own_names(engine_sim: SimProcess) -> None:
    engine_sim.client().chat.completions.create(model=MODEL, messages=messages(), max_tokens=2)
    values = engine_sim.metrics()
    prefix = engine_sim.engine + ":"
    other = "sglang:" if engine_sim.engine == "vllm" else "vllm:"
    for name in GAUGES[engine_sim.engine]:
        assert name in values
    assert values[prefix + "generation_tokens_total"] >= 2
    assert values[prefix + "time_to_first_token_seconds_count"] >= 1
    assert values[prefix + "e2e_request_latency_seconds_count"] >= 1
    assert not [name for name in values if name.startswith(other)]


def test_unknown_model_is_a_404(engine_sim: SimProcess) -> None:
    with pytest.raises(openai.NotFoundError):
        engine_sim.client().chat.completions.create(model="no-such-model", messages=messages())


# -- load past --max-num-seqs


def test_requests_past_max_num_seqs_wait_and_everything_drains(sim_factory: SimFactory) -> None:
    sim = sim_factory("--max-num-seqs", "2", "--itl", "0.03", "--output-tokens", "16")
    running, waiting, usage = GAUGES["vllm"]
    seen: dict[str, float] = {running: 0.0, waiting: 0.0, usage: 0.0}
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream_chat, sim) for _ in range(8)]
        deadline = time.monotonic() + 20
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            values = sim.metrics()
            for name, value in seen.items():
                seen[name] = max(value, values[name])
            time.sleep(0.05)
        records = [f.result(timeout=20) for f in futures]
    assert seen[running] == 2  # never more than --max-num-seqs at once
    assert seen[waiting] > 0
    assert seen[usage] > 0
    for record in records:
        assert record.error is None
        assert len(record.pieces) == 16
        assert record.usage is not None
        assert record.usage.completion_tokens == 16
    after = sim.metrics()
    assert after[running] == 0
    assert after[waiting] == 0
    assert after[usage] == 0
    assert after["vllm:request_success_total"] == 8


# -- fault injection


def test_faults_switch_on_and_off_while_running(sim_factory: SimFactory) -> None:
    sim = sim_factory("--itl", "0.005", "--output-tokens", "8")
    client = sim.client()

    faults = sim.json("PUT", "/sim/faults", {"error_rate": 1, "error_status": 503})
    assert faults["error_rate"] == 1.0
    assert faults["error_status"] == 503
    assert sim.json("GET", "/sim/faults") == faults
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model=MODEL, messages=messages())
    assert failed.value.status_code == 503
    with pytest.raises(openai.APIStatusError) as failed_stream:
        stream_chat(sim)
    assert failed_stream.value.status_code == 503

    reset = sim.json("DELETE", "/sim/faults")
    assert reset["error_rate"] == 0.0
    assert reset["drop_after_tokens"] is None
    ok = client.chat.completions.create(model=MODEL, messages=messages())
    assert ok.usage is not None
    assert ok.usage.completion_tokens == 8

    assert sim.request("PUT", "/sim/faults", {"error_rate": 7}).status == 400
    assert sim.request("PUT", "/sim/faults", {"no_such_fault": 1}).status == 400
    assert sim.json("GET", "/sim/faults") == reset


def test_drop_after_tokens_cuts_the_stream(sim_factory: SimFactory) -> None:
    sim = sim_factory("--itl", "0.005", "--output-tokens", "8")
    sim.json("PUT", "/sim/faults", {"drop_after_tokens": 3})
    record = stream_chat(sim)
    assert record.pieces == ECHO[:3]
    assert record.finish_reasons == []
    assert record.error is not None
    assert not isinstance(record.error, openai.APIStatusError)
    # A non-streaming request loses its connection before any response.
    with pytest.raises(openai.APIConnectionError):
        sim.client().chat.completions.create(model=MODEL, messages=messages())
    sim.json("DELETE", "/sim/faults")
    assert len(stream_chat(sim).pieces) == 8
    values = sim.metrics()
    assert values["vllm:num_requests_running"] == 0
    assert values["vllm:kv_cache_usage_perc"] == 0


def test_abort_rate_drops_the_connection(sim_factory: SimFactory) -> None:
    sim = sim_factory("--itl", "0.005", "--output-tokens", "4")
    sim.json("PUT", "/sim/faults", {"abort_rate": 1})
    with pytest.raises(openai.APIConnectionError):
        sim.client().chat.completions.create(model=MODEL, messages=messages())
    sim.json("DELETE", "/sim/faults")
    response = sim.client().chat.completions.create(model=MODEL, messages=messages())
    assert response.usage is not None
    assert response.usage.completion_tokens == 4


# -- a client that leaves


def test_closing_a_stream_stops_generation(sim_factory: SimFactory) -> None:
    sim = sim_factory("--itl", "0.05", "--output-tokens", "400")  # a 20 s stream
    pieces = 0
    with sim.client().chat.completions.create(
        model=MODEL, messages=messages(), stream=True
    ) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
            if pieces == 3:
                break
        assert sim.metrics()["vllm:num_requests_running"] == 1
    # Quickly: the stream had 19 s to go.
    wait_until(
        lambda: sim.metrics()["vllm:num_requests_running"] == 0,
        timeout=5,
        what="num_requests_running back to 0",
    )
    # The pod stopped generating: no more tokens, and the request did not "succeed".
    generated = sim.metrics()["vllm:generation_tokens_total"]
    time.sleep(0.3)
    after = sim.metrics()
    assert after["vllm:generation_tokens_total"] == generated < 400
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after.get("vllm:request_success_total", 0) == 0


# -- prefill/decode across two processes


def test_vllm_nixl_prefill_then_decode(sim_factory: SimFactory) -> None:
    pd_args = ("--prefill-per-token", "0.02", "--itl", "0.005")
    prefill = sim_factory(
        "--role",
        "prefill",
        "--engine-id",
        "prefill-0",
        "--advertise-port",
        "5600",
        *pd_args,
        host="127.0.0.4",
    )
    decode = sim_factory("--role", "decode", *pd_args, host="127.0.0.5")
    prompt_tokens = chat_prompt_tokens(prefill)

    first = prefill.client().chat.completions.create(
        model=MODEL,
        messages=messages(),
        max_tokens=1,
        extra_body={
            "kv_transfer_params": {
                "do_remote_decode": True,
                "do_remote_prefill": False,
                "remote_engine_id": None,
                "remote_block_ids": None,
                "remote_host": None,
                "remote_port": None,
            }
        },
    )
    assert first.usage is not None
    assert first.usage.completion_tokens == 1
    assert first.usage.prompt_tokens == prompt_tokens
    kv = (first.model_extra or {}).get("kv_transfer_params")
    assert isinstance(kv, dict)
    assert kv["do_remote_prefill"] is True
    assert kv["do_remote_decode"] is False
    assert kv["remote_engine_id"] == "prefill-0"
    assert kv["remote_host"] == "127.0.0.4"
    assert kv["remote_port"] == 5600
    assert len(kv["remote_block_ids"]) == -(-prompt_tokens // 16)

    second = decode.client().chat.completions.create(
        model=MODEL, messages=messages(), max_tokens=6, extra_body={"kv_transfer_params": kv}
    )
    assert second.choices[0].message.content == "".join(ECHO[:6])
    assert second.usage is not None
    assert second.usage.prompt_tokens == prompt_tokens
    assert second.usage.completion_tokens == 6
    # The decode leg did not prefill the transferred blocks itself.
    prefill_ttft = prefill.metrics()["vllm:time_to_first_token_seconds_sum"]
    decode_ttft = decode.metrics()["vllm:time_to_first_token_seconds_sum"]
    assert prefill_ttft >= prompt_tokens * 0.02 / 2
    assert decode_ttft < prefill_ttft / 2

    # Each role refuses the other's leg.
    with pytest.raises(openai.BadRequestError):
        decode.client().chat.completions.create(
            model=MODEL,
            messages=messages(),
            extra_body={"kv_transfer_params": {"do_remote_decode": True}},
        )
    with pytest.raises(openai.BadRequestError):
        prefill.client().chat.completions.create(
            model=MODEL, messages=messages(), extra_body={"kv_transfer_params": kv}
        )


def test_sglang_bootstrap_decode_waits_for_its_prefill(sim_factory: SimFactory) -> None:
    bootstrap = "tcp:0:interface=127.0.0.7"
    prefill = sim_factory(
        "--engine", "sglang", "--role", "prefill", "--bootstrap-listen", bootstrap, host="127.0.0.6"
    )
    decode = sim_factory(
        "--engine", "sglang", "--role", "decode", "--bootstrap-timeout", "10", host="127.0.0.8"
    )
    room = {
        "bootstrap_host": "127.0.0.7",
        "bootstrap_port": prefill.ports[bootstrap],
        "bootstrap_room": 4242,
    }
    prompt_tokens = chat_prompt_tokens(prefill)
    done_at: list[float] = []

    def decode_leg() -> ChatCompletion:
        response = decode.client().chat.completions.create(
            model=MODEL, messages=messages(), max_tokens=4, extra_body=room
        )
        done_at.append(time.monotonic())
        return response

    with ThreadPoolExecutor(1) as pool:
        decoding: Future[ChatCompletion] = pool.submit(decode_leg)
        time.sleep(0.5)
        assert not decoding.done()  # no prefill yet: the decode leg waits
        assert decode.metrics()["sglang:num_running_reqs"] == 0
        prefill_sent = time.monotonic()
        first = prefill.client().chat.completions.create(
            model=MODEL, messages=messages(), max_tokens=1, extra_body=room
        )
        second = decoding.result(timeout=10)
    assert first.usage is not None
    assert first.usage.prompt_tokens == prompt_tokens
    assert done_at[0] >= prefill_sent
    assert second.choices[0].message.content == "".join(ECHO[:4])
    assert second.usage is not None
    assert second.usage.prompt_tokens == prompt_tokens
    assert second.usage.completion_tokens == 4

    # A room that is prefilled already is served at once.
    again = decode.client().chat.completions.create(
        model=MODEL, messages=messages(), max_tokens=2, extra_body=room
    )
    assert again.usage is not None
    assert again.usage.completion_tokens == 2


def test_sglang_decode_without_prefill_fails_after_the_bootstrap_timeout(
    sim_factory: SimFactory,
) -> None:
    prefill = sim_factory("--engine", "sglang", "--role", "prefill", host="127.0.0.9")
    decode = sim_factory(
        "--engine", "sglang", "--role", "decode", "--bootstrap-timeout", "1.0", host="127.0.0.10"
    )
    room = {"bootstrap_host": "127.0.0.9", "bootstrap_port": prefill.port, "bootstrap_room": 7}
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as failed:
        decode.client().chat.completions.create(
            model=MODEL, messages=messages(), max_tokens=4, extra_body=room
        )
    elapsed = time.monotonic() - started
    assert failed.value.status_code == 500
    assert "room 7" in str(failed.value)
    assert 0.5 <= elapsed < 8
    values = decode.metrics()
    assert values["sglang:num_running_reqs"] == 0
    assert values["sglang:num_queue_reqs"] == 0
