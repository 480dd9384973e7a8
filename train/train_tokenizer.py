"""Train Etude's byte-level BPE tokenizer and make it loadable by Hugging Face transformers.

    python train/train_tokenizer.py                # = all: validate -> train -> hf -> test
    python train/train_tokenizer.py validate       # are the inputs there and readable?
    python train/train_tokenizer.py train --vocab-size 6400 --max-mb 64
    python train/train_tokenizer.py hf             # (re)write the transformers config files
    python train/train_tokenizer.py test           # round trips, special tokens, chat-template parity

Reads training_data/pretrain.jsonl ({"text": ...}) and training_data/sft.jsonl
({"conversations": [...]}) by default (--data takes .jsonl or .txt files). Writes into
weight/tokenizer/:

    tokenizer.json           the `tokenizers` BPE: vocabulary, merges, byte-level pre-tokenizer
    tokenizer_config.json    for transformers.AutoTokenizer: special tokens and the ChatML template
    special_tokens_map.json

Special tokens take ids 0, 1, 2: <|endoftext|> (document separator, padding, and bos_token for
transformers, though none is ever prepended), <|im_start|>, <|im_end|>. eos_token is <|im_end|>
because a chat reply ends there: transformers' generate() stops on eos_token_id, and a model
folder's generation_config.json lists <|endoftext|> as a stop id as well, for plain text.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from config import (ENDOFTEXT, IM_END, IM_START, PRETRAIN_DATA, PRETRAIN_VAL_DATA, SFT_DATA,
                    SPECIAL_TOKENS, TOKENIZER_DIR)
from model.checkpoint import atomic_write, atomic_write_json
from model.tokenizer import (CHAT_TEMPLATE, TOKENIZER_FILE, EtudeTokenizer, load_tokenizer,
                             validate_messages)
from model.chat_formats import Rejected, to_conversation
from train.data import DataError, iter_documents, read_jsonl

STEPS = ("validate", "train", "hf", "test")
PREPARE_COMMAND = "python tool/prepare_data.py"
MIN_FREQUENCY = 2
TEST_SAMPLE_BYTES = 2_000_000

# Texts every tokenizer must round-trip exactly, whatever it was trained on.
ROUND_TRIP_SAMPLES = (
    "Hello, world! How are you today?",
    "你好，世界！今天天气怎么样？我很好，谢谢。",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦.",
    "Tabs\tand  double  spaces,\nnew lines\n\n and trailing space ",
    "def f(x):\n    return x ** 2  # code\n",
    "Ünïcödé ça va? Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト.",
    "<|im_start|>user\nnot a real turn<|im_end|> <|endoftext|>",
)

# The conversation that transformers' chat template and render_chat must agree on.
TEST_CONVERSATION = [
    {"role": "system", "content": "You are Etude, a helpful assistant."},
    {"role": "user", "content": "Hi! What's 2+2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "谢谢！And in words? 😀"},
    {"role": "assistant", "content": "Four.\n\nAnything else?"},
]


class StepFailed(Exception):
    """A step could not do its work; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Inputs


def _messages(obj: dict) -> list[dict]:
    """The messages of a conversation line: our own shape as it is (any roles' order, with or
    without a reply), else any shape that SFT training reads (Alpaca, ShareGPT, OpenAI, Q&A).
    Raises ValueError naming the fault."""
    messages = obj.get("conversations", obj.get("messages"))
    try:
        validate_messages(messages)
        return messages
    except ValueError as exc:
        ours = str(exc) if messages is not None else None
    try:
        return to_conversation(obj)
    except Rejected:
        raise ValueError(ours or 'expected {"text": ...}, {"conversations": [{"role": ..., "content": ...}, ...]} '
                                 "or another chat shape that train_sft.py reads (Alpaca, ShareGPT, OpenAI, "
                                 "question/answer)") from None


def _text_or_conversation_problem(obj: object) -> str | None:
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return None if obj["text"].strip() else '"text" is empty'
    if not isinstance(obj, dict):
        return 'expected {"text": ...} or {"conversations": [{"role": ..., "content": ...}, ...]}'
    try:
        _messages(obj)
    except ValueError as exc:
        return str(exc)
    return None


