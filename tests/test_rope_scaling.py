"""RoPE scaling (EtudeConfig.rope_scaling: linear, dynamic NTK, YaRN): the config's checks,
logit parity with transformers' Llama past the trained length (full forward and cached decoding),
the Hugging Face export and import, the GGUF keys, and --rope-scaling at load."""

from __future__ import annotations

import json

import pytest
import torch

from config import ConfigError, EtudeConfig, parse_rope_scaling
from model.checkpoint import load_model_folder, read_model_config, save_model_folder
from model.model import EtudeModel, KVCache
from tests.conftest import TINY_VOCAB_SIZE

transformers = pytest.importorskip("transformers")

TRAINED = 16  # the "trained" length of the tiny models; sequences below run to 3-4x past it
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": TRAINED},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": TRAINED},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED},
    "yarn-params": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": TRAINED,
                    "beta_fast": 8, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED,
                              "attention_factor": 1.3},
}


def scaled_config(scaling, **overrides) -> EtudeConfig:
    shape = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                 rope_theta=1e4, norm_eps=1e-6, tie_embeddings=False, initializer_range=0.1, rope_scaling=scaling)
    return EtudeConfig(**{**shape, **overrides})


def hf_twin(ours: EtudeModel):
    """transformers' LlamaForCausalLM with our weights, configured by our own export's config.json."""
    from model.hf_llama import config_to_hf
    fields = config_to_hf(ours.config, {"bos": 0, "eos": 2, "pad": 0})
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    state = {k if k.startswith("lm_head") else f"model.{k}": v for k, v in ours.state_dict_for_save().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    return hf


@pytest.mark.parametrize("name", list(SCALINGS))
def test_logits_match_transformers_past_the_trained_length(name):
    torch.manual_seed(0)
    ours = EtudeModel(scaled_config(SCALINGS[name])).eval()
    hf = hf_twin(ours)
    assert hf.config.rope_parameters["rope_type"] == SCALINGS[name]["rope_type"]
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for length in (12, 60):  # inside and 3.75x past the trained length
            diff = (hf(ids[:, :length]).logits - ours(ids[:, :length])[0]).abs().max().item()
            assert diff < 1e-5, f"{name} at {length} tokens: {diff}"
    # The scaling does something: plain RoPE gives other logits past the trained length.
    plain = EtudeModel(scaled_config(None)).eval()
    plain.load_saved_state(ours.state_dict_for_save())
    with torch.no_grad():
        assert (plain(ids)[0] - ours(ids)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn"])
def test_cached_decoding_matches_transformers(name):
    """Token by token through the KV cache, past the trained length. For dynamic NTK this is
    where transformers recomputes the frequencies at every step (each new key keeps the rotation
    of its own step), and so do we: cached decoding then differs from a full forward."""
    torch.manual_seed(0)
    ours = EtudeModel(scaled_config(SCALINGS[name])).eval()
    hf = hf_twin(ours)
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 48), generator=torch.Generator().manual_seed(2))
    prefill = 10
    cache = KVCache(ours.config, 2, 48, "cpu", torch.float32)
    with torch.no_grad():
        out = hf(ids[:, :prefill], use_cache=True)
        theirs, past = [out.logits], out.past_key_values
        mine = [ours(ids[:, :prefill], kv_cache=cache)[0]]
        for i in range(prefill, 48):
            out = hf(ids[:, i:i + 1], past_key_values=past, use_cache=True)
            theirs.append(out.logits)
            past = out.past_key_values
            mine.append(ours(ids[:, i:i + 1], kv_cache=cache)[0])
        theirs, mine = torch.cat(theirs, 1), torch.cat(mine, 1)
        full = ours(ids)[0]
    assert (theirs - mine).abs().max().item() < 1e-5
    gap = (mine - full).abs().max().item()
    assert (gap > 1e-2) if name == "dynamic" else (gap < 1e-5)


