"""Seeded synthetic problems with checkable answers: arithmetic, counting, spelling.

    from model.synthetic_tasks import make_problems, reward
    problems = make_problems("arithmetic", 100, seed=0)   # the same 100 problems on every machine
    reward(problems[0], "The answer is 42.")              # 1.0 when the answer is right, else 0.0

Two programs use the same generator and the same checker: tool/evaluate.py (exact-answer tasks)
and reinforcement learning with verifiable rewards (a GRPO stage scores its samples with
`reward`). It lives in model/ because that is the one room that both tool/ and train/ may import
(DESIGN.md); it imports only the standard library.

What counts as the answer in a reply (`extract_answer`): for a number, the last integer in the
reply's first line ("17 + 25 = 42" gives 42, as GSM8K-style checkers do); for a word, the first
line lowercased with surrounding quotes, spaces and end punctuation removed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# Common short English words (letters only) for the counting and spelling problems.
WORDS = tuple(
    "apple river garden window yellow planet summer winter orange banana letter number simple little "
    "bottle butter coffee dinner doctor family father mother sister brother friend forest flower "
    "island jacket kitchen market monkey pencil people pepper rabbit school silver spring street "
    "strawberry table teacher ticket tomato travel turtle valley village wonder zebra bridge candle "
    "castle cherry circle cookie corner dragon engine finger guitar hammer helmet jungle ladder "
    "lemon mirror museum needle ocean parrot pillow pirate pocket puzzle rocket saddle shadow "
    "spider tunnel violin wallet wizard".split())
KINDS = ("arithmetic", "counting", "spelling")
_INT = re.compile(r"-?\d+")
# Evaluation (tool/evaluate.py) asks the first problems of seed 0; training sets (the demo's SFT
# conversations, GRPO prompts) leave out every question among the first HELD_OUT of them, so a
# held-out accuracy is measured on questions that training never showed.
HELD_OUT = 1000


@dataclass(frozen=True)
class Problem:
    """One question with its one right answer. `kind` says how a reply is read (numeric or word)."""

    kind: str
    question: str
    answer: str


def _arithmetic(rng: random.Random) -> Problem:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Problem("arithmetic", f"What is {a} {op} {b}? Answer with the number only.", str(value))


def _counting(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        letter = rng.choice(sorted(set(word)))
        return Problem("counting", f"How many times does the letter '{letter}' appear in the word "
                                   f"'{word}'? Answer with the number only.", str(word.count(letter)))
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
    return Problem("counting", f"How many words are in this list: {' '.join(words)}? Answer with the "
                               "number only.", str(len(words)))


def _spelling(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return Problem("spelling", f"Write the word '{word}' backwards. Answer with the word only.", word[::-1])
    index = rng.randint(1, len(word))
    return Problem("spelling", f"What is letter number {index} of the word '{word}'? Answer with the "
                               "letter only.", word[index - 1])


_MAKERS = {"arithmetic": _arithmetic, "counting": _counting, "spelling": _spelling}


def make_problems(kind: str, count: int, seed: int = 0) -> list[Problem]:
    """`count` problems of `kind` (one of KINDS), the same list for the same seed everywhere."""
    if kind not in _MAKERS:
        raise ValueError(f"unknown synthetic task kind {kind!r}; choose one of {', '.join(KINDS)}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    # One stream per kind and seed, so asking for more problems extends the list, never reshuffles it.
    rng = random.Random(f"{kind}:{seed}")
    return [_MAKERS[kind](rng) for _ in range(count)]


def training_problems(kind: str, count: int, seed: int) -> list[Problem]:
    """`count` problems of `kind` drawn with `seed` (not 0, the evaluation seed), none of whose
    questions is among the first HELD_OUT evaluation problems; the same list for the same seed."""
    if seed == 0:
        raise ValueError("seed 0 draws the evaluation problems; training problems need another seed")
    held_out = {p.question for p in make_problems(kind, HELD_OUT, seed=0)}
    drawn = count
    while True:
        kept = [p for p in make_problems(kind, drawn, seed) if p.question not in held_out]
        if len(kept) >= count:
            return kept[:count]
        drawn = drawn * 2 + 16


def extract_answer(problem: Problem, reply: str) -> str | None:
    """The answer a reply gives, read as described in the module docstring; None when it gives none."""
    lines = reply.strip().splitlines()
    first = lines[0] if lines else ""
    if problem.kind in ("arithmetic", "counting"):
        numbers = _INT.findall(first)
        return numbers[-1].lstrip("+") if numbers else None
    word = first.strip().strip("\"'`").strip().rstrip(".!?").strip().strip("\"'`").lower()
    return word or None


def reward(problem: Problem, reply: str) -> float:
    """1.0 when the reply's answer equals the problem's, else 0.0 (a verifiable reward)."""
    got = extract_answer(problem, reply)
    if got is None:
        return 0.0
    if problem.kind in ("arithmetic", "counting"):
        return 1.0 if int(got) == int(problem.answer) else 0.0
    return 1.0 if got == problem.answer.lower() else 0.0
