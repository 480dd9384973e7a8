"""Speed of Etude against Hugging Face transformers' LlamaForCausalLM, side by side in one run,
on the same weights and the same shape.

    python tool/benchmark.py                        # the issue-11 shape: hidden 512, 8 layers, seq 512
    python tool/benchmark.py --threads 1 --json bench.json
    python tool/benchmark.py --shape base --device cuda
    python tool/benchmark.py --shape toy --quick    # a smoke test in seconds
    python tool/benchmark.py --threads 1 --compile  # also both models under torch.compile

Measured, and printed as one table:
  - training: tokens/s of a forward + backward + AdamW step (fused where available, for both),
    in fp32 and under bf16 autocast; the two implementations alternate step by step so that a
    machine whose speed drifts (other jobs, turbo) slows both alike; medians. MFU is the achieved
    FLOP/s (6 per matmul weight per token plus attention, model/model.py flops_per_token) over a
    matmul ceiling measured here at the model's own matmul shapes (on a known GPU in bf16: the
    datasheet peak);
  - decoding at batch 1: a 32-token prompt, 256 new tokens, greedy, per precision (fp32, bf16,
    and int8 on CPU): native EtudeModel.generate (on the copy inference/inference.py decodes with:
    model/decoding.py merge_projections / quantize_int8), eager and compiled (model/decode_step.py;
    the compilation timed apart), transformers' generate, and llama.cpp on GGUF files written by
    the project's exporter at the matching type (f32, bf16, q8_0; llama-cpp-python, or
    --llama-bench PATH; skipped with the reason otherwise); beside each figure the weight-bandwidth
    floor (weight bytes read per token / measured copy bandwidth) and the share of it reached.
    --decode-only times this table alone;
  - prefill at batch 1 (one forward over --prefill-len tokens into an empty cache), tokens/s;
  - causal attention alone (forward + backward at the training shape, CPU): Etude's blocked kernel
    (model/attention.py) against torch's SDPA, which transformers runs — so a CPU unlike the one
    this was tuned on shows whether the kernel still pays there;
  - tokenizer encode MB/s and token-cache build MB/s (train/data.py build_token_cache on a
    temporary copy of --data), when a tokenizer exists.
The headline is the ratio Etude / transformers. On CPU, Etude's weight-only int8 decoding
(model/decoding.py quantize_int8) is timed too, with the first dtype. The JSON (--json) holds every
figure; its top level has train_speedup_bf16, train_speedup_fp32 and decode_speedup: Etude's
fastest decoding mode over transformers' fastest (decode_speedup_fp32 / _bf16: same dtype).
With --compile, training is also timed with both models under torch.compile (rows "<dtype>
compiled", the first step's seconds kept as the compile cost): train_speedup_<dtype>_compiled is
compiled Etude over compiled transformers, train_speedup_<dtype>_compiled_vs_eager compiled Etude
over eager transformers (the headline keys above stay eager against eager).

Shapes (--shape): `issue` (default; vocab 6400, hidden 512, 8 layers, 8 heads = kv heads, seq 512,
batch 8, ~29M parameters, tied embeddings), `toy` (for tests), and every dense repository preset
(tiny, small, base) with its pretraining seq_len and batch size. --batch-size / --seq-len override.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from config import PRESETS, PRETRAIN_DATA, TOKENIZER_DIR, ConfigError, EtudeConfig, TrainConfig
from model.hf_llama import config_to_hf, state_to_hf
from model.decoding import merge_projections, quantize_int8
from model.model import EtudeModel, KVCache

SHAPES: dict[str, dict] = {
    "issue": {"model": dict(vocab_size=6400, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=8,
                            tie_embeddings=True), "batch_size": 8, "seq_len": 512},
    "toy": {"model": dict(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          tie_embeddings=True), "batch_size": 2, "seq_len": 32},
}
for _name, _preset in PRESETS.items():
    if not _preset["model"].get("use_moe"):  # transformers Llama is dense; MoE has tool/bench_moe.py
        _pretrain = _preset.get("pretrain", {})
        SHAPES.setdefault(_name, {"model": dict(_preset["model"]),
                                  "batch_size": _pretrain.get("batch_size", TrainConfig.batch_size),
                                  "seq_len": _pretrain.get("seq_len", TrainConfig.seq_len)})

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("etude", "transformers")


# ---- timing ---------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(fns: dict[str, callable], repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each fn over `repeats` rounds after `warmup` untimed ones, the fns taking turns
    within a round (and the first of a round alternating) so that drift hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(warmup + repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            seconds = timed(fns[name], device)
            if round_index >= warmup:
                times[name].append(seconds)
    return times


def matmul_ceiling(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int, int]],
                   repeats: int) -> float:
    """The best FLOP/s of plain matmuls (m, k) @ (k, n) in `dtype`: the ceiling a training step's
    matmuls could reach on this machine now."""
    generator = torch.Generator(device=device).manual_seed(0)
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype, generator=generator)
        b = torch.randn(k, n, device=device, dtype=dtype, generator=generator)
        a @ b  # first call builds the kernel
        for _ in range(repeats):
            seconds = timed(lambda: a @ b, device)
            best = max(best, 2 * m * k * n / seconds)
    return best


def copy_bandwidth(device: torch.device, megabytes: int, repeats: int) -> float:
    """Bytes/s of a large tensor copy, counting what is read and what is written (STREAM's copy)."""
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * n * 4 / best


# ---- the two models on the same weights -------------------------------------------------------------

def build_models(config: EtudeConfig, device: torch.device, seed: int):
    """An EtudeModel and a transformers LlamaForCausalLM holding exactly the same weights (ours,
    renamed by model/hf_llama.py as the exporter does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    etude = EtudeModel(config).to(device)
    hf_config = LlamaConfig(**config_to_hf(config, {"bos": 0, "eos": 0, "pad": 0}, dtype="fp32"))
    hf_config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_config).to(device)
    result = hf.load_state_dict(state_to_hf(etude.state_dict_for_save(), config), strict=False)
    allowed = {"lm_head.weight"} if config.tie_embeddings else set()
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise RuntimeError(f"transformers model did not take the weights: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    if config.tie_embeddings and hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("transformers did not tie lm_head to embed_tokens")
    return etude, hf


def logits_difference(etude: EtudeModel, hf, config: EtudeConfig, device: torch.device) -> float:
    """Largest |logit difference| of the two models on one random sequence (fp32): proof that
    they are the same model, so that the speeds compare like with like."""
    ids = torch.randint(0, config.vocab_size, (1, 16), device=device)
    with torch.no_grad():
        ours = etude(ids)[0]
        theirs = hf(input_ids=ids).logits
    return float((ours - theirs).abs().max())


def adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the trainer builds it (fused on CPU and CUDA): matrices decay, the rest not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-4, fused=device.type in ("cpu", "cuda"))


def train_steps(etude: EtudeModel, hf, batch: torch.Tensor, dtype: torch.dtype, device: torch.device):
    """One training-step closure per implementation; both see the same inputs and targets."""
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    optimizers = {"etude": adamw(etude, device), "transformers": adamw(hf, device)}

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def etude_step():
        with autocast():
            _, loss, _ = etude(inputs, labels=targets)
        loss.backward()
        optimizers["etude"].step()
        optimizers["etude"].zero_grad(set_to_none=True)

    def hf_step():
        with autocast():
            # shift_labels: the targets are already shifted, exactly as Etude's labels are.
            loss = hf(input_ids=inputs, labels=targets, shift_labels=targets).loss
        loss.backward()
        optimizers["transformers"].step()
        optimizers["transformers"].zero_grad(set_to_none=True)

    return {"etude": etude_step, "transformers": hf_step}


def weight_bytes_per_token(model: EtudeModel, dtype: torch.dtype) -> int:
    """Bytes of weights a decoding step reads: every matmul weight, the output layer included
    (a tied one read as lm_head), but only one row of the embedding table."""
    bits = torch.iinfo(dtype).bits if dtype == torch.int8 else torch.finfo(dtype).bits
    return model.matmul_parameters() * bits // 8


# ---- the measurements -------------------------------------------------------------------------------

def training_figures(times: dict[str, list[float]], tokens: int, flops_per_token: float,
                     peak: tuple[float, str]) -> dict:
    """Per implementation: tokens/s of the median step, the step times, TFLOP/s and MFU."""
    figures = {}
    for impl in IMPLS:
        median = statistics.median(times[impl])
        tokens_per_s = tokens / median
        figures[impl] = {
            "tokens_per_s": tokens_per_s, "step_ms_median": median * 1e3, "step_ms_min": min(times[impl]) * 1e3,
            "step_ms_all": [round(t * 1e3, 1) for t in times[impl]],
            "tflops": tokens_per_s * flops_per_token / 1e12,
            "mfu": tokens_per_s * flops_per_token / peak[0], "mfu_against": peak[1]}
    return figures


def measure_training(etude, hf, config, args, device, ceilings, peaks) -> dict:
    """Training figures per dtype (and compiled, with --compile). Unless --train-process same,
    each dtype is timed in a fresh process: how fast an eager CPU step runs depends on what the
    process allocated before (glibc hands large freed blocks back to the system, and a step then
    page-faults them in again: ~166,000 faults per bf16 transformers step in a process that ran
    only bf16 steps, ~77,000 after fp32 steps had grown the heap, 2.67 s against 2.21 s), and a
    real training run is a process that runs one dtype."""
    out = {}
    for dtype_name in args.dtypes:
        peak = peaks.get(dtype_name, (ceilings[dtype_name], "measured matmul ceiling"))
        if args.train_process == "fresh":
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                figures = pool.submit(_train_in_fresh_process, config.to_dict(), args, dtype_name, peak).result()
        else:
            figures = train_one_dtype(etude, hf, config, args, device, dtype_name, peak)
        out.update(figures)
    return out


def _train_in_fresh_process(config_dict: dict, args: argparse.Namespace, dtype_name: str, peak) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    config, device = EtudeConfig(**config_dict), torch.device(args.device)
    etude, hf = build_models(config, device, args.seed)  # the same seed, so the same weights
    return train_one_dtype(etude, hf, config, args, device, dtype_name, peak)


def train_one_dtype(etude, hf, config, args, device, dtype_name: str, peak) -> dict:
    """Rows `<dtype>` (eager) and, with --compile, `<dtype> compiled` of the training table."""
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator).to(device)
    tokens = args.batch_size * args.seq_len
    flops_per_token = etude.flops_per_token(args.seq_len)
    out = {}
    steps = train_steps(etude, hf, batch, DTYPES[dtype_name], device)
    times = alternate(steps, args.steps, args.warmup, device)
    out[dtype_name] = training_figures(times, tokens, flops_per_token, peak)
    print(f"  train {dtype_name}: etude {out[dtype_name]['etude']['tokens_per_s']:,.0f} tok/s, "
          f"transformers {out[dtype_name]['transformers']['tokens_per_s']:,.0f} tok/s", flush=True)
    if args.compile:
        # Both models through torch.compile (default mode, as train/trainer.py --compile does),
        # alternating with each other; the first call of each (tracing + code generation) is
        # timed apart as the compile cost. The compiled modules share the eager ones' weights.
        compiled = {"etude": torch.compile(etude), "transformers": torch.compile(hf)}
        steps = train_steps(compiled["etude"], compiled["transformers"], batch, DTYPES[dtype_name], device)
        compile_s = {impl: timed(steps[impl], device) for impl in IMPLS}
        times = alternate(steps, args.steps, args.warmup, device)
        key = f"{dtype_name} compiled"
        out[key] = training_figures(times, tokens, flops_per_token, peak)
        for impl in IMPLS:
            out[key][impl]["first_step_s"] = compile_s[impl]
        print(f"  train {key}: etude {out[key]['etude']['tokens_per_s']:,.0f} tok/s "
              f"(first step {compile_s['etude']:.0f} s), transformers {out[key]['transformers']['tokens_per_s']:,.0f} "
              f"tok/s (first step {compile_s['transformers']:.0f} s)", flush=True)
    return out


def decode_figures(seconds: list[float], new: int, floor_s: float) -> dict:
    median = statistics.median(seconds)
    return {"tokens_per_s": new / median, "ms_per_token": median / new * 1e3, "floor_ms_per_token": floor_s * 1e3,
            "floor_tokens_per_s": 1 / floor_s, "share_of_floor": floor_s / (median / new)}


def measure_decoding(etude, hf, config, args, device, bandwidth) -> tuple[dict, dict, dict]:
    """Batch-1 greedy decoding per precision (fp32, bf16 and, on CPU, int8), every engine of a
    precision taking turns in one alternation: Etude's eager step ("etude", what inference.py runs
    by default), Etude's compiled step ("etude compiled", --compile there; its first call, the
    compilation, timed apart), transformers (fp32, bf16) and llama.cpp on the GGUF export at the
    matching type (f32, bf16, q8_0) when it is available. Each figure carries the bandwidth floor
    of its precision (Etude's weight bytes per token / copy bandwidth) and its share of it."""
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    prompt = torch.randint(3, config.vocab_size, (args.prompt_len,), generator=generator).to(device)
    prefill_ids = torch.randint(3, config.vocab_size, (1, args.prefill_len), generator=generator).to(device)
    new = args.new_tokens
    decode, prefill, outputs = {}, {}, {}
    precisions = list(args.dtypes) + (["int8"] if device.type == "cpu" and args.int8 else [])
    llama = llama_cpp_setup(etude, args, device)
    for precision in precisions:
        if precision == "int8":
            ours, theirs = quantize_int8(etude), None
            # int8 weights plus one bf16 scale per output row.
            floor_s = weight_bytes_per_token(etude, torch.int8) * (1 + 2 / config.hidden_size) / bandwidth
        else:
            dtype = DTYPES[precision]
            ours = merge_projections(etude).to(dtype)  # the copy inference/inference.py decodes with
            theirs = copy.deepcopy(hf).to(dtype).eval()
            floor_s = weight_bytes_per_token(etude, dtype) / bandwidth
        generated: dict[str, list[int]] = {}

        def etude_decode(compile=False, label="etude"):
            generated[label] = list(ours.generate(prompt, max_new_tokens=new, temperature=0.0, compile=compile))

        @torch.inference_mode()
        def hf_decode():
            result = theirs.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt[None]),
                                     max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            generated["transformers"] = result[0, prompt.numel():].tolist()

        runs = {"etude": etude_decode}
        first_call_s = None
        if args.decode_compile:
            first_call_s = timed(lambda: etude_decode(True, "etude compiled"), device)
            runs["etude compiled"] = lambda: etude_decode(True, "etude compiled")
        if theirs is not None:
            runs["transformers"] = hf_decode
        engine = llama.get(precision) if isinstance(llama, dict) else None
        if engine is not None:
            runs["llama.cpp"] = engine.run
        times = alternate(runs, args.decode_repeats, 1, device)
        decode[precision] = {name: decode_figures(seconds, new, floor_s) for name, seconds in times.items()}
        if engine is not None:
            if engine.reported:  # llama-bench's own generation figure
                decode[precision]["llama.cpp"]["tokens_per_s"] = statistics.median(engine.reported)
                decode[precision]["llama.cpp"]["ms_per_token"] = 1e3 / decode[precision]["llama.cpp"]["tokens_per_s"]
                decode[precision]["llama.cpp"]["share_of_floor"] = floor_s * decode[precision]["llama.cpp"]["tokens_per_s"]
            decode[precision]["llama.cpp"]["gguf_type"] = engine.type_name
            decode[precision]["llama.cpp"]["via"] = "llama-bench" if engine.reported else "llama-cpp-python"
        elif llama is not None:
            decode[precision]["llama.cpp"] = {"skipped": llama if isinstance(llama, str) else "no engine"}
        if first_call_s is not None:
            decode[precision]["etude compiled"]["first_call_s"] = first_call_s
            decode[precision]["etude compiled"]["compiled_tokens_equal_eager"] = (
                generated["etude compiled"] == generated["etude"])
        if precision == "int8":
            with torch.inference_mode():  # how far int8 moves the logits, relative to their size
                exact, rounded = etude(prompt[None])[0], ours(prompt[None])[0]
            decode["int8"]["etude"]["max_logit_error_relative"] = float((rounded - exact).abs().max() / exact.abs().max())
            outputs["int8"] = {"etude": generated["etude"], "fp32 etude": outputs.get("fp32", {}).get("etude", [])}
        else:
            outputs[precision] = {impl: generated[impl] for impl in IMPLS}

            @torch.inference_mode()
            def etude_prefill():
                cache = KVCache(config, 1, args.prefill_len, device, dtype)
                ours(prefill_ids, kv_cache=cache, last_only=True)

            @torch.inference_mode()
            def hf_prefill():
                theirs(input_ids=prefill_ids, use_cache=True, logits_to_keep=1)

            times = alternate({"etude": etude_prefill, "transformers": hf_prefill}, args.decode_repeats, 1, device)
            prefill[precision] = {impl: {"tokens_per_s": args.prefill_len / statistics.median(times[impl])}
                                  for impl in IMPLS}
        print(f"  decode {precision}: " + ", ".join(f"{name} {figures['tokens_per_s']:,.1f} tok/s"
                                                   for name, figures in decode[precision].items()
                                                   if "tokens_per_s" in figures), flush=True)
    if isinstance(llama, dict):
        for engine in llama.values():
            engine.close()
            shutil.rmtree(engine.path.parent, ignore_errors=True)
    return decode, prefill, outputs


