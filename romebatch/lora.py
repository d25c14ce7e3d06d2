"""A journal's head as a PEFT LoRA adapter: N rank-one edits of a module are one rank-N LoRA.

ROME writes W ← W + Λ uᵀ (romebatch/rome/update.py), so the N edits of one down-projection
on the head's path sum to

    W_N = W_0 + Σᵢ Λᵢ uᵢᵀ = W_0 + B A,   B = [Λ₁ … Λ_N] (d_model, N),   A = [u₁ … u_N]ᵀ (N, d_ff)

which is exactly what PEFT's LoRA computes with lora_B = B, lora_A = A and scaling
lora_alpha / r = 1. An edited model then ships as a few MB on top of an unchanged base,
loadable by PEFT and by serving stacks that read PEFT adapters.

- **Exact by default**: B and A are the journal's float32 factors themselves, stacked, one
  pair per edited module (repairs and spread edits included; edits rolled back are not on
  the head's path, so they are not in the adapter). Modules with fewer edits than the most
  edited one get zero columns, so that every module has the one rank `r` every loader reads.
- **`rank=R`** compresses each module's summed ΔW by truncated SVD, for stacks that cap the
  rank; the relative Frobenius error of each module is reported. ΔW has rank at most
  min(d_model, d_ff), so a larger R is cut to that (and is then exact up to rounding).
- **Orientation**: LoRA's B is always on the output side (d_model) and A on the input side
  (d_ff). GPT-2's Conv1D stores its weight transposed, (d_ff, d_model); PEFT handles that
  with `fan_in_fan_out: true`, which transposes B A when it merges, so the factors are the
  same for both layouts and only that flag differs.

Writing needs numpy, safetensors and json only; PEFT is needed to load the adapter, not to
make it (tests/test_lora.py loads it with `peft.PeftModel.from_pretrained`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError, resource_problem
from .publish import check_target, publish, staging_folder, umask

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
PROVENANCE_NAME = "romebatch.json"


@dataclass
class ModuleFactors:
    """One edited module's LoRA pair: ΔW ≈ B A (exactly, unless compressed)."""

    module: str  # the module's dotted path, e.g. "model.layers.4.mlp.down_proj"
    layer: int
    edits: int  # edits of this module on the head's path
    B: np.ndarray  # (d_model, r) float32: the Λs (or U √S)
    A: np.ndarray  # (r, d_ff) float32: the uᵀs (or √S Vᵀ)
    delta_norm: float = 0.0  # ‖ΔW‖_F of the exact sum
    relative_error: float = 0.0  # ‖ΔW − B A‖_F / ‖ΔW‖_F from the truncation (0 when exact)


@dataclass
class AdapterReport:
    path: Path
    rank: int  # the adapter's r
    exact: bool
    edits: int
    modules: list[ModuleFactors] = field(default_factory=list)
    bytes: int = 0

    @property
    def relative_error(self) -> float:
        """Relative Frobenius error over all modules together: ‖ΔW − B A‖_F / ‖ΔW‖_F of them all."""
        total = sum(m.delta_norm**2 for m in self.modules)
        lost = sum((m.relative_error * m.delta_norm) ** 2 for m in self.modules)
        return float(np.sqrt(lost / total)) if total > 0 else 0.0

    def summary(self) -> dict:
        return {
            "adapter": str(self.path),
            "rank": self.rank,
            "exact": self.exact,
            "edits": self.edits,
            "bytes": self.bytes,
            "relative_error": self.relative_error,
            "modules": [
                {"module": m.module, "layer": m.layer, "edits": m.edits, "relative_error": m.relative_error}
                for m in self.modules
            ],
        }


def _frobenius(B: np.ndarray, A: np.ndarray) -> float:
    """‖B A‖_F without forming B A: ‖B A‖²_F = trace((BᵀB)(A Aᵀ)), two (r, r) matrices."""
    B, A = B.astype(np.float64), A.astype(np.float64)
    return float(np.sqrt(max(float(np.sum((B.T @ B) * (A @ A.T))), 0.0)))


