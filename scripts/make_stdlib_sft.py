"""Build a chat fine-tuning set (jsonl, `messages`) from data that ships with Python: the docstrings of the
standard library's public functions, classes and methods, and the help topics of `pydoc_data.topics`.

    python scripts/make_stdlib_sft.py --out stdlib_sft.jsonl          # ~1600 conversations (Python 3.11), deterministic
    fmk finetune --hf "$(python -c 'from fmkernels.train.hf_source import smollm2_gguf; print(smollm2_gguf())')" \\
        --data stdlib_sft.jsonl --lora_rank 16 --max_time_s 300 --out_dir runs/smollm2-stdlib

Each conversation: user "What does `json.dumps` do? (Python standard library, module json)", assistant: the first
paragraphs of its docstring (at most --max_chars characters). Order is fixed (sorted names), so the held-out split
(every 20th conversation) is the same on every machine with the same Python version.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import warnings

MODULES = (
    "abc argparse array base64 bisect calendar collections contextlib copy csv dataclasses datetime decimal difflib "
    "enum fnmatch fractions functools glob gzip hashlib heapq hmac html inspect io itertools json logging math "
    "operator os os.path pathlib pprint queue random re secrets shlex shutil statistics string struct subprocess "
    "tempfile textwrap threading time typing urllib.parse uuid zipfile tarfile sqlite3 unittest email.message "
    "xml.etree.ElementTree http.client socket"
).split()


def _answer(doc: str, max_chars: int) -> str:
    paras = [p.strip() for p in inspect.cleandoc(doc).split("\n\n") if p.strip()]
    out = ""
    for p in paras:
        if out and len(out) + len(p) + 2 > max_chars:
            break
        out = f"{out}\n\n{p}" if out else p
    return out[:max_chars]


def docstring_items(max_chars: int):
    seen = set()
    for name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            items = [(f"{name}.{attr}", obj)]
            if inspect.isclass(obj):
                items += [(f"{name}.{attr}.{m}", getattr(obj, m)) for m in sorted(vars(obj))
                          if not m.startswith("_") and callable(getattr(obj, m, None))]
            for qual, o in items:
                doc = inspect.getdoc(o)
                if not doc or len(doc) < 40 or id(doc) in seen:
                    continue
                seen.add(id(doc))
                ans = _answer(doc, max_chars)
                if len(ans) >= 40:
                    yield [{"role": "user", "content": f"What does `{qual}` do? (Python standard library, module {name})"},
                           {"role": "assistant", "content": ans}]


def topic_items(max_chars: int):
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for key in sorted(topics):
        ans = _answer(topics[key], max_chars)
        if len(ans) >= 40:
            yield [{"role": "user", "content": f"Explain the Python language topic '{key}'."},
                   {"role": "assistant", "content": ans}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="stdlib_sft.jsonl")
    ap.add_argument("--max_chars", "--max-chars", type=int, default=700)
    ap.add_argument("--limit", type=int, default=None, help="at most this many conversations")
    a = ap.parse_args(argv)
    n = 0
    with open(a.out, "w") as f:
        for msgs in list(docstring_items(a.max_chars)) + list(topic_items(a.max_chars)):
            f.write(json.dumps({"messages": msgs}) + "\n")
            n += 1
            if a.limit and n >= a.limit:
                break
    print(f"wrote {n} conversations to {a.out} (Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
