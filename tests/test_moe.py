"""Mixture of experts at tiny size: SparseMoE against a per-token reference loop, top-k routing,
the load-balancing loss (by hand, balanced, collapsed, against transformers' Mixtral function),
the KV cache and batched generation, LoRA, export to Mixtral / Qwen2-MoE with exact logits and
greedy generations, import back (per-expert and fused layouts), and a toy pretraining run that
logs expert shares."""

from __future__ import annotations

import json
import math

import pytest
import torch

from config import ConfigError, EtudeConfig, preset_model_config
from inference.engine import Engine, Request
from model.checkpoint import load_model_folder, save_model_folder
from model.lora import apply_lora, merge_and_unload
from model.model import EtudeModel, KVCache, SparseMoE, load_balancing_loss
from train.train_pretrain import main as pretrain_main

from tests.conftest import TINY_VOCAB_SIZE
from tests.helpers import TOY_MODEL, write_corpus


def moe_config(**overrides) -> EtudeConfig:
    shape = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96,
                 use_moe=True, n_experts=4, top_k=2, intermediate_size=48, rope_theta=5e5, norm_eps=1e-6,
                 initializer_range=0.1)
    return EtudeConfig(**{**shape, **overrides})


def reference_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time: softmax router, top_k, (renormalised) weights, the
    weighted sum of those experts, plus the sigmoid-gated shared expert."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ moe.gate.weight.T, dim=-1)
        weights, experts = torch.topk(probs, moe.top_k)
        if moe.gate.norm_topk_prob:
            weights = weights / weights.sum()
        for weight, expert in zip(weights, experts):
            out[t] += weight * moe.experts[int(expert)](x[t])
        if moe.shared_expert is not None:
            out[t] += torch.sigmoid(moe.shared_expert_gate(x[t])) * moe.shared_expert(x[t])
    return out


@pytest.mark.parametrize("shared,norm", [(0, True), (1, True), (2, False)])
def test_sparse_moe_equals_per_token_loop(shared, norm):
    torch.manual_seed(0)
    moe = SparseMoE(moe_config(n_shared_experts=shared, norm_topk_prob=norm, n_experts=5, top_k=2))
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.2)
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        got = moe(x)
        want = reference_moe(moe, x.reshape(-1, 64)).reshape(3, 11, 64)
    assert (got - want).abs().max().item() <= 1e-5
    assert int(moe.last_counts.sum()) == 33 * 2  # every token took exactly top_k slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "padded-rows"])
def test_sparse_moe_gradients_equal_the_loop(dtype):
    """Input and weight gradients through the custom gather equal plain autograd of the loop.
    Outside fp32 on CPU each expert's rows are padded to a multiple of CPU_ROW_BUCKET (the bf16
    path); float64 takes that path (its router still runs in fp32, hence 1e-6, far below what a
    padding row adding anything would show)."""
    torch.manual_seed(7)
    moe = SparseMoE(moe_config(n_shared_experts=1, n_experts=5, top_k=3)).to(dtype)
    x = torch.randn(37, 64, dtype=dtype, requires_grad=True)
    moe(x).pow(2).sum().backward()
    got_x, got_w = x.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    x.grad = None
    moe.zero_grad()
    reference_moe(moe, x).pow(2).sum().backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-6
    assert (got_x - x.grad).abs().max().item() <= tolerance
    for name, param in moe.named_parameters():
        if name != "gate.weight":  # the loop's router gradient flows only through the top-k weights too
            assert (got_w[name] - param.grad).abs().max().item() <= tolerance, name


def test_each_token_uses_exactly_its_top_k_experts():
    torch.manual_seed(1)
    moe = SparseMoE(moe_config(n_experts=6, top_k=2))
    x = torch.randn(20, 64)
    with torch.no_grad():
        before = moe(x)
        _, experts, _ = moe.gate(x)
        assert all(len(set(row)) == 2 for row in experts.tolist())
        chosen = set(experts[0].tolist())
        # Changing every expert that token 0 did not choose leaves its output exactly alone...
        for e in set(range(6)) - chosen:
            moe.experts[e].down_proj.weight.add_(1.0)
        after = moe(x)
        assert torch.equal(after[0], before[0])
        # ...and changing one it chose moves it.
        moe.experts[min(chosen)].down_proj.weight.add_(1.0)
        assert not torch.allclose(moe(x)[0], before[0])


