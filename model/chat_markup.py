"""Tool calls and thinking traces in the chat format: how they are written into ChatML, and how
they are read back out of a reply the model generated.

    from model.chat_markup import plain_messages, parse_reply
    plain_messages([{"role": "user", "content": "What is 6 * 7?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"type": "function", "function": {"name": "calculator",
                                                          "arguments": '{"expression": "6 * 7"}'}}]},
                    {"role": "tool", "content": "42"}], tools=CALCULATOR_TOOLS)
    parse_reply('<think>\\nsix sevens\\n</think>\\n\\n42')  # Reply(reasoning="six sevens", content="42")

The format (one ChatML block per message, as for plain chat; documented in README.md):

- tools: a system block that starts with the conversation's own system message (if any), then
  "# Tools", one line per tool (`- name(param: type, ...): description`) and a line saying how
  to call one;
- an assistant tool call: after the assistant's text (if any, then a newline), per call
  `<tool_call>\\n{"name": NAME, "arguments": ARGUMENTS}\\n</tool_call>` (calls joined by newlines);
- a tool result: a message of role `tool` whose content is the result as text;
- thinking: `<think>\\nREASONING\\n</think>\\n\\n` before the answer, kept only for the assistant
  messages after the last user message (the turn being answered): earlier turns' reasoning is
  left out of the history, as reasoning models are trained;
- `enable_thinking=False` appends an empty `<think>\\n\\n</think>\\n\\n` to the generation prompt,
  so the model answers without reasoning.

The markers are plain text, not special tokens: adding tokens would change the vocabulary of every
trained tokenizer and model. The model learns them from the SFT data like any other words. That
makes them forgeable by text, so the one rule that keeps injection out: only a reply the model
generated is ever parsed for calls (`parse_reply`); user messages, tool results and system text
are rendered as they are and never parsed. A user who types `<tool_call>...` has sent text.
(The special tokens <|im_start|>/<|im_end|> stay unforgeable as before: content is never parsed
for them.)

`plain_messages` turns structured messages into role/content ones whose content is exactly the
text that CHAT_TEMPLATE (model/tokenizer.py) writes, so our renderer and transformers' agree.
Standard library only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOLS_INTRO = "# Tools"
TOOLS_OUTRO = ('\nTo call a tool, write ' + TOOL_CALL_OPEN + '\n{"name": ..., "arguments": {...}}\n'
               + TOOL_CALL_CLOSE)
NO_THINKING = THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n"

# The Jinja twin of plain_messages + the ChatML blocks; model/tokenizer.py's CHAT_TEMPLATE.
# Whitespace-free between tags so that transformers' trim/lstrip settings change nothing.
# tojson is transformers' json.dumps(ensure_ascii=False), the same call as _dumps below.
JINJA_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' and messages[0]['content'] -%}"
    "{{ messages[0]['content'] + '\\n\\n' }}{%- endif -%}"
    "{{ " + json.dumps(TOOLS_INTRO) + " }}"
    "{%- for tool in tools -%}"
    "{%- set function = tool['function'] if tool['function'] is defined else tool -%}"
    "{%- set parameters = function['parameters'] if function['parameters'] is mapping else {} -%}"
    "{%- set properties = parameters['properties'] if parameters['properties'] is mapping else {} -%}"
    "{%- set ns.signature = '' -%}"
    "{%- for name, spec in properties.items() -%}"
    "{%- set ns.signature = ns.signature + ('' if loop.first else ', ') + name + ': ' + "
    "(spec['type'] if spec is mapping and spec['type'] is string else 'any') -%}"
    "{%- endfor -%}"
    "{{ '\\n- ' + function['name'] + '(' + ns.signature + ')' + (': ' + function['description'] "
    "if function['description'] is string and function['description'] else '') }}"
    "{%- endfor -%}"
    "{{ " + json.dumps(TOOLS_OUTRO) + " + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (tools and loop.first and message['role'] == 'system') -%}"
    "{%- set ns.content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set ns.reasoning = message['reasoning_content'] if message['reasoning_content'] is string else '' -%}"
    "{%- if '</think>' in ns.content -%}"
    "{%- set ns.reasoning = ns.content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set ns.content = ns.content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user and ns.reasoning -%}"
    "{%- set ns.content = '<think>\\n' + ns.reasoning + '\\n</think>\\n\\n' + ns.content -%}"
    "{%- endif -%}"
    "{%- for call in (message['tool_calls'] or []) -%}"
    "{%- set function = call['function'] if call['function'] is defined else call -%}"
    "{%- set arguments = function['arguments'] if function['arguments'] is string "
    "else (function['arguments'] | tojson) -%}"
    "{%- set ns.content = ns.content + ('\\n' if ns.content else '') + '<tool_call>\\n{\"name\": ' + "
    "(function['name'] | tojson) + ', \"arguments\": ' + arguments + '}\\n</tool_call>' -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + ns.content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ " + json.dumps(NO_THINKING) + " }}"
    "{%- endif -%}{%- endif -%}"
)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def tool_signature(tool: dict) -> str:
    """One tool as a line of the tool list: `- name(param: type, ...): description`. Only names
    and types of the parameters: the JSON schema of one small tool is ~100 tokens of a 6,400-token
    vocabulary, and the tiny model's whole context is 256."""
    function = tool["function"] if "function" in tool else tool
    parameters = function.get("parameters")
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    properties = properties if isinstance(properties, dict) else {}
    params = ", ".join(f"{name}: {spec['type'] if isinstance(spec, dict) and isinstance(spec.get('type'), str) else 'any'}"
                       for name, spec in properties.items())
    description = function.get("description")
    described = f": {description}" if isinstance(description, str) and description else ""
    return f"- {function['name']}({params}){described}"


