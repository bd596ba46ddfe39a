"""A built-in synthetic preference dataset: follow the instruction versus ignore it.

    python -m demo.synthetic --output_dir runs/demo/data [--num_train 3000] [--num_eval 300] [--seed 0]

Each prompt lists a few words and asks for the first or the last of them; the chosen answer follows the instruction,
the rejected one names the word at the other end of the list:

    {"prompt": "Which word comes last: fox owl cat bee?\\nAnswer:", "chosen": " bee", "rejected": " fox"}

Both answers are words of the prompt, so a model that has only learned the answer format (copy a word of the list)
prefers either about half the time; the rule that separates them - read the instruction, then pick the matching end
of the list - is a few attention lookups a two-layer model can learn, and it carries over to word lists it has never
seen. The held-out split shares no prompt with the training split. Everything is a pure function of the seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle",
    "forest", "rocket", "mirror", "garden", "violin", "pepper", "castle", "island",
    "bottle", "dragon", "window", "planet", "silver", "hammer", "jacket", "pencil",
)
INSTRUCTIONS = ("first", "last")
MIN_WORDS, MAX_WORDS = 3, 5
PROMPT_TEMPLATE = "Which word comes {instruction}: {words}?\nAnswer:"


def make_record(words: list[str], instruction: str) -> dict[str, str]:
    """One pair in the explicit shape; the answer starts with a space so it is a word of its own after "Answer:"."""
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"instruction must be one of {INSTRUCTIONS}, got {instruction!r}")
    right, wrong = (words[0], words[-1]) if instruction == "first" else (words[-1], words[0])
    return {
        "prompt": PROMPT_TEMPLATE.format(instruction=instruction, words=" ".join(words)),
        "chosen": f" {right}",
        "rejected": f" {wrong}",
    }


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """The instruction and the word list of a prompt written by `make_record` (the rule's independent reading)."""
    head, _, rest = prompt.partition(": ")
    instruction = head.rsplit(" ", 1)[-1]
    words = rest.split("?", 1)[0].split()
    return instruction, words


def correct_answer(prompt: str) -> str:
    """The word that follows the prompt's instruction, without the leading space."""
    instruction, words = parse_prompt(prompt)
    return words[0] if instruction == "first" else words[-1]


def make_splits(*, num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """`num_train` and `num_eval` pairs with distinct prompts; no eval prompt occurs in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    while len(records) < num_train + num_eval:
        words = rng.sample(WORDS, rng.randint(MIN_WORDS, MAX_WORDS))
        record = make_record(words, rng.choice(INSTRUCTIONS))
        if record["prompt"] in seen:
            continue
        seen.add(record["prompt"])
        records.append(record)
    return records[:num_train], records[num_train:]


def corpus(records: list[dict[str, str]]) -> list[str]:
    """Texts to train the demo's tokenizer on: every prompt with both answers."""
    return [r["prompt"] + r["chosen"] + r["rejected"] for r in records]


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_dataset(output_dir: str | Path, *, num_train: int, num_eval: int, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl under `output_dir`; returns their paths."""
    train, held_out = make_splits(num_train=num_train, num_eval=num_eval, seed=seed)
    out = Path(output_dir)
    return write_jsonl(out / "train.jsonl", train), write_jsonl(out / "eval.jsonl", held_out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="where train.jsonl and eval.jsonl are written")
    parser.add_argument("--num_train", type=int, default=3000, help="training pairs")
    parser.add_argument("--num_eval", type=int, default=300, help="held-out pairs (prompts unseen in training)")
    parser.add_argument("--seed", type=int, default=0, help="the dataset is a pure function of this seed")
    args = parser.parse_args(argv)
    train_path, eval_path = write_dataset(args.output_dir, num_train=args.num_train, num_eval=args.num_eval,
                                          seed=args.seed)
    print(f"wrote {args.num_train} pairs to {train_path} and {args.num_eval} to {eval_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