def llama_cpp_setup(etude, args, device: torch.device):
    """{precision: LlamaCppDecoder} on GGUF files of the benchmark's weights written with the
    project's exporter, or a string saying why llama.cpp is skipped, or None when not asked for."""
    if not args.llama_cpp:
        return None
    from tool.bench_gguf import MATCHING_GGUF, LlamaCppDecoder, llama_cpp_unavailable

    reason = None
    if device.type != "cpu":
        reason = "llama.cpp is timed on the CPU only"
    reason = reason or llama_cpp_unavailable(args.llama_bench)
    tokenizer = None
    if reason is None:
        from model.tokenizer import load_tokenizer
        try:
            tokenizer = load_tokenizer(Path(args.tokenizer))
        except (FileNotFoundError, ValueError) as exc:
            reason = f"the GGUF export needs a tokenizer: {exc}"
    if reason is None and tokenizer.vocab_size > etude.config.vocab_size:
        reason = f"the tokenizer's {tokenizer.vocab_size} tokens do not fit the shape's vocabulary of {etude.config.vocab_size}"
    if reason is not None:
        print(f"  llama.cpp: skipped ({reason})", flush=True)
        return reason
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    prompt = torch.randint(3, etude.config.vocab_size, (args.prompt_len,), generator=generator).tolist()
    folder = tempfile.mkdtemp(prefix="etude_bench_gguf_")
    engines = {}
    precisions = list(args.dtypes) + (["int8"] if args.int8 else [])
    try:
        for precision in precisions:
            engines[precision] = LlamaCppDecoder(etude, tokenizer, MATCHING_GGUF[precision], Path(folder),
                                                 torch.get_num_threads(), prompt, args.new_tokens, args.llama_bench)
    except Exception as exc:  # noqa: BLE001 - an exporter or llama.cpp refusal is a skip, said why
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"  llama.cpp: skipped ({reason})", flush=True)
        for engine in engines.values():
            engine.close()
        shutil.rmtree(folder, ignore_errors=True)
        return reason
    return engines