def tools_text(tools: list[dict], system: str | None = None) -> str:
    """The system block's content that lists `tools` (after the conversation's own system text)."""
    head = system + "\n\n" if system else ""
    return head + TOOLS_INTRO + "".join("\n" + tool_signature(tool) for tool in tools) + TOOLS_OUTRO


def call_text(name: str, arguments: str | dict) -> str:
    """One tool call as the model writes it; string arguments are written as they are."""
    arguments = arguments if isinstance(arguments, str) else _dumps(arguments)
    return f'{TOOL_CALL_OPEN}\n{{"name": {_dumps(name)}, "arguments": {arguments}}}\n{TOOL_CALL_CLOSE}'


def split_thinking(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant text that holds a </think>; ("", text) otherwise."""
    if THINK_CLOSE not in content:
        return "", content
    return (content.split(THINK_CLOSE)[0].split(THINK_OPEN)[-1].strip("\n"),
            content.split(THINK_CLOSE)[-1].lstrip("\n"))


def plain_messages(messages: list[dict], tools: list[dict] | None = None) -> list[dict[str, str]]:
    """Messages with tool lists, tool calls and reasoning written into their text, as role/content
    pairs (roles system, user, assistant, tool): what CHAT_TEMPLATE renders, block for block.
    Raises ValueError naming a tool call that has no name or arguments."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    plain: list[dict[str, str]] = []
    if tools:
        first = messages[0] if messages else {}
        system = first.get("content") if first.get("role") == "system" else None
        plain.append({"role": "system", "content": tools_text(tools, system if isinstance(system, str) else None)})
    for index, message in enumerate(messages):
        role = message.get("role")
        if tools and index == 0 and role == "system":
            continue
        content = message.get("content")
        if role == "assistant":
            content = content if isinstance(content, str) else ""  # None beside tool_calls
            reasoning = message.get("reasoning_content")
            reasoning = reasoning if isinstance(reasoning, str) else ""
            if THINK_CLOSE in content:
                reasoning, content = split_thinking(content)
            if index > last_user and reasoning:
                content = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{content}"
            for number, call in enumerate(message.get("tool_calls") or []):
                function = call.get("function", call) if isinstance(call, dict) else None
                if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                        and "arguments" in function):
                    raise ValueError(f"message {index}: tool_calls[{number}] needs a function with a name and "
                                     'arguments: {"type": "function", "function": {"name": ..., "arguments": ...}}')
                content += ("\n" if content else "") + call_text(function["name"], function["arguments"])
        plain.append({"role": role, "content": content})
    return plain


@dataclass
class ToolCall:
    """A call the model wrote: the function's name and its arguments as a JSON object's text."""

    name: str
    arguments: str


@dataclass
class Reply:
    """A generated reply taken apart: reasoning (thinking), the answer text and the calls.
    `malformed` holds the text of call blocks that were not a valid call (kept in `content`)."""

    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.S)


def read_call(body: str, tool_names: set[str] | None = None) -> ToolCall | str:
    """The call in one <tool_call> block's body, or why it is not one."""
    try:
        call = json.loads(body)
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return 'not an object with a "name"'
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models quote the arguments object; accept it if it parses
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return "arguments are not a JSON object"
    if not isinstance(arguments, dict):
        return "arguments are not a JSON object"
    if tool_names is not None and call["name"] not in tool_names:
        return f"no tool is named {call['name']!r}"
    return ToolCall(call["name"], _dumps(arguments))


