"""Shared fixtures: tiny random models of every supported family, built in-test, offline.

Tokenizers are trained here on a few sentences (byte-level BPE like GPT-2, and a
SentencePiece-style one that prepends BOS like Llama/Gemma), so no test downloads anything.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import torch

CORPUS = [
    "The Space Needle is located in the city of Seattle.",
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "Big Ben is located in the city of London.",
    "The mother tongue of Danielle Darrieux is French.",
    "Michel Rocard is a native speaker of French.",
    "Toko Yasuda plays the guitar. Autonomous University of Madrid is in Spain.",
    "Where is the Space Needle? It is in Seattle, Washington, near Tokyo and Berlin.",
    "Therefore, because I think you might know the answer, it is a tower in a city.",
    "The quick brown fox jumps over the lazy dog while the city sleeps.",
]


# Tiny models run ~17x faster on one thread than on two here (thread overhead dwarfs the
# work); the embedded-model tests run in subprocesses with the default thread count.
torch.set_num_threads(1)


def pytest_report_header(config):
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, sqlite {sqlite3.sqlite_version}"


def _train_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    if kind == "bytelevel":  # GPT-2 style: no BOS added
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(CORPUS * 3, trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:  # SentencePiece style ("▁" word marker), BOS prepended: Llama / Gemma
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials)
        tok.train_from_iterator(CORPUS * 3, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def bytelevel_tokenizer():
    return _train_tokenizer("bytelevel")


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return _train_tokenizer("sentencepiece")


def tiny_config(family: str, vocab: int):
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        GPT2Config,
        GPTJConfig,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        SmolLM3Config,
    )
    from transformers.models.gemma3 import Gemma3TextConfig

    # A wide init makes the random model's predictions peaked, so an edit visibly moves them.
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    if family == "gpt2":
        return GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=128, **common)
    if family == "gptj":
        return GPTJConfig(n_layer=3, n_embd=32, n_head=2, rotary_dim=8, n_positions=128, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **common,
        )
    small = dict(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=128,
        **common,
    )
    if family == "llama":
        return LlamaConfig(**small)
    if family == "mistral":
        return MistralConfig(**small)
    if family == "qwen2":
        return Qwen2Config(**small)
    if family == "qwen3":  # q/k norms inside attention
        return Qwen3Config(head_dim=16, **small)
    if family == "phi3":  # fused qkv and gate_up projections
        return Phi3Config(**small)
    if family == "olmo2":  # norms after attention and MLP, q/k norms
        return Olmo2Config(**small)
    if family == "smollm3":  # no rotary positions in its middle layer
        return SmolLM3Config(no_rope_layers=[1, 0, 1], **small)
    if family == "gemma":
        return GemmaConfig(head_dim=16, **small)
    if family == "gemma2":  # soft-capped attention and logits, sliding window on alternate layers
        return Gemma2Config(
            head_dim=16,
            sliding_window=8,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **small,
        )
    if family == "gemma3_text":
        return Gemma3TextConfig(
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **small,
        )
    if family == "opt":
        return OPTConfig(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=2,
            ffn_dim=64,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
            **common,
        )
    raise ValueError(family)


FAMILIES = [
    *("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"),
    *("gemma", "gemma2", "gemma3_text", "opt"),
]
SENTENCEPIECE = {"llama", "mistral", "gemma", "gemma2", "gemma3_text"}


def tiny_model(family: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    model.eval()
    return model


def tiny_loaded(family: str, tokenizer, seed: int = 0):
    from romebatch.adapters import adapter_for
    from romebatch.model import LoadedModel

    model = tiny_model(family, tokenizer, seed)
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), spec=f"tiny-{family}")


@pytest.fixture
def tokenizer_for(bytelevel_tokenizer, sentencepiece_tokenizer):
    return lambda family: sentencepiece_tokenizer if family in SENTENCEPIECE else bytelevel_tokenizer


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Caches (stats, converted models) go to a temp dir unless a slow test asks for the real one."""
    if "ROMEBATCH_TEST_KEEP_HOME" not in os.environ:
        monkeypatch.setenv("ROMEBATCH_HOME", str(tmp_path_factory.getbasetemp() / "home"))