def test_aux_loss_by_hand():
    # 4 tokens, 2 experts, top_k 1: token 0, 1, 2 pick expert 0, token 3 expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    counts = torch.tensor([3, 1])
    # f = (3/4, 1/4), P = (2.6/4, 1.4/4): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert load_balancing_loss(probs, counts, top_k=1).item() == pytest.approx(1.15, abs=1e-6)
    # top_k 2 over 3 experts: f divides by tokens * top_k, so f sums to 1.
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    counts = torch.tensor([1, 2, 1])  # token 0 -> {0, 1}, token 1 -> {1, 2}
    # f = (1/4, 2/4, 1/4), P = (0.3, 0.45, 0.25): 3 * (0.075 + 0.225 + 0.0625) = 1.0875
    assert load_balancing_loss(probs, counts, top_k=2).item() == pytest.approx(1.0875, abs=1e-6)


def test_aux_loss_is_coef_when_balanced_and_n_experts_when_collapsed():
    torch.manual_seed(0)
    model = EtudeModel(moe_config(aux_loss_coef=0.01, n_layers=3))
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 16))
    with torch.no_grad():
        for block in model.layers:
            block.mlp.gate.weight.zero_()  # uniform router: P_e = 1/E exactly
        assert model(ids)[2].item() == pytest.approx(0.01, rel=1e-6)
    # Balanced assignments (f_e = 1/E) give 1 whatever the probabilities...
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.2, 0.2, 0.5, 0.1], [0.1, 0.1, 0.1, 0.7]])
    assert load_balancing_loss(probs, torch.tensor([1, 1, 1, 1]), top_k=1).item() == pytest.approx(1.0)
    # ...and a router that sends everything to one expert with certainty gives n_experts.
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 8)
    assert load_balancing_loss(collapsed, torch.tensor([8, 0, 0, 0]), top_k=1).item() == pytest.approx(4.0)


def test_aux_loss_matches_transformers_mixtral():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(2)
    logits = torch.randn(37, 5) * 2
    probs = logits.softmax(-1)
    experts = torch.topk(probs, 2, dim=-1).indices
    counts = torch.bincount(experts.reshape(-1), minlength=5)
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=5, top_k=2)
    # transformers divides the counts by tokens rather than token-slots: exactly top_k times ours
    assert (2 * load_balancing_loss(probs, counts, top_k=2)).item() == pytest.approx(theirs.item(), rel=1e-6)


def test_kv_cache_and_batched_generation():
    torch.manual_seed(3)
    model = EtudeModel(moe_config(n_shared_experts=1)).eval()
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 20))
    with torch.no_grad():
        full = model(ids)[0]
        cache = KVCache(model.config, 2, 20, "cpu", torch.float32)
        parts = [model(ids[:, :7], kv_cache=cache)[0]] + [model(ids[:, i:i + 1], kv_cache=cache)[0] for i in range(7, 20)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5
    prompts = [[5, 9, 13, 2], [7, 1], [3, 3, 8, 100, 42, 17]]
    alone = [list(model.generate(p, max_new_tokens=8)) for p in prompts]
    requests = [Request(p, 8) for p in prompts]
    assert [r.output_ids for r in Engine(model, None, max_batch=2).run(requests)] == alone
    assert list(model.generate(prompts[0], max_new_tokens=8, use_cache=False)) == alone[0]


def test_lora_on_a_moe_model():
    torch.manual_seed(4)
    model = EtudeModel(moe_config()).eval()
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 12))
    base = model(ids)[0].detach()
    wrapped = apply_lora(model, r=4, alpha=8.0)  # the default targets: attention and every expert
    assert "layers.0.self_attn.q_proj" in wrapped and "layers.1.mlp.experts.3.down_proj" in wrapped
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    with torch.no_grad():
        adapted = model(ids)[0]
        assert not torch.allclose(adapted, base, atol=1e-4)
        merge_and_unload(model)
        assert (model(ids)[0] - adapted).abs().max().item() < 1e-4


def test_config_checks_and_presets():
    with pytest.raises(ConfigError, match="top_k"):
        moe_config(top_k=5)
    with pytest.raises(ConfigError, match="aux_loss_coef"):
        moe_config(aux_loss_coef=math.inf)
    with pytest.raises(ConfigError, match="n_shared_experts"):
        moe_config(n_shared_experts=-1)
    # The MoE presets have (about) the active parameters of their dense twins.
    for dense, moe in (("tiny", "tiny-moe"), ("small", "small-moe")):
        d, m = EtudeModel(preset_model_config(dense)), EtudeModel(preset_model_config(moe))
        assert m.num_parameters() > d.num_parameters()
        assert m.flops_per_token(256) == pytest.approx(d.flops_per_token(256), rel=0.04)


