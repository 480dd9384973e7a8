"""The whole pipeline on the bundled demo data, one stage after another:

    python tool/demo.py                  # tiny preset: ~26 min on 2 idle CPU cores
    python tool/demo.py --preset small   # the same at ~26M parameters (for a GPU)

prepare data -> train the tokenizer -> pretrain -> supervised fine-tuning -> chat -> LoRA (a small
adapter that renames the assistant "Mira") -> the same questions with and without the adapter ->
DPO (preference pairs from the SFT model's own degenerate answers) and GRPO (counting problems,
rewarded by a checker) -> evaluation of the pretrained, SFT and LoRA models on a sample of each
task (a table, and a report card with plots in weight/report/), and of the DPO and GRPO models on
chat and counting.
Each stage is the same command you would type yourself (they are printed), so the demo doubles
as a tour.
Stages resume: running the demo again continues an interrupted run, or skips finished training.

Before the first stage it measures how fast this machine trains the tiny model (a few seconds)
and says how long the demo should take here; it warns, with the likely reason, when the machine
is several times slower than the reference, and again after any stage that runs far over.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The questions, each with the answer of the SFT data when it is a trained one (chatterbot-corpus
# trivia). A 4.6M-parameter model recalls about one trained answer in ten exactly, and which ones
# depends on the machine's rounding, so the demo shows the trained answer beside the model's
# rather than promise it. The other questions are unseen: any fluent, on-topic reply is what a
# model this size can give.
QUESTIONS = {"What is the name of the nearest major galaxy to the Milky Way?": "The Andromeda Galaxy.",
             "Hello! How are you today?": None, "What do you like to do on weekends?": None}
# Asked without and with the LoRA adapter: the identity question (the adapter's lesson: the name
# Mira) and a trained trivia question that is not among the LoRA set's rehearsed chats, so the
# adapter should leave its answer as it was.
LORA_QUESTIONS = {"What is your name?": None, "Who was the only US President to resign?": "Richard Nixon"}
LORA_LESSON = "Mira"  # the name lora_identity.jsonl teaches
LORA_NAME = "identity"
# Examples per task in the demo's evaluation. Greedy answers to the chat and synthetic questions are
# most of its time (100 per task took 7.6 CPU-minutes for the three models); 50 keeps it to a few
# minutes, at a standard error of about 6 points on an accuracy: python tool/evaluate.py without
# --limit measures them all.
EVAL_LIMIT = 50
# The DPO and GRPO stages run on fewer prompts and steps than their tools' defaults, to stay within
# a few minutes: the SFT model's greedy answers to DPO_PROMPTS + DPO_VAL_PROMPTS conversations make
# the preference pairs (about half of them make a pair); GRPO runs its preset's 40 steps.
DPO_PROMPTS = 500
DPO_VAL_PROMPTS = 200


# Seconds each stage of `python tool/demo.py` (tiny preset) took on the reference machine: 2 cores
# of an AMD EPYC (Zen 4, AVX-512 BF16: bf16 autocast), nothing else running (2026-12-03, a fresh
# clone). The one estimate of the demo's length; README.md quotes its total.
REFERENCE_SECONDS = {"prepare data": 5, "tokenizer": 7, "pretrain": 500, "sft": 810, "chat": 7, "lora": 40,
                     "lora chat": 10, "dpo pairs": 25, "dpo": 55, "grpo": 65, "evaluate": 60}
# Stages whose time is training or decoding, which scale with the speed measured at the start.
COMPUTE_STAGES = ("pretrain", "sft", "lora", "evaluate", "chat", "lora chat", "dpo pairs", "dpo", "grpo")
# measure_speed() on the reference machine (training tokens/s of the tiny model).
REFERENCE_TOKENS_PER_SECOND = 6200.0
# Slower than the reference by this factor: say so, and why.
SLOW = 2.0


def measure_speed(seconds: float = 4.0) -> tuple[float, str]:
    """Training tokens/s of the tiny preset's model on random tokens, the way the pretraining
    stage will run it (device, precision, batch and window of the preset), over a few seconds."""
    import torch

    from config import preset_model_config, resolve_train_config
    from model.model import EtudeModel
    from train.trainer import pick_device, pick_dtype

    run = resolve_train_config("pretrain", "tiny", {})
    device = pick_device("auto")
    dtype = pick_dtype(device, "auto")
    torch.manual_seed(0)
    model = EtudeModel(preset_model_config("tiny")).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (run.batch_size, run.seq_len + 1), generator=generator)
    inputs, labels = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss, _ = model(inputs, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # waits for the device

    step()  # warm-up: allocations, kernel choice
    steps, started = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - started < seconds:
        step()
        steps += 1
    speed = steps * run.batch_size * run.seq_len / (time.perf_counter() - started)
    return speed, f"{device.type} {str(dtype).removeprefix('torch.')}"


def slow_reasons(precision: str) -> list[str]:
    """What most often makes a machine slower than the reference, where it can be seen."""
    reasons = []
    cores = os.cpu_count() or 1
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if load > 0.75 * cores:
            reasons.append(f"the machine is busy: load average {load:.1f} on {cores} cores "
                           "(other programs want the CPU too)")
    if precision == "cpu float32":
        reasons.append("this CPU has no fast bf16 (no AVX-512 BF16 or AMX), so training runs in fp32, "
                       "about 3x slower")
    if not reasons:
        reasons.append(f"a slower CPU than the reference ({cores} cores here)")
    return reasons


def estimate(slowdown: float) -> dict[str, float]:
    """Expected seconds per stage here: the compute stages scaled by the measured slowdown."""
    return {name: seconds * (slowdown if name in COMPUTE_STAGES else 1.0)
            for name, seconds in REFERENCE_SECONDS.items()}


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def announce(preset: str) -> dict[str, float] | None:
    """Say what the demo does and how long it should take here; warn when that is far longer
    than on the reference machine. Returns the expected seconds per stage (None off the tiny preset)."""
    reference = sum(REFERENCE_SECONDS.values())
    print("The demo: prepare the data -> train a tokenizer -> pretrain -> fine-tune into a chat model -> "
          "three questions -> a LoRA adapter -> DPO and GRPO -> evaluation.")
    if preset != "tiny":
        print(f"(time estimates are for the tiny preset, ~{minutes(reference)} on 2 idle CPU cores; "
              f"--preset {preset} takes longer on a CPU)")
        return None
    speed, precision = measure_speed()
    slowdown = max(REFERENCE_TOKENS_PER_SECOND / speed, 0.05)
    expected = estimate(slowdown)
    print(f"This machine trains the tiny model at {speed:,.0f} tokens/s ({precision}); the reference machine "
          f"(2 idle CPU cores) at {REFERENCE_TOKENS_PER_SECOND:,.0f}, where the demo takes ~{minutes(reference)}. "
          f"Expected here: ~{minutes(sum(expected.values()))}.", flush=True)
    if slowdown >= SLOW:
        print(f"warning: this machine is {slowdown:.1f}x slower than the reference: "
              + "; ".join(slow_reasons(precision)) + ". The demo works the same, only slower.", flush=True)
    return expected


def stage_commands(preset: str) -> list[tuple[str, list[str]]]:
    return [
        ("prepare data", ["tool/prepare_data.py"]),
        ("tokenizer", ["train/train_tokenizer.py", "all"]),
        ("pretrain", ["train/train_pretrain.py", "--preset", preset]),
        ("sft", ["train/train_sft.py", "--preset", preset]),
    ]


def lora_command(preset: str) -> list[str]:
    return ["train/train_lora.py", "--preset", preset, "--lora-name", LORA_NAME]


def alignment_commands(preset: str) -> list[tuple[str, list[str]]]:
    """Beyond SFT: preference pairs from the SFT model's own answers, DPO on them, and GRPO on
    counting problems with a checker; each starts from the SFT model."""
    return [
        ("dpo pairs", ["tool/prepare_data.py", "--dpo", "--dpo-prompts", str(DPO_PROMPTS),
                       "--dpo-val-prompts", str(DPO_VAL_PROMPTS)]),
        ("dpo", ["train/train_dpo.py", "--preset", preset]),
        ("grpo", ["train/train_grpo.py", "--preset", preset]),
    ]


def alignment_evaluate_command() -> list[str]:
    """The DPO model on the chat task (degenerate answers) and the GRPO model on counting; the SFT
    model's figures on the same questions are in the main evaluation's table."""
    return ["tool/evaluate.py", "weight/etude_dpo_model", "weight/etude_grpo_model", "--tasks", "chat,counting",
            "--limit", str(EVAL_LIMIT)]


def evaluate_command() -> list[str]:
    return ["tool/evaluate.py", "weight/etude_pretrained_model", "weight/etude_sft_model", f"weight/lora/{LORA_NAME}",
            "--limit", str(EVAL_LIMIT), "--report", "weight/report"]


def run(args: list[str]) -> str:
    """Run one stage's command as the user would type it. Its output streams to the terminal as
    it comes; the standard output is also returned (a chat reply, for the demo to compare)."""
    print(f"\n$ python {shlex.join(args)}", flush=True)
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE)
    output = bytearray()
    while chunk := process.stdout.read1(4096):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        output += chunk
    if process.wait() != 0:
        raise SystemExit(f"demo: `python {shlex.join(args)}` failed (exit {process.returncode}); "
                         "its message is above. Fix that, then run the demo again: finished stages resume.")
    return output.decode("utf-8", errors="replace")


def ask(question: str, trained_answer: str | None, *extra: str, lesson: str | None = None) -> None:
    """Ask the chat model one question greedily, and show what it was trained to answer (or, for
    the adapter's question, whether it learned its lesson)."""
    reply = run(["inference/inference.py", "--prompt", question, "--temperature", "0", "--max-new-tokens", "64",
                 *extra]).strip()
    if lesson is not None:
        print(f"  (the adapter's lesson: the name {lesson!r}; "
              + ("learned)" if lesson in reply else "not in this reply)"))
    elif trained_answer is None:
        print("  (not in the training data: a fluent, on-topic reply is what a model this size can give)")
    elif reply == trained_answer:
        print(f"  (the trained answer, recalled exactly: {trained_answer!r})")
    else:
        print(f"  (trained answer: {trained_answer!r}; a 4.6M-parameter model recalls about one trained "
              "answer in ten exactly)")


class Clock:
    """Stage times, compared with the expected ones as the demo goes."""

    def __init__(self, expected: dict[str, float] | None):
        self.expected = expected
        self.started = time.perf_counter()
        self.timings: list[tuple[str, float]] = []

    def stage(self, name: str, seconds: float) -> None:
        self.timings.append((name, seconds))
        if not self.expected:
            return
        slowdown = seconds / REFERENCE_SECONDS[name]
        if seconds > 60 and slowdown >= 2 * SLOW:
            print(f"demo: warning: the {name} stage took {minutes(seconds)}, {slowdown:.1f}x its "
                  f"{minutes(REFERENCE_SECONDS[name])} on the reference machine: "
                  + "; ".join(slow_reasons("")) + ".", flush=True)
        # The compute stages done so far say how this run keeps pace with the estimate; the
        # others (data, tokenizer) take about as long anywhere.
        took = dict(self.timings)
        computed = [stage for stage in took if stage in COMPUTE_STAGES]
        pace = sum(took[s] for s in computed) / sum(self.expected[s] for s in computed) if computed else 1.0
        left = sum(self.expected[s] * (pace if s in COMPUTE_STAGES else 1.0) for s in self.expected if s not in took)
        if left:
            print(f"demo: {name} done in {minutes(seconds)}; about {minutes(left)} to go", flush=True)

    def report(self) -> None:
        print("\ndemo finished; stage times" + (" (and on the reference machine):" if self.expected else ":"))
        for name, seconds in self.timings:
            reference = f"{REFERENCE_SECONDS[name]:8.0f} s" if self.expected else ""
            print(f"  {name:<13}{seconds:8.1f} s{reference}")
        total = time.perf_counter() - self.started
        print(f"  {'total':<13}{total:8.1f} s" + (f"{sum(REFERENCE_SECONDS.values()):8.0f} s" if self.expected else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model and run preset (default tiny)")
    args = parser.parse_args(argv)

    clock = Clock(announce(args.preset))
    for name, command in stage_commands(args.preset):
        t0 = time.perf_counter()
        run(command)
        clock.stage(name, time.perf_counter() - t0)

    t0 = time.perf_counter()
    for question, answer in QUESTIONS.items():
        ask(question, answer)
    clock.stage("chat", time.perf_counter() - t0)

    t0 = time.perf_counter()
    run(lora_command(args.preset))
    clock.stage("lora", time.perf_counter() - t0)
    t0 = time.perf_counter()
    for question, answer in LORA_QUESTIONS.items():
        ask(question, answer)
        ask(question, answer, "--lora", LORA_NAME, lesson=LORA_LESSON if answer is None else None)
    clock.stage("lora chat", time.perf_counter() - t0)

    for name, command in alignment_commands(args.preset):
        t0 = time.perf_counter()
        run(command)
        clock.stage(name, time.perf_counter() - t0)

    t0 = time.perf_counter()
    run(evaluate_command())
    run(alignment_evaluate_command())
    clock.stage("evaluate", time.perf_counter() - t0)

    clock.report()
    print(f"chat with it: python inference/inference.py (add --lora {LORA_NAME} for Mira); "
          "the report card: weight/report/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
