"""The report card: report.md with the results table, chance baselines, what each task measures,
each model's size and training tokens, and two PNG plots (task scores per model; training curves
of loss, validation bits per byte and learning rate from each folder's metrics.jsonl)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

CURVES = (("loss", "training loss"), ("val_bpb", "validation bits per byte (each run's own data)"), ("lr", "learning rate"))


def read_metrics(folder: Path) -> list[dict]:
    """The records of a folder's metrics.jsonl ([] when there is none; unreadable lines are skipped
    with a count in the report, since a killed run can leave half a line)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def training_tokens(folder: Path) -> int | None:
    """Tokens the run that wrote the folder trained on (its trainer state), None when unknown."""
    try:
        state = json.loads((folder / "checkpoint" / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state["tokens_seen"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def plot_scores(results: dict, tasks: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m["name"] for m in results["models"]]
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        metric = task.main_metric
        values = [results["results"][m][task.name][metric] for m in models]
        ax.bar(range(len(models)), values, color=[f"C{i}" for i in range(len(models))])
        if task.chance is not None:
            ax.axhline(task.chance, color="black", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=7)
        ax.set_ylim(bottom=0, top=None if any(values) or task.chance else 1)
        ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=7)
        ax.set_title(f"{task.name}: {metric}" + (" (lower better)" if metric == "bpb" else ""), fontsize=9)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(histories: dict[str, list[dict]], path: Path) -> bool:
    """Training curves of every folder that has metrics; False (nothing written) when none has."""
    histories = {name: records for name, records in histories.items() if records}
    if not histories:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.4))
    for ax, (key, title) in zip(axes, CURVES):
        for i, (name, records) in enumerate(histories.items()):
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=name, color=f"C{i}", marker="o" if key == "val_bpb" else None,
                        markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if key == "loss":
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out_dir: Path, results: dict, tasks: list, table_markdown: str) -> Path:
    """Write report.md, scores.png and (when any folder has metrics.jsonl) curves.png; return report.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    histories = {m["name"]: read_metrics(Path(m["path"])) for m in results["models"]}
    plot_scores(results, tasks, out_dir / "scores.png")
    has_curves = plot_curves(histories, out_dir / "curves.png")

    lines = ["# Etude evaluation report", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by "
             "`python tool/evaluate.py`.", "", "## Results", "",
             "Higher is better except bits per byte. `chance` is the score of guessing uniformly at random "
             "(a dash: no such baseline — an exact answer cannot be guessed).", "", table_markdown, "",
             "![task scores](scores.png)", "", "## Models", "",
             "| model | folder | parameters | training tokens | training steps logged |", "|---|---|---|---|---|"]
    for model in results["models"]:
        folder = Path(model["path"])
        steps = max((r["step"] for r in histories[model["name"]]), default=None)
        lines.append(f"| {model['name']} | `{folder}` | {_human(model['parameters'])} | "
                     f"{_human(training_tokens(folder))} | {steps if steps is not None else '-'} |")
    lines += ["", "Training tokens come from the run's `checkpoint/trainer_state.json` (a LoRA folder counts "
              "only its own fine-tuning); a Hugging Face folder does not record them.", ""]
    if has_curves:
        lines += ["## Training curves", "", "From each folder's `metrics.jsonl`.", "", "![training curves](curves.png)", ""]
    lines += ["## Tasks", "", "| task | kind | examples from | what it measures | chance |", "|---|---|---|---|---|"]
    for task in tasks:
        chance = "-" if task.chance is None else f"{task.chance:.4f}"
        lines.append(f"| {task.name} | {task.kind} | `{task.source}` | {task.measures} | {chance} |")
    lines += ["", "Multiple-choice `acc`: the choice with the highest summed log-likelihood; `acc_norm`: the "
              "highest log-likelihood per character of the choice (lm-evaluation-harness's definitions, "
              "checked against lm-eval itself in tests/test_evaluate.py).", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
