"""
A model's own tokenizer (a local tokenizer.json) counts the input tokens its rate limits
charge; without one, or until it is loaded, Kthena's estimate (characters / 4) does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from kthena import prompt
from kthena.config.validate import ConfigError
from tests.unit.proxyfixtures import BASE_MODEL, RouterHarness, router_config
from tests.unit.test_proxy_resource import COMPLETION

MESSAGES = [{"role": "user", "content": "hello world, hello tokens"}]


def tokenizer_file(tmp_path: Path) -> Path:
    """A word-level tokenizer: one token per whitespace-separated word."""
    vocab = {"[UNK]": 0, "hello": 1, "world,": 2, "tokens": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_the_models_tokenizer_counts_the_input(tmp_path: Path) -> None:
    path = tokenizer_file(tmp_path)
    h = RouterHarness(
        rate_limit={"inputTokensPerUnit": 1000, "unit": "minute"},
        tokenizers=[{"model": BASE_MODEL, "file": str(path)}],
    )
    before = h.chat(messages=MESSAGES)  # not loaded yet: characters / 4
    h.upstream.last.respond_json(COMPLETION)
    assert before.got().status == 200
    h.tree.startService()
    client = h.chat(messages=MESSAGES)
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    body = {"model": BASE_MODEL, "messages": MESSAGES}
    words = len(prompt.render(body).split())
    chars = -(-prompt.chars(body) // 4)
    assert words != chars
    assert [r.input_estimate for r in h.contexts] == [chars, words]


def test_a_tokenizer_file_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokenizers\[0\]\.file.*no such file"):
        router_config(tokenizers=[{"model": "m", "file": str(tmp_path / "missing.json")}])


def test_a_tokenizer_that_cannot_be_loaded_leaves_the_estimate(tmp_path: Path) -> None:
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    h = RouterHarness(
        rate_limit={"inputTokensPerUnit": 1000, "unit": "minute"},
        tokenizers=[{"model": BASE_MODEL, "file": str(broken)}],
    )
    h.tree.startService()
    assert h.limits.tokenizers.loaded == {}
    client = h.chat(messages=MESSAGES)
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    body = {"model": BASE_MODEL, "messages": MESSAGES}
    assert h.contexts[0].input_estimate == -(-prompt.chars(body) // 4)
