"""Build the two text sets kvfleet ships for quantization: the calibration set that int4-awq reads at
run time (workers/quant/data/calibration.txt) and the held-out evaluation set of `kvfleet bench
quality` (cluster/bench/data/eval.txt).

Both come from CPython's standard library (PSF License; the text is in the interpreter that runs
this script, nothing is downloaded): module, class and function docstrings (English prose) and, for
some functions, their source (code), which suits a chat model that also writes Python. Modules are
split between the two sets by a stable hash of their name, so no module's text is in both; each set
stops at its byte budget. Reproduce with the project's Python (3.11.7 made the shipped files):

    python -m cluster.bench.textsets
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import sys
import sysconfig
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION = ROOT / "workers" / "quant" / "data" / "calibration.txt"
EVALUATION = ROOT / "cluster" / "bench" / "data" / "eval.txt"
SEPARATOR = "\n\n"
# Skipped: tests and generated tables (long runs of digits or escapes, not prose), idle's and
# tkinter's GUI code, the vendored pip and the data-only encodings.
SKIP_PARTS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "encodings", "lib2to3", "pydoc_data"}
DOCS_PER_MODULE = 12  # many modules a little each, rather than the first few alphabetically in full
SKIP_NAMES = {"this.py", "antigravity.py", "unicodedata.py", "_pydecimal.py"}


def stdlib_files(stdlib: Path) -> list[Path]:
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] == "site-packages" or SKIP_PARTS & set(rel.parts) or path.name in SKIP_NAMES:
            continue
        files.append(path)
    return files


def module_documents(path: Path, module: str) -> list[str]:
    """The module's docstrings as prose paragraphs, and the source of every third documented
    function of fewer than 40 lines, in file order."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    docs = []
    if doc := ast.get_docstring(tree):
        docs.append(f"Module {module}.\n\n{doc}")
    functions = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 80 or node.name.startswith("_"):
            continue
        if isinstance(node, ast.ClassDef):
            docs.append(f"class {node.name} ({module}): {doc}")
            continue
        functions += 1
        length = node.end_lineno - node.lineno + 1
        if functions % 3 == 0 and length < 40:
            code = "\n".join(lines[node.lineno - 1 - len(node.decorator_list) : node.end_lineno])
            docs.append(textwrap.dedent(code))
        else:
            docs.append(f"{node.name}() in {module}: {doc}")
    return docs


def _is_calibration(module: str) -> bool:
    return hashlib.sha256(module.encode()).digest()[0] % 2 == 0


def build(stdlib: Path, calibration_bytes: int, eval_bytes: int) -> tuple[str, str]:
    sets = {True: [], False: []}
    sizes = {True: 0, False: 0}
    budget = {True: calibration_bytes, False: eval_bytes}
    for path in stdlib_files(stdlib):
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        side = _is_calibration(module)
        for doc in module_documents(path, module)[:DOCS_PER_MODULE]:
            size = len(doc.encode()) + len(SEPARATOR)
            if sizes[side] + size > budget[side]:
                break
            sets[side].append(doc)
            sizes[side] += size
    return SEPARATOR.join(sets[True]) + "\n", SEPARATOR.join(sets[False]) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration-kb", type=int, default=160)
    p.add_argument("--eval-kb", type=int, default=160)
    args = p.parse_args(argv)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calibration, evaluation = build(stdlib, args.calibration_kb * 1024, args.eval_kb * 1024)
    for path, text in ((CALIBRATION, calibration), (EVALUATION, evaluation)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(text.encode()) / 1024:.0f} KB from Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
