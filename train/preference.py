"""Direct Preference Optimisation: preference pairs (read, checked, rendered) and the DPO loss.

A pair file is JSONL, one pair per line, in either of two shapes:

    {"chosen": [messages], "rejected": [messages]}
        two whole conversations that differ only in their last (assistant) message;
    {"prompt": [messages] | "text", "chosen": [messages] | "text", "rejected": [messages] | "text"}
        TRL's shape: the shared prompt, then each reply as one assistant message (or its text).

Both sides must share the prompt (checked: a pair whose prompts differ, a missing or empty reply,
or two identical replies stop with file:line). A reply is scored only on its own tokens: the
assistant content and the <|im_end|> that closes it, the tokens SFT trains (so "ends its turn" is
part of what DPO can prefer). The loss is DPO's sigmoid loss (Rafailov et al. 2023, eq. 7; TRL's
loss_type="sigmoid"):

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with log pi(reply) the sum of the reply tokens' log-probabilities under the trained model and ref
the frozen starting model (or, when an adapter trains, the same model with its adapters off).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.lora import adapters_disabled
from model.model import IGNORE_INDEX, EtudeModel
from model.tokenizer import EtudeTokenizer, validate_messages
from train.data import DataError, _skipped_note, read_jsonl
from train.trainer import Objective


@dataclass(frozen=True)
class Pair:
    """A prompt (messages) and two replies to it, the preferred one first."""

    prompt: tuple
    chosen: str
    rejected: str
    # False for a rejected reply that was cut off without ending its turn (the demo pairs mark
    # such replies "rejected_ends": false): its tokens are scored without a closing <|im_end|>,
    # so DPO pushes down the rambling, not the ending it never reached.
    rejected_ends: bool = True


def _messages(value, what: str) -> list[dict]:
    """A side of a pair as messages: a list of them, or a string (one message by `what`'s role)."""
    if isinstance(value, str):
        return [{"role": "user" if what == "prompt" else "assistant", "content": value}]
    try:
        validate_messages(value)
    except ValueError as exc:
        raise ValueError(f'"{what}": {exc}') from None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _reply(messages: list[dict], what: str) -> str:
    last = messages[-1]
    if last["role"] != "assistant":
        raise ValueError(f'"{what}" must end with an assistant message (the reply), not a {last["role"]} one')
    if not last["content"].strip():
        raise ValueError(f'the {what} reply is empty')
    return last["content"]


def to_pair(obj: object) -> Pair:
    """One JSONL line as a Pair; ValueError says why the line is not a usable pair."""
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f'expected {{"chosen": [...], "rejected": [...]}} (optionally with "prompt"), got {keys}')
    for side in ("chosen", "rejected"):
        if obj[side] in ("", []) or (isinstance(obj[side], str) and not obj[side].strip()):
            raise ValueError(f'the {side} side is empty')
    chosen, rejected = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
    if "prompt" in obj:
        prompt = _messages(obj["prompt"], "prompt") if obj["prompt"] not in ("", []) else []
        for side, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) != 1:
                raise ValueError(f'with "prompt" given, "{side}" must be one assistant message (the reply), '
                                 f"got {len(messages)} messages")
    else:
        _reply(chosen, "chosen"), _reply(rejected, "rejected")
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            differ = next((i for i, (a, b) in enumerate(zip(prompt, rejected[:-1])) if a != b),
                          min(len(prompt), len(rejected) - 1))
            raise ValueError(f"chosen and rejected do not share the prompt: they differ at message {differ}; "
                             "a pair is two replies to the same conversation")
        chosen, rejected = chosen[-1:], rejected[-1:]
    if not prompt:
        raise ValueError("the pair has no prompt: the reply must follow at least one message")
    rejected_ends = obj.get("rejected_ends", True)
    if not isinstance(rejected_ends, bool):
        raise ValueError(f'"rejected_ends" must be true or false, got {rejected_ends!r}')
    pair = Pair(tuple(prompt), _reply(chosen, "chosen"), _reply(rejected, "rejected"), rejected_ends)
    if pair.chosen == pair.rejected:
        raise ValueError("chosen and rejected are the same reply; such a pair teaches nothing")
    return pair


def read_pairs(path: Path | str, skip_bad_lines: bool = False) -> list[Pair]:
    """Every pair of a JSONL file; a bad line stops with file:line (or is counted and skipped)."""
    report: dict = {}
    pairs = [pair for _, pair in read_jsonl(path, skip_bad_lines, report=report, convert=to_pair)]
    if not pairs:
        raise DataError(f"{path} holds no preference pairs{_skipped_note(report)}")
    if report.get("skipped"):
        print(f"{path}: skipped {report['skipped']} bad lines (first: {report['first_skipped'][0]})")
    return pairs


