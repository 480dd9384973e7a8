"""Decoding speed at batch 1: llama.cpp on the GGUF export (q8_0, f16) against Etude's own decoding
as inference/inference.py runs it (fp32, and --int8), side by side in one run on one CPU.

    python tool/bench_gguf.py                              # weight/etude_sft_model, 256 new tokens
    python tool/bench_gguf.py --model weight/etude_sft_model --threads 2 --json gguf_bench.json

The GGUF files are written to a temporary folder with tool/convert_gguf.py's writer. Each engine
decodes the same chat prompt greedily for --new-tokens tokens (no stop token, no penalty); the
engines take turns within each of --repeats rounds (the first of a round alternating), so a machine
whose speed drifts slows them alike; the medians are reported as tokens/s (prompt and decode
together, as tool/benchmark.py counts; the prompt is short). llama.cpp runs as its users get it
(f16 KV cache) with --threads threads, torch with as many. Beside each engine: how many of the
tokens agree with fp32 Etude's greedy continuation before the first difference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from config import SFT_DIR
from model.checkpoint import load_model_folder
from model.decoding import merge_projections, quantize_int8
from model.gguf_llama import write_gguf
from model.tokenizer import load_tokenizer
from tool.benchmark import alternate
from tool.convert_gguf import first_difference
from tool.convert_hf import SAMPLE_CHAT

GGUF_ENGINES = ("q8_0", "f16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default=str(SFT_DIR), help=f"Etude model folder (default {SFT_DIR})")
    add("--new-tokens", type=int, default=256, help="tokens decoded per run (default 256; capped by the context)")
    add("--repeats", type=int, default=5, help="timed rounds (default 5)")
    add("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    add("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both (default: torch's)")
    add("--json", help="write the figures to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("error: pip install llama-cpp-python to measure llama.cpp", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return measure(args, Llama)
    finally:
        torch.set_num_threads(previous_threads)  # a caller in the same process (a test) keeps its own


def measure(args: argparse.Namespace, Llama) -> int:
    folder = Path(args.model)
    tokenizer = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else load_tokenizer()
    model = load_model_folder(folder).eval()
    prompt, _ = tokenizer.render_chat(SAMPLE_CHAT, add_generation_prompt=True)
    new = min(args.new_tokens, model.config.max_seq_len - len(prompt))
    engines, outputs, sizes = {}, {}, {}

    def etude(decoder, label):
        def run():
            outputs[label] = list(decoder.generate(prompt, max_new_tokens=new, temperature=0.0))
        return run

    engines["etude fp32"] = etude(merge_projections(model), "etude fp32")  # what inference.py decodes with
    engines["etude --int8"] = etude(quantize_int8(model), "etude --int8")

    with tempfile.TemporaryDirectory() as scratch:
        llamas = {}
        for type_name in GGUF_ENGINES:
            path = write_gguf(model, tokenizer, Path(scratch) / f"bench-{type_name}.gguf", type_name, "bench")
            sizes[type_name] = path.stat().st_size
            llamas[type_name] = Llama(model_path=str(path), n_ctx=model.config.max_seq_len, n_threads=args.threads,
                                      n_threads_batch=args.threads, seed=0, verbose=False)

            def run(llm=llamas[type_name], label=f"llama.cpp {type_name}"):
                llm.reset()
                tokens = []
                for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
                    tokens.append(token)
                    if len(tokens) == new:
                        break
                outputs[label] = tokens
            engines[f"llama.cpp {type_name}"] = run

        print(f"decoding {new} tokens after a {len(prompt)}-token prompt, batch 1, {args.threads} threads, "
              f"{args.repeats} rounds ({args.warmup} warm-up); engines alternate")
        times = alternate(engines, args.repeats, args.warmup, torch.device("cpu"))
        del llamas

    reference = outputs["etude fp32"]
    results = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        agree = first_difference(outputs[name], reference)
        results[name] = {"tokens_per_s": new / median, "ms_per_token": median / new * 1e3,
                         "greedy_agree_with_fp32": new if agree is None else agree}
    base = results["etude fp32"]["tokens_per_s"]
    print("\n| engine | tokens/s | ms/token | vs Etude fp32 | greedy = fp32 Etude |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['ms_per_token']:.2f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['greedy_agree_with_fp32']}/{new} |")
    print("GGUF sizes: " + ", ".join(f"{t} {b / 1e6:.2f} MB" for t, b in sizes.items()))
    if args.json:
        report = {"model": str(folder), "new_tokens": new, "prompt_tokens": len(prompt), "threads": args.threads,
                  "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "engines": results, "gguf_bytes": sizes}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
