"""The package's shape in numbers: module sizes, wide signatures, the public surface, imports, and the walk of ``pair``.

Run ``python scripts/architecture_figures.py`` (``--json`` for a machine-readable dump). Figures:

- **modules over 450 lines** and the longest module;
- **functions over 8 parameters** (every named parameter, ``*args`` and ``**kwargs``, less ``self``/``cls``);
- **top-level names** (``cnt_lens.__all__``);
- **private imports across modules** (``from .x import _name``) and **imports running back up**: a module
  importing one of a later layer (``LAYERS``, as docs/architecture.md lists them; the package's
  ``__init__`` is the top);
- **the walk of ``pair``**: from ``runs.run_transfer``, every package function that receives the pair
  (as an argument, as ``x.pair``, or inside an object built from it: ``self``) is a *stop*, visited once,
  depth first in source order; a *climb back* is entering a file the walk has already left.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cnt_lens"
#: the layers, lowest first, and their folders (docs/architecture.md); a module may import only its own layer or lower
LAYERS = {
    "core": ("core",),
    "models": ("models",),
    "data": ("data",),
    "behaviours": ("behaviours",),
    "method": ("method",),
    "show": ("show",),
    "workflow": ("workflow", "experiments"),
    "interface": ("cli",),
}
START = ("runs", "run_transfer")


def modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name relative to the package (``"method.search"``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__") if name != "__init__" else ""] = ast.parse(path.read_text())
    return out


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    """The package-relative module an ``import from`` names, or ``None`` outside the package."""
    if node.level == 0:
        mod = node.module or ""
        return mod.removeprefix("cnt_lens").lstrip(".") if mod.split(".")[0] == "cnt_lens" else None
    parts = module.split(".") if module else []
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(mods: dict[str, ast.Module]) -> dict[str, dict[str, tuple[str, str]]]:
    """Per module, each imported local name → (package module, name there)."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for name, tree in mods.items():
        is_package = (ROOT / name.replace(".", "/") / "__init__.py").exists() or name == ""
        table = out.setdefault(name, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (src := _absolute(name, node, is_package)) is not None:
                for alias in node.names:
                    sub = f"{src}.{alias.name}".lstrip(".")
                    table[alias.asname or alias.name] = (sub, "") if sub in mods else (src, alias.name)
    return out


def layer(module: str) -> int:
    """The module's layer (its place in ``LAYERS``, by its top-level name; the top for one outside them)."""
    head = module.split(".")[0]
    return next((i for i, mods in enumerate(LAYERS.values()) if head in mods), len(LAYERS))


def _functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _n_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")]) + bool(a.vararg) + bool(a.kwarg)


class Walker:
    """The depth-first walk of the pair through the package's functions."""

    def __init__(self, mods: dict[str, ast.Module]) -> None:
        self.mods, self.imports = mods, imports(mods)
        self.defs = {m: {n.name: n for n in t.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
                     for m, t in mods.items()}
        self.seen: set[tuple[str, str]] = set()
        self.entries: list[str] = []

    def resolve(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """Where ``name`` as seen from ``module`` is defined: (module, def), following re-exports."""
        if depth > 8:
            return None
        if name in self.defs.get(module, {}):
            return module, self.defs[module][name]
        if name in self.imports.get(module, {}):
            src, attr = self.imports[module][name]
            return self.resolve(src, attr, depth + 1) if attr else None
        return None

    def method(self, module: str, cls: ast.ClassDef, name: str) -> tuple[str, ast.AST] | None:
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return module, node
        return None

    def walk(self, module: str, fn: ast.AST, carriers: set[str], holders: dict[str, tuple[str, ast.ClassDef]]) -> None:
        """Visit ``fn`` (carrying the pair in ``carriers``; objects holding it in ``holders``) and its callees."""
        key = (module, f"{getattr(fn, 'name', '?')}:{getattr(fn, 'lineno', 0)}")
        if key in self.seen:
            return
        self.seen.add(key)
        self.entries.append(module)
        calls = sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
        assigned = {id(n.value): n.targets[0].id for n in ast.walk(fn)
                    if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)}
        for call in calls:
            self.call(module, call, carriers, holders, assigned.get(id(call)))

    def _mentions(self, node: ast.AST, carriers: set[str], holders: dict) -> bool:
        return ((isinstance(node, ast.Name) and node.id in carriers)
                or (isinstance(node, ast.Attribute) and node.attr == "pair")
                or (isinstance(node, ast.Name) and node.id in holders))

    def call(self, module: str, call: ast.Call, carriers: set[str], holders: dict, bound: str | None) -> None:
        args = [(i, a) for i, a in enumerate(call.args)] + [(k.arg, k.value) for k in call.keywords]
        passed = [slot for slot, value in args if self._mentions(value, carriers, holders)]
        target = None
        f = call.func
        if isinstance(f, ast.Name):
            target = self.resolve(module, f.id)
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            if f.value.id in holders:
                hm, cls = holders[f.value.id]
                target, passed = self.method(hm, cls, f.attr), passed or ["self"]
            elif (owner := self.resolve(module, f.value.id)) and isinstance(owner[1], ast.ClassDef):
                target = self.method(owner[0], owner[1], f.attr)
        if target is None or not passed:
            return
        where, node = target
        if isinstance(node, ast.ClassDef):  # an object built from the pair: its methods carry it
            if bound:
                holders[bound] = (where, node)
            return
        params = [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
        offset = 1 if params[:1] in (["self"], ["cls"]) else 0
        inner = {params[s + offset] if isinstance(s, int) and s + offset < len(params) else s for s in passed}
        inner = {p for p in inner if isinstance(p, str) and p in params} | {"pair"}
        inner_holders = {}
        for slot, value in args:  # an object holding the pair, passed on: the parameter holds it
            if isinstance(value, ast.Name) and value.id in holders:
                name = params[slot + offset] if isinstance(slot, int) and slot + offset < len(params) else slot
                inner_holders[name] = holders[value.id]
        if "self" in passed and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in holders:
            inner_holders["self"] = holders[f.value.id]
        self.walk(where, node, inner, inner_holders)


def walk_of_pair(mods: dict[str, ast.Module]) -> dict[str, int]:
    """Stops, files and climbs back of the walk of ``pair`` from ``START``."""
    walker = Walker(mods)
    start = next(m for m in mods if m.split(".")[-1] == START[0] and START[1] in walker.defs[m])
    walker.walk(start, walker.defs[start][START[1]], {"pair"}, {})
    left: set[str] = set()
    climbs, previous = 0, None
    for module in walker.entries:
        if module != previous:
            climbs += module in left
            if previous is not None:
                left.add(previous)
            previous = module
    return {"stops": len(walker.entries), "files": len(set(walker.entries)), "climbs_back": climbs}


def figures() -> dict[str, object]:
    """Every figure of the module docstring."""
    mods = modules()
    lines = {m: len((ROOT / (m.replace(".", "/") or "__init__")).with_suffix(".py").read_text().splitlines())
             if (ROOT / m.replace(".", "/")).with_suffix(".py").exists() else
             len((ROOT / m.replace(".", "/") / "__init__.py").read_text().splitlines()) for m in mods}
    wide = sorted(f"{m}.{fn.name} ({_n_params(fn)})" for m, t in mods.items() for fn in _functions(t) if _n_params(fn) > 8)
    table = imports(mods)
    upward = sorted({f"{m} → {src}" for m, names in table.items() for src, _ in names.values()
                    if m and src and layer(src) > layer(m)})
    private = sorted({f"{m} ← {src}.{attr}" for m, names in table.items() for src, attr in names.values()
                      if attr.startswith("_") and not attr.startswith("__") and src != m})
    sys.path.insert(0, str(ROOT.parent))
    import cnt_lens

    return {"modules": len(mods), "modules_over_450": sorted(f"{m} ({n})" for m, n in lines.items() if n > 450),
            "longest_module": max(lines.items(), key=lambda kv: kv[1]), "functions_over_8_params": wide,
            "top_level_names": len(cnt_lens.__all__), "imports_running_back_up": upward,
            "private_imports_across_modules": private, "walk_of_pair": walk_of_pair(mods)}


if __name__ == "__main__":
    result = figures()
    if "--json" in sys.argv:
        print(json.dumps(result, indent=1))
    else:
        for key, value in result.items():
            shown = value if not isinstance(value, list) else f"{len(value)}" + (f": {', '.join(value)}" if value else "")
            print(f"{key}: {shown}")