# ---- export and import ------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

from tool.convert_hf import main as convert_main  # noqa: E402

TARGETS = {
    "mixtral": (dict(), "MixtralForCausalLM"),
    "qwen2moe-shared": (dict(n_shared_experts=2, tie_embeddings=False), "Qwen2MoeForCausalLM"),
    "qwen2moe-raw-topk": (dict(norm_topk_prob=False, n_experts=3, top_k=1), "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_export_matches_transformers_and_imports_back(tmp_path, tiny_tokenizer_dir, target, capsys):
    overrides, architecture = TARGETS[target]
    torch.manual_seed(5)
    model = EtudeModel(moe_config(**overrides)).eval()
    save_model_folder(model, tmp_path / "native", tiny_tokenizer_dir)
    out = tmp_path / "hf"
    assert convert_main(["--model", str(tmp_path / "native"), "--out", str(out), "--verify",
                         "--tolerance", "1e-5", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "identical token for token" in printed and architecture in printed
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 40))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() <= 1e-5
        prompt = ids[0, :10]
        theirs = hf.generate(prompt[None], attention_mask=torch.ones(1, 10, dtype=torch.long), do_sample=False,
                             max_new_tokens=16, eos_token_id=None)[0, 10:].tolist()
    assert list(model.generate(prompt, max_new_tokens=16)) == theirs

    # Back to an Etude folder: the same config and bit-identical weights.
    assert convert_main(["--import", str(out), "--out", str(tmp_path / "back")]) == 0
    back = load_model_folder(tmp_path / "back")
    assert back.config == model.config
    original = model.state_dict_for_save()
    assert all(torch.equal(original[k], v) for k, v in back.state_dict_for_save().items())

    # transformers 5 can also save its fused 3-D expert tensors; those load too.
    fused = tmp_path / "fused"
    hf.save_pretrained(str(fused), save_original_format=False)
    with torch.no_grad():
        assert (load_model_folder(fused)(ids)[0] - model(ids)[0]).abs().max().item() <= 1e-5


def test_import_refuses_what_etude_cannot_express(tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(6)
    save_model_folder(EtudeModel(moe_config(n_shared_experts=1)), tmp_path / "native", tiny_tokenizer_dir)
    out = tmp_path / "hf"
    assert convert_main(["--model", str(tmp_path / "native"), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    for change, field in (({"qkv_bias": True}, "qkv_bias"), ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
                          ({"shared_expert_intermediate_size": 50}, "shared_expert_intermediate_size"),
                          ({"use_sliding_window": True}, "use_sliding_window")):
        (out / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=field):
            load_model_folder(out)


# ---- training -------------------------------------------------------------------------------------

def test_tiny_moe_pretraining_learns_and_logs_expert_shares(tmp_path, tiny_tokenizer_dir):
    write_corpus(tmp_path / "train.jsonl", 400, seed=1)
    write_corpus(tmp_path / "val.jsonl", 40, seed=2)
    toy = {**json.loads(TOY_MODEL), "intermediate_size": 64}
    out = tmp_path / "model"
    assert pretrain_main(["--preset", "tiny-moe", "--data", str(tmp_path / "train.jsonl"),
                          "--val-data", str(tmp_path / "val.jsonl"), "--tokenizer-dir", str(tiny_tokenizer_dir),
                          "--out-dir", str(out), "--model-config", json.dumps(toy), "--seq-len", "32",
                          "--batch-size", "4", "--warmup-steps", "5", "--lr", "3e-3", "--max-steps", "30",
                          "--eval-every", "30", "--eval-batches", "2", "--log-every", "10", "--device", "cpu",
                          "--dtype", "fp32"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    routing = [r for r in records if "expert_share" in r]
    assert [r["step"] for r in routing] == [10, 20, 30]
    for record in routing:
        assert len(record["expert_share"]) == 2 and len(record["router_entropy"]) == 2
        for shares in record["expert_share"]:
            assert len(shares) == 4 and sum(shares) == pytest.approx(1, abs=1e-3)
        assert all(0 < h <= math.log(4) + 1e-6 for h in record["router_entropy"])
    model = load_model_folder(out)
    assert model.config.use_moe and model.config.n_experts == 4 and model.config.intermediate_size == 64
