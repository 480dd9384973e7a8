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
# The GGUF type that matches each Etude decoding precision (int8 is weight-only int8 with one scale
# per row; Q8_0 is int8 with one scale per 32 weights, the closest llama.cpp has).
MATCHING_GGUF = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}


def llama_cpp_unavailable(llama_bench: str | None) -> str | None:
    """Why llama.cpp cannot be timed here (None when it can): neither the `llama-bench` binary given
    nor the llama-cpp-python package."""
    if llama_bench:
        return None if Path(llama_bench).is_file() else f"--llama-bench {llama_bench} is not a file"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python) and no --llama-bench binary was given"
    return None


class LlamaCppDecoder:
    """llama.cpp decoding the GGUF export of `model` (tool/convert_gguf.py's writer), greedy, batch
    1: `run()` prefills `prompt` and decodes `new` tokens, as Etude's generate() is timed. Through
    llama-cpp-python by default; with `llama_bench` (a path to llama.cpp's `llama-bench`) each run is
    one `llama-bench -p <prompt> -n <new> -r 1` whose own tokens/s figure is kept in `reported`
    (llama-bench times prompt and generation apart; its generation figure is recorded)."""

    def __init__(self, model, tokenizer, type_name: str, folder: Path, threads: int, prompt: list[int],
                 new: int, llama_bench: str | None = None):
        self.path = write_gguf(model, tokenizer, Path(folder) / f"bench-{type_name}.gguf", type_name, "bench")
        self.type_name, self.prompt, self.new, self.threads = type_name, prompt, new, threads
        self.llama_bench = llama_bench
        self.reported: list[float] = []
        self.tokens: list[int] = []
        self.llm = None
        if llama_bench is None:
            from llama_cpp import Llama
            self.llm = Llama(model_path=str(self.path), n_ctx=model.config.max_seq_len, n_threads=threads,
                             n_threads_batch=threads, seed=0, verbose=False)

    def run(self) -> None:
        if self.llm is None:
            self._run_binary()
            return
        self.llm.reset()
        tokens = []
        for token in self.llm.generate(self.prompt, temp=0.0, repeat_penalty=1.0):
            tokens.append(token)
            if len(tokens) == self.new:
                break
        self.tokens = tokens

    def _run_binary(self) -> None:
        import subprocess
        command = [self.llama_bench, "-m", str(self.path), "-t", str(self.threads), "-p", str(len(self.prompt)),
                   "-n", str(self.new), "-r", "1", "-o", "json"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        for entry in json.loads(done.stdout):
            if entry.get("n_gen", 0) > 0:
                self.reported.append(float(entry["avg_ts"]))

    def close(self) -> None:
        """Free llama.cpp's model and delete the GGUF file."""
        if self.llm is not None:
            self.llm.close()
            self.llm = None
        self.path.unlink(missing_ok=True)


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
