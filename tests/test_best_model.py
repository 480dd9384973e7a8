"""--keep best: the out-dir receives the model of the lowest validation loss, also across a
resume; --keep last (or a run whose last step is its best) the final step's."""

import json

import pytest

from model.checkpoint import load_safetensors
from train import trainer as trainer_module
from train.best_model import BEST_FILE, BestModel
from train.train_pretrain import main as pretrain_main

from tests.helpers import TOY_MODEL, write_corpus

# Validation losses the scripted evaluation reports, by step: the best is step 10.
SCRIPTED = {0: 9.0, 5: 5.0, 10: 3.0, 15: 4.0, 20: 4.5}


@pytest.fixture
def scripted_evaluation(monkeypatch):
    """Evaluation that reports SCRIPTED[step], so which step is best does not depend on training."""
    def evaluate(self):
        return {"val_loss": SCRIPTED[self._eval_step]}

    def fit_from(self, start_step, original=trainer_module.Trainer._fit_from):
        self._eval_step = start_step
        return original(self, start_step)

    def train_step(self, step, original=trainer_module.Trainer._train_step):
        self._eval_step = step + 1
        return original(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate)
    monkeypatch.setattr(trainer_module.Trainer, "_fit_from", fit_from)
    monkeypatch.setattr(trainer_module.Trainer, "_train_step", train_step)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder / "train.jsonl", 300, seed=1)
    write_corpus(folder / "val.jsonl", 30, seed=2)
    return folder


def run(corpus, tokenizer_dir, out_dir, *extra):
    return pretrain_main(["--data", str(corpus / "train.jsonl"), "--val-data", str(corpus / "val.jsonl"),
                          "--tokenizer-dir", str(tokenizer_dir), "--out-dir", str(out_dir), "--model-config",
                          TOY_MODEL, "--seq-len", "32", "--batch-size", "4", "--max-steps", "20",
                          "--eval-every", "5", "--save-every", "100", "--log-every", "10", "--lr", "3e-3",
                          "--device", "cpu", *extra])


def weights(folder):
    return load_safetensors(folder / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_the_best_evaluation_is_saved_not_the_last_also_after_a_resume(corpus, tiny_tokenizer_dir, tmp_path,
                                                                         scripted_evaluation, capsys):
    assert run(corpus, tiny_tokenizer_dir, tmp_path / "reference", "--stop-at-step", "10") == 0
    at_step_10 = weights(tmp_path / "reference" / "checkpoint")  # fp32 weights after step 10

    out = tmp_path / "model"
    assert run(corpus, tiny_tokenizer_dir, out) == 0
    assert "the model of step 10, whose validation loss 3.0000 is the run's best" in capsys.readouterr().out
    assert same(weights(out), at_step_10)
    assert json.loads((out / "best" / BEST_FILE).read_text()) == {"step": 10, "val_loss": 3.0}
    assert not same(weights(out), weights(out / "checkpoint"))  # the resume state is the last step's

    resumed = tmp_path / "resumed"  # interrupted after the best, then finished by a second invocation
    assert run(corpus, tiny_tokenizer_dir, resumed, "--stop-at-step", "15") == 0
    assert json.loads((resumed / "best" / BEST_FILE).read_text())["step"] == 10
    assert run(corpus, tiny_tokenizer_dir, resumed) == 0
    assert same(weights(resumed), at_step_10)


def test_keep_last_saves_the_final_step(corpus, tiny_tokenizer_dir, tmp_path, scripted_evaluation):
    out = tmp_path / "model"
    assert run(corpus, tiny_tokenizer_dir, out, "--keep", "last") == 0
    assert same(weights(out), weights(out / "checkpoint"))
    assert not (out / "best").exists()


def test_a_best_from_beyond_the_resumed_step_is_forgotten(tmp_path):
    best = BestModel(tmp_path)
    best.folder.mkdir()
    (best.folder / BEST_FILE).write_text(json.dumps({"step": 30, "val_loss": 1.0}))
    best.restore(20)  # the checkpoint being resumed is older than this best
    assert best.step is None and not best.folder.exists()

    best.folder.mkdir()
    (best.folder / BEST_FILE).write_text(json.dumps({"step": 10, "val_loss": 1.0}))
    best.restore(20)
    assert (best.step, best.val_loss) == (10, 1.0)
    assert not best.offer(30, 1.5, None) and not best.offer(40, float("nan"), None)
    assert best.offer(40, 0.5, None) and best.step == 40
