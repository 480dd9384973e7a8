"""DPO at toy size: pairs in both shapes and their errors (file:line), the reply-only mask, parity of
the per-sequence log-probabilities and the loss with TRL's DPOTrainer, a run that learns the
preference, exact resume, and LoRA with the base as reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.checkpoint import load_model_folder
from model.lora import ADAPTER_WEIGHTS_FILE, adapters_disabled, apply_lora
from model.model import IGNORE_INDEX
from model.tokenizer import load_tokenizer
from train.data import DataError
from train.preference import (DPOObjective, Pair, PreferencePairs, dpo_loss, read_pairs, render_reply,
                              sequence_logps)
from train.train_dpo import main as dpo_main

from tests.helpers import QA, check_exact_resume
from tests.test_convert_hf import export, make_native


def pair_lines(repeats: int = 4) -> list[dict]:
    """The toy questions: the right answer preferred to a degenerate one (another answer, looped)."""
    lines = []
    for r in range(repeats):
        for i, (question, answer) in enumerate(QA):
            wrong = QA[(i + 1 + r) % len(QA)][1]
            lines.append({"prompt": [{"role": "user", "content": question}],
                          "chosen": [{"role": "assistant", "content": answer}],
                          "rejected": [{"role": "assistant", "content": " ".join([wrong] * 3)}]})
    return lines


def write_lines(path, lines) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_tokenizer_dir):
    folder = tmp_path_factory.mktemp("dpo")
    make_native(folder / "sft", tiny_tokenizer_dir, seed=0)
    write_lines(folder / "pairs.jsonl", pair_lines())
    write_lines(folder / "pairs.val.jsonl", pair_lines(1))
    args = ["--init-from", str(folder / "sft"), "--data", str(folder / "pairs.jsonl"),
            "--val-data", str(folder / "pairs.val.jsonl"), "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
            "--max-steps", "24", "--save-every", "8", "--eval-every", "24", "--log-every", "100", "--device", "cpu",
            "--dtype", "fp32", "--seq-len", "96"]
    assert dpo_main([*args, "--out-dir", str(folder / "dpo")]) == 0
    return {"folder": folder, "args": args, "tokenizer": load_tokenizer(tiny_tokenizer_dir)}


def test_both_shapes_give_the_same_pair_and_bad_lines_are_named(tmp_path):
    question, answer = QA[0]
    trl = {"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": answer}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    whole = {"chosen": trl["prompt"] + trl["chosen"], "rejected": trl["prompt"] + trl["rejected"]}
    texts = {"prompt": question, "chosen": answer, "rejected": "No."}
    write_lines(tmp_path / "ok.jsonl", [trl, whole, texts])
    pairs = read_pairs(tmp_path / "ok.jsonl")
    assert pairs == [Pair(({"role": "user", "content": question},), answer, "No.")] * 3

    other_prompt = {"chosen": whole["chosen"], "rejected": [{"role": "user", "content": "Something else?"},
                                                            {"role": "assistant", "content": "No."}]}
    cases = {"do not share the prompt: they differ at message 0": other_prompt,
             "the rejected side is empty": {**trl, "rejected": []},
             "the chosen reply is empty": {**trl, "chosen": [{"role": "assistant", "content": "  "}]},
             "the same reply": {**trl, "rejected": trl["chosen"]},
             "must end with an assistant message": {"chosen": trl["prompt"], "rejected": whole["rejected"]},
             'expected {"chosen"': {"prompt": question}}
    for expected, bad in cases.items():
        write_lines(tmp_path / "bad.jsonl", [trl, bad])
        with pytest.raises(DataError, match=f"bad.jsonl:2: .*{expected}"):
            read_pairs(tmp_path / "bad.jsonl")
    assert read_pairs(tmp_path / "bad.jsonl", skip_bad_lines=True) == pairs[:1]


def test_only_the_reply_and_its_end_are_scored(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    prompt = [{"role": "system", "content": "You are a toy."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is red?"}]
    ids, start = render_reply(tokenizer, prompt, "The old barn is red.")
    assert tokenizer.decode(ids[start:]) == "The old barn is red.<|im_end|>"
    generation_prompt, _ = tokenizer.render_chat(prompt, add_generation_prompt=True)
    assert ids[:start] == generation_prompt  # the context is what the model sees when it answers
    rejected = ", ".join(["Red"] * 12) + "."
    data = PreferencePairs([Pair(tuple(prompt), "The old barn is red.", rejected)], tokenizer, len(ids) - 1)
    inputs, targets = data.get_batch([0])
    assert inputs.shape == (2, len(ids) - 1)
    assert targets[0][targets[0] != IGNORE_INDEX].tolist() == ids[start:]
    # The longer rejected side does not fit: its prompt lost its start, its reply is whole.
    assert data.truncated == 1
    rejected_ids, rejected_start = render_reply(tokenizer, prompt, rejected)
    assert targets[1][targets[1] != IGNORE_INDEX].tolist() == rejected_ids[rejected_start:]


def test_logps_and_loss_equal_trl(tmp_path, tiny_tokenizer_dir):
    """Our summed reply log-probabilities and DPO loss against TRL's DPOTrainer on the same two
    tiny models (exported to Llama) and the same token ids."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import transformers
    from trl import DPOConfig, DPOTrainer

    policy = make_native(tmp_path / "policy", tiny_tokenizer_dir, seed=0)
    reference = make_native(tmp_path / "reference", tiny_tokenizer_dir, seed=1)
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    lines = pair_lines(1)[:4]
    pairs = [Pair(tuple(line["prompt"]), line["chosen"][0]["content"], line["rejected"][0]["content"]) for line in lines]
    beta = 0.1

    data = PreferencePairs(pairs, tokenizer, 127)
    inputs, targets = data.get_batch(list(range(len(pairs))))
    with torch.no_grad():
        logps = sequence_logps(policy(inputs)[0], targets)
        ref_logps = sequence_logps(reference(inputs)[0], targets)
        ours, _ = dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta)

    hf = {name: transformers.AutoModelForCausalLM.from_pretrained(str(export(tmp_path / name, tmp_path / f"{name}_hf")),
                                                                  dtype=torch.float32)
          for name in ("policy", "reference")}
    trainer = DPOTrainer(model=hf["policy"], ref_model=hf["reference"], train_dataset=datasets.Dataset.from_list(lines),
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to="none", use_cpu=True,
                                                        bf16=False),  # TRL defaults to bf16 autocast
                         processing_class=transformers.AutoTokenizer.from_pretrained(str(tmp_path / "policy_hf")))
    examples = []
    for pair in pairs:
        chosen_ids, start = render_reply(tokenizer, list(pair.prompt), pair.chosen)
        rejected_ids, _ = render_reply(tokenizer, list(pair.prompt), pair.rejected)
        examples.append({"prompt_ids": chosen_ids[:start], "chosen_ids": chosen_ids[start:],
                         "rejected_ids": rejected_ids[start:]})
    # TRL's own tokenization of the same lines: our reply ids plus the newline after <|im_end|>,
    # which we leave out (generation stops at <|im_end|>; SFT does not train that newline either).
    newline = tokenizer.encode("\n")
    for example, row in zip(examples, trainer.train_dataset):
        assert row["prompt_ids"] == example["prompt_ids"]
        assert row["chosen_ids"] == example["chosen_ids"] + newline
    metrics = trainer._metrics["eval"]  # the models load in eval mode; TRL files metrics by mode
    with torch.no_grad():
        for index, example in enumerate(examples):
            trainer.compute_loss(trainer.model, trainer.data_collator([example]))
            assert abs(metrics["logps/chosen"][-1] - float(logps[index])) <= 1e-5 * max(1.0, abs(float(logps[index])))
            assert abs(metrics["logps/rejected"][-1] - float(logps[len(pairs) + index])) <= \
                1e-5 * max(1.0, abs(float(logps[len(pairs) + index])))
        theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    assert abs(float(theirs) - float(ours)) <= 1e-5
    assert abs(float(ours) - math.log(2)) > 1e-2  # two different models: a loss that can tell them apart


