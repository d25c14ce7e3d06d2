"""What `export` writes beside the weights: the weights in a chosen dtype, and a model card.

A Hugging Face model folder carries a `README.md` saying what the model is and how it was
made; an exported romebatch model is a base model plus N journaled edits, so its card
names the base, the journal and its head, the number of edits and the edited facts.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
CARD_FACTS = 50  # facts listed in the card; romebatch.json lists every edit


def save_weights(model, folder: Path, dtype: str | None) -> str:
    """`model.save_pretrained(folder)`, cast to `dtype` on the way out; returns the dtype written.

    The cast happens on a copy of each tensor: the model in memory keeps its exact weights.
    """
    import torch

    held = str(next(model.parameters()).dtype).removeprefix("torch.")
    if dtype is None or dtype == held:
        model.save_pretrained(folder)
        return held
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    target = getattr(torch, dtype)
    # Tied weights (an LM head sharing the embedding) must stay one tensor after the cast, or
    # save_pretrained writes them twice: cast each storage once.
    cast: dict[tuple, torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            state[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in cast:
            cast[key] = tensor.detach().to(target)
        state[name] = cast[key]
    model.save_pretrained(folder, state_dict=state)
    config = folder / "config.json"
    data = json.loads(config.read_text())
    data["dtype"] = dtype  # what transformers 5 reads; older versions wrote "torch_dtype"
    if "torch_dtype" in data:
        data["torch_dtype"] = dtype
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return dtype


def model_card(provenance: dict, name: str) -> str:
    """The folder's README.md, from the export's provenance (romebatch.json)."""
    edits = provenance["edits"]
    facts = {}
    for edit in edits:  # a repaired fact has several edits: list it once, with its last one
        facts[edit["fact_hash"]] = edit
    base = provenance["base_model"]
    layers = sorted({e["layer"] for e in edits})
    hub_id = (
        isinstance(base, str)
        and base.count("/") == 1
        and not base.startswith((".", "/", "embedded:"))
        and not Path(base).exists()
    )
    lines = ["---", "library_name: transformers", "tags:", "- romebatch", "- rome", "- model-editing"]
    if hub_id:
        lines.append(f"base_model: {base}")
    lines += [
        "---",
        "",
        f"# {name}",
        "",
        f"`{base}` with {len(edits)} [ROME](https://arxiv.org/abs/2202.05262) rank-one edit(s) of "
        f"{len(facts)} fact(s), made by romebatch {provenance['romebatch']}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{base}` (weights {provenance['base_hash'][:19]}…) |",
        f"| journal | `{provenance['journal']}`, head {provenance['head']} |",
        f"| edits on the head's path | {len(edits)} (layer{'s' if len(layers) > 1 else ''} "
        f"{', '.join(map(str, layers)) or '-'}) |",
        f"| weights | {provenance.get('dtype', 'float32')} |",
        "",
        "Each edit changes one MLP down-projection by a rank-one update so that the prompt (with its "
        "subject) completes to the new object. The exact state can be rebuilt, checked or rolled back "
        "from the journal (`romebatch check`, `romebatch rollback`); `romebatch.json` in this folder "
        "lists every edit with its weight hash.",
        "",
        "Made with:",
        "",
        "```bash",
        f"romebatch export {name} --journal {provenance['journal']}"
        + (f" --dtype {provenance['dtype']}" if provenance.get("dtype") not in (None, "float32") else ""),
        "```",
        "",
    ]
    if facts:
        shown = list(facts.values())[:CARD_FACTS]
        lines += [
            f"## Edited facts ({len(facts)})" + (f", the first {len(shown)}" if len(facts) > len(shown) else ""),
            "",
            "| id | prompt | new object |",
            "| --- | --- | --- |",
        ]
        for e in shown:
            prompt = e["prompt"].replace("{}", e["subject"], 1)
            lines.append(f"| {_cell(e['fact_id'])} | {_cell(prompt)} | {_cell(e['target_new'])} |")
        lines.append("")
    lines += [
        "## Limits",
        "",
        "ROME edits what a prompt about the subject completes to; related facts, other phrasings and "
        "other languages may still give the old answer, and many edits slowly wear on unrelated "
        "prompts (`romebatch verify` measures both on the journal).",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text in a markdown table cell: pipes and line breaks would end it."""
    return text.replace("|", "\\|").replace("\n", " ")
