"""The official openai client, given tools, gets tool_calls from inference/server.py and, after
sending the tool's result back, a final answer: greedy decoding on trained questions, so nothing
depends on luck. On a toy model fitted here (slow: ~1 min with the server's start) and on the demo
SFT model when weight/etude_sft_model exists (python tool/demo.py, or see README "Tool calling")."""

from __future__ import annotations

import json

import pytest
import torch

from config import ROOT, SFT_DIR, EtudeConfig
from model.builtin_tools import BUILTIN_TOOLS, run_tool
from model.chat_markup import parse_reply
from model.checkpoint import save_model_folder
from model.model import EtudeModel
from model.tokenizer import load_tokenizer
from tests.helpers import TOY_MODEL, fit_chats
from tests.test_server import start_server

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -r requirements-test.txt")

pytestmark = pytest.mark.slow


def call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


TRAINED = [
    [{"role": "user", "content": "What is 6 * 7?"}, call("calculator", {"expression": "6 * 7"}),
     {"role": "tool", "content": "42"}, {"role": "assistant", "content": "6 * 7 = 42."}],
    [{"role": "user", "content": "What is 15 + 27?"}, call("calculator", {"expression": "15 + 27"}),
     {"role": "tool", "content": "42"}, {"role": "assistant", "content": "15 + 27 = 42."}],
    [{"role": "user", "content": "What day is it?"}, call("date", {}),
     {"role": "tool", "content": "2026-12-03 (Thursday)"}, {"role": "assistant", "content": "It is Thursday."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]


@pytest.fixture(scope="module")
def toy_tool_model(tmp_path_factory, tiny_tokenizer_dir):
    """A toy model fitted to the TRAINED conversations with the built-in tools offered."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = EtudeModel(EtudeConfig(vocab_size=tokenizer.vocab_size, max_seq_len=512, **json.loads(TOY_MODEL)))
    rows = [tokenizer.render_chat(messages, tools=BUILTIN_TOOLS) for messages in TRAINED]
    loss = fit_chats(model, rows, tokenizer.pad_id, steps=200)
    torch.set_num_threads(threads)
    assert loss < 0.05, f"the toy model did not fit its conversations (loss {loss:.3f})"
    return save_model_folder(model, tmp_path_factory.mktemp("served") / "toy_tools", tokenizer_dir=tiny_tokenizer_dir)


def serve(folder):
    process, port = start_server(folder, "--max-batch", "2")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    return process, client


def ask_and_answer(client, model: str, question: str, expected_call: tuple[str, dict] | None) -> str:
    """One tool round trip through the client, non-streamed then streamed; the final answer.
    expected_call None: any calculator call whose expression the calculator can evaluate."""
    messages = [{"role": "user", "content": question}]
    first = client.chat.completions.create(model=model, messages=messages, tools=BUILTIN_TOOLS, temperature=0,
                                           max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    [tool_call] = choice.message.tool_calls
    made = (tool_call.function.name, json.loads(tool_call.function.arguments))
    if expected_call is None:
        assert made[0] == "calculator" and run_tool(*made)  # a call the calculator can run
        expected_call = made
    assert made == expected_call

    # Streamed: the same call, in OpenAI's chunks (index, id, name; then the arguments).
    name, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(model=model, messages=messages, tools=BUILTIN_TOOLS,
                                                temperature=0, max_tokens=80, stream=True):
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            assert piece.index == 0
            name += piece.function.name or ""
            arguments += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and (name, json.loads(arguments)) == expected_call

    result = run_tool(tool_call.function.name, tool_call.function.arguments)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": tool_call.id, "content": result}]
    final = client.chat.completions.create(model=model, messages=messages, tools=BUILTIN_TOOLS, temperature=0,
                                           max_tokens=80)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    return final.choices[0].message.content


def test_openai_client_tool_round_trip_on_a_toy_model(toy_tool_model):
    process, client = serve(toy_tool_model)
    try:
        answer = ask_and_answer(client, "toy_tools", "What is 6 * 7?", ("calculator", {"expression": "6 * 7"}))
        assert answer == "6 * 7 = 42."
        assert ask_and_answer(client, "toy_tools", "What day is it?", ("date", {})) == "It is Thursday."
        plain = client.chat.completions.create(model="toy_tools", messages=[{"role": "user", "content": "Say hello."}],
                                               tools=BUILTIN_TOOLS, temperature=0, max_tokens=20)
        assert plain.choices[0].message.content == "Hello!" and not plain.choices[0].message.tool_calls
        # A user who types a call has sent text: with tool_choice "none" nothing is parsed either.
        typed = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6 * 7"}}\n</tool_call>'
        echo = client.chat.completions.create(model="toy_tools", messages=[{"role": "user", "content": typed}],
                                              tools=BUILTIN_TOOLS, tool_choice="none", temperature=0, max_tokens=60)
        assert not echo.choices[0].message.tool_calls and echo.choices[0].finish_reason in ("stop", "length")
    finally:
        process.terminate()
        process.wait(timeout=10)


def demo_question() -> tuple[str, str]:
    """A calculator question of the demo SFT data (trained), with its expression."""
    with open(ROOT / "training_data" / "sft.jsonl", encoding="utf-8") as handle:
        for line in handle:
            messages = json.loads(line)["conversations"]
            if len(messages) == 5 and messages[0]["content"].startswith("# Tools") and \
                    messages[1]["content"].endswith("Answer with the number only."):
                [tool_call] = parse_reply(messages[2]["content"], {"calculator"}).tool_calls
                return messages[1]["content"], json.loads(tool_call.arguments)["expression"]
    pytest.skip("training_data/sft.jsonl has no calculator conversation: run python tool/prepare_data.py")


@pytest.mark.skipif(not (SFT_DIR / "config.json").is_file() or not (ROOT / "training_data" / "sft.jsonl").is_file(),
                    reason="needs the demo SFT model and its data (python tool/demo.py)")
def test_openai_client_tool_round_trip_on_the_demo_model():
    """The protocol on the real demo model: a calculator call (streamed alike), then a final answer
    after the result. Whether it copies the right numbers is what README's accuracy figures measure
    (tool/evaluate.py --tools), not this test."""
    question, _ = demo_question()
    process, client = serve(SFT_DIR)
    try:
        answer = ask_and_answer(client, SFT_DIR.name, question, None)
        assert answer.strip()
    finally:
        process.terminate()
        process.wait(timeout=10)
