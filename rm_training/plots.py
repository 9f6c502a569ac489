"""Loss and held-out accuracy / margin curves from a Trainer's log history, as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def curves(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """name -> [(step, value)], for the quantities the plot shows."""
    keys = {
        "train_loss": "loss",
        "train_accuracy": "accuracy",
        "eval_loss": "eval_loss",
        "eval_accuracy": "eval_accuracy",
        "eval_margin": "eval_margin",
    }
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in keys}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for name, key in keys.items():
            if key in entry and isinstance(entry[key], (int, float)):
                out[name].append((float(step), float(entry[key])))
    return out


def plot_curves(log_history: list[dict[str, Any]], path: str | Path, title: str = "ARM training") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(log_history)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("train_loss", "-"), ("eval_loss", "o-")):
        if data[name]:
            xs, ys = zip(*data[name], strict=True)
            ax_loss.plot(xs, ys, style, label=name.replace("_", " "), markersize=4)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss  -log sigmoid(beta_r * margin)")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    for name, style in (("train_accuracy", "-"), ("eval_accuracy", "o-")):
        if data[name]:
            xs, ys = zip(*data[name], strict=True)
            ax_acc.plot(xs, ys, style, label=name.replace("_", " "), markersize=4)
    ax_acc.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_xlabel("optimizer step")
    ax_acc.set_ylabel("pairwise accuracy  r(chosen) > r(rejected)")
    ax_acc.set_title("accuracy and held-out margin")
    ax_acc.grid(alpha=0.3)
    lines, labels = ax_acc.get_legend_handles_labels()
    if data["eval_margin"]:
        ax_margin = ax_acc.twinx()
        xs, ys = zip(*data["eval_margin"], strict=True)
        lines += ax_margin.plot(xs, ys, "s--", color="tab:green", markersize=4)
        labels.append("eval margin (nats)")
        ax_margin.set_ylabel("mean r(chosen) - r(rejected)")
    if lines:
        ax_acc.legend(lines, labels, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
