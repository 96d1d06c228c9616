"""Former module paths, before the package's folders were its layers, and names that moved: each still imports, with a warning.

``import cnt_lens.search`` gives a stand-in module whose attributes are those of
``cnt_lens.method.search``, and a ``DeprecationWarning`` naming the new path. The stand-in forwards
reads only: to monkeypatch a function, patch it in the module that now holds it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

_LAYER = {"core": ("errors", "files", "journal", "progress", "timing", "stats", "records"),
          "models": ("offline", "streamed"),
          "data": ("formats",),
          "behaviours": ("judge", "constraints"),
          "method": ("config", "resume", "scoring", "selection", "transplant", "patch_file", "search", "evaluate",
                     "scoring.attribution", "scoring.baselines", "scoring.common", "scoring.patching",
                     "scoring.registry"),
          "show": ("plots", "inspector", "neuron_browser", "report"),
          "workflow": ("pipeline", "runs", "testing")}
#: former module path → where it lives now
MOVED_MODULES = {f"cnt_lens.{old}": f"cnt_lens.{layer}.{old}" for layer, olds in _LAYER.items() for old in olds}


#: module → {name that moved out of it: the module that now holds it}
MOVED_NAMES = {"cnt_lens.method.search": {"iterative_scores": "cnt_lens.method.rounds",
                                          "next_overlap": "cnt_lens.method.rounds"}}


def moved_name(module: str, name: str) -> object:
    """``name`` read from ``module`` after it moved (see :data:`MOVED_NAMES`), with a warning; else AttributeError.

    A module whose names moved defines ``def __getattr__(name): return moved_name(__name__, name)``.
    """
    new = MOVED_NAMES.get(module, {}).get(name)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} moved to {new}.{name}; import it from there", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new), name)


class _FormerPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a former module path and loads a stand-in that forwards to the module's new home."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        """A spec for a former path (a package when the new module is one), else ``None``."""
        if fullname not in MOVED_MODULES:
            return None
        is_package = importlib.util.find_spec(MOVED_MODULES[fullname]).submodule_search_locations is not None
        return importlib.util.spec_from_loader(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        """The default module (filled in by :meth:`exec_module`)."""
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        """Warn, import the new module, and forward the stand-in's attribute reads to it."""
        new = MOVED_MODULES[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        real = importlib.import_module(new)
        module.__doc__ = real.__doc__
        module.__all__ = list(getattr(real, "__all__", ()))
        module.__getattr__ = lambda name: getattr(real, name)  # type: ignore[method-assign]


def install() -> None:
    """Put the former paths' finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _FormerPaths) for f in sys.meta_path):
        sys.meta_path.append(_FormerPaths())
