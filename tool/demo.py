"""The whole pipeline on the bundled demo data, one stage after another:

    python tool/demo.py                  # tiny preset: about 13 minutes on 2 CPU cores
    python tool/demo.py --preset small   # the same at ~26M parameters (for a GPU)

prepare data -> train the tokenizer -> pretrain -> supervised fine-tuning -> chat -> LoRA (a small
adapter that renames the assistant "Mira") -> the same questions with and without the adapter ->
DPO (preference pairs from the SFT model's own degenerate answers) and GRPO (arithmetic, rewarded by
a checker) -> evaluation of the pretrained, SFT and LoRA models on a sample of each task (a table,
and a report card with plots in weight/report/), and of the DPO and GRPO models on chat and
arithmetic.
Each stage is the same command you would type yourself (they are printed), so the demo doubles
as a tour.
Stages resume: running the demo again continues an interrupted run, or skips finished training.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The first question is in the SFT training set (chatterbot-corpus trivia); the tiny model
# recalls about one trained answer in ten exactly, this one among them on a 2-core AMX CPU
# (another machine's rounding may steer it elsewhere). The other two questions are unseen.
QUESTIONS = ("What is the name of the nearest major galaxy to the Milky Way?", "Hello! How are you today?",
             "What do you like to do on weekends?")
# Asked without and with the LoRA adapter: the identity question (the adapter's lesson) and a
# trained trivia question that the SFT model answers exactly and that is not among the LoRA set's
# rehearsed chats, so the adapter should leave its answer as it was.
LORA_QUESTIONS = ("What is your name?", "Who was the only US President to resign?")
LORA_NAME = "identity"
# Examples per task in the demo's evaluation. Greedy answers to the chat and synthetic questions are
# most of its time (100 per task took 7.6 CPU-minutes for the three models); 50 keeps it to a few
# minutes, at a standard error of about 6 points on an accuracy: python tool/evaluate.py without
# --limit measures them all.
EVAL_LIMIT = 50


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
    arithmetic prompts with a checker; each starts from the SFT model."""
    # Fewer prompts and steps than the tools' defaults keep these stages to a few minutes: the
    # model's answers to all 2105 default prompts took 39 min on the loaded 2-core machine, and at
    # the tiny size GRPO on arithmetic shows its mechanics rather than a gain (README, section 10).
    return [
        ("dpo pairs", ["tool/prepare_data.py", "--dpo", "--dpo-prompts", "500", "--dpo-val-prompts", "200"]),
        ("dpo", ["train/train_dpo.py", "--preset", preset]),
        ("grpo", ["train/train_grpo.py", "--preset", preset, "--max-steps", "30"]),
    ]


def alignment_evaluate_command() -> list[str]:
    """The DPO model on the chat task (degenerate answers) and the GRPO model on arithmetic; the
    SFT model's figures on the same questions are in the main evaluation's table."""
    return ["tool/evaluate.py", "weight/etude_dpo_model", "weight/etude_grpo_model", "--tasks", "chat,arithmetic",
            "--limit", str(EVAL_LIMIT)]


def evaluate_command() -> list[str]:
    return ["tool/evaluate.py", "weight/etude_pretrained_model", "weight/etude_sft_model", f"weight/lora/{LORA_NAME}",
            "--limit", str(EVAL_LIMIT), "--report", "weight/report"]


def run(args: list[str]) -> None:
    print(f"\n$ python {shlex.join(args)}", flush=True)
    done = subprocess.run([sys.executable, *args], cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"demo: `python {shlex.join(args)}` failed (exit {done.returncode}); "
                         "its message is above. Fix that, then run the demo again: finished stages resume.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model and run preset (default tiny)")
    args = parser.parse_args(argv)

    timings = []
    started = time.perf_counter()
    for name, command in stage_commands(args.preset):
        t0 = time.perf_counter()
        run(command)
        timings.append((name, time.perf_counter() - t0))

    t0 = time.perf_counter()
    for question in QUESTIONS:
        run(["inference/inference.py", "--prompt", question, "--temperature", "0", "--max-new-tokens", "64"])
    timings.append(("chat", time.perf_counter() - t0))

    t0 = time.perf_counter()
    run(lora_command(args.preset))
    timings.append(("lora", time.perf_counter() - t0))
    t0 = time.perf_counter()
    for question in LORA_QUESTIONS:
        for lora in ([], ["--lora", LORA_NAME]):
            run(["inference/inference.py", "--prompt", question, "--temperature", "0", "--max-new-tokens", "64", *lora])
    timings.append(("lora chat", time.perf_counter() - t0))

    for name, command in alignment_commands(args.preset):
        t0 = time.perf_counter()
        run(command)
        timings.append((name, time.perf_counter() - t0))

    t0 = time.perf_counter()
    run(evaluate_command())
    run(alignment_evaluate_command())
    timings.append(("evaluate", time.perf_counter() - t0))

    print("\ndemo finished; stage times:")
    for name, seconds in timings:
        print(f"  {name:<13}{seconds:8.1f} s")
    print(f"  {'total':<13}{time.perf_counter() - started:8.1f} s")
    print(f"chat with it: python inference/inference.py (add --lora {LORA_NAME} for Mira); "
          "the report card: weight/report/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
