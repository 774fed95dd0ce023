"""Chat templates and the incremental text of a served sequence (stop strings, UTF-8)."""

from __future__ import annotations

import json

from multitoken.serve.text import PLAIN_STOP, ChatTemplate, TextTracker
from multitoken.tokenizer import ByteTokenizer

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_plain_template(tmp_path):
    chat = ChatTemplate.for_checkpoint(tmp_path, ByteTokenizer())
    assert chat.source == "plain" and chat.stop == [PLAIN_STOP]
    assert chat.render(MSGS) == "system: Be brief.\nuser: Hi\nassistant:"


def test_template_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template}))
    chat = ChatTemplate.for_checkpoint(tmp_path, ByteTokenizer())
    assert chat.source == "tokenizer" and chat.stop == []
    assert chat.render(MSGS) == "<|system|>Be brief.<|user|>Hi<|assistant|>"


def _feed(tracker: TextTracker, data: bytes) -> str:
    out = "".join(tracker.add([b]) for b in data)
    return out + tracker.flush()


def test_stop_string_is_cut_and_never_streamed():
    t = TextTracker(ByteTokenizer(), ["END"])
    pieces = [t.add([b]) for b in b"abcENxEND tail"]
    assert t.stopped and "".join(pieces) + t.flush() == "abcENx"
    assert "E" not in pieces[3] and pieces[5] == "ENx"  # "EN" held back until "x" ruled it out


def test_multibyte_characters_are_never_split():
    t = TextTracker(ByteTokenizer(), [])
    data = "héllo ✓".encode()
    pieces = [t.add([b]) for b in data]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + t.flush() == "héllo ✓"


def test_no_stops_streams_everything():
    assert _feed(TextTracker(ByteTokenizer(), []), b"plain text") == "plain text"
