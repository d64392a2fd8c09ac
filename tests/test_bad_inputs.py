"""Bad input, as a new user gives it: a misspelled key, a module that does not exist, damaged data
files of every format, paths that are not what they should be. Each stops `posttrain` at plan
time with exactly one `error:` line naming the key, file, line or field (exit 1, no traceback)
and leaves nothing behind that looks like a finished run.

The table runs `posttrain.cli.main` in this process (a second each, no torch import); a few rows
run again as real `posttrain` processes to check the exit status and stderr end to end.
"""

# ruff: noqa: E501  (the table: one bad input per line)
from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from posttrain import cli
from tests.conftest import ANY_MODEL, posttrain_argv

ROW = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
PAIR = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def file(
    name: str, content: str | bytes, key: str = "data.sft.path", extra: tuple[str, ...] = ()
) -> Callable[[Path], list[str]]:
    """Overrides that point `key` at a file `name` holding `content` (and `extra` ones)."""

    def make(d: Path) -> list[str]:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return [*extra, f"{key}={path}"]

    return make


def args(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda d: [o.replace("{d}", str(d)) for o in overrides]


def folder(key: str, *files: str, extra: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
    """A folder holding `files` (a good row each), named by `key`."""

    def make(d: Path) -> list[str]:
        (d / "folder").mkdir()
        for name in files:
            (d / "folder" / name).write_text(lines(ROW))
        return [f"{key}={d / 'folder'}", *extra]

    return make


def gzipped_cut_short(d: Path) -> list[str]:
    data = gzip.compress(lines(*[ROW] * 50).encode())
    (d / "chat.jsonl.gz").write_bytes(data[: len(data) // 2])
    return [f"data.sft.path={d / 'chat.jsonl.gz'}"]


def corrupt_parquet(d: Path) -> list[str]:
    (d / "chat.parquet").write_bytes(b"PAR1 this is not parquet")
    return [f"data.sft.path={d / 'chat.parquet'}"]


def deepspeed_hostfile(content: str | bytes) -> Callable[[Path], list[str]]:
    return lambda d: ["launcher=deepspeed", *file("hosts", content, key="launcher.hostfile")(d)]


BINARY = bytes(range(256)) * 8

# (id, what the user gives, text the error line holds)
BAD: list[tuple[str, Callable[[Path], list[str]], str]] = [
    # --- config keys and values ---
    ("misspelled key", args("sft.learning_rat=1e-4"), "error: sft.learning_rat: unknown key; did you mean learning_rate?"),
    ("misspelled key, +", args("+sft.learning_rat=1e-4"), "error: sft.learning_rat: unknown key; did you mean learning_rate?"),
    ("misspelled nested key", args("sft.eval.num_prompt=3"), "error: sft.eval.num_prompt: unknown key; did you mean num_prompts?"),
    ("misspelled section", args("rnu.seed=3"), "error: rnu: unknown key; did you mean run?"),
    ("key of an interpolated section", args("sft.data.path=x.jsonl"), "error: sft.data.path: sft.data is ${data.sft}; set data.sft.path instead"),
    ("unknown group option", args("align=orpoo"), "error: align=orpoo: no such option of align; allowed: cpo, dpo"),
    ("value of the wrong type", args("align.beta=abc"), "error: align.beta: expected float, got 'abc'"),
    ("value out of range", args("sft.learning_rate=-1"), "error: sft.learning_rate: -1.0 must be > 0"),
    ("override that does not parse", args("align.beta=[1"), "error: align.beta=[1: cannot be parsed"),
    ("unknown method", args("align.method=ppo"), "error: align.method: unknown method 'ppo'; allowed: none, sft, dpo"),
    ("unknown trainer argument", args("+sft.trainer_args.no_such_arg=1"), "error: sft.trainer_args.no_such_arg: not a field of TRL's SFTConfig"),
    ("trainer argument without +", args("sft.trainer_args.seed=1"), "error: sft.trainer_args.seed: not in the config; add it with +sft.trainer_args.seed="),
    ("deepspeed stage", args("deepspeed.stage=5"), "error: deepspeed.stage: 5 is not one of null, 0, 1, 2, 3"),
    ("logger backend", args("logger.backend=mlflow"), "error: logger.backend: 'mlflow' is not one of none, wandb, tensorboard"),
    ("gate without its judge", args("align.gate.min_win_rate=0.5"), "error: align.gate.min_win_rate: needs a judge: align.eval.judge"),
    # --- what the config refers to ---
    ("judge module missing", args("sft.eval.judge=no_such_module_xyz:judge"), "error: sft.eval.judge: cannot import 'no_such_module_xyz:judge' (No module named 'no_such_module_xyz')"),
    ("reward module missing", args("align=grpo", "align.reward=no_such_module_xyz:score"), "error: align.reward: cannot import 'no_such_module_xyz:score'"),
    ("reference not before", args("align.reference=nope"), "error: align.reference: 'nope' is not a causal LM before 'align'"),
    ("stage without a section", args("run.stages=[sft,nope]"), "error: run.stages: 'nope' has no config section"),
    ("sweep objective", args("sweep.objective=nope.exact_match"), "error: sweep.objective: 'nope' is not a stage"),
    ("stage: data of no stage", args("data.preference.path=stage:pairs"), "error: align.data.path: 'pairs' is not an earlier data stage"),
    ("model folder missing", args(ANY_MODEL, "model.path=/no/such/model"), "error: model.path: '/no/such/model' does not exist"),
    ("model path is a file", file("model.bin", "x", key="model.path", extra=(ANY_MODEL,)), "is a file; give the model's folder (config.json, weights), a .gguf file or a hub id"),
    ("model folder without config", args(ANY_MODEL, "model.path={d}"), "holds no config.json; not a model folder"),
    ("hostfile missing", args("launcher=deepspeed", "launcher.hostfile=/no/such/hostfile"), "error: launcher.hostfile: /no/such/hostfile does not exist"),
    ("hostfile is a folder", args("launcher=deepspeed", "launcher.hostfile={d}"), "is a folder; give the hostfile in it"),
    ("hostfile line", deepspeed_hostfile("node-0 slots=eight\n"), "hosts line 1: 'node-0 slots=eight' is not `host slots=N`"),
    ("hostfile binary", deepspeed_hostfile(BINARY), "hosts is not a text file of `host slots=N` lines"),
    ("run folder under a file", file("blocker", "x", key="run.output_dir"), "error: run.output_dir: cannot create"),
    ("cache under a file", lambda d: (d / "blocker").write_text("x") and [f"run.cache_dir={d / 'blocker' / 'cache'}"], "error: run.cache_dir: cannot create"),
    # --- data files by their content ---
    ("empty jsonl", file("chat.jsonl", ""), "chat.jsonl: is empty (no rows)"),
    ("blank jsonl", file("chat.jsonl", "\n  \n\n"), "chat.jsonl: is empty (no rows)"),
    ("truncated line in the middle", file("chat.jsonl", lines(ROW, '{"messages": [{"role": "user", "con', ROW)), "chat.jsonl line 2: not valid JSON (Unterminated string starting at column 32)"),
    ("binary file", file("chat.jsonl", BINARY), "chat.jsonl line 1: holds a NUL byte: a binary file, not .jsonl text"),
    ("wrong encoding", file("chat.jsonl", lines(ROW).encode() + json.dumps(ROW).replace("5", "caf\u00e9").encode("latin-1")), "chat.jsonl line 2: not UTF-8 text (byte 0xe9"),
    ("JSON array in .jsonl", file("chat.jsonl", json.dumps([ROW, ROW], indent=1)), "chat.jsonl: holds one JSON array, but a .jsonl file holds one JSON object per line"),
    ("a line that is a list", file("chat.jsonl", lines(ROW, [1, 2])), "chat.jsonl line 2: expected a JSON object per line, got array"),
    ("field of the wrong type", file("chat.jsonl", lines(ROW, {"messages": "hi"})), "chat.jsonl line 2: messages: expected a non-empty list of messages, got str"),
    ("content of the wrong type", file("chat.jsonl", lines({"messages": [{"role": "user", "content": 3}, ROW["messages"][1]]})), "chat.jsonl line 1: messages[0].content: expected a string, got int"),
    ("no reply to learn from", file("chat.jsonl", lines({"messages": ROW["messages"][:1]})), "chat.jsonl line 1: messages: has no assistant turn to learn from"),
    ("one JSON object in .json", file("chat.json", json.dumps(ROW, indent=2)), "chat.json: holds one JSON object; expected an array of row objects"),
    ("JSON array item", file("chat.json", json.dumps([ROW, "row"])), "chat.json row 1 (0-based): expected a JSON object, got string"),
    ("CSV with a header only", file("chat.csv", "prompt,completion\n"), "chat.csv: is empty (no rows)"),
    ("CSV without the columns", file("chat.csv", "question,answer\nq,a\n"), "chat.csv: a sft stage needs the columns of one of: messages (messages); sharegpt"),
    ("damaged Parquet", corrupt_parquet, "chat.parquet: not a readable Parquet file"),
    ("gzip cut short", gzipped_cut_short, "chat.jsonl.gz: cannot be read"),
    ("unsupported file type", file("chat.txt", "hello\n"), "chat.txt: unsupported file type '.txt'; allowed: .json, .jsonl, .parquet, .csv"),
    ("folder without data files", lambda d: (d / "empty").mkdir() or [f"data.sft.path={d / 'empty'}"], "holds no data files"),
    ("folder without the held-out split", folder("data.sft.path", "train.jsonl", extra=("data.sft.eval_split=test",)), "no file of split 'test' (a name starting with test); found: train.jsonl"),
    ("column mapped to no column", lambda d: file("p.jsonl", lines(PAIR), key="data.preference.path")(d) + ["+data.preference.columns.chosen=answer"], "p.jsonl: columns.chosen: no column 'answer'; found: prompt, chosen, rejected"),
    ("SFT rows for a preference stage", file("chat.jsonl", lines(ROW), key="data.preference.path"), "these rows look like messages rows, which a preference stage cannot train on"),
    ("format that does not fit", args("data.sft.format=preference"), "error: sft.data.format: 'preference' rows do not fit sft (sft data)"),
    ("padding-free for a method without it", args("align=kto", "align.padding_free=true"), "error: align.padding_free: kto has no padding-free path; methods with one: sft, dpo, orpo, cpo, simpo"),
    ("unknown optimizer", args("align.optimizer=adam8bit"), "error: align.optimizer: 'adam8bit' is not one of adamw, adamw_kahan_bf16, adamw_sr_bf16"),
    ("bf16 optimizer under LoRA", args("peft=lora", "align.optimizer=adamw_kahan_bf16"), "error: align.optimizer: adamw_kahan_bf16 is for full fine-tunes; LoRA trains small fp32 adapters: use adamw"),
    ("bf16 optimizer with fp32 weights", args("model.dtype=float32", "sft.optimizer=adamw_sr_bf16"), "error: sft.optimizer: adamw_sr_bf16 trains bf16 weights; model.dtype=float32 asks for others (use auto or bfloat16)"),
    ("liger without the package or a GPU", args("sft.liger=true"), "error: sft.liger: "),
    ("auto micro-batch without a global batch", args("sft.per_device_train_batch_size=auto"), "error: sft.per_device_train_batch_size: auto needs sft.global_batch_size (the batch it keeps while it picks the micro-batch)"),
]  # fmt: skip


def run_in_process(argv: list[str], capfd) -> tuple[str, str]:
    """`posttrain <argv>` in this process: (its exit message, what it printed to stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    saved = sys.argv
    sys.argv = ["posttrain", *argv]
    try:
        with pytest.raises(SystemExit) as stop:
            cli.main()
    finally:
        sys.argv = saved
        os.environ.pop("HYDRA_FULL_ERROR", None)
    return str(stop.value.code), capfd.readouterr().err


def assert_nothing_finished(out: Path) -> None:
    if out.exists():
        left = [p.name for p in out.rglob("*") if p.name in ("summary.json", "manifest.json", "resolved.yaml")]
        assert not left and not list(out.rglob("*.safetensors")), left


def test_the_table_holds_forty_bad_inputs():
    assert len(BAD) >= 40 and len({name for name, _, _ in BAD}) == len(BAD)


@pytest.mark.parametrize(("name", "given", "message"), BAD, ids=[name for name, _, _ in BAD])
def test_a_bad_input_is_one_error_line_at_plan_time(tmp_path, capfd, name, given, message):
    out = tmp_path / "run"
    overrides = given(tmp_path)
    base = [f"run.output_dir={out}"] if not any(o.startswith("run.output_dir=") for o in overrides) else []
    error, stderr = run_in_process([*base, f"run.cache_dir={tmp_path / 'cache'}", *overrides], capfd)
    assert error.startswith("error: ") and "\n" not in error, error
    assert message in error, error
    assert "Traceback" not in stderr, stderr
    assert_nothing_finished(out)


@pytest.mark.parametrize("name", ["misspelled key", "truncated line in the middle", "judge module missing"])
def test_a_bad_input_exits_1_with_its_line_as_the_only_output_on_stderr(tmp_path, name):
    import subprocess

    _, given, message = next(row for row in BAD if row[0] == name)
    argv, env = posttrain_argv(f"run.output_dir={tmp_path / 'run'}", *given(tmp_path), cache_dir=tmp_path / "cache")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert_nothing_finished(tmp_path / "run")
