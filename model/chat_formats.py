"""The chat dataset shapes that Etude reads, and their conversion to its own messages.

    from model.chat_formats import to_conversation, convert
    to_conversation({"instruction": "Add 2 and 2.", "output": "4"})
    # [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}]

Shapes, recognised per record by their keys (`detect`):

  etude     {"conversations": [{"role": "system|user|assistant", "content": ...}, ...]}
  openai    {"messages": [{"role": "system|developer|user|assistant", "content": str or text parts}, ...]}
  alpaca    {"instruction", "input" (optional), "output", "system" (optional), "history" (optional)}
  sharegpt  {"conversations": [{"from": "human|gpt|system", "value": ...}, ...], "system" (optional)}
  qa        a question/answer pair: question/answer, q/a, prompt/response, prompt/completion, ...

Two users: tool/cut_jsonl_sft.py converts whole files strictly (`convert`: turn order checked,
repairs counted), and SFT training reads any of these shapes line by line (`to_conversation`),
keeping our own two shapes as lenient as they always were. Here rather than in tool/ or train/
because both import it (model/ is what both may import); no torch, only the standard library.
"""

from __future__ import annotations

from typing import Any

from model.tokenizer import validate_messages

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "system": "system"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
QA_KEYS = (("question", "answer"), ("q", "a"), ("prompt", "response"), ("prompt", "completion"),
           ("query", "response"), ("query", "answer"), ("input", "output"), ("instruction", "response"))


class Rejected(ValueError):
    """A line that cannot become a conversation; args: (reason, detail)."""


