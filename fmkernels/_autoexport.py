"""Import every public submodule of a package and re-export the names in each one's `__all__`, so that adding an
op or a module is adding a file (used by fmkernels.ops and fmkernels.nn)."""
import importlib
import pkgutil
import sys


def export_submodules(package: str, path, namespace: dict) -> list[str]:
    names: list[str] = []
    for m in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{package}.{m.name}")
        for name in getattr(mod, "__all__", ()):
            namespace[name] = getattr(mod, name)
            names.append(name)
    return names


def alias_modules(package: str, renamed: dict, namespace: dict) -> None:
    """Keep old module paths importable after a file is renamed to its op's stem: `renamed` maps old -> new
    submodule name; `import package.old` and `from package import old` give the new module object."""
    for old, new in renamed.items():
        namespace[old] = sys.modules[f"{package}.{old}"] = importlib.import_module(f"{package}.{new}")
