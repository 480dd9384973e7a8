"""The Etude tokenizer: load the trained byte-level BPE and render chats to ids plus a loss mask.

    from model.tokenizer import load_tokenizer
    tok = load_tokenizer()                      # weight/tokenizer/tokenizer.json
    ids = tok.encode("Hello")                   # special-token strings stay plain text
    ids, mask = tok.render_chat([{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello!"}])

Chat format (ChatML), one block per message:

    <|im_start|>{role}\\n{content}<|im_end|>\\n

and `<|im_start|>assistant\\n` as the generation prompt. Tool lists, tool calls, `tool` results and
<think> reasoning are written into the blocks' text as model/chat_markup.py documents (roles
system, user, assistant, tool). CHAT_TEMPLATE is the same format in Jinja, stored in
tokenizer_config.json so that `transformers` renders identical ids (a tokenizer trained before
tools were added holds the plain ChatML template; tool/convert_hf.py exports the current one).

Only `tokenizers` and the standard library are imported here (no torch), so data tools and
servers can tokenize cheaply.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from config import ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS, TOKENIZER_DIR
from model.chat_markup import JINJA_TEMPLATE, NO_THINKING, THINK_CLOSE, plain_messages

TOKENIZER_FILE = "tokenizer.json"
CHAT_ROLES = ("system", "user", "assistant", "tool")
TRAIN_TOKENIZER_COMMAND = "python train/train_tokenizer.py all"

# The Jinja twin of EtudeTokenizer.render_chat (tool lists, tool calls and thinking included, see
# model/chat_markup.py); tests hold the two to the same ids.
CHAT_TEMPLATE = JINJA_TEMPLATE

def not_text(text: str) -> str | None:
    """Why a str is not text the tokenizer can encode (None when it is): a lone surrogate, which
    valid JSON can hold ("\\ud800" escaped without its pair) and the tokenizer refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone surrogate (U+{ord(text[exc.start]):04X} at character {exc.start}), which is "
                "not text; remove it or pair it")
    return None


