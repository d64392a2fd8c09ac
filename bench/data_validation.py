"""How fast posttrain checks, converts, curates and tokenizes a stage's rows.

    python bench/data_validation.py                 # 100k rows per format (~1-2 min on 2 cores)
    python bench/data_validation.py --rows 20000

Writes synthetic files in three formats (ultrachat-style multi-turn `messages`, sharegpt, and
ultrafeedback-style implicit-prompt pairs), then times each phase of `load_stage_data` on
them: the library's load (datasets' arrow cache), the row checks and conversion, curation
(exact dedup, held-out split), and token counting under the tiny model's chat template.
Prints a table and appends one JSON line per format to bench/results/data_validation.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

from posttrain import models
from posttrain.config import DataSource, ModelConfig, SourceConfig
from posttrain.data import curate, mixture
from posttrain.data.load import check_rows, load_split
from posttrain.report.table import markdown_table

RESULTS = Path(__file__).parent / "results" / "data_validation.jsonl"
WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversation(rng: random.Random, turns: int) -> list[dict]:
    out = []
    for _ in range(turns):
        out += [{"role": "user", "content": sentence(rng, 20)}, {"role": "assistant", "content": sentence(rng, 60)}]
    return out


def write_files(folder: Path, rows: int, seed: int = 0) -> dict[str, tuple[str, Path]]:
    rng = random.Random(seed)
    files = {
        "messages": ("sft", folder / "ultrachat.jsonl"),
        "sharegpt": ("sft", folder / "sharegpt.jsonl"),
        "preference": ("preference", folder / "ultrafeedback.jsonl"),
    }
    with files["messages"][1].open("w") as f:
        for i in range(rows):
            conv = conversation(rng, rng.randint(1, 3))
            f.write(json.dumps({"prompt": conv[0]["content"], "prompt_id": str(i), "messages": conv}) + "\n")
    with files["sharegpt"][1].open("w") as f:
        speaker = {"user": "human", "assistant": "gpt"}
        for i in range(rows):
            turns = [{"from": speaker[m["role"]], "value": m["content"]} for m in conversation(rng, rng.randint(1, 3))]
            f.write(json.dumps({"id": str(i), "conversations": turns}) + "\n")
    with files["preference"][1].open("w") as f:
        for i in range(rows):
            prompt = conversation(rng, 1)[:1]
            chosen = prompt + [{"role": "assistant", "content": sentence(rng, 60)}]
            rejected = prompt + [{"role": "assistant", "content": sentence(rng, 60)}]
            row = {"prompt": prompt[0]["content"], "prompt_id": str(i), "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(row | {"score_chosen": 8.0, "score_rejected": 3.0}) + "\n")
    return files


def measure(fmt: str, kind: str, path: Path, tokenizer, cache: Path) -> dict:
    src = SourceConfig(path=str(path))
    t0 = time.perf_counter()
    ds, origin = load_split(str(path), src, "train", kind)
    t1 = time.perf_counter()

    def columns(wanted: list[str]) -> dict[str, list]:
        return ds.select_columns(wanted).to_dict()

    _, rows = check_rows(ds.column_names, ds[0], columns, src, kind, origin)
    t2 = time.perf_counter()
    train, held_out = mixture.hold_out(rows, 0.01, seed=0)
    part = mixture.Part(src, origin.label, fmt, train, held_out)
    curate.curate([part], DataSource(path=str(path)), None, None)
    t3 = time.perf_counter()
    lengths = curate.token_lengths(part.train, tokenizer)
    t4 = time.perf_counter()
    return {
        "format": fmt,
        "rows": len(ds),
        "load_s": round(t1 - t0, 2),
        "check_s": round(t2 - t1, 2),
        "curate_s": round(t3 - t2, 2),
        "tokens_s": round(t4 - t3, 2),
        "validated_rows_per_s": round(len(ds) / (t3 - t0)),
        "tokenized_rows_per_s": round(len(lengths) / (t4 - t3)),
        "total_s": round(t4 - t0, 2),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = ModelConfig()
        tokenizer = models.load_tokenizer(models.base_model_source(cfg, folder / "cache"), cfg)
        results = [
            measure(fmt, kind, path, tokenizer, folder) for fmt, (kind, path) in write_files(folder, args.rows).items()
        ]
    header = ["format", "rows", "load s", "check s", "curate s", "validated rows/s", "tokens s", "tokenized rows/s"]
    table = [
        [r["format"], r["rows"], r["load_s"], r["check_s"], r["curate_s"], r["validated_rows_per_s"], r["tokens_s"],
         r["tokenized_rows_per_s"]]
        for r in results
    ]  # fmt: skip
    print(markdown_table(header, [[str(c) for c in row] for row in table]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    stamp = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
    }
    with RESULTS.open("a") as f:
        for r in results:
            f.write(json.dumps(stamp | r) + "\n")


if __name__ == "__main__":
    main()
