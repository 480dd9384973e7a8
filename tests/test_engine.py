"""The continuous-batching engine (inference/engine.py) on a tiny random model: a row's tokens do
not depend on what else runs (requests joining mid-answer, other seeds, other batch sizes), they
equal model.generate()'s, seeded rows reproduce, a cancelled row frees its slot at the next step,
stop ids / stop strings / length limits end a row, and a KV cache that cannot fit is refused."""

from __future__ import annotations

import pytest
import torch

from config import EtudeConfig
from inference.engine import Engine, Request, cache_bytes
from model.model import EtudeModel

VOCAB = 512
STOP_ID = 3


@pytest.fixture(scope="module")
def model() -> EtudeModel:
    torch.manual_seed(0)
    return EtudeModel(EtudeConfig(vocab_size=VOCAB, max_seq_len=160, n_layers=2, hidden_size=64, n_heads=4,
                                  n_kv_heads=2)).eval()


def prompts(count: int, seed: int = 5) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (int(torch.randint(1, 40, (1,), generator=generator)),),
                          generator=generator).tolist() for _ in range(count)]


SAMPLED = dict(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1)
GREEDY = dict(temperature=0.0, repetition_penalty=1.1)


def request(prompt: list[int], seed: int, sampling: dict, max_new_tokens: int = 24, **extra) -> Request:
    return Request(prompt, max_new_tokens, torch.Generator().manual_seed(seed), stop_ids=(STOP_ID,),
                   **sampling, **extra)


def alone(model: EtudeModel, prompt: list[int], seed: int, sampling: dict, max_new_tokens: int = 24) -> list[int]:
    return list(model.generate(prompt, max_new_tokens, stop_ids=(STOP_ID,),
                               generator=torch.Generator().manual_seed(seed), **sampling))


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_batched_rows_equal_generate_and_each_other(model, sampling):
    items = prompts(9)
    expected = [alone(model, p, 100 + i, sampling) for i, p in enumerate(items)]
    # More requests than slots: rows join as others finish, at different positions.
    batched = Engine(model, None, max_batch=4).run([request(p, 100 + i, sampling) for i, p in enumerate(items)])
    assert [r.output_ids for r in batched] == expected
    assert len({tuple(e) for e in expected}) == len(expected)
    for r in batched:
        assert r.finish_reason == ("stop" if r.output_ids[-1] == STOP_ID else "length")


def test_a_request_joining_a_running_batch_changes_nothing(model):
    first, late = prompts(3), prompts(2, seed=9)
    engine = Engine(model, None, max_batch=5)
    running = [request(p, 7 + i, SAMPLED, max_new_tokens=30) for i, p in enumerate(first)]
    for r in running:
        engine.submit(r)
    for _ in range(6):
        engine.step()
    assert all(0 < len(r.output_ids) < 30 for r in running), "the batch is mid-answer"
    joining = [request(p, 50 + i, SAMPLED, max_new_tokens=30) for i, p in enumerate(late)]
    for r in joining:
        engine.submit(r)
    while engine.step():
        pass
    without = Engine(model, None, max_batch=5).run([request(p, 7 + i, SAMPLED, max_new_tokens=30)
                                                   for i, p in enumerate(first)])
    assert [r.output_ids for r in running] == [r.output_ids for r in without]
    # ... and the late ones answer as they would have alone.
    assert [r.output_ids for r in joining] == [alone(model, p, 50 + i, SAMPLED, 30) for i, p in enumerate(late)]


def test_seeded_rows_reproduce_and_seeds_matter(model):
    prompt = prompts(1)[0]
    crowd = prompts(6, seed=11)
    with_crowd = Engine(model, None, max_batch=7).run(
        [request(prompt, 1234, SAMPLED)] + [request(p, i, SAMPLED) for i, p in enumerate(crowd)])[0]
    by_itself = Engine(model, None, max_batch=2).run([request(prompt, 1234, SAMPLED)])[0]
    other_seed = Engine(model, None, max_batch=2).run([request(prompt, 4321, SAMPLED)])[0]
    assert with_crowd.output_ids == by_itself.output_ids
    assert other_seed.output_ids != by_itself.output_ids


def test_cancelled_row_frees_its_slot_at_the_next_step(model):
    engine = Engine(model, None, max_batch=2)
    events = []
    leaving = request(prompts(1)[0], 1, SAMPLED, max_new_tokens=100,
                      emit=lambda kind, data: events.append(kind))
    staying = request(prompts(1, seed=6)[0], 2, SAMPLED, max_new_tokens=100)
    waiting = request(prompts(1, seed=7)[0], 3, SAMPLED, max_new_tokens=10)
    for r in (leaving, staying, waiting):
        engine.submit(r)
    for _ in range(3):
        engine.step()
    assert engine.status() == {"active": 2, "waiting": 1, "max_batch": 2}
    produced = len(leaving.output_ids)
    leaving.cancelled.set()
    engine.step()
    assert len(leaving.output_ids) == produced and events == ["cancelled"]
    assert waiting.output_ids, "the freed slot took the waiting request in the same step"
    assert engine.status()["waiting"] == 0
    while engine.step():
        pass
    assert staying.output_ids == alone(model, staying.prompt_ids, 2, SAMPLED, 100)


class Letters:
    """A stand-in tokenizer: id t is the letter chr(97 + t % 26)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + t % 26) for t in ids)


def test_stop_strings_stop_ids_and_length_limits(model):
    prompt = prompts(1)[0]
    free = alone(model, prompt, 0, GREEDY, 40)
    text = Letters().decode([t for t in free if t != STOP_ID])
    stop = text[5:7]
    events = []
    cut = request(prompt, 0, GREEDY, 40, stop=[stop], emit=lambda kind, data: events.append((kind, data)))
    short = request(prompt, 0, GREEDY, 4)
    Engine(model, Letters(), max_batch=3).run([cut, short])
    streamed = "".join(data for kind, data in events if kind == "delta")
    assert streamed == text[:text.index(stop)] and cut.finish_reason == "stop"
    assert events[-1] == ("done", {"finish_reason": "stop", "prompt_tokens": len(prompt),
                                   "completion_tokens": len(cut.output_ids)})
    assert short.output_ids == free[:4] and short.finish_reason == "length"


def test_long_prompts_are_prefilled_in_chunks(model):
    prompt = prompts(1)[0] * 4  # ~100 tokens: several chunks of 16
    engine = Engine(model, None, max_batch=2, prefill_chunk=16)
    result = engine.run([request(prompt, 0, GREEDY)])[0]
    assert result.output_ids == alone(model, prompt, 0, GREEDY)
    assert engine.steps >= len(prompt) // 16


def test_context_limits_and_a_cache_that_does_not_fit(model):
    full = Engine(model, None, max_batch=1).run([request(list(range(4, 164))[:160], 0, GREEDY)])[0]
    assert full.output_ids == [] and full.finish_reason == "length"
    assert cache_bytes(model, 3, 160) == 2 * 2 * 3 * 2 * 161 * 16 * 4
    with pytest.raises(ValueError, match="lower --max-batch"):
        Engine(model, None, max_batch=10**9)
