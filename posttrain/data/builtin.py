"""Built-in verifiable tasks: small instruction problems with one exact answer, and their checker.

Each task makes a prompt, its correct answer and a plausible wrong answer (off by one,
letters out of order...); `solve` works the answer out again from the prompt alone (the
`builtin` reward of the online stages). The generator writes SFT rows (`messages`) and preference rows
(`prompt`/`chosen`/`rejected`, conversational) as jsonl files with `train` and `test`
splits, so they are loaded through `datasets.load_dataset` exactly like a user's files.
Held-out prompts never appear in a train split.

    python -m posttrain.data.builtin /tmp/tasks   # write the files and print a few rows
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import require

# Bump when the generator's output changes, so cached files are made anew.
GENERATOR_VERSION = 2
LETTERS = string.ascii_lowercase
ITEMS = ["apple", "pear", "plum", "fig", "lime", "kiwi", "date", "melon"]


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str
    wrong: str


def _add(rng: random.Random, max_number: int) -> Problem:
    a, b = rng.randint(0, max_number), rng.randint(0, max_number)
    delta = rng.choice([-10, -1, 1, 10]) if a + b >= 10 else rng.choice([-1, 1, 2])
    wrong = max(a + b + delta, 0)
    if wrong == a + b:
        wrong += 1
    return Problem("add", f"What is {a} + {b}?", str(a + b), str(wrong))


def _letters(rng: random.Random, max_letters: int) -> list[str]:
    n = rng.randint(3, max_letters)
    return rng.sample(LETTERS, n)


def _swap_two(rng: random.Random, seq: list[str]) -> list[str]:
    """A copy of `seq` with two neighbouring items swapped: a near miss."""
    out = list(seq)
    i = rng.randrange(len(out) - 1)
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _shift_one(rng: random.Random, seq: list[str]) -> list[str]:
    """A copy of `seq` with one letter replaced by its neighbour in the alphabet (z wraps to a)."""
    out = list(seq)
    i = rng.randrange(len(out))
    out[i] = LETTERS[(LETTERS.index(out[i]) + rng.choice([-1, 1])) % len(LETTERS)]
    return out


def _reverse(rng: random.Random, max_letters: int) -> Problem:
    word = _letters(rng, max_letters)
    answer = word[::-1]
    wrong = rng.choice([word, _swap_two(rng, answer), _shift_one(rng, answer)])
    return Problem("reverse", f"Reverse the letters: {' '.join(word)}", " ".join(answer), " ".join(wrong))


def _sort(rng: random.Random, max_letters: int) -> Problem:
    word = _letters(rng, max_letters)
    answer = sorted(word)
    wrong = rng.choice([_swap_two(rng, answer), _shift_one(rng, answer)])
    return Problem("sort", f"Sort the letters: {' '.join(word)}", " ".join(answer), " ".join(wrong))


def _count(rng: random.Random, max_items: int) -> Problem:
    n = rng.randint(1, max_items)
    items = [rng.choice(ITEMS) for _ in range(n)]
    wrong = n + rng.choice([-1, 1]) if n > 1 else 2
    return Problem("count", f"How many items: {' '.join(items)}", str(n), str(wrong))


TASKS: dict[str, Callable[[random.Random, int], Problem]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
}


# --- the checker: the answer from the prompt alone -----------------------------------------

_ADD = re.compile(r"What is (\d+) \+ (\d+)\?")
_REVERSE = re.compile(r"Reverse the letters: ([a-z](?: [a-z])*)")
_SORT = re.compile(r"Sort the letters: ([a-z](?: [a-z])*)")
_COUNT = re.compile(r"How many items: (\w+(?: \w+)*)")


def solve(prompt: str) -> str | None:
    """The exact answer to a built-in task's prompt, worked out from the prompt itself (the
    generators above write it); None for a prompt that is not one of its tasks."""
    prompt = prompt.strip()
    if m := _ADD.fullmatch(prompt):
        return str(int(m[1]) + int(m[2]))
    if m := _REVERSE.fullmatch(prompt):
        return " ".join(m[1].split()[::-1])
    if m := _SORT.fullmatch(prompt):
        return " ".join(sorted(m[1].split()))
    if m := _COUNT.fullmatch(prompt):
        return str(len(m[1].split()))
    return None


def task_of(prompt: str) -> str | None:
    """The built-in task a prompt belongs to, or None for a prompt that is not one of them."""
    prompt = prompt.strip()
    for task, pattern in (("add", _ADD), ("reverse", _REVERSE), ("sort", _SORT), ("count", _COUNT)):
        if pattern.fullmatch(prompt):
            return task
    return None


def partial_credit(answer: str, reply: str) -> float:
    """The share of the answer's units that the reply has in the same place: the digits of a number,
    the letters of a letter list (space-separated). Missing and extra units count against it: matches
    / the longer of the two. 1.0 only for the exact answer (whitespace around it aside)."""
    lists = " " in answer
    want = answer.split() if lists else list(answer)
    got = reply.split() if lists else list(reply.strip())
    if not got:
        return 0.0
    return sum(a == b for a, b in zip(want, got, strict=False)) / max(len(want), len(got))


def generated_key(fields: dict) -> str:
    """A short hash of `fields` and GENERATOR_VERSION: names cached things made from generated text."""
    content = {**fields, "generator": GENERATOR_VERSION}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=list).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TaskSpec:
    """What the generator makes: `data.builtin` in conf/data/tiny.yaml."""

    tasks: tuple[str, ...] = ("add", "reverse", "sort", "count")
    num_sft: int = 8000
    num_preference: int = 4000
    num_test: int = 400
    max_number: int = 49
    max_letters: int = 5
    max_items: int = 6
    seed: int = 0
    # share of SFT train rows whose reply is the plausible wrong answer (the preference pairs'
    # rejected one): noisy data for curation to find
    sft_noise: float = 0.0

    def __post_init__(self) -> None:
        for task in self.tasks:
            require(task in TASKS, "data.builtin.tasks", f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
        for name in ("num_sft", "num_preference", "num_test"):
            require(getattr(self, name) > 0, f"data.builtin.{name}", "must be positive")
        require(0 <= self.sft_noise <= 1, "data.builtin.sft_noise", f"{self.sft_noise} is not a share in [0, 1]")

    def fingerprint(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if not (k == "sft_noise" and v == 0)}  # keys made before it
        return generated_key(fields)


def _size(spec: TaskSpec, task: str) -> int:
    return spec.max_number if task == "add" else spec.max_items if task == "count" else spec.max_letters


def generate(spec: TaskSpec, count: int, rng: random.Random, exclude: set[str]) -> list[Problem]:
    """`count` problems, tasks in turn, none whose prompt is in `exclude` (held-out prompts)."""
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < count:
        task = spec.tasks[len(problems) % len(spec.tasks)]
        problem = TASKS[task](rng, _size(spec, task))
        attempts += 1
        if problem.prompt in exclude and attempts < 100 * count:
            continue
        problems.append(problem)
    return problems


def sft_row(p: Problem, wrong: bool = False) -> dict:
    reply = p.wrong if wrong else p.answer
    return {
        "messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": reply}],
        "task": p.task,
    }


def preference_row(p: Problem) -> dict:
    return {
        "prompt": [{"role": "user", "content": p.prompt}],
        "chosen": [{"role": "assistant", "content": p.answer}],
        "rejected": [{"role": "assistant", "content": p.wrong}],
        "task": p.task,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_tasks(spec: TaskSpec, folder: Path) -> Path:
    """Write `sft/{train,test}.jsonl` and `preference/{train,test}.jsonl` under `folder`; return it.

    Written into a temporary sibling and renamed, so a half-written folder is never seen.
    """
    if (folder / "sft" / "train.jsonl").exists():
        return folder
    rng = random.Random(spec.seed)
    test = generate(spec, spec.num_test, rng, exclude=set())
    held_out = {p.prompt for p in test}
    tmp = folder.with_name(folder.name + f".tmp{random.getrandbits(32):08x}")
    _write_jsonl(tmp / "sft" / "test.jsonl", [sft_row(p) for p in test])
    _write_jsonl(tmp / "preference" / "test.jsonl", [preference_row(p) for p in test])
    sft = generate(spec, spec.num_sft, rng, held_out)
    prefs = generate(spec, spec.num_preference, rng, held_out)  # drawn before the noise: the same pairs
    noisy = set(random.Random(spec.seed + 2).sample(range(len(sft)), round(spec.sft_noise * len(sft))))
    _write_jsonl(tmp / "sft" / "train.jsonl", [sft_row(p, i in noisy) for i, p in enumerate(sft)])
    _write_jsonl(tmp / "preference" / "train.jsonl", [preference_row(p) for p in prefs])
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: theirs is identical
        pass
    return folder


def sample_text(spec: TaskSpec, count: int = 2000) -> list[str]:
    """Prompts and answers, as raw text to train the tiny tokenizer on."""
    rng = random.Random(spec.seed + 1)
    problems = generate(spec, count, rng, exclude=set())
    return [line for p in problems for line in (p.prompt, p.answer, p.wrong)]


if __name__ == "__main__":
    out = write_tasks(TaskSpec(), Path(sys.argv[1] if len(sys.argv) > 1 else "builtin_tasks"))
    for name in ("sft/train.jsonl", "preference/train.jsonl"):
        print(name, (out / name).read_text().splitlines()[0])
