"""The model: shapes, causality, the KV cache, attention/RoPE against a plain reference,
parity with transformers' Llama, config validation, strict loading."""

import math

import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, EtudeConfig, preset_model_config
from model.checkpoint import load_model_folder, read_model_config, save_model_folder
from model.model import EtudeModel, KVCache, sample_next


def tiny_config(**overrides) -> EtudeConfig:
    return EtudeConfig(**{**dict(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                 max_seq_len=64), **overrides})


@pytest.fixture
def model():
    torch.manual_seed(0)
    return EtudeModel(tiny_config()).eval()


def test_shapes_and_loss(model):
    ids = torch.randint(0, 512, (3, 17))
    logits, loss, aux = model(ids, labels=torch.randint(0, 512, (3, 17)))
    assert logits.shape == (3, 17, 512)
    assert loss.shape == () and math.isfinite(loss.item())
    # An untrained model is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(512)) < 0.5
    assert aux.item() == 0.0
    assert model(ids, last_only=True)[0].shape == (3, 1, 512)


def test_ignored_labels_do_not_count(model):
    ids = torch.randint(0, 512, (2, 10))
    labels = ids.clone()
    labels[:, :5] = -100
    _, loss, _ = model(ids, labels=labels)
    logits = model(ids)[0]
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 512), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_causality(model):
    ids = torch.randint(0, 512, (2, 24))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 512, (2, 12))
    before, after = model(ids)[0], model(changed)[0]
    assert torch.equal(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_kv_cache_matches_full_forward(model):
    ids = torch.randint(0, 512, (2, 20))
    full = model(ids)[0]
    cache = KVCache(model.config, 2, 20, "cpu", torch.float32)
    first = model(ids[:, :8], kv_cache=cache)[0]
    second = model(ids[:, 8:15], kv_cache=cache)[0]  # a chunk after a cached prefix
    steps = [model(ids[:, i:i + 1], kv_cache=cache)[0] for i in range(15, 20)]
    stitched = torch.cat([first, second, *steps], dim=1)
    torch.testing.assert_close(stitched, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_greedy_with_and_without_cache(n_kv_heads):
    torch.manual_seed(1)
    model = EtudeModel(tiny_config(n_kv_heads=n_kv_heads)).eval()
    prompt = [5, 17, 42, 99]
    cached = list(model.generate(prompt, max_new_tokens=30, use_cache=True))
    uncached = list(model.generate(prompt, max_new_tokens=30, use_cache=False))
    assert cached == uncached and len(cached) == 30


def test_generate_stops_and_respects_context(model):
    first = next(model.generate([1, 2, 3], max_new_tokens=5))
    assert list(model.generate([1, 2, 3], max_new_tokens=5, stop_ids=[first])) == [first]
    assert len(list(model.generate(list(range(60)), max_new_tokens=50))) == 4  # max_seq_len 64


def _reference_attention_block(model: EtudeModel, x: torch.Tensor) -> torch.Tensor:
    """Attention of layer 0 written out by hand: explicit RoPE with complex-free rotation of
    each (i, i + d/2) pair, repeated kv heads, masked softmax."""
    cfg = model.config
    attn = model.layers[0].self_attn
    batch, length, _ = x.shape
    d = cfg.head_dim
    q = (x @ attn.q_proj.weight.T).view(batch, length, cfg.n_heads, d)
    k = (x @ attn.k_proj.weight.T).view(batch, length, cfg.n_kv_heads, d)
    v = (x @ attn.v_proj.weight.T).view(batch, length, cfg.n_kv_heads, d)

    def rope(t):
        out = torch.empty_like(t)
        for pos in range(length):
            for i in range(d // 2):
                angle = pos / cfg.rope_theta ** (2 * i / d)
                c, s = math.cos(angle), math.sin(angle)
                a, b = t[:, pos, :, i], t[:, pos, :, i + d // 2]
                out[:, pos, :, i] = a * c - b * s
                out[:, pos, :, i + d // 2] = b * c + a * s
        return out

    q, k = rope(q), rope(k)
    group = cfg.n_heads // cfg.n_kv_heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, length, -1)
    return out @ attn.o_proj.weight.T


def test_attention_and_rope_against_reference(model):
    x = torch.randn(2, 9, 64)
    positions = torch.arange(9)
    cos, sin = model.rotary(positions)
    ours = model.layers[0].self_attn(x, cos, sin, 0, None, None)
    torch.testing.assert_close(ours, _reference_attention_block(model, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tie,n_kv_heads", [(True, 2), (False, 4), (False, 1)])
def test_logits_match_transformers_llama(tie, n_kv_heads):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    cfg = tiny_config(tie_embeddings=tie, n_kv_heads=n_kv_heads, rope_theta=5e5, norm_eps=1e-6)
    ours = EtudeModel(cfg).eval()
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=tie, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    state = {k if k.startswith("lm_head") else f"model.{k}": v for k, v in ours.state_dict_for_save().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)[0]).abs().max().item()
    assert diff < 1e-5


def test_config_reports_every_problem():
    with pytest.raises(ConfigError) as info:
        EtudeConfig(hidden_size=100, n_heads=3, n_kv_heads=0, dropout=1.5, norm_eps=0)
    message = str(info.value)
    for expected in ("n_kv_heads", "divisible by n_heads", "dropout", "norm_eps"):
        assert expected in message


def test_config_rejects_unknown_keys():
    data = tiny_config().to_dict()
    assert EtudeConfig.from_dict(data) == tiny_config()
    with pytest.raises(ConfigError, match="unknown key.*n_layer'"):
        EtudeConfig.from_dict({**data, "n_layer": 3})


def test_ffn_multiple_of_rule_and_presets():
    assert tiny_config().intermediate_size == 192  # 8/3 * 64 = 170.7 -> next multiple of 64
    small = EtudeModel(preset_model_config("small"))
    assert 25e6 < small.num_parameters() < 27e6


def test_optimizer_groups_exclude_norms_and_embeddings(model):
    decay, no_decay = model.optimizer_groups(0.1)
    assert model.embed_tokens.weight in [p for p in no_decay["params"]]
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 or p is model.embed_tokens.weight for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_parameters()


def test_residual_projections_have_scaled_init():
    torch.manual_seed(0)
    model = EtudeModel(tiny_config(hidden_size=256, n_layers=8, vocab_size=512))
    q_std = model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q_std - 0.02) < 0.002
    assert abs(o_std - 0.02 / math.sqrt(16)) < 0.0005


def test_save_and_load_model_folder(tmp_path, model):
    folder = save_model_folder(model, tmp_path / "m")
    assert read_model_config(folder) == model.config
    loaded = load_model_folder(folder).eval()
    ids = torch.randint(0, 512, (1, 12))
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"


def test_strict_load_refuses_another_architecture(tmp_path, model):
    folder = save_model_folder(model, tmp_path / "m")
    other = EtudeModel(tiny_config(n_layers=3))
    from model.checkpoint import load_safetensors
    with pytest.raises(ValueError, match="do not fit this model.*missing: layers.2"):
        other.load_saved_state(load_safetensors(folder / "model.safetensors"))


def test_sampling_filters():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, torch.tensor([]), 1.0, 2, None, 1.0, generator)) for _ in range(50)}
    assert draws <= {2, 3}
    draws = {int(sample_next(logits, torch.tensor([]), 1.0, None, 0.5, generator)) for _ in range(50)}
    assert draws == {3}  # token 3 alone holds 64% of the mass
    penalised = sample_next(logits, torch.tensor([3]), 0.0, None, None, 10.0)
    assert int(penalised) == 2
