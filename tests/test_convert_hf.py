"""Export to Hugging Face Llama and back, at tiny size: logits and greedy generations of the
exported LlamaForCausalLM equal the Etude model's, the chat template renders our ids, native ->
HF -> native is exact, what Llama (or Etude) cannot express is refused by name, training continues
from an exported folder, and inference/hf.py answers as inference/inference.py does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from config import ROOT, ConfigError, EtudeConfig  # noqa: E402
from inference.hf import main as hf_main  # noqa: E402
from inference.inference import main as chat_main  # noqa: E402
from model.checkpoint import load_model_folder, read_model_config, save_model_folder  # noqa: E402
from model.model import EtudeModel  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from tool.convert_hf import main as convert_main  # noqa: E402
from train.train_sft import main as sft_main  # noqa: E402

from tests.conftest import TINY_VOCAB_SIZE  # noqa: E402
from tests.helpers import QA, write_sft  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a toy."}, {"role": "user", "content": "What is your name?"},
     {"role": "assistant", "content": "I'm Etude, a helpful assistant."},
     {"role": "user", "content": "你好，今天天气很好 😀\n  spaced   text\t"}],
]


def make_native(folder, tokenizer_dir, seed=0, **overrides):
    """A randomly initialised tiny Etude model folder (weights wide enough that greedy choices
    are not near-ties)."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 max_seq_len=128, rope_theta=5e5, norm_eps=1e-6, initializer_range=0.1)
    model = EtudeModel(EtudeConfig(**{**shape, **overrides})).eval()
    save_model_folder(model, folder, tokenizer_dir)
    return model


def export(source, out, *extra):
    assert convert_main(["--model", str(source), "--out", str(out), *extra]) == 0
    return out


@pytest.mark.parametrize("tie,n_kv_heads", [(True, 2), (False, 4), (False, 1)], ids=["tied-gqa", "untied-mha", "untied-mqa"])
def test_export_matches_native_logits_and_greedy(tmp_path, tiny_tokenizer_dir, tie, n_kv_heads):
    model = make_native(tmp_path / "native", tiny_tokenizer_dir, tie_embeddings=tie, n_kv_heads=n_kv_heads)
    out = export(tmp_path / "native", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                                   "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")} == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": n_kv_heads,
        "head_dim": 16, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 5e5,
        "tie_word_embeddings": tie, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert ("lm_head.weight" in weights.keys()) is not tie
        assert "model.layers.1.mlp.down_proj.weight" in weights.keys()

    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert type(transformers.AutoModelForCausalLM.from_pretrained(str(out))) is transformers.LlamaForCausalLM
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(3, TINY_VOCAB_SIZE, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)[0]).abs().max().item()
    assert diff < 1e-5

    prompt = ids[0, :8].tolist()
    ours = list(model.generate(prompt, 32))
    theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 8, dtype=torch.long), do_sample=False,
                         max_new_tokens=32, eos_token_id=None)[0, 8:].tolist()
    assert len(ours) == 32 and theirs == ours
    assert len(set(ours)) > 3, "a degenerate continuation would prove little"


