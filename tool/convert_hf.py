"""Convert between Etude model folders and Hugging Face folders (Llama; Mixtral or Qwen2-MoE for
a mixture of experts).

    python tool/convert_hf.py                              # weight/etude_sft_model -> weight/etude_hf_model
    python tool/convert_hf.py --dtype bf16 --verify        # half the size, checked with transformers
    python tool/convert_hf.py --model weight/etude_pretrained_model --out /tmp/base_hf
    python tool/convert_hf.py --import some_llama_folder --out weight/etude_pretrained_model
    python tool/convert_hf.py --lora identity --out weight/etude_hf_mira    # LoRA adapter merged in
    python tool/convert_hf.py --lora identity --peft       # base export + weight/etude_hf_model_lora_identity/

Export writes a folder that plain transformers loads (AutoModelForCausalLM, AutoTokenizer):
config.json (LlamaForCausalLM for a dense model; for a mixture of experts MixtralForCausalLM, or
Qwen2MoeForCausalLM when it has a shared expert or top-k weights that are not renormalised),
model.safetensors (Hugging Face names, per-expert layout, --dtype fp32|bf16|fp16),
tokenizer.json, tokenizer_config.json (with the ChatML chat_template), special_tokens_map.json and
generation_config.json (generation ends at <|im_end|>). The folder is built under a temporary name and
renamed into place only when complete (and, with --verify, only when the check passed); an
existing --out is replaced only when it holds an earlier export, or with --force.

--verify loads the new folder with transformers and compares it with the Etude model: the chat
template's ids against our renderer's, the logits on sample text (prints the max abs difference;
fails above --tolerance) and greedy generations token for token. With --dtype bf16/fp16 the
comparison is against the Etude model rounded the same way, so it checks the conversion; how far
the rounding itself moves the logits is printed beside it.

--import turns a Llama, Mixtral or Qwen2-MoE folder (one exported here, or any such checkpoint in
safetensors, single or sharded, whose tokenizer was trained here) into an Etude model folder with
fp32 weights. The training stages also take such a folder as it is: `train/train_sft.py --init-from FOLDER`.
Exit status: 0 done, 1 verification failed (nothing written), 2 bad input.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import save_file

from config import ENDOFTEXT, HF_DIR, IM_END, PRETRAINED_DIR, SFT_DIR, TOKENIZER_DIR, ConfigError, read_json
from model.checkpoint import (CONFIG_FILE, GENERATION_CONFIG_FILE, atomic_write_json, generation_config,
                              load_model_folder, read_model_config, save_model_folder)
from model.hf_llama import ARCHITECTURES, EXPORT_DTYPES, config_to_hf, hf_model_type, is_hf_config, state_to_hf
from model.lora import ADAPTER_CONFIG_FILE, load_adapter, merge_and_unload, resolve_adapter, save_adapter, unload_lora
from model.model import EtudeModel
from model.tokenizer import CHAT_TEMPLATE, EtudeTokenizer, load_tokenizer

SAMPLE_TEXT = ("The old red barn stood under the tall green tree while the sun rose over the quiet hills. "
               "今天天气很好，我们去学习音乐。 Numbers 1234 and symbols <b>&amp;</b> 😀 end here.")
SAMPLE_CHAT = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Hello! Who are you?"},
               {"role": "assistant", "content": "I'm Etude, a small language model."},
               {"role": "user", "content": "What can you do? 你好"}]


class VerificationFailed(Exception):
    """The export does not behave like the model it came from."""


# ---- export ------------------------------------------------------------------------------

def source_folder(requested: str | None) -> Path:
    """--model, or the SFT model folder; a clear message when it holds no model."""
    source = Path(requested or SFT_DIR)
    if not (source / CONFIG_FILE).is_file():
        hint = "" if requested else " Train one with `python train/train_sft.py`, or pass --model FOLDER."
        raise FileNotFoundError(f"no model folder at {source} ({CONFIG_FILE} missing).{hint}")
    return source


def export_tokenizer(source: Path, requested: str | None, model: EtudeModel) -> EtudeTokenizer:
    """The tokenizer an export ships: --tokenizer-dir, else the model folder's own, else
    weight/tokenizer/; refused when it has more ids than the model."""
    tokenizer_dir = Path(requested) if requested else \
        (source if (source / "tokenizer.json").is_file() else TOKENIZER_DIR)
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}; pass the tokenizer it was trained with (--tokenizer-dir)")
    return tokenizer


def load_source_model(folder: Path, lora: Path | None = None, merge: bool = True) -> EtudeModel:
    """The Etude model to export. With a LoRA adapter folder, the adapter is checked against the
    model and applied: merged in (merge=True), so that everything after this point sees an
    ordinary dense model, or left unmerged for --peft to save beside the export."""
    read_model_config(folder)  # a clear message when the folder holds no model config
    if is_hf_config(read_json(folder / CONFIG_FILE, "model config")):
        raise ConfigError(f"{folder} is already a Hugging Face folder; to make an Etude folder of it "
                          f"use --import {folder}")
    model = load_model_folder(folder).eval()
    if lora is not None:
        load_adapter(model, lora)
        if merge:
            merge_and_unload(model)
    return model


def tokenizer_config_with_template(tokenizer_dir: Path) -> dict:
    """The tokenizer's tokenizer_config.json with our chat template (CHAT_TEMPLATE): the export
    must render what render_chat renders, tools and thinking included, and a tokenizer trained
    before those were added holds the older plain ChatML template."""
    path = tokenizer_dir / "tokenizer_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing, so transformers could not load the tokenizer; write it "
                                f"with `python train/train_tokenizer.py hf --out-dir {tokenizer_dir}`")
    data = read_json(path, "tokenizer config")
    data["chat_template"] = CHAT_TEMPLATE
    return data


def write_export(model: EtudeModel, tokenizer: EtudeTokenizer, folder: Path, dtype: str) -> None:
    """Write the Hugging Face folder's files into `folder` (a fresh staging folder)."""
    token_ids = {"bos": tokenizer.eos_id, "eos": tokenizer.im_end_id, "pad": tokenizer.pad_id}
    hf_config = config_to_hf(model.config, token_ids, dtype)
    torch_dtype = EXPORT_DTYPES[dtype][0]
    weights = {name: tensor.to(device="cpu", dtype=torch_dtype).contiguous()
               for name, tensor in state_to_hf(model.state_dict_for_save(), model.config).items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(tokenizer.path / "tokenizer.json", folder / "tokenizer.json")
    atomic_write_json(folder / "tokenizer_config.json", tokenizer_config_with_template(tokenizer.path))
    if (tokenizer.path / "special_tokens_map.json").is_file():
        shutil.copyfile(tokenizer.path / "special_tokens_map.json", folder / "special_tokens_map.json")
    atomic_write_json(folder / GENERATION_CONFIG_FILE,
                      generation_config({ENDOFTEXT: tokenizer.eos_id, IM_END: tokenizer.im_end_id}))
    atomic_write_json(folder / CONFIG_FILE, hf_config)


def rounded_copy(model: EtudeModel, dtype: torch.dtype) -> EtudeModel:
    """The model with every weight rounded to `dtype` and kept in fp32: what an export in that
    precision holds, loaded back in full precision."""
    if dtype == torch.float32:
        return model
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(dtype).float())
    return rounded


