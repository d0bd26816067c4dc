"""The YAML files users hand to evomerge (recipes, spaces, MoE configs), read within bounds.

A recipe path may name a FIFO, a device (`/dev/zero`), a folder or a file of gigabytes; its YAML may
nest thousands deep or hold numbers of thousands of digits. Each is refused here with one line
(`UserFileError`, which the owners of each format turn into their own error naming the file) before
anything reads without end, recurses past Python's stack or overflows a float.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 16 << 20  # a recipe or a space is kilobytes; a MoE config with prompts, megabytes
MAX_DEPTH = 64  # levels of nesting (a space is at most ~8)
MAX_INT_BITS = 64


class UserFileError(ValueError):
    """What is wrong with the file, in words, without its name (the caller adds it)."""


def read_text(path: str | os.PathLike) -> str:
    """The file's text: a regular file of at most MAX_BYTES of UTF-8, opened without blocking."""
    try:
        fd = os.open(Path(path), os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UserFileError(f"cannot read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = ("a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
                    else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a file")
            raise UserFileError(f"is {kind}, not a regular file")
        if info.st_size > MAX_BYTES:
            raise UserFileError(f"is {info.st_size / 2**20:.0f} MiB; a configuration file is at most {MAX_BYTES >> 20} MiB")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UserFileError(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise UserFileError(f"is over {MAX_BYTES >> 20} MiB; a configuration file is at most that")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserFileError(f"is not UTF-8 text (byte {exc.start})") from None


def parse_yaml(text: str) -> Any:
    """YAML as data, refusing what would break the code reading it: nesting deeper than MAX_DEPTH,
    integers beyond 64 bits (naming where they are)."""
    if len(text) > MAX_BYTES:
        raise UserFileError(f"is over {MAX_BYTES >> 20} MiB; a configuration file is at most that")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserFileError(f"not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise UserFileError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise UserFileError(f"a number too long to read: {str(exc).split(';')[0]}") from None
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UserFileError(f"{_name(where)}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise UserFileError(f"{_name(where)}: {str(value)[:12]}... ({len(str(abs(value)))} digits) is out of range")
        if isinstance(value, dict):
            stack.extend((v, (*where, k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*where, i), depth + 1) for i, v in enumerate(value))
    return data


def load_yaml(path: str | os.PathLike) -> Any:
    return parse_yaml(read_text(path))


def _name(where: tuple) -> str:
    return ".".join(str(part) for part in where) or "the document"