def validate_messages(messages: Any, *, require_assistant: bool = False) -> None:
    """Check that `messages` is a non-empty list of {"role", "content"} dicts with roles
    system/user/assistant and string content. Raises ValueError naming the first fault.
    Extra keys in a message are allowed and ignored. With require_assistant, a conversation
    without an assistant message (nothing to train on) is rejected too."""
    if not isinstance(messages, list):
        raise ValueError(f'messages must be a list of {{"role": ..., "content": ...}} objects, '
                         f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; a conversation needs at least one message")
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise ValueError(f'{where}: expected an object {{"role": ..., "content": ...}}, '
                             f"got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f'{where}: missing "{key}" (keys present: {sorted(message)})')
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where} ({role}): content must be a string, got {type(content).__name__}")
        problem = not_text(content)
        if problem:
            raise ValueError(f"{where} ({role}): content {problem}")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: there is nothing to learn from this conversation")


def as_plain(messages: Any, tools: list[dict] | None = None) -> Any:
    """Messages with tool calls, tool lists and reasoning written into their content
    (chat_markup.plain_messages); anything that is not a list of messages is left for
    validate_messages to name."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return messages
    if not tools and not any(m.get("tool_calls") or m.get("reasoning_content") is not None
                             or (m.get("role") == "assistant" and THINK_CLOSE in str(m.get("content")))
                             for m in messages):
        return messages  # plain chat: as it always was (and no copy)
    return plain_messages(messages, tools)


class EtudeTokenizer:
    """A trained `tokenizers.Tokenizer` with the Etude special tokens at ids 0, 1, 2.

    Plain-text encoding never turns special-token strings into special ids (the wrapped
    tokenizer has `encode_special_tokens` set), so text a user types cannot forge a turn
    boundary; special ids enter only through render_chat, or by the caller appending them."""

    def __init__(self, tokenizer: Tokenizer, path: Path | str | None = None):
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            found = tokenizer.token_to_id(token)
            if found != expected_id:
                raise ValueError(
                    f"tokenizer{f' at {path}' if path else ''} has {token} at id {found}, expected "
                    f"{expected_id}: it was not trained by train/train_tokenizer.py. Retrain it with "
                    f"`{TRAIN_TOKENIZER_COMMAND}`."
                )
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.path = Path(path) if path is not None else None
        self._newline_ids = self.encode("\n")
        self._token_bytes: list[int] | None = None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """A short hash of what decides the ids: the vocabulary, the merges and the added tokens
        (not the file's formatting), so two tokenizers of one size but other vocabularies differ."""
        data = json.loads(self._tokenizer.to_str())
        model = data.get("model") or {}
        added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
        # merges are "a b" strings in older `tokenizers` files and [a, b] pairs in newer ones
        merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges") or []]
        key = json.dumps([model.get("vocab"), merges, added], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]

    @property
    def eos_id(self) -> int:
        """<|endoftext|>: ends (and separates) pretraining documents; also the padding id."""
        return SPECIAL_TOKENS.index(ENDOFTEXT)

    @property
    def pad_id(self) -> int:
        return self.eos_id

    @property
    def im_start_id(self) -> int:
        return SPECIAL_TOKENS.index(IM_START)

    @property
    def im_end_id(self) -> int:
        """<|im_end|>: ends a chat turn, so chat generation stops on it."""
        return SPECIAL_TOKENS.index(IM_END)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, special-token strings included as plain text; no BOS/EOS added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """encode() over many texts at once, in parallel inside `tokenizers` (for caching corpora)."""
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def to_str(self) -> str:
        """The tokenizer as its tokenizer.json text (identifies the exact vocabulary and merges)."""
        return self._tokenizer.to_str()

    def token_bytes(self) -> list[int]:
        """UTF-8 length in bytes of each token id's text, 0 for special tokens. Dividing a summed
        loss by the summed bytes of the targets gives bits per byte, a measure that does not
        depend on the tokenizer."""
        if self._token_bytes is None:
            byte_chars = set(ByteLevel.alphabet())
            specials = {i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special}
            sizes = []
            for token_id in range(self.vocab_size):
                if token_id in specials:
                    sizes.append(0)
                    continue
                token = self._tokenizer.id_to_token(token_id)
                # Byte-level BPE spells every byte as one printable character.
                if not set(token) <= byte_chars:
                    raise ValueError(f"token {token_id} ({token!r}) is not byte-level: this tokenizer "
                                     f"was not trained by train/train_tokenizer.py")
                sizes.append(len(token))
            self._token_bytes = sizes
        return list(self._token_bytes)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None, enable_thinking: bool | None = None,
                    reply_prefix: str = "") -> tuple[list[int], list[int]]:
        """Token ids of a conversation in ChatML and its training mask: 1 on assistant content
        and the <|im_end|> that closes it, 0 elsewhere (<|im_start|>assistant\\n, the newline
        after <|im_end|>, system and user turns, the generation prompt).

        Each message's "role\\ncontent" is encoded in one piece, exactly the text that the chat
        template hands to the tokenizer between two special tokens, so the ids equal
        `apply_chat_template` for any content free of special-token strings.

        `tools` (OpenAI's list of {"type": "function", "function": {...}}) is written into a system
        block; assistant messages may carry `tool_calls` and `reasoning_content`, and `tool` messages
        hold results (model/chat_markup.py). enable_thinking=False ends the generation prompt with
        an empty <think></think> block so that the model answers without reasoning; True or None
        leaves the choice to the model. Both are the template's variables of the same names.
        `reply_prefix` is text the reply starts with, after the generation prompt (a tool call
        forced by the server), encoded with it as one piece like an assistant message's text."""
        return self.render_chats([messages], add_generation_prompt, tools, enable_thinking, reply_prefix)[0]

    def render_chats(self, conversations: list[list[dict[str, Any]]], add_generation_prompt: bool = False,
                     tools: list[dict] | None = None, enable_thinking: bool | None = None,
                     reply_prefix: str = "") -> list[tuple[list[int], list[int]]]:
        """render_chat() over many conversations, their messages encoded in one parallel batch
        (what the SFT token cache is built with)."""
        conversations = [as_plain(messages, tools) for messages in conversations]
        for messages in conversations:
            validate_messages(messages)
        texts = [f"{m['role']}\n{m['content']}" for messages in conversations for m in messages]
        encodings = iter(self._tokenizer.encode_batch(texts, add_special_tokens=False))
        newline = self._newline_ids
        rendered = []
        for messages in conversations:
            ids: list[int] = []
            mask: list[int] = []
            for message in messages:
                encoding = next(encodings)
                trained = 1 if message["role"] == "assistant" else 0
                # A token that reaches into the content is the model's to produce; the ones that
                # end within "role\n" lead the encoding (offsets only grow).
                header_chars, n_header = len(message["role"]) + 1, 0
                for _, end in encoding.offsets:
                    if end > header_chars:
                        break
                    n_header += 1
                body = encoding.ids
                ids += [self.im_start_id, *body, self.im_end_id, *newline]
                mask += [0] * (1 + n_header) + [trained] * (len(body) - n_header + 1) + [0] * len(newline)
            if add_generation_prompt:
                thinking_off = NO_THINKING if enable_thinking is False else ""
                prompt = [self.im_start_id] + self.encode("assistant\n" + thinking_off + reply_prefix)
                ids += prompt
                mask += [0] * len(prompt)
            rendered.append((ids, mask))
        return rendered

    def __repr__(self) -> str:
        return f"EtudeTokenizer(vocab_size={self.vocab_size}, path={str(self.path) if self.path else None!r})"


def load_tokenizer(path: Path | str = TOKENIZER_DIR) -> EtudeTokenizer:
    """Load the tokenizer from a folder holding tokenizer.json (weight/tokenizer/ or a model
    folder), or from the tokenizer.json file itself."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path} ({file.name} is missing). Train one with "
            f"`{TRAIN_TOKENIZER_COMMAND}` (it needs the data from `python tool/prepare_data.py`), "
            "or pass the folder that holds tokenizer.json."
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise ValueError(f"cannot read tokenizer {file}: {exc}. The file is corrupted or not a "
                         f"`tokenizers` file; retrain it with `{TRAIN_TOKENIZER_COMMAND}`.") from None
    return EtudeTokenizer(tokenizer, path=file.parent)
