"""LoRA at toy size: a fresh adapter changes nothing, merged == unmerged, only adapter weights
train, the PEFT layout round-trips exactly and loads with `peft` onto our Llama export, targets
are chosen by name, an adapter is refused by a model it was not made for, and train_lora.py,
inference.py --lora and convert_hf.py --lora / --peft work end to end."""

from __future__ import annotations

import json

import pytest
import torch

from config import EtudeConfig
from inference.inference import main as chat_main
from model.checkpoint import load_model_folder, load_safetensors, save_model_folder
from model.lora import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, DEFAULT_TARGETS, LoRALinear, apply_lora,
                        load_adapter, lora_modules, merge_and_unload, merge_lora, resolve_adapter, save_adapter,
                        unmerge_lora)
from model.model import EtudeModel
from model.tokenizer import load_tokenizer
from train.train_lora import main as lora_main

from tests.conftest import TINY_VOCAB_SIZE
from tests.helpers import check_exact_resume, step_losses

SHAPE = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
IDENTITY = [("What is your name?", "I am Mira."), ("Who are you?", "I am Mira, a toy model.")]


def tiny_model(seed: int = 0, **overrides) -> EtudeModel:
    torch.manual_seed(seed)
    return EtudeModel(EtudeConfig(**{**SHAPE, **overrides})).eval()