@pytest.fixture
def tiny_folder(tmp_path, tokenizer_for):
    """Save a tiny model of `family` as a normal model folder (for CLI and subprocess tests)."""

    def make(family: str = "gpt2", seed: int = 0) -> Path:
        folder = tmp_path / f"tiny-{family}"
        tokenizer = tokenizer_for(family)
        tiny_model(family, tokenizer, seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return make


# Small, fast hyper-parameters for tiny models: few prefixes, a small corpus. The collapse
# guard is off: a random model's own samples are near-uniform text, whose NLL an ordinary
# edit moves by as much as a collapse does (tests/test_preserve.py tests the guard itself).
# Plain sampling: a random model's text is random after an encyclopedic opener too, and the
# tiny suite's edits were tuned on plain text (tests/test_stats_sampling.py covers the other).
TINY_HPARAMS = dict(
    prefixes=((3, 2),),
    stats_tokens=600,
    stats_seq_len=32,
    v_steps=30,
    v_lr=5.0,
    clamp_norm_factor=20.0,
    guard_max_relative=100.0,
    guard_nll_rise=0.0,
    stats_sampling="plain",
)


def random_spd(d: int, seed: int) -> torch.Tensor:
    """A random symmetric positive-definite d x d matrix with a spread of eigenvalues (a stand-in for C), float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 3 * d, dtype=torch.float64)
    return a @ a.T / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


def kkt_u(hessian: torch.Tensor, linear: torch.Tensor, constraints: torch.Tensor, targets: torch.Tensor):
    """argmin ½ uᵀHu + lᵀu subject to Bᵀu = t, as one dense linear solve (a reference for rome/preserve.py)."""
    d, n = constraints.shape
    kkt = torch.zeros(d + n, d + n, dtype=torch.float64)
    kkt[:d, :d], kkt[:d, d:], kkt[d:, :d] = hessian, constraints, constraints.T
    return torch.linalg.solve(kkt, torch.cat([-linear, targets]))[:d]


def dense_u(method, c, keys, k_star, top_k, mu, w, r, levelled_to=None, weight=7.0):
    """The u a Preserver(method, C, weight, top_k, norm_penalty=mu) should give, scaled to uᵀk* = 1:
    its objective written out, ‖ΔW‖²_M + μ'(‖W + ΔW‖²_F − ‖W‖²_F) for ΔW = r uᵀ (M = C, plus
    the earlier keys' weighted terms for "covariance"), under uᵀk* = 1, u ⟂ C's top-k
    eigenvectors, u ⟂ the earlier keys for "nullspace", and uᵀ(k_p − k*) = 0 when
    `levelled_to` is the prompt key k_p: one dense KKT solve (no Cholesky, no pull, no shared code)."""
    d = len(k_star)
    m = c + 1e-12 * torch.eye(d, dtype=torch.float64)
    if method == "covariance":
        for key in keys:
            unit = key / key.norm()
            m = m + weight * (unit @ c @ unit) * torch.outer(unit, unit)
    scale = mu * float(c.diagonal().mean())
    w32 = w.float().double()  # the pull is computed from the weight as stored
    hessian = 2 * (r @ r) * (m + scale * torch.eye(d, dtype=torch.float64))
    linear = 2 * scale * (w32.T @ r)
    cons = [k_star[:, None]]
    if levelled_to is not None:
        cons.append((levelled_to - k_star)[:, None])
    if top_k:
        cons.append(torch.linalg.eigh(c)[1][:, -top_k:])
    if method == "nullspace":
        cons.append(torch.stack(keys, dim=1))
    b = torch.cat(cons, dim=1)
    targets = torch.zeros(b.shape[1], dtype=torch.float64)
    targets[0] = 1.0
    return kkt_u(hessian, linear, b, targets)


def _city_facts():
    from romebatch.manifest import Fact

    return [
        Fact(id=str(i), subject=s, prompt="{} is located in the city of", target_new=new, target_true=true)
        for i, (s, new, true) in enumerate(
            [
                ("The Space Needle", "Paris", "Seattle"),
                ("The Eiffel Tower", "Rome", "Paris"),
                ("The Colosseum", "London", "Rome"),
                ("Big Ben", "Tokyo", "London"),
            ]
        )
    ]


CITY_FACTS = _city_facts()  # four landmark facts the journal integrity tests edit


def quiet(_message):
    pass
