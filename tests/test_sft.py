"""Supervised fine-tuning and chat at toy size: the exact label mask, packing, learning a
trained answer, exact resume, batched == one-by-one greedy, and the chat program."""

import json
import os
import signal
import subprocess
import sys

import pytest

from config import ROOT
from inference.inference import Chat, StreamDecoder
from inference.inference import main as chat_main
from model.checkpoint import load_model_folder
from model.model import IGNORE_INDEX
from model.tokenizer import load_tokenizer
from train.data import DataError
from train.sft_data import PackedConversations, load_sft_data
from train.train_pretrain import main as pretrain_main
from train.train_sft import main as sft_main

from tests.helpers import (QA, TOY_MODEL, assert_same_losses, checkpoint_step, launch, wait_for, write_corpus,
                           write_sft)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_tokenizer_dir):
    """A toy pretrained model, SFT data, and an SFT model trained on it."""
    folder = tmp_path_factory.mktemp("toy")
    write_corpus(folder / "pretrain.jsonl", 300, seed=1)
    write_corpus(folder / "pretrain.val.jsonl", 30, seed=2)
    write_sft(folder / "sft.jsonl", repeats=12)
    write_sft(folder / "sft.val.jsonl", repeats=1)
    common = ["--tokenizer-dir", str(tiny_tokenizer_dir), "--device", "cpu", "--log-every", "100",
              "--eval-batches", "2"]
    assert pretrain_main(["--data", str(folder / "pretrain.jsonl"), "--val-data", str(folder / "pretrain.val.jsonl"),
                          "--out-dir", str(folder / "pretrained"), "--model-config", TOY_MODEL, "--seq-len", "128",
                          "--batch-size", "8", "--max-steps", "40", "--lr", "3e-3", "--eval-every", "40", *common]) == 0
    sft_args = ["--init-from", str(folder / "pretrained"), "--data", str(folder / "sft.jsonl"),
                "--val-data", str(folder / "sft.val.jsonl"), "--batch-size", "4", "--lr", "3e-3",
                "--warmup-steps", "10", "--eval-every", "1000", *common]
    assert sft_main([*sft_args, "--out-dir", str(folder / "sft"), "--max-steps", "250"]) == 0
    return {"folder": folder, "sft_args": sft_args, "tokenizer": load_tokenizer(tiny_tokenizer_dir)}


def test_sft_label_mask_golden(tiny_tokenizer_dir):
    """Which target ids are trained in a packed window: exactly the assistant replies and their
    closing <|im_end|>, nothing of the system prompt, the user turns or the role headers."""
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                    {"role": "assistant", "content": "Goodbye."}]
    ids, mask = tokenizer.render_chat(conversation)
    data = PackedConversations.from_rendered([(ids, mask)], seq_len=len(ids) + 5, pad_id=tokenizer.pad_id)
    inputs, targets = data.get_batch([0])
    assert inputs[0, :len(ids)].tolist() == ids and inputs[0, len(ids):].eq(tokenizer.pad_id).all()
    trained = targets[0][targets[0] != IGNORE_INDEX].tolist()
    hello, goodbye = tokenizer.encode("Hello."), tokenizer.encode("Goodbye.")
    assert trained == hello + [tokenizer.im_end_id] + goodbye + [tokenizer.im_end_id]
    # Each trained target sits right after the token that predicts it.
    positions = (targets[0] != IGNORE_INDEX).nonzero().flatten().tolist()
    assert [ids[p + 1] for p in positions] == trained
    header = [tokenizer.im_start_id] + tokenizer.encode("assistant\n")
    first = positions[0]
    assert ids[first + 1 - len(header):first + 1] == header


def test_packing_keeps_conversations_whole_with_little_padding(toy):
    tokenizer = toy["tokenizer"]
    data = load_sft_data(toy["folder"] / "sft.jsonl", tokenizer, seq_len=128, verbose=False)
    assert data.pad_fraction < 0.1
    assert data.truncated == 0
    total_trained = sum(int((data.window(i)[1] != IGNORE_INDEX).sum()) for i in range(len(data)))
    assert total_trained == data.trained_tokens()
    expected = 0
    with open(toy["folder"] / "sft.jsonl") as handle:
        for line in handle:
            _, mask = tokenizer.render_chat(json.loads(line)["conversations"])
            expected += sum(mask)
    assert total_trained == expected


def test_bad_sft_lines_are_named(tiny_tokenizer_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"conversations": [{"role": "robot", "content": "hi"}]}\n', encoding="utf-8")
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(DataError, match="bad.jsonl:2: .*role 'robot'"):
        load_sft_data(path, tokenizer, 64, verbose=False)
    assert load_sft_data(path, tokenizer, 64, skip_bad_lines=True, verbose=False).num_samples == 1


