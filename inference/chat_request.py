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
from dataclasses import dataclass, field
from typing import Any

from inference.inference import REPETITION_PENALTY_RANGE, TEMPERATURE_RANGE, TOP_P_RANGE, Chat, PromptTooLong
from model.tokenizer import CHAT_ROLES

MAX_STOP_STRINGS = 4
MAX_INTEGER_DIGITS = 40  # seeds reach 2**64 (20 digits); longer integers are refused unparsed
TRUNCATION = ("disabled", "auto")  # what to do with a prompt longer than the context: 400, or drop old turns
# Request fields accepted and ignored (bookkeeping that does not change the answer).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
KNOWN_FIELDS = {"messages", "model", "stream", "stream_options", "temperature", "top_p", "top_k",
                "repetition_penalty", "max_tokens", "max_completion_tokens", "stop", "seed", "n", "ignore_eos",
                "frequency_penalty", "presence_penalty", "logprobs", "truncation"} | IGNORED_FIELDS


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
    """The request's messages as {"role", "content"} dicts with our roles (developer -> system),
    within the limits on how many and how many characters."""
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
                               "user, assistant (tool and function messages are not supported)", where + ".role")
        content = _text_content(message.get("content"), where)
        chars += len(content)
        if chars > limits.max_chars:
            raise RequestError(f"the messages hold more than {limits.max_chars} characters, the most this server "
                               "takes in one request (--max-chars)", "messages", "string_above_max_length")
        parsed.append({"role": role, "content": content})
    return parsed


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