# ---- verification ------------------------------------------------------------------------

def verify(hf_folder: Path, model: EtudeModel, tokenizer: EtudeTokenizer | None, stored_dtype: torch.dtype,
           tolerance: float, max_new_tokens: int) -> list[str]:
    """Load `hf_folder` with transformers and compare it with `model` (fp32). Prints each
    figure; returns the failures (empty when the folder behaves exactly like the model)."""
    try:
        import transformers
    except ImportError:
        raise FileNotFoundError("--verify needs transformers: pip install transformers") from None
    transformers.utils.logging.disable_progress_bar()
    failures = []
    reference = rounded_copy(model, stored_dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32).eval()
    context = model.config.max_seq_len

    if tokenizer is not None:
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
        ours, _ = tokenizer.render_chat(SAMPLE_CHAT, add_generation_prompt=True)
        theirs = list(hf_tokenizer.apply_chat_template(SAMPLE_CHAT, tokenize=True, return_dict=False,
                                                       add_generation_prompt=True))
        same = theirs == ours
        print(f"verify: apply_chat_template ids {'==' if same else '!='} render_chat ids ({len(ours)} ids)")
        if not same:
            failures.append("the chat template renders different ids than the Etude renderer")
        sample = (ours + tokenizer.encode(SAMPLE_TEXT))[:context]
        prompt = ours[-context // 2:]
    else:
        generator = torch.Generator().manual_seed(0)
        sample = torch.randint(0, model.config.vocab_size, (min(64, context),), generator=generator).tolist()
        prompt = sample[:min(16, context // 2)]

    ids = torch.tensor([sample])
    with torch.no_grad():
        hf_logits = hf(ids).logits
        diff = (hf_logits - reference(ids)[0]).abs().max().item()
        print(f"verify: max abs logit difference {diff:.3g} over {ids.shape[1]} tokens "
              f"(tolerance {tolerance:g}){'' if diff <= tolerance else '  FAILED'}")
        if stored_dtype != torch.float32:
            rounding = (hf_logits - model(ids)[0]).abs().max().item()
            print(f"verify: (storing the weights as {str(stored_dtype).removeprefix('torch.')} moves the logits "
                  f"by up to {rounding:.3g} from the fp32 model; the check above is against the same rounding)")
    if not diff <= tolerance:
        failures.append(f"logits differ by {diff:.3g} > tolerance {tolerance:g}")

    # A chat prompt is answered as a chat would answer it: up to the end of the assistant's turn.
    stops = (tokenizer.im_end_id, tokenizer.eos_id) if tokenizer is not None else ()
    budget = min(max_new_tokens, context - len(prompt))
    ours_tokens = list(reference.generate(prompt, budget, stop_ids=stops))
    with torch.no_grad():
        output = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=budget, eos_token_id=list(stops) or None)
    hf_tokens = output[0, len(prompt):].tolist()
    if stops and hf_tokens and hf_tokens[-1] in stops:
        hf_tokens = hf_tokens[:-1]  # transformers keeps the stop token; Etude's generate does not
    ended = "to the end of its turn" if len(ours_tokens) < budget else f"up to the {budget}-token limit"
    if hf_tokens == ours_tokens:
        print(f"verify: greedy reply identical token for token in transformers and Etude "
              f"({len(ours_tokens)} tokens, {ended})")
        if tokenizer is not None:
            print(f"verify:   reply: {tokenizer.decode(ours_tokens)!r}")
    else:
        first = next((i for i, (a, b) in enumerate(zip(hf_tokens, ours_tokens)) if a != b),
                     min(len(hf_tokens), len(ours_tokens)))
        print(f"verify: greedy replies differ from token {first}: transformers {hf_tokens[first:first + 5]}, "
              f"Etude {ours_tokens[first:first + 5]}  FAILED")
        if tokenizer is not None:
            print(f"verify:   transformers: {tokenizer.decode(hf_tokens)!r}\nverify:   Etude:        "
                  f"{tokenizer.decode(ours_tokens)!r}")
        failures.append(f"greedy generation differs from token {first}")
    return failures


# ---- placing a finished folder -------------------------------------------------------------

def check_out_folder(out: Path, replaceable: bool, force: bool, sources: list[Path]) -> None:
    """Stop before any work when --out cannot take the result."""
    for source in sources:
        if out.resolve() == source.resolve():
            raise ValueError(f"--out {out} is the folder being converted; choose another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (replaceable or force):
        raise ValueError(f"--out {out} already holds files that this conversion would replace; "
                         "choose another --out, delete it, or pass --force")


def place_folder(staging: Path, out: Path) -> None:
    """Put a complete staging folder at `out`, replacing what is there in two renames."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def give_ordinary_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and safetensors writes 0600 files; a published model folder
    should read like any other (0755/0644 under the usual umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


# ---- the two directions ------------------------------------------------------------------------

def run_export(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    source = source_folder(args.model)
    out = Path(args.out or HF_DIR)
    previous_export = (out / CONFIG_FILE).is_file() and is_hf_config(read_json(out / CONFIG_FILE, "config"))
    check_out_folder(out, previous_export, args.force, [source])
    lora = resolve_adapter(args.lora) if args.lora else None
    lora_out = None
    if lora is not None and args.peft:
        if read_model_config(source).use_moe:
            raise ConfigError("--peft writes the adapter under Llama's module names, which a mixture-of-experts "
                              "export does not have; export with the adapter merged in (--lora without --peft)")
        lora_out = Path(args.lora_out) if args.lora_out else out.with_name(f"{out.name}_lora_{lora.name}")
        check_out_folder(lora_out, (lora_out / ADAPTER_CONFIG_FILE).is_file(), args.force, [source, out, lora])
    model = load_source_model(source, lora, merge=not args.peft)
    tokenizer = export_tokenizer(source, args.tokenizer_dir, model)
    with_lora = "" if lora is None else f" with the LoRA adapter {lora} " + \
        (f"written beside it for peft ({lora_out})" if args.peft else "merged in")
    print(f"exporting {source} ({model.num_parameters() / 1e6:.2f}M parameters) to {out} as {args.dtype} "
          f"{ARCHITECTURES[hf_model_type(model.config)]}{with_lora}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    adapter_holder = None
    try:
        if lora_out is not None:
            # The adapter goes out as peft expects it for this export (base_model_name_or_path
            # is the export folder); the base model itself is exported without it.
            lora_out.parent.mkdir(parents=True, exist_ok=True)
            adapter_holder = Path(tempfile.mkdtemp(prefix=f".{lora_out.name}.", suffix=".tmp", dir=lora_out.parent))
            save_adapter(model, adapter_holder / lora_out.name, base_model=out.resolve())
            unload_lora(model)
        write_export(model, tokenizer, staging, args.dtype)
        if args.verify:
            failures = verify(staging, model, tokenizer, EXPORT_DTYPES[args.dtype][0], args.tolerance,
                              args.max_new_tokens)
            if failures:
                raise VerificationFailed("; ".join(failures))
        size = folder_size(staging)
        give_ordinary_permissions(staging)
        place_folder(staging, out)
        if adapter_holder is not None:
            give_ordinary_permissions(adapter_holder / lora_out.name)
            place_folder(adapter_holder / lora_out.name, lora_out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if adapter_holder is not None:
            shutil.rmtree(adapter_holder, ignore_errors=True)
    print(f"wrote {out} ({size / 1e6:.2f} MB, model.safetensors {(out / 'model.safetensors').stat().st_size / 1e6:.2f} MB) "
          f"in {time.perf_counter() - started:.1f}s")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}); "
          f"chat: python inference/hf.py --model {out}")
    if lora_out is not None:
        print(f"wrote the adapter {lora_out}: PeftModel.from_pretrained(model, {str(lora_out)!r}); "
              f"chat: python inference/hf.py --model {out} --lora {lora_out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    source = Path(args.import_from)
    out = Path(args.out or PRETRAINED_DIR)
    if not (source / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no Hugging Face folder at {source} ({CONFIG_FILE} missing)")
    if not is_hf_config(read_json(source / CONFIG_FILE, "model config")):
        raise ConfigError(f"{source} is already an Etude model folder; nothing to import")
    check_out_folder(out, False, args.force, [source])
    tokenizer = None
    if (source / "tokenizer.json").is_file():
        try:
            tokenizer = load_tokenizer(source)
        except ValueError as exc:
            raise ValueError(f"{exc} An Etude model needs the tokenizer it was trained with; this checkpoint's "
                             "tokenizer cannot serve the training and chat scripts here.") from None
    else:
        print(f"note: {source} has no tokenizer.json; pass --tokenizer-dir to the stages that use {out}")
    model = load_model_folder(source).eval()
    print(f"importing {source} ({model.num_parameters() / 1e6:.2f}M parameters) to {out} as an Etude model folder")
    if args.verify:
        # transformers upcasts the stored weights to fp32 exactly as the import did: no rounding to allow for.
        failures = verify(source, model, tokenizer, torch.float32, args.tolerance, args.max_new_tokens)
        if failures:
            raise VerificationFailed("; ".join(failures))
    out.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_model_folder(model, holder / out.name, tokenizer_dir=source if tokenizer else None)
        give_ordinary_permissions(holder / out.name)
        place_folder(holder / out.name, out)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    print(f"wrote {out} ({folder_size(out) / 1e6:.2f} MB) in {time.perf_counter() - started:.1f}s; continue "
          f"training with --init-from {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", help=f"Etude model folder to export (default {SFT_DIR})")
    add("--import", dest="import_from", metavar="HF_FOLDER",
        help="convert this Hugging Face Llama / Mixtral / Qwen2-MoE folder into an Etude model folder "
        "instead of exporting")
    add("--out", help=f"folder to write (default {HF_DIR}; with --import {PRETRAINED_DIR})")
    add("--dtype", choices=sorted(EXPORT_DTYPES), default="fp32",
        help="precision of the exported weights (default fp32; bf16/fp16 halve the size)")
    add("--tokenizer-dir", help="tokenizer to ship with the export (default: the model folder's own, "
        f"else {TOKENIZER_DIR})")
    add("--verify", action="store_true",
        help="load the result with transformers and compare logits, chat-template ids and greedy generations")
    add("--tolerance", type=float, default=1e-4, help="largest max-abs logit difference --verify accepts (default 1e-4)")
    add("--max-new-tokens", type=int, default=32, help="greedy tokens --verify compares (default 32)")
    add("--lora", metavar="NAME", help="export with this LoRA adapter (a name under weight/lora/ or a folder) "
        "merged into the weights")
    add("--peft", action="store_true", help="with --lora: export the model without the adapter and write the "
        "adapter beside it in peft's layout instead (base_model_name_or_path = the export)")
    add("--lora-out", help="with --lora --peft: the adapter folder to write (default <out>_lora_<adapter name>)")
    add("--force", action="store_true", help="replace --out even when it holds something other than an earlier export")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tolerance < 0 or args.max_new_tokens <= 0:
        print("error: --tolerance must be >= 0 and --max-new-tokens positive", file=sys.stderr)
        return 2

    def run() -> int:
        if args.import_from:
            if args.model or args.dtype != "fp32" or args.lora:
                raise ValueError("--import reads a Hugging Face folder and writes fp32 Etude weights; "
                                 "--model, --dtype and --lora belong to export")
            return run_import(args)
        if (args.peft or args.lora_out) and not args.lora:
            raise ValueError("--peft and --lora-out go with --lora NAME (the adapter to write for the export)")
        return run_export(args)
    return exit_status(run)


def exit_status(run) -> int:
    """Run a conversion and turn its outcome into the exit status that the export tools share:
    0 done, 1 verification failed (nothing written), 2 bad input (one message, no traceback)."""
    try:
        return run()
    except VerificationFailed as exc:
        print(f"error: verification failed ({exc}); nothing was written", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
