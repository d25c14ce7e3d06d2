"""EasyEdit ROME hyper-parameter files load through `--hparams`, field by field (no model needed)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from romebatch.errors import UserError
from romebatch.hparams import HParams, load_hparams

# Written in the style of EasyEdit's hparams/ROME/llama3-8b.yaml: every field it has.
LLAMA3_STYLE = """\
alg_name: "ROME"
model_name: "./hugging_cache/Llama-3-8B"
stats_dir: "./data/stats"
device: 0
layers: [5]
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
fp16: true
"""


def write(tmp_path, text, name="hp.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_llama3_style_file_maps_field_by_field(tmp_path):
    hp = load_hparams(write(tmp_path, LLAMA3_STYLE))
    # Every value differs from romebatch's default where the file says so: the mapping is real.
    assert hp == HParams(
        layer=5,
        v_steps=25,
        v_lr=0.5,
        v_weight_decay=1e-3,
        clamp_norm_factor=4.0,
        kl_factor=0.0625,
        mom2="identity",
        prefixes=((5, 10), (10, 10)),
        stats_tokens=100_000 * 128,
    )
    assert HParams().v_weight_decay != hp.v_weight_decay and HParams().mom2 != hp.mom2


def test_gpt2_style_file_keeps_second_moment(tmp_path):
    text = (
        LLAMA3_STYLE.replace("model.layers.{}.mlp.down_proj", "transformer.h.{}.mlp.c_proj")
        .replace('"model.layers.{}"', '"transformer.h.{}"')
        .replace("model.layers.{}.mlp", "transformer.h.{}.mlp")
        .replace("model.layers.{}.self_attn", "transformer.h.{}.attn")
        .replace("mom2_adjustment: false", "mom2_adjustment: true")
        .replace("layers: [5]", "layers: [17]")
        .replace("v_loss_layer: 31", "v_loss_layer: 47")
        .replace("mom2_n_samples: 100000", "mom2_n_samples: 300")
    )
    hp = load_hparams(write(tmp_path, text))
    assert (hp.layer, hp.mom2, hp.stats_tokens) == (17, "second_moment", 300 * 128)


@pytest.mark.parametrize(
    "change, field",
    [
        (("layers: [5]", "layers: [4, 5]"), "layers"),
        (('fact_token: "subject_last"', 'fact_token: "last"'), "fact_token"),
        (('alg_name: "ROME"', 'alg_name: "MEMIT"'), "alg_name"),
        (("v_lr: 5e-1", "v_lr: -1"), "v_lr"),
        (("v_lr: 5e-1", "v_lr: .nan"), "v_lr"),
        (("clamp_norm_factor: 4", "clamp_norm_factor: .inf"), "clamp_norm_factor"),
        (("v_num_grad_steps: 25", "v_num_grad_steps: 0"), "v_num_grad_steps"),
        (("v_num_grad_steps: 25", "v_num_grad_steps: true"), "v_num_grad_steps"),
        (("mom2_adjustment: false", "mom2_adjustment: 0"), "mom2_adjustment"),
        (('mom2_dtype: "float32"', 'mom2_dtype: "float16"'), "mom2_dtype"),
        (("model_parallel: false", "model_parallel: true"), "model_parallel"),
        (("v_loss_layer: 31", "v_loss_layer: 2"), "v_loss_layer"),
        (
            ("context_template_length_params: [[5, 10], [10, 10]]", "context_template_length_params: [5, 10]"),
            "context_template_length_params",
        ),
        (
            (
                'rewrite_module_tmp: "model.layers.{}.mlp.down_proj"',
                'rewrite_module_tmp: "model.layers.{}.mlp.up_proj"',
            ),
            "rewrite_module_tmp",
        ),
        (("fp16: true", "fp16: true\nmom2_update_weight: 15000"), "mom2_update_weight"),
    ],
)
def test_fields_without_equivalent_or_out_of_range_are_one_line_errors(tmp_path, change, field):
    path = write(tmp_path, LLAMA3_STYLE.replace(*change))
    with pytest.raises(UserError) as caught:
        load_hparams(path)
    assert f"EasyEdit field {field!r}" in caught.value.message
    assert str(path) in caught.value.message and "\n" not in caught.value.message


def test_romebatch_files_are_not_taken_for_easyedit(tmp_path):
    hp = load_hparams(write(tmp_path, "layer: 3\nclamp_norm_factor: 1.5\n"))
    assert (hp.layer, hp.clamp_norm_factor, hp.mom2) == (3, 1.5, "second_moment")


def test_cli_exit_2_and_nothing_written(tmp_path, monkeypatch):
    from romebatch.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "facts.csv").write_text("subject,prompt,target_new\nThe Space Needle,{} is in,Paris\n")
    write(tmp_path, LLAMA3_STYLE.replace("layers: [5]", "layers: [1, 2]"))
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "romebatch", "apply", "facts.csv", "--hparams", "hp.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])},
    )
    assert done.returncode == 2, done.stderr
    assert "EasyEdit field 'layers'" in done.stderr and len(done.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "romebatch.journal").exists()
    # and the mapped file reaches apply as the HParams it maps to
    captured = {}
    monkeypatch.setattr("romebatch.api.apply", lambda *a, **k: captured.update(k) or _Result())
    write(tmp_path, LLAMA3_STYLE)
    CliRunner().invoke(app, ["apply", "facts.csv", "--hparams", "hp.yaml", "--json"])
    assert captured["hparams"].layer == 5 and captured["hparams"].mom2 == "identity"


class _Result:
    results = []

    def summary(self):
        return {}
