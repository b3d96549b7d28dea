"""Chat: messages -> the served model's own prompt, and the token that ends the assistant's turn.

The template is the model's (``tokenizer.chat_template``, read by transformers from
``tokenizer_config.json`` or ``chat_template.jinja``), applied by transformers exactly as
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` does, so the served prompt is
token for token what a user of transformers would build.

End of turn: the template is rendered with a sentinel assistant reply, and the first token after the
sentinel is the token the template closes a turn with (ChatML ``<|im_end|>``, Llama 3 ``<|eot_id|>``,
Gemma ``<end_of_turn>``); generation stops there, as it does at the model's end-of-sequence ids.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from delta_store.errors import FailedPrecondition, InvalidArgument

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 1024
_SENTINEL = "\u2063deltaserve-end-of-turn-probe\u2063"


class ChatFormat:
    """The served model's chat template and end-of-turn ids; ``render`` validates the messages."""

    def __init__(self, tokenizer, end_of_turn_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.end_of_turn_ids = sorted(set(end_of_turn_ids))

    @classmethod
    def from_tokenizer(cls, tokenizer, eos_ids: Iterable[int] = ()) -> "ChatFormat | None":
        """None when the model has no chat template (chat requests are then FAILED_PRECONDITION)."""
        if not getattr(tokenizer, "chat_template", None):
            return None
        ids = set(eos_ids)
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        turn = _end_of_turn_id(tokenizer)
        if turn is not None:
            ids.add(turn)
        return cls(tokenizer, ids)

    def render(self, messages: Iterable) -> list[int]:
        """Prompt ids of ``messages`` (dicts or objects with ``role`` and ``content``), ready for the reply."""
        checked = check_messages(messages)
        try:
            out = self.tokenizer.apply_chat_template(checked, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
        except Exception as exc:  # noqa: BLE001 - a template may raise on what it does not accept (jinja)
            raise InvalidArgument(f"messages: the model's chat template refused them ({str(exc).splitlines()[0]})")
        return list(out["input_ids"])


def check_messages(messages: Iterable) -> list[dict]:
    """[{"role", "content"}] with known roles and string contents, or InvalidArgument naming the culprit."""
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, Mapping) else (m.role, m.content)
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidArgument(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
        if len(out) > MAX_MESSAGES:
            raise InvalidArgument(f"more than {MAX_MESSAGES} messages")
    if not out:
        raise InvalidArgument("messages is empty")
    return out


def require(chat: "ChatFormat | None") -> ChatFormat:
    if chat is None:
        raise FailedPrecondition("the served model has no chat template: send a text prompt, or serve a model "
                                 "whose tokenizer has one")
    return chat


def _end_of_turn_id(tokenizer) -> int | None:
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe simply has no detectable end token
        return None
    _, found, after = text.partition(_SENTINEL)
    if not found:
        return None
    ids = tokenizer(after, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else None
