"""The `romebatch` command: a table of contents of its commands, and how it exits.

Each command parses its arguments, calls one library function (romebatch.api) and renders the
result; they live by group in cli_apply (apply, tune), cli_state (bundle, rollback, export)
and cli_inspect (log, verify, trace, check, compare, report), with the options they share in
cli_options and the ROME settings made from their dataclasses in cli_settings. No algorithm
lives here. People get rich output on stderr; scripts get `--json` on stdout. Errors are one
line (plus a hint) and exit code 2; ROMEBATCH_DEBUG=1 shows the traceback. Heavy imports
(torch, transformers) happen inside commands, so `--help` stays fast.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from typing import Annotated

import typer

from . import cli_apply, cli_inspect, cli_state
from .cli_options import LOG, RunEnded

app = typer.Typer(
    name="romebatch",
    help="Apply thousands of ROME fact edits to a language model: journaled, checked, reversible.",
    no_args_is_help=True,
    add_completion=True,  # Typer's own: --install-completion / --show-completion
    pretty_exceptions_enable=False,
)

# (name, function), in the order `romebatch --help` lists them.
COMMANDS = (
    ("apply", cli_apply.apply),
    ("bundle", cli_state.bundle_),
    ("rollback", cli_state.rollback),
    ("log", cli_inspect.log_),
    ("export", cli_state.export),
    ("verify", cli_inspect.verify),
    ("trace", cli_inspect.trace),
    ("check", cli_inspect.check),
    ("tune", cli_apply.tune),
    ("compare", cli_inspect.compare),
    ("report", cli_inspect.report_),
)
for _name, _command in COMMANDS:
    app.command(name=_name)(_command)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"romebatch {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print romebatch's version and exit.")
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No progress or status lines; tables, reports, errors and --json still print."
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also print every edit as it is made, above the progress bar.")
    ] = False,
):
    """Apply thousands of ROME fact edits to a language model: journaled, checked, reversible."""
    LOG.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def _console():
    """The rich console every command writes to (stderr); cli_options.console() calls this."""
    from rich.console import Console

    return Console(stderr=True)


def main() -> None:
    """Entry point: known errors become one line and exit 2; ROMEBATCH_DEBUG=1 shows tracebacks."""
    from typer.exceptions import TyperException

    from .errors import EXIT_SIGINT, ManifestError, UserError, escape_controls, one_line, resource_problem

    try:
        code = app(standalone_mode=False)
    except ManifestError as error:
        for line in error.problems:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except UserError as error:
        if os.environ.get("ROMEBATCH_DEBUG") == "1":
            raise
        print(f"error: {one_line(error.message)}", file=sys.stderr)
        if error.hint:
            print(f"hint: {one_line(error.hint)}", file=sys.stderr)
        sys.exit(2)
    except TyperException as error:  # usage errors: typer's vendored click exceptions
        # typer raises only its ClickException subclasses here, and they all have show(). Its
        # lines quote the command line (an unknown option, a bad value): controls escaped.
        import io

        shown = io.StringIO()
        error.show(file=shown)  # type: ignore[attr-defined]
        for line in shown.getvalue().rstrip("\n").split("\n"):  # its own line breaks only
            print(escape_controls(line), file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2) or 2)
    except RunEnded as ended:
        sys.exit(ended.code)
    except KeyboardInterrupt:  # a second Ctrl-C: the edit in progress was abandoned
        code = EXIT_SIGINT
    except Exception as error:
        # A full disk or a read-only folder met outside the paths that report it themselves,
        # or a journal file damaged where a read met it before any check did.
        what = resource_problem(error)
        if what is None and isinstance(error, sqlite3.DatabaseError):
            what = f"the journal file is damaged or unreadable ({error}); run `romebatch check`"
        if what is None or os.environ.get("ROMEBATCH_DEBUG") == "1":
            raise
        print(f"error: {one_line(what)}", file=sys.stderr)
        print("hint: free some space (or fix the permissions) and run the same command again", file=sys.stderr)
        sys.exit(2)
    # With standalone_mode=False, typer returns the code of `raise typer.Exit(n)` and of an
    # interrupt (130) instead of exiting.
    if code == EXIT_SIGINT:
        print("aborted; the journal holds every committed edit", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
