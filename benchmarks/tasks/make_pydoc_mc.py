"""Write ``pydoc_mc.jsonl``: 4-choice questions "which Python name has this one-line description?", generated from
the docstrings of this interpreter's standard-library modules and built-ins (no network, no model).

Each item: a description (the first sentence of a docstring that is not a call signature), the name it belongs
to and three other names of the same kind (modules or built-ins) drawn with a fixed seed. A description that
names any of its four choices is left out (it would give the answer away or confuse it). Module docstrings
are read from the source files with ``ast`` (nothing is imported that runs code); only C modules are imported.
The committed file was made with Python 3.11; another version writes other items.

The halves ``pydoc_mc_plan`` and ``pydoc_mc_check`` (even and odd ids, a YAML each) let a plan chosen on one
be judged on questions it never saw.

Example:
    $ python benchmarks/tasks/make_pydoc_mc.py    # writes pydoc_mc.jsonl, pydoc_mc_{plan,check}.{jsonl,yaml}
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import inspect
import json
import random
import re
import sys
from pathlib import Path

SEED = 0
MAX_ITEMS = {"module": 110, "builtin": 70}
SKIP_MODULES = {"antigravity", "this", "idlelib", "turtledemo", "lib2to3", "pydoc_data"}  # side effects, tools


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of the first docstring paragraph that is not a call signature, or None."""
    if not doc:
        return None
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        text = " ".join(para.split())
        if not text or "->" in text or re.match(r"^[\w.]+\(.*\)", text):
            continue
        sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
        return sentence if 4 <= len(sentence.split()) <= 30 else None
    return None


def module_doc(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.origin and spec.origin.endswith(".py"):
        return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    return importlib.import_module(name).__doc__  # a C module: importing runs no Python code


def descriptions() -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {"module": {}, "builtin": {}}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        try:
            text = first_sentence(module_doc(name))
        except (ImportError, SyntaxError, UnicodeDecodeError):
            continue
        if text:
            found["module"][name] = text
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or (isinstance(obj, type) and issubclass(obj, BaseException)) or not callable(obj):
            continue
        text = first_sentence(obj.__doc__)
        if text:
            found["builtin"][name] = text
    return found


def mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text, flags=re.IGNORECASE) is not None


QUESTION = {"module": "Which module of Python's standard library has this description: \"{d}\"",
            "builtin": "Which Python built-in function or type has this description: \"{d}\""}


def items(found: dict[str, dict[str, str]]) -> list[dict]:
    rng = random.Random(SEED)
    out = []
    for kind, table in found.items():
        names = sorted(table)
        chosen = []
        for name in names:
            text = table[name]
            if mentions(text, name):
                continue
            pool = [n for n in names if n != name and not mentions(text, n)]
            others = rng.sample(pool, 3)
            choices = others + [name]
            rng.shuffle(choices)
            chosen.append({"kind": kind, "name": name, "question": QUESTION[kind].format(d=text),
                           "choices": choices, "answer": choices.index(name)})
        rng.shuffle(chosen)
        out += chosen[: MAX_ITEMS[kind]]
    rng.shuffle(out)
    return [dict(item, id=i) for i, item in enumerate(out)]


HALVES = {"plan": 0, "check": 1}  # pydoc_mc_<half>.jsonl: the items of even / odd id
HALF_YAML = """# pydoc_mc_{half}: the items of pydoc_mc (beside this file) with {parity} id, written by make_pydoc_mc.py.
# The two halves share no question: a plan made for one (`--utility task:pydoc_mc_plan.yaml`) is judged on the
# other (`layershap evaluate --tasks pydoc_mc_check --task-dir benchmarks/tasks`).
include: pydoc_mc.yaml
task: pydoc_mc_{half}
dataset_kwargs:
  data_files:
    test: pydoc_mc_{half}.jsonl
"""


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    path = Path(__file__).with_name("pydoc_mc.jsonl")
    rows = items(descriptions())
    write_rows(path, rows)
    for half, parity in HALVES.items():
        write_rows(path.with_name(f"pydoc_mc_{half}.jsonl"), [r for r in rows if r["id"] % 2 == parity])
        path.with_name(f"pydoc_mc_{half}.yaml").write_text(
            HALF_YAML.format(half=half, parity="even" if parity == 0 else "odd"))
    by_kind = {k: sum(r["kind"] == k for r in rows) for k in MAX_ITEMS}
    print(f"wrote {path}: {len(rows)} items {by_kind}, answers {[sum(r['answer'] == i for r in rows) for i in range(4)]}")


if __name__ == "__main__":
    main()
