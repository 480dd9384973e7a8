"""tool/benchmark.py: a --quick run at the toy shape writes every figure, Etude and transformers
hold the same weights (equal logits, equal greedy tokens), and bad flags are refused clearly.
Nothing here asserts a speed: timings on a shared CPU are not a test."""

from __future__ import annotations

import json

import pytest

from tool.benchmark import main as benchmark_main


def test_quick_toy_run_writes_every_figure(tmp_path, tiny_tokenizer_dir, tiny_text_corpus, capsys):
    out = tmp_path / "bench.json"
    code = benchmark_main(["--shape", "toy", "--quick", "--threads", "1", "--json", str(out),
                           "--tokenizer", str(tiny_tokenizer_dir), "--data", str(tiny_text_corpus),
                           "--new-tokens", "8", "--text-mb", "0.05"])
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("train_speedup_bf16", "train_speedup_fp32", "decode_speedup", "decode_speedup_bf16",
                "prefill_speedup", "tokenizer_encode_mb_s", "data_cache_build_mb_s", "copy_bandwidth_bytes_per_s"):
        assert report[key] > 0, key
    assert report["threads"] == 1
    for what in ("train", "decode", "prefill"):
        for dtype in ("fp32", "bf16"):
            for impl in ("etude", "transformers"):
                assert report[what][dtype][impl]["tokens_per_s"] > 0
    for dtype in ("fp32", "bf16"):
        assert 0 < report["train"][dtype]["etude"]["mfu"] < 1
        floor = report["decode"][dtype]["etude"]["floor_ms_per_token"]
        assert floor == report["decode"][dtype]["transformers"]["floor_ms_per_token"] > 0
    # bf16 weights are half the bytes: half the bandwidth floor.
    assert report["decode"]["bf16"]["etude"]["floor_ms_per_token"] == pytest.approx(
        report["decode"]["fp32"]["etude"]["floor_ms_per_token"] / 2)
    # The two implementations run the same model: same logits, same greedy continuation in fp32.
    assert report["logits_max_abs_diff"] < 1e-4
    assert report["greedy_tokens_agree"]["fp32"] == 1.0
    assert report["train_speedup_fp32"] == pytest.approx(
        report["train"]["fp32"]["etude"]["tokens_per_s"] / report["train"]["fp32"]["transformers"]["tokens_per_s"])
    assert "train fp32" in capsys.readouterr().out
    # llama.cpp, on GGUF files the project's exporter wrote from the same weights, at the matching type.
    pytest.importorskip("llama_cpp")
    for precision, gguf_type in (("fp32", "f32"), ("bf16", "bf16"), ("int8", "q8_0")):
        llama = report["decode"][precision]["llama.cpp"]
        assert llama["tokens_per_s"] > 0 and llama["gguf_type"] == gguf_type and llama["via"] == "llama-cpp-python"
        assert llama["share_of_floor"] > 0
        best = report["decode"][precision]["etude"]["tokens_per_s"]  # --quick: no compiled step
        assert report["decode_vs_llama_cpp"][precision] == pytest.approx(best / llama["tokens_per_s"])