def test_dynamic_rotary_by_positions_matches_span():
    """The engine asks the rotary embedding for per-row positions; with dynamic scaling the
    largest position of the batch sets the frequencies, as for a span ending there."""
    model = EtudeModel(scaled_config(SCALINGS["dynamic"])).eval()
    cos, sin = model.rotary(torch.tensor([[3], [40], [0]]))
    span_cos, span_sin = model.rotary.span(0, 41)
    assert torch.equal(cos[1, 0, 0], span_cos[0, 0, 40]) and torch.equal(sin[0, 0, 0], span_sin[0, 0, 3])
    inside, _ = model.rotary(torch.tensor([[3], [10]]))  # ends within the trained length: plain RoPE again
    assert torch.equal(inside[0, 0, 0], EtudeModel(scaled_config(None)).rotary.cos_table[3])


def test_dynamic_keeps_transformers_state_across_forwards():
    """transformers keeps the longest dynamic length seen until a forward ends within the trained
    length: a shorter forward past it reuses the longer one's frequencies. Same calls, same logits."""
    torch.manual_seed(0)
    ours = EtudeModel(scaled_config(SCALINGS["dynamic"])).eval()
    hf = hf_twin(ours)
    ids = torch.randint(0, TINY_VOCAB_SIZE, (1, 60), generator=torch.Generator().manual_seed(5))
    fresh = EtudeModel(scaled_config(SCALINGS["dynamic"])).eval()
    fresh.load_saved_state(ours.state_dict_for_save())
    with torch.no_grad():
        for length in (60, 40, 16, 10, 40):
            theirs, mine = hf(ids[:, :length]).logits, ours(ids[:, :length])[0]
            assert (theirs - mine).abs().max().item() < 1e-5, length
        assert (fresh(ids[:, :40])[0] - mine).abs().max().item() < 1e-5  # after the reset at 10: as new
        ours(ids)
        assert (fresh(ids[:, :40])[0] - ours(ids[:, :40])[0]).abs().max().item() > 1e-3  # 60's base reused


def test_plain_rope_is_unchanged_and_old_configs_load(tmp_path):
    """rope_scaling None is today's RoPE to the bit, and a config.json without the key loads."""
    model = EtudeModel(scaled_config(None))
    head_dim, theta = model.config.head_dim, model.config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(64, dtype=torch.float32), inv_freq)
    assert torch.equal(model.rotary.cos_table, torch.cat((angles, angles), -1).cos())
    folder = save_model_folder(model, tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    assert data["rope_scaling"] is None
    del data["rope_scaling"]
    (folder / "config.json").write_text(json.dumps(data))
    assert read_model_config(folder) == model.config


def test_scaled_model_folder_round_trip(tmp_path):
    model = EtudeModel(scaled_config(SCALINGS["yarn-params"]))
    folder = save_model_folder(model, tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["rope_scaling"] == SCALINGS["yarn-params"]
    loaded = load_model_folder(folder).eval()
    ids = torch.randint(0, TINY_VOCAB_SIZE, (1, 50))
    assert torch.equal(loaded(ids)[0], model.eval()(ids)[0])


@pytest.mark.parametrize("scaling,message", [
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}, "one of linear, dynamic, yarn"),
    ({"rope_type": "default"}, "plain RoPE is rope_scaling null"),
    ({"rope_type": "yarn", "factor": 4.0}, "missing ['original_max_position_embeddings']"),
    ({"rope_type": "linear", "factor": 0.5, "original_max_position_embeddings": 16}, "factor must be a number >= 1"),
    ({"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 16, "beta_fast": 32},
     "does not take ['beta_fast']"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "beta_fast": 1, "beta_slow": 2},
     "beta_fast (1) must be greater than beta_slow (2)"),
    ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 128}, "exceeds max_seq_len (64)"),
    ("yarn:4", "must be a dict or null"),
])
def test_config_names_what_is_wrong(scaling, message):
    with pytest.raises(ConfigError) as info:
        scaled_config(scaling)
    assert message in str(info.value)


