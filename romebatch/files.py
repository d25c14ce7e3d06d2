"""Opening a user's input file safely: a regular file only, and a bounded one.

Manifests, hyper-parameter files, known-facts files and statistics corpora all come from
users; a FIFO would block `open()` forever and /dev/zero (or a link to it) would be read until
memory runs out. Every such file is opened here, and a manifest piped to `-` is read here too,
under the same bound.
"""

from __future__ import annotations

import os
import stat
import sys

from .errors import UserError, located

# A file larger than this is refused before it is read: 2 GiB holds millions of facts.
MAX_FILE_BYTES = 2 * 1024**3
# A JSON side file (a model's config or shard index, presets, the layer cache): far above any
# real one, far below what parsing it would take out of memory.
MAX_JSON_BYTES = 256 * 1024**2
# What messages call standard input (`romebatch apply - --format csv < facts.csv`).
STDIN = "<stdin>"


def open_regular_file(
    path: str, *, encoding: str | None = "utf-8-sig", newline: str | None = None, limit: int = MAX_FILE_BYTES
):
    """Open a regular file for reading, or raise UserError: never a FIFO, device or folder.

    The file is opened without blocking (a FIFO would otherwise block forever in open()),
    then checked with fstat, so a symbolic link to /dev/zero is refused like /dev/zero.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UserError(located(path, None, None, f"cannot read file: {e.strerror or e}")) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = (
                "a folder"
                if stat.S_ISDIR(info.st_mode)
                else "a FIFO"
                if stat.S_ISFIFO(info.st_mode)
                else "a device"
                if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
                else "a socket"
            )
            raise UserError(located(path, None, None, f"is {kind}, not a regular file"))
        if info.st_size > limit:
            raise UserError(located(path, None, None, f"is {info.st_size:,} bytes; the limit is {limit:,}"))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    mode = "r" if encoding else "rb"
    return os.fdopen(fd, mode, encoding=encoding, newline=newline) if encoding else os.fdopen(fd, mode)


def read_regular_text(path, *, limit: int = MAX_FILE_BYTES) -> str:
    """A regular file's UTF-8 text, or UserError if it is not a regular file or is over `limit`
    (a FIFO, /dev/zero or a link to either where a small JSON file was expected)."""
    with open_regular_file(str(path), encoding="utf-8", limit=limit) as handle:
        return handle.read()


def read_stdin(limit: int = MAX_FILE_BYTES) -> bytes:
    """All of standard input, read once, or raise UserError: refused if it is a terminal or over `limit`.

    A terminal means nothing was piped: reading it would wait for typing that never comes.
    """
    stream = sys.stdin
    if stream is None:
        raise UserError(f"{STDIN}: there is no standard input; pipe a manifest into it or give a file name")
    try:
        terminal = stream.isatty()
    except (OSError, ValueError):  # closed
        terminal = False
    if terminal:
        raise UserError(
            f"{STDIN}: is a terminal, not a manifest; pipe one in (`- --format csv < facts.csv`) or give a file name"
        )
    raw = getattr(stream, "buffer", stream)  # text streams without a buffer (tests) give str
    try:
        data = raw.read(limit + 1)
    except (OSError, ValueError) as e:
        raise UserError(located(STDIN, None, None, f"cannot read it: {getattr(e, 'strerror', None) or e}")) from None
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > limit:
        raise UserError(located(STDIN, None, None, f"holds more than {limit:,} bytes; the limit is {limit:,}"))
    return data