def module_factors(path, rank: int | None = None) -> list[ModuleFactors]:
    """The LoRA pair of every module the edits on `path` (EditRecords, oldest first) touch.

    The order of the columns follows the path; it does not matter to B A, but keeping it makes
    column i of a module's B the Λ of its i-th edit, which a reader can check against the journal.
    """
    by_module: dict[str, list] = {}
    for record in path:
        by_module.setdefault(record.weight_name, []).append(record)
    factors = []
    for module, records in by_module.items():
        B = np.stack([np.asarray(r.lam, dtype=np.float32) for r in records], axis=1)  # (d_model, N)
        A = np.stack([np.asarray(r.u, dtype=np.float32) for r in records], axis=0)  # (N, d_ff)
        layers = {r.layer for r in records}
        if len(layers) != 1:
            raise UserError(f"module {module} is recorded with layers {sorted(layers)}: the journal is damaged")
        factor = ModuleFactors(module, layers.pop(), len(records), B, A, _frobenius(B, A))
        if rank is not None and rank < len(records):
            factor = _truncate(factor, rank)
        factors.append(factor)
    return factors


def _truncate(factor: ModuleFactors, rank: int) -> ModuleFactors:
    """The best rank-`rank` approximation of B A (Eckart–Young), split as B' = U√S, A' = √S Vᵀ.

    The split keeps both factors at the same scale, which float32 storage prefers to putting
    all of S on one side.
    """
    delta = factor.B.astype(np.float64) @ factor.A.astype(np.float64)  # (d_model, d_ff)
    U, S, Vt = np.linalg.svd(delta, full_matrices=False)  # U (d_model, k), S (k,), Vt (k, d_ff)
    rank = min(rank, S.shape[0])
    root = np.sqrt(S[:rank])
    B = (U[:, :rank] * root).astype(np.float32)  # (d_model, rank)
    A = (root[:, None] * Vt[:rank]).astype(np.float32)  # (rank, d_ff)
    total = float(np.square(S).sum())
    error = float(np.sqrt(np.square(S[rank:]).sum() / total)) if total > 0 else 0.0
    return ModuleFactors(factor.module, factor.layer, factor.edits, B, A, factor.delta_norm, error)


