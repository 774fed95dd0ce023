"""Text around the token ids: the chat template, and the incremental detokenisation of a
sequence with stop strings.

Chat template: a model whose checkpoint carries a Hugging Face `chat_template` (in its
`tokenizer_config.json`, e.g. an imported instruct model) is prompted with it, rendered by Jinja2
in a sandbox as `transformers` does. Models trained here have none and get a plain one:

    system: You are terse.
    user: Hello
    assistant: Hi.
    user: And now?
    assistant:

(each message `role: content` on its own line, then `assistant:`), and "\\nuser:" is added to the
request's stop strings so that the model does not write the next user turn itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from multitoken.errors import MultitokenError
from multitoken.tokenizer import Tokenizer

PLAIN_STOP = "\nuser:"


def plain_chat(messages: Sequence[dict[str, str]]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class ChatTemplate:
    """`render(messages)` -> the prompt text; `stop`: stop strings every chat request gets."""

    def __init__(self, template: str | None, tokenizer: Tokenizer) -> None:
        self.source = "tokenizer" if template else "plain"
        self.stop = [] if template else [PLAIN_STOP]
        self._template = None
        if template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                               lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise jinja2.TemplateError(message)

            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(template)
            except jinja2.TemplateError as e:
                raise MultitokenError(f"the checkpoint's chat_template is not a valid Jinja "
                                      f"template: {e}") from None
        self.tokenizer = tokenizer

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        if self._template is None:
            return plain_chat(messages)
        # Our tokenizers never turn special-token text into its id, so the template writes no
        # bos / eos text: bos comes from `encode_prompt` (where the model takes one), and an
        # eos after an earlier assistant turn is left out.
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True,
                                         bos_token="", eos_token="")
        except jinja2.TemplateError as e:
            raise MultitokenError(f"the model's chat template refused the messages: {e}") from None

    @classmethod
    def for_checkpoint(cls, ckpt_dir: Path, tokenizer: Tokenizer) -> ChatTemplate:
        """The template in the checkpoint's tokenizer_config.json (any folder of it), if any."""
        for path in sorted(Path(ckpt_dir).rglob("tokenizer_config.json")):
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(template, str) and template:
                return cls(template, tokenizer)
        return cls(None, tokenizer)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextTracker:
    """Decodes a sequence's ids as they come, finds stop strings, and says which text is safe
    to send: never an incomplete UTF-8 character, never text that a stop string may yet claim.

    OpenAI semantics: the stop string itself is not part of the output.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        """Append ids; returns the new text that is safe to send. Sets `stopped` when a stop
        string appeared (text is then cut before it)."""
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        if self.stops:
            # A stop string cannot lie wholly in text already sent: search from just before it.
            start = max(0, self.sent - max(len(s) for s in self.stops) + 1)
            cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.text, self.stopped = text[:cut], True
                return self.flush()
        self.text = text
        end = len(text.rstrip("\ufffd"))  # a multi-byte character may still be arriving
        end -= _held_back(text[:end], self.stops)
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent:end], end
        return out

    def flush(self) -> str:
        """Everything not sent yet (the sequence is over)."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def encode_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