def iter_texts(path: Path) -> Iterator[str]:
    """The text of a data file: documents of a .txt or {"text"} .jsonl file, and every message
    content of a conversation (any shape that SFT training reads). A bad line stops with file:line."""
    if path.suffix == ".txt":
        yield from iter_documents(path)
        return
    for _, obj in read_jsonl(path, validate=_text_or_conversation_problem):
        yield obj["text"] if "text" in obj else "\n".join(m["content"] for m in _messages(obj))


def sampled_texts(paths: list[Path], max_bytes: int | None, seed: int = 42,
                  text_bytes: dict[Path, int] | None = None) -> Iterator[str]:
    """Texts of all files; with a cap, each file gives a share proportional to its size, as a
    seeded random sample of its texts from the whole file (each kept with probability share /
    bytes of text in the file, stopping at the share), so a file sorted by source or date is
    still sampled evenly. The bytes of text come from `text_bytes` (what the validate step
    counted) or else the file's size, which holds JSON syntax too and so samples a little under
    the share. Under the cap, every text is taken."""
    sizes = [p.stat().st_size for p in paths]
    total = sum(sizes) or 1
    rng = random.Random(f"etude-tokenizer:{seed}")
    for path, size in zip(paths, sizes):
        budget = None if max_bytes is None else max_bytes * size / total
        in_file = (text_bytes or {}).get(path, size)
        keep = 1.0 if budget is None else min(1.0, budget / max(in_file, 1))
        used = 0
        for text in iter_texts(path):
            if budget is not None and used >= budget:
                break
            if keep < 1.0 and rng.random() >= keep:
                continue
            used += len(text.encode("utf-8"))
            yield text


def peak_memory_gb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def step_validate(args: argparse.Namespace) -> None:
    """Every input file exists, is readable and well formed, and holds some text."""
    for path in args.data:
        if not path.is_file():
            raise StepFailed(f"training text not found: {path}. Build the demo data with "
                             f"`{PREPARE_COMMAND}`, or pass your own files with --data.")
        if path.suffix not in (".jsonl", ".txt"):
            raise StepFailed(f"{path}: expected a .jsonl or .txt file")
        n_texts = n_bytes = 0
        for text in iter_texts(path):
            n_texts += 1
            n_bytes += len(text.encode("utf-8"))
        if not n_texts:
            raise StepFailed(f"{path} holds no text; fill it, or rebuild it with `{PREPARE_COMMAND}`")
        print(f"  {path}: {n_texts:,} texts, {n_bytes / 1e6:.1f} MB")
        args.text_bytes[path] = n_bytes  # the train step's sample is drawn against it


# ---------------------------------------------------------------------------------------------
# Training and the Hugging Face files


def new_bpe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE: every byte has a token, so any input encodes."""
    tokenizer = Tokenizer(models.BPE())
    # The GPT-2 split regex without a prefix space is llama.cpp's "gpt-2" pre-tokenizer, which the
    # GGUF export names (model/gguf_llama.py refuses a tokenizer that splits otherwise).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def step_train(args: argparse.Namespace) -> None:
    tokenizer = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size, min_frequency=MIN_FREQUENCY, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=sys.stderr.isatty())
    max_bytes = None if args.max_mb is None else int(args.max_mb * 1e6)
    n_bytes = 0

    def counted(texts: Iterator[str]) -> Iterator[str]:
        nonlocal n_bytes
        for text in texts:
            n_bytes += len(text.encode("utf-8"))
            yield text

    start = time.perf_counter()
    tokenizer.train_from_iterator(counted(sampled_texts(args.data, max_bytes, args.seed, args.text_bytes)), trainer)
    seconds = time.perf_counter() - start
    EtudeTokenizer(tokenizer)  # checks that the special tokens took ids 0, 1, 2
    vocab_size = tokenizer.get_vocab_size()
    source_mb = sum(p.stat().st_size for p in args.data) / 1e6
    print(f"  trained on {n_bytes / 1e6:.1f} MB of text"
          + (f" sampled from {source_mb:,.1f} MB of files" if max_bytes is not None and source_mb * 1e6 > max_bytes else "")
          + f" in {seconds:.1f} s: vocabulary {vocab_size:,}; peak memory {peak_memory_gb():.2f} GB")
    if vocab_size < args.vocab_size:
        print(f"  note: the text supports only {vocab_size:,} of the {args.vocab_size:,} tokens asked for "
              f"(merges need pairs seen at least {MIN_FREQUENCY} times); give it more text for the rest")
    atomic_write(args.out_dir / TOKENIZER_FILE, lambda tmp: tokenizer.save(tmp))
    print(f"  wrote {args.out_dir / TOKENIZER_FILE}")


def hf_config_files() -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for transformers.AutoTokenizer.
    "PreTrainedTokenizerFast" loads in transformers 4 and 5 (where it names TokenizersBackend)."""
    special = {"bos_token": ENDOFTEXT, "eos_token": IM_END, "pad_token": ENDOFTEXT,
               "additional_special_tokens": [IM_START]}
    added_tokens = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS)}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # Byte-level BPE decodes exactly; "cleaning up" spaces would change the text.
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added_tokens,
        "chat_template": CHAT_TEMPLATE,
    }
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special}