def test_sft_learns_trained_answers_and_ends_its_turn(toy):
    folder, tokenizer = toy["folder"], toy["tokenizer"]
    records = [json.loads(line) for line in (folder / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]
    chat = Chat(load_model_folder(folder / "sft"), tokenizer, max_new_tokens=30, temperature=0)
    for question, answer in QA[:3]:
        ids, _ = chat.prompt_ids([{"role": "user", "content": question}])
        generated = list(chat.model.generate(ids, 30, stop_ids=chat.stop_ids))
        assert generated[-1] == tokenizer.im_end_id, "the model ends its turn by itself"
        assert tokenizer.decode(generated[:-1]) == answer


def test_batched_greedy_equals_one_by_one(toy):
    chat = Chat(load_model_folder(toy["folder"] / "sft"), toy["tokenizer"], max_new_tokens=24, temperature=0)
    conversations = [[{"role": "user", "content": q}] for q, _ in QA] + [
        [{"role": "system", "content": "You are a toy."}, {"role": "user", "content": "Where does the sun rise?"}],
        [{"role": "user", "content": "an unseen question about the quiet hills"}]]
    one_by_one = [chat.answer(messages) for messages in conversations]
    assert chat.answer_batch(conversations) == one_by_one
    assert len(set(one_by_one)) > 3


def test_sampling_seed_fixes_the_text_and_no_seed_varies_it(toy):
    model = load_model_folder(toy["folder"] / "sft")
    messages = [{"role": "user", "content": QA[0][0]}]

    def sample(seed):
        return Chat(model, toy["tokenizer"], max_new_tokens=24, temperature=1.5, top_k=None, top_p=None,
                    seed=seed).answer(messages)

    assert sample(7) == sample(7)
    # Unseeded chats draw a fresh seed each (a bare torch.Generator would start every run alike).
    unseeded = [Chat(model, toy["tokenizer"]).generator.initial_seed() for _ in range(3)]
    assert len(set(unseeded)) == 3
    assert len({sample(None) for _ in range(6)}) > 1  # 17 of 20 seeded samples differ


def test_sft_resume_is_exact(toy, tmp_path):
    # Fresh fp32 processes on one CPU thread. With two threads, about one fresh SFT run in six on
    # this machine differs from the others by 1.1e-4 in the loss from the first steps on, before any
    # resume (one of two outcomes; torch.use_deterministic_algorithms and MKL_CBWR do not change it,
    # one thread does), which says nothing about resuming. On one thread the comparison is exact.
    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [*toy["sft_args"], "--max-steps", "40", "--save-every", "10", "--dtype", "fp32"]
    reference = tmp_path / "reference"
    done = launch("train/train_sft.py", [*args, "--out-dir", str(reference)], one_thread)
    output = done.communicate(timeout=300)[0]
    assert done.returncode == 0, output
    interrupted = tmp_path / "interrupted"
    process = launch("train/train_sft.py", [*args, "--out-dir", str(interrupted)], one_thread)
    wait_for(lambda: checkpoint_step(interrupted) >= 10, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert 0 < checkpoint_step(interrupted) < 40
    resumed = launch("train/train_sft.py", [*args, "--out-dir", str(interrupted)], one_thread)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert_same_losses(interrupted, reference)


def test_one_shot_chat_without_a_terminal(toy):
    question, answer = QA[0]
    done = subprocess.run([sys.executable, str(ROOT / "inference" / "inference.py"), "--model",
                           str(toy["folder"] / "sft"), "--prompt", question, "--temperature", "0"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == answer


def test_batch_mode_files(toy, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in QA[:4]), encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    assert chat_main(["--model", str(toy["folder"] / "sft"), "--input", str(prompts), "--output", str(answers),
                      "--temperature", "0", "--batch-size", "3"]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [q for q, _ in QA[:4]]
    assert [r["answer"] for r in rows] == [a for _, a in QA[:4]]


def test_long_history_drops_oldest_turns(toy, capsys):
    chat = Chat(load_model_folder(toy["folder"] / "sft"), toy["tokenizer"], max_new_tokens=16, temperature=0)
    history = [{"role": "system", "content": "You are a toy."}]
    for i in range(40):
        history += [{"role": "user", "content": f"question number {i} about the cat"},
                    {"role": "assistant", "content": "The cat sat on the mat."}]
    history.append({"role": "user", "content": "What color is the sky?"})
    ids, note = chat.prompt_ids(history)
    assert note and "dropped" in note
    assert len(ids) <= chat.model.config.max_seq_len - 16
    assert ids[:len(chat.tokenizer.render_chat(history[:1])[0])] == chat.tokenizer.render_chat(history[:1])[0]
    assert chat.tokenizer.decode(ids).endswith("What color is the sky?<|im_end|>\n<|im_start|>assistant\n")


def test_stream_decoder_holds_back_partial_characters(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    text = "你好 😀 world"
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(t) for t in tokenizer.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_int8_chat_answers_and_refuses_what_it_cannot_do(toy, capsys):
    """--int8 decodes through the int8 copy (model/decoding.py quantize_int8): on the toy model the
    trained answers survive the rounding; a dtype beside it is refused."""
    model = str(toy["folder"] / "sft")
    for question, answer in QA[:3]:
        assert chat_main(["--model", model, "--prompt", question, "--temperature", "0", "--int8"]) == 0
        assert capsys.readouterr().out.strip() == answer
    assert chat_main(["--model", model, "--prompt", "hi", "--int8", "--dtype", "bf16"]) == 2
    assert "drop --dtype" in capsys.readouterr().err


def test_chat_refuses_empty_prompt_and_missing_model(tmp_path, capsys):
    assert chat_main(["--prompt", "   "]) == 2
    assert chat_main(["--model", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    assert "no model folder" in capsys.readouterr().err


def test_sft_refuses_missing_init(tmp_path, capsys):
    assert sft_main(["--init-from", str(tmp_path / "none"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "train/train_pretrain.py" in capsys.readouterr().err



