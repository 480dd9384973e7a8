"""Synthetic tool-use and thinking conversations for the demo SFT data (tool/prepare_data.py).

    from tool.tool_use_data import tool_use_conversations
    conversations = tool_use_conversations(seed=42, chats=some_sft_conversations)

Four kinds, seeded (the same list for the same seed and chats):

- calculator: the built-in tools are offered, the user asks arithmetic, the assistant calls the
  calculator, reads its result and answers with it;
- date: the same with the date tool;
- no call: the tools are offered but the question (an ordinary demo chat) needs none, so the
  assistant just answers: the model must learn when *not* to call;
- thinking: no tools, arithmetic answered after a short worked <think> trace.

The evaluation's held-out arithmetic questions (model/synthetic_tasks.py, seed 0, the first
HELD_OUT of them) never appear: accuracy with and without tools is measured on questions the
model has not seen. Conversations are written as plain role/content messages (tool lists, calls
and reasoning in their text, model/chat_markup.py), which SFT training reads as they are and
which render to the same ids as the structured messages would.
"""

from __future__ import annotations

import random

from model.builtin_tools import BUILTIN_TOOLS, calculate, today
from model.chat_markup import plain_messages
from model.synthetic_tasks import make_problems

CALCULATOR_CONVERSATIONS = 2400
DATE_CONVERSATIONS = 300
NO_CALL_CONVERSATIONS = 800
THINKING_CONVERSATIONS = 800
HELD_OUT = 1000  # evaluation arithmetic problems (seed 0) kept out of the training data
QUESTION_FORMS = ("What is {q}? Answer with the number only.", "What is {q}?", "Calculate {q}.",
                  "How much is {q}?", "Can you work out {q} for me?", "{q} = ?")


def _arithmetic(rng: random.Random) -> tuple[str, int]:
    """An expression and its value: like the evaluation's two-number problems, with a wider range."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
    else:
        a, b = rng.randint(1, 999), rng.randint(1, 999)
    expression = f"{a} {op} {b}"
    return expression, int(calculate(expression))


def _question(rng: random.Random, held_out: set[str]) -> tuple[str, str, int, bool]:
    """A question not among the held-out ones: (question, expression, value, number_only)."""
    while True:
        expression, value = _arithmetic(rng)
        form = rng.choice(QUESTION_FORMS)
        question = form.format(q=expression)
        if question not in held_out:
            return question, expression, value, "number only" in form


def _call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def calculator_chat(rng: random.Random, held_out: set[str]) -> list[dict]:
    question, expression, value, number_only = _question(rng, held_out)
    answer = str(value) if number_only else rng.choice((f"{expression} = {value}.", f"The answer is {value}."))
    return [{"role": "user", "content": question}, _call("calculator", {"expression": expression}),
            {"role": "tool", "content": str(value)}, {"role": "assistant", "content": answer}]


def date_chat(rng: random.Random) -> list[dict]:
    import datetime
    day = datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randint(0, 3650))
    question = rng.choice(("What is the date today?", "What day is it today?", "Which date is it?",
                           "What's today's date?"))
    result = today(day)
    answer = f"Today is {day.strftime('%A')}, {day.day} {day.strftime('%B')} {day.year}."
    return [{"role": "user", "content": question}, _call("date", {}), {"role": "tool", "content": result},
            {"role": "assistant", "content": answer}]


def worked_reasoning(expression: str) -> str:
    """A short worked trace for a two-number problem (tens first, then units; or repeated sums)."""
    a_text, op, b_text = expression.split()
    a, b = int(a_text), int(b_text)
    if op == "*":
        small, large = sorted((a, b))
        partial = [large * k for k in range(1, small + 1)]
        return f"{expression}: {' -> '.join(map(str, partial))}, so {a * b}."
    tens, units = b - b % 10, b % 10
    sign = 1 if op == "+" else -1
    step = a + sign * tens
    return f"{expression}: {a} {op} {tens} = {step}, {step} {op} {units} = {step + sign * units}."


def thinking_chat(rng: random.Random, held_out: set[str]) -> list[dict]:
    question, expression, value, number_only = _question(rng, held_out)
    answer = str(value) if number_only else f"{expression} = {value}."
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": answer, "reasoning_content": worked_reasoning(expression)}]


def tool_use_conversations(seed: int, chats: list[list[dict]]) -> list[list[dict[str, str]]]:
    """The synthetic conversations (module docstring), as plain role/content messages, shuffled.
    `chats` supplies the questions that need no tool (ordinary SFT conversations)."""
    rng = random.Random(f"etude-tool-use:{seed}")
    held_out = {problem.question for problem in make_problems("arithmetic", HELD_OUT, seed=0)}
    with_tools = [calculator_chat(rng, held_out) for _ in range(CALCULATOR_CONVERSATIONS)]
    with_tools += [date_chat(rng) for _ in range(DATE_CONVERSATIONS)]
    no_call = [chat for chat in rng.sample(chats, min(NO_CALL_CONVERSATIONS, len(chats)))]
    conversations = [plain_messages(chat, BUILTIN_TOOLS) for chat in with_tools + no_call]
    conversations += [plain_messages(thinking_chat(rng, held_out)) for _ in range(THINKING_CONVERSATIONS)]
    rng.shuffle(conversations)
    return conversations