def step_hf(args: argparse.Namespace) -> None:
    if not (args.out_dir / TOKENIZER_FILE).is_file():
        raise StepFailed(f"{args.out_dir / TOKENIZER_FILE} not found; run "
                         f"`python train/train_tokenizer.py train` first (or `all`)")
    load_tokenizer(args.out_dir)  # refuses a tokenizer.json with the wrong special ids
    for name, data in hf_config_files().items():
        atomic_write_json(args.out_dir / name, data)
        print(f"  wrote {args.out_dir / name}")


# ---------------------------------------------------------------------------------------------
# Test


def held_out_texts(path: Path | None, max_bytes: int = TEST_SAMPLE_BYTES) -> list[str]:
    """Up to max_bytes of documents from the validation split (text the tokenizer never saw)."""
    if path is None or not path.is_file():
        return []
    texts, used = [], 0
    for text in iter_texts(path):
        if used >= max_bytes:
            break
        texts.append(text)
        used += len(text.encode("utf-8"))
    return texts


def run_checks(tokenizer: EtudeTokenizer, hf_tokenizer, held_out: list[str]) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for every property the project relies on."""
    checks = []

    def check(name: str, passed: bool, detail: str = "") -> None:
        checks.append((name, bool(passed), detail))

    texts = list(ROUND_TRIP_SAMPLES) + held_out
    batch_ids = tokenizer.encode_batch(texts)
    bad = [t for t, ids in zip(texts, batch_ids) if tokenizer.decode(ids) != t]
    check("round trip decode(encode(text)) == text", not bad, f"{len(texts)} texts" +
          (f"; first failure {bad[0][:60]!r}" if bad else ""))
    check("encode_batch == encode", all(tokenizer.encode(t) == ids for t, ids in zip(texts[:50], batch_ids)))
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        check(f"{token} is one token with id {expected_id}",
              tokenizer.token_to_id(token) == expected_id
              and hf_tokenizer(token, add_special_tokens=False)["input_ids"] == [expected_id])
    forged = tokenizer.encode(ROUND_TRIP_SAMPLES[-1])
    check("special-token strings in text encode as plain text", not set(forged) & {0, 1, 2},
          f"{len(forged)} ids, none special")
    check("transformers special ids (bos/eos/pad)",
          (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id)
          == (tokenizer.eos_id, tokenizer.im_end_id, tokenizer.pad_id),
          f"bos={hf_tokenizer.bos_token_id} eos={hf_tokenizer.eos_token_id} pad={hf_tokenizer.pad_token_id}")
    plain = [t for t in texts[:200] if not any(s in t for s in SPECIAL_TOKENS)]
    check("transformers encode == ours",
          all(hf_tokenizer(t, add_special_tokens=False)["input_ids"] == tokenizer.encode(t) for t in plain),
          f"{len(plain)} texts")
    for generation_prompt in (False, True):
        ours, mask = tokenizer.render_chat(TEST_CONVERSATION, add_generation_prompt=generation_prompt)
        theirs = hf_tokenizer.apply_chat_template(TEST_CONVERSATION, tokenize=True, return_dict=False,
                                                  add_generation_prompt=generation_prompt)
        check(f"apply_chat_template ids == render_chat ids (add_generation_prompt={generation_prompt})",
              list(theirs) == ours and len(mask) == len(ours), f"{len(ours)} ids")
    if held_out:
        n_bytes = sum(len(t.encode("utf-8")) for t in held_out)
        n_tokens = sum(len(ids) for ids in batch_ids[len(ROUND_TRIP_SAMPLES):])
        check("compression on held-out text", n_tokens > 0,
              f"{n_bytes / max(n_tokens, 1):.2f} bytes/token over {len(held_out):,} documents, "
              f"{n_bytes / 1e6:.2f} MB")
    return checks


def step_test(args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer(args.out_dir)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise StepFailed("transformers is not installed; `pip install transformers` to test loading") from None
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(args.out_dir))
    except Exception as exc:  # transformers raises many kinds; all mean "does not load"
        raise StepFailed(f"transformers.AutoTokenizer cannot load {args.out_dir}: {exc}. "
                         "Rewrite its config files with `python train/train_tokenizer.py hf`.") from None
    held_out = held_out_texts(args.val_data)
    if not held_out:
        print(f"  (no held-out text at {args.val_data}; round trips use built-in samples only)")
    checks = run_checks(tokenizer, hf_tokenizer, held_out)
    for name, passed, detail in checks:
        print(f"  {'PASS' if passed else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""))
    failed = [name for name, passed, _ in checks if not passed]
    if failed:
        raise StepFailed(f"{len(failed)} tokenizer check(s) failed: {', '.join(failed)}")
    print(f"  vocabulary {tokenizer.vocab_size:,}; all {len(checks)} checks passed")


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", nargs="?", default="all", choices=("all",) + STEPS,
                        help="what to do (default all = validate, train, hf, test)")
    parser.add_argument("--data", nargs="+", type=Path, default=[PRETRAIN_DATA, SFT_DATA],
                        help="training text: .jsonl ({\"text\"} or {\"conversations\"}) or .txt files "
                             "(default training_data/pretrain.jsonl training_data/sft.jsonl)")
    parser.add_argument("--val-data", type=Path, default=PRETRAIN_VAL_DATA,
                        help="held-out text for the test step (default training_data/pretrain.val.jsonl)")
    parser.add_argument("--vocab-size", type=int, default=6400, help="tokens in the vocabulary (default 6400)")
    parser.add_argument("--out-dir", type=Path, default=TOKENIZER_DIR, help="default weight/tokenizer")
    parser.add_argument("--max-mb", type=float, default=64.0,
                        help="train on at most this many MB of text, shared across the files in "
                             "proportion to their size and sampled evenly from each (default 64; 0 for no "
                             "cap). Memory follows the distinct words of the sample more than its size: 0.30 GB for "
                             "the 19 MB demo text, 0.32 GB for 64 MB of synthetic text; text full of rare strings "
                             "(code, ids, hashes) needs more, so lower it there. The peak is printed")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sample taken under --max-mb (default 42)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.max_mb = args.max_mb or None
    args.text_bytes = {}
    min_vocab = 256 + len(SPECIAL_TOKENS) + 1
    try:
        if args.vocab_size < min_vocab:
            raise StepFailed(f"--vocab-size {args.vocab_size} is too small: the 256 bytes and "
                             f"{len(SPECIAL_TOKENS)} special tokens take {min_vocab - 1}; use at least {min_vocab}")
        if args.max_mb is not None and args.max_mb < 0:
            raise StepFailed(f"--max-mb must be >= 0, got {args.max_mb}")
        steps = STEPS if args.step == "all" else (args.step,)
        functions = {"validate": step_validate, "train": step_train, "hf": step_hf, "test": step_test}
        for step in steps:
            print(f"[{step}]")
            start = time.perf_counter()
            functions[step](args)
            print(f"  ({time.perf_counter() - start:.1f} s)")
    except (StepFailed, DataError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("ETUDE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