def text_field(obj: dict[str, Any], key: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise Rejected(f'"{key}" is missing or not a string',
                       f"got {type(value).__name__}" if key in obj else f"keys present: {', '.join(sorted(obj))}")
    return value


def detect(obj: dict[str, Any]) -> str:
    """The format of one line, from its keys."""
    if "messages" in obj:
        return "openai"
    if "conversations" in obj:
        messages = obj["conversations"]
        first = messages[0] if isinstance(messages, list) and messages else None
        return "sharegpt" if isinstance(first, dict) and "from" in first else "etude"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if any(q in obj and a in obj for q, a in QA_KEYS):
        return "qa"
    raise Rejected("unknown shape", f"keys {', '.join(sorted(obj)) or '(none)'}; expected alpaca (instruction/"
                                    "output), sharegpt (conversations with from/value), openai (messages) or a "
                                    "question/answer pair")


def message_list(obj: dict[str, Any], key: str) -> list[Any]:
    messages = obj[key]
    if not isinstance(messages, list):
        raise Rejected(f'"{key}" is not a list', f"got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Rejected("a message is not an object", f"message {index}: got {type(message).__name__}")
    return messages


def from_alpaca(obj: dict[str, Any]) -> list[dict[str, str]]:
    instruction, extra = text_field(obj, "instruction"), text_field(obj, "input", required=False)
    messages = []
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise Rejected('"history" is not a list of [question, answer] pairs', f"got {type(history).__name__}")
    for index, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise Rejected('"history" holds something other than [question, answer] pairs', f"entry {index}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": text_field(obj, "output")}]


def from_sharegpt(obj: dict[str, Any]) -> list[dict[str, str]]:
    messages = []
    for index, message in enumerate(message_list(obj, "conversations")):
        speaker, value = message.get("from"), message.get("value")
        if speaker not in SHAREGPT_ROLES:
            raise Rejected(f"unsupported speaker {speaker!r}",
                           f"message {index}; supported: {', '.join(sorted(SHAREGPT_ROLES))}")
        if not isinstance(value, str):
            raise Rejected('a message has no text "value"', f"message {index}: got {type(value).__name__}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


def openai_content(content: Any, index: int) -> str:
    """A message's text: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Rejected(f"a message has a non-text part ({kind})", f"message {index}; only text is supported")
            texts.append(part["text"])
        return "".join(texts)
    raise Rejected("a message has no text content", f"message {index}: content is {type(content).__name__} "
                                                    "(a tool call?)")


def from_openai(obj: dict[str, Any]) -> list[dict[str, str]]:
    messages = []
    for index, message in enumerate(message_list(obj, "messages")):
        role = message.get("role")
        if role not in OPENAI_ROLES:
            raise Rejected(f"unsupported role {role!r}", f"message {index}; supported: {', '.join(OPENAI_ROLES)}")
        messages.append({"role": OPENAI_ROLES[role], "content": openai_content(message.get("content"), index)})
    return messages


def from_etude(obj: dict[str, Any]) -> list[dict[str, str]]:
    messages = []
    for index, message in enumerate(message_list(obj, "conversations")):
        role, text = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise Rejected(f"unsupported role {role!r}", f"message {index}; supported: system, user, assistant")
        if not isinstance(text, str):
            raise Rejected("a message has no text content", f"message {index}: got {type(text).__name__}")
        messages.append({"role": role, "content": text})
    return messages


def from_qa(obj: dict[str, Any]) -> list[dict[str, str]]:
    for question, answer in QA_KEYS:
        if question in obj and answer in obj:
            return [{"role": "user", "content": text_field(obj, question)},
                    {"role": "assistant", "content": text_field(obj, answer)}]
    raise Rejected("no question/answer pair", f"keys {', '.join(sorted(obj))}")


CONVERTERS = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "openai": from_openai, "etude": from_etude,
              "qa": from_qa}


def convert(obj: dict[str, Any], fmt: str, default_system: str | None) -> tuple[list[dict[str, str]], str, list[str]]:
    """One line as checked Etude messages, with the format it was read as and the repairs made;
    or Rejected with the reason."""
    fmt = detect(obj) if fmt == "auto" else fmt
    fixes = []
    messages = CONVERTERS[fmt](obj)
    system = obj.get("system") if fmt in ("alpaca", "sharegpt", "qa") else None
    if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages.pop(0)
        fixes.append("empty system message removed")
    if default_system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": default_system})
    check_turns(messages)
    if messages[-1]["role"] == "user":
        messages.pop()
        fixes.append("unanswered last user message removed")
    if not any(m["role"] == "assistant" for m in messages):
        raise Rejected("no assistant reply")
    validate_messages(messages, require_assistant=True)  # the same check as prepare_data and training
    return messages, fmt, fixes


def check_turns(messages: list[dict[str, str]]) -> None:
    """One system message at most, first; then user, assistant, user, ...; no empty message."""
    if not messages:
        raise Rejected("no messages")
    start = 1 if messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system" and index:
            raise Rejected("a system message after the start", f"message {index}")
        if index >= start:
            expected = "user" if (index - start) % 2 == 0 else "assistant"
            if role != expected:
                if index == start:
                    raise Rejected(f"starts with {'an' if role == 'assistant' else 'a'} {role} message",
                                   f"message {index}; the first turn must be the user's")
                raise Rejected(f"two {role} messages in a row", f"message {index}")
        if not message["content"].strip():
            raise Rejected(f"an empty {role} message", f"message {index}")


def to_conversation(obj: Any) -> list[dict[str, str]]:
    """One SFT record of any recognised shape as role/content messages, for training. Our own
    shapes are checked by validate_messages alone, as before (any turn order); OpenAI's
    "developer" role becomes "system" and text parts are joined; Alpaca, ShareGPT and Q&A records
    go through `convert`. Raises Rejected naming the fault."""
    if not isinstance(obj, dict):
        raise Rejected('expected an object {"conversations": [...]} or {"messages": [...]}')
    if not any(key in obj for key in ("conversations", "messages", "instruction")) \
            and not any(q in obj and a in obj for q, a in QA_KEYS):
        raise Rejected(f'no "conversations" or "messages" field (keys: {sorted(obj)}); expected an object '
                       'with "conversations": {"conversations": [{"role": "user", "content": "..."}, ...]}, or '
                       'an Alpaca, ShareGPT, OpenAI or question/answer record')
    fmt = detect(obj)
    if fmt in ("alpaca", "sharegpt", "qa"):
        try:
            messages, _, _ = convert(obj, fmt, None)
        except ValueError as exc:  # validate_messages' verdict (Rejected is one too, and passes as it is)
            if isinstance(exc, Rejected):
                raise
            raise Rejected(str(exc)) from None
        return messages
    key = "messages" if fmt == "openai" else "conversations"
    messages = obj[key]
    if fmt == "openai" and isinstance(messages, list):
        messages = [_openai_as_ours(message, index) for index, message in enumerate(messages)]
    try:
        validate_messages(messages, require_assistant=True)
    except ValueError as exc:
        raise Rejected(str(exc)) from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _openai_as_ours(message: Any, index: int) -> Any:
    """An OpenAI message with the developer role renamed and text parts joined; anything else
    is left for validate_messages to report."""
    if not isinstance(message, dict):
        return message
    message = dict(message)
    if message.get("role") == "developer":
        message["role"] = "system"
    if isinstance(message.get("content"), list):
        message["content"] = openai_content(message["content"], index)
    return message


def rejection_text(exc: Rejected) -> str:
    """A Rejected as one line: "reason (detail)"."""
    reason, *detail = exc.args
    return f"{reason} ({detail[0]})" if detail and detail[0] else str(reason)
