"""Every string from a user is printed literally: no rich markup, no control characters.

Fact ids, subjects, targets, prompts, journal paths and the journal's stored meta reach
`log`, `compare`, `report` and the error lines escaped (`\\x1b`, `\\u202e`), never raw: a raw
ESC recolours or clears the terminal or sets its title, a bidi override reorders the line,
a newline breaks one line into two. The journal is made by the library on the tiny GPT-2.
"""

from __future__ import annotations

import io
import stat
import sys

import pytest
from conftest import TINY_HPARAMS
from rich.console import Console
from typer.testing import CliRunner

from romebatch import cli
from romebatch.cli import app
from romebatch.comparison import CompareReport, PromptComparison, render_compare
from romebatch.editor import Editor
from romebatch.errors import EXIT_BAD_INPUT, UserError, escape_controls, one_line
from romebatch.hparams import HParams
from romebatch.journal import Journal
from romebatch.manifest import Fact
from romebatch.model import load_model

FACT_ID = "[bold]ev[/bold]\x1b[31m\u202eid"
SUBJECT = "Zork \x1b]0;pwned\x07"
TARGET = "Par[/]is\x1b[2J"
PROMPT = "{} lives in\u2067 the city\u200f of"
HOSTILE = Fact(id=FACT_ID, subject=SUBJECT, prompt=PROMPT, target_new=TARGET, target_true="Rome")
DIRECTORY = "ev\x1b[31mil\nj\u202e"
MODEL = "gpt\x1b[5m2\u202a\nmodel [red]x[/red]"
RAW = ("\x1b", "\x07", "\u202e", "\u202a", "\u2067", "\u200f")  # never in the output
WIDE = {"COLUMNS": "400"}


def quiet(_message):
    pass


def assert_literal(output: str) -> None:
    for raw in RAW:
        assert raw not in output, (raw, output)


@pytest.fixture
def built(tmp_path, tiny_folder):
    """(journal, model folder): the hostile fact applied in a journal whose folder name is hostile too."""
    folder = tiny_folder("gpt2")
    journal = tmp_path / DIRECTORY
    with Editor(journal, lm=load_model(str(folder), log=quiet), hparams=HParams(**TINY_HPARAMS), log=quiet) as ed:
        (result,) = ed.apply([HOSTILE], checks=None, repair_every=0).results
        assert result.status == "applied", result.reason
    return journal, folder


def test_escape_controls_covers_bidi_controls_and_keeps_joiners():
    for char in ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"]:
        assert escape_controls(f"a{char}b") == f"a\\u{ord(char):04x}b"
    for char in ["\u200e", "\u200f", "\u061c"]:
        assert escape_controls(f"a{char}b") == f"a\\u{ord(char):04x}b"
    assert escape_controls("\x1b[31m\n") == "\\x1b[31m\\x0a"
    assert escape_controls("a\u200db\u200cc\u200bd é 東京") == "a\u200db\u200cc\u200bd é 東京"  # joiners are script
    assert one_line("x\u202ey") == "x\\u202ey"


def test_log_prints_the_hostile_fact_path_and_model_escaped(built):
    journal, _ = built
    with Journal(journal, write=True) as j:
        j.set_many({"model": MODEL})
    out = CliRunner().invoke(app, ["log", "--journal", str(journal)], env=WIDE)
    assert out.exit_code == 0, out.output
    assert_literal(out.output)
    header = out.output.splitlines()[0]
    assert escape_controls(str(journal)) in header and escape_controls(MODEL) in header  # one line, whole
    assert "[bold]ev[/bold]\\x1b[31m\\u202eid" in out.output  # markup kept as typed, controls visible
    assert "Zork \\x1b]0;pwned\\x07" in out.output
    assert "Par[/]is\\x1b[2J" in out.output


def test_report_prints_the_path_and_model_escaped(built):
    journal, _ = built
    with Journal(journal, write=True) as j:
        j.set_many({"model": MODEL})
    out = CliRunner().invoke(app, ["report", "--journal", str(journal), "--every", "1"], env=WIDE)
    assert out.exit_code == 0, out.output
    assert_literal(out.output)
    assert escape_controls(str(journal)) in out.output and escape_controls(MODEL) in out.output


def test_compare_prints_the_hostile_fact_escaped(built):
    journal, folder = built
    args = ["compare", "--journal", str(journal), "--model", str(folder), "--fact", FACT_ID, "--max-new-tokens", "2"]
    out = CliRunner().invoke(app, args, env=WIDE)
    assert out.exit_code == 0, out.output
    assert_literal(out.output)
    assert escape_controls(str(journal)) in out.output.splitlines()[0]
    assert "[bold]ev[/bold]\\x1b[31m\\u202eid" in out.output
    assert "Zork \\x1b]0;pwned\\x07 lives in\\u2067 the city\\u200f of" in out.output