def test_type_is_read_as_rope_type_and_flag_values():
    assert scaled_config({"type": "linear", "factor": 2, "original_max_position_embeddings": 16}).rope_scaling == \
        {"rope_type": "linear", "factor": 2, "original_max_position_embeddings": 16}
    assert parse_rope_scaling("YaRN:4") == ("yarn", 4.0) and parse_rope_scaling("none") == (None, 1.0)
    for bad in ("yarn", "yarn:0.5", "ntk:2", "linear:two"):
        with pytest.raises(ValueError, match="--rope-scaling must be TYPE:FACTOR"):
            parse_rope_scaling(bad)
    config = scaled_config(None, max_seq_len=32).with_rope_scaling("yarn", 4)
    assert config.max_seq_len == 128 and config.trained_seq_len == 32
    again = config.with_rope_scaling("linear", 2)  # re-scaled from the trained length, not compounded
    assert again.max_seq_len == 64 and again.rope_scaling["original_max_position_embeddings"] == 32
    assert again.with_rope_scaling(None).max_seq_len == 32


# ---- Hugging Face export / import ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn", "yarn-params"])
def test_hf_export_and_import_round_trip(tmp_path, tiny_tokenizer_dir, name):
    from tool.convert_hf import main as convert_main
    torch.manual_seed(0)
    model = EtudeModel(scaled_config(SCALINGS[name])).eval()
    save_model_folder(model, tmp_path / "native", tiny_tokenizer_dir)
    assert convert_main(["--model", str(tmp_path / "native"), "--out", str(tmp_path / "hf")]) == 0
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    kind = SCALINGS[name]["rope_type"]
    assert exported["rope_scaling"]["rope_type"] == exported["rope_parameters"]["rope_type"] == kind
    assert exported["rope_parameters"]["rope_theta"] == exported["rope_theta"] == 1e4
    assert exported["max_position_embeddings"] == (TRAINED if kind == "dynamic" else 64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(3, TINY_VOCAB_SIZE, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() < 1e-5
    assert convert_main(["--import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_model_folder(tmp_path / "back")
    assert back.config == model.config


def test_hf_import_reads_transformers_shapes():
    from model.hf_llama import config_from_hf
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
            "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 1e4,
            "max_position_embeddings": 4096}
    yarn = config_from_hf({**base, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 1024}})
    assert yarn.max_seq_len == 4096 and yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 1024}
    dynamic = config_from_hf({**base, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}})
    assert dynamic.max_seq_len == 8192 and dynamic.rope_scaling["original_max_position_embeddings"] == 4096
    linear = config_from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert linear.max_seq_len == 4096 and linear.rope_scaling["original_max_position_embeddings"] == 2048
    for bad, message in (({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling has rope type 'longrope'"),
                         ({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                           "rope_parameters": {"rope_type": "linear", "factor": 4.0}}, "disagree"),
                         ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}},
                          "partial_rotary_factor")):
        with pytest.raises(ConfigError, match=message):
            config_from_hf({**base, **bad})


# ---- GGUF ---------------------------------------------------------------------------------------