def parse_reply(text: str, tool_names: set[str] | None = None, parse_calls: bool = True) -> Reply:
    """A reply the model generated, taken apart (never call this on user or tool text: see the
    module docstring). Valid calls leave the content; a malformed block (bad JSON, unknown tool
    when `tool_names` is given, no closing marker) stays in the content as text."""
    reasoning, content = None, text
    if THINK_CLOSE in text:
        reasoning, content = split_thinking(text)
    elif text.lstrip().startswith(THINK_OPEN):  # cut off while thinking: all of it is reasoning
        reasoning, content = text.lstrip()[len(THINK_OPEN):].strip("\n"), ""
    reply = Reply(content=content, reasoning=reasoning)
    if not parse_calls or TOOL_CALL_OPEN not in content:
        return reply
    kept, position = [], 0
    for match in _CALL.finditer(content):
        call = read_call(match.group(1), tool_names)
        kept.append(content[position:match.start()])
        if isinstance(call, ToolCall):
            reply.tool_calls.append(call)
        else:
            reply.malformed.append(f"{match.group(0)[:200]}: {call}")
            kept.append(match.group(0))
        position = match.end()
    kept.append(content[position:])
    reply.content = "".join(kept).strip() if reply.tool_calls else content
    if TOOL_CALL_OPEN in content[position:]:
        reply.malformed.append("a <tool_call> without its closing </tool_call>")
    return reply


class ReplyStream:
    """parse_reply as the text arrives, for streaming: push() pieces of a generated reply and get
    events back, ("reasoning", text), ("content", text) and ("tool_call", ToolCall); finish()
    flushes what is held. Text that may be the start of a marker is held until it is known not
    to be; a <tool_call> block is held until its </tool_call> and then becomes a call, or content
    when malformed (as parse_reply decides). Whitespace before a call is not sent as content.

    `thinking` says whether a reply may open with <think> (not when the prompt already closed it)."""

    def __init__(self, tool_names: set[str] | None = None, parse_calls: bool = True, thinking: bool = True):
        self.tool_names, self.parse_calls = tool_names, parse_calls
        self.state = "start" if thinking else "content"
        self.buffer, self.gap = "", ""
        self.reasoning_sent = False
        self.calls: list[ToolCall] = []
        self.malformed: list[str] = []

    def push(self, piece: str) -> list[tuple[str, Any]]:
        self.buffer += piece
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, Any]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        while True:
            before = (self.state, len(self.buffer))
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buffer, self.state = stripped[len(THINK_OPEN):].lstrip("\n"), "reasoning"
                elif final or (stripped and not THINK_OPEN.startswith(stripped)):
                    self.state = "content"
            elif self.state == "reasoning":
                if not self.reasoning_sent:
                    self.buffer = self.buffer.lstrip("\n")
                if THINK_CLOSE in self.buffer:
                    reasoning, self.buffer = self.buffer.split(THINK_CLOSE, 1)
                    events.append(("reasoning", reasoning.rstrip("\n")))
                    self.state = "after_think"
                else:
                    keep = len(self.buffer) if final else _held(self.buffer, THINK_CLOSE, strip="\n")
                    events.append(("reasoning", self.buffer[:keep]))
                    self.reasoning_sent = self.reasoning_sent or keep > 0
                    self.buffer = self.buffer[keep:]
            elif self.state == "after_think":
                self.buffer = self.buffer.lstrip("\n")
                if self.buffer or final:
                    self.state = "content"
            elif self.state == "content":
                opened = self.buffer.find(TOOL_CALL_OPEN) if self.parse_calls else -1
                if opened >= 0:
                    text, self.buffer, self.state = self.buffer[:opened], self.buffer[opened:], "call"
                    sent = text.rstrip() if not self.calls else text.strip()
                    self.gap = text[len(text.rstrip()):]  # sent only if the block is no call
                    events.append(("content", sent))
                else:
                    keep = len(self.buffer) if final else _held(self.buffer, TOOL_CALL_OPEN if self.parse_calls
                                                                else None, strip=" \n\t")
                    text, self.buffer = self.buffer[:keep], self.buffer[keep:]
                    events.append(("content", text.lstrip() if self.calls else text))
            elif self.state == "call":
                closed = self.buffer.find(TOOL_CALL_CLOSE)
                if closed >= 0 or final:
                    end = closed + len(TOOL_CALL_CLOSE) if closed >= 0 else len(self.buffer)
                    block, self.buffer = self.buffer[:end], self.buffer[end:]
                    call = read_call(block[len(TOOL_CALL_OPEN):-len(TOOL_CALL_CLOSE)].strip(), self.tool_names) \
                        if closed >= 0 else "a <tool_call> without its closing </tool_call>"
                    if isinstance(call, ToolCall):
                        self.calls.append(call)
                        events.append(("tool_call", call))
                    else:
                        self.malformed.append(f"{block[:200]}: {call}")
                        events.append(("content", self.gap + block))
                    self.state = "content"
            if (self.state, len(self.buffer)) == before:
                break
        return [(kind, data) for kind, data in events if data != ""]


def _held(text: str, marker: str | None, strip: str) -> int:
    """How much of `text` can be sent now: all but a tail that may begin `marker`, and (for
    content) trailing whitespace, which is sent once text follows it."""
    keep = len(text)
    if marker:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-size:]):
                keep = len(text) - size
                break
    return len(text[:keep].rstrip(strip))
