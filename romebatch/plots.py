"""Pictures: rich heatmaps of causal traces for the terminal, and PNG files (traces, curves)
written so that a bad name fails before any work and a failed write leaves no half a PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import UserError, escape_controls

TITLES = {"hidden": "single hidden state", "mlp": "MLP output (window)", "attn": "attention output (window)"}
_SHADES = " ░▒▓█"


def render_trace(console, result) -> None:
    """One block-character heatmap per kind: tokens down, layers across, subject tokens starred."""
    from .report import safe

    console.print(
        f"[bold]{safe(repr(result.prompt))}[/] → {safe(repr(result.answer))}: P clean {result.p_clean:.3f}, "
        f"corrupted {result.p_corrupt:.3f}"
    )
    for kind, grid in result.scores.items():
        effect = grid - result.p_corrupt
        top = np.nanmax(np.abs(effect)) or 1.0
        console.print(f"[bold]{TITLES[kind]}[/]  (indirect effect; darkest = {top:.3f})")
        width = max(len(repr(t)) for t in result.tokens)
        for t, token in enumerate(result.tokens):
            star = "*" if result.subject_tokens[0] <= t <= result.subject_tokens[1] else " "
            cells = "".join(
                _SHADES[int(np.clip(v / top, 0, 1) * (len(_SHADES) - 1))] * 2 if not np.isnan(v) else "  "
                for v in effect[t]
            )
            console.print(f"{star}{repr(token):>{width}} {cells}", highlight=False, markup=False)
        console.print(f"{'':>{width + 1}} layers 0..{grid.shape[1] - 1} →", highlight=False)


def check_png_path(path: str | Path, option: str = "--out") -> Path:
    """Refuse a PNG file name that cannot be written, before any work: one line, exit code 2."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{option} {path}: give a .png file name")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} " + ("is not a folder" if parent.exists() else "does not exist"))
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a .png file name")
    if path.exists() and not path.is_file():
        raise UserError(f"{option} {path}: exists and is not a regular file")
    return path


def figure_text(text: object) -> str:
    """A user string as matplotlib draws it literally: controls escaped, `$` not read as mathtext."""
    return escape_controls(str(text)).replace("$", r"\$")


def save_figure(fig, path: str | Path, option: str = "--out") -> Path:
    """Write `fig` as a PNG beside `path` and rename it into place: a failure leaves the old file
    (or none), never half a PNG. The figure is closed either way."""
    import matplotlib.pyplot as plt

    path = check_png_path(path, option)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fig.savefig(staging, dpi=110, format="png")
        os.replace(staging, path)
    except OSError as error:
        raise UserError(
            f"{option} {path}: could not write it ({error.strerror or error})",
            hint="free some space (or fix the permissions) and run it again",
        ) from None
    finally:
        plt.close(fig)
        staging.unlink(missing_ok=True)
    return path


def save_trace_png(result, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    kinds = list(result.scores)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.35 * len(result.tokens) + 1.6), squeeze=False)
    labels = [
        f"{t!r}*" if result.subject_tokens[0] <= i <= result.subject_tokens[1] else repr(t)
        for i, t in enumerate(result.tokens)
    ]
    cmaps = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
    for ax, kind in zip(axes[0], kinds):
        image = ax.imshow(
            result.scores[kind],
            aspect="auto",
            cmap=cmaps.get(kind, "viridis"),
            vmin=min(result.p_corrupt, np.nanmin(result.scores[kind])),
        )
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_title(f"{TITLES[kind]}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05, label=f"P({result.answer!r})")
    fig.suptitle(figure_text(f"{result.prompt} → {result.answer}"), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_average_png(effect: np.ndarray, layer: int, facts: int, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(effect)), effect, color=["tab:green" if i == layer else "tab:gray" for i in range(len(effect))])
    ax.set_xlabel("layer")
    ax.set_ylabel("indirect effect")
    title = (
        figure_text(title) if title else f"MLP at the subject's last token, mean of {facts} facts (best: layer {layer})"
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
