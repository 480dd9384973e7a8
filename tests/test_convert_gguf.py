"""GGUF export at tiny size: the file read back with gguf's own reader (metadata, tokenizer,
tensor names, shapes and values), what llama.cpp cannot run exactly is refused by name, and the
real llama.cpp (llama-cpp-python) gives our token ids, logits, greedy continuation and chat
answer; a failed check writes nothing.

The llama.cpp tests skip only outside CI when llama-cpp-python is missing; in CI (CI set, as
.ci/run runs) a missing binding is an error, so the parity test cannot pass by skipping."""

from __future__ import annotations

import json
import os
import shutil

import gguf  # a runtime requirement (requirements.txt): never skipped
import numpy as np
import pytest
import torch

from model.gguf_llama import rope_pairs
from model.tokenizer import CHAT_TEMPLATE, load_tokenizer
from tool.convert_gguf import main as convert_main

from tests.test_convert_hf import make_native


def needs_llama_cpp():
    if os.environ.get("CI"):
        import llama_cpp  # noqa: F401  (CI installs it: requirements-test.txt)
    else:
        pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python to run the llama.cpp parity tests")


def field(reader, key):
    """A GGUF metadata value as Python (str, number, or list)."""
    value = reader.fields[key]
    if value.types[0] == gguf.GGUFValueType.ARRAY:
        return [value.contents(i) for i in range(len(value.data))]
    return value.contents()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gguf_reads_back(tmp_path, tiny_tokenizer_dir, tie):
    model = make_native(tmp_path / "native", tiny_tokenizer_dir, tie_embeddings=tie, intermediate_size=96)
    config = model.config
    assert convert_main(["--model", str(tmp_path / "native"), "--out-dir", str(tmp_path / "out"),
                         "--type", "f32", "q8_0", "--name", "toy"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "toy-f32.gguf", "toy-q8_0.gguf"]
    reader = gguf.GGUFReader(tmp_path / "out" / "toy-f32.gguf")
    expected = {"general.architecture": "llama", "general.name": "toy", "llama.context_length": config.max_seq_len,
                "llama.embedding_length": config.hidden_size, "llama.block_count": config.n_layers,
                "llama.feed_forward_length": 96, "llama.attention.head_count": config.n_heads,
                "llama.attention.head_count_kv": config.n_kv_heads, "llama.rope.dimension_count": config.head_dim,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
                "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE}
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_theta)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.norm_eps)

    tokenizer_json = json.loads(load_tokenizer(tiny_tokenizer_dir).to_str())
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert all(tokens[i] == t for t, i in tokenizer_json["model"]["vocab"].items())
    assert field(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]  # control x3, then normal
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in tokenizer_json["model"]["merges"]]

    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tie else set())
    for i in range(config.n_layers):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == names
    kv_width = config.n_kv_heads * config.head_dim
    assert list(tensors["token_embd.weight"].shape) == [config.hidden_size, config.vocab_size]  # GGUF: fastest axis first
    assert list(tensors["blk.0.attn_k.weight"].shape) == [config.hidden_size, kv_width]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [96, config.hidden_size]
    state = model.state_dict_for_save()
    # The values: plain copies, q and k with rows reordered for llama.cpp's adjacent-pair rope.
    assert np.array_equal(tensors["token_embd.weight"].data, state["embed_tokens.weight"].numpy())
    assert np.array_equal(tensors["blk.1.attn_k.weight"].data,
                          rope_pairs(state["layers.1.self_attn.k_proj.weight"], config.n_kv_heads).numpy())

    quantized = {t.name: t for t in gguf.GGUFReader(tmp_path / "out" / "toy-q8_0.gguf").tensors}
    assert quantized["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert quantized["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    dequantized = gguf.quants.dequantize(quantized["blk.0.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(dequantized - state["layers.0.mlp.up_proj.weight"].numpy()).max() < 0.01

    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM ./toy-f32.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile


def test_rope_pairs_turns_rotate_half_into_adjacent_pairs():
    """Rotating halves of q and k equals rotating adjacent pairs of the reordered rows: the same
    attention scores come out (what llama.cpp's `llama` graph computes)."""
    torch.manual_seed(0)
    heads, head_dim, hidden, position = 2, 8, 6, 5
    weight = torch.randn(heads * head_dim, hidden)
    x = torch.randn(hidden)
    theta = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim) * position
    cos, sin = theta.cos(), theta.sin()

    q = (weight @ x).view(heads, head_dim)
    first, second = q[:, :head_dim // 2], q[:, head_dim // 2:]
    rotate_half = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

    p = (rope_pairs(weight, heads) @ x).view(heads, head_dim // 2, 2)
    adjacent = torch.stack((p[..., 0] * cos - p[..., 1] * sin, p[..., 1] * cos + p[..., 0] * sin), dim=-1)
    # The same numbers, in rows (i, i + d/2) -> (2i, 2i + 1): dot products between heads agree.
    assert torch.allclose(adjacent.reshape(heads, head_dim), rope_pairs(rotate_half.reshape(-1, 1), heads).view(heads, head_dim))


def test_refuses_what_llama_cpp_would_run_differently(tmp_path, tiny_tokenizer_dir, capsys):
    for shared, renormalised in ((1, True), (0, False)):  # neither llama.cpp graph computes these two
        make_native(tmp_path / "moe", tiny_tokenizer_dir, use_moe=True, n_experts=4, top_k=2,
                    n_shared_experts=shared, norm_topk_prob=renormalised)
        assert convert_main(["--model", str(tmp_path / "moe"), "--out-dir", str(tmp_path / "out")]) == 2
        assert "no GGUF would compute what the model does" in capsys.readouterr().err

    make_native(tmp_path / "native", tiny_tokenizer_dir)
    data = json.loads((tmp_path / "native" / "tokenizer.json").read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "native" / "tokenizer.json").write_text(json.dumps(data))
    assert convert_main(["--model", str(tmp_path / "native"), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "add_prefix_space" in err and "train/train_tokenizer.py" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("shape", [dict(tie_embeddings=True), dict(tie_embeddings=False, n_kv_heads=4, vocab_size=576),
                                   dict(use_moe=True, n_experts=4, top_k=2, intermediate_size=64),
                                   dict(use_moe=True, n_experts=4, top_k=2, intermediate_size=64, n_shared_experts=1,
                                        norm_topk_prob=False)],
                         ids=["dense-tied-gqa", "dense-untied-mha-padded-vocab", "moe-mixtral-shape-llama",
                              "moe-qwen2moe-shape"])
def test_llama_cpp_parity(tmp_path, tiny_tokenizer_dir, shape, request):
    needs_llama_cpp()
    make_native(tmp_path / "native", tiny_tokenizer_dir, **shape)
    types = {"dense-tied-gqa": ["f32", "f16", "q8_0"], "dense-untied-mha-padded-vocab": ["f32", "f16"]}.get(request.node.callspec.id, ["f32"])
    code = convert_main(["--model", str(tmp_path / "native"), "--out-dir", str(tmp_path / "out"), "--type", *types,
                         "--verify", "--max-new-tokens", "16", "--json", str(tmp_path / "report.json")])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())["types"]
    for type_name in types:
        figures = report[type_name]
        assert figures["sample_texts_mismatching"] == 0 and all(c["prompt_identical"] for c in figures["chats"])
        if type_name in ("f32", "f16"):
            assert figures["greedy_agree"] == figures["greedy_tokens"] and all(c["identical"] for c in figures["chats"])
    assert report["f32"]["max_logit_diff"] < 1e-3
    arch = field(gguf.GGUFReader(tmp_path / "out" / "native-f32.gguf"), "general.architecture")
    assert arch == ("qwen2moe" if request.node.callspec.id == "moe-qwen2moe-shape" else "llama")


def _merges_reversed(original):
    def vocab(*args):
        tokens, types, merges = original(*args)
        return tokens, types, merges[::-1]
    return vocab


@pytest.mark.parametrize("fault", ["merges-reversed", "rope-unpaired"])
def test_failed_check_writes_nothing(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys, fault):
    """A file whose merges are out of rank order fails the token check; one whose q/k rows are
    not reordered for llama.cpp's rope fails the logits check. Neither is written."""
    needs_llama_cpp()
    import model.gguf_llama as gguf_llama
    if fault == "merges-reversed":
        monkeypatch.setattr(gguf_llama, "gguf_vocab", _merges_reversed(gguf_llama.gguf_vocab))
    else:
        monkeypatch.setattr(gguf_llama, "rope_pairs", lambda weight, n_heads: weight)
    make_native(tmp_path / "native", tiny_tokenizer_dir)
    (tmp_path / "out").mkdir()
    code = convert_main(["--model", str(tmp_path / "native"), "--out-dir", str(tmp_path / "out"), "--type", "f32",
                         "--verify", "--max-new-tokens", "4"])
    assert code == 1
    assert ("tokenizes" if fault == "merges-reversed" else "logits differ") in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_check_tokens_on_data_files(tmp_path, tiny_tokenizer_dir, tiny_text_corpus):
    needs_llama_cpp()
    make_native(tmp_path / "native", tiny_tokenizer_dir)
    pretrain = tmp_path / "pretrain.jsonl"
    docs = tiny_text_corpus.read_text(encoding="utf-8").split("\n\n")[:50]
    pretrain.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"conversations": [{"role": "user", "content": "你好 <|im_end|> 😀"},
                                                 {"role": "assistant", "content": "  Hi!\n\n"}]}) + "\n")
    code = convert_main(["--model", str(tmp_path / "native"), "--out-dir", str(tmp_path / "out"), "--type", "f32",
                         "--verify", "--max-new-tokens", "4", "--check-tokens", str(pretrain), str(sft),
                         "--json", str(tmp_path / "report.json")])
    assert code == 0
    checked = json.loads((tmp_path / "report.json").read_text())["check_tokens"]
    assert checked[str(pretrain)] == {"documents": 50, "mismatching": 0, "first": None}
    assert checked[str(sft)]["mismatching"] == 0
    shutil.rmtree(tmp_path / "out")


def test_bench_gguf_smoke(tmp_path, tiny_tokenizer_dir):
    """tool/bench_gguf.py times all four engines and reports each one's agreement with fp32 Etude."""
    needs_llama_cpp()
    from tool.bench_gguf import main as bench_main
    make_native(tmp_path / "native", tiny_tokenizer_dir)
    assert bench_main(["--model", str(tmp_path / "native"), "--new-tokens", "8", "--repeats", "1", "--warmup", "0",
                       "--threads", "1", "--json", str(tmp_path / "bench.json")]) == 0
    engines = json.loads((tmp_path / "bench.json").read_text())["engines"]
    assert set(engines) == {"etude fp32", "etude --int8", "llama.cpp q8_0", "llama.cpp f16"}
    assert engines["llama.cpp f16"]["greedy_agree_with_fp32"] == 8 and engines["etude fp32"]["tokens_per_s"] > 0
