"""Conversation templates: from user turns and earlier answers to prompt token ids.

Two kinds, chosen by :func:`resolve_template`:

- the tokenizer's own chat template (the default when the tokenizer has one): messages are
  rendered with ``apply_chat_template(..., add_generation_prompt=True, tokenize=False)`` and
  tokenized without adding special tokens (the template writes its own);
- a FastChat conversation template (``--template NAME``, or FastChat's choice for the model
  name when the tokenizer has no chat template): ``get_prompt()`` tokenized with the
  tokenizer's default special tokens (BOS); answers are cut at the template's ``stop_str``.

The conversation grows turn by turn as in FastChat: the prompt of turn k holds user turns
1..k and the model's answers 1..k-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

CHAT_TEMPLATE = "chat_template"  # the template name recorded for the tokenizer's own


class Conversation(Protocol):
    def add_user(self, text: str) -> None: ...

    def prompt_ids(self) -> list[int]: ...

    def answer_text(self, output_ids: Sequence[int]) -> str:
        """The answer as stored in the answer file and in the conversation."""

    def add_answer(self, text: str) -> None: ...


def decode_answer(tokenizer: Any, output_ids: Sequence[int]) -> str:
    return tokenizer.decode(list(output_ids), skip_special_tokens=True).strip()


class ChatTemplateConversation:
    """Messages rendered by the tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.messages: list[dict[str, str]] = []

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def prompt_ids(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer_text(self, output_ids: Sequence[int]) -> str:
        return decode_answer(self.tokenizer, output_ids)

    def add_answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


class FastChatConversation:
    """A FastChat ``Conversation`` (its own copy)."""

    def __init__(self, tokenizer: Any, conv: Any) -> None:
        self.tokenizer = tokenizer
        self.conv = conv

    def add_user(self, text: str) -> None:
        self.conv.append_message(self.conv.roles[0], text)
        self.conv.append_message(self.conv.roles[1], None)

    def prompt_ids(self) -> list[int]:
        return list(self.tokenizer(self.conv.get_prompt())["input_ids"])

    def answer_text(self, output_ids: Sequence[int]) -> str:
        text = decode_answer(self.tokenizer, output_ids)
        stops = self.conv.stop_str
        for stop in [stops] if isinstance(stops, str) else stops or []:
            if stop and stop in text:
                text = text[: text.index(stop)].strip()
        return text

    def add_answer(self, text: str) -> None:
        self.conv.update_last_message(text)


@dataclass(frozen=True)
class PromptTemplate:
    """Starts conversations; ``name`` is :data:`CHAT_TEMPLATE` or a FastChat template name."""

    name: str
    tokenizer: Any
    fastchat: Any = None  # a FastChat Conversation to copy, for FastChat templates

    def start(self) -> Conversation:
        if self.fastchat is None:
            return ChatTemplateConversation(self.tokenizer)
        return FastChatConversation(self.tokenizer, self.fastchat.copy())

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids the FastChat template ends an answer with (besides the model's EOS)."""
        return tuple(self.fastchat.stop_token_ids or ()) if self.fastchat is not None else ()


def resolve_template(tokenizer: Any, model_name: str, requested: str | None) -> PromptTemplate:
    """``requested`` (a FastChat template name), else the tokenizer's chat template, else
    FastChat's template for ``model_name``."""
    if requested is not None:
        from fastchat.conversation import get_conv_template

        conv = get_conv_template(requested)
        return PromptTemplate(conv.name, tokenizer, conv)
    if getattr(tokenizer, "chat_template", None):
        return PromptTemplate(CHAT_TEMPLATE, tokenizer)
    from fastchat.model import get_conversation_template

    conv = get_conversation_template(model_name)
    return PromptTemplate(conv.name, tokenizer, conv)
