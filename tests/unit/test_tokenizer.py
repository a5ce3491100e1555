"""The simulator's tokenizer and ChatML template."""

from __future__ import annotations

import zlib

import pytest

from kthena.sim.tokenizer import echo_pieces, message_text, render_chat, token_ids, tokenize

TEXTS = [
    "",
    "Hello",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "numbers 3.14159 and 42%",
    "unicode: naïve café, 日本語 テキスト, emoji 🙂!",
    "punctuation...!?;:'\"()[]{}<>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text <|im_end|> and a fake <|not closed and <|UPPER|>",
    "\n\n\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_round_trips(text: str) -> None:
    pieces = tokenize(text)
    assert "".join(pieces) == text
    assert all(pieces), "an empty piece"


def test_tokenize_words_keep_their_leading_space() -> None:
    assert tokenize("Hello, world!") == ["Hello", ",", " world", "!"]
    assert tokenize("a  b") == ["a", "  b"]
    assert tokenize("end ") == ["end", " "]
    assert tokenize("") == []


def test_tokenize_counts_like_words_and_punctuation() -> None:
    assert len(tokenize("The quick brown fox jumps over the lazy dog.")) == 10


def test_special_tokens_are_whole_pieces() -> None:
    pieces = tokenize("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert pieces == [
        "<|im_start|>",
        "user",
        "\nhi",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "assistant",
        "\n",
    ]


@pytest.mark.parametrize("before", [" ", "\n", "  \n\t", "word ", "."])
def test_special_token_after_whitespace_is_whole(before: str) -> None:
    pieces = tokenize(before + "<|im_end|>")
    assert pieces[-1] == "<|im_end|>"
    assert "".join(pieces[:-1]) == before


def test_rendered_chat_special_tokens_are_counted_once_each() -> None:
    rendered = render_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    )
    pieces = tokenize(rendered)
    assert pieces.count("<|im_start|>") == 4
    assert pieces.count("<|im_end|>") == 3
    assert not any("<|" in p and not p.startswith("<|") for p in pieces)


def test_not_special_tokens_are_split() -> None:
    pieces = tokenize("<|Not_Special|>")
    assert "<|Not_Special|>" not in pieces
    assert "".join(pieces) == "<|Not_Special|>"


def test_token_ids_are_stable() -> None:
    assert token_ids(["hello", " world", "<|im_start|>"]) == [20870, 21707, 10155]
    assert token_ids(["hello"]) == [zlib.crc32(b"hello") % 32_000]
    assert token_ids([]) == []


def test_token_ids_same_piece_same_id() -> None:
    ids = token_ids(tokenize("the cat and the dog and the bird"))
    pieces = tokenize("the cat and the dog and the bird")
    by_piece: dict[str, int] = {}
    for piece, token in zip(pieces, ids, strict=True):
        assert by_piece.setdefault(piece, token) == token
    assert all(0 <= token < 32_000 for token in ids)
    assert len(set(ids)) == len(set(pieces))


def test_token_ids_of_unicode_pieces() -> None:
    pieces = tokenize("日本語 🙂")
    assert token_ids(pieces) == [zlib.crc32(p.encode("utf-8")) % 32_000 for p in pieces]


def test_render_chat_chatml() -> None:
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert render_chat(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_render_chat_edge_cases() -> None:
    assert render_chat([]) == "<|im_start|>assistant\n"
    assert render_chat([], add_generation_prompt=False) == ""
    assert render_chat([{"role": "assistant", "content": None}], False) == (
        "<|im_start|>assistant\n<|im_end|>\n"
    )
    assert render_chat([{"role": "tool"}], False) == "<|im_start|>tool\n<|im_end|>\n"


def test_render_chat_joins_text_parts() -> None:
    message: dict[str, object] = {
        "role": "user",
        "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}],
    }
    assert render_chat([message], False) == "<|im_start|>user\none two<|im_end|>\n"


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"content": "hi"}], "messages[0].role must be a string"),
        (
            [{"role": "user", "content": "ok"}, {"role": 3, "content": "hi"}],
            "messages[1].role must be a string",
        ),
        (
            [{"role": "user", "content": "ok"}, {"role": "user", "content": 5}],
            "messages[1].content must be a string or a list of parts",
        ),
        (
            [{"role": "user", "content": {"text": "hi"}}],
            "messages[0].content must be a string or a list of parts",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content: only text parts are supported",
        ),
        (
            [{"role": "user", "content": ["plain string part"]}],
            "messages[0].content: only text parts are supported",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text"}]}],
            "messages[1].content: a text part needs 'text'",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 7}]}],
            "messages[0].content: a text part needs 'text'",
        ),
    ],
)
def test_render_chat_errors(messages: list[dict[str, object]], error: str) -> None:
    with pytest.raises(ValueError) as raised:
        render_chat(messages)
    assert str(raised.value) == error


def test_message_text() -> None:
    assert message_text({"role": "user", "content": "plain"}) == "plain"
    assert message_text({"role": "user"}) == ""
    assert message_text({"role": "user", "content": None}) == ""
    assert message_text({"role": "user", "content": []}) == ""
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b c"}]
    assert message_text({"role": "user", "content": parts}) == "ab c"


def test_message_text_error_names_the_message_number() -> None:
    with pytest.raises(ValueError) as raised:
        message_text({"content": 1.5}, 4)
    assert str(raised.value) == "messages[4].content must be a string or a list of parts"
    with pytest.raises(ValueError) as raised:
        message_text({"content": 1.5})
    assert str(raised.value) == "messages[0].content must be a string or a list of parts"


def test_echo_pieces_are_the_words_with_a_leading_space() -> None:
    assert echo_pieces("Hello world") == [" Hello", " world"]
    assert echo_pieces("  spaced\n\nout\twords ") == [" spaced", " out", " words"]


def test_echo_pieces_skip_special_tokens() -> None:
    assert echo_pieces("<|im_start|>Hi<|im_end|>") == [" Hi"]
    assert echo_pieces("Hi <|im_end|>\n<|im_start|> there") == [" Hi", " there"]


@pytest.mark.parametrize("source", ["", "   ", "\n\t", "<|im_start|><|im_end|>"])
def test_echo_pieces_filler_without_words(source: str) -> None:
    assert echo_pieces(source) == [" the", " model", " is", " simulated"]


def test_echo_pieces_have_no_inner_whitespace() -> None:
    for piece in echo_pieces("a long\tsentence, with\nsome  punctuation!"):
        assert piece.startswith(" ")
        assert piece[1:]
        assert not any(c.isspace() for c in piece[1:])
