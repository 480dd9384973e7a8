"""Chat with an Etude model folder.

    python inference/inference.py                          # interactive, streamed, multi-turn
    python inference/inference.py --prompt "Hello!"        # one answer, then exit
    python inference/inference.py --input q.jsonl --output a.jsonl --batch-size 16
    python inference/inference.py --lora identity          # with the LoRA adapter weight/lora/identity/
    python inference/inference.py --int8                   # CPU: int8 weights, 2-3x faster decoding
    python inference/inference.py --rope-scaling yarn:4    # a context four times the trained length
    python inference/inference.py --tools                  # with a calculator and the date, run as called
    python inference/inference.py --no-think               # answer without a <think> block

Loads weight/etude_sft_model/ by default (falling back to the pretrained model, with a note);
any model folder works with --model. Interactive commands: /reset (forget the conversation),
/system TEXT (set the system prompt and reset), /quit. Batch input lines are {"prompt": "..."} or
{"conversations"|"messages": [...]} (the next assistant turn is generated); each output line adds
"answer". Greedy decoding (--temperature 0) is deterministic, and a batch gives exactly the
answers that one-by-one generation gives.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from config import PRETRAINED_DIR, ROPE_SCALING_KEYS, SFT_DIR, parse_rope_scaling
from inference.engine import Engine, Request, StreamDecoder
from model.checkpoint import load_model_folder
from model.lora import load_adapter, merge_and_unload, resolve_adapter
from model.decoding import inference_dtype, merge_projections, pick_inference_device, quantize_int8
from model.model import EtudeModel
from model.builtin_tools import BUILTIN_TOOLS, ToolError, run_tool, tool_names
from model.chat_markup import parse_reply
from model.tokenizer import EtudeTokenizer, as_plain, load_tokenizer, not_text, validate_messages

COMMANDS = "/reset forgets the conversation, /system TEXT sets the system prompt, /quit leaves"
# A line like "/word ..." is a command; "//..." sends the text from its second slash on.
COMMAND = re.compile(r"/([A-Za-z]\w*)(?:\s+(.*))?", re.DOTALL)
# Sampling values that sample. Below these a float32 logit overflows to inf (temperature,
# repetition penalty) or top_p rounds to 0 and filters out every token: "probability tensor
# contains inf/nan". Temperature 0 is greedy decoding.
TEMPERATURE_RANGE = (1e-5, 2.0)
TOP_P_RANGE = (1e-6, 1.0)
REPETITION_PENALTY_RANGE = (0.01, 10.0)
ROPE_SCALING_HELP = (f"extend the context past the trained length: TYPE one of {', '.join(ROPE_SCALING_KEYS)}, "
                     "the context becomes FACTOR x the trained length (e.g. yarn:4; none for plain RoPE). "
                     "README 'Longer contexts' compares them")


def sampling_problems(temperature: float, top_p: float, top_k: int, repetition_penalty: float) -> list[str]:
    """What is wrong with command-line sampling values (the ranges above), all at once."""
    problems = []
    if temperature != 0 and not TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]:
        problems.append(f"--temperature must be 0 (greedy) or in [{TEMPERATURE_RANGE[0]:g}, "
                        f"{TEMPERATURE_RANGE[1]:g}], got {temperature}")
    for flag, value, (low, high) in (("--top-p", top_p, TOP_P_RANGE),
                                     ("--repetition-penalty", repetition_penalty, REPETITION_PENALTY_RANGE)):
        if not low <= value <= high:
            problems.append(f"{flag} must be in [{low:g}, {high:g}], got {value}")
    if top_k < 0:
        problems.append(f"--top-k must be >= 0, got {top_k}")
    return problems


class Chat:
    """A model, its tokenizer and sampling settings; renders conversations and generates the
    next assistant turn, dropping the oldest turns when the history outgrows the context."""

    def __init__(self, model: EtudeModel, tokenizer: EtudeTokenizer, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_k: int | None = 40, top_p: float | None = 0.9,
                 repetition_penalty: float = 1.1, seed: int | None = None, compile: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.compile = compile  # torch.compile the decoding step (model/decode_step.py)
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty)
        device = model.embed_tokens.weight.device
        self.generator = torch.Generator(device=device)
        # No seed: a fresh one each run (a bare Generator starts from the same fixed seed, so
        # every run would sample the same text).
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self.stop_ids = (tokenizer.im_end_id, tokenizer.eos_id)
        # Tools offered to the model (OpenAI's list), thinking (None: the model's choice, False:
        # off) and text that the reply is made to start with (a forced tool call): the template's
        # variables, set per chat (model/chat_markup.py).
        self.tools: list[dict] | None = None
        self.enable_thinking: bool | None = None
        self.reply_prefix = ""

    def prompt_ids(self, messages: list[dict], trim: bool = True) -> tuple[list[int], str | None]:
        """Ids of the conversation plus the generation prompt, fitted to the context (see
        fit_to_context; without `trim` a prompt that does not fit raises PromptTooLong). Tool
        calls, tool results and the tool list are written into the messages' text first, so the
        tool list stays with the system message when old turns are dropped."""
        tokenizer = self.tokenizer

        def render(plain: list[dict]) -> list[int]:
            return tokenizer.render_chat(plain, add_generation_prompt=True, enable_thinking=self.enable_thinking,
                                         reply_prefix=self.reply_prefix)[0]

        return fit_to_context(as_plain(messages, self.tools), render, self.model.config.max_seq_len,
                              self.max_new_tokens, trim=trim, max_token_chars=max(tokenizer.token_bytes()))

    def stream(self, messages: list[dict]) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are generated."""
        ids, note = self.prompt_ids(messages)
        if note:
            print(f"[note: {note}]", file=sys.stderr)
        decoder = StreamDecoder(self.tokenizer)
        for token in self.model.generate(ids, self.max_new_tokens, stop_ids=self.stop_ids,
                                         generator=self.generator, compile=self.compile, **self.sampling):
            if token in self.stop_ids:
                break
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def answer(self, messages: list[dict]) -> str:
        return "".join(self.stream(messages))

    def answer_batch(self, conversations: list[list[dict]], max_batch: int | None = None,
                     progress: Callable[[int], None] | None = None) -> list[str]:
        """Answers to many conversations, decoded together by the continuous-batching engine
        (inference/engine.py) in up to `max_batch` rows at once. Each answer samples with its own
        generator, seeded from this chat's, so a seeded batch gives the same answers every run;
        greedy answers equal what answer() gives one by one (see the engine on exactness).
        `progress(n)` is called as the n-th answer is done."""
        prompts = batch_prompts(self, conversations)
        engine = Engine(self.model, self.tokenizer, max_batch=min(max_batch or len(prompts), len(prompts)),
                        compile=self.compile)
        device, done = self.model.embed_tokens.weight.device, []

        def count_done(kind: str, data: dict) -> None:
            if kind == "done" and progress is not None:
                done.append(data)
                progress(len(done))

        requests = [Request(ids, self.max_new_tokens, torch.Generator(device).manual_seed(self.row_seed()),
                            stop_ids=self.stop_ids, emit=count_done, **self.sampling) for ids in prompts]
        engine.run(requests)
        return [self.tokenizer.decode([t for t in r.output_ids if t not in self.stop_ids]) for r in requests]

    def row_seed(self) -> int:
        """A seed for one row of a batch, drawn from this chat's generator (so --seed fixes them all)."""
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))


