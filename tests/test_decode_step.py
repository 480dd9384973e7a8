"""The fixed-shape decoding step (model/decode_step.py): it gives the tokens and logits of a full
forward, for one row and for rows at different positions; compiled, it gives the eager tokens and
compiles once per shape; when compiling fails it decodes eagerly. No timing is asserted."""

import pytest
import torch

import model.decode_step as decode_step
from config import EtudeConfig
from model.decode_step import DecodeStepper, bucket_length
from model.decoding import merge_projections, quantize_int8
from model.model import EtudeModel, sample_next


def _model(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=256, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=160)
    return EtudeModel(EtudeConfig(**{**config, **overrides})).eval()


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 4, "tie_embeddings": False}])
def test_step_logits_equal_the_full_forward_at_every_position(overrides):
    model = merge_projections(_model(**overrides))
    ids = torch.randint(0, 256, (40,))
    stepper = DecodeStepper(model, 1, bucket_length(40, model.config.max_seq_len))
    with torch.inference_mode():
        full = model(ids[None])[0][0]
        logits = [stepper.prefill(ids[:10])]
        for position in range(10, 40):
            logits.append(stepper.step(ids[position:position + 1], torch.tensor([position]))[0])
    assert torch.allclose(torch.stack(logits), full[9:], atol=1e-5)


def test_rows_at_different_positions_each_get_their_own_logits():
    """Batch 3: each row prefilled to its own length, then one step for all; idle-row columns
    (here row 2 writes to a scratch column past its text) do not disturb the others."""
    model = _model()
    prompts = [torch.randint(0, 256, (n,)) for n in (5, 12, 9)]
    stepper = DecodeStepper(model, 3, 33)
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            stepper.prefill(prompt[:-1], row=row)
        ids = torch.stack([p[-1] for p in prompts])
        positions = torch.tensor([len(p) - 1 for p in prompts])
        logits = stepper.step(ids, positions)
        for row, prompt in enumerate(prompts):
            assert torch.allclose(logits[row], model(prompt[None])[0][0, -1], atol=1e-5)


@pytest.mark.parametrize("make", [lambda m: m, merge_projections, lambda m: merge_projections(m).to(torch.bfloat16)])
def test_greedy_generate_equals_recomputing_the_whole_sequence(make):
    model = make(_model())
    prompt = torch.randint(0, 256, (7,))
    cached = list(model.generate(prompt, max_new_tokens=100))
    assert cached == list(model.generate(prompt, max_new_tokens=100, use_cache=False))
    assert len(cached) == 100


def test_sampling_with_penalty_and_stop_equals_the_uncached_path():
    model = _model()
    prompt = torch.randint(0, 256, (6,))
    settings = dict(max_new_tokens=40, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3)
    runs = [list(model.generate(prompt, generator=torch.Generator().manual_seed(5), use_cache=use, **settings))
            for use in (True, False)]
    assert runs[0] == runs[1]
    stop = runs[0][10]
    stopped = list(model.generate(prompt, generator=torch.Generator().manual_seed(5), stop_ids=[stop], **settings))
    assert stopped == runs[0][:runs[0].index(stop) + 1]


def test_penalty_from_a_seen_mask_equals_the_penalty_from_ids():
    logits = torch.randn(50)
    history = torch.tensor([3, 7, 7, 49, 0])
    seen = torch.zeros(50, dtype=torch.bool)
    seen[history] = True
    for temperature in (0.0, 0.7):
        draws = [sample_next(logits, h, temperature, None, None, 1.5, torch.Generator().manual_seed(1))
                 for h in (history, seen)]
        assert int(draws[0]) == int(draws[1])
    assert int(sample_next(logits, None, 0.0, None, None, 1.5)) == int(logits.argmax())


def test_bucket_lengths_are_few_and_cover_the_need():
    assert bucket_length(1, 512) == 128 and bucket_length(129, 512) == 256 and bucket_length(300, 512) == 512
    assert bucket_length(600, 700) == 700  # never past the limit asked for
    assert bucket_length(60, 40) == 60  # but always the positions needed


def test_a_failed_compilation_falls_back_to_eager(monkeypatch, caplog):
    model = _model()
    prompt = torch.randint(0, 256, (5,))
    expected = list(model.generate(prompt, max_new_tokens=70))

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(decode_step, "_compiled_step", lambda: broken)
    monkeypatch.setattr(decode_step, "_COMPILE_BROKEN", {})
    assert list(model.generate(prompt, max_new_tokens=70, compile=True)) == expected
    assert "no C++ compiler" in decode_step.compile_failure()
    assert "decoding eagerly" in caplog.text


def test_short_answers_and_mixtures_of_experts_do_not_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(decode_step, "_compiled_step", lambda: calls.append(1) or decode_step.decode_logits)
    monkeypatch.setattr(decode_step, "_COMPILE_BROKEN", {})
    list(_model().generate(torch.tensor([1, 2]), max_new_tokens=decode_step.COMPILE_MIN_TOKENS - 1, compile=True))
    moe = _model(use_moe=True, n_experts=4, top_k=2, intermediate_size=48)
    list(moe.generate(torch.tensor([1, 2]), max_new_tokens=decode_step.COMPILE_MIN_TOKENS, compile=True))
    assert calls == []
    list(_model().generate(torch.tensor([1, 2]), max_new_tokens=decode_step.COMPILE_MIN_TOKENS, compile=True))
    assert calls == [1]


@pytest.mark.slow
@pytest.mark.parametrize("make", [merge_projections, quantize_int8])
def test_compiled_step_gives_the_eager_tokens_and_compiles_once_per_shape(make):
    """torch.compile of the step (tens of seconds): same greedy tokens as eager in fp32 and int8, logits
    within float tolerance, and a second generation (a new cache of the same shape) reuses the program."""
    from torch._dynamo.utils import counters

    model = make(_model())
    prompt = torch.randint(0, 256, (9,))
    eager = list(model.generate(prompt, max_new_tokens=90))
    compiled = list(model.generate(prompt, max_new_tokens=90, compile=True))
    assert decode_step.compile_failure() is None
    assert compiled == eager
    graphs = counters["stats"]["unique_graphs"]
    assert list(model.generate(prompt[:6], max_new_tokens=80, compile=True)) == list(
        model.generate(prompt[:6], max_new_tokens=80))
    assert counters["stats"]["unique_graphs"] == graphs  # same bucket: no new compilation
    stepper = DecodeStepper(model, 1, 128, compile=True)
    with torch.inference_mode():
        first = stepper.prefill(prompt)
        token = first.argmax().view(1)
        step = stepper.step(token, torch.tensor([9]))[0]
        reference = model(torch.cat((prompt, token))[None])[0][0, -1]
    assert torch.allclose(step, reference, atol=1e-4 if make is quantize_int8 else 1e-5)
