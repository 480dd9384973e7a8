"""Convert chat and instruction datasets into the SFT format of Etude: JSONL, one
{"conversations": [{"role": "system|user|assistant", "content": "..."}, ...]} per line.

    python tool/cut_jsonl_sft.py alpaca_data.jsonl                   # -> training_data/alpaca_data.sft.jsonl
    python tool/cut_jsonl_sft.py sharegpt.jsonl.gz --skip-bad-lines --rejects dropped.txt
    python tool/cut_jsonl_sft.py qa.jsonl --system "You are a helpful assistant." --out training_data/qa_sft.jsonl

Reads .jsonl files, or .json files holding one JSON array (as Alpaca and ShareGPT data are often
shipped; streamed element by element), compressed or not. Each record's shape is recognised on
its own (--format forces one):

  alpaca    {"instruction", "input" (optional), "output", "system" (optional),
             "history": [[question, answer], ...] (optional, earlier turns)}
            the user turn is the instruction, then a blank line and the input when there is one
  sharegpt  {"conversations": [{"from": "human|gpt|system", "value": ...}, ...], "system" (optional)}
            (from: human/user -> user, gpt/assistant/bot/model/chatgpt -> assistant)
  openai    {"messages": [{"role": "system|developer|user|assistant", "content": str or text parts}, ...]}
  etude     {"conversations": [{"role": ..., "content": ...}, ...]} (our own format, checked again)
  qa        a question/answer pair: question/answer, q/a, prompt/response, prompt/completion,
            query/response, query/answer, input/output, instruction/response (+ optional "system")

Checks: roles are system, user or assistant; at most one system message, first; then user and
assistant take turns, starting with the user; no message is empty. A conversation that ends
on an unanswered user message loses that message (counted); an empty system message is removed
(counted). --system adds a system prompt to conversations that have none.

Any line that cannot be converted stops the run with file:line and the reason; with
--skip-bad-lines it is dropped and reported (every one, on stderr or in the --rejects file) and
the summary counts them by reason. Writes --out (default training_data/<input name>.sft.jsonl),
atomically; `python tool/prepare_data.py --sft FILE` takes it as it is.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.chat_formats import Rejected, convert
from tool.textio import (BadLines, DataError, Outputs, Reader, Stopwatch, add_common_flags, check_paths,
                         default_output, iter_json_objects, print_summary, run_tool)

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "etude", "qa")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="JSONL",
                        help=".jsonl files, or .json files holding one array (.gz/.bz2/.xz too)")
    parser.add_argument("--out", type=Path, help="the JSONL to write (.jsonl or .jsonl.gz); "
                                                 "default training_data/<input name>.sft.jsonl")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="the input format (default auto: recognised line by line)")
    parser.add_argument("--system", help="system prompt for conversations that have none")
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.system is not None and not args.system.strip():
            raise DataError("--system is empty; give the system prompt text, or leave the flag out")
        out = args.out or default_output(args.inputs[0], ".sft.jsonl")
        check_paths(args.inputs, [out])
        print(f"converting {', '.join(map(str, args.inputs))} ({args.format}) -> {out}")
        watch, bad = Stopwatch(), BadLines(args.skip_bad_lines, args.rejects)
        formats, fixes = Counter(), Counter()
        written = messages_written = size = 0
        try:
            with Outputs() as outputs:
                output = outputs.open(out)
                for path in args.inputs:
                    with Reader(path, progress=not args.no_progress) as reader:
                        for lineno, _, obj in iter_json_objects(reader, bad):
                            try:
                                messages, fmt, repairs = convert(obj, args.format, args.system)
                            except Rejected as exc:
                                bad(path, lineno, *exc.args)
                                continue
                            except ValueError as exc:  # validate_messages: a shape the checks above missed
                                bad(path, lineno, "invalid conversation", str(exc))
                                continue
                            formats[fmt] += 1
                            fixes.update(repairs)
                            output.write_json({"conversations": messages})
                            written += 1
                            messages_written += len(messages)
                        size += reader.size
        finally:
            bad.close()
        rows = [("conversations written", written), ("messages written", messages_written)]
        rows += [(f"from {fmt}", count) for fmt, count in formats.most_common()]
        rows += list(fixes.items()) + bad.summary_rows() + watch.rows(size)
        print_summary(f"wrote {out}", rows)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
