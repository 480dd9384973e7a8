"""Readers for multiple-choice task files in their official local formats, each turned into
(query, choices, gold) the way lm-evaluation-harness's task of the same name builds its prompts,
so a score here means what the same score means there.

| task                      | file (as published)                         | prompt -> choices                      |
|---------------------------|---------------------------------------------|----------------------------------------|
| hellaswag                 | hellaswag_val.jsonl (rowanz/hellaswag)      | "{activity}: {ctx_a} {Ctx_b}" -> endings |
| arc_easy, arc_challenge   | ARC-Easy-Test.jsonl / ARC-Challenge-Test.jsonl (AI2) | "Question: ...\\nAnswer:" -> texts |
| mmlu                      | a folder of {subject}_test.csv (or one .csv) | question + "A. .. D. ..\\nAnswer:" -> A..D |
| piqa                      | valid.jsonl + valid-labels.lst (ybisk/piqa) | "Question: {goal}\\nAnswer:" -> sol1, sol2 |
| generic                   | JSONL of {"query", "choices", "gold"}       | query -> choices                       |

Choices are scored as continuations after a single space (lm-eval's target_delimiter). A line
that cannot be read stops with `file:line` and what is wrong. write_lm_eval_task writes any of
them back as a generic JSONL plus an lm-eval task YAML over it, for checking our scores with lm-eval.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class TaskFileError(ValueError):
    """A task file that cannot be read; the message names file:line and the fix."""


@dataclass(frozen=True)
class Choice:
    """One multiple-choice question: the prompt, the candidate continuations, the right one's index."""

    query: str
    choices: tuple[str, ...]
    gold: int


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object stops with file:line."""
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskFileError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                    "each line must be one JSON object") from None
            if not isinstance(data, dict):
                raise TaskFileError(f"{path}:{number}: expected a JSON object, got {type(data).__name__}")
            yield number, data


def _need(data: dict, key: str, kind: type | tuple, where: str, shape: str):
    if key not in data:
        raise TaskFileError(f"{where}: missing {key!r} (keys present: {sorted(data)}); expected {shape}")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = {str: "a string", list: "a list", int: "an integer", dict: "an object"}
        wanted = " or ".join(names[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TaskFileError(f"{where}: {key!r} must be {wanted}, got {type(value).__name__} {value!r:.60}; "
                            f"each line is {shape}")
    return value


def _checked(where: str, query: str, choices: list, gold: int) -> Choice:
    if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise TaskFileError(f"{where}: needs at least two non-empty string choices, got {choices!r:.120}")
    if not 0 <= gold < len(choices):
        raise TaskFileError(f"{where}: gold index {gold} is outside the {len(choices)} choices (0..{len(choices) - 1})")
    return Choice(query, tuple(choices), gold)


def _int_label(value, where: str, key: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TaskFileError(f"{where}: {key!r} must be an integer index, got {value!r}") from None


def read_generic(path: Path) -> list[Choice]:
    """JSONL of {"query": str, "choices": [str, ...], "gold": int}."""
    shape = '{"query": str, "choices": [str, ...], "gold": int}'
    out = []
    for number, data in read_jsonl(path):
        where = f"{path}:{number}"
        query = _need(data, "query", str, where, shape)
        choices = _need(data, "choices", list, where, shape)
        gold = _need(data, "gold", int, where, shape)
        out.append(_checked(where, query, choices, gold))
    return out


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess: WikiHow "[title]" markers become sentence ends, other
    # bracketed markers go, double spaces collapse.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[Choice]:
    """hellaswag_{train,val}.jsonl: ctx_a, ctx_b, activity_label, endings (4), label."""
    shape = "a HellaSwag record (ctx_a, ctx_b, activity_label, endings, label)"
    out = []
    for number, data in read_jsonl(path):
        where = f"{path}:{number}"
        ctx_a = _need(data, "ctx_a", str, where, shape)
        ctx_b = _need(data, "ctx_b", str, where, shape)
        activity = _need(data, "activity_label", str, where, shape)
        endings = _need(data, "endings", list, where, shape)
        gold = _int_label(_need(data, "label", (int, str), where, shape), where, "label")
        query = _hellaswag_clean(activity + ": " + ctx_a + " " + ctx_b.capitalize())
        out.append(_checked(where, query, [_hellaswag_clean(e) if isinstance(e, str) else e for e in endings], gold))
    return out


def read_arc(path: Path) -> list[Choice]:
    """ARC-{Easy,Challenge}-{Train,Dev,Test}.jsonl (AI2's release: question.stem, question.choices
    [{text, label}], answerKey), or the flat form (question, choices {text: [], label: []})."""
    shape = 'an ARC record ({"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"})'
    out = []
    for number, data in read_jsonl(path):
        where = f"{path}:{number}"
        question = _need(data, "question", (dict, str), where, shape)
        key = _need(data, "answerKey", str, where, shape)
        if isinstance(question, dict):
            stem = _need(question, "stem", str, where, shape)
            listed = _need(question, "choices", list, where, shape)
            if not all(isinstance(c, dict) and "text" in c and "label" in c for c in listed):
                raise TaskFileError(f"{where}: every question.choices item needs 'text' and 'label'")
            texts, labels = [c["text"] for c in listed], [str(c["label"]) for c in listed]
        else:
            stem = question
            choices = _need(data, "choices", dict, where, shape)
            texts, labels = list(choices.get("text", [])), [str(x) for x in choices.get("label", [])]
        if key not in labels:
            raise TaskFileError(f"{where}: answerKey {key!r} is not among the choice labels {labels}")
        out.append(_checked(where, f"Question: {stem}\nAnswer:", texts, labels.index(key)))
    return out


def read_piqa(path: Path) -> list[Choice]:
    """PIQA's {train,valid}.jsonl (goal, sol1, sol2) with labels from the {train,valid}-labels.lst
    beside it (one 0/1 per line), or a "label" field in each record."""
    shape = "a PIQA record (goal, sol1, sol2)"
    labels_path = path.with_name(path.stem + "-labels.lst")
    labels = labels_path.read_text(encoding="utf-8").split() if labels_path.is_file() else None
    out = []
    for index, (number, data) in enumerate(read_jsonl(path)):
        where = f"{path}:{number}"
        goal = _need(data, "goal", str, where, shape)
        sols = [_need(data, "sol1", str, where, shape), _need(data, "sol2", str, where, shape)]
        if labels is not None:
            if index >= len(labels):
                raise TaskFileError(f"{labels_path}: has {len(labels)} labels but {path} has more records "
                                    f"(record at line {number}); the two files must be a pair")
            gold = _int_label(labels[index], f"{labels_path}:{index + 1}", "label")
        elif "label" in data:
            gold = _int_label(data["label"], where, "label")
        else:
            raise TaskFileError(f"{where}: no label: put {labels_path.name} (one 0/1 per line) beside "
                                f"{path.name}, or a 'label' field in each record")
        out.append(_checked(where, f"Question: {goal}\nAnswer:", sols, gold))
    if labels is not None and len(labels) != len(out):
        raise TaskFileError(f"{labels_path}: has {len(labels)} labels for {len(out)} records in {path}; "
                            "the two files must be a pair")
    return out


def _mmlu_csv(path: Path) -> list[Choice]:
    subject = path.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val").replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    out = []
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            where = f"{path}:{number}"
            if len(row) != 6:
                raise TaskFileError(f"{where}: an MMLU row has 6 fields (question, A, B, C, D, answer), "
                                    f"this one has {len(row)}")
            question, *options, answer = row
            if answer.strip() not in "ABCD" or len(answer.strip()) != 1:
                raise TaskFileError(f"{where}: the answer must be one of A, B, C, D, got {answer!r}")
            prompt = question.strip() + "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", options))
            out.append(Choice(header + prompt + "\nAnswer:", ("A", "B", "C", "D"), "ABCD".index(answer.strip())))
    return out


def read_mmlu(path: Path) -> list[Choice]:
    """MMLU's data/test/{subject}_test.csv files (no header: question, A, B, C, D, answer letter),
    given as one file or a folder of them (subjects in name order)."""
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise FileNotFoundError(f"no .csv files in {path}; point mmlu at MMLU's data/test folder")
        return [choice for file in files for choice in _mmlu_csv(file)]
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    return _mmlu_csv(path)


READERS = {"hellaswag": read_hellaswag, "arc_easy": read_arc, "arc_challenge": read_arc,
           "mmlu": read_mmlu, "piqa": read_piqa, "mc": read_generic}
# Where each official task is looked for under --data-dir when no path is given (its published name).
OFFICIAL_FILES = {"hellaswag": "hellaswag_val.jsonl", "arc_easy": "ARC-Easy-Test.jsonl",
                  "arc_challenge": "ARC-Challenge-Test.jsonl", "mmlu": "test", "piqa": "valid.jsonl"}


def find_official(name: str, data_dir: Path) -> Path | None:
    """The official file of task `name` anywhere under data_dir (first in path order), or None."""
    if not data_dir.is_dir():
        return None
    target = OFFICIAL_FILES[name]
    hits = sorted(p for p in data_dir.rglob(target) if p.is_dir() == (name == "mmlu"))
    return hits[0] if hits else None


LM_EVAL_YAML = """\
# lm-evaluation-harness task over the local file beside it, written by tool/evaluate.py --lm-eval-tasks.
# Run: HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf --model_args pretrained=FOLDER \\
#        --include_path {folder} --tasks {task} --device cpu
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_lm_eval_task(questions: list[Choice], name: str, out_dir: Path) -> str:
    """Write the questions as a generic {"query", "choices", "gold"} JSONL and an lm-eval task YAML
    that reads it (task name `etude_<name>`), so lm-eval can score exactly what we score. Returns
    the lm-eval task name."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    task = f"etude_{name}"
    data = out_dir / f"{task}.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for q in questions:
            handle.write(json.dumps({"query": q.query, "choices": list(q.choices), "gold": q.gold},
                                    ensure_ascii=False) + "\n")
    (out_dir / f"{task}.yaml").write_text(LM_EVAL_YAML.format(folder=out_dir, task=task, data=json.dumps(str(data))),
                                          encoding="utf-8")
    return task