def test_gguf_rope_scaling_keys(tmp_path, tiny_tokenizer_dir):
    gguf = pytest.importorskip("gguf")
    from model.gguf_llama import gguf_arch, write_gguf
    from model.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    for name, kind in (("linear", "linear"), ("yarn", "yarn")):
        model = EtudeModel(scaled_config(SCALINGS[name]))
        path = write_gguf(model, tokenizer, tmp_path / f"{name}.gguf", "f32", name=name)
        fields = gguf.GGUFReader(path).fields

        def value(key):
            field = fields[key]
            return field.parts[field.data[0]].tolist()[0] if field.types[0] != gguf.GGUFValueType.STRING \
                else bytes(field.parts[field.data[0]]).decode()
        assert value("llama.rope.scaling.type") == kind
        assert value("llama.rope.scaling.factor") == 4.0
        assert value("llama.rope.scaling.original_context_length") == TRAINED
        assert value("llama.context_length") == 64
    for name, message in (("dynamic", "llama.cpp has no dynamic RoPE scaling"),
                          ("yarn-params", "sets ['beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim', 'truncate']")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            gguf_arch(scaled_config(SCALINGS[name]))


@pytest.mark.parametrize("name", ["linear", "yarn"])
def test_llama_cpp_computes_the_scaled_gguf(tmp_path, tiny_tokenizer_dir, monkeypatch, name):
    """llama.cpp itself, fed the GGUF, gives our logits over 4x the trained length; without the
    rope.scaling keys it would not (the check has teeth)."""
    from tests.test_convert_gguf import needs_llama_cpp
    needs_llama_cpp()
    import model.gguf_llama as gguf_llama
    from tool.convert_gguf import main as gguf_main
    torch.manual_seed(0)
    # (llama.cpp's chat check needs a context of 128 for its prompts)
    model = EtudeModel(scaled_config({**SCALINGS[name], "original_max_position_embeddings": 32},
                                     max_seq_len=128, initializer_range=0.2)).eval()
    save_model_folder(model, tmp_path / "native", tiny_tokenizer_dir)
    argv = ["--model", str(tmp_path / "native"), "--type", "f32", "--verify", "--max-new-tokens", "8"]
    assert gguf_main([*argv, "--out-dir", str(tmp_path / "out"), "--json", str(tmp_path / "report.json")]) == 0
    figures = json.loads((tmp_path / "report.json").read_text())["types"]["f32"]
    assert figures["max_logit_diff"] < 1e-4 and figures["logit_tokens"] > 64
    monkeypatch.setattr(gguf_llama, "write_rope_scaling", lambda writer, config: None)
    assert gguf_main([*argv, "--out-dir", str(tmp_path / "plain")]) == 1


# ---- --rope-scaling at load ---------------------------------------------------------------------

def test_rope_scaling_flag_extends_the_native_context(tmp_path, tiny_tokenizer_dir, capsys):
    from inference.inference import build_chat, build_parser, main as chat_main
    from inference.server import build_parser as server_parser
    torch.manual_seed(0)
    model = EtudeModel(scaled_config(None, max_seq_len=32)).eval()
    save_model_folder(model, tmp_path / "m", tiny_tokenizer_dir)
    for parser in (build_parser(), server_parser()):
        args = parser.parse_args(["--model", str(tmp_path / "m"), "--rope-scaling", "yarn:4", "--device", "cpu"])
        args.seed = None  # as inference/server.py's main sets it
        chat = build_chat(args)
        assert chat.model.config.max_seq_len == 128 and chat.model.config.rope_scaling["rope_type"] == "yarn"
    assert "context 32 -> 128 tokens (trained at 32)" in capsys.readouterr().err
    # The chat model computes what a model scaled in code computes.
    model.set_rope_scaling("yarn", 4)
    ids = torch.randint(3, TINY_VOCAB_SIZE, (1, 100))
    with torch.no_grad():
        assert torch.allclose(chat.model(ids)[0], model(ids)[0], atol=1e-5)
    assert chat_main(["--model", str(tmp_path / "m"), "--prompt", "hi", "--rope-scaling", "ntk:2"]) == 2
    assert "--rope-scaling must be TYPE:FACTOR" in capsys.readouterr().err


def test_rope_scaling_flag_in_transformers_chat(tmp_path, tiny_tokenizer_dir):
    """inference/hf.py --rope-scaling gives the transformers model the scaling the Etude model gets."""
    from inference.hf import build_hf_chat
    from inference.inference import build_parser
    from tool.convert_hf import main as convert_main
    torch.manual_seed(0)
    model = EtudeModel(scaled_config(None, max_seq_len=32)).eval()
    save_model_folder(model, tmp_path / "m", tiny_tokenizer_dir)
    assert convert_main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "hf")]) == 0
    ids = torch.randint(3, TINY_VOCAB_SIZE, (1, 100), generator=torch.Generator().manual_seed(4))
    for spec in ("dynamic:4", "linear:4", "yarn:4"):
        args = build_parser(native=False).parse_args(["--model", str(tmp_path / "hf"), "--rope-scaling", spec,
                                                      "--device", "cpu"])
        chat = build_hf_chat(args)
        assert chat.context == 128
        model.set_rope_scaling(*parse_rope_scaling(spec))
        with torch.no_grad():
            assert (chat.model(ids).logits - model(ids)[0]).abs().max().item() < 1e-5, spec


