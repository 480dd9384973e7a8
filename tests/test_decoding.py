"""Decoding copies (model/decoding.py): merged projections give the model's outputs."""

import pytest
import torch

from config import EtudeConfig
from model.decoding import merge_projections
from model.lora import LoRALinear, apply_lora
from model.model import EtudeModel, KVCache


def _model(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=256, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return EtudeModel(EtudeConfig(**{**config, **overrides})).eval()


@pytest.mark.parametrize("overrides", [
    {},                                                       # grouped-query, tied
    {"n_kv_heads": 4, "tie_embeddings": False},               # multi-head, untied
    {"use_moe": True, "n_experts": 4, "top_k": 2, "n_shared_experts": 1, "intermediate_size": 48},
])
def test_merged_projections_give_the_models_logits_and_tokens(overrides):
    model = _model(**overrides)
    merged = merge_projections(model)
    attention = merged.layers[0].self_attn
    assert not hasattr(attention, "q_proj") and merged.decoding_copy
    assert hasattr(model.layers[0].self_attn, "q_proj")  # the original is untouched
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.allclose(merged(ids)[0], model(ids)[0], atol=1e-5)
        # Prefill into a cache, then one token: the cached path agrees too.
        caches = [KVCache(m.config, 2, 32, "cpu", torch.float32) for m in (model, merged)]
        for m, cache in zip((model, merged), caches):
            m(ids[:, :20], kv_cache=cache)
        assert torch.allclose(merged(ids[:, 20:21], kv_cache=caches[1])[0],
                              model(ids[:, 20:21], kv_cache=caches[0])[0], atol=1e-5)
    prompt = ids[0, :8]
    assert list(merged.generate(prompt, max_new_tokens=16)) == list(model.generate(prompt, max_new_tokens=16))


def test_merged_shapes_and_lora_layers_stay_separate():
    model = _model()
    head_dim = 64 // 4
    merged = merge_projections(model)
    assert merged.layers[0].self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * head_dim, 64)
    assert merged.layers[0].mlp.gate_up_proj.weight.shape == (2 * model.config.intermediate_size, 64)
    assert not any(p.requires_grad for p in merged.parameters())

    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    with_adapter = merge_projections(model)
    attention = with_adapter.layers[0].self_attn
    assert attention.qkv_proj is None and isinstance(attention.q_proj, LoRALinear)
    assert with_adapter.layers[0].mlp.gate_up_proj is not None  # not adapted, so merged


def test_a_decoding_copy_is_not_saved():
    with pytest.raises(ValueError, match="decoding copy"):
        merge_projections(_model()).state_dict_for_save()
