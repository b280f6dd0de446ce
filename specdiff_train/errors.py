"""Errors a user reads in one place: the command line prints the message that names the field, the
bad value and the fix as its last lines, instead of a traceback or a page of usage.

- `suggest(word, choices)`: " Did you mean 'x'?" for close matches (misspelled keys and names).
- `explain_parse_error(message, parser)`: jsonargparse's parse errors (an unknown key, an unknown
  option of a class, an unimportable class_path, the old class_path of a moved class) shortened, with
  suggestions.
- `user_message(exc)`: for an exception raised while building or running a command, the message
  meant for the user (a ValueError / TypeError / FileNotFoundError / FloatingPointError raised by
  this package, Lightning's MisconfigurationException, an omegaconf error), or None for anything
  else (a bug: its traceback is kept).

`SPECDIFF_TRACEBACK=1` shows full tracebacks instead.
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Iterable

from .config_io import MOVED_CLASS_PATHS, resolve_class

PACKAGE_DIR = Path(__file__).resolve().parent
TRACEBACK_ENV = "SPECDIFF_TRACEBACK"
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError)


def show_tracebacks() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes", "on")


def suggest(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> str:
    """' Did you mean 'x'?' (or 'x' or 'y'), or '' when nothing is close."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=cutoff)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


# --- parse errors ------------------------------------------------------------------------------------
_BOILERPLATE = (
    re.compile(r"^\s*Does not validate against any of the Union subtypes\s*$"),
    re.compile(r"^\s*Subtypes: \["),
    re.compile(r"^\s*Given value type: "),
    re.compile(r"^\s*Given value: "),
    re.compile(r"^\s*- Expected a <class 'NoneType'>\s*$"),
)


def _class_options(class_path: str) -> list[str]:
    cls = resolve_class(class_path)
    if cls is None:
        return []
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _option_strings(parser: Any) -> list[str]:
    """Every `--option` of a parser and of its subcommands' parsers."""
    strings = []
    for action in getattr(parser, "_actions", []):
        strings += [s for s in getattr(action, "option_strings", []) if s.startswith("--")]
        for sub in (getattr(action, "choices", None) or {}).values() if isinstance(getattr(action, "choices", None), dict) else ():
            strings += _option_strings(sub)
    return sorted(set(strings))


def explain_parse_error(message: str, parser: Any = None) -> str:
    """A parse error of the CLI in a few lines: the field, the bad value, the choices or a suggestion."""
    lines = message.splitlines()
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"class_path '([^']+)'", message)

    moved = next((path for path in classes if path in MOVED_CLASS_PATHS), None)
    if moved:  # a config written before the class moved (config_io.MOVED_CLASS_PATHS)
        field = ".init_args.".join(keys) + ".class_path" if keys else "class_path"
        return f"{field}: {moved} moved to {MOVED_CLASS_PATHS[moved]}; write that class_path in the config."

    option = re.search(r"Option '([^']+)' is not accepted", message)
    if option and classes:
        bad, cls = option.group(1), classes[-1]
        field = ".init_args.".join(keys) + f".init_args.{bad}" if keys else bad
        choices = _class_options(cls)
        return (f"{field}: {cls.rsplit('.', 1)[-1]} has no option {bad!r}.{suggest(bad, choices)} "
                f"Its options: {', '.join(choices)}")

    missing = re.search(r"No module named '([^']+)'", message)
    if missing:
        field = ".".join(keys) or "class_path"
        target = classes[-1] if classes else missing.group(1)
        return (f"{field}: cannot import {target!r}: No module named {missing.group(1)!r}. Make the package "
                "importable where train.py runs: install it (`pip install -e path/to/your_project`) or put the "
                "folder that contains it on PYTHONPATH (`PYTHONPATH=path/to/parent python train.py ...`).")

    not_accepted = re.search(r"does not accept option '([^']+)'", message)
    if not_accepted:
        bad = not_accepted.group(1)
        hint = suggest(f"--{bad}", _option_strings(parser), n=2, cutoff=0.75).replace("'--", "'")
        return f"{bad}: no such option.{hint}"

    attribute = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", message)
    if attribute:
        module, name = attribute.groups()
        field = ".init_args.".join(keys) + ".class_path" if keys else "class_path"
        try:
            import importlib

            names = [n for n, v in vars(importlib.import_module(module)).items() if isinstance(v, type)]
        except ImportError:
            names = []
        return f"{field}: {module} has no class {name!r}.{suggest(name, names)} Classes there: {', '.join(sorted(names))}"

    unrecognized = re.search(r"[Uu]nrecognized arguments: (.*)", message)
    if unrecognized:
        tokens = [t.split("=", 1)[0] for t in unrecognized.group(1).split() if t.startswith("--")]
        hints = []
        for token in tokens:
            hint = suggest(token, _option_strings(parser), cutoff=0.75)
            if hint:
                hints.append(f"{token}:{hint}")
        return f"unrecognized arguments: {unrecognized.group(1)}" + ("; " + "; ".join(hints) if hints else "")

    kept = [line for line in lines if not any(p.match(line) for p in _BOILERPLATE)]
    return with_suggestion("\n".join(kept).strip())


def with_suggestion(message: str) -> str:
    """`message` plus a close match when it reads "... one of (a, b, ...) ..., got 'x'" (or argparse's
    "invalid choice: 'x' (choose from ...)") and has none yet."""
    if "Did you mean" in message:
        return message
    choices = re.search(r"(?:one of|choose from) [\(\[]?([^\)\]]*)[\)\]]?", message)
    got = re.search(r"(?:got|invalid choice:) '([^']*)'", message)
    if not (choices and got):
        return message
    hint = suggest(got.group(1), re.findall(r"'([^']*)'", choices.group(1)))
    if not hint:
        return message
    return message.rstrip() + ("" if message.rstrip().endswith((".", "?", "!")) else ".") + hint


# --- errors raised while building or running ---------------------------------------------------------
def _innermost_frame_file(exc: BaseException) -> Path | None:
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve()


def _frames(exc: BaseException) -> list[str]:
    files, tb = [], exc.__traceback__
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return files


def _chain(exc: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or (exc.__context__ if not exc.__suppress_context__ else None)
    return out


def user_message(exc: BaseException) -> str | None:
    """The message meant for the user in `exc` or its causes, or None (not a configuration, data or
    checkpoint error: keep the traceback)."""
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover
        MisconfigurationException = ()  # noqa: N806
    try:
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover
        OmegaConfBaseException = ()  # noqa: N806

    for err in reversed(_chain(exc)):  # the root cause first
        if isinstance(err, MisconfigurationException):
            in_trainer = any("lightning/pytorch/trainer" in f.replace(os.sep, "/") for f in _frames(err))
            return ("trainer: " if in_trainer else "") + str(err)
        if isinstance(err, OmegaConfBaseException):
            return f"config interpolation: {err}"
        where = _innermost_frame_file(err)
        if isinstance(err, USER_ERRORS) and where is not None and PACKAGE_DIR in where.parents:
            return with_suggestion(explain_parse_error(str(err)))
    return None
