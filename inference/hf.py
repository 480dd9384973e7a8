"""Chat with an exported model through transformers alone.

    python tool/convert_hf.py                              # first: weight/etude_sft_model -> weight/etude_hf_model
    python inference/hf.py                                 # interactive, streamed, multi-turn
    python inference/hf.py --prompt "Hello!" --temperature 0
    python inference/hf.py --input q.jsonl --output a.jsonl --batch-size 16
    python inference/hf.py --lora identity                 # a LoRA adapter applied through peft
    python inference/hf.py --rope-scaling yarn:4           # a context four times the trained length

The model is transformers' AutoModelForCausalLM, the prompt comes from AutoTokenizer's
apply_chat_template and the answer streams through a TextIteratorStreamer: no Etude model code
runs, which is the proof that an export stands alone. Flags, interactive commands (/reset,
/system TEXT, /quit), batch files and history trimming are those of inference/inference.py, so
under greedy decoding (--temperature 0) both programs give the same answers. Any chat model
folder that transformers loads works with --model (default weight/etude_hf_model/).
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers

from config import HF_DIR, parse_rope_scaling, read_json
from model.hf_llama import hf_rope_scaling_fields
from model.lora import resolve_adapter
from model.tokenizer import as_plain
from inference.inference import batch_prompts, build_parser, fit_to_context, inference_dtype, main as chat_main, \
    pick_inference_device

# peft (for --lora) asks transformers a deprecated question at load time; the warning is theirs, not the user's.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class AnswerStreamer(transformers.TextIteratorStreamer):
    """Streams the answer's text: the prompt and the stop ids are left out, and any other
    special token shows as text, as inference.py shows it."""

    def __init__(self, tokenizer, stop_ids):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False)
        self.stop_ids = torch.tensor(sorted(set(stop_ids)))

    def put(self, value):
        if not self.next_tokens_are_prompt:
            value = value.flatten()
            value = value[~torch.isin(value, self.stop_ids.to(value.device))]
            if value.numel() == 0:
                return
        super().put(value)


class Cancelled(transformers.StoppingCriteria):
    """Ends generation at the next token once `event` is set (the reader stopped reading)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class HFChat:
    """A transformers model and tokenizer behind the interface of inference.Chat: prompt_ids,
    stream, answer, answer_batch. Generation stops at the ids in generation_config.json
    (<|im_end|> and <|endoftext|> for an Etude export)."""

    tools: list[dict] | None = None  # as inference.Chat's: the template's variables
    enable_thinking: bool | None = None

    def __init__(self, model, tokenizer, max_new_tokens: int = 256, temperature: float = 0.7,
                 top_k: int | None = 40, top_p: float | None = 0.9, repetition_penalty: float = 1.1,
                 seed: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens = max_new_tokens
        self.context = usable_context(model.config)
        eos = model.generation_config.eos_token_id
        self.stop_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if not self.stop_ids:
            raise ValueError("the model's generation_config.json names no eos_token_id, so an answer "
                             "would never end; add one (an Etude export has <|im_end|>)")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # No token stands for more characters than its spelling has (a byte-level token spells each
        # byte as one character); doubled for normalizers that fold characters together.
        self.max_token_chars = 2 * max(len(token) for token in tokenizer.get_vocab())
        # transformers samples from torch's global generator; greedy decoding ignores it.
        if seed is not None:
            torch.manual_seed(seed)
        self.sampling = dict(do_sample=False, repetition_penalty=repetition_penalty)
        if temperature > 0:
            self.sampling.update(do_sample=True, temperature=temperature, top_k=top_k or 0,
                                 top_p=top_p if top_p is not None else 1.0)

    def _thinking(self) -> dict:
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}

    def render(self, messages: list[dict]) -> list[int]:
        """The chat template's ids. transformers parses special-token strings anywhere in the
        rendered text, so a message holding one (a user typing "<|im_end|>") would forge a turn
        boundary; such messages are rendered with their content encoded as plain text."""
        specials = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]
        if not any(token in m["content"] for m in messages for token in specials):
            return list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                           add_generation_prompt=True, **self._thinking()))
        # Render the template around placeholders, then encode the template's own text with its
        # special tokens and each message's content with none.
        marker = f"\x00{secrets.token_hex(8)}"
        stand_ins = [{**m, "content": f"{marker}{i}{marker}"} for i, m in enumerate(messages)]
        text = self.tokenizer.apply_chat_template(stand_ins, tokenize=False, add_generation_prompt=True,
                                                  **self._thinking())
        ids: list[int] = []
        for index, piece in enumerate(re.split(f"{marker}(\\d+){marker}", text)):
            if index % 2:
                ids += self.tokenizer(messages[int(piece)]["content"], add_special_tokens=False,
                                      split_special_tokens=True).input_ids
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False).input_ids
        return ids

    def prompt_ids(self, messages: list[dict], trim: bool = True) -> tuple[list[int], str | None]:
        # tools and tool calls written into the text first, as inference.Chat does: the same ids
        # as the template given them structured (tests/test_tools.py)
        return fit_to_context(as_plain(messages, self.tools), self.render, self.context, self.max_new_tokens,
                              trim=trim, max_token_chars=self.max_token_chars)

    def _generate_kwargs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        device = self.model.device
        budget = min(self.max_new_tokens, self.context - ids.shape[1])
        return dict(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=budget,
                    eos_token_id=list(self.stop_ids), pad_token_id=self.pad_id, **self.sampling)

    def stream(self, messages: list[dict]) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are generated (in a worker thread,
        which stops at the next token when the caller stops reading)."""
        ids, note = self.prompt_ids(messages)
        if note:
            print(f"[note: {note}]", file=sys.stderr)
        streamer = AnswerStreamer(self.tokenizer, self.stop_ids)
        cancelled = threading.Event()
        failure: list[BaseException] = []

        def work():
            try:
                self.model.generate(**self._generate_kwargs(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)),
                                    streamer=streamer, stopping_criteria=transformers.StoppingCriteriaList([Cancelled(cancelled)]))
            except BaseException as exc:  # handed to the reading thread below, never lost
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            cancelled.set()
            worker.join()
        if failure:
            raise failure[0]

    def answer(self, messages: list[dict]) -> str:
        return "".join(self.stream(messages))

    def answer_batch(self, conversations: list[list[dict]], max_batch: int | None = None,
                     progress: Callable[[int], None] | None = None) -> list[str]:
        """Answers for several conversations, `max_batch` per left-padded generate call;
        `progress(n)` is called when n answers are done."""
        step = max_batch or len(conversations)
        answers: list[str] = []
        for start in range(0, len(conversations), step):
            answers += self._answer_together(conversations[start:start + step])
            if progress is not None:
                progress(len(answers))
        return answers

    def _answer_together(self, conversations: list[list[dict]]) -> list[str]:
        prompts = batch_prompts(self, conversations)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            output = self.model.generate(**self._generate_kwargs(ids, mask))
        answers = []
        for row in output[:, width:].tolist():
            ends = [i for i, token in enumerate(row) if token in self.stop_ids]
            answers.append(self.tokenizer.decode(row[:ends[0]] if ends else row, skip_special_tokens=False))
        return answers


def usable_context(config) -> int:
    """The longest context of a transformers model: max_position_embeddings, except under dynamic
    RoPE scaling, where transformers reads that as the trained length and stretches it by factor."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) == "dynamic":
        return int(rope["factor"] * config.max_position_embeddings)
    return config.max_position_embeddings


