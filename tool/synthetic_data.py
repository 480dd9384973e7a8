"""Synthetic pretraining and SFT JSONL of any size, fast and in constant memory: benchmark inputs.

    python tool/synthetic_data.py pretrain /tmp/pretrain_1000mb.jsonl --mb 1000
    python tool/synthetic_data.py sft /tmp/sft_1000mb.jsonl --mb 1000 --seed 1

pretrain: {"text": ...} per line. Documents of log-normal length (median ~300 words, mean ~3.6 KB,
from a handful of words up to ~50k), paragraphs and sentences, words drawn from a Zipf law over a
vocabulary of ~24k: English function words first, then made-up words, about 6% of the vocabulary
non-ASCII (accented Latin, Cyrillic, Greek, CJK, a few emoji), numbers, quotes and backslashes
(so JSON escaping is exercised).
sft: {"conversations": [{"role": "system|user|assistant", "content": ...}, ...]} per line. About
60% single-turn, the rest 2-6 exchanges; ~30% open with a system prompt (from a pool of 64, a few
long); messages of log-normal length (user median ~15 words, assistant ~50: Alpaca-like), and
1% of conversations carry a long message (a pasted document or a long answer, 2k-12k words). So
most single-turn chats fit a 256-token window and get packed, most multi-turn ones do not.

Words are sampled with numpy a chunk (~4 MB of text) at a time and written in large writes, so
generation runs at 10-20 MB/s on one busy core and its memory (~250 MB at most) does not depend
on --mb. The output is a function
of (kind, seed) alone: a smaller file is a prefix of a larger one with the same seed. The file
holds whole lines only and stops at the last line that fits in --mb (it is written to <out>.part,
then renamed).
"""

from __future__ import annotations

import argparse
import json
import operator
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FUNCTION_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so what more will no can its who up "
    "out some into them these than then also only time two may first over new like other after could most any "
    "about people year between made under where before world state city work through back during years").split()
CONSONANTS = "b c d f g h j k l m n p r s t v w z br ch cl dr fr gr pl pr sh st th tr".split()
VOWELS = "a e i o u ai ea ee ie oo ou y".split()
ACCENTED = "é è ê à â ü ö ä ñ ç ø å í ó ú".split()
CYRILLIC = "абвгдежзиклмнопрстуфхцчшыэюя"
GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
CJK = (0x4E00, 0x9FA5)
EMOJI = "😀 🚀 🌍 ✨ 🔥 👍 🎉 📚".split()
PUNCTUATION = ("", ",", ".", ".\n\n")  # after a word: none, comma, sentence end, paragraph end
PUNCTUATION_P = (0.86, 0.07, 0.055, 0.015)
SENTENCE_END = 2  # index into PUNCTUATION: the full stop every text ends with
WORDS_PER_CHUNK = 700_000  # ~4 MB of text per numpy draw
KINDS = ("pretrain", "sft")


def build_vocabulary(size: int = 24_000, seed: int = 1234) -> list[str]:
    """The word list, most frequent first: function words, made-up words, then the rest mixed in
    (non-ASCII, numbers, quoted words, a path with backslashes). Fixed by `seed`."""
    rng = random.Random(seed)  # per-call overhead matters here, not vectorisation: 24k small draws

    def made_up(vowels: list[str], low: int, high: int) -> str:
        return "".join(rng.choice(CONSONANTS) + rng.choice(vowels) for _ in range(rng.randint(low, high)))

    words = list(FUNCTION_WORDS)
    seen = set(words)
    while len(words) < size:
        roll = rng.random()
        if roll < 0.025:
            word = "".join(rng.choices(CYRILLIC, k=rng.randint(3, 9)))
        elif roll < 0.035:
            word = "".join(rng.choices(GREEK, k=rng.randint(3, 8)))
        elif roll < 0.05:
            word = "".join(chr(rng.randint(*CJK)) for _ in range(rng.randint(1, 3)))
        elif roll < 0.06:
            word = made_up(VOWELS + ACCENTED, 1, 3)
        elif roll < 0.063:
            word = rng.choice(EMOJI)
        elif roll < 0.08:
            word = str(rng.randrange(3000)) if rng.random() < 0.7 else f"{rng.random() * 100:.1f}%"
        elif roll < 0.083:
            word = '"' + made_up(VOWELS, 2, 2) + '"'
        elif roll < 0.0835:
            word = "C:\\data\\" + made_up(VOWELS, 2, 2)
        else:
            word = made_up(VOWELS, 1, 4)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


class WordSampler:
    """Draws text as JSON-escaped string pieces: every (word, capitalised?, punctuation) form is
    escaped once up front, so a text is only a join of table entries."""

    def __init__(self, rng: np.random.Generator, vocabulary: list[str]):
        self.rng = rng
        self.n_words = len(vocabulary)
        self.punct_cdf = np.cumsum(PUNCTUATION_P)[:-1]
        # A paragraph end is followed by the next word directly, anything else by a space.
        self.forms = [json.dumps((word[:1].upper() + word[1:] if cap else word) + punct
                                 + ("" if punct.endswith("\n") else " "), ensure_ascii=False)[1:-1]
                      for word in vocabulary for cap in (False, True) for punct in PUNCTUATION]

    def zipf(self, count: int) -> np.ndarray:
        """`count` word ranks from a Zipf-Mandelbrot law (p(r) ~ 1 / (r + q)), by inverting its
        continuous cdf: vectorised, no search."""
        q = 2.7
        ranks = q * np.exp(self.rng.random(count) * np.log((self.n_words + q) / q)) - q
        return ranks.astype(np.int64).clip(0, self.n_words - 1)

    def texts(self, lengths: np.ndarray) -> list[str]:
        """One JSON-escaped text (no quotes around it) of lengths[i] words for each i: sentences
        start capitalised, and every text ends with a full stop."""
        total = int(lengths.sum())
        words = self.zipf(total)
        punct = np.searchsorted(self.punct_cdf, self.rng.random(total))
        ends = np.cumsum(lengths)
        punct[ends - 1] = SENTENCE_END
        capital = np.ones(total, dtype=np.int64)
        capital[1:] = punct[:-1] >= SENTENCE_END
        starts = ends - lengths
        capital[starts] = 1
        forms = operator.itemgetter(*((words * 2 + capital) * len(PUNCTUATION) + punct).tolist())(self.forms)
        if total == 1:
            forms = (forms,)
        # Every form ends with its separating space; a text drops its last one.
        return ["".join(forms[a:b])[:-1] for a, b in zip(starts.tolist(), ends.tolist())]