def test_dpo_learns_the_preference_and_keeps_the_reference_out(toy):
    folder = toy["folder"]
    records = [json.loads(line) for line in (folder / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first_eval, last_eval = records[0], [r for r in records if "val_loss" in r][-1]
    assert first_eval["step"] == 0 and abs(first_eval["val_loss"] - math.log(2)) < 1e-6  # policy == reference
    assert first_eval["val_reward_accuracy"] == 0.0 and last_eval["val_reward_accuracy"] == 1.0
    assert last_eval["val_loss"] < 0.2 and last_eval["val_reward_margin"] > 0
    train = [r for r in records if "reward_accuracy" in r]
    assert {"reward_margin", "logps_chosen", "logps_rejected"} <= set(train[0])
    checkpoint = load_model_folder(folder / "dpo")  # a plain model folder: chat, export like any other
    assert checkpoint.config == load_model_folder(folder / "sft").config
    saved = json.loads((folder / "dpo" / "checkpoint" / "trainer_state.json").read_text())
    assert saved["step"] == 24


def test_dpo_resume_is_exact(toy, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    check_exact_resume(monkeypatch, dpo_main, toy["args"], out, 12, 8, toy["folder"] / "dpo")  # 9-12 redone
    assert dpo_main([*toy["args"], "--out-dir", str(out), "--beta", "0.5", "--max-steps", "30"]) == 2  # other beta


def test_dpo_lora_uses_the_base_as_reference(toy, tmp_path):
    folder = toy["folder"]
    model = load_model_folder(folder / "sft")
    apply_lora(model, r=4, alpha=8, seed=0)
    for module in model.modules():  # a non-zero adapter: the policy now differs from its base
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B.weight, std=0.05)
    data = PreferencePairs(read_pairs(folder / "pairs.val.jsonl"), toy["tokenizer"], 96)
    batch = data.get_batch([0, 1, 2])
    with torch.no_grad():
        _, _, metrics = DPOObjective(0.1, None)(model, batch)
        with adapters_disabled(model):
            base_logps = sequence_logps(model(batch[0])[0], batch[1])
        plain = sequence_logps(load_model_folder(folder / "sft")(batch[0])[0], batch[1])
    assert torch.allclose(base_logps, plain, atol=1e-5)
    assert metrics["reward_margin"] != 0
    out = tmp_path / "adapter"
    assert dpo_main([*toy["args"], "--lora", "--lora-r", "4", "--max-steps", "6", "--out-dir", str(out)]) == 0
    assert (out / ADAPTER_WEIGHTS_FILE).is_file() and not (out / "model.safetensors").exists()


def test_dpo_refuses_missing_data_and_bad_beta(toy, tmp_path, capsys):
    args = [*toy["args"], "--out-dir", str(tmp_path / "o")]
    assert dpo_main([*args, "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "prepare_data.py --dpo" in capsys.readouterr().err
    assert dpo_main([*args, "--beta", "0"]) == 2
    assert "--beta must be > 0" in capsys.readouterr().err


def test_degenerate_rule_and_a_cut_off_rejected_reply(tiny_tokenizer_dir, tmp_path):
    from tool.eval.tasks import degenerate_reply
    assert degenerate_reply("I do not know. I do not know.", ended=True) == "repeats 'i do not'"
    assert degenerate_reply("Hello! Nice to meet you.", ended=False) == "never ends its turn"
    assert degenerate_reply("Hello! Nice to meet you.", ended=True) is None
    assert degenerate_reply("我们的朋友我们的", ended=True) is not None  # Chinese: by characters
    # A rejected reply that was cut off is scored without the <|im_end|> it never produced.
    line = {**pair_lines(1)[0], "rejected_ends": False}
    write_lines(tmp_path / "cut.jsonl", [line])
    pair = read_pairs(tmp_path / "cut.jsonl")[0]
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    _, targets = PreferencePairs([pair], tokenizer, 127).get_batch([0])
    scored = [t for t in targets[1].tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(scored) == pair.rejected
    assert tokenizer.decode([t for t in targets[0].tolist() if t != IGNORE_INDEX]).endswith("<|im_end|>")


def test_demo_pairs_from_the_models_own_answers(tiny_tokenizer_dir, tmp_path):
    """prepare_data --dpo: a random toy model's answers never end, so every prompt makes a pair
    whose rejected side is the model's cut-off answer and whose chosen side is the data's reply."""
    from tool.prepare_data import main as prepare_main

    from tests.helpers import write_sft
    make_native(tmp_path / "model", tiny_tokenizer_dir, seed=0)
    write_sft(tmp_path / "sft.jsonl", repeats=2)
    write_sft(tmp_path / "sft.val.jsonl", repeats=1)
    assert prepare_main(["--dpo", "--dpo-model", str(tmp_path / "model"), "--out-dir", str(tmp_path),
                         "--dpo-prompts", "5", "--dpo-val-prompts", "3"]) == 0
    train, val = read_pairs(tmp_path / "dpo.jsonl"), read_pairs(tmp_path / "dpo.val.jsonl")
    assert (len(train), len(val)) == (5, 3)
    lines = [json.loads(line) for line in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    assert all(line["rule"] == "never ends its turn" and line["rejected_ends"] is False for line in lines)
    replies = {answer for _, answer in QA}
    assert all(pair.chosen in replies and not pair.rejected_ends for pair in train + val)