# ---- the measurement ----------------------------------------------------------------------------

def test_rope_context_tool(tmp_path, tiny_tokenizer_dir, tiny_text_corpus, capsys):
    """tool/rope_context.py scores the same tokens in every cell: dynamic scaling is plain RoPE
    within the trained length, scaling by 1 (--factors match at 1x) is plain RoPE, and the
    figures agree with a direct computation."""
    import math
    from tool.eval.tasks import read_texts
    from tool.rope_context import main as rope_main, stream_nats, token_stream
    from model.tokenizer import load_tokenizer
    torch.manual_seed(0)
    model = EtudeModel(scaled_config(None, max_seq_len=16)).eval()
    save_model_folder(model, tmp_path / "m", tiny_tokenizer_dir)
    code = rope_main([str(tmp_path / "m"), "--data", str(tiny_text_corpus), "--tokens", "300", "--factors", "4,match",
                      "--json", str(tmp_path / "rope.json"), "--markdown"])
    assert code == 0
    figures = json.loads((tmp_path / "rope.json").read_text())
    rows = figures["rows"]
    assert figures["tokens"] == 256 and figures["trained"] == 16  # rounded down to whole 64-token windows
    assert set(rows) == {"none", "linear:4", "dynamic:4", "yarn:4", "linear:match", "dynamic:match", "yarn:match"}
    assert rows["dynamic:4"]["1x"] == rows["none"]["1x"] == rows["yarn:match"]["1x"]
    assert rows["linear:4"]["1x"] != rows["none"]["1x"]
    tokenizer = load_tokenizer(tmp_path / "m")
    stream = token_stream(read_texts(tiny_text_corpus), tokenizer, 256)
    n_bytes = len(tokenizer.decode(stream[1:], skip_special_tokens=True).encode("utf-8"))
    model.set_rope_scaling("yarn", 2)
    expected = stream_nats(model, stream, 32, 3) / math.log(2) / n_bytes
    assert rows["yarn:match"]["2x"] == pytest.approx(expected, rel=1e-6)
    assert "| none |" in capsys.readouterr().out
    assert rope_main([str(tmp_path / "m"), "--data", str(tiny_text_corpus), "--lengths", "1.5"]) == 2
    assert "--lengths must be a comma-separated list of whole numbers" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_generate_past_the_trained_length_equals_recomputing(kind):
    """The decoding step (model/decode_step.py) rotates with the same frequencies as a full
    forward of the sequence so far, dynamic NTK included, past the trained length."""
    torch.manual_seed(0)
    config = EtudeConfig(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                         rope_scaling={"rope_type": kind, "factor": 4.0, "original_max_position_embeddings": 16})
    model = EtudeModel(config).eval()
    prompt = torch.randint(3, 64, (12,))
    got = list(model.generate(prompt, max_new_tokens=30))
    sequence, expected = prompt.tolist(), []
    with torch.no_grad():
        for _ in range(30):
            logits, _, _ = model(torch.tensor([sequence]))
            expected.append(int(logits[0, -1].argmax()))
            sequence.append(expected[-1])
    assert got == expected