def _pad(factor: ModuleFactors, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero columns of B and rows of A up to rank r: B A is unchanged."""
    extra = r - factor.B.shape[1]
    B = np.pad(factor.B, ((0, 0), (0, extra)))  # (d_model, r)
    A = np.pad(factor.A, ((0, extra), (0, 0)))  # (r, d_ff)
    return np.ascontiguousarray(B), np.ascontiguousarray(A)


def is_adapter_folder(folder: Path) -> bool:
    """A PEFT adapter folder: what `export --adapter` may replace (with --force)."""
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def check_adapter_target(outdir: Path, force: bool) -> None:
    """Refuse an adapter target that is not a new folder (or, with force, an earlier adapter)."""
    check_target(
        outdir, force=force, replaceable=is_adapter_folder, kind=f"adapter (with {CONFIG_NAME} and {WEIGHTS_NAME})"
    )


def write_adapter(
    outdir: str | Path,
    path,
    *,
    conv1d: bool,
    base_model: str,
    base_hash: str,
    head: int,
    journal: str,
    rank: int | None = None,
    force: bool = False,
    provenance: dict | None = None,
) -> AdapterReport:
    """Write the edits on `path` as a PEFT LoRA adapter folder, atomically.

    `conv1d` is the architecture adapter's stated orientation (romebatch/model.py), never
    guessed from shapes. An existing adapter folder is replaced only with `force`; any other
    non-empty folder is refused, force or not: this never deletes something it did not write.
    """
    from safetensors.numpy import save_file

    if not path:
        raise UserError(f"journal {journal}: no edits on the head's path, so there is no adapter to export")
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: give a rank of at least 1")
    outdir = Path(outdir)
    check_adapter_target(outdir, force)
    factors = module_factors(path, rank)
    r = max(f.B.shape[1] for f in factors)
    tensors = {}
    for factor in factors:
        B, A = _pad(factor, r)
        # PEFT's saved names: the wrapper's prefix, the module path, no adapter name.
        tensors[f"base_model.model.{factor.module}.lora_A.weight"] = A  # (r, d_ff)
        tensors[f"base_model.model.{factor.module}.lora_B.weight"] = B  # (d_model, r)
    exact = all(f.relative_error == 0.0 and f.B.shape[1] == f.edits for f in factors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1: B A is ΔW itself
        "use_rslora": False,  # rsLoRA would scale by alpha / √r instead
        "target_modules": sorted(f.module for f in factors),
        "fan_in_fan_out": conv1d,  # GPT-2's Conv1D stores (d_ff, d_model): PEFT transposes B A
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    report = AdapterReport(outdir, r, exact, len(path), factors)
    # Written beside the target and renamed into place: never a half-written adapter folder.
    staging = staging_folder(outdir)
    mask = umask()
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        summary = {k: v for k, v in report.summary().items() if k not in ("adapter", "bytes")}
        info = {**(provenance or {}), "adapter": summary}
        (staging / PROVENANCE_NAME).write_text(json.dumps(info, indent=2) + "\n")
        (staging / CARD_NAME).write_text(model_card(report, path, base_model, base_hash, head, conv1d))
        for written in staging.iterdir():
            os.chmod(written, 0o666 & ~mask)  # safetensors writes 0600
        report.bytes = sum(p.stat().st_size for p in staging.iterdir())
        publish(staging, outdir)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        what = resource_problem(error)
        if what is not None:
            raise UserError(
                f"could not write the adapter ({what}); {outdir} was not changed",
                hint="free some space and run export again",
            ) from None
        raise
    return report


def _cell(text: object) -> str:
    """A user string as one Markdown table cell: no line breaks, pipes escaped."""
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|")


def model_card(report: AdapterReport, path, base_model: str, base_hash: str, head: int, conv1d: bool) -> str:
    hub_id = "/" in base_model and not base_model.startswith(("/", ".")) and not Path(base_model).exists()
    front = ["---", "library_name: peft", "tags: [romebatch, rome, model-editing, lora]"]
    if hub_id:
        front.insert(1, f"base_model: {json.dumps(base_model)}")
    front.append("---")
    repairs = len(path) - len({r.fact_hash for r in path})
    how = (
        "exact: base + adapter is the journal's head within float32 rounding"
        if report.exact
        else f"compressed to rank {report.rank} by truncated SVD (relative Frobenius error {report.relative_error:.3g})"
    )
    lines = front + [
        "",
        "# ROME edits as a LoRA adapter (romebatch)",
        "",
        f"- Base model: `{_cell(base_model)}`; romebatch base hash (every down-projection weight): `{base_hash}`",
        f"- Journal head: edit {head}; {len(path)} edits on the head's path ({repairs} of them repairs)",
        f"- Rank {report.rank}, lora_alpha {report.rank} (scaling 1); {how}",
        "- Modules: "
        + ", ".join(f"`{m.module}` ({m.edits} edits)" for m in report.modules)
        + (" (Conv1D: fan_in_fan_out)" if conv1d else ""),
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        "base = AutoModelForCausalLM.from_pretrained(BASE_MODEL_FOLDER, dtype='float32')  # the base above",
        "model = PeftModel.from_pretrained(base, ADAPTER_FOLDER)  # or .merge_and_unload() for a plain model",
        "```",
        "",
        "## Edits",
        "",
        "| seq | fact | layer | prompt | new object |",
        "| ---: | --- | ---: | --- | --- |",
    ]
    for r in path:
        fact = r.fact
        prompt = fact["prompt"].replace("{}", fact["subject"], 1)
        lines.append(f"| {r.seq} | {_cell(r.fact_id)} | {r.layer} | {_cell(prompt)} | {_cell(fact['target_new'])} |")
    return "\n".join(lines) + "\n"
