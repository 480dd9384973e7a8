"""What a new user meets first: chat commands, the printed configuration, and a missing data
file reported before anything is printed or built."""

from types import SimpleNamespace

import pytest

from config import EtudeConfig, MOE_FIELDS, TrainConfig
from inference import inference
from train.cli import check_data_files
from train.train_pretrain import main as pretrain_main

from tests.helpers import TOY_MODEL, write_corpus


class RecordingChat:
    """Stands in for Chat: answers "ok" and remembers what it was sent."""

    def __init__(self):
        self.model = SimpleNamespace(num_parameters=lambda: 1_000_000)
        self.sent = []
        self.tools = None  # Chat offers no tools unless --tools is given

    def stream(self, messages):
        self.sent.append([dict(m) for m in messages])
        yield "ok"


def chat_with(lines, monkeypatch, capsys, system=None):
    typed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    chat = RecordingChat()
    inference.interactive(chat, system)
    return chat, capsys.readouterr().out


def test_unknown_and_mistyped_commands_are_answered_not_sent(monkeypatch, capsys):
    chat, out = chat_with(["/foo", "/qiut", "hello", "/QUIT", "never read"], monkeypatch, capsys)
    assert "unknown command /foo" in out and "unknown command /qiut" in out
    assert "/reset forgets the conversation" in out  # the list comes with it
    assert [m[-1]["content"] for m in chat.sent] == ["hello"]  # /QUIT left: "never read" was not


def test_commands_and_text_that_starts_with_a_slash(monkeypatch, capsys):
    chat, out = chat_with(["/system Be brief.", "//etc/hosts is what?", "/ not a command", "/reset", "again"],
                          monkeypatch, capsys)
    assert "(system prompt set; conversation reset)" in out and "(conversation reset)" in out
    first, second, third = chat.sent
    assert first[0] == {"role": "system", "content": "Be brief."}
    assert first[-1]["content"] == "/etc/hosts is what?"  # "//" sends the rest from its second slash
    assert second[-1]["content"] == "/ not a command"
    assert third == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "again"}]


def test_printed_configuration_shows_only_what_applies():
    dense = EtudeConfig().applicable()
    assert not set(MOE_FIELDS) & set(dense) and "hidden_size" in dense
    assert set(MOE_FIELDS) <= set(EtudeConfig(use_moe=True).applicable())
    run = TrainConfig().applicable()
    assert "muon_lr" not in run and "cooldown_frac" not in run and "stop_at_step" not in run
    assert {"muon_lr", "cooldown_frac"} <= set(TrainConfig(optimizer="muon", schedule="wsd").applicable())


def test_missing_data_is_reported_before_the_configuration(tmp_path, tiny_tokenizer_dir, capsys):
    write_corpus(tmp_path / "train.jsonl", 20, seed=1)
    base = ["--tokenizer-dir", str(tiny_tokenizer_dir), "--out-dir", str(tmp_path / "m"), "--model-config",
            TOY_MODEL, "--device", "cpu"]
    assert pretrain_main(["--data", str(tmp_path / "typo.jsonl"), "--val-data", "none", *base]) == 2
    captured = capsys.readouterr()
    assert "error: training data not found:" in captured.err and "typo.jsonl (from --data)" in captured.err
    assert "prepare_data" not in captured.err  # the user named the file: the fix is the path
    assert captured.out == ""  # nothing printed or built before the check

    assert pretrain_main(["--data", str(tmp_path / "train.jsonl"), "--val-data", str(tmp_path), *base]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_missing_default_points_at_the_demo_data(tmp_path):
    cfg = TrainConfig(data=str(tmp_path / "pretrain.jsonl"), val_data=str(tmp_path / "pretrain.val.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"not found at the default .*prepare_data.py`, or pass --data"):
        check_data_files(cfg, SimpleNamespace(data=None, val_data=None))
    (tmp_path / "pretrain.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="--val-data none to train without validation"):
        check_data_files(cfg, SimpleNamespace(data=None, val_data=None))


def test_the_demo_says_how_long_it_takes_and_warns_when_slow(monkeypatch, capsys):
    from tool import demo

    monkeypatch.setattr(demo, "measure_speed", lambda: (demo.REFERENCE_TOKENS_PER_SECOND, "cpu bfloat16"))
    expected = demo.announce("tiny")
    out = capsys.readouterr().out
    reference = sum(demo.REFERENCE_SECONDS.values())
    assert sum(expected.values()) == pytest.approx(reference) and "warning" not in out
    assert f"the demo takes ~{demo.minutes(reference)}" in out

    monkeypatch.setattr(demo, "measure_speed", lambda: (demo.REFERENCE_TOKENS_PER_SECOND / 5, "cpu float32"))
    slow = demo.announce("tiny")
    out = capsys.readouterr().out
    assert "warning: this machine is 5.0x slower than the reference" in out and "no fast bf16" in out
    assert slow["pretrain"] == pytest.approx(5 * demo.REFERENCE_SECONDS["pretrain"])
    assert slow["prepare data"] == demo.REFERENCE_SECONDS["prepare data"]  # not a training stage
    assert demo.announce("small") is None


def test_the_demo_streams_a_command_and_keeps_its_output(capsys):
    from tool import demo

    assert demo.run(["-c", "print('a reply')"]) == "a reply\n"
    assert "a reply" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="failed \\(exit 3\\)"):
        demo.run(["-c", "raise SystemExit(3)"])


def test_the_demo_time_left_follows_the_training_stages_pace(capsys):
    from tool import demo

    expected = demo.estimate(1.0)
    clock = demo.Clock(expected)
    clock.stage("prepare data", 1.0)  # far quicker than expected: says nothing about training speed
    rest = sum(v for k, v in expected.items() if k != "prepare data")
    assert f"about {demo.minutes(rest)} to go" in capsys.readouterr().out
    clock.stage("tokenizer", expected["tokenizer"])
    capsys.readouterr()
    clock.stage("pretrain", 2 * expected["pretrain"])  # training runs twice as slow as expected
    left = sum(v * (2 if k in demo.COMPUTE_STAGES else 1) for k, v in expected.items()
               if k not in ("prepare data", "tokenizer", "pretrain"))
    assert f"about {demo.minutes(left)} to go" in capsys.readouterr().out


def test_the_demo_shows_the_trained_answer_or_the_adapter_lesson(monkeypatch, capsys):
    from tool import demo

    replies = iter(["Richard Nixon\n", "The Piece\n", "I'm Mira, a cheerful assistant.\n", "I am a chat bot.\n"])
    monkeypatch.setattr(demo, "run", lambda args: next(replies))
    demo.ask("Who was the only US President to resign?", "Richard Nixon")
    demo.ask("What is the name of the nearest major galaxy to the Milky Way?", "The Andromeda Galaxy.")
    demo.ask("What is your name?", None, "--lora", "identity", lesson="Mira")
    demo.ask("What is your name?", None, "--lora", "identity", lesson="Mira")
    out = capsys.readouterr().out.splitlines()
    assert out == ["  (the trained answer, recalled exactly: 'Richard Nixon')",
                   "  (trained answer: 'The Andromeda Galaxy.'; a 4.6M-parameter model recalls about one trained "
                   "answer in ten exactly)",
                   "  (the adapter's lesson: the name 'Mira'; learned)",
                   "  (the adapter's lesson: the name 'Mira'; not in this reply)"]
