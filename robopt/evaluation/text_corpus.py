"""An offline text corpus: the Python standard library's own sources (code + docstrings), split by module.

Fixed, sorted module lists make the corpus identical on every machine with the same Python minor version; the
held-out modules never reach training, so the tiny language model is judged on text it has not seen.
"""

from __future__ import annotations

import functools
import sys
import sysconfig
from pathlib import Path

from robopt.errors import EvaluationError

# Single-file (or package __init__) modules present in CPython 3.11-3.13; sorted, so the corpus order is fixed.
TRAIN_MODULES: tuple[str, ...] = (
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "enum",
    "fileinput",
    "fnmatch",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "hmac",
    "ipaddress",
    "keyword",
    "linecache",
    "numbers",
    "operator",
    "optparse",
    "pprint",
    "random",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shutil",
    "statistics",
    "tempfile",
    "timeit",
    "tokenize",
    "traceback",
    "uuid",
    "warnings",
    "weakref",
)
HELDOUT_MODULES: tuple[str, ...] = ("fractions", "heapq", "queue", "shlex", "string", "textwrap")

CORPUS_NAME = "stdlib-heldout"


def stdlib_dir() -> Path:
    """The directory holding the standard library's pure-Python sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_source(name: str) -> str:
    """The source text of stdlib module `name` (`name.py` or `name/__init__.py`), newlines normalized."""
    root = stdlib_dir()
    for path in (root / f"{name}.py", root / name / "__init__.py"):
        if path.is_file():
            return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    raise EvaluationError(
        f"the standard library source of {name!r} is not in {root} (Python {sys.version.split()[0]})",
        "the offline text corpus reads the stdlib's .py files: use a Python installation that ships them "
        "(some minimal images strip sources and keep only .pyc files)",
    )


@functools.cache
def corpus_text(split: str) -> str:
    """All modules of `split` ('train' or 'heldout'), each followed by a blank line, in a fixed order."""
    modules = {"train": TRAIN_MODULES, "heldout": HELDOUT_MODULES}.get(split)
    if modules is None:
        raise EvaluationError(f"unknown corpus split {split!r}", "use 'train' or 'heldout'")
    return "\n\n".join(module_source(name) for name in modules)


def heldout_sources() -> dict[str, str]:
    """Held-out module name -> source, in the fixed order (for task generation and evaluation)."""
    return {name: module_source(name) for name in HELDOUT_MODULES}
