"""Fixtures shared by the test files: a tiny corpus and a vocab-512 tokenizer trained on it once
per test session (the model, data and trainer tests reuse it)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from train.train_tokenizer import main as train_tokenizer_main

TINY_VOCAB_SIZE = 512

ENGLISH = ("the a cat dog sat ran on under mat barn old red green tall quiet bird sang tree sun rose hill "
           "river house small big happy sad today tomorrow morning evening good great thanks please help "
           "question answer story book read write learn model train data token water light world people "
           "time day night friend family school work music food city").split()
CHAT = ("Hello!", "Hi there.", "How are you?", "I am fine, thanks.", "What is your name?",
        "I'm Etude, a helpful assistant.", "Can you help me?", "Sure, happy to help.", "user", "assistant",
        "system", "Goodbye!")
CHINESE = ("你好", "谢谢", "今天", "天气", "很好", "我们", "学习", "中文", "朋友", "喜欢", "音乐", "你是谁", "助手", "世界")
EMOJI = ("😀", "🎉", "👍", "❤️")


def tiny_corpus(n_docs: int = 1200, seed: int = 0) -> list[str]:
    """Deterministic documents mixing English sentences, chat phrases, Chinese and emoji."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(2, 5)):
            kind = rng.random()
            if kind < 0.55:
                words = [rng.choice(ENGLISH) for _ in range(rng.randint(4, 12))]
                parts.append(" ".join(words).capitalize() + rng.choice(".!?"))
            elif kind < 0.8:
                parts.append(rng.choice(CHAT))
            elif kind < 0.95:
                parts.append("".join(rng.choice(CHINESE) for _ in range(rng.randint(2, 6))) + "。")
            else:
                parts.append(rng.choice(EMOJI) + f" {rng.randint(0, 999)}")
        docs.append(" ".join(parts))
    return docs


@pytest.fixture(scope="session")
def tiny_text_corpus(tmp_path_factory) -> Path:
    """A .txt corpus (documents separated by blank lines) of generated text, ~100 KB."""
    path = tmp_path_factory.mktemp("tiny_corpus") / "corpus.txt"
    path.write_text("\n\n".join(tiny_corpus()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_text_corpus) -> Path:
    """A byte-level BPE tokenizer with vocabulary 512 (tokenizer.json + transformers config files)."""
    out_dir = tmp_path_factory.mktemp("tiny_tokenizer")
    for step in ("train", "hf"):
        code = train_tokenizer_main([step, "--data", str(tiny_text_corpus), "--vocab-size", str(TINY_VOCAB_SIZE),
                                     "--out-dir", str(out_dir)])
        assert code == 0, f"training the test tokenizer failed at step {step!r}"
    return out_dir
