"""Bits per byte past the trained context: plain RoPE against linear, dynamic NTK and YaRN scaling.

    python tool/rope_context.py                                   # the demo's pretrained model
    python tool/rope_context.py weight/etude_sft_model --lengths 1,2,4 --factors 4,match --tokens 32768
    python tool/rope_context.py MODEL --data my_text.jsonl --json rope.json --markdown

Held-out documents (default training_data/pretrain.val.jsonl), each after an <|endoftext|> as in
training, are joined into one token stream, and its first --tokens tokens (rounded down to a
multiple of the longest window) are scored in consecutive windows of L = length x the trained
context (a window starts from the last token of the one before, with no further context). Every
row of the table scores exactly the same tokens, so the columns differ only in how much context
each prediction had and in how positions are encoded:

    none       plain RoPE, simply run past the trained length
    TYPE:F     linear, dynamic or yarn scaling by F (`--rope-scaling TYPE:F` at inference);
               --factors match uses F = the length multiple (F = 1, i.e. plain RoPE, at 1x)

Bits per byte = summed negative log-likelihood / ln 2 / UTF-8 bytes of the scored text (the
tokenizer-independent measure of tool/evaluate.py's bpb task). Prints a table; --json writes the
figures. Measures a model as it is: nothing is trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from config import PRETRAIN_VAL_DATA, PRETRAINED_DIR, ROPE_SCALING_KEYS
from model.checkpoint import load_model_folder
from model.decoding import pick_inference_device
from model.model import EtudeModel
from model.tokenizer import load_tokenizer
from tool.eval.models import bits_per_byte
from tool.eval.tasks import read_texts


def token_stream(texts: list[str], tokenizer, n_tokens: int) -> list[int]:
    """[eot] + doc1 + [eot] + doc2 ... until n_tokens + 1 ids (the first is context only)."""
    ids: list[int] = []
    for text in texts:
        ids += [tokenizer.eos_id] + tokenizer.encode(text)
        if len(ids) > n_tokens:
            return ids[:n_tokens + 1]
    raise ValueError(f"the held-out text holds {len(ids)} tokens, fewer than --tokens {n_tokens} + 1; "
                     "lower --tokens or give more text with --data")


@torch.no_grad()
def stream_nats(model: EtudeModel, stream: list[int], window: int, batch_size: int) -> float:
    """Summed negative log-likelihood (nats) of stream[1:] scored in windows of `window` tokens."""
    device = model.embed_tokens.weight.device
    starts = list(range(0, len(stream) - 1, window))
    nats = 0.0
    for first in range(0, len(starts), batch_size):
        rows = torch.tensor([stream[s:s + window + 1] for s in starts[first:first + batch_size]], device=device)
        logits = model(rows[:, :-1])[0].float()
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                reduction="sum").item()
    return nats


def configure(model: EtudeModel, trained_config, spec: str, length: int) -> None:
    """Give `model` (as loaded: `trained_config`) the RoPE of `spec` ("none" or TYPE:F) and a
    max_seq_len that admits `length` tokens (plain RoPE, or a factor below the length multiple,
    is simply run past its range)."""
    rope_type, _, factor = spec.partition(":")
    model.config = trained_config
    model.set_rope_scaling(None if rope_type == "none" else rope_type, float(factor or 1))
    model.config = dataclasses.replace(model.config, max_seq_len=max(model.config.max_seq_len, length))


def measure(model: EtudeModel, tokenizer, texts: list[str], lengths: list[int], factors: list[str],
            n_tokens: int, batch_size: int) -> dict:
    """{"trained", "tokens", "bytes", "rows": {spec: {"1x": bpb, ...}}} for every scaling."""
    trained_config = model.config
    trained = trained_config.trained_seq_len
    longest = max(lengths) * trained
    n_tokens = n_tokens // longest * longest
    if n_tokens == 0:
        raise ValueError(f"--tokens must be at least the longest window, {longest} tokens")
    stream = token_stream(texts, tokenizer, n_tokens)
    n_bytes = len(tokenizer.decode(stream[1:], skip_special_tokens=True).encode("utf-8"))
    specs = ["none"] + [f"{kind}:{factor}" for factor in factors for kind in ROPE_SCALING_KEYS]
    rows: dict[str, dict[str, float]] = {}
    for spec in specs:
        for multiple in lengths:
            factor = spec.partition(":")[2]
            used = spec.replace(":match", f":{multiple}") if factor == "match" else spec
            if used.endswith(":1"):
                used = "none"  # scaling by 1 is plain RoPE
            configure(model, trained_config, used, multiple * trained)
            started = time.perf_counter()
            bpb = bits_per_byte(stream_nats(model, stream, multiple * trained, batch_size), n_bytes)
            rows.setdefault(spec, {})[f"{multiple}x"] = bpb
            print(f"  {spec:>12} at {multiple}x ({multiple * trained} tokens, as {used}): {bpb:.4f} bits per byte "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    model.config = trained_config
    return {"trained": trained, "tokens": n_tokens, "bytes": n_bytes, "lengths": lengths, "rows": rows}


def format_table(figures: dict, markdown: bool = False) -> str:
    trained, lengths = figures["trained"], figures["lengths"]
    header = ["RoPE"] + [f"{m}x ({m * trained} tokens)" for m in lengths]
    rows = [[spec] + [f"{values[f'{m}x']:.4f}" for m in lengths] for spec, values in figures["rows"].items()]
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])


def parse_list(text: str, what: str, allow_match: bool = False) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    out = []
    for item in items:
        if allow_match and item == "match":
            out.append(item)
            continue
        try:
            value = float(item)
        except ValueError:
            value = 0
        if value < 1 or (not allow_match and value != int(value)):
            raise ValueError(f"{what} must be a comma-separated list of "
                             f"{'numbers >= 1 (or match)' if allow_match else 'whole numbers >= 1'}, got {text!r}")
        out.append(f"{value:g}" if allow_match else int(value))
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("model", nargs="?", default=str(PRETRAINED_DIR), help=f"Etude model folder (default {PRETRAINED_DIR})")
    add("--data", type=Path, default=PRETRAIN_VAL_DATA, help=f"held-out text, .jsonl or .txt (default {PRETRAIN_VAL_DATA})")
    add("--lengths", default="1,2,4", help="window lengths as multiples of the trained context (default 1,2,4)")
    add("--factors", default="4", help="scaling factors to compare, or match (= the length multiple); default 4")
    add("--tokens", type=int, default=32768, help="tokens scored, the same for every row (default 32768)")
    add("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    add("--device", default="cpu", help="auto|cpu|cuda|mps (default cpu: fp32, reproducible)")
    add("--json", type=Path, help="also write the figures to this JSON file")
    add("--markdown", action="store_true", help="print the table as Markdown")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        lengths = parse_list(args.lengths, "--lengths")
        factors = parse_list(args.factors, "--factors", allow_match=True)
        if args.batch_size < 1 or args.tokens < 1:
            raise ValueError("--batch-size and --tokens must be positive")
        folder = Path(args.model)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no model folder at {folder} (config.json missing); train one "
                                    "(python train/train_pretrain.py) or name a model folder")
        tokenizer = load_tokenizer(folder)
        texts = read_texts(args.data)
        model = load_model_folder(folder).to(pick_inference_device(args.device)).eval()
        print(f"bits per byte of {args.data} at {', '.join(f'{m}x' for m in lengths)} the trained context of "
              f"{folder} ({model.config.trained_seq_len} tokens), RoPE scaling factors {', '.join(factors)}",
              file=sys.stderr, flush=True)
        figures = measure(model, tokenizer, texts, lengths, factors, args.tokens, args.batch_size)
    except (FileNotFoundError, ValueError) as exc:
        print(f"rope_context: {exc}", file=sys.stderr)
        return 2
    figures.update(model=str(args.model), data=str(args.data))
    print(f"{figures['tokens']} tokens ({figures['bytes']} bytes) scored per cell; lower is better")
    print(format_table(figures, args.markdown))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
