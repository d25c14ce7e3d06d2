"""The value v*: what the edited layer must output at k* (ROME §3.1, eq. 4).

δ is added to the down-projection's output at the subject's last token of every prompt and
optimised with Adam on

    mean over the N prompts of the target's mean token NLL
  + kl_factor · KL(p_δ ‖ p_0) of the next-token distribution after "{subject} is a"
  + v_weight_decay · ‖δ‖ / ‖v_init‖²          (the original code's penalty, kept as published)

with early stopping once the NLL (or, as the original code, the whole loss: `stop_on`)
falls below `loss_stop`, and δ projected into the ball of radius
`clamp_norm_factor · ‖v_init‖` after every step. v* = v_init + δ, where v_init is the
layer's current output for the averaged key k*: so v* − W k* is exactly δ, and the update
uses the same key everywhere (the original code's mixed-key defect cannot arise).

Two ways to run the same objective (`engine`):

- "cached" (the default): δ only changes what happens at and after each row's subject
  token, so every token before it is identical at every step. Those tokens are run once,
  their attention keys and values kept in a cache, and each step runs only the tokens from
  the subject's last one onwards (a third of the batch on CounterFact prompts). The LM head
  runs only at the positions the loss reads, and on the CPU in one pass (head.py).
- "exact": the plain way, as the original code: every step runs every token through every
  layer and computes logits at every position. Kept to show the cached engine computes the
  same thing (`--exact-protocol`, benchmarks/speed.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..hooks import Hook, attach
from ..lm import answer_ids, as_btd, logits, make_batch, model_inputs, subject_last_index
from ..model import LoadedModel
from .head import Reads, one_pass_reads, reads_from_logits

ESSENCE_TEMPLATE = "{} is a"
ENGINES = ("cached", "exact")


@dataclass
class ValueResult:
    v_star: torch.Tensor  # (d_model,) float32: the value W must give k* after the edit
    steps: int  # Adam steps taken (early stopping makes this < v_steps)
    loss: float  # final total loss
    nll: float  # final mean target NLL over the prompts
    share: float = 1.0  # the share of the optimised δ kept (`shrink`): v* = v_init + share · δ


@dataclass
class Rows:
    """The optimisation batch as token lists: N rewrite prompts, the bare prompt followed by
    the true object (only when MPES compares the two), then the essence prompt."""

    sequences: list[list[int]]
    subject_index: list[int]  # the subject's last token in each sequence
    # Logits are read at (read_rows[i], read_cols[i]): the N·m rewrite reads, then the true
    # object's reads (none unless compared), the essence read last.
    read_rows: list[int]
    read_cols: list[int]
    targets: list[int]  # the target token read at each rewrite position
    n_prompts: int
    answer_len: int
    true_targets: list[int] = field(default_factory=list)  # the true object's tokens after the bare prompt


def build_rows(
    lm: LoadedModel, template: str, subject: str, target: str, prefixes: list[str], true_target: str | None = None
) -> Rows:
    tok = lm.tokenizer
    prompt_text = template.replace("{}", subject, 1)
    target_ids = answer_ids(tok, prompt_text, target)
    m = len(target_ids)
    sequences: list[list[int]] = []
    lookups: list[int] = []
    read_rows: list[int] = []
    read_cols: list[int] = []
    targets: list[int] = []
    # Rewrite prompts: prefix + prompt + all target tokens but the last (teacher forcing).
    for prefix in ["", *prefixes]:
        encoded, subject_index = subject_last_index(tok, template, subject, prefix)
        row = len(sequences)
        sequences.append(encoded.ids + target_ids[:-1])
        lookups.append(subject_index)
        for j in range(m):  # logits at column n-1+j predict target token j
            read_rows.append(row)
            read_cols.append(len(encoded.ids) - 1 + j)
            targets.append(target_ids[j])
    n_prompts = len(sequences)
    true_ids: list[int] = []
    if true_target is not None:
        # The bare prompt (row 0) again, teacher-forced on the true object: efficacy compares
        # the two answers' length-normalised probabilities on this prompt.
        true_ids = answer_ids(tok, prompt_text, true_target)
        bare = sequences[0][: len(sequences[0]) - (m - 1)]
        sequences.append(bare + true_ids[:-1])
        lookups.append(lookups[0])
        for j in range(len(true_ids)):
            read_rows.append(n_prompts)
            read_cols.append(len(bare) - 1 + j)
    essence, essence_index = subject_last_index(tok, ESSENCE_TEMPLATE, subject)
    read_rows.append(len(sequences))
    read_cols.append(len(essence.ids) - 1)
    sequences.append(essence.ids)
    lookups.append(essence_index)
    return Rows(sequences, lookups, read_rows, read_cols, targets, n_prompts, m, true_ids)


class Takes:
    """MPES's criterion on one forward pass's reads (`head.Reads` at the reads of `Rows`): does
    the edit already take? The target's first token is the argmax on every rewrite prompt and,
    when the rows carry the true object, the target's length-normalised probability beats
    the true object's on the bare prompt, as efficacy and the repair pass read an edit. The
    first token alone (ENCORE's check) lets a multi-token true object keep the lead: an
    edit MPES calls done that efficacy calls failed, and that a repair cannot move, since
    MPES then stops it at step 0."""

    def __init__(self, rows: Rows, device):
        self.targets = torch.tensor(rows.targets, device=device)
        self.first = torch.arange(rows.n_prompts, device=device) * rows.answer_len  # each prompt's token-0 read
        self.m = rows.answer_len
        self.reads = len(rows.targets)
        self.n_true = len(rows.true_targets)

    def __call__(self, reads: Reads) -> bool:
        if not bool((reads.argmax[self.first] == self.targets[self.first]).all()):
            return False
        if not self.n_true:
            return True
        new_nll = -reads.target_logp[: self.m].mean()  # row 0: the bare prompt
        true_nll = -reads.target_logp[self.reads : self.reads + self.n_true].mean()
        return bool(new_nll < true_nll)


def read_targets(rows: Rows, device) -> torch.Tensor:
    """The token each read scores: the target's at the rewrite reads, the true object's at its
    reads, and a placeholder (0) at the essence read, which only the KL uses."""
    return torch.tensor([*rows.targets, *rows.true_targets, 0], dtype=torch.long, device=device)


# A forward pass of the optimisation batch: δ in, logits (or the LM head's inputs) at the reads out.
Forward = Callable[[torch.Tensor | None], torch.Tensor]


def exact_forward(lm: LoadedModel, layer: int, rows: Rows) -> Forward:
    """All tokens, all layers and full logits at every step: the original protocol's cost."""
    device = lm.device
    batch = make_batch(rows.sequences, lm.pad_id, device=device)
    lookup_rows = torch.arange(len(rows.sequences), device=device)
    lookup_cols = batch.offsets + torch.tensor(rows.subject_index, device=device)
    read_rows = torch.tensor(rows.read_rows, device=device)
    read_cols = batch.offsets[read_rows] + torch.tensor(rows.read_cols, device=device)

    def forward(delta):
        def add_delta(output):
            # .to(output.device): under a device map the edited layer may sit on another device.
            shift = delta.to(output.device, output.dtype).expand(len(lookup_rows), -1)
            patched = torch.index_put(
                as_btd(output, batch),
                (lookup_rows.to(output.device), lookup_cols.to(output.device)),
                shift,
                accumulate=True,
            )
            return patched.view(output.shape)

        hooks = [Hook(lm.name("down_proj", layer), add_delta)] if delta is not None else []
        with attach(lm.model, hooks):
            out = lm.model(**model_inputs(lm, batch), use_cache=False)
        full = out.logits  # (B, T, V): every position, as the original code computes them
        return full[read_rows, read_cols]

    return forward


def cached_forward(lm: LoadedModel, layer: int, rows: Rows) -> Forward:
    """The cached engine's logits at the reads (the exact engine's where the cache cannot hold the rows)."""
    hidden = cached_hidden(lm, layer, rows)
    if hidden is None:
        return exact_forward(lm, layer, rows)
    return lambda delta: logits(lm, hidden(delta))


def cached_hidden(lm: LoadedModel, layer: int, rows: Rows) -> Forward | None:
    """Run each row's tokens before its subject token once; each step runs only the rest,
    up to the LM head's inputs at the reads. None where the model's sliding window is
    shorter than the rows: its cache would drop tokens.

    Layout: row r is [its s_r tokens before the subject's last token, pads up to S]
    (the cached part) followed by [its tokens from the subject's last one, pads] (the part
    run every step), so the subject's last token is column 0 of the stepped part in every
    row. Pads sit after the real tokens of each part, so causal attention never lets a real
    token see one and the cached pass needs no mask (a fully masked query would give NaN);
    the stepped part masks them explicitly. Positions are explicit, so a row's positions
    run on across the gap.
    """
    from transformers import DynamicCache

    device = lm.device
    seqs, starts = rows.sequences, rows.subject_index
    n = len(seqs)
    width_before = max(starts)
    width_after = max(len(seq) - s for seq, s in zip(seqs, starts))
    window = getattr(lm.config, "sliding_window", None)
    if window and width_before + width_after >= window:
        return None
    pad = lm.pad_id
    before_ids = torch.full((n, width_before), pad, dtype=torch.long)
    before_mask = torch.zeros((n, width_before), dtype=torch.long)
    before_pos = torch.zeros((n, width_before), dtype=torch.long)
    after_ids = torch.full((n, width_after), pad, dtype=torch.long)
    after_mask = torch.zeros((n, width_after), dtype=torch.long)
    after_pos = torch.zeros((n, width_after), dtype=torch.long)
    for r, (seq, s) in enumerate(zip(seqs, starts)):
        before_ids[r, :s] = torch.tensor(seq[:s])
        before_mask[r, :s] = 1
        before_pos[r, :s] = torch.arange(s)
        rest = len(seq) - s
        after_ids[r, :rest] = torch.tensor(seq[s:])
        after_mask[r, :rest] = 1
        after_pos[r, :rest] = torch.arange(s, len(seq))
    read_rows = torch.tensor(rows.read_rows, device=device)
    read_cols = torch.tensor([c - starts[r] for r, c in zip(rows.read_rows, rows.read_cols)], device=device)
    mask = torch.cat([before_mask, after_mask], dim=1).to(device)
    takes_positions = "position_ids" in model_inputs(lm, make_batch([[pad]], pad, device=device))
    # transformers 5 renamed `past_key_values` to `cache`; accept either.
    cache_arg = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"

    kept = None
    if width_before:
        cache = DynamicCache(config=lm.config)
        inputs = {"input_ids": before_ids.to(device), cache_arg: cache, "use_cache": True}
        if takes_positions:
            inputs["position_ids"] = before_pos.to(device)
        # Only the keys and values are needed: stop before the LM head.
        with torch.no_grad(), attach(lm.model, [Hook(lm.lm_head_name, lambda x: None, on="input", stop=True)]):
            lm.model(**inputs)
        # The families adapters.py supports are attention-only: every layer caches keys and
        # values (transformers' union also has linear-attention layers, which cache neither).
        kept = [(layer_cache.keys, layer_cache.values) for layer_cache in cache.layers]  # type: ignore[union-attr]
    after_ids, after_pos = after_ids.to(device), after_pos.to(device)

    def forward(delta):
        # A step appends its tokens to the cache it is given: give each step a fresh one.
        cache = DynamicCache(kept, config=lm.config) if kept is not None else None

        def add_delta(output):
            x = as_btd(output, (n, width_after))
            patched = torch.cat([x[:, :1] + delta.to(x.device, x.dtype), x[:, 1:]], dim=1)
            return patched.view(output.shape)

        hooks = [Hook(lm.name("down_proj", layer), add_delta)] if delta is not None else []
        captured: list[torch.Tensor] = []
        hooks.append(
            Hook(
                lm.lm_head_name,
                lambda h: captured.append(h[read_rows.to(h.device), read_cols.to(h.device)]),
                on="input",
                stop=True,
            )
        )
        inputs = {"input_ids": after_ids, "attention_mask": mask, cache_arg: cache, "use_cache": cache is not None}
        if takes_positions:
            inputs["position_ids"] = after_pos
        with attach(lm.model, hooks):
            lm.model(**inputs)
        return captured[0]

    return forward


def step_reads(
    lm: LoadedModel, layer: int, rows: Rows, engine: str, one_pass: bool = True
) -> Callable[[torch.Tensor | None], Reads]:
    """δ → the head's reads for one step of `engine`, against the unedited essence distribution.

    The cached engine reads the head in one pass (head.py) where the head lives on the CPU;
    on an accelerator the plain product is one fast kernel each way and is kept.
    `one_pass=False` reads it the plain way everywhere (benchmarks/head.py compares the two).
    """
    targets = read_targets(rows, lm.device)
    hidden = cached_hidden(lm, layer, rows) if engine == "cached" else None
    head = lm.model.get_output_embeddings()
    if one_pass and hidden is not None and lm.device.type == "cpu" and head.weight.device.type == "cpu":
        return _one_pass_steps(lm, hidden, targets)
    forward = exact_forward(lm, layer, rows) if hidden is None else (lambda delta: logits(lm, hidden(delta)))
    with torch.no_grad():
        base_logp = forward(None)[-1].float().log_softmax(-1)
    return lambda delta: reads_from_logits(forward(delta), targets, base_logp)


def _one_pass_steps(lm: LoadedModel, hidden: Forward, targets: torch.Tensor) -> Callable[[torch.Tensor | None], Reads]:
    head = lm.model.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    base_logp: torch.Tensor | None = None

    def reads(delta: torch.Tensor | None) -> Reads:
        nonlocal base_logp
        if base_logp is None:
            if delta is None or not bool((delta == 0).all()):
                with torch.no_grad():
                    base_logp = logits(lm, hidden(None)[-1:])[0].log_softmax(-1)
            else:
                # δ starts at 0: the first step is the unedited model, whose essence read is the
                # base, so one pass serves both (the KL is 0 there, with no gradient).
                first = one_pass_reads(hidden(delta), head.weight, head.bias, targets, None, cap)
                assert first.essence_logits is not None
                base_logp = first.essence_logits.log_softmax(-1)
                return first
        return one_pass_reads(hidden(delta), head.weight, head.bias, targets, base_logp, cap)

    return reads


def optimise_value(
    lm: LoadedModel,
    layer: int,
    template: str,
    subject: str,
    target: str,
    prefixes: list[str],
    v_init: torch.Tensor,
    *,
    lr: float = 0.5,
    steps: int = 20,
    loss_stop: float = 0.05,
    stop_on: str = "nll",
    kl_factor: float = 0.0625,
    weight_decay: float = 0.5,
    clamp_norm_factor: float = 4.0,
    engine: str = "cached",
    stop_on_argmax: bool = False,
    shrink: float = 0.0,
    true_target: str | None = None,
) -> ValueResult:
    """Optimise δ; `stop_on_argmax` adds most-probable early stopping (MPES, ENCORE).

    MPES stops at the first step whose forward pass finds the target's first token the
    most probable next token on every rewrite prompt: the edit then already takes, and
    driving the NLL further down only over-fits (and costs steps). The check reads the
    reads the step computed anyway, so it costs nothing. With a `true_target` it also asks
    the target to beat the true object on the bare prompt (`Takes`), for one more row.

    `shrink` h > 0 (with MPES, once it stops): Adam's first steps reach the clamp at once, so
    the δ found is often larger than the edit needs, and every write leaks in proportion to
    its size. δ is scaled to h times the smallest share s of it that still takes (MPES's
    criterion, bisection to 1/32 with forward passes only), never above all of it: v* =
    v_init + min(1, h·s) δ. h > 1 leaves later edits a margin to wear down.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    rows = build_rows(lm, template, subject, target, prefixes, true_target if stop_on_argmax else None)
    forward = step_reads(lm, layer, rows, engine)
    takes = Takes(rows, lm.device)
    n_prompts, m = rows.n_prompts, rows.answer_len

    delta = torch.zeros_like(v_init, requires_grad=True)  # (d_model,)
    optimiser = torch.optim.Adam([delta], lr=lr)
    max_norm = clamp_norm_factor * v_init.norm()
    init_norm_sq = v_init.norm() ** 2
    step = 0
    reached = False
    loss_value = nll_value = float("nan")
    for step in range(1, steps + 1):
        optimiser.zero_grad()
        reads = forward(delta)
        token_nll = -reads.target_logp[: n_prompts * m]  # (P,)
        nll = token_nll.view(n_prompts, m).mean()  # mean token NLL per prompt, then over prompts
        penalty = weight_decay * delta.norm() / init_norm_sq
        loss = nll + kl_factor * reads.kl + penalty
        loss_value, nll_value = loss.item(), nll.item()
        reached = stop_on_argmax and takes(reads)
        if reached or (nll_value if stop_on == "nll" else loss_value) < loss_stop:
            step -= 1  # this step measured the loss only; δ was not changed by it
            break
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            norm = delta.norm()
            if norm > max_norm:
                delta.mul_(max_norm / norm)
    delta = delta.detach().float()
    share = 1.0
    if shrink and reached:
        share = min(1.0, shrink * smallest_share(forward, delta, takes))
        delta = delta * share
    return ValueResult(v_star=v_init.float() + delta, steps=step, loss=loss_value, nll=nll_value, share=share)


SHRINK_BISECTIONS = 5  # the smallest share is found to 1/32


@torch.no_grad()
def smallest_share(
    forward: Callable[[torch.Tensor], Reads], delta: torch.Tensor, takes: Takes, iterations: int = SHRINK_BISECTIONS
) -> float:
    """The smallest s in (0, 1], to 2^-iterations, at which s·δ still `takes`, for a δ that takes."""
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        if takes(forward(middle * delta)):
            high = middle
        else:
            low = middle
    return high