def test_llama_cpp_is_skipped_with_the_reason(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = benchmark_main(["--shape", "toy", "--quick", "--decode-only", "--dtypes", "fp32", "--no-int8",
                           "--new-tokens", "2", "--prefill-len", "8", "--json", str(out),
                           "--llama-bench", str(tmp_path / "no-such-binary")])
    assert code == 0
    report = json.loads(out.read_text())
    assert "no-such-binary is not a file" in report["decode"]["fp32"]["llama.cpp"]["skipped"]
    assert report["train"] == {} and report["decode"]["fp32"]["etude"]["tokens_per_s"] > 0
    assert "llama.cpp skipped" in capsys.readouterr().out
    code = benchmark_main(["--shape", "toy", "--quick", "--decode-only", "--dtypes", "fp32", "--no-int8",
                           "--new-tokens", "2", "--prefill-len", "8", "--json", str(out),
                           "--tokenizer", str(tmp_path / "none")])
    assert "tokenizer" in json.loads(out.read_text())["decode"]["fp32"]["llama.cpp"]["skipped"]


def test_training_timed_in_a_fresh_process_per_dtype(tmp_path):
    """The default outside --quick: each dtype's training rows come from a spawned process
    that builds the same weights; attention is timed against SDPA on the CPU."""
    out = tmp_path / "bench.json"
    code = benchmark_main(["--shape", "toy", "--quick", "--train-process", "fresh", "--dtypes", "fp32,bf16",
                           "--steps", "1", "--warmup", "0", "--new-tokens", "2", "--prefill-len", "8",
                           "--no-int8", "--json", str(out), "--tokenizer", str(tmp_path / "none")])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["train_process"] == "fresh"
    for dtype in ("fp32", "bf16"):
        assert report["train"][dtype]["etude"]["tokens_per_s"] > 0
        assert report["attention"][dtype]["etude"]["ms"] > 0 and report["attention"][dtype]["transformers"]["ms"] > 0
    assert report["train_speedup_bf16"] > 0 and report["train_speedup_fp32"] > 0


def test_no_tokenizer_skips_text_figures_with_the_reason(tmp_path):
    out = tmp_path / "bench.json"
    code = benchmark_main(["--shape", "toy", "--quick", "--dtypes", "fp32", "--steps", "1", "--warmup", "0",
                           "--new-tokens", "2", "--prefill-len", "8", "--json", str(out),
                           "--tokenizer", str(tmp_path / "none")])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["tokenizer_encode_mb_s"] is None and report["train_speedup_bf16"] is None
    assert "train_tokenizer.py" in report["text"]["skipped"]
    assert report["train_speedup_fp32"] > 0 and report["decode_speedup"] > 0


def test_bad_flags_are_reported_together(capsys):
    code = benchmark_main(["--shape", "toy", "--steps", "0", "--dtypes", "fp8", "--threads", "-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--steps must be positive" in err and "fp8" in err and "--threads" in err


def test_int8_decoding_copy_tracks_the_model_and_is_reported(tmp_path):
    import torch

    from config import EtudeConfig
    from model.decoding import Int8Linear, quantize_int8
    from model.model import EtudeModel

    torch.manual_seed(0)
    model = EtudeModel(EtudeConfig(vocab_size=256, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=64)).eval()
    quantized = quantize_int8(model)
    linears = [m for m in quantized.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 4 + 1  # qkv o gate_up down per layer (merged), and the (tied) output layer
    assert model.lm_head.weight is model.embed_tokens.weight  # the original is untouched
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        reference, int8 = model(ids)[0], quantized(ids)[0]
    # Per-row int8 moves a logit by a small fraction of the logits' spread, no more.
    assert (int8 - reference).abs().max() < 0.05 * reference.abs().max()
    assert (int8 - reference).abs().max() > 0  # it really is another computation
    prompt = ids[0, :8]
    assert len(list(quantized.generate(prompt, max_new_tokens=5))) == 5
    with pytest.raises(ValueError, match="CPU"):
        quantize_int8(model.to("meta"))

    out = tmp_path / "bench.json"
    assert benchmark_main(["--shape", "toy", "--quick", "--dtypes", "fp32", "--steps", "1", "--warmup", "0",
                           "--new-tokens", "4", "--prefill-len", "8", "--json", str(out),
                           "--tokenizer", str(tmp_path / "none")]) == 0
    report = json.loads(out.read_text())
    int8 = report["decode"]["int8"]["etude"]
    assert int8["tokens_per_s"] > 0
    assert int8["floor_ms_per_token"] < report["decode"]["fp32"]["etude"]["floor_ms_per_token"] / 3.5
    best = max(report["decode"][m]["etude"]["tokens_per_s"] for m in ("fp32", "int8"))
    assert report["decode_speedup"] == pytest.approx(best / report["decode"]["fp32"]["transformers"]["tokens_per_s"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_chunked_loss_matches_cross_entropy_on_upcast_logits(dtype):
    """model/model.py's chunked loss (issue 11, round 2) is F.cross_entropy(logits.float()) in value
    and gradient: exactly in fp32 up to summation order, to the gradient's own rounding in bf16;
    ignored targets count for nothing, a loss of only ignored targets is nan as torch's is."""
    import torch
    import torch.nn.functional as F

    from model.model import IGNORE_INDEX, chunked_cross_entropy

    torch.manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    logits = (3 * torch.randn(300, 97)).to(torch_dtype).requires_grad_()
    targets = torch.randint(0, 97, (300,))
    targets[::5] = IGNORE_INDEX
    ours = chunked_cross_entropy(logits, targets, chunk_bytes=4 * 97 * 64)  # 64-row chunks: the last one short
    (2.5 * ours).backward()
    ours_grad, logits.grad = logits.grad.clone(), None
    theirs = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    (2.5 * theirs).backward()
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert ours_grad.dtype == torch_dtype
    assert ours_grad[::5].abs().max() == 0  # the ignored rows
    # bf16: the gradient is rounded to bf16 once in the forward and once more when scaled, against
    # torch's single rounding, so elements may differ by one bf16 unit in the last place (2**-7).
    rtol = 1e-6 if dtype == "fp32" else 2 ** -7
    torch.testing.assert_close(ours_grad.float(), logits.grad.float(), rtol=rtol, atol=1e-9)
    assert torch.isnan(chunked_cross_entropy(logits, torch.full((300,), IGNORE_INDEX)))
    with pytest.raises(ValueError, match=r"\(N, V\) logits"):
        chunked_cross_entropy(logits[None], targets)


def test_chunked_loss_keeps_tiny_fp16_gradients_for_the_grad_scaler():
    """In fp16 the loss goes through torch's own path: a gradient of ~1e-9 per logit (many
    targets, a confident model) would flush to zero if it were stored in fp16 before a
    GradScaler's factor reaches it in the backward."""
    import torch

    from model.model import chunked_cross_entropy

    logits = torch.zeros(4096, 64, dtype=torch.float16)
    logits[:, 0] = 20.0  # softmax of the other columns ~2e-9, / 4096 targets
    logits.requires_grad_()
    targets = torch.zeros(4096, dtype=torch.long)
    (65536.0 * chunked_cross_entropy(logits, targets)).backward()
    assert logits.grad[:, 1:].min() > 0


def test_rotary_span_equals_the_indexed_tables():
    """EtudeModel.forward slices the rotary tables (no position read back, so torch.compile traces
    the step as one graph); the slices are the same values, past the built length too."""
    import torch

    from model.model import RotaryEmbedding

    rotary = RotaryEmbedding(head_dim=16, max_seq_len=8, theta=10000.0)
    for start, length in ((0, 8), (3, 4), (5, 9)):  # the last one grows the tables
        span = rotary.span(start, length)
        indexed = rotary(torch.arange(start, start + length))
        assert all(torch.equal(a, b) for a, b in zip(span, indexed))
        assert span[0].shape == (1, 1, length, 16)


@pytest.mark.slow
def test_compile_rows_are_reported(tmp_path):
    out = tmp_path / "bench.json"
    assert benchmark_main(["--shape", "toy", "--quick", "--compile", "--dtypes", "fp32", "--steps", "1",
                           "--warmup", "0", "--new-tokens", "4", "--prefill-len", "8", "--no-int8",
                           "--json", str(out), "--tokenizer", str(tmp_path / "none")]) == 0
    report = json.loads(out.read_text())
    compiled = report["train"]["fp32 compiled"]
    assert compiled["etude"]["first_step_s"] > 0 and compiled["transformers"]["tokens_per_s"] > 0
    assert report["train_speedup_fp32_compiled"] == pytest.approx(
        compiled["etude"]["tokens_per_s"] / compiled["transformers"]["tokens_per_s"])
    assert report["train_speedup_fp32_compiled_vs_eager"] == pytest.approx(
        compiled["etude"]["tokens_per_s"] / report["train"]["fp32"]["transformers"]["tokens_per_s"])
