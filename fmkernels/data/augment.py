"""Data augmentation for training batches (validation is never augmented).

Token level, on a batch (x, y) of (B, T) token ids, applied on the fly by the trainer with a probability each,
deterministic under a seed (a numpy Generator keyed by (seed, step, micro-batch)):

- random crop offset (`crop`, per row): drop the first k in [1, T/2] tokens of the window, so the row starts
  mid-context; the freed tail is padded and its targets ignored (-100);
- token dropout (`token_dropout`, per input token): replace the token by another token of the same row (targets
  untouched: the model must predict through corrupted context);
- span masking (`span_mask`, per row): overwrite one random span of `span_len` input tokens with `fill_id`.

Text level, for Python code: `rename_identifiers(source, seed)` consistently renames the local names of every
function (parameters and local variables, not globals, attributes, names declared global/nonlocal, or names
read by nested scopes), so the program stays equivalent and `compile()` still succeeds.
"""
from __future__ import annotations

import ast
import builtins
import keyword
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

__all__ = ["TokenAugment", "augment_batch", "rename_identifiers"]

IGNORE = -100


@dataclass(frozen=True)
class TokenAugment:
    crop: float = 0.0  # probability per row
    token_dropout: float = 0.0  # probability per input token
    span_mask: float = 0.0  # probability per row
    span_len: int = 8
    fill_id: int = 0  # token written over a masked span

    @property
    def active(self) -> bool:
        return self.crop > 0 or self.token_dropout > 0 or self.span_mask > 0

    def validate(self) -> None:
        for name in ("crop", "token_dropout", "span_mask"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"augment: {name} must be a probability in [0, 1], got {v!r}")
        if self.span_len < 1:
            raise ValueError(f"augment: span_len must be >= 1, got {self.span_len!r}")


