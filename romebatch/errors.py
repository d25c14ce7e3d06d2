"""Errors a user can act on.

Every error raised for bad input is a `UserError`: the CLI prints its one-line message
(plus an optional hint) and exits with code 2, writing nothing. Anything else is a bug
and shows a traceback only with ROMEBATCH_DEBUG=1.
"""

from __future__ import annotations

import errno

# Exit codes (docs/cli.md): scripts tell these apart.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # verify found a regression, check found damage
EXIT_BAD_INPUT = 2  # bad input or a refused operation; nothing was written
EXIT_STOPPED_ON_REGRESSION = 3  # apply --on-regression stop ended the run
EXIT_FACTS_FAILED = 4  # apply finished, but some facts' edits could not be computed
EXIT_SIGINT = 130  # stopped by Ctrl-C, after the edit in progress (128 + SIGINT)
EXIT_SIGTERM = 143  # stopped by SIGTERM, after the edit in progress (128 + SIGTERM)
# What each means, for docs/cli.md and the README (tests/test_docs.py keeps both in step).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_CHECK_FAILED: "`verify` found a regression beyond its thresholds or measured nothing, or `check` found damage",
    EXIT_BAD_INPUT: "bad input, a bad option or a refused operation (one `error:` line each); nothing was written",
    EXIT_STOPPED_ON_REGRESSION: "`apply --on-regression stop` ended the run at a failed regression check",
    EXIT_FACTS_FAILED: "`apply` finished, but the edit of one or more facts could not be computed (status `failed`)",
    EXIT_SIGINT: "stopped by Ctrl-C after the edit in progress (a second Ctrl-C abandons it); every committed edit is kept",
    EXIT_SIGTERM: "stopped by SIGTERM after the edit in progress; every committed edit is kept",
}


class UserError(Exception):
    """Bad input or a refused operation: one clear line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        # One line whatever it quotes (an SQLite error can carry a whole CREATE TABLE).
        message = escape_controls(message)
        super().__init__(message)
        self.message = message
        self.hint = None if hint is None else escape_controls(hint)


class ManifestError(UserError):
    """One or more problems in a manifest; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = [one_line(p) for p in problems]
        # One problem a line: the lines themselves are escaped, the breaks between them kept.
        Exception.__init__(self, "\n".join(self.problems))
        self.message = "\n".join(self.problems)
        self.hint = None


# C0 and C1 controls (C1's \x85, NEL, is a line break to str.splitlines and many terminals),
# DEL, the Unicode line and paragraph separators, and the bidi controls: the embeddings and
# overrides (U+202A-U+202E), the isolates (U+2066-U+2069) and the marks LRM, RLM and ALM,
# which make a terminal show a line in another order than it holds ("Trojan Source").
# Zero-width (non-)joiners stay: scripts need them, and they reorder nothing.
_BIDI_CONTROLS = [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]
_LINE_BREAKERS = {i: f"\\x{i:02x}" for i in [*range(32), 0x7F, *range(0x80, 0xA0)]} | {
    i: f"\\u{i:04x}" for i in [0x2028, 0x2029, *_BIDI_CONTROLS]
}
MAX_PROBLEM_CHARS = 500


def escape_controls(text: object) -> str:
    """Control characters, line breaks and bidi controls made visible (`\\x0a`, `\\u202e`), nothing else changed.

    Every user string (fact id, subject, prompt, target, path, journal meta, model name)
    goes through this before it is printed; rich output also keeps it out of markup
    (`rich.text.Text`, or `report.safe` where a string is parsed as markup).
    """
    return str(text).translate(_LINE_BREAKERS)


def one_line(text: str) -> str:
    """Escape control characters (a key or value from a hostile file may hold newlines) and cap the length."""
    text = escape_controls(text)
    return text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 3] + "..."


def located(path: object, row: int | None, field: str | None, what: str) -> str:
    """Format a problem as `file:row: field 'name': what`, the shape every manifest error uses."""
    where = f"{path}"
    if row is not None:
        where += f":{row}"
    if field is not None:
        return one_line(f"{where}: field '{field}': {what}")
    return one_line(f"{where}: {what}")


class JournalLockedError(UserError):
    """Another process holds the journal's write lock."""


class BaseModelMismatchError(UserError):
    """A journal was opened against a model other than the one it was written for."""


class JournalWriteError(UserError):
    """A journal write failed (a full disk, an I/O error); the journal keeps its last good state."""


class JournalDamagedError(UserError):
    """A journal whose structure or contents are damaged, or that a newer romebatch wrote."""


_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def resource_problem(error: BaseException) -> str | None:
    """A one-line description when `error` is the machine's (disk full, read-only, no permission), else None."""
    if isinstance(error, OSError) and error.errno in _RESOURCE_ERRNOS:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}"
    text = str(error)
    name = type(error).__name__
    # safetensors' writer fails with "Error while serializing: IoError(...)" on a full disk. A
    # file it cannot *read* ("Error while deserializing header: ...") is a damaged file, which
    # its reader names where it reads it; never a disk to free.
    if name == "SafetensorError" and text.startswith("Error while serializing"):
        return f"could not write ({text})"
    if name == "OperationalError" and ("full" in text or "I/O" in text):
        return f"could not write ({text})"
    return None