def measure_attention(config: EtudeConfig, args, device: torch.device) -> dict:
    """Forward + backward of causal attention alone at the training shape: Etude's blocked CPU
    kernel (model/attention.py) against torch's SDPA (what transformers runs), per dtype, ms
    of the median. On CUDA Etude runs SDPA itself, so there is nothing to compare."""
    if device.type != "cpu":
        return {"skipped": "Etude uses torch's SDPA on this device"}
    import torch.nn.functional as F

    from model.attention import causal_attention

    generator = torch.Generator().manual_seed(args.seed + 3)
    shape = (args.batch_size, config.n_heads, args.seq_len, config.head_dim)
    kv_shape = (args.batch_size, config.n_kv_heads, args.seq_len, config.head_dim)
    out = {}
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        q, k, v = (torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in (shape, kv_shape, kv_shape))
        grad = torch.randn(shape, generator=generator).to(dtype)

        def run(attend):
            def step():
                attend(q, k, v).backward(grad)
                q.grad = k.grad = v.grad = None
            return step

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

        times = alternate({"etude": run(causal_attention), "transformers": run(sdpa)}, args.steps, 1, device)
        out[dtype_name] = {impl: {"ms": statistics.median(times[impl]) * 1e3} for impl in IMPLS}
        print(f"  attention {dtype_name}: etude {out[dtype_name]['etude']['ms']:.1f} ms, "
              f"SDPA {out[dtype_name]['transformers']['ms']:.1f} ms (forward + backward)", flush=True)
    return out