def test_render_compare_escapes_every_cell():
    """The same table from a report made by hand: continuations and neighbour answers too."""
    report = CompareReport(journal=DIRECTORY, state=1, max_new_tokens=2)
    report.rows = [
        PromptComparison(FACT_ID, "prompt", "Zork\u202e is in", TARGET, "Ro\x1bme", "\u202eA", "B\x1b[2J"),
        PromptComparison(FACT_ID, "neighborhood", "N\x1b]0;t\x07 is", TARGET, "An\u2066swer", "x", "y"),
        PromptComparison(None, "free", "[red]free\u202e[/red]\x1b[1m", None, None, "a\u202b", "b"),
    ]
    screen = io.StringIO()
    render_compare(Console(file=screen, width=400, color_system=None), report)
    output = screen.getvalue()
    assert_literal(output)
    assert "ev\\x1b[31mil\\x0aj\\u202e" in output.splitlines()[0]
    for shown in (
        "[bold]ev[/bold]\\x1b[31m\\u202eid",
        "Zork\\u202e is in",
        "N\\x1b]0;t\\x07 is",
        "[red]free\\u202e[/red]",
    ):
        assert shown in output, shown


def fake_error(monkeypatch, capsys, error: UserError) -> list[str]:
    def raise_it(*args, **kwargs):
        raise error

    monkeypatch.setattr("romebatch.api.log", raise_it)
    monkeypatch.setattr(sys, "argv", ["romebatch", "log"])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    assert exit.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert_literal(err)
    return err.splitlines()


def test_error_and_hint_are_one_line_each_and_escaped(monkeypatch, capsys):
    path = f"/tmp/{DIRECTORY}"
    lines = fake_error(monkeypatch, capsys, UserError(f"journal {path} is damaged", hint=f"run check --journal {path}"))
    assert lines == [
        f"error: journal {escape_controls(path)} is damaged",
        f"hint: run check --journal {escape_controls(path)}",
    ]


def test_usage_errors_are_escaped(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["romebatch", "log", "--x\u202ey\x1b[31m"])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    assert exit.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert_literal(err)
    assert "--x\\u202ey" in err


@pytest.fixture
def small_journal(tmp_path):
    """A journal without edits: enough for `report` to reach its --out."""
    directory = tmp_path / "J"
    with Journal(directory, write=True, create=True) as j:
        j.set_many({"model": "tiny-test-model", "base_hash": "sha256:base", "head": 0})
    return directory


def run_report(monkeypatch, capsys, journal, out) -> list[str]:
    def no_read(*args, **kwargs):
        raise AssertionError("the journal was read before --out was checked")

    monkeypatch.setattr("romebatch.quality_curves.curves", no_read)
    monkeypatch.setattr(sys, "argv", ["romebatch", "report", "--journal", str(journal), "--out", str(out)])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    assert exit.value.code == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out ") and escape_controls(str(out)) in lines[0], lines
    return lines


def test_report_out_in_a_missing_folder(small_journal, tmp_path, monkeypatch, capsys):
    run_report(monkeypatch, capsys, small_journal, tmp_path / "missing" / "c.png")
    assert not (tmp_path / "missing").exists()


def test_report_out_that_is_a_folder(small_journal, tmp_path, monkeypatch, capsys):
    (tmp_path / "d.png").mkdir()
    run_report(monkeypatch, capsys, small_journal, tmp_path / "d.png")
    assert list((tmp_path / "d.png").iterdir()) == []


def test_report_out_that_is_a_fifo(small_journal, tmp_path, monkeypatch, capsys):
    import os

    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    run_report(monkeypatch, capsys, small_journal, fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_report_out_whose_parent_is_a_file(small_journal, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    run_report(monkeypatch, capsys, small_journal, tmp_path / "file" / "c.png")


def test_report_out_with_a_hostile_name(small_journal, tmp_path, monkeypatch, capsys):
    run_report(monkeypatch, capsys, small_journal, tmp_path / "no\x1b[31m\u202e" / "c.png")


def test_report_out_is_written_whole_or_not_at_all(small_journal, tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    def fail(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:  # half a file, then the disk fills
            f.write(b"\x89PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    monkeypatch.setattr(
        sys, "argv", ["romebatch", "report", "--journal", str(small_journal), "--out", str(tmp_path / "c.png")]
    )
    with pytest.raises(SystemExit) as exit:
        cli.main()
    assert exit.value.code == EXIT_BAD_INPUT
    assert len(capsys.readouterr().err.splitlines()) == 2  # error: and hint:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["J"]  # no c.png, no temporary file


def test_report_out_writes_the_png(small_journal, tmp_path):
    out = CliRunner().invoke(app, ["report", "--journal", str(small_journal), "--out", str(tmp_path / "c.png")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["J", "c.png"]