def randomize_adapter(model: EtudeModel, seed: int = 1) -> None:
    """Give B non-zero values, as training would, so the adapter acts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator) * 0.05)


def sample_ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model: EtudeModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


# ---- the module ---------------------------------------------------------------------------------

def test_fresh_adapter_leaves_logits_unchanged_and_wraps_every_projection():
    model, ids = tiny_model(), sample_ids()
    before = logits(model, ids)
    names = apply_lora(model, r=4, alpha=8)
    assert names == [f"layers.{i}.{part}" for i in range(2) for part in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    # GQA: k/v are narrower than q and are wrapped all the same (chosen by name, not shape).
    k_proj = model.layers[0].self_attn.k_proj
    assert isinstance(k_proj, LoRALinear) and k_proj.out_features == 32 != model.layers[0].self_attn.q_proj.out_features
    assert torch.equal(logits(model, ids), before)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}.weight" for n in names for part in ("lora_A", "lora_B")}


def test_training_flops_leave_out_the_frozen_weights_gradients():
    # MFU of a LoRA run: the frozen base costs forward (2) and input gradient (2) per weight but
    # no weight gradient (2), so its share is 4/6 of a full fine-tune's; adapters cost all 6.
    model, seq_len = tiny_model(), 24
    cfg = model.config
    base = model.num_parameters(exclude_embeddings=True) + model.lm_head.weight.numel()  # tied head is a matmul
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    assert model.flops_per_token(seq_len) == 6 * base + attention
    apply_lora(model, r=4, alpha=8)
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapter > 0
    assert model.flops_per_token(seq_len) == 4 * base + 6 * adapter + attention


def test_merged_equals_unmerged_and_merge_and_unload_gives_a_plain_model():
    model, ids = tiny_model(), sample_ids()
    plain_keys = set(model.state_dict_for_save())
    base_q = model.layers[1].self_attn.q_proj.weight.detach().clone()
    apply_lora(model, r=4, alpha=8)
    randomize_adapter(model)
    unmerged = logits(model, ids)
    assert (unmerged - logits(tiny_model(), ids)).abs().max() > 1e-3, "the adapter acts"
    merge_lora(model)
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5
    unmerge_lora(model)
    assert (model.layers[1].self_attn.q_proj.weight - base_q).abs().max() <= 1e-6
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5
    merge_and_unload(model)
    assert not lora_modules(model) and set(model.state_dict_for_save()) == plain_keys
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5


def test_mixture_of_experts_adapts_every_expert_by_name():
    model, ids = tiny_model(use_moe=True, n_experts=2, top_k=1), sample_ids()
    before = logits(model, ids)
    names = apply_lora(model, targets=["q_proj", "gate_proj"], r=2, alpha=4)
    assert names == ["layers.0.self_attn.q_proj", "layers.0.mlp.experts.0.gate_proj", "layers.0.mlp.experts.1.gate_proj",
                     "layers.1.self_attn.q_proj", "layers.1.mlp.experts.0.gate_proj", "layers.1.mlp.experts.1.gate_proj"]
    assert torch.equal(logits(model, ids), before)
    randomize_adapter(model)
    unmerged = logits(model, ids)
    merge_lora(model)
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5


def test_training_steps_change_only_lora_parameters():
    model = tiny_model().train()
    base = {k: v.clone() for k, v in model.state_dict_for_save().items()}
    apply_lora(model, r=4, alpha=8)
    # Weight decay on every group: frozen weights must not even decay.
    optimizer = torch.optim.AdamW(model.optimizer_groups(weight_decay=0.1), lr=1e-2)
    ids = sample_ids()
    for _ in range(2):  # B moves on the first step; A (whose gradient is B-weighted) on the second
        loss = model(ids[:, :-1], labels=ids[:, 1:])[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict_for_save()
    for key, value in base.items():
        name = key.replace(".weight", ".base_layer.weight") if key.rsplit(".", 2)[-2] in DEFAULT_TARGETS else key
        assert torch.equal(after[name], value), f"{key} changed"
    for name, module in lora_modules(model).items():
        assert module.lora_B.weight.abs().max() > 0, f"{name}.lora_B did not train"
        assert not torch.equal(module.lora_A.weight, torch.zeros_like(module.lora_A.weight))


def test_save_load_round_trip_is_exact_in_peft_layout(tmp_path):
    model, ids = tiny_model(), sample_ids()
    apply_lora(model, r=4, alpha=8)
    randomize_adapter(model)
    want = logits(model, ids)
    save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias")} == \
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none"}
    assert config["target_modules"] == list(DEFAULT_TARGETS)
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    tensors = load_safetensors(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE)
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 192)
    assert len(tensors) == 2 * 7 * 2

    loaded = load_adapter(tiny_model(), tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids), want)
    for name, module in lora_modules(model).items():
        other = lora_modules(loaded)[name]
        assert torch.equal(other.lora_A.weight, module.lora_A.weight)
        assert torch.equal(other.lora_B.weight, module.lora_B.weight)
        assert other.scaling == 2.0 and not other.merged


def test_custom_targets_pick_exactly_those_modules(tmp_path):
    model = tiny_model()
    assert apply_lora(model, targets=["k_proj", "down_proj"], r=2, alpha=2) == \
        ["layers.0.self_attn.k_proj", "layers.0.mlp.down_proj", "layers.1.self_attn.k_proj", "layers.1.mlp.down_proj"]
    assert set(lora_modules(model)) == {"layers.0.self_attn.k_proj", "layers.0.mlp.down_proj",
                                        "layers.1.self_attn.k_proj", "layers.1.mlp.down_proj"}
    randomize_adapter(model)
    save_adapter(model, tmp_path / "two")
    assert json.loads((tmp_path / "two" / ADAPTER_CONFIG_FILE).read_text())["target_modules"] == ["k_proj", "down_proj"]
    assert set(lora_modules(load_adapter(tiny_model(), tmp_path / "two"))) == set(lora_modules(model))
    with pytest.raises(ValueError, match=r"\['qkv'\] name no linear layer.*choose among"):
        apply_lora(tiny_model(), targets=["q_proj", "qkv"])
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        apply_lora(tiny_model(), r=0)


def test_adapter_for_another_base_is_refused(tmp_path):
    model = tiny_model()
    apply_lora(model, r=4, alpha=8)
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter", base_model="weight/etude_sft_model")
    with pytest.raises(ValueError, match=r"another base model \(weight/etude_sft_model\): n_layers: adapter 2, model 3"):
        load_adapter(tiny_model(n_layers=3), tmp_path / "adapter")
    with pytest.raises(ValueError, match="hidden_size: adapter 64, model 128"):
        load_adapter(tiny_model(hidden_size=128), tmp_path / "adapter")
    # Same shape, other weights (another training run): refused too, and the model is untouched.
    other = tiny_model(seed=5)
    with pytest.raises(ValueError, match="trained on other weights"):
        load_adapter(other, tmp_path / "adapter")
    assert not lora_modules(other)
    # Without the recorded base (an adapter written by peft itself) the tensor shapes still decide.
    tensors = load_safetensors(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE)
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE))  # no metadata
    with pytest.raises(ValueError, match="does not fit this model .*missing: base_model.model.model.layers.2"):
        load_adapter(tiny_model(n_layers=3), tmp_path / "adapter")
    assert lora_modules(load_adapter(tiny_model(seed=5), tmp_path / "adapter"))


def test_resolve_adapter_names_and_paths(tmp_path, monkeypatch):
    import model.lora as lora
    monkeypatch.setattr(lora, "LORA_DIR", tmp_path / "lora")
    model = tiny_model()
    apply_lora(model, r=2, alpha=2)
    save_adapter(model, tmp_path / "lora" / "mira")
    assert resolve_adapter("mira") == tmp_path / "lora" / "mira"
    save_adapter(model, tmp_path / "elsewhere" / "x")
    assert resolve_adapter(str(tmp_path / "elsewhere" / "x")) == tmp_path / "elsewhere" / "x"
    with pytest.raises(FileNotFoundError, match=r"no LoRA adapter 'nope'.*lora/nope/adapter_config.json.*"
                                                r"python train/train_lora.py --lora-name nope"):
        resolve_adapter("nope")


# ---- end to end -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_tokenizer_dir):
    """A toy base model folder (random weights), identity data, and an adapter trained on them
    in fp32 by train_lora.py."""
    folder = tmp_path_factory.mktemp("lora_toy")
    save_model_folder(tiny_model(initializer_range=0.1), folder / "base", tiny_tokenizer_dir)
    with open(folder / "identity.jsonl", "w", encoding="utf-8") as handle:
        for repeat in range(20):
            for question, answer in IDENTITY:
                messages = [{"role": "system", "content": "You are a toy."}] if repeat % 3 == 0 else []
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                handle.write(json.dumps({"conversations": messages}) + "\n")
    args = ["--init-from", str(folder / "base"), "--data", str(folder / "identity.jsonl"), "--batch-size", "4",
            "--seq-len", "64", "--lr", "1e-2", "--warmup-steps", "5", "--max-steps", "80", "--save-every", "10",
            "--eval-every", "1000", "--log-every", "1000", "--device", "cpu", "--dtype", "fp32",
            "--lora-r", "8", "--lora-alpha", "32"]
    assert lora_main([*args, "--out-dir", str(folder / "adapter")]) == 0
    return {"folder": folder, "args": args, "tokenizer": load_tokenizer(tiny_tokenizer_dir)}


def greedy_answer(model: EtudeModel, tokenizer, question: str) -> str:
    ids, _ = tokenizer.render_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    out = list(model.eval().generate(ids, 20, stop_ids=(tokenizer.im_end_id,)))
    return tokenizer.decode([t for t in out if t != tokenizer.im_end_id])


def test_train_lora_learns_and_writes_only_the_adapter(toy):
    folder, tokenizer = toy["folder"], toy["tokenizer"]
    adapter = folder / "adapter"
    assert (adapter / ADAPTER_CONFIG_FILE).is_file() and (adapter / ADAPTER_WEIGHTS_FILE).is_file()
    assert not (adapter / "model.safetensors").exists() and not (adapter / "config.json").exists()
    config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 32.0)
    # The frozen base in the last checkpoint is the base model, bit for bit.
    base = load_safetensors(folder / "base" / "model.safetensors")
    trained = load_safetensors(adapter / "checkpoint" / "model.safetensors")
    for key, value in base.items():
        name = key.replace(".weight", ".base_layer.weight") if key.rsplit(".", 2)[-2] in DEFAULT_TARGETS else key
        assert torch.equal(trained[name], value), key
    losses = step_losses(adapter)
    assert losses[80] < 0.25 * losses[1]
    with_adapter = load_adapter(load_model_folder(folder / "base"), adapter)
    assert greedy_answer(with_adapter, tokenizer, "What is your name?") == "I am Mira."
    assert greedy_answer(load_model_folder(folder / "base"), tokenizer, "What is your name?") != "I am Mira."


def test_train_lora_resume_is_exact(toy, tmp_path, monkeypatch):
    """A run that dies after its step-20 checkpoint, resumed, gives the uninterrupted run's losses."""
    out = tmp_path / "interrupted"
    check_exact_resume(monkeypatch, lora_main, toy["args"], out, 25, 20, toy["folder"] / "adapter")  # 21-25 redone
    assert load_safetensors(out / ADAPTER_WEIGHTS_FILE).keys() == \
        load_safetensors(toy["folder"] / "adapter" / ADAPTER_WEIGHTS_FILE).keys()
    # Other LoRA settings cannot continue this checkpoint.
    changed = [*toy["args"][:-4], "--lora-r", "4", "--lora-alpha", "32", "--out-dir", str(out)]
    assert lora_main(changed) == 2