def lognormal_lengths(rng: np.random.Generator, count: int, median: float, sigma: float, low: int,
                      high: int) -> np.ndarray:
    """`count` word counts, log-normal around `median`, clipped to [low, high]."""
    return np.exp(rng.normal(np.log(median), sigma, count)).astype(np.int64).clip(low, high)


def pretrain_chunks(seed: int) -> Iterator[list[str]]:
    """Endless lists of {"text": ...} lines, ~4 MB each."""
    rng = np.random.default_rng([seed, 0])
    sampler = WordSampler(rng, build_vocabulary())
    while True:
        lengths = lognormal_lengths(rng, 1200, median=300, sigma=1.1, low=8, high=50_000)
        yield ['{"text": "' + text + '"}\n' for text in sampler.texts(lengths)]


def sft_chunks(seed: int) -> Iterator[list[str]]:
    """Endless lists of {"conversations": [...]} lines, ~4 MB each."""
    rng = np.random.default_rng([seed, 1])
    sampler = WordSampler(rng, build_vocabulary())
    prompt_lengths = lognormal_lengths(rng, 64, median=20, sigma=1.0, low=4, high=400)
    system_prompts = sampler.texts(prompt_lengths)
    count = 4000
    while True:
        exchanges = np.where(rng.random(count) < 0.6, 1, rng.integers(2, 7, count))
        has_system = rng.random(count) < 0.3
        long_message = rng.random(count) < 0.01
        n_messages = (2 * exchanges).tolist()
        user_lengths = lognormal_lengths(rng, int(exchanges.sum()), median=15, sigma=1.0, low=1, high=2000)
        reply_lengths = lognormal_lengths(rng, int(exchanges.sum()), median=50, sigma=1.0, low=1, high=3000)
        first = np.cumsum(exchanges) - exchanges  # index of each conversation's first exchange
        long_at = first[long_message]
        long_lengths = rng.integers(2000, 12_000, len(long_at))
        pasted = rng.random(len(long_at)) < 0.5  # a pasted document from the user, else a long answer
        user_lengths[long_at[pasted]] = long_lengths[pasted]
        reply_lengths[long_at[~pasted]] = long_lengths[~pasted]
        lengths = np.stack([user_lengths, reply_lengths], axis=1).reshape(-1)  # user, assistant, user, ...
        texts = iter(sampler.texts(lengths))
        prompts = rng.integers(0, len(system_prompts), count).tolist()
        lines = []
        for i in range(count):
            messages = [f'{{"role": "system", "content": "{system_prompts[prompts[i]]}"}}'] if has_system[i] else []
            for turn in range(n_messages[i]):
                role = "assistant" if turn % 2 else "user"
                messages.append(f'{{"role": "{role}", "content": "{next(texts)}"}}')
            lines.append('{"conversations": [' + ", ".join(messages) + "]}\n")
        yield lines


def write_jsonl(path: Path | str, kind: str, target_bytes: int, seed: int = 0) -> dict:
    """Write `kind` ('pretrain' or 'sft') lines to `path` until the next line would pass
    `target_bytes`; return what was written: bytes, lines, seconds, MB/s."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    start = time.perf_counter()
    size = lines = 0
    chunks = pretrain_chunks(seed) if kind == "pretrain" else sft_chunks(seed)
    with open(tmp, "wb") as out:
        for chunk in chunks:
            data = "".join(chunk).encode("utf-8")
            done = size + len(data) >= target_bytes
            if size + len(data) > target_bytes:  # the last chunk: only the lines that fit
                encoded = [line.encode("utf-8") for line in chunk]
                fit = int(np.searchsorted(np.cumsum([len(line) for line in encoded]), target_bytes - size,
                                          side="right"))
                chunk, data = chunk[:fit], b"".join(encoded[:fit])
            out.write(data)
            size += len(data)
            lines += len(chunk)
            if done:
                break
    tmp.replace(path)
    seconds = time.perf_counter() - start
    return {"kind": kind, "path": str(path), "bytes": size, "lines": lines, "seconds": seconds,
            "mb_per_s": size / 1e6 / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS, help="pretrain: {\"text\"} lines; sft: {\"conversations\"} lines")
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    parser.add_argument("--mb", type=float, required=True, help="size of the file in MB (10^6 bytes)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes (default 0)")
    args = parser.parse_args(argv)
    if args.mb <= 0:
        parser.error(f"--mb {args.mb:g}: give a size above 0, e.g. --mb 100")
    report = write_jsonl(args.out, args.kind, int(args.mb * 1e6), args.seed)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
