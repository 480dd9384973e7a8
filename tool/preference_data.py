"""The demo's preference pairs for DPO, built offline from the SFT model's own answers.

    python tool/prepare_data.py --dpo                # after train/train_sft.py: writes dpo.jsonl, dpo.val.jsonl

The rules, so that the preferred side of every pair is honestly the better one:

- prompts: conversations of training_data/sft.jsonl (training pairs; a seeded sample of
  --dpo-prompts of them, the synthetic problems and the tool-use and thinking conversations left
  out: their replies follow formats of their own) and of sft.val.jsonl (held-out pairs), each up
  to its last assistant turn;
- rejected: the SFT model's own greedy answer to the prompt (what it says in chat and in the
  evaluation's chat task, 64 new tokens at most), kept only when it is degenerate by the rule of
  the chat task's `degenerate` figure (tool/eval/tasks.py degenerate_reply): it never ends its turn
  within those 64 tokens, or it says the same 3 words twice. An answer cut off without ending is
  marked "rejected_ends": false (DPO then scores it without a closing <|im_end|>);
- chosen: the conversation's own last assistant turn (written by a person, or the data set's
  answer), kept only when it is itself not degenerate and differs from the model's answer;
- anything else (the model's answer is fine, or empty) makes no pair.

Lines are TRL's {"prompt", "chosen", "rejected"} shape, plus "rejected_ends" and "rule" (why the
rejected answer is degenerate).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.chat_markup import TOOLS_INTRO
from tool.eval.models import load_eval_model
from tool.eval.tasks import CHAT_MAX_NEW_TOKENS, chat_questions, degenerate_reply

DPO_PROMPTS = 1500  # training prompts sampled from sft.jsonl (about a third give a pair)
BATCH_SIZE = 32


def model_answers(model, questions, batch_size: int = BATCH_SIZE) -> list[tuple[str, bool]]:
    """(greedy answer, whether it ended its turn) for each question."""
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), desc="answers", unit="batch", file=sys.stderr,
                      disable=not sys.stderr.isatty()):
        batch = [model.chat_ids(list(q.messages)) for q in questions[start:start + batch_size]]
        for ids in model.generate(batch, CHAT_MAX_NEW_TOKENS, model.stop_ids):
            answers.append((model.decode([t for t in ids if t not in model.stop_ids]), bool(ids) and ids[-1] in model.stop_ids))
    return answers


def preference_pairs(model, questions) -> tuple[list[dict], dict[str, int]]:
    """Pairs by the module's rules, and how many prompts each rule decided."""
    pairs, counts = [], {"prompts": len(questions), "fine": 0, "empty": 0, "reference degenerate": 0}
    for question, (answer, ended) in zip(questions, model_answers(model, questions)):
        why = degenerate_reply(answer, ended)
        if why is None or answer.strip() == question.answer.strip():
            counts["fine"] += 1
        elif not answer.strip():
            counts["empty"] += 1
        elif degenerate_reply(question.answer, True) is not None:
            counts["reference degenerate"] += 1
        else:
            rule = "never ends its turn" if not ended else "repeats itself"
            counts[rule] = counts.get(rule, 0) + 1
            pairs.append({"prompt": list(question.messages), "chosen": [{"role": "assistant", "content": question.answer}],
                          "rejected": [{"role": "assistant", "content": answer}], "rejected_ends": ended, "rule": why})
    return pairs, counts


def plain_chat(question) -> bool:
    """Whether a conversation is an ordinary chat: no tool list, tool call or result, no <think>."""
    texts = [m["content"] for m in question.messages] + [question.answer]
    return all(m["role"] in ("system", "user", "assistant") for m in question.messages) and \
        not any(TOOLS_INTRO in text or "<tool_call>" in text or "<think>" in text for text in texts)


def build(model_dir: Path, train_path: Path, val_path: Path, count: int, val_count: int | None, seed: int,
          exclude: set[str]) -> tuple[tuple[list[dict], dict], tuple[list[dict], dict]]:
    """(training pairs, counts) from a seeded sample of `count` conversations of train_path whose
    last question is not in `exclude`, and (held-out pairs, counts) from the first `val_count`
    (None: all) of val_path."""
    started = time.perf_counter()
    model = load_eval_model(model_dir, torch.device("cpu"), torch.float32)
    train = [q for q in chat_questions(train_path) if q.messages[-1]["content"] not in exclude and plain_chat(q)]
    random.Random(f"etude-dpo:{seed}").shuffle(train)
    result = preference_pairs(model, train[:count]), preference_pairs(model, chat_questions(val_path)[:val_count])
    print(f"  sampled {model_dir}'s answers in {time.perf_counter() - started:.0f} s")
    return result
