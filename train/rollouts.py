"""GRPO: prompts with checkable answers, groups of completions sampled on-policy, and the loss.

A prompt file is JSONL, one prompt per line:

    {"prompt": "How many words are in this list: apple river? Answer with the number only." | [messages],
     "task": "counting", "answer": "2"}

`task` names the checker that scores a completion: the synthetic tasks of model/synthetic_tasks.py
(arithmetic, counting, spelling; the same checker as tool/evaluate.py's exact-answer tasks). A
line whose task has no checker, or without an answer, stops with file:line.

Each training step, for every prompt of the batch, `RolloutPrompts.get_batch` samples a group of
completions from the model being trained (`sample_group`: the prompt's rows decode together on
the decoding step that chat and the server use, and draw from torch's global generator, whose state the
trainer's checkpoints carry, so a resumed run draws the same completions). Reward: 1 when the checker accepts the
answer and the completion ends its turn (<|im_end|>) within --max-new-tokens, else 0 (the length
rule: a right answer followed by rambling that never ends earns nothing). Advantages are the
rewards normalised within their group, (r - mean) / (std + 1e-4) (a group whose completions all
score alike teaches nothing and gets 0). The loss (DeepSeekMath's GRPO, as TRL's GRPOTrainer with
loss_type="dapo") is the clipped policy-gradient objective averaged over every completion token
of the batch,

    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * KL(pi || ref),

with ratio = pi / pi_old. Each batch of completions makes one optimizer step (TRL's default
num_iterations=1), so pi_old is the model itself (detached), the ratio is 1 and its gradient is
that of log pi; the clip only acts where a batch is reused. KL (k3 estimator, per token) is
optional: kl_coef 0 (the default, as TRL's) needs no reference model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.decode_step import DecodeStepper, bucket_length
from model.model import IGNORE_INDEX, EtudeModel
from model.synthetic_tasks import KINDS, Problem, reward as check_answer
from model.tokenizer import EtudeTokenizer, validate_messages
from train.data import DataError, _skipped_note, read_jsonl
from train.preference import reference_token_logps, token_logps
from train.trainer import Objective

CHECKERS = KINDS  # the tasks a completion can be scored on


def to_task_prompt(obj: object) -> tuple[list[dict], Problem]:
    """One JSONL line as (messages, problem with the answer); ValueError says what is wrong."""
    if not isinstance(obj, dict) or "prompt" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f'expected {{"prompt": ..., "task": ..., "answer": ...}}, got {keys}')
    task = obj.get("task")
    if task not in CHECKERS:
        raise ValueError(f"no checker for task {task!r}: a completion could not be scored; tasks with a checker: "
                         f"{', '.join(CHECKERS)}")
    answer = obj.get("answer")
    if not isinstance(answer, (str, int)) or not str(answer).strip():
        raise ValueError('"answer" is missing or empty: the checker needs the right answer')
    prompt = obj["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    validate_messages(messages)
    if not messages[-1]["content"].strip() or messages[-1]["role"] == "assistant":
        raise ValueError("the prompt must end with a non-empty user (or system) message for the model to answer")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return messages, Problem(task, messages[-1]["content"], str(answer).strip())


def read_task_prompts(path: Path | str, skip_bad_lines: bool = False) -> list[tuple[list[dict], Problem]]:
    report: dict = {}
    prompts = [item for _, item in read_jsonl(path, skip_bad_lines, report=report, convert=to_task_prompt)]
    if not prompts:
        raise DataError(f"{path} holds no prompts{_skipped_note(report)}")
    return prompts


@torch.inference_mode()
def sample_group(model: EtudeModel, prompt_ids: list[int], group_size: int, max_new_tokens: int,
                 temperature: float, stop_id: int) -> list[list[int]]:
    """`group_size` completions of one prompt, sampled together on the decoding step that chat
    uses (model/decode_step.py): each row of the step's cache is filled with the prompt, then every
    step decodes all rows at once and each draws its next token (from torch's global generator;
    greedy at temperature 0). A completion ends with its first `stop_id` (kept) or at
    `max_new_tokens` (or the context); decoding stops when every row has ended."""
    device = model.embed_tokens.weight.device
    budget = min(max_new_tokens, model.config.max_seq_len - len(prompt_ids))
    if budget <= 0:
        raise ValueError(f"a prompt of {len(prompt_ids)} tokens leaves no room to answer within the model's "
                         f"context of {model.config.max_seq_len}; shorten the prompt")
    stepper = DecodeStepper(model, group_size, bucket_length(len(prompt_ids) + budget, model.config.max_seq_len))
    prompt = torch.tensor(prompt_ids, device=device)
    logits = torch.stack([stepper.prefill(prompt, row) for row in range(group_size)])
    positions = torch.full((group_size,), len(prompt_ids), dtype=torch.long, device=device)
    tokens = torch.empty(group_size, budget, dtype=torch.long, device=device)
    ended = torch.zeros(group_size, dtype=torch.bool, device=device)
    steps = 0
    while True:
        logits = logits.float()
        chosen = (torch.multinomial((logits / temperature).softmax(-1), 1)[:, 0] if temperature > 0
                  else logits.argmax(-1))
        tokens[:, steps] = chosen
        steps += 1
        ended |= chosen == stop_id
        if steps == budget or bool(ended.all()):
            break
        logits = stepper.step(chosen, positions)
        positions += 1
    completions = []
    for row in tokens[:, :steps].tolist():
        completions.append(row[:row.index(stop_id) + 1] if stop_id in row else row)
    return completions


class RolloutPrompts:
    """The trainer's Windows for GRPO: sample i is prompt i, and a batch is drawn fresh from
    `policy` (set by the stage to the model being trained): a dict of (prompts x group, T) inputs
    and targets (completion tokens only), per-completion advantages, and the rollout statistics."""

    def __init__(self, prompts: list[tuple[list[dict], Problem]], tokenizer: EtudeTokenizer, group_size: int,
                 max_new_tokens: int, temperature: float, max_len: int):
        self.problems = [problem for _, problem in prompts]
        self.prompt_ids = [tokenizer.render_chat(messages, add_generation_prompt=True)[0][-(max_len - max_new_tokens):]
                           for messages, _ in prompts]
        self.tokenizer, self.group_size = tokenizer, group_size
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.num_samples = len(prompts)
        self.policy: EtudeModel | None = None

    def get_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if self.policy is None:
            raise RuntimeError("RolloutPrompts.policy must be set to the model being trained before sampling")
        policy, stop = self.policy, self.tokenizer.im_end_id
        prompts = [self.prompt_ids[i] for i in indices for _ in range(self.group_size)]
        was_training = policy.training
        policy.eval()
        completions = [completion for i in indices
                       for completion in sample_group(policy, self.prompt_ids[i], self.group_size,
                                                      self.max_new_tokens, self.temperature, stop)]
        policy.train(was_training)
        ended = torch.tensor([bool(c) and c[-1] == stop for c in completions])
        correct = torch.tensor([check_answer(self.problems[indices[row // self.group_size]],
                                             self.tokenizer.decode([t for t in c if t != stop]))
                                for row, c in enumerate(completions)])
        rewards = correct * ended
        groups = rewards.view(len(indices), self.group_size)
        advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
        width = max(len(p) + len(c) for p, c in zip(prompts, completions))
        ids = torch.full((len(prompts), width), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            ids[row, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            labels[row, len(prompt):len(prompt) + len(completion)] = torch.tensor(completion, dtype=torch.long)
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float)
        return {"inputs": ids[:, :-1], "targets": labels[:, 1:], "advantages": advantages, "reward": rewards,
                "pass_rate": correct, "ended": ended.float(), "completion_length": lengths,
                "solved_groups": (groups.amax(1) > 0).float()}


class GRPOObjective(Objective):
    """The clipped policy-gradient loss over RolloutPrompts batches (module docstring). Its unit
    is a completion token, so micro-batches and ranks weigh by the tokens they hold."""

    def __init__(self, epsilon: float = 0.2, kl_coef: float = 0.0, reference: EtudeModel | None = None,
                 group_size: int | None = None):
        """reference: the frozen starting model for the KL term; None with kl_coef > 0 means the
        trained model with its LoRA adapters switched off. group_size: for the start line."""
        self.epsilon, self.kl_coef, self.reference, self.group_size = epsilon, kl_coef, reference, group_size

    def describe_batch(self, samples: int, seq_len: int) -> str:
        return f"{samples} prompts x {self.group_size} completions"

    def units(self, batch) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def __call__(self, model, batch):
        inputs, targets = batch["inputs"], batch["targets"]
        mask = (targets != IGNORE_INDEX).float()
        logits, _, aux_loss = model(inputs)
        logps = token_logps(logits, targets)
        ratio = torch.exp(logps - logps.detach())  # pi / pi_old: one update per batch of rollouts
        advantages = batch["advantages"][:, None]
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + self.epsilon)
        per_token = -torch.minimum(ratio * advantages, clipped * advantages)
        metrics = {}
        if self.kl_coef > 0:
            ref_logps = reference_token_logps(self.reference, model, inputs, targets)
            kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
            per_token = per_token + self.kl_coef * kl
            metrics["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        for key in ("reward", "pass_rate", "ended", "completion_length", "solved_groups"):
            metrics[key] = batch[key].float().mean()
        return loss, aux_loss, metrics