def measure_text(args) -> dict:
    """Tokenizer encode MB/s and token-cache build MB/s, or why they were skipped."""
    tokenizer_dir = Path(args.tokenizer)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return {"skipped": f"no tokenizer at {tokenizer_dir} (make one with `python train/train_tokenizer.py all`)"}
    from model.tokenizer import load_tokenizer
    from train.data import build_token_cache, iter_documents

    tokenizer = load_tokenizer(tokenizer_dir)
    limit = int(args.text_mb * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "pretrain.jsonl"
        data = Path(args.data)
        if data.is_file():
            # Whole lines of the user's corpus up to text_mb (a copy: the cache is written beside it).
            with open(data, "rb") as src, open(source, "wb") as dst:
                shutil.copyfileobj(_first_lines(src, limit), dst)
            if data.suffix == ".txt":
                source = source.rename(source.with_suffix(".txt"))
        else:
            words = "the quick brown fox jumps over a lazy dog while rivers run to the sea".split()
            with open(source, "w", encoding="utf-8") as dst:
                written, i = 0, 0
                while written < limit:
                    line = json.dumps({"text": " ".join(words[(i + j * 7) % len(words)] for j in range(200))}) + "\n"
                    dst.write(line)
                    written, i = written + len(line), i + 1
        docs = list(iter_documents(source))
        text_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
        encode_s = min(timed(lambda: tokenizer.encode_batch(docs), torch.device("cpu")) for _ in range(args.text_repeats))
        cache_s = timed(lambda: build_token_cache(source, tokenizer, verbose=False), torch.device("cpu"))
        return {"source": str(data if data.is_file() else "generated"), "text_mb": text_bytes / 1e6,
                "tokenizer_encode_mb_s": text_bytes / 1e6 / encode_s,
                "data_cache_build_mb_s": source.stat().st_size / 1e6 / cache_s}


def _first_lines(handle, limit: int):
    import io
    data = handle.read(limit)
    if len(data) == limit:
        data += handle.readline()
    return io.BytesIO(data)


# ---- the command -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--shape", default="issue", choices=sorted(SHAPES), help="model shape, batch and seq_len (default issue)")
    add("--batch-size", type=int, default=None, help="training sequences per step (default: the shape's)")
    add("--seq-len", type=int, default=None, help="training tokens per sequence (default: the shape's)")
    add("--steps", type=int, default=None, help="timed training steps of each (default 6; --quick 2)")
    add("--warmup", type=int, default=None, help="untimed training steps of each first (default 2; --quick 1)")
    add("--dtypes", default="fp32,bf16", help="comma-separated, of fp32 and bf16 (default both)")
    add("--prompt-len", type=int, default=32, help="decoding prompt tokens (default 32)")
    add("--new-tokens", type=int, default=None, help="tokens decoded per run (default 256; --quick 16)")
    add("--prefill-len", type=int, default=None, help="prefill tokens at batch 1 (default: --seq-len)")
    add("--decode-repeats", type=int, default=None, help="timed decoding runs of each (default 3; --quick 1)")
    add("--no-int8", dest="int8", action="store_false",
        help="leave out Etude's weight-only int8 decoding (CPU only; on by default there)")
    add("--decode-compile", action=argparse.BooleanOptionalAction, default=None,
        help="also time Etude's compiled decoding step (engine 'etude compiled'; default on, off with --quick)")
    add("--no-llama-cpp", dest="llama_cpp", action="store_false",
        help="leave out llama.cpp (timed by default when llama-cpp-python or --llama-bench is there)")
    add("--llama-bench", default=None, metavar="PATH",
        help="time llama.cpp with this llama-bench binary instead of llama-cpp-python")
    add("--tokenizer", default=str(TOKENIZER_DIR),
        help=f"tokenizer folder, for the text figures and the GGUF export (default {TOKENIZER_DIR})")
    add("--data", default=str(PRETRAIN_DATA),
        help=f"corpus for the tokenizer and cache figures; generated text if missing (default {PRETRAIN_DATA})")
    add("--text-mb", type=float, default=None, help="MB of it to tokenize (default 4; --quick 0.2)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; recorded)")
    add("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    add("--seed", type=int, default=0, help="seed for the weights and the inputs (default 0)")
    add("--compile", action="store_true",
        help="also time training with both models under torch.compile (rows '<dtype> compiled'; "
             "each compile takes tens of seconds on CPU)")
    add("--train-process", choices=("fresh", "same"), default=None,
        help="time each training dtype in a fresh process, as a real run is (default), or in this one "
             "(default with --quick)")
    add("--decode-only", action="store_true",
        help="time batch-1 decoding alone (no training, prefill, attention or text figures): the decode table")
    add("--quick", action="store_true", help="few steps and tokens: a smoke test, not a measurement")
    add("--json", default=str(Path(tempfile.gettempdir()) / "etude_benchmark.json"),
        help="where to write every figure as JSON (default <tmp>/etude_benchmark.json)")
    return parser


def resolve(args: argparse.Namespace) -> EtudeConfig:
    """Fill the defaults that depend on --shape / --quick; check everything, every problem at once."""
    shape = SHAPES[args.shape]
    quick = args.quick
    for name, full, short in (("steps", 6, 2), ("warmup", 2, 1), ("new_tokens", 256, 16), ("decode_repeats", 3, 1),
                              ("text_mb", 4.0, 0.2)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.train_process = args.train_process or ("same" if quick else "fresh")
    if args.decode_compile is None:
        args.decode_compile = not quick
    args.batch_size = args.batch_size or shape["batch_size"]
    args.seq_len = args.seq_len or shape["seq_len"]
    args.prefill_len = args.prefill_len or args.seq_len
    args.text_repeats = 1 if quick else 3
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    problems = [f"--{n.replace('_', '-')} must be positive, got {getattr(args, n)}"
                for n in ("batch_size", "seq_len", "steps", "prompt_len", "new_tokens", "prefill_len", "decode_repeats")
                if getattr(args, n) <= 0]
    if args.warmup < 0:
        problems.append(f"--warmup must be >= 0, got {args.warmup}")
    if args.text_mb <= 0:
        problems.append(f"--text-mb must be positive, got {args.text_mb}")
    if not args.dtypes or set(args.dtypes) - set(DTYPES):
        problems.append(f"--dtypes must name some of {sorted(DTYPES)}, got {args.dtypes}")
    if args.threads is not None and args.threads <= 0:
        problems.append(f"--threads must be positive, got {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    elif not (args.device == "cpu" or args.device.startswith("cuda")):
        problems.append(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if problems:
        raise ValueError("; ".join(problems))
    longest = max(args.seq_len + 1, args.prompt_len + args.new_tokens, args.prefill_len)
    model = dict(shape["model"])
    model["max_seq_len"] = max(model.get("max_seq_len", 0), longest)
    return EtudeConfig(**model)


def best_ratio(figures: dict, against: str = "transformers") -> float | None:
    """Etude's fastest mode (eager or compiled, any precision) over `against`'s fastest."""
    def best(names):
        speeds = [pair[n]["tokens_per_s"] for pair in figures.values() for n in names
                  if "tokens_per_s" in pair.get(n, {})]
        return max(speeds) if speeds else None
    ours, theirs = best(("etude", "etude compiled")), best((against,))
    return ours / theirs if ours and theirs else None


def llama_cpp_ratios(decode: dict) -> dict[str, float]:
    """Per precision: Etude's faster step (eager or compiled) over llama.cpp at the matching type."""
    out = {}
    for precision, engines in decode.items():
        theirs = engines.get("llama.cpp", {}).get("tokens_per_s")
        ours = max(engines[n]["tokens_per_s"] for n in ("etude", "etude compiled") if n in engines)
        if theirs:
            out[precision] = ours / theirs
    return out


def print_decode_table(decode: dict) -> None:
    """Batch-1 decoding per precision: tokens/s of every engine and its share of the bandwidth floor."""
    names = ["etude", "etude compiled", "transformers", "llama.cpp"]
    present = [n for n in names if any("tokens_per_s" in e.get(n, {}) for e in decode.values())]
    header = ["decode, batch 1", *[f"{n} tok/s (floor %)" for n in present], "floor tok/s", "llama.cpp / etude best"]
    rows = []
    for precision, engines in decode.items():
        cells = [precision]
        for name in present:
            figures = engines.get(name, {})
            cells.append(f"{figures['tokens_per_s']:,.1f} ({figures['share_of_floor']:.0%})" if "tokens_per_s" in figures
                         else "-")
        floor = next(iter(engines.values()))["floor_tokens_per_s"]
        best = max(engines[n]["tokens_per_s"] for n in ("etude", "etude compiled") if n in engines)
        theirs = engines.get("llama.cpp", {}).get("tokens_per_s")
        cells += [f"{floor:,.0f}", f"{theirs / best:.2f}x" if theirs else "-"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for precision, engines in decode.items():
        compiled = engines.get("etude compiled", {})
        if "first_call_s" in compiled:
            print(f"  {precision}: compiled step's first call (compilation) {compiled['first_call_s']:.1f} s; "
                  f"compiled greedy tokens = eager's: {compiled['compiled_tokens_equal_eager']}")
        if "skipped" in engines.get("llama.cpp", {}):
            print(f"  {precision}: llama.cpp skipped: {engines['llama.cpp']['skipped']}")


def ratio(figures: dict, dtype: str) -> float | None:
    if dtype not in figures:
        return None
    return figures[dtype]["etude"]["tokens_per_s"] / figures[dtype]["transformers"]["tokens_per_s"]


def print_table(report: dict) -> None:
    rows = []
    for what in ("train", "prefill"):
        for dtype, pair in report[what].items():
            etude, hf = pair["etude"], pair.get("transformers")
            extra = ""
            if what == "train":
                extra = f"MFU {etude['mfu']:.1%} vs {hf['mfu']:.1%}"
            elif what == "decode":
                extra = f"floor {etude['floor_ms_per_token']:.1f} ms/tok = {etude['floor_tokens_per_s']:,.0f} tok/s"
            rows.append((f"{what} {dtype}", f"{etude['tokens_per_s']:,.1f}", f"{hf['tokens_per_s']:,.1f}" if hf else "-",
                         f"{etude['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-", extra))
    for dtype, pair in report["attention"].items():
        if isinstance(pair, dict):  # ms, so the ratio is theirs over ours
            ours, sdpa = pair["etude"]["ms"], pair["transformers"]["ms"]
            rows.append((f"attention {dtype} (ms)", f"{ours:.1f}", f"{sdpa:.1f}", f"{sdpa / ours:.2f}x",
                         "forward + backward; transformers = torch SDPA"))
    header = ("tokens/s", "etude", "transformers", "ratio", "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    for row in [header] + rows:
        print("  ".join(cell.rjust(w) if i in (1, 2, 3) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    text = report["text"]
    if "skipped" in text:
        print(f"tokenizer / data cache: skipped ({text['skipped']})")
    else:
        print(f"tokenizer encode {text['tokenizer_encode_mb_s']:.2f} MB/s, data-cache build "
              f"{text['data_cache_build_mb_s']:.2f} MB/s ({text['text_mb']:.1f} MB of {text['source']})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve(args)
        import transformers
    except (ConfigError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    etude, hf = build_models(config, device, args.seed)
    params = etude.num_parameters()
    print(f"Etude vs transformers {transformers.__version__} LlamaForCausalLM, torch {torch.__version__}, "
          f"{device} ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    print(f"shape {args.shape}: {params / 1e6:.1f}M parameters, hidden {config.hidden_size}, {config.n_layers} layers, "
          f"{config.n_heads} heads / {config.n_kv_heads} kv, vocab {config.vocab_size}; train batch {args.batch_size} "
          f"x {args.seq_len}; decode prompt {args.prompt_len} + {args.new_tokens} new, greedy", flush=True)
    difference = logits_difference(etude, hf, config, device)

    tokens = args.batch_size * args.seq_len
    shapes = [(tokens, config.hidden_size, config.intermediate_size), (tokens, config.intermediate_size, config.hidden_size),
              ] + ([] if args.quick else [(1024, 1024, 1024)])
    ceilings = {} if args.decode_only else {
        d: matmul_ceiling(device, DTYPES[d], shapes, 2 if args.quick else 4) for d in args.dtypes}
    peaks = {}
    if device.type == "cuda":
        from train.trainer import peak_flops  # datasheet bf16 peaks of known GPUs
        peak, source = peak_flops(device, torch.bfloat16)
        if "datasheet" in source and "bf16" in args.dtypes:
            peaks["bf16"] = (peak, source)
    bandwidth = copy_bandwidth(device, 64 if args.quick else 256, 3 if args.quick else 5)
    print("matmul ceiling " + ", ".join(f"{d} {c / 1e12:.2f} TFLOP/s" for d, c in ceilings.items())
          + f"; copy bandwidth {bandwidth / 1e9:.1f} GB/s; same weights: max |logit diff| {difference:.2e}", flush=True)

    train = {} if args.decode_only else measure_training(etude, hf, config, args, device, ceilings, peaks)
    decode, prefill, outputs = measure_decoding(etude, hf, config, args, device, bandwidth)
    attention = {} if args.decode_only else measure_attention(config, args, device)
    text = {"skipped": "--decode-only"} if args.decode_only else measure_text(args)
    same_tokens = {d: sum(a == b for a, b in zip(*o.values())) / max(len(o["etude"]), 1)
                   for d, o in outputs.items()}
    report = {
        "train_speedup_bf16": ratio(train, "bf16"), "train_speedup_fp32": ratio(train, "fp32"),
        # With --compile: compiled Etude over compiled transformers, and over eager transformers.
        **{f"train_speedup_{d}_compiled": ratio(train, f"{d} compiled") for d in args.dtypes if args.compile},
        **{f"train_speedup_{d}_compiled_vs_eager": train[f"{d} compiled"]["etude"]["tokens_per_s"]
           / train[d]["transformers"]["tokens_per_s"] for d in args.dtypes if args.compile},
        "decode_speedup": best_ratio(decode), "decode_speedup_fp32": ratio(decode, "fp32"),
        "decode_vs_llama_cpp": llama_cpp_ratios(decode),
        "decode_speedup_bf16": ratio(decode, "bf16"),
        "prefill_speedup": ratio(prefill, "fp32") or ratio(prefill, "bf16"),
        "tokenizer_encode_mb_s": text.get("tokenizer_encode_mb_s"),
        "data_cache_build_mb_s": text.get("data_cache_build_mb_s"),
        "shape": args.shape, "model": config.to_dict(), "parameters": params, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "prefill_len": args.prefill_len, "threads": torch.get_num_threads(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "transformers": transformers.__version__, "quick": args.quick,
        "steps": args.steps, "warmup": args.warmup, "train_process": args.train_process, "decode_repeats": args.decode_repeats,
        "matmul_ceiling_flops": ceilings, "copy_bandwidth_bytes_per_s": bandwidth,
        "logits_max_abs_diff": difference, "greedy_tokens_agree": same_tokens,
        "train": train, "decode": decode, "prefill": prefill, "attention": attention, "text": text,
    }
    print_table(report)
    print_decode_table(report["decode"])
    if args.compile:
        print("compiled training: " + ", ".join(
            f"{d}: Etude compiled {report[f'train_speedup_{d}_compiled']:.2f}x transformers compiled, "
            f"{report[f'train_speedup_{d}_compiled_vs_eager']:.2f}x transformers eager" for d in args.dtypes))
    print(f"headline: training {report['train_speedup_fp32'] or 0:.2f}x (fp32), {report['train_speedup_bf16'] or 0:.2f}x "
          f"(bf16); decoding {report['decode_speedup']:.2f}x (fastest against fastest); share of greedy tokens "
          f"agreeing with transformers' (int8: with fp32 Etude's) {same_tokens}")
    if "int8" in decode:
        # Untrained weights give nearly flat logits, so one int8 rounding can flip the first
        # greedy token and every token after it; the logit error says how large the rounding is.
        print(f"int8 logits: max error {decode['int8']['etude']['max_logit_error_relative']:.2%} of the largest "
              "logit (greedy agreement on untrained weights is fragile)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
