"""The body of a POST /v1/chat/completions request: decoded, bounded and validated.

    settings = parse_request(decode_json(raw_bytes), "etude_sft_model", Limits())

Pure functions with no HTTP and no model in them, so the server, a batching engine or a test
can use them alike. Everything a client can send ends here as Settings or as RequestError (an
OpenAI-style 4xx); nothing else escapes, and nothing a client sent is echoed back unbounded or
in a form that cannot be encoded (a lone surrogate in a key, say).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from inference.inference import REPETITION_PENALTY_RANGE, TEMPERATURE_RANGE, TOP_P_RANGE, Chat, PromptTooLong
from model.chat_markup import TOOL_CALL_OPEN, call_text
from model.tokenizer import CHAT_ROLES, not_text

MAX_STOP_STRINGS = 4
MAX_INTEGER_DIGITS = 40  # seeds reach 2**64 (20 digits); longer integers are refused unparsed
TRUNCATION = ("disabled", "auto")  # what to do with a prompt longer than the context: 400, or drop old turns
# Request fields accepted and ignored (bookkeeping that does not change the answer).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
KNOWN_FIELDS = {"messages", "model", "stream", "stream_options", "temperature", "top_p", "top_k",
                "repetition_penalty", "max_tokens", "max_completion_tokens", "stop", "seed", "n", "ignore_eos",
                "frequency_penalty", "presence_penalty", "logprobs", "truncation", "tools", "tool_choice",
                "chat_template_kwargs"} | IGNORED_FIELDS
MAX_TOOLS = 64
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Limits:
    """What one request may hold, and how long its client may take to send it."""

    # json.loads holds the GIL: 1 MiB of small JSON objects parses in ~30 ms, 4 MiB in ~120 ms
    # during which the event loop (GET /health included) waits; a chat needs far less.
    max_body_bytes: int = 1 << 20
    max_messages: int = 2048  # OpenAI's own limit
    max_chars: int = 500_000
    header_timeout: float = 10.0
    body_timeout: float = 30.0


class RequestError(ValueError):
    """A request the server refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def shown(value: Any, limit: int = 60) -> str:
    """A client's value as it may appear in an error message: JSON with non-ASCII escaped (so a
    lone surrogate stays printable), strings cut to `limit` characters, containers named."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str) and len(value) > limit:
        return json.dumps(value[:limit])[:-1] + '..."'
    return json.dumps(value)


# ---- bytes to JSON -------------------------------------------------------------------------

def _bounded_integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise RequestError(f"the body holds an integer of {len(digits)} digits; none here needs more than "
                           f"{MAX_INTEGER_DIGITS}", code="invalid_json")
    return int(digits)


def decode_json(raw: bytes) -> Any:
    """The request body's JSON. Bad JSON, deep nesting (past Python's recursion limit, about
    1,000 levels) and huge integers are RequestErrors."""
    try:
        return json.loads(raw, parse_int=_bounded_integer)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("the request body is nested too deeply to be a chat request",
                           code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError among them
        raise RequestError(f"the request body is not valid JSON ({str(exc)[:200]})", code="invalid_json") from None


# ---- fields --------------------------------------------------------------------------------

def _number(body: dict, name: str, low: float, high: float, *, allow_zero: bool = False) -> float | None:
    """body[name] as a float in [low, high] (or exactly 0 with allow_zero); None when absent."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {shown(value)}", name, "invalid_type")
    if allow_zero and value == 0:
        return 0.0
    if not math.isfinite(value) or not low <= value <= high:
        zero = " or 0" if allow_zero else ""
        raise RequestError(f"{name} must be in [{low:g}, {high:g}]{zero}, got {shown(value)}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {shown(value)}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"{name} must be {bound}, got {value}", name, "invalid_value")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {shown(value)}", name, "invalid_type")
    return value


