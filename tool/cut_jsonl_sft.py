"""Convert chat and instruction datasets into the SFT format of Etude: JSONL, one
{"conversations": [{"role": "system|user|assistant", "content": "..."}, ...]} per line.

    python tool/cut_jsonl_sft.py alpaca_data.jsonl                   # -> training_data/alpaca_data.sft.jsonl
    python tool/cut_jsonl_sft.py sharegpt.jsonl.gz --skip-bad-lines --rejects dropped.txt
    python tool/cut_jsonl_sft.py qa.jsonl --system "You are a helpful assistant." --out training_data/qa_sft.jsonl

Reads .jsonl files, or .json files holding one JSON array (as Alpaca and ShareGPT data are often
shipped; streamed element by element), compressed or not. Each record's shape is recognised on
its own (--format forces one):

  alpaca    {"instruction", "input" (optional), "output", "system" (optional),
             "history": [[question, answer], ...] (optional, earlier turns)}
            the user turn is the instruction, then a blank line and the input when there is one
  sharegpt  {"conversations": [{"from": "human|gpt|system", "value": ...}, ...], "system" (optional)}
            (from: human/user -> user, gpt/assistant/bot/model/chatgpt -> assistant)
  openai    {"messages": [{"role": "system|developer|user|assistant", "content": str or text parts}, ...]}
  etude     {"conversations": [{"role": ..., "content": ...}, ...]} (our own format, checked again)
  qa        a question/answer pair: question/answer, q/a, prompt/response, prompt/completion,
            query/response, query/answer, input/output, instruction/response (+ optional "system")

Checks: roles are system, user or assistant; at most one system message, first; then user and
assistant take turns, starting with the user; no message is empty. A conversation that ends
on an unanswered user message loses that message (counted); an empty system message is removed
(counted). --system adds a system prompt to conversations that have none.

Any line that cannot be converted stops the run with file:line and the reason; with
--skip-bad-lines it is dropped and reported (every one, on stderr or in the --rejects file) and
the summary counts them by reason. Writes --out (default training_data/<input name>.sft.jsonl),
atomically; `python tool/prepare_data.py --sft FILE` takes it as it is.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.tokenizer import validate_messages
from tool.textio import (BadLines, DataError, Outputs, Reader, Stopwatch, add_common_flags, check_paths,
                         default_output, iter_json_objects, print_summary, run_tool)

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "etude", "qa")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="JSONL",
                        help=".jsonl files, or .json files holding one array (.gz/.bz2/.xz too)")
    parser.add_argument("--out", type=Path, help="the JSONL to write (.jsonl or .jsonl.gz); "
                                                 "default training_data/<input name>.sft.jsonl")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="the input format (default auto: recognised line by line)")
    parser.add_argument("--system", help="system prompt for conversations that have none")
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.system is not None and not args.system.strip():
            raise DataError("--system is empty; give the system prompt text, or leave the flag out")
        out = args.out or default_output(args.inputs[0], ".sft.jsonl")
        check_paths(args.inputs, [out])
        print(f"converting {', '.join(map(str, args.inputs))} ({args.format}) -> {out}")
        watch, bad = Stopwatch(), BadLines(args.skip_bad_lines, args.rejects)
        formats, fixes = Counter(), Counter()
        written = messages_written = size = 0
        try:
            with Outputs() as outputs:
                output = outputs.open(out)
                for path in args.inputs:
                    with Reader(path, progress=not args.no_progress) as reader:
                        for lineno, _, obj in iter_json_objects(reader, bad):
                            try:
                                messages, fmt, repairs = convert(obj, args.format, args.system)
                            except Rejected as exc:
                                bad(path, lineno, *exc.args)
                                continue
                            except ValueError as exc:  # validate_messages: a shape the checks above missed
                                bad(path, lineno, "invalid conversation", str(exc))
                                continue
                            formats[fmt] += 1
                            fixes.update(repairs)
                            output.write_json({"conversations": messages})
                            written += 1
                            messages_written += len(messages)
                        size += reader.size
        finally:
            bad.close()
        rows = [("conversations written", written), ("messages written", messages_written)]
        rows += [(f"from {fmt}", count) for fmt, count in formats.most_common()]
        rows += list(fixes.items()) + bad.summary_rows() + watch.rows(size)
        print_summary(f"wrote {out}", rows)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