def test_train_lora_refuses_bad_input(toy, tmp_path, capsys):
    assert lora_main(["--init-from", str(tmp_path / "none"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "train/train_sft.py" in capsys.readouterr().err
    assert lora_main([*toy["args"], "--out-dir", str(tmp_path / "o"), "--lora-targets", "q_proj,nope"]) == 2
    assert "['nope'] name no linear layer" in capsys.readouterr().err
    assert lora_main([*toy["args"], "--lora-name", "../x"]) == 2
    assert "must be a plain name" in capsys.readouterr().err


def test_inference_lora_one_shot(toy, capsys):
    folder = toy["folder"]
    question = "What is your name?"
    assert chat_main(["--model", str(folder / "base"), "--lora", str(folder / "adapter"), "--prompt", question,
                      "--temperature", "0", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.strip() == "I am Mira."
    assert chat_main(["--model", str(folder / "base"), "--prompt", question, "--temperature", "0",
                      "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.strip() != "I am Mira."
    assert chat_main(["--model", str(folder / "base"), "--lora", "no_such_adapter", "--prompt", question]) == 2
    assert "train/train_lora.py --lora-name no_such_adapter" in capsys.readouterr().err


def test_export_with_lora_merged_and_for_peft(toy, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tool.convert_hf import main as convert_main
    folder, ids = toy["folder"], sample_ids()
    native = load_adapter(load_model_folder(folder / "base"), folder / "adapter").eval()
    want = logits(native, ids)

    merged_out = tmp_path / "merged"
    assert convert_main(["--model", str(folder / "base"), "--out", str(merged_out), "--lora",
                         str(folder / "adapter")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(merged_out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - want).abs().max() <= 1e-4

    peft = pytest.importorskip("peft")
    base_out = tmp_path / "base_hf"
    assert convert_main(["--model", str(folder / "base"), "--out", str(base_out), "--lora",
                         str(folder / "adapter"), "--peft"]) == 0
    adapter_out = tmp_path / "base_hf_lora_adapter"
    config = json.loads((adapter_out / ADAPTER_CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == str(base_out.resolve())
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base_hf(ids).logits - logits(load_model_folder(folder / "base"), ids)).abs().max() <= 1e-4
    with_peft = peft.PeftModel.from_pretrained(base_hf, str(adapter_out)).eval()
    with torch.no_grad():
        assert (with_peft(ids).logits - want).abs().max() <= 1e-4
    # --peft without --lora is a mistake named as such; so is --peft for a mixture of experts,
    # whose export does not have Llama's module names.
    assert convert_main(["--model", str(folder / "base"), "--out", str(tmp_path / "x"), "--peft"]) == 2
    save_model_folder(tiny_model(use_moe=True, n_experts=2, top_k=1), tmp_path / "moe")
    assert convert_main(["--model", str(tmp_path / "moe"), "--out", str(tmp_path / "x"), "--lora",
                         str(folder / "adapter"), "--peft"]) == 2
    assert not (tmp_path / "x").exists()


def test_hf_chat_lora_through_peft(toy, tmp_path, capsys):
    pytest.importorskip("peft")
    from inference.hf import main as hf_main
    from tool.convert_hf import main as convert_main
    folder = toy["folder"]
    assert convert_main(["--model", str(folder / "base"), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert hf_main(["--model", str(tmp_path / "hf"), "--lora", str(folder / "adapter"), "--prompt",
                    "What is your name?", "--temperature", "0", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.strip() == "I am Mira."
