"""Locate and load the compiled operator library ``_C.so``.

``_C.so`` is not a Python extension module: it is a plain shared library built
against the LibTorch stable ABI that registers the ``torch.ops.sale.*``
operators from static initializers when loaded with
``torch.ops.load_library``. It is never imported, so it does not depend on the
Python version.

Importing this module has no side effects (torch is not even imported);
the library is loaded by the first call of :func:`load_library`.

Search order:

1. ``$SALE_OPS_LIBRARY`` -- an explicit path to the file (when set, nothing
   else is tried);
2. the directory of this file (a ``PYTHONPATH=src`` checkout with ``_C.so``
   copied next to the sources);
3. the other ``__path__`` entries of the ``sale_ops`` package (a
   scikit-build-core editable install in redirect mode keeps the ``.py`` files
   in ``src/sale_ops/`` and installs ``_C.so`` into
   ``site-packages/sale_ops/``; the package ``__path__`` lists both);
4. the files recorded for the installed ``sale_ops`` distribution
   (``importlib.metadata``), which covers regular wheel installs.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["load_library", "library_path", "candidate_paths"]

LIBRARY_NAME = "_C.so"
ENV_VAR = "SALE_OPS_LIBRARY"
_PACKAGE = "sale_ops"

_lock = threading.Lock()
_loaded_path: str | None = None


def _package_dirs() -> list[str]:
    """Directories of the ``sale_ops`` package: this file's directory first."""
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    pkg = sys.modules.get(__package__ or _PACKAGE)
    for entry in getattr(pkg, "__path__", None) or []:
        dirs.append(os.path.abspath(entry))
    return dirs


def _distribution_files() -> list[str]:
    """``_C.so`` files recorded in the installed distribution's RECORD."""
    try:
        from importlib import metadata

        files = metadata.files(_PACKAGE) or []
    except Exception:  # not installed, or broken metadata
        return []
    found = []
    for f in files:
        if f.name == LIBRARY_NAME and f.parent.name == _PACKAGE:
            found.append(os.path.abspath(str(f.locate())))
    return found


def candidate_paths() -> list[str]:
    """Every location searched for ``_C.so``, in order (duplicates removed)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [os.path.abspath(os.path.expanduser(env))]
    paths = [os.path.join(d, LIBRARY_NAME) for d in _package_dirs()]
    paths += _distribution_files()
    seen: set[str] = set()
    unique = []
    for p in paths:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def library_path() -> str | None:
    """Path of the loaded ``_C.so``, else of the one that would be loaded.

    Returns ``None`` if no ``_C.so`` can be found.
    """
    if _loaded_path is not None:
        return _loaded_path
    for p in candidate_paths():
        if os.path.isfile(p):
            return p
    return None


def load_library() -> str:
    """Load ``_C.so`` into the process (once) and return its path.

    Raises ``ImportError`` if it cannot be found.
    """
    global _loaded_path
    if _loaded_path is not None:
        return _loaded_path
    with _lock:
        if _loaded_path is not None:
            return _loaded_path
        path = library_path()
        if path is None:
            searched = "\n  ".join(candidate_paths())
            if os.environ.get(ENV_VAR):
                hint = f"${ENV_VAR} is set but is not a file; fix or unset it."
            else:
                hint = (
                    "Build it from the repository root with "
                    "`pip install --no-build-isolation -e .` (torch must be "
                    f"installed first), or set ${ENV_VAR} to a built {LIBRARY_NAME}."
                )
            raise ImportError(
                f"sale_ops: compiled library {LIBRARY_NAME} not found. "
                f"Searched:\n  {searched}\n{hint}"
            )
        import torch

        torch.ops.load_library(path)
        _loaded_path = path
        return path