MAX_TOOL_ROUNDS = 4  # calls the model may make, one after another, before it must answer


def run_calls(calls: list, run: Callable[[str, str], str] = run_tool) -> list[dict]:
    """Tool messages answering `calls` (model/chat_markup.ToolCall): each result, or the error
    text for a call that cannot run, so that the model can read what went wrong."""
    results = []
    for call in calls:
        try:
            result = run(call.name, call.arguments)
        except ToolError as exc:
            result = f"error: {exc}"
        results.append({"role": "tool", "content": result})
    return results


def converse(chat: Chat, messages: list[dict], on_piece: Callable[[str], None] | None = None,
             on_call: Callable[[str, str, str], None] | None = None,
             run: Callable[[str, str], str] = run_tool) -> list[dict]:
    """The next assistant turn of `messages`, with the chat's tools run as the model calls them:
    reply -> calls -> results -> reply, at most MAX_TOOL_ROUNDS calls deep. Returns the messages
    it added (assistant turns with their tool_calls, tool results, the final answer). Only the
    model's own reply is parsed for calls (never the user's text); a malformed call stays text.
    `on_piece` gets the text as it streams, `on_call(name, arguments, result)` each call."""
    added: list[dict] = []
    names = tool_names(chat.tools) if chat.tools else None
    for round_ in range(MAX_TOOL_ROUNDS + 1):
        pieces = []
        for piece in chat.stream(messages + added):
            pieces.append(piece)
            if on_piece:
                on_piece(piece)
        reply = parse_reply("".join(pieces), names, parse_calls=bool(chat.tools))
        if not reply.tool_calls or round_ == MAX_TOOL_ROUNDS:
            added.append({"role": "assistant", "content": "".join(pieces)})
            return added
        calls = [{"id": f"call_{len(added)}_{i}", "type": "function",
                  "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(reply.tool_calls)]
        added.append({"role": "assistant", "content": reply.content, "tool_calls": calls})
        for call, result in zip(reply.tool_calls, run_calls(reply.tool_calls, run)):
            if on_call:
                on_call(call.name, call.arguments, result["content"])
            added.append(result)
    return added


class PromptTooLong(ValueError):
    """A prompt that does not fit the context with room for the answer. `tokens` is its size
    (a lower bound, counted from its characters, when `exact` is False)."""

    def __init__(self, tokens: int, room: int, context: int, exact: bool = True, what: str = "the prompt"):
        self.tokens, self.room, self.context, self.exact = tokens, room, context, exact
        super().__init__(f"{what} is {'' if exact else 'at least '}{tokens} tokens, but the model's {context}-token "
                         f"context leaves {room} for the prompt (the rest is kept for the answer); shorten the "
                         "messages or ask for fewer new tokens")


def fit_to_context(messages: list[dict], render: Callable[[list[dict]], list[int]], context: int,
                   max_new_tokens: int, *, trim: bool = True,
                   max_token_chars: int | None = None) -> tuple[list[int], str | None]:
    """Ids of the conversation plus the generation prompt (`render` makes them), fitted to the
    context with room to answer. Returns the ids and a note saying what was dropped (None if
    nothing); shared with inference/hf.py and the server, so all of them trim a history alike.

    Without `trim`, a prompt that does not fit raises PromptTooLong. With it, the oldest
    non-system turns go first, then the start of the last turn's text; the system message and
    the template's markers are never cut (PromptTooLong if they alone do not fit).

    The work is linear in the request: one render when the prompt fits, else a binary search
    over how many turns to drop (each probe renders only what would be kept). `max_token_chars`
    (the most characters one token can stand for) makes it bounded by the context instead:
    turns that cannot fit by their character count alone are dropped (or refused) before
    anything is tokenized."""
    validate_messages(messages)
    room = context - min(max_new_tokens, context // 2)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    first, cut = 0, 0  # turns[:first] are dropped, and the first `cut` characters of the turn after them
    too_many_chars = False
    if max_token_chars:
        budget = room * max_token_chars  # a prompt of more characters cannot fit in `room` tokens
        chars = sum(len(m["content"]) for m in messages)
        if chars > budget and (not trim or not turns):
            raise PromptTooLong(-(-chars // max_token_chars), room, context, exact=False)
        while first < len(turns) - 1 and chars > budget:
            chars -= len(turns[first]["content"])
            first += 1
        too_many_chars = chars > budget
    ids = [] if too_many_chars else render(system + turns[first:])
    if len(ids) > room and (not trim or not turns):
        raise PromptTooLong(len(ids), room, context)
    if too_many_chars or len(ids) > room:
        last = [] if too_many_chars else render(system + turns[-1:])
        if last and len(last) <= room:  # drop whole turns: the fewest that make it fit
            unfit, fit = first, len(turns) - 1
            ids = last
            while fit - unfit > 1:
                middle = (unfit + fit) // 2
                probe = render(system + turns[middle:])
                if len(probe) <= room:
                    fit, ids = middle, probe
                else:
                    unfit = middle
            first = fit
        else:  # the last turn alone is too long: it keeps its end
            first = len(turns) - 1
            cut, ids = _keep_end(system, turns[-1], render, room, context, max_token_chars)
    note = None
    if first or cut:
        dropped = [f"the {first} oldest message(s)"] if first else []
        dropped += [f"the first {cut} characters of the last message"] if cut else []
        note = f"dropped {' and '.join(dropped)} to fit the {context}-token context"
    return ids, note


def _keep_end(system: list[dict], message: dict, render: Callable[[list[dict]], list[int]], room: int,
              context: int, max_token_chars: int | None) -> tuple[int, list[int]]:
    """How many leading characters of `message`'s text to cut so that it fits after the system
    message, and the ids then; a binary search over the cut, each probe one render."""
    content = message["content"]

    def rendered(cut: int) -> list[int]:
        return render(system + [{**message, "content": content[cut:]}])

    fit, ids = len(content), rendered(len(content))
    if len(ids) > room:
        raise PromptTooLong(len(ids), room, context, what="the system message with the template's markers")
    unfit = -1
    if max_token_chars:  # fewer characters than this cannot be cut and fit
        unfit = max(-1, len(content) - room * max_token_chars - 1)
    while fit - unfit > 1:
        middle = (unfit + fit) // 2
        probe = rendered(middle)
        if len(probe) <= room:
            fit, ids = middle, probe
        else:
            unfit = middle
    return fit, ids


def batch_prompts(chat, conversations: list[list[dict]]) -> list[list[int]]:
    """Prompt ids for each conversation (through `chat.prompt_ids`), noting trimmed histories."""
    prompts = []
    for messages in conversations:
        ids, note = chat.prompt_ids(messages)
        if note:
            print(f"[note: {note}]", file=sys.stderr)
        prompts.append(ids)
    return prompts


def resolve_model_folder(requested: str | None) -> Path:
    """--model, or the SFT model, or (with a note) the pretrained one."""
    if requested:
        folder = Path(requested)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no model folder at {folder} (config.json missing)")
        return folder
    if (SFT_DIR / "config.json").is_file():
        return SFT_DIR
    if (PRETRAINED_DIR / "config.json").is_file():
        print(f"[note: no fine-tuned model in {SFT_DIR}; using the pretrained model, which continues "
              "text rather than chatting. Run `python train/train_sft.py` for a chat model.]", file=sys.stderr)
        return PRETRAINED_DIR
    raise FileNotFoundError(f"no model found in {SFT_DIR} or {PRETRAINED_DIR}; train one with "
                            "`python train/train_pretrain.py` and `python train/train_sft.py`, or pass --model")


def apply_rope_scaling(model: EtudeModel, spec: str | None) -> None:
    """--rope-scaling TYPE:FACTOR: scale the model's RoPE past its trained length, so its usable
    context becomes FACTOR x that length (none: back to plain RoPE at the trained length)."""
    if spec is None:
        return
    before = model.config.max_seq_len
    model.set_rope_scaling(*parse_rope_scaling(spec))
    print(f"[RoPE scaling {spec}: context {before} -> {model.config.max_seq_len} tokens (trained at "
          f"{model.config.trained_seq_len})]", file=sys.stderr)


def build_chat(args: argparse.Namespace) -> Chat:
    folder = resolve_model_folder(args.model)
    tokenizer = load_tokenizer(folder)
    device = pick_inference_device(args.device)
    model = load_model_folder(folder)
    apply_rope_scaling(model, getattr(args, "rope_scaling", None))
    if args.lora:  # applied unmerged to the fp32 weights, before any cast (see model/lora.py)
        load_adapter(model, resolve_adapter(args.lora))
    if getattr(args, "int8", False):
        if args.dtype != "auto":
            raise ValueError("--int8 decodes with int8 weights and fp32 activations; drop --dtype")
        if device.type != "cpu":
            raise ValueError(f"--int8 is for decoding on the CPU, and the device is {device}; "
                             "drop --int8 (a GPU decodes in bf16) or pass --device cpu")
        if args.lora:
            merge_and_unload(model)  # int8 holds plain weights: fold the adapter in first
        model = quantize_int8(model)
    else:
        model = merge_projections(model.to(device=device, dtype=inference_dtype(device, args.dtype)))
    return Chat(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k or None, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, compile=getattr(args, "compile", False))


def read_batch_input(path: Path, system: str | None) -> list[tuple[dict, list[dict]]]:
    items = []
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                 "convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                messages = ([{"role": "system", "content": system}] if system else []) + \
                           [{"role": "user", "content": record["prompt"]}]
            elif isinstance(record, dict) and ("conversations" in record or "messages" in record):
                messages = record.get("conversations", record.get("messages"))
            else:
                raise ValueError(f'{path}:{lineno}: expected {{"prompt": "..."}} or {{"conversations": [...]}}')
            try:
                validate_messages(messages)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            items.append((record, messages))
    return items


def run_batch(chat: Chat, args: argparse.Namespace) -> None:
    items = read_batch_input(Path(args.input), args.system)
    output = Path(args.output) if args.output else None
    every, shown = max(1, len(items) // 10), [0]

    def progress(count: int) -> None:
        if count - shown[0] >= every or count == len(items):
            shown[0] = count
            print(f"answered {count}/{len(items)}", file=sys.stderr)

    answers = chat.answer_batch([messages for _, messages in items], args.batch_size, progress)
    lines = [json.dumps({**record, "answer": answer}, ensure_ascii=False) for (record, _), answer in zip(items, answers)]
    text = "".join(line + "\n" for line in lines)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        print(f"wrote {len(lines)} answers to {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def interactive(chat: Chat, system: str | None) -> None:
    print(f"Chatting with {chat.model.num_parameters() / 1e6:.1f}M-parameter Etude. {COMMANDS}.")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as lone surrogates, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not_text(line):  # bytes that were not UTF-8
            print("(that line is not UTF-8 text and was ignored: set your terminal to UTF-8 and type it again)")
            continue
        text = line.strip()
        if not text:
            continue
        command = COMMAND.fullmatch(text)
        if command:
            name, argument = command.group(1).lower(), (command.group(2) or "").strip()
            if name in ("quit", "exit"):
                return
            if name == "reset":
                history = history[:1] if history and history[0]["role"] == "system" else []
                print("(conversation reset)")
            elif name == "system":
                system = argument or None
                history = [{"role": "system", "content": system}] if system else []
                print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)")
            else:
                print(f"(unknown command /{command.group(1)}: {COMMANDS}; "
                      "to send a message that starts with /, type it as //...)")
            continue
        if text.startswith("//"):
            line = line.replace("/", "", 1)
        history.append({"role": "user", "content": line})
        print("etude> ", end="", flush=True)
        pieces: list[str] = []

        def show(piece: str) -> None:
            pieces.append(piece)
            print(piece, end="", flush=True)

        def show_call(name: str, arguments: str, result: str) -> None:
            print(f"\n[tool {name} {arguments} -> {result}]\netude> ", end="", flush=True)

        try:
            history += converse(chat, history, show, show_call)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
            history.append({"role": "assistant", "content": "".join(pieces)})
        except PromptTooLong as exc:  # only when the system message alone does not fit
            print(f"\n(not answered: {exc}; shorten it with /system)")
            history.pop()
            continue
        print()


def build_parser(description: str = __doc__,
                 model_help: str = f"model folder (default {SFT_DIR}, else {PRETRAINED_DIR})",
                 native: bool = True) -> argparse.ArgumentParser:
    """The chat flags; inference/hf.py shares them with its own description and --model (and
    without the flags of the native model alone: native=False)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", help=model_help)
    add("--lora", metavar="NAME", help="apply a LoRA adapter: a name under weight/lora/ (train/train_lora.py "
        "--lora-name NAME writes it) or an adapter folder; it must belong to the model")
    add("--prompt", help="answer this one message and exit")
    add("--input", help="JSONL of prompts to answer in batches")
    add("--output", help="where batch answers go (default: standard output)")
    add("--batch-size", type=int, default=8,
        help="with --input: answers decoded together by the continuous-batching engine (default 8)")
    add("--system", help="system prompt")
    add("--temperature", type=float, default=0.7, help="0 for greedy decoding (default 0.7)")
    add("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 for all (default 40)")
    add("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    add("--repetition-penalty", type=float, default=1.1, help="> 1 discourages repeats (default 1.1)")
    add("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    add("--seed", type=int, help="seed for sampling, for reproducible answers")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    add("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
        help="auto: bf16 on CUDA, fp32 on CPU (bf16 or --int8 decode faster on many CPUs; see README Performance)")
    add("--rope-scaling", metavar="TYPE:FACTOR", help=ROPE_SCALING_HELP)
    add("--tools", action="store_true",
        help="offer the model the built-in tools (a calculator and the date) and run the calls it makes")
    add("--no-think", action="store_true",
        help="answer without a <think> reasoning block (the prompt closes an empty one)")
    if native:
        add("--int8", action="store_true",
            help="CPU only: decode with int8 weights (one scale per row), two to three times as fast as fp32 at "
                 "batch 1; answers can drift from fp32's after a few dozen tokens")
        add("--compile", action=argparse.BooleanOptionalAction, default=False,
            help="run the decoding step through torch.compile: faster per token once compiled, but the first "
                 "answer of at least 64 tokens waits for the compilation (tens of seconds on a CPU; Inductor's "
                 "disk cache shortens it in later runs); worth it for a server or long batches (default off)")
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None,
         make_chat: Callable[[argparse.Namespace], Chat] = build_chat) -> int:
    """Parse the flags, build the chat and run it one-shot, batch or interactive. inference/hf.py
    runs the same program with its own parser and a transformers-backed chat."""
    args = (parser or build_parser()).parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        print("error: --prompt is empty; give the message to answer", file=sys.stderr)
        return 2
    for flag, value in (("--prompt", args.prompt), ("--system", args.system)):
        if value is not None and not_text(value):  # argv holds bytes that were not UTF-8 as surrogates
            print(f"error: {flag} is not UTF-8 text; set your terminal (or locale) to UTF-8", file=sys.stderr)
            return 2
    if args.batch_size <= 0 or args.max_new_tokens <= 0:
        print("error: --batch-size and --max-new-tokens must be positive", file=sys.stderr)
        return 2
    if getattr(args, "tools", False) and args.input:
        print("error: --tools runs tools in the interactive chat and with --prompt, not in batch mode (--input); "
              "drop one of them (tool/evaluate.py --tools runs them over many questions)", file=sys.stderr)
        return 2
    problems = sampling_problems(args.temperature, args.top_p, args.top_k, args.repetition_penalty)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        chat = make_chat(args)
        chat.tools = BUILTIN_TOOLS if getattr(args, "tools", False) else None
        chat.enable_thinking = False if getattr(args, "no_think", False) else None
        if args.input:
            run_batch(chat, args)
        elif args.prompt is not None:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                       [{"role": "user", "content": args.prompt}]
            converse(chat, messages, lambda piece: print(piece, end="", flush=True),
                     lambda name, arguments, result: print(f"\n[tool {name} {arguments} -> {result}]"))
            print()
        else:
            interactive(chat, args.system)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