def test_chat_template_and_generation_config(tmp_path, tiny_tokenizer_dir):
    make_native(tmp_path / "native", tiny_tokenizer_dir)
    out = export(tmp_path / "native", tmp_path / "hf")
    ours = load_tokenizer(tiny_tokenizer_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            expected, _ = ours.render_chat(messages, add_generation_prompt=generation_prompt)
            got = theirs.apply_chat_template(messages, tokenize=True, return_dict=False,
                                             add_generation_prompt=generation_prompt)
            assert list(got) == expected
    assert (theirs.eos_token, theirs.pad_token, theirs.bos_token) == ("<|im_end|>", "<|endoftext|>", "<|endoftext|>")
    generation = transformers.GenerationConfig.from_pretrained(str(out))
    assert generation.eos_token_id == [ours.im_end_id, ours.eos_id] == [2, 0]
    assert not generation.do_sample


def test_round_trip_is_exact(tmp_path, tiny_tokenizer_dir):
    model = make_native(tmp_path / "native", tiny_tokenizer_dir, tie_embeddings=False, dropout=0.1)
    out = export(tmp_path / "native", tmp_path / "hf")
    assert convert_main(["--import", str(out), "--out", str(tmp_path / "back")]) == 0
    back = load_model_folder(tmp_path / "back")
    direct = load_model_folder(out)  # --init-from takes the Llama folder as it is
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "etude"
    for loaded in (back, direct):
        assert loaded.config == model.config
        original, reloaded = model.state_dict_for_save(), loaded.state_dict_for_save()
        assert original.keys() == reloaded.keys()
        assert all(torch.equal(original[name], reloaded[name]) for name in original)
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (tiny_tokenizer_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_export_verifies(tmp_path, tiny_tokenizer_dir, capsys, dtype, torch_dtype):
    model = make_native(tmp_path / "native", tiny_tokenizer_dir)
    half = export(tmp_path / "native", tmp_path / dtype, "--dtype", dtype, "--verify")
    printed = capsys.readouterr().out
    assert "max abs logit difference" in printed and "identical token for token" in printed
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == str(torch_dtype).removeprefix("torch.")
    header = (half / "model.safetensors").stat().st_size - 2 * model.num_parameters()
    assert 0 < header < 8192, "two bytes per parameter plus the safetensors header"
    with safe_open(str(half / "model.safetensors"), "pt") as weights:
        embedding = weights.get_tensor("model.embed_tokens.weight")
    assert embedding.dtype == torch_dtype
    assert torch.equal(embedding, model.embed_tokens.weight.detach().to(torch_dtype))


def test_verify_reports_the_difference(tmp_path, tiny_tokenizer_dir, capsys):
    make_native(tmp_path / "native", tiny_tokenizer_dir)
    export(tmp_path / "native", tmp_path / "hf", "--verify")
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if "max abs logit difference" in line)
    assert float(line.split("difference ")[1].split()[0]) <= 1e-5
    assert "apply_chat_template ids == render_chat ids" in printed
    assert "greedy reply identical token for token in transformers and Etude" in printed
    reply = next(line for line in printed.splitlines() if "verify:   reply:" in line)
    assert "<|im_end|>" not in reply  # the reply stops where a chat stops


def test_failed_verification_writes_nothing(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    """A conversion that goes wrong (here: one weight nudged) is caught by --verify and leaves
    no folder behind, not even a temporary one."""
    import tool.convert_hf as convert

    make_native(tmp_path / "native", tiny_tokenizer_dir)
    real = convert.state_to_hf

    def nudged(state, config):
        weights = dict(real(state, config))
        weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
        return weights

    monkeypatch.setattr(convert, "state_to_hf", nudged)
    out = tmp_path / "exports" / "hf"
    assert convert_main(["--model", str(tmp_path / "native"), "--out", str(out), "--verify"]) == 1
    assert "verification failed" in capsys.readouterr().err
    assert not out.exists() and not list((tmp_path / "exports").iterdir())


def test_weights_that_do_not_match_the_config_are_refused_before_writing(tmp_path, tiny_tokenizer_dir, capsys):
    """A dense folder whose config claims MoE: the missing router is named, nothing is written.
    (MoE export itself is tested in tests/test_moe.py.)"""
    make_native(tmp_path / "moe", tiny_tokenizer_dir)
    config_path = tmp_path / "moe" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_moe": True}))
    assert convert_main(["--model", str(tmp_path / "moe"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "layers.0.mlp.gate_proj.weight" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("change,field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}, "rope_parameters"),
    ({"head_dim": 32}, "head_dim"),
    ({"vocab_size": 640}, "vocab_size is 640 but the tokenizer beside it has 512"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "only Llama checkpoints"),
])
def test_unrepresentable_llama_features_are_refused(tmp_path, tiny_tokenizer_dir, capsys, change, field):
    make_native(tmp_path / "native", tiny_tokenizer_dir)
    out = export(tmp_path / "native", tmp_path / "hf")
    config_path = out / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(ConfigError, match=field):
        read_model_config(out)
    assert convert_main(["--import", str(out), "--out", str(tmp_path / "etude")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "etude").exists()


def test_sharded_checkpoint_saved_by_transformers_loads(tmp_path, tiny_tokenizer_dir):
    """Any Llama checkpoint, here one that transformers itself saved in shards (config with
    rope_parameters only, untied, no head_dim key written by us), imports exactly."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=96, rope_theta=2e4, rms_norm_eps=1e-5,
                                      initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path / "llama"
    hf.save_pretrained(str(folder), max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tiny_tokenizer_dir / name, folder / name)
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    ours = load_model_folder(folder).eval()
    assert (ours.config.intermediate_size, ours.config.max_seq_len, ours.config.rope_theta) == (160, 96, 2e4)
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 30))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)[0]).abs().max().item() < 1e-5
    assert convert_main(["--import", str(folder), "--out", str(tmp_path / "etude"), "--verify"]) == 0
    assert load_model_folder(tmp_path / "etude").config == ours.config


def test_sft_continues_from_an_exported_folder(tmp_path, tiny_tokenizer_dir):
    start = make_native(tmp_path / "native", tiny_tokenizer_dir)
    out = export(tmp_path / "native", tmp_path / "hf", "--dtype", "bf16")
    write_sft(tmp_path / "sft.jsonl", repeats=2)
    assert sft_main(["--init-from", str(out), "--data", str(tmp_path / "sft.jsonl"), "--val-data", "none",
                     "--out-dir", str(tmp_path / "sft"), "--max-steps", "3", "--batch-size", "2", "--seq-len", "64",
                     "--device", "cpu", "--dtype", "fp32", "--log-every", "1", "--lr", "1e-3"]) == 0
    tuned = load_model_folder(tmp_path / "sft")
    assert tuned.config == start.config
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["model_type"] == "etude"
    assert (tmp_path / "sft" / "tokenizer.json").is_file()
    assert not torch.equal(tuned.layers[0].mlp.up_proj.weight, start.layers[0].mlp.up_proj.weight.to(torch.bfloat16).float())


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny model taught the toy QA set, as an Etude folder and as its export."""
    folder = tmp_path_factory.mktemp("chat_pair")
    make_native(folder / "init", tiny_tokenizer_dir, initializer_range=0.02)
    write_sft(folder / "sft.jsonl", repeats=8)
    assert sft_main(["--init-from", str(folder / "init"), "--data", str(folder / "sft.jsonl"), "--val-data", "none",
                     "--out-dir", str(folder / "sft"), "--max-steps", "100", "--batch-size", "4", "--seq-len", "128",
                     "--lr", "3e-3", "--warmup-steps", "10", "--device", "cpu", "--dtype", "fp32",
                     "--log-every", "1000", "--save-every", "1000"]) == 0
    export(folder / "sft", folder / "hf")
    return folder


def run_chat(main, argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr().out


def test_hf_chat_answers_as_inference_does(chat_pair, capsys):
    greedy = ["--temperature", "0", "--max-new-tokens", "40"]
    answers = []
    for question, _ in QA[:3]:
        ours = run_chat(chat_main, ["--model", str(chat_pair / "sft"), "--prompt", question, *greedy], capsys)
        theirs = run_chat(hf_main, ["--model", str(chat_pair / "hf"), "--prompt", question, *greedy], capsys)
        assert theirs == ours
        answers.append(ours)
    # The model learned its lessons (all three at the time of writing; two leave room for other CPUs' rounding).
    assert sum(answer.strip() == expected for answer, (_, expected) in zip(answers, QA)) >= 2, answers
    assert len(set(answers)) == 3


def test_hf_chat_batch_and_interactive_match(chat_pair, tmp_path, capsys, monkeypatch):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in QA[:5]) +
                         json.dumps({"conversations": [{"role": "system", "content": "You are a toy."},
                                                       {"role": "user", "content": "Say hello."}]}) + "\n")
    outputs = {}
    for name, main, model in (("ours", chat_main, "sft"), ("hf", hf_main, "hf")):
        path = tmp_path / f"{name}.jsonl"
        assert main(["--model", str(chat_pair / model), "--input", str(questions), "--output", str(path),
                     "--batch-size", "4", "--temperature", "0", "--max-new-tokens", "30"]) == 0
        outputs[name] = path.read_text()
    assert outputs["hf"] == outputs["ours"] and len(outputs["ours"].splitlines()) == 6

    transcripts = {}
    for name, main, model in (("ours", chat_main, "sft"), ("hf", hf_main, "hf")):
        lines = iter(["What is two plus two?", "What do cats say?", "/reset", "What is red?", "/quit"])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
        assert main(["--model", str(chat_pair / model), "--temperature", "0", "--max-new-tokens", "30"]) == 0
        transcripts[name] = capsys.readouterr().out
    assert transcripts["hf"] == transcripts["ours"] and transcripts["ours"].count("etude> ") == 3


def test_hf_chat_sampling_is_seeded(chat_pair, capsys):
    argv = ["--model", str(chat_pair / "hf"), "--prompt", "an unseen question", "--temperature", "1.0",
            "--max-new-tokens", "20"]
    first = run_chat(hf_main, [*argv, "--seed", "7"], capsys)
    assert run_chat(hf_main, [*argv, "--seed", "7"], capsys) == first
    assert len({run_chat(hf_main, [*argv, "--seed", str(seed)], capsys) for seed in range(4)}) > 1


def test_clear_errors(tmp_path, tiny_tokenizer_dir, capsys):
    make_native(tmp_path / "native", tiny_tokenizer_dir)
    assert hf_main(["--model", str(tmp_path / "native"), "--prompt", "hi"]) == 2
    assert "convert_hf.py --model" in capsys.readouterr().err
    assert convert_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "hf")]) == 2
    assert "no model folder" in capsys.readouterr().err
    assert convert_main(["--import", str(tmp_path / "native"), "--out", str(tmp_path / "x")]) == 2
    assert "already an Etude model folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert convert_main(["--model", str(tmp_path / "native"), "--out", str(tmp_path / "busy")]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").is_file()
    out = export(tmp_path / "native", tmp_path / "hf")
    export(tmp_path / "native", out)  # an earlier export is replaced without --force
    assert convert_main(["--import", str(out), "--out", str(tmp_path / "native")]) == 2  # holds a model
    assert "--force" in capsys.readouterr().err


def test_scripts_run_from_their_own_folder():
    for folder, script, flag in (("tool", "convert_hf.py", "--import"), ("inference", "hf.py", "--max-new-tokens")):
        result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT / folder, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert flag in result.stdout
