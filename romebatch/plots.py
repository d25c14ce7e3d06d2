"""Pictures of causal traces: rich heatmaps for the terminal, matplotlib PNGs for files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
    fig.suptitle(f"{result.prompt} → {result.answer}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def save_average_png(effect: np.ndarray, layer: int, facts: int, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(effect)), effect, color=["tab:green" if i == layer else "tab:gray" for i in range(len(effect))])
    ax.set_xlabel("layer")
    ax.set_ylabel("indirect effect")
    ax.set_title(title or f"MLP at the subject's last token, mean of {facts} facts (best: layer {layer})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
