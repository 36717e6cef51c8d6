"""Writes instructions.jsonl: small, exactly checkable instruction-following tasks
(reverse a word, upper-case a phrase, add two numbers, pick the larger, count letters),
for examples/hf_instruct.eff. Deterministic: `python make_instructions.py` rewrites the
same file byte for byte."""

import json
import random
from pathlib import Path

WORDS = ("model compiler pipeline adapter tensor kernel stage export import weight layer token "
         "vector matrix gradient shard budget memory cache graph python river garden window "
         "yellow orange silver planet rocket music paper stone cloud").split()


def record(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    if kind == 0:
        w = rng.choice(WORDS)
        return {"prompt": f"Reverse the letters of: {w}", "response": w[::-1]}
    if kind == 1:
        phrase = " ".join(rng.sample(WORDS, 2))
        return {"prompt": f"Upper-case: {phrase}", "response": phrase.upper()}
    if kind == 2:
        a, b = rng.randrange(100), rng.randrange(100)
        return {"prompt": f"Add {a} and {b}.", "response": str(a + b)}
    if kind == 3:
        a, b = rng.sample(range(1000), 2)
        return {"prompt": f"Which is larger, {a} or {b}?", "response": str(max(a, b))}
    w = rng.choice(WORDS)
    return {"prompt": f"How many letters are in '{w}'?", "response": str(len(w))}


def main() -> None:
    rng = random.Random(0)
    lines = [json.dumps(record(rng)) for _ in range(4000)]
    Path(__file__).with_name("instructions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