def _text_content(content: Any, where: str) -> str:
    """OpenAI content is a string or a list of parts; only text parts mean anything here."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"{where}.content must be a string or a list of text parts "
                       '({"type": "text", "text": "..."}); this model reads text only', where + ".content")


def parse_messages(messages: Any, limits: Limits = Limits()) -> list[dict]:
    """The request's messages with our roles (developer -> system): {"role", "content"} dicts,
    assistant ones with their tool_calls and reasoning_content when given; within the limits on
    how many and how many characters. Tool call arguments must be a JSON object's text."""
    if messages is None:
        raise RequestError('missing "messages": give a list of {"role": ..., "content": ...} objects',
                           "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects',
                           "messages", "invalid_value")
    if len(messages) > limits.max_messages:  # checked before any message is looked at
        raise RequestError(f"{len(messages)} messages is more than this server takes in one request "
                           f"({limits.max_messages}, --max-messages)", "messages", "array_above_max_length")
    parsed, chars = [], 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", where)
        role = "system" if message.get("role") == "developer" else message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise RequestError(f"{where}.role {shown(message.get('role'))} is not one of system, developer, "
                               "user, assistant, tool (function messages are not supported: send tool "
                               "results as role tool)", where + ".role")
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls is not None or (role == "assistant" and message.get("content") is None):
            calls = _tool_calls(calls, where)
        content = "" if calls and message.get("content") is None else _text_content(message.get("content"), where)
        parsed_message = {"role": role, "content": content}
        chars += len(content)
        if calls:
            parsed_message["tool_calls"] = calls
            chars += sum(len(c["function"]["name"]) + len(c["function"]["arguments"]) for c in calls)
        reasoning = message.get("reasoning_content") if role == "assistant" else None
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise RequestError(f"{where}.reasoning_content must be a string", where + ".reasoning_content")
            parsed_message["reasoning_content"] = reasoning
            chars += len(reasoning)
        if chars > limits.max_chars:
            raise RequestError(f"the messages hold more than {limits.max_chars} characters, the most this server "
                               "takes in one request (--max-chars)", "messages", "string_above_max_length")
        parsed.append(parsed_message)
    return parsed


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls, checked: [{"id", "type": "function", "function":
    {"name", "arguments": a JSON object's text}}, ...]."""
    shape = '[{"id": "...", "type": "function", "function": {"name": "...", "arguments": "{...}"}}]'
    if not isinstance(calls, list) or not calls:
        raise RequestError(f"{where} is an assistant message without content, so it needs tool_calls: {shape}",
                           where + ".tool_calls")
    checked = []
    for number, call in enumerate(calls):
        at = f"{where}.tool_calls[{number}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{at} must be {shape[1:-1]}", at)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments_value = json.loads(arguments)
            except ValueError as exc:
                raise RequestError(f"{at}.function.arguments is not valid JSON ({exc}); send the arguments "
                                   'object as JSON text, e.g. "{\"expression\": \"2 + 2\"}"',
                                   at + ".function.arguments") from None
        else:
            arguments_value = arguments
        if not isinstance(arguments_value, dict):
            raise RequestError(f"{at}.function.arguments must be a JSON object (as text), got "
                               f"{shown(arguments_value)}", at + ".function.arguments")
        call_id = call.get("id")
        checked.append({"id": call_id if isinstance(call_id, str) else f"call_{number}", "type": "function",
                        "function": {"name": function["name"],
                                     "arguments": arguments if isinstance(arguments, str)
                                     else json.dumps(arguments, ensure_ascii=False)}})
    return checked


def parse_tools(tools: Any) -> list[dict] | None:
    """The request's tools, checked: [{"type": "function", "function": {"name", "description"
    (optional), "parameters" (optional JSON schema object)}}, ...]; None when absent or empty."""
    if tools is None or tools == []:
        return None
    shape = '{"type": "function", "function": {"name": "...", "description": "...", "parameters": {...}}}'
    if not isinstance(tools, list):
        raise RequestError(f"tools must be a list of {shape}", "tools", "invalid_type")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"{len(tools)} tools is more than this server takes ({MAX_TOOLS})", "tools",
                           "array_above_max_length")
    checked, names = [], set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise RequestError(f"{where} must be {shape} (only function tools are supported)", where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise RequestError(f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got {shown(name)}",
                               where + ".function.name")
        if name in names:
            raise RequestError(f"{where}: two tools are named {json.dumps(name)}; give each a name of its own",
                               where + ".function.name")
        names.add(name)
        description, parameters = function.get("description"), function.get("parameters")
        if description is not None and not isinstance(description, str):
            raise RequestError(f"{where}.function.description must be a string", where + ".function.description")
        if parameters is not None and not isinstance(parameters, dict):
            raise RequestError(f"{where}.function.parameters must be a JSON schema object", where + ".function.parameters")
        if any(not_text(text) for text in (name, description or "")):
            raise RequestError(f"{where}.function holds text that is not UTF-8 (a lone surrogate)", where)
        checked.append({"type": "function", "function": {k: v for k, v in function.items()
                                                         if k in ("name", "description", "parameters")}})
    return checked


def parse_tool_choice(choice: Any, tools: list[dict] | None) -> str | dict:
    """"none", "auto", "required" or {"type": "function", "function": {"name": ...}} naming one of
    the tools. Without tools only "none" (or nothing) makes sense."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in TOOL_CHOICES:
        if choice != "none" and not tools:
            raise RequestError(f'tool_choice {json.dumps(choice)} needs tools; send "tools": [...] too, or drop '
                               "tool_choice", "tool_choice")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                           f'{{"name": ...}}}}, got {shown(choice)}', "tool_choice", "invalid_value")
    if name not in {t["function"]["name"] for t in tools or []}:
        raise RequestError(f"tool_choice names the function {shown(name)}, which is not among the tools "
                           f"({', '.join(t['function']['name'] for t in tools or []) or 'none given'})",
                           "tool_choice", "invalid_value")
    return {"type": "function", "function": {"name": name}}


@dataclass
class Settings:
    """What one request asks for, validated; None means the server's default."""

    messages: list[dict]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    truncation: str | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict = "none"
    enable_thinking: bool | None = None

    @property
    def reply_prefix(self) -> str:
        """The text a forced call makes the reply start with: the call's opening, up to the
        function's name ("required") or its arguments (a named function)."""
        if self.tool_choice == "required":
            return TOOL_CALL_OPEN + '\n{"name": "'
        if isinstance(self.tool_choice, dict):
            return call_text(self.tool_choice["function"]["name"], "").split(', "arguments": ')[0] + ', "arguments":'
        return ""


def parse_request(body: Any, model_name: str, limits: Limits = Limits()) -> Settings:
    """Validate a /v1/chat/completions body; raises RequestError naming the faulty field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in KNOWN_FIELDS and body[k] is not None)
    if unknown:
        names = ", ".join(shown(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise RequestError(f"unsupported parameter(s): {names}. Supported: {', '.join(sorted(KNOWN_FIELDS))}",
                           shown(unknown[0])[1:-1], "unsupported_parameter")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(f"the model {shown(model)} does not exist here; this server serves "
                           f"{json.dumps(model_name)} (see GET /v1/models)", "model", "model_not_found", status=404)
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(f"{name} is not supported (only 0); use repetition_penalty instead", name,
                               "unsupported_parameter")
    if body.get("logprobs") not in (None, False):
        raise RequestError("logprobs are not supported", "logprobs", "unsupported_parameter")
    if _integer(body, "n", 1) not in (None, 1):
        raise RequestError(f"n must be 1 (one answer per request), got {body['n']}", "n", "invalid_value")
    settings = Settings(messages=parse_messages(body.get("messages"), limits))
    settings.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not settings.stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError('stream_options must be {"include_usage": true|false}', "stream_options")
        settings.include_usage = _boolean(options, "include_usage")
    settings.temperature = _number(body, "temperature", *TEMPERATURE_RANGE, allow_zero=True)
    settings.top_p = _number(body, "top_p", *TOP_P_RANGE)
    settings.top_k = _integer(body, "top_k", 0)
    settings.repetition_penalty = _number(body, "repetition_penalty", *REPETITION_PENALTY_RANGE)
    limit = _integer(body, "max_completion_tokens", 1)
    settings.max_tokens = limit if limit is not None else _integer(body, "max_tokens", 1)
    settings.seed = _integer(body, "seed", -2**63, 2**64 - 1)
    settings.ignore_eos = _boolean(body, "ignore_eos")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
                or len(stops) > MAX_STOP_STRINGS:
            raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                               "non-empty strings", "stop", "invalid_value")
        settings.stop = stops
    truncation = body.get("truncation")
    if truncation is not None and truncation not in TRUNCATION:
        raise RequestError(f'truncation must be "auto" (drop the oldest turns of a history longer than the '
                           f'context) or "disabled" (refuse it), got {shown(truncation)}', "truncation",
                           "invalid_value")
    settings.truncation = truncation
    settings.tools = parse_tools(body.get("tools"))
    settings.tool_choice = parse_tool_choice(body.get("tool_choice"), settings.tools)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict) or set(kwargs) - {"enable_thinking"}:
            raise RequestError('chat_template_kwargs must be {"enable_thinking": true|false} (the one template '
                               "variable this server takes)", "chat_template_kwargs")
        if "enable_thinking" in kwargs and kwargs["enable_thinking"] is not None:
            settings.enable_thinking = _boolean(kwargs, "enable_thinking")
    return settings


def prepare_prompt(chat: Chat, settings: Settings, truncation: str = "disabled") -> tuple[list[int], str | None]:
    """The prompt ids of a validated request and a note on what was dropped (see
    inference.fit_to_context): the slow part, tokenizing, so run it off an event loop.
    `truncation` applies when the request does not say."""
    trim = (settings.truncation or truncation) == "auto"
    try:
        return chat.prompt_ids(settings.messages, trim=trim)
    except PromptTooLong as exc:
        hint = "" if trim else '; or send "truncation": "auto" to drop the oldest turns instead'
        raise RequestError(f"{exc}{hint}", "messages", "context_length_exceeded") from None
    except ValueError as exc:  # what validate_messages refuses (a lone surrogate in a message)
        raise RequestError(str(exc)[:300], "messages") from None
