"""Writes pairs.jsonl: (query, passage) pairs for examples/minilm_pairs.eff. Each query
asks about a function, class or method of Python's standard library by its dotted name
("What does shutil.copytree do?"); its passage is the first sentence of that object's
docstring ("Recursively copy a directory tree and return the destination directory.").

The standard library's sources are parsed, never imported (importing some modules has
side effects), in sorted order; passages that repeat are dropped (a repeated passage
would be a false negative for in-batch negatives); the pairs are shuffled with a fixed
seed, so the last ones (the validation split) are a random sample. Deterministic for one
Python version: `python make_pairs.py` rewrites the same file byte for byte (the committed
file was made with CPython 3.11; other versions have other docstrings)."""

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

PAIRS = 1500  # about 200 KB
TEMPLATES = ("What does {} do?", "What is {} for?", "python {}", "{} in the standard library",
             "How do I use {}?")
SKIP = {"antigravity", "this", "idlelib", "test", "tests", "lib2to3", "turtledemo", "ensurepip", "pydoc_data",
        "site-packages", "dist-packages", "__pycache__"}
SENTENCE = re.compile(r"(.+?[.!?])(\s|$)")


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence on one line, or None when it is too short or long,
    or reads like a signature or grammar rather than prose."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = SENTENCE.match(para)
    if not m:
        return None
    s = m.group(1)
    if not 4 <= len(s.split()) <= 30 or len(s) > 180 or " = " in s or "->" in s or "(" in s.split()[0]:
        return None
    return s


def documented(tree: ast.Module, module: str):
    """(dotted name, docstring) of the public functions and classes of a module, and of
    the public methods of its public classes."""
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if (doc := ast.get_docstring(node)):
            yield f"{module}.{node.name}", doc
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, ast.FunctionDef) and not member.name.startswith("_") \
                        and (doc := ast.get_docstring(member)):
                    yield f"{module}.{node.name}.{member.name}", doc


def modules(root: Path):
    """(dotted module name, path) of the standard library's top-level modules and its
    packages' __init__ files, sorted."""
    for path in sorted(root.glob("*.py")):
        if path.stem not in SKIP and not path.stem.startswith("_"):
            yield path.stem, path
    for path in sorted(root.glob("*/__init__.py")):
        name = path.parent.name
        if name not in SKIP and not name.startswith("_"):
            yield name, path


def main() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(0)
    pairs, seen = [], set()
    for module, path in modules(root):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for name, doc in documented(tree, module):
            passage = first_sentence(doc)
            if passage and passage not in seen:
                seen.add(passage)
                pairs.append((name, passage))
    rng.shuffle(pairs)
    lines = [json.dumps({"query": rng.choice(TEMPLATES).format(name), "passage": passage})
             for name, passage in pairs[:PAIRS]]
    Path(__file__).with_name("pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