def augment_batch(x: torch.Tensor, y: torch.Tensor, aug: TokenAugment, rng: np.random.Generator):
    """(x, y) (B, T) int64 -> augmented copies (inputs and, for crop, targets). Deterministic given rng."""
    if not aug.active:
        return x, y
    x, y = x.clone(), y.clone()
    B, T = x.shape
    if aug.crop > 0 and T > 1:
        rows = rng.random(B) < aug.crop
        ks = rng.integers(1, max(T // 2, 1) + 1, size=B)
        for b in np.nonzero(rows)[0]:
            k = int(ks[b])
            x[b, : T - k] = x[b, k:].clone()
            x[b, T - k :] = aug.fill_id
            y[b, : T - k] = y[b, k:].clone()
            y[b, T - k :] = IGNORE
    if aug.token_dropout > 0:
        drop = torch.from_numpy(rng.random((B, T)) < aug.token_dropout)
        src = torch.from_numpy(rng.integers(0, T, size=(B, T)))
        repl = torch.gather(x, 1, src)
        x = torch.where(drop, repl, x)
    if aug.span_mask > 0:
        rows = rng.random(B) < aug.span_mask
        L = min(aug.span_len, T)
        starts = rng.integers(0, T - L + 1, size=B)
        for b in np.nonzero(rows)[0]:
            s = int(starts[b])
            x[b, s : s + L] = aug.fill_id
    return x, y


# ---------------------------------------------------------------------------------------------- renaming
_RESERVED = set(keyword.kwlist) | set(getattr(keyword, "softkwlist", [])) | set(dir(builtins)) | {"self", "cls"}


class _Scope(ast.NodeVisitor):
    """Collect, for one function, the names bound locally and the names its nested scopes use."""

    def __init__(self):
        self.bound: set[str] = set()
        self.declared: set[str] = set()  # global / nonlocal
        self.inner_used: set[str] = set()

    def visit_arguments(self, node: ast.arguments) -> None:
        for a in node.posonlyargs + node.args + node.kwonlyargs + [node.vararg, node.kwarg]:
            if a is not None:
                self.bound.add(a.arg)
        for d in node.defaults + node.kw_defaults:
            if d is not None:
                self.visit(d)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self.bound.add(node.id)

    def visit_Global(self, node) -> None:
        self.declared.update(node.names)

    visit_Nonlocal = visit_Global

    def _nested(self, node) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                self.inner_used.add(sub.id)
            elif isinstance(sub, ast.arg):
                self.inner_used.add(sub.arg)
            elif isinstance(sub, (ast.Global, ast.Nonlocal)):
                self.inner_used.update(sub.names)

    def visit_FunctionDef(self, node) -> None:  # a nested def: its name is local here, its body a new scope
        self.bound.add(node.name)
        for d in node.decorator_list:
            self.visit(d)
        self._nested(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node) -> None:
        self.bound.add(node.name)
        self._nested(node)

    def visit_Lambda(self, node) -> None:
        self._nested(node)

    def _comp(self, node) -> None:
        self._nested(node)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comp

    def visit_Import(self, node) -> None:
        for a in node.names:
            self.bound.add((a.asname or a.name).split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node) -> None:
        if node.name:
            self.bound.add(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node) -> None:
        if node.name:
            self.bound.add(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node) -> None:
        if node.name:
            self.bound.add(node.name)

    def visit_MatchMapping(self, node) -> None:
        if node.rest:
            self.bound.add(node.rest)
        self.generic_visit(node)


class _Renamer(ast.NodeTransformer):
    def __init__(self, rng: np.random.Generator, used: set[str]):
        self.rng, self.used = rng, used

    def _fresh(self) -> str:
        while True:
            n = "v_" + "".join(self.rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=5))
            if n not in self.used:
                self.used.add(n)
                return n

    def visit_FunctionDef(self, node):
        sc = _Scope()
        sc.visit(node.args)
        for stmt in node.body:
            sc.visit(stmt)
        nested_defs = {s.name for s in ast.walk(node) if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and s is not node}
        imported = {(a.asname or a.name).split(".")[0] for s in ast.walk(node) if isinstance(s, (ast.Import, ast.ImportFrom)) for a in s.names}
        candidates = sorted(sc.bound - sc.declared - sc.inner_used - _RESERVED - nested_defs - imported)
        # keyword-passable parameters keep their names (callers may pass them by keyword); *args / **kwargs and
        # positional-only parameters and plain locals are renamed
        a = node.args
        keep = {p.arg for p in a.args + a.kwonlyargs}
        candidates = [c for c in candidates if c not in keep and not c.startswith("__")]
        mapping = {c: self._fresh() for c in candidates}
        if mapping:
            _apply(node, mapping)
        self.generic_visit(node)  # nested functions get their own renaming
        return node

    visit_AsyncFunctionDef = visit_FunctionDef


def _apply(fn: ast.AST, mapping: dict[str, str]) -> None:
    """Rename in fn's own scope: its arguments and Name nodes not inside nested function/class/lambda/comprehension
    scopes (which the caller excluded from the candidates by usage anyway)."""
    a = fn.args
    for arg in a.posonlyargs + [a.vararg, a.kwarg]:
        if arg is not None and arg.arg in mapping:
            arg.arg = mapping[arg.arg]

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp,
                                  ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    for d in child.decorator_list:
                        walk_node(d)
                continue
            walk_node(child)

    def walk_node(node):
        if isinstance(node, ast.Name) and node.id in mapping:
            node.id = mapping[node.id]
        elif isinstance(node, ast.ExceptHandler) and node.name in mapping:
            node.name = mapping[node.name]
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name in mapping:
            node.name = mapping[node.name]
        walk(node)

    for stmt in fn.body:
        walk_node(stmt)
    for d in a.defaults + a.kw_defaults:  # defaults are evaluated in the enclosing scope: never renamed
        pass


def rename_identifiers(source: str, seed: int = 0) -> Optional[str]:
    """Consistently rename function-local names in Python `source` (deterministic under `seed`). Returns the
    rewritten source (which compiles), or None when the source does not parse or uses constructs where renaming
    is not provably safe (locals(), vars(), eval/exec, dir() without arguments)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
            {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)} | \
            {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    if names & {"locals", "vars", "eval", "exec", "dir"}:
        return None
    rng = np.random.default_rng(seed)
    tree = _Renamer(rng, set(names) | _RESERVED).visit(tree)
    ast.fix_missing_locations(tree)
    out = ast.unparse(tree)
    compile(out, "<renamed>", "exec")
    return out