def render_reply(tokenizer: EtudeTokenizer, prompt: list[dict], reply: str, ends: bool = True) -> tuple[list[int], int]:
    """(ids of the prompt and the reply, number of leading ids that are not the reply's): the
    reply's tokens are its content and the <|im_end|> that closes it (left out when not `ends`);
    the newline after that is dropped (generation stops at <|im_end|>)."""
    prompt_ids, _ = tokenizer.render_chat(prompt)
    ids, mask = tokenizer.render_chat([*prompt, {"role": "assistant", "content": reply}])
    start = next(i for i in range(len(prompt_ids), len(ids)) if mask[i])
    end = max(i for i in range(start, len(ids)) if mask[i]) + (1 if ends else 0)
    return ids[:end], start


class PreferencePairs:
    """Pairs rendered for training, as the trainer's Windows: sample i is pair i; a batch is
    (inputs, targets), each (2 x pairs, longest - 1), the chosen rows first, right-padded; a
    target is the next id on reply tokens and -100 elsewhere. A pair longer than seq_len + 1
    tokens loses the start of its prompt (the reply is kept whole where it fits)."""

    def __init__(self, pairs: list[Pair], tokenizer: EtudeTokenizer, seq_len: int, name: str = "data"):
        self.pad_id, self.width = tokenizer.pad_id, seq_len + 1
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []
        self.truncated = 0
        for pair in pairs:
            for reply, ends in ((pair.chosen, True), (pair.rejected, pair.rejected_ends)):
                self.rows.append(self._row(*render_reply(tokenizer, list(pair.prompt), reply, ends)))
        self.num_samples = len(pairs)
        if self.truncated:
            print(f"{name}: {self.truncated} of {2 * len(pairs)} replies with their prompt are longer than "
                  f"{self.width} tokens; their prompts were cut from the left (or the reply at its end)")

    def _row(self, ids: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
        labels = [IGNORE_INDEX] * start + ids[start:]
        if len(ids) > self.width:
            self.truncated += 1
            # Keep one token of context before the reply, or the newest width tokens.
            cut = min(len(ids) - self.width, start - 1)
            ids, labels = ids[cut:cut + self.width], labels[cut:cut + self.width]
        return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.rows[2 * i] for i in indices] + [self.rows[2 * i + 1] for i in indices]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(rows):
            ids[row, :len(row_ids)] = torch.from_numpy(row_ids)
            labels[row, :len(row_labels)] = torch.from_numpy(row_labels)
        return ids[:, :-1], labels[:, 1:]


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target, (B, T) in fp32; 0 where the target is -100."""
    return -F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over each row of the log-probability of its targets (-100 targets count nothing), in fp32."""
    return token_logps(logits, targets).sum(-1)


def reference_token_logps(reference: EtudeModel | None, model: torch.nn.Module, inputs: torch.Tensor,
                          targets: torch.Tensor) -> torch.Tensor:
    """token_logps of the frozen reference, without gradients; reference None means `model` with
    its LoRA adapters switched off (when only an adapter trains, the base is the reference)."""
    with torch.no_grad():
        if reference is None:
            base = getattr(model, "module", model)  # under DDP, the wrapped model
            with adapters_disabled(base):
                return token_logps(base(inputs)[0], targets)
        reference.to(inputs.device)  # a no-op after the first batch
        return token_logps(reference(inputs)[0], targets)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean sigmoid DPO loss of a batch of pairs from their summed reply log-probabilities,
    and its metrics (means over the pairs): the implicit rewards beta * log(pi / ref) of each side,
    reward accuracy (chosen's reward above rejected's) and margin, the log-probabilities, and
    preference accuracy (the model's own log-probability of chosen above rejected's)."""
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {"reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
               "reward_margin": (chosen_rewards - rejected_rewards).mean(),
               "reward_chosen": chosen_rewards.mean(), "reward_rejected": rejected_rewards.mean(),
               "logps_chosen": chosen.detach().mean(), "logps_rejected": rejected.detach().mean(),
               "preference_accuracy": (chosen.detach() > rejected.detach()).float().mean()}
    return loss, metrics


class DPOObjective(Objective):
    """DPO over batches of PreferencePairs. `reference` is the frozen starting model; None means
    the trained model itself with its LoRA adapters switched off (only an adapter trains)."""

    def __init__(self, beta: float, reference: EtudeModel | None):
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.beta, self.reference = beta, reference

    def units(self, batch) -> int:
        return batch[0].shape[0] // 2

    def describe_batch(self, samples: int, seq_len: int) -> str:
        return f"{samples} pairs"

    def __call__(self, model, batch):
        inputs, targets = batch
        logits, _, aux_loss = model(inputs)
        logps = sequence_logps(logits, targets)
        ref_logps = reference_token_logps(self.reference, model, inputs, targets).sum(-1)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return loss, aux_loss, metrics
