"""The training recipe: learning-rate schedules (cosine, warmup-stable-decay, constant), Muon's
parameter groups, the two-optimizer state round trip, and the flags that choose them."""

import json
import math
import shlex

import pytest
import torch

from config import ConfigError, EtudeConfig, TrainConfig, resolve_train_config
from model.model import EtudeModel
from train.optim import MuonWithAdamW, build_optimizer, muon_parameter_names
from train.trainer import lr_at

TOY = dict(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


def schedule(total: int, warmup: int, **settings) -> list[float]:
    cfg = TrainConfig(lr=1.0, warmup_steps=warmup, **settings)
    return [lr_at(step, total, cfg, warmup) for step in range(total)]


def test_wsd_warms_up_holds_then_cools_down_linearly():
    lrs = schedule(10, 2, schedule="wsd", cooldown_frac=0.4, min_lr_ratio=0.0)
    # warmup 0.5, 1; stable until step 6 = 10 - 4; then 1 - (step - 6) / 4
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_wsd_one_minus_sqrt_cooldown_and_floor():
    lrs = schedule(10, 2, schedule="wsd", cooldown_frac=0.4, min_lr_ratio=0.1, cooldown="1-sqrt")
    expected_tail = [0.1 + 0.9 * (1 - math.sqrt(p)) for p in (0.0, 0.25, 0.5, 0.75)]
    assert lrs[:6] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert lrs[6:] == pytest.approx(expected_tail)


def test_wsd_without_cooldown_is_constant_and_cooldown_never_cuts_warmup():
    assert schedule(6, 2, schedule="wsd", cooldown_frac=0.0) == pytest.approx([0.5, 1, 1, 1, 1, 1])
    assert schedule(6, 2, schedule="constant", min_lr_ratio=0.0) == pytest.approx([0.5, 1, 1, 1, 1, 1])
    # a cool-down of the whole run starts after warmup
    lrs = schedule(6, 2, schedule="wsd", cooldown_frac=1.0, min_lr_ratio=0.0)
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_cosine_is_unchanged():
    lrs = schedule(12, 2, min_lr_ratio=0.1)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[7] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = EtudeModel(EtudeConfig(**TOY))
    names = muon_parameter_names(model)
    per_layer = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert sorted(names) == sorted(f"layers.{i}.{p}.weight" for i in range(2) for p in per_layer)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05), fused=False)
    muon, adamw = optimizer.optimizers["muon"], optimizer.optimizers["adamw"]
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for g in muon.param_groups for p in g["params"]} == set(names)
    adamw_names = {by_id[id(p)] for g in adamw.param_groups for p in g["params"]}
    # the tied embedding (= lm_head), every norm
    assert adamw_names == {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert [g["lr_scale"] for g in muon.param_groups] == [pytest.approx(50.0)]
    assert all(g.get("lr_scale", 1.0) == 1.0 for g in adamw.param_groups)


def test_muon_grouping_of_moe_and_untied_head():
    model = EtudeModel(EtudeConfig(**TOY, use_moe=True, n_experts=3, top_k=2, n_shared_experts=1,
                                   tie_embeddings=False))
    names = set(muon_parameter_names(model))
    assert "layers.0.mlp.experts.2.down_proj.weight" in names
    assert "layers.1.mlp.shared_expert.up_proj.weight" in names
    for adamw_side in ("layers.0.mlp.gate.weight", "layers.0.mlp.shared_expert_gate.weight", "lm_head.weight",
                       "embed_tokens.weight"):
        assert adamw_side not in names


def _train(optimizer, model, steps, data, start=0):
    losses = []
    for step in range(start, start + steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * group.get("lr_scale", 1.0)
        batch = data[step % len(data)]
        _, loss, _ = model(batch, labels=batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_muon_state_round_trip_continues_exactly(tmp_path):
    torch.manual_seed(0)
    data = [torch.randint(0, 64, (2, 16)) for _ in range(3)]
    cfg = TrainConfig(optimizer="muon", lr=1e-2, muon_lr=0.02)
    model = EtudeModel(EtudeConfig(**TOY))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _train(build_optimizer(model, cfg, fused=False), model, 6, data)

    model.load_state_dict(start)
    optimizer = build_optimizer(model, cfg, fused=False)
    first = _train(optimizer, model, 3, data)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    after_three = {k: v.clone() for k, v in model.state_dict().items()}

    resumed_model = EtudeModel(EtudeConfig(**TOY))
    resumed_model.load_state_dict(after_three)
    resumed = build_optimizer(resumed_model, cfg, fused=False)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert len(resumed.optimizers["muon"].state) == 14, "every matrix's momentum buffer is restored"
    assert first + _train(resumed, resumed_model, 3, data, start=3) == reference
    # without the restored momentum the continuation differs: the round trip is what makes it exact
    fresh_model = EtudeModel(EtudeConfig(**TOY))
    fresh_model.load_state_dict(after_three)
    assert _train(build_optimizer(fresh_model, cfg, fused=False), fresh_model, 3, data, start=3) != reference[3:]


def test_muon_refuses_plain_adamw_state_and_vice_versa():
    model = EtudeModel(EtudeConfig(**TOY))
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw"), fused=False)
    both = build_optimizer(model, TrainConfig(optimizer="muon"), fused=False)
    assert isinstance(both, MuonWithAdamW)
    with pytest.raises(ValueError, match="plain AdamW state.*--optimizer muon.*--no-resume"):
        both.load_state_dict(adamw.state_dict())


def test_recipe_settings_are_checked_and_muon_refuses_fsdp():
    with pytest.raises(ConfigError) as excinfo:
        TrainConfig(optimizer="sgd", schedule="linear", cooldown_frac=1.5, cooldown="cosine", muon_lr=0)
    message = str(excinfo.value)
    for fragment in ("optimizer must be adamw or muon", "schedule must be cosine, wsd or constant",
                     "cooldown_frac must be in [0, 1]", "cooldown must be linear or 1-sqrt", "muon_lr must be > 0"):
        assert fragment in message
    with pytest.raises(ConfigError, match="optimizer muon cannot run with fsdp.*--optimizer adamw"):
        resolve_train_config("pretrain", None, {"optimizer": "muon", "fsdp": True})


# ---- tool/compare_recipes.py ---------------------------------------------------------------------

def toy_train_args(folder, tokenizer_dir) -> str:
    from tests.helpers import TOY_MODEL, write_corpus
    write_corpus(folder / "train.jsonl", 300, seed=1)
    write_corpus(folder / "val.jsonl", 30, seed=2)
    return (f"--data {folder / 'train.jsonl'} --val-data {folder / 'val.jsonl'} --tokenizer-dir {tokenizer_dir} "
            f"--model-config '{TOY_MODEL}' --seq-len 32 --batch-size 4 --eval-batches 2 --device cpu --dtype fp32")


def test_compare_recipes_in_turns_equals_uninterrupted_runs(tiny_tokenizer_dir, tmp_path, capsys):
    from tests.helpers import step_losses
    from tool.compare_recipes import main as compare_main
    from train.train_pretrain import main as pretrain_main
    train_args = toy_train_args(tmp_path, tiny_tokenizer_dir)
    muon = "--optimizer muon --schedule wsd --lr 3e-3 --warmup-steps 2 --min-lr-ratio 0"
    out = tmp_path / "compare"
    assert compare_main(["--tokens", str(12 * 4 * 32), "--segments", "3", "--recipes", "baseline",
                         "--recipe", f"muon={muon}", "--train-args", train_args, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    runs = results["comparisons"][0]["runs"]
    assert list(runs) == ["baseline", "muon"]
    for name, run in runs.items():
        assert run["steps"] == 12 and run["tokens"] == 12 * 128
        assert [p["step"] for p in run["curve"]] == [0, 4, 8, 12]
        assert run["train_seconds"] > 0 and run["tokens_per_sec"] > 0
        assert f"{name:<14} {12:>6}" in printed
    # the same initialisation for every recipe
    assert runs["baseline"]["curve"][0]["val_bpb"] == runs["muon"]["curve"][0]["val_bpb"]
    assert runs["muon"]["final_val_bpb"] < runs["muon"]["curve"][0]["val_bpb"]
    change = (runs["muon"]["final_val_bpb"] - runs["baseline"]["final_val_bpb"]) / runs["baseline"]["final_val_bpb"]
    assert f"{change:+.1%}" in printed
    # taking turns in pieces (--stop-at-step, resume) trains exactly what one uninterrupted run trains
    whole = tmp_path / "whole"
    assert pretrain_main(["--preset", "tiny", *shlex.split(train_args), *shlex.split(muon), "--out-dir", str(whole),
                          "--max-steps", "12", "--eval-every", "4", "--log-every", "1"]) == 0
    assert step_losses(whole) == step_losses(out / "tokens" / "muon")


def test_compare_recipes_fine_tunes_every_recipe_from_the_same_model(tiny_tokenizer_dir, tmp_path, capsys):
    from tests.helpers import write_sft
    from tool.compare_recipes import main as compare_main
    from train.train_pretrain import main as pretrain_main
    base = tmp_path / "base"
    assert pretrain_main(["--preset", "tiny", *shlex.split(toy_train_args(tmp_path, tiny_tokenizer_dir)),
                          "--out-dir", str(base), "--max-steps", "2", "--val-data", "none"]) == 0
    write_sft(tmp_path / "sft.jsonl", repeats=8)
    write_sft(tmp_path / "sft.val.jsonl", repeats=2)
    out = tmp_path / "compare"
    train_args = (f"--init-from {base} --data {tmp_path / 'sft.jsonl'} --val-data {tmp_path / 'sft.val.jsonl'} "
                  "--seq-len 32 --batch-size 4 --eval-batches 2 --device cpu --dtype fp32")
    assert compare_main(["--stage", "sft", "--tokens", str(6 * 4 * 32), "--segments", "2", "--recipes", "baseline",
                         "--recipe", "fast=--lr 3e-3 --warmup-steps 1", "--train-args", train_args,
                         "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["stage"] == "sft" and "sft, equal tokens" in capsys.readouterr().out
    runs = results["comparisons"][0]["runs"]
    assert [run["steps"] for run in runs.values()] == [6, 6]
    # both start from the pretrained model: the same validation before the first step
    assert runs["baseline"]["curve"][0]["val_bpb"] == runs["fast"]["curve"][0]["val_bpb"]
    assert runs["fast"]["final_val_bpb"] < runs["baseline"]["final_val_bpb"]  # lr 3e-3 against 3e-5 in 6 steps
    assert "$ train_sft.py" in (out / "tokens" / "fast" / "compare.log").read_text()


def test_compare_recipes_reports_bad_recipes(capsys, tmp_path):
    from tool.compare_recipes import main as compare_main
    assert compare_main(["--tokens", "100", "--recipes", "baseline", "--out-dir", str(tmp_path)]) == 2
    assert "compare at least two recipes" in capsys.readouterr().err
    assert compare_main(["--tokens", "100", "--recipes", "baseline,nope", "--out-dir", str(tmp_path)]) == 2
    assert "unknown pretrain recipe 'nope'" in capsys.readouterr().err
    assert compare_main(["--stage", "sft", "--tokens", "100", "--recipes", "baseline,adamw-tiny",
                         "--out-dir", str(tmp_path)]) == 2
    assert "unknown sft recipe 'adamw-tiny'; named recipes are ['baseline', 'default']" in capsys.readouterr().err
    assert compare_main(["--tokens", "100", "--recipe", "a=--max-steps 3", "--recipe", "b=",
                         "--out-dir", str(tmp_path)]) == 2
    assert "sets ['--max-steps'], which the tool sets itself" in capsys.readouterr().err
    assert compare_main(["--recipes", "baseline,default", "--out-dir", str(tmp_path)]) == 2
    assert "give a budget" in capsys.readouterr().err


@pytest.mark.slow  # ~1 min on 2 busy cores: six short training runs
def test_compare_recipes_equal_time_probes_then_sizes_each_run(tiny_tokenizer_dir, tmp_path, capsys):
    from tool.compare_recipes import main as compare_main
    train_args = toy_train_args(tmp_path, tiny_tokenizer_dir)
    out = tmp_path / "compare"
    # recipe "wide" does eight times the work per step (batch 16 against 2): it gets fewer steps
    assert compare_main(["--seconds", "2", "--segments", "1", "--probe-steps", "4", "--probe-rounds", "2",
                         "--recipe", "narrow=--batch-size 2",
                         "--recipe", "wide=--batch-size 16", "--train-args", train_args, "--out-dir", str(out)]) == 0
    comparison = json.loads((out / "results.json").read_text())["comparisons"][0]
    assert comparison["budget"] == "seconds" and comparison["value"] == 2
    runs = comparison["runs"]
    for run in runs.values():
        assert run["steps"] == max(1, int(2 / run["probe_step_seconds"]))
        assert run["curve"][-1]["step"] == run["steps"]
    assert runs["wide"]["probe_step_seconds"] > runs["narrow"]["probe_step_seconds"]
    assert runs["wide"]["steps"] <= runs["narrow"]["steps"]
    assert "equal time (2 s of steps)" in capsys.readouterr().out
    assert not (out / "seconds" / "probe").exists(), "probe runs are removed"