def scaled_config(folder: Path, spec: str):
    """The transformers config of `folder` with --rope-scaling TYPE:FACTOR applied, as the Etude
    export writes scaling (model/hf_llama.py)."""
    rope_type, factor = parse_rope_scaling(spec)
    data = read_json(folder / "config.json", "model config")
    data.update(hf_rope_scaling_fields(data, rope_type, factor, source=str(folder / "config.json")))
    if data.get("rope_scaling") is None:
        data.pop("rope_scaling")
    config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    print(f"[RoPE scaling {spec}: context {usable_context(config)} tokens]", file=sys.stderr)
    return config


def resolve_hf_folder(requested: str | None) -> Path:
    """--model, else weight/etude_hf_model; an Etude-native folder is pointed to the exporter."""
    folder = Path(requested) if requested else HF_DIR
    if not (folder / "config.json").is_file():
        hint = "" if requested else " Export the chat model first: `python tool/convert_hf.py`."
        raise FileNotFoundError(f"no model folder at {folder} (config.json missing).{hint}")
    data = read_json(folder / "config.json", "model config")
    if isinstance(data, dict) and data.get("model_type") == "etude":
        raise ValueError(f"{folder} is an Etude model folder, not a Hugging Face one: export it with "
                         f"`python tool/convert_hf.py --model {folder}` (or chat with inference/inference.py)")
    return folder


def apply_peft_adapter(model, folder: Path):
    """The transformers model with the LoRA adapter in `folder` applied through peft (an Etude
    adapter is already in peft's layout for the export of the model it was trained on)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ValueError("--lora with transformers needs the peft package (pip install peft). Without it, chat "
                         "with the adapter through `python inference/inference.py --lora NAME`, or export the "
                         "model with the adapter merged in: `python tool/convert_hf.py --lora NAME`") from None
    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as exc:  # peft's words for an adapter that does not fit
        raise ValueError(f"peft cannot apply the adapter in {folder} to this model ({exc}); use the export of "
                         "the model the adapter was trained on") from None


def build_hf_chat(args: argparse.Namespace) -> HFChat:
    transformers.utils.logging.disable_progress_bar()
    folder = resolve_hf_folder(args.model)
    device = pick_inference_device(args.device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        config = scaled_config(folder, args.rope_scaling) if args.rope_scaling else None
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), config=config,
                                                                  dtype=inference_dtype(device, args.dtype))
    except OSError as exc:  # transformers' word for a folder it cannot read (missing weights, tokenizer)
        raise ValueError(f"transformers cannot load {folder}: {exc}") from None
    if args.lora:
        model = apply_peft_adapter(model, resolve_adapter(args.lora))
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {folder} has no chat_template, so a conversation cannot be "
                         "rendered; export with tool/convert_hf.py (it writes the ChatML template)")
    return HFChat(model.to(device), tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k or None, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                  seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__, model_help=f"Hugging Face model folder (default {HF_DIR})", native=False)
    return chat_main(argv, parser=parser, make_chat=build_hf_chat)


if __name__ == "__main__":
    sys.exit(main())
