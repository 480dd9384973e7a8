"""A model folder made ready to be measured: log-likelihoods, bits per byte and greedy answers.

Two kinds of folder load here, behind one interface (`EvalModel`):

- an Etude folder (config.json with "model_type": "etude"), or a LoRA adapter folder of one
  (adapter_config.json naming its base): our tokenizer and EtudeModel; generation goes through
  the continuous-batching engine that the server and batch chat use (inference/engine.py);
- a Hugging Face folder (weight/etude_hf_model/ or any causal LM that transformers loads):
  AutoTokenizer + AutoModelForCausalLM, so an export is measured by the program that will read it.

Log-likelihood requests are (context, continuation) strings, tokenized as lm-evaluation-harness
does: trailing spaces of the context move to the continuation, context + continuation are
encoded whole and the continuation's tokens are those after the context's own encoding. Rows
are right-padded into batches (a causal model never looks right, so padding changes nothing
before it), and the choices of one question go into the same forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from config import ROOT, read_json
from inference.engine import Engine, Request  # the project's one batched decoder (greedy answers)

ADAPTER_CONFIG = "adapter_config.json"


def folder_kind(folder: Path) -> str:
    """'etude', 'lora' or 'hf' for a model folder, with a message saying what is missing otherwise."""
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}. Train one (python tool/demo.py makes "
                                "weight/etude_pretrained_model and weight/etude_sft_model) or pass an existing folder")
    if (folder / ADAPTER_CONFIG).is_file():
        return "lora"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a model folder (an Etude folder, "
                                "a LoRA adapter folder or a Hugging Face folder)")
    data = read_json(folder / "config.json", "model config")
    return "etude" if isinstance(data, dict) and data.get("model_type") == "etude" else "hf"


def split_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, tokenized as lm-evaluation-harness does (module docstring)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = encode(stripped + continuation)
    context_ids = encode(stripped)
    return context_ids, whole[len(context_ids):]


class EvalModel:
    """One model folder, loaded for evaluation. Subclasses supply the tokenizer side and `logits`."""

    name: str
    folder: Path
    max_len: int
    eot_id: int
    stop_ids: list[int]
    parameters: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None,
                 enable_thinking: bool | None = None) -> list[int]:
        """Token ids of a conversation followed by the assistant's generation prompt, with the
        tools offered and thinking as the chat template's variables of those names say."""
        raise NotImplementedError

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
        """Greedy continuations of the prompts (stop id included when reached)."""
        raise NotImplementedError

    def fit_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], int]:
        """Prompts cut from the left so that they and the answer fit the context (a prompt keeps at
        least half of it), and the number of new tokens that then fits."""
        keep = max(self.max_len - max_new_tokens, self.max_len // 2)
        prompts = [p[-keep:] for p in prompts]
        return prompts, min(max_new_tokens, self.max_len - max(len(p) for p in prompts))

    # -- scoring shared by every kind of folder ---------------------------------------------------

    def pair_ids(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(ids to feed plus the last target, number of continuation tokens) for one request,
        cut from the left to the context window as lm-eval does."""
        context_ids, continuation_ids = split_pair(self.encode, context, continuation) if context.strip() else \
            ([self.eot_id], self.encode(continuation))
        if not continuation_ids:
            raise ValueError(f"continuation {continuation!r} is empty after tokenization; a choice needs text")
        ids = (context_ids + continuation_ids)[-(self.max_len + 1):]
        return ids, min(len(continuation_ids), len(ids) - 1)

    @torch.inference_mode()
    def score_rows(self, rows: list[tuple[list[int], int]]) -> list[float]:
        """Sum of log-probabilities of the last n tokens of each row given the tokens before, one
        forward pass for all rows (right-padded)."""
        width = max(len(ids) for ids, _ in rows) - 1
        input_ids = torch.full((len(rows), width), self.eot_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (ids, _) in enumerate(rows):
            input_ids[row, :len(ids) - 1] = torch.as_tensor(ids[:-1])
            mask[row, :len(ids) - 1] = 1
        logits = self.logits(input_ids.to(self.device), mask.to(self.device))
        scores = []
        for row, (ids, n) in enumerate(rows):
            end = len(ids) - 1
            picked = logits[row, end - n:end].float().log_softmax(-1)
            targets = torch.as_tensor(ids[end - n + 1:end + 1], device=picked.device)
            scores.append(float(picked.gather(-1, targets[:, None]).sum()))
        return scores

    def score_choices(self, questions: list[tuple[str, list[str]]], batch_size: int,
                      progress: Callable[[int], None] | None = None) -> list[list[float]]:
        """Log-likelihood of every choice of every (context, choices) question. Batches hold whole
        questions (all their choices in one forward pass) up to batch_size rows; longest first,
        so a batch's rows have similar lengths and little padding."""
        rows = [[self.pair_ids(context, choice) for choice in choices] for context, choices in questions]
        order = sorted(range(len(rows)), key=lambda q: -max(len(ids) for ids, _ in rows[q]))
        results: list[list[float]] = [[] for _ in rows]
        batch: list[int] = []

        def flush() -> None:
            # A question with more choices than batch_size is still scored in one pass, alone.
            scores = self.score_rows([row for q in batch for row in rows[q]])
            at = 0
            for q in batch:
                results[q] = scores[at:at + len(rows[q])]
                at += len(rows[q])
            if progress:
                progress(len(batch))
            batch.clear()

        filled = 0
        for q in order:
            if batch and filled + len(rows[q]) > batch_size:
                flush()
                filled = 0
            batch.append(q)
            filled += len(rows[q])
        if batch:
            flush()
        return results

    def score_one_by_one(self, questions: list[tuple[str, list[str]]]) -> list[list[float]]:
        """The unbatched baseline: one forward pass per (context, choice). Same numbers, slower."""
        return [[self.score_rows([self.pair_ids(context, choice)])[0] for choice in choices]
                for context, choices in questions]

    def text_nll(self, texts: list[str], batch_size: int,
                 progress: Callable[[int], None] | None = None) -> tuple[float, int]:
        """(summed negative log-likelihood in nats, UTF-8 bytes) of documents, each read after an
        <|endoftext|> as in training, in consecutive windows of the context length (a window
        starts from the last token of the one before, with no further context). `progress` counts
        windows."""
        windows: list[tuple[list[int], int]] = []
        n_bytes = 0
        for text in texts:
            ids = [self.eot_id] + self.encode(text)
            n_bytes += len(text.encode("utf-8"))
            for start in range(0, len(ids) - 1, self.max_len):
                piece = ids[start:start + self.max_len + 1]
                windows.append((piece, len(piece) - 1))
        windows.sort(key=lambda w: -len(w[0]))
        nats = 0.0
        for start in range(0, len(windows), batch_size):
            nats -= sum(self.score_rows(windows[start:start + batch_size]))
            if progress:
                progress(len(windows[start:start + batch_size]))
        return nats, n_bytes


class EtudeEvalModel(EvalModel):
    """An Etude model folder (or a LoRA adapter over one) with its own tokenizer."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, adapter: Path | None = None):
        from model.checkpoint import load_model_folder
        from model.lora import load_adapter, merge_and_unload
        from model.tokenizer import load_tokenizer

        self.folder, self.device, self.name = folder, device, (adapter or folder).name
        self.tokenizer = load_tokenizer(folder)
        model = load_model_folder(folder)
        if adapter is not None:  # fold the adapter in: evaluation never trains it
            merge_and_unload(load_adapter(model, adapter))
        self.model = model.to(device=device, dtype=dtype).eval()
        self.max_len = model.config.max_seq_len
        self.eot_id = self.tokenizer.eos_id
        self.stop_ids = [self.tokenizer.im_end_id, self.tokenizer.eos_id]
        self.parameters = model.num_parameters()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None,
                 enable_thinking: bool | None = None) -> list[int]:
        return self.tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools,
                                          enable_thinking=enable_thinking)[0]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]  # right padding: causal attention alone keeps rows apart

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
        prompts, budget = self.fit_prompts(prompts, max_new_tokens)
        requests = [Request(ids, budget, stop_ids=stop_ids) for ids in prompts]
        return [r.output_ids for r in Engine(self.model, None, max_batch=len(prompts)).run(requests)]


class HFEvalModel(EvalModel):
    """A Hugging Face folder through transformers alone (no Etude model code runs)."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        import transformers

        self.folder, self.device, self.name = folder, device, folder.name
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
        config = self.model.config
        self.max_len = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        # The token a document follows: BOS where the model has one (the Etude export's BOS is
        # <|endoftext|>, its EOS <|im_end|>), else EOS, as lm-eval's prefix token.
        candidates = (config.bos_token_id, self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, 0)
        self.eot_id = next(c for c in candidates if c is not None)
        stops = self.model.generation_config.eos_token_id
        self.stop_ids = sorted(set(stops if isinstance(stops, list) else [stops] if stops is not None else [self.eot_id]))
        self.parameters = self.model.num_parameters()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None,
                 enable_thinking: bool | None = None) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.folder} has no chat template, so chat tasks cannot be asked of it; "
                             "leave them out with --tasks")
        thinking = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        ids = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                 **thinking)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
        prompts, max_new_tokens = self.fit_prompts(prompts, max_new_tokens)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.eot_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.as_tensor(prompt)
            mask[row, width - len(prompt):] = 1
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
                                  pad_token_id=self.eot_id)
        answers = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
            answers.append(row if cut is None else row[:cut + 1])
        return answers


def load_eval_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> EvalModel:
    """Load an Etude, LoRA-adapter or Hugging Face folder for evaluation."""
    folder = Path(path).expanduser()
    kind = folder_kind(folder)
    if kind == "hf":
        return HFEvalModel(folder, device, dtype)
    if kind == "etude":
        return EtudeEvalModel(folder, device, dtype)
    base = read_json(folder / ADAPTER_CONFIG, "LoRA adapter config").get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder / ADAPTER_CONFIG} names no base model (base_model_name_or_path); "
                         "evaluate the base folder with the adapter merged instead")
    base_folder = Path(base) if Path(base).is_absolute() else ROOT / base
    if folder_kind(base_folder) != "etude":
        raise ValueError(f"the adapter {folder} is for {base_folder}, which is not an Etude folder; "
                         "evaluate a merged export instead")
    return EtudeEvalModel(base_folder, device, dtype, adapter=folder)


def bits_per_byte(nats: float, n_bytes: int) -> float:
    return nats / math.log(2) / max(n_bytes, 1)
