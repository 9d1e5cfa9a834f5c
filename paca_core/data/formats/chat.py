"""Conversations → token ids and labels, with the loss on the assistant turns only.

The tokenizer's chat template renders the conversation. Which tokens the assistant wrote is found one of two ways:

* a template with ``{% generation %}`` markers: the tokenizer's own assistant mask
  (``apply_chat_template(..., return_assistant_tokens_mask=True)``), as TRL's ``assistant_only_loss`` uses it;
* any other template (most, SmolLM2's included) by **incremental rendering**: render the conversation up to each
  assistant message with the generation prompt (``<|im_start|>assistant\\n``), then through that message; the tokens
  the message added are its turn — its content and the template's end-of-turn tokens (``<|im_end|>\\n``), which the
  model must learn to emit to stop, but not the generation-prompt header, which the template writes at inference.
  This holds only if each rendering is a token prefix of the next (and of the whole conversation). A template that
  rewrites earlier turns as the conversation grows (one that drops earlier reasoning, say) breaks that; the
  conversation is then refused with the reason, never trained on whole.

Every assistant turn of a multi-turn conversation is trained, not only the last. For TRL's conversational
prompt/completion records only the assistant turns of the completion are.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from .base import IGNORE_INDEX, DataError

logger = logging.getLogger(__name__)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(DataError):
    """The chat template cannot render this conversation, or cannot say which tokens are the assistant's."""


def template_text(tokenizer) -> str | None:
    """The tokenizer's chat template (the ``default`` one of named variants), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def has_generation_markers(tokenizer) -> bool:
    template = template_text(tokenizer)
    return bool(template and _GENERATION_TAG.search(template))


class ChatTokenizer:
    """Renders conversations with one tokenizer's chat template; :meth:`tokens` gives ids and assistant-only labels."""

    def __init__(self, tokenizer):
        if template_text(tokenizer) is None:
            raise ChatTemplateError(
                "conversations ('messages', or prompt/completion message lists) need a tokenizer with a chat template, and "
                f"this one ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '')!r}) has none: use an instruct "
                "model's tokenizer, or write the data as 'prompt'/'response' strings.")
        self.tokenizer = tokenizer
        self.markers = has_generation_markers(tokenizer)
        self._checked_generation_prompt = False

    def tokens(self, messages: list[dict[str, Any]], trained_from: int = 0) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one conversation: labels are the ids on the trained assistant turns (those at
        index ``trained_from`` or later), ``IGNORE_INDEX`` elsewhere. Raises :class:`ChatTemplateError` with the reason."""
        if self.markers:
            ids, labels = self._by_markers(messages)
            if trained_from:
                start = self._prefix_length(messages, trained_from, ids)
                labels[:start] = [IGNORE_INDEX] * start
        else:
            ids, labels = self._by_increments(messages, trained_from)
        if all(label == IGNORE_INDEX for label in labels):
            raise ChatTemplateError("the chat template marks no assistant token in it")
        return ids, labels

    # --- the two ways ---------------------------------------------------------------------------
    def _by_markers(self, messages):
        try:
            output = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        except Exception as error:  # noqa: BLE001 - a template error is the data's or the template's, said in one line
            raise ChatTemplateError(f"the chat template cannot render it ({_first_line(error)})") from None
        ids = list(output["input_ids"])
        return ids, [token if mark else IGNORE_INDEX for token, mark in zip(ids, output["assistant_masks"])]

    def _by_increments(self, messages, trained_from: int):
        full = self._render(messages, add_generation_prompt=False)
        labels = [IGNORE_INDEX] * len(full)
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or index < trained_from:
                continue
            before = self._render(messages[:index], add_generation_prompt=True)  # ends with the assistant header
            through = self._render(messages[: index + 1], add_generation_prompt=False)
            if not _starts_with(through, before):
                raise ChatTemplateError(
                    f"the chat template cannot mark assistant turn {index}: the conversation before it, rendered with the "
                    "generation prompt, is not a token prefix of the conversation through it (the template renders the "
                    "assistant header differently when the turn is present, or tokens merge across the boundary)")
            if not _starts_with(full, through):
                raise ChatTemplateError(
                    f"the chat template cannot mark assistant turn {index}: the conversation through it is not a token "
                    "prefix of the whole conversation (the template rewrites earlier turns when later ones follow)")
            if not self._checked_generation_prompt:
                self._checked_generation_prompt = True
                if before == self._render(messages[:index], add_generation_prompt=False):
                    logger.warning("The chat template adds no generation prompt (add_generation_prompt changes nothing), so the "
                                   "tokens that open an assistant turn are trained with the turn.")
            labels[len(before) : len(through)] = full[len(before) : len(through)]
        return full, labels

    def _prefix_length(self, messages, trained_from: int, ids: list[int]) -> int:
        """Tokens of the prompt part of a prompt/completion conversation (they must be a prefix of the whole)."""
        prompt = self._render(messages[:trained_from], add_generation_prompt=False)
        if not _starts_with(ids, prompt):
            raise ChatTemplateError("the chat template renders the prompt differently once the completion follows it, so the "
                                    "completion's turns cannot be told apart")
        return len(prompt)

    def _render(self, messages, add_generation_prompt: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as error:  # noqa: BLE001 - see _by_markers
            raise ChatTemplateError(f"the chat template cannot render it ({_first_line(error)})") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _starts_with(ids: list[int], prefix: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[: len(prefix)] == prefix


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
    if type(error).__name__ == "UndefinedError":  # Jinja: the template reads a key a message does not have
        return f"it reads a field a message lacks: {text}; give each message the fields the template uses, e.g. 'content'"
    return text
