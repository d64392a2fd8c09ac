"""Run the stage chain of a validated config: base model -> stage -> stage -> summary.

Each stage starts from its parent's artifact folder (`init_from`), trains with its TRL
trainer, is evaluated, and is saved as an artifact whose manifest is written last.

    from posttrain.pipeline import run_pipeline   # run_pipeline(load_config(tree))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain import artifacts, chat_templates, launch, models, rewards, stage_cache
from posttrain.artifacts import Artifact
from posttrain.config import (
    GATE_METRICS,
    LIKELIHOOD_SCORERS,
    STAGE_PREFIX,
    Config,
    ConfigError,
    DataSource,
    ScoreConfig,
    StageConfig,
    planned_world_size,
)
from posttrain.data.builtin import write_tasks
from posttrain.data.load import DataError, StageData, load_stage_data
from posttrain.data.score import Scorer
from posttrain.distributed import agree, is_main, log, main_first
from posttrain.evaluate import evaluate_model, win_rate
from posttrain.likelihood import LikelihoodScorer
from posttrain.locks import FileLock
from posttrain.preemption import PreemptionGuard
from posttrain.report.data import format_report, plot_lengths, plot_scores
from posttrain.report.table import format_samples, format_table
from posttrain.stage_run import StageRun, run_stage
from posttrain.stages import STAGES, max_steps_rows

if TYPE_CHECKING:
    from datasets import Dataset


# --- data -------------------------------------------------------------------------------


def _uses_builtin(cfg: Config) -> bool:
    return any(src.path.startswith("builtin:") for s in cfg.stages.values() for src in s.data.source_list())


def builtin_folder(cfg: Config) -> Path:
    spec = cfg.data.builtin
    return write_tasks(spec, cfg.run.cache_path / "data" / f"builtin-{spec.fingerprint()}")


def produced_by(stage: StageConfig) -> list[str]:
    """The earlier data stages whose output this stage reads (`data.path: stage:<name>`)."""
    paths = [source.path for source in stage.data.source_list()]
    return [path[len(STAGE_PREFIX) :] for path in paths if path.startswith(STAGE_PREFIX)]


def with_stage_folders(data: DataSource, folders: dict[str, Path]) -> DataSource:
    """`stage:<name>` sources replaced by the folder of pairs that stage wrote (its test split held out)."""

    def resolved(source):
        if not source.path.startswith(STAGE_PREFIX):
            return source
        folder = folders[source.path[len(STAGE_PREFIX) :]] / "pairs"
        return dataclasses.replace(source, path=str(folder), eval_split=source.eval_split or "test")

    if data.sources:
        return dataclasses.replace(data, sources=[resolved(source) for source in data.sources])
    return resolved(data)


def waits_for(stage: StageConfig, cfg: Config) -> list[str]:
    """The earlier stages a stage's rows need: data stages whose pairs it reads, the rm stage (or
    the model a likelihood scorer reads) that scores its rows."""
    score = stage.data.score
    scorer = score.model if score.by in LIKELIHOOD_SCORERS else score.by
    return produced_by(stage) + ([scorer] if scorer in cfg.stages else [])


def scored_by_a_model(stage: StageConfig, cfg: Config) -> bool:
    """Its rows are scored by a model (an rm stage's, or a likelihood): checked up front, unscored,
    and scored when the chain reaches the stage, after the base model's evaluation."""
    return stage.data.score.by in cfg.stages or stage.data.score.by in LIKELIHOOD_SCORERS


def stage_scorer(cfg: Config, name: str, stage: StageConfig, tokenizer, done: dict[str, Artifact]):
    """What scores the stage's rows (`data.score.by`), or None; `done`: the stages finished so far
    (and `base`)."""
    score = stage.data.score
    if score.by is None:
        return None
    key = f"{name}.data.score.by"
    identity = stage_cache.score_identity(score, key, stage_cache.stage_keys(cfg))
    if score.by in LIKELIHOOD_SCORERS:
        reward = LikelihoodScorer(score.by, done[score.model].source, cfg.model, tokenizer)
    else:
        reward = rewards.load_reward(score.by, key, reward_models(cfg, done), cfg.model, tokenizer)
    return Scorer(score.by, artifacts.hash_json(identity), reward, cfg.run.cache_path / "scores")


def reward_models(cfg: Config, done: dict[str, Artifact]) -> dict[str, str]:
    """The rm stages finished so far, name -> folder: the reward sources an online stage or a
    scorer may name."""
    return {name: a.folder for name, a in done.items() if name in cfg.stages and is_reward_model(cfg.stages[name])}


def is_reward_model(stage: StageConfig) -> bool:
    return STAGES[stage.method].model_kind == "reward"


def load_data(cfg: Config, name: str, stage: StageConfig, tokenizer, folders: dict[str, Path], done=None) -> StageData:
    source_folder = builtin_folder(cfg) if _uses_builtin(cfg) else Path()
    kind = STAGES[stage.method].data_kind
    rows = max_steps_rows(stage, planned_world_size(cfg.launcher))
    try:
        data = with_stage_folders(stage.data, folders)
        scorer = stage_scorer(cfg, name, stage, tokenizer, done or {})
        return load_stage_data(data, kind, source_folder, cfg.run.seed, tokenizer, stage.max_length, rows, scorer)
    except DataError as e:
        raise DataError(f"{name}.data: {e}") from None


def load_all_data(cfg: Config, tokenizer) -> dict[str, StageData]:
    """Every stage's rows, checked and curated before any model is loaded; the data report is
    printed and written into the run folder. Stages whose rows need an earlier stage are loaded
    again when it is done (`load_later`): those that read its pairs, and those it scores (their
    rows are checked now, unscored, and their held-out rows are final)."""
    data = {}
    for name, stage in cfg.stages.items():
        if produced_by(stage):
            continue
        if scored_by_a_model(stage, cfg):  # checked now, scored later
            stage = dataclasses.replace(stage, data=dataclasses.replace(stage.data, score=ScoreConfig()))
        data[name] = load_data(cfg, name, stage, tokenizer, {})
    report_data(cfg, {name: d for name, d in data.items() if not loads_later(cfg.stages[name], cfg)})
    return data


def loads_later(stage: StageConfig, cfg: Config) -> bool:
    return bool(waits_for(stage, cfg)) or scored_by_a_model(stage, cfg)


def load_later(cfg: Config, name: str, stage: StageConfig, tokenizer, done: dict[str, Artifact]) -> StageData:
    """The rows of a stage that needs earlier stages or a model (`loads_later`), now that they are done."""
    folders = {producer: Path(done[producer].folder) for producer in produced_by(stage)}
    with main_first():
        loaded = load_data(cfg, name, stage, tokenizer, folders, done)
    report_data(cfg, {name: loaded})
    return loaded


def report_data(cfg: Config, data: dict[str, StageData]) -> None:
    """Print the data report of these stages and add it to the run folder's."""
    if not is_main() or not data:
        return
    out = cfg.run.output_path
    reports = {name: format_report(name, d.report) for name, d in data.items()}
    print("\n\n".join(reports.values()), flush=True)
    earlier = artifacts.read_json(out / "data_report.json") if (out / "data_report.json").exists() else None
    everything = {**(earlier or {}), **{name: d.report for name, d in data.items()}}
    artifacts.write_json_atomic(out / "data_report.json", everything)
    (out / "data_report.md").write_text("\n\n".join(format_report(n, r) for n, r in everything.items()) + "\n")
    if earlier is None:
        max_lengths = {name: stage.max_length for name, stage in cfg.stages.items()}
        plot_lengths({name: d.lengths for name, d in data.items()}, max_lengths, out / "data_lengths.png")
    plot_scores({name: r.get("score") for name, r in everything.items()}, out / "data_scores.png")


def eval_conversations(cfg: Config, data: dict[str, StageData]) -> Dataset | None:
    """Held-out conversations for exact match and response loss: the first SFT stage's, else
    the first preference stage's prompts with their chosen replies."""
    from datasets import Dataset

    for name, stage in cfg.stages.items():
        if STAGES[stage.method].data_kind == "sft" and data[name].eval is not None:
            held_out = data[name].eval
            return held_out if "messages" in held_out.column_names else None
    for name in cfg.stages:
        held_out = data[name].eval
        if held_out is not None and "chosen" in held_out.column_names:
            return Dataset.from_dict({"messages": [r["prompt"] + r["chosen"] for r in held_out]})
    return None


# --- the chain ---------------------------------------------------------------------------


def check_writable(folder: Path) -> None:
    """An unwritable or missing-parent run folder is a clear error before anything trains."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".posttrain-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.output_dir: cannot write to {folder} ({e.strerror or e})") from None


def check_chat_template(cfg: Config, tokenizer, source: str) -> None:
    """Assistant-only loss needs a template that marks assistant tokens: never train on prompts silently."""
    for name, stage in cfg.stages.items():
        if getattr(stage, "assistant_only_loss", False) and not models.marks_assistant_tokens(tokenizer):
            raise ConfigError(
                f"{name}.assistant_only_loss: the chat template of {source!r} cannot mark assistant tokens "
                "(no {% generation %} block) and would train on the prompts too; set model.chat_template "
                f"({', '.join(chat_templates.CHAT_TEMPLATES)}, or a Jinja string with one) or "
                f"{name}.assistant_only_loss=false"
            )


def evaluate_base(cfg: Config, keys: dict[str, str], tokenizer, eval_rows, source: str):
    """Base-model metrics, cached per (base model, evaluation settings): a sweep evaluates it once."""
    first = next(iter(cfg.stages.values()))
    name = stage_cache.hash_json([keys["base"], stage_cache.eval_key(first, cfg, eval_rows)])
    path = cfg.run.cache_path / "evals" / f"base-{name}.json"
    if cfg.run.reuse and (cached := artifacts.read_json(path)) is not None:
        log(f"base model metrics reused from {path}")
        return cached["metrics"], cached["replies"]
    log(f"evaluating base model {source}")
    model = models.load_model(source, cfg.model)
    metrics, replies = evaluate_model(model, tokenizer, eval_rows, first.eval)
    artifacts.write_json_atomic(path, {"metrics": metrics, "replies": replies})
    return metrics, replies


def reused_stage(run: StageRun, cfg: Config, tokenizer, eval_rows) -> tuple[dict, list[dict]]:
    """A complete artifact's metrics; its held-out evaluation is redone if the evaluation settings changed."""
    manifest = artifacts.read_manifest(run.folder) or {}
    metrics, replies = dict(manifest.get("metrics", {})), manifest.get("replies", [])
    generates = STAGES[run.stage.method].model_kind == "causal_lm"
    if generates and manifest.get("eval_key") != stage_cache.eval_key(run.stage, cfg, eval_rows):
        if artifacts.awaits_evaluation(manifest):
            log(f"stage {run.name}: evaluating the saved model (its evaluation was stopped)")
        else:
            log(f"stage {run.name}: evaluation settings changed, evaluating the reused model again")
        model = models.load_model(str(run.folder), cfg.model)
        eval_metrics, replies = evaluate_model(model, tokenizer, eval_rows, run.stage.eval)
        metrics.update(eval_metrics)
    return metrics, replies


def reuse_or_run(
    run: StageRun, cfg: Config, tokenizer, eval_rows, guard: PreemptionGuard, timings: dict
) -> tuple[str, dict, list[dict]]:
    """Reuse, resume or train one stage, holding its key's lock (a parallel sweep job waits)."""
    index = stage_cache.StageIndex(cfg.run.cache_path)

    def waiting(holder: str) -> None:
        log(f"stage {run.name}: waiting for {holder}, which is training the same stage")

    # rank 0 holds the lock and decides; the other ranks take its placement
    lock = FileLock(index.lock_path(run.key), f"stage {run.name}", wait=True, on_wait=waiting)
    with lock if is_main() else contextlib.nullcontext():
        placement = agree(stage_cache.place_stage(run.name, run.key, cfg, index) if is_main() else None)
        run.folder, run.checkpoint = placement.folder, placement.checkpoint
        if placement.action == "reuse":
            if is_main():
                stage_cache.link_stage(cfg.run.output_path / run.name, run.folder)
            log(f"stage {run.name} ({run.stage.method}): reusing complete artifact {run.folder}")
            evaluate = functools.partial(reused_stage, run, cfg, tokenizer, eval_rows)
            reused = guard.on_main(f"stage {run.name}: evaluation", evaluate)
            return "reused", *reused
        how = f"resuming {run.checkpoint}" if run.checkpoint else f"starting from {run.parent.name}"
        log(f"stage {run.name} ({run.stage.method}) {how}; rows: {len(run.data.train)} train")
        metrics, replies, stage_timings = run_stage(run, cfg, tokenizer, eval_rows, guard, index)
        timings.update(stage_timings)
        log(f"stage {run.name} complete: {run.folder}")
        return ("resumed" if run.checkpoint else "trained"), metrics, replies


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """Run every stage; return the summary (also written to `<output_dir>/summary.json`).

    Complete stages with the same key are reused, an interrupted one resumes from its
    checkpoint, SIGTERM/SIGUSR1 stop at a checkpoint and raise Preempted.
    """
    from transformers import set_seed

    out = cfg.run.output_path
    keys = stage_cache.stage_keys(cfg)
    if is_main():
        check_writable(out)
        stage_cache.check_run_folder(cfg, keys)
    set_seed(cfg.run.seed)
    t0 = time.time()
    with PreemptionGuard(stop_file=launch.stop_file(out)) as guard:
        # one process: a signal stops the loading at once (several: each rank stops after it, together)
        with guard.interruptible("loading the model and the data"), main_first():
            # rank 0 builds the tiny model and fills the data caches
            base_source = models.base_model_source(cfg.model, cfg.run.cache_path)
            tokenizer = models.load_tokenizer(base_source, cfg.model)
            check_chat_template(cfg, tokenizer, base_source)
            log("loading data")
            data = load_all_data(cfg, tokenizer)
        guard.check("after loading the data")
        eval_rows = eval_conversations(cfg, data)
        timings = {"setup": time.time() - t0}

        t = time.time()
        base_metrics, base_replies = guard.on_main(
            "evaluating the base model", lambda: evaluate_base(cfg, keys, tokenizer, eval_rows, base_source)
        )
        timings["eval:base"] = time.time() - t
        results = {"base": {"method": "base", "status": "base", "metrics": base_metrics, "path": base_source}}
        replies = {"base": base_replies}

        gate_error = None
        done: dict[str, Artifact] = {"base": Artifact("base", base_source, keys["base"])}
        previous = done["base"]
        for name, stage in cfg.stages.items():
            guard.check(f"before stage {name}")
            parent = previous if stage.init_from == "previous" else done[stage.init_from]
            reference = done[stage.reference] if stage.reference else None
            if loads_later(stage, cfg):
                with guard.interruptible(f"loading stage {name}'s data"):
                    data[name] = load_later(cfg, name, stage, tokenizer, done)
                guard.check(f"after loading stage {name}'s data")
            fingerprint = stage_cache.data_fingerprint(stage.data, cfg.data.builtin, keys)
            run = StageRun(name, stage, keys[name], parent, data[name], out / name, fingerprint, reference=reference)
            run.reward_models = reward_models(cfg, done)
            status, metrics, replies[name] = reuse_or_run(run, cfg, tokenizer, eval_rows, guard, timings)
            if stage.eval.judge:
                metrics = {**metrics, **judged(name, stage, parent.name, replies)}
            results[name] = {"method": stage.method, "status": status, "metrics": metrics, "path": str(run.folder)}
            # a data stage passes its parent's model on; its own folder holds the data it wrote
            model_kind = STAGES[stage.method].model_kind
            model = parent if model_kind == "none" else Artifact(name, str(run.folder), run.key)
            done[name] = previous = dataclasses.replace(model, folder=str(run.folder))
            if missed := missed_gate(name, stage, metrics):
                gate_error = f"{missed}; the chain stops after {name} (its model is complete in {run.folder})"
                break

    first_stage = next(iter(cfg.stages.values()))
    if not is_main():
        if gate_error:
            raise artifacts.GateError(gate_error)
        return {"status": "complete", "stages": results}
    summary = {
        "status": f"stopped: {gate_error}" if gate_error else "complete",
        "stages": results,
        "samples": _side_by_side(replies, first_stage.eval.num_samples),
        "timings_s": timings,
        "total_s": time.time() - t0,
    }
    artifacts.write_json_atomic(out / "summary.json", summary)
    (out / "samples.md").write_text(format_samples(summary["samples"]))
    print(format_table(results, [c for s in cfg.stages.values() for c in STAGES[s.method].summary_metrics]))
    log(f"done in {summary['total_s']:.0f}s; summary: {out / 'summary.json'}")
    if gate_error:
        raise artifacts.GateError(gate_error)
    return summary


def judged(name: str, stage: StageConfig, parent: str, replies: dict[str, list[dict]]) -> dict[str, float]:
    """win_rate_vs_parent by the stage's judge, when both it and its parent generated replies."""
    rate = win_rate(stage.eval.judge, replies.get(name, []), replies.get(parent, []))
    if rate is None:
        log(f"stage {name}: no win rate: {parent} has no replies to the same prompts (set {parent}.eval.judge too)")
        return {}
    log(f"stage {name}: win rate over {parent} by {stage.eval.judge}: {rate:.3f}")
    return {"win_rate_vs_parent": rate}


def missed_gate(name: str, stage: StageConfig, metrics: dict[str, float]) -> str | None:
    """The first bound of `stage.gate` that the stage's metrics miss, in words, or None."""
    for bound, limit in stage.gate.bounds().items():
        value = metrics.get(GATE_METRICS[bound])
        if value is None:
            return f"{name}.gate.{bound}: the stage reported no {GATE_METRICS[bound]}"
        lower = bound.startswith("min_")
        if (value < limit) if lower else (value > limit):
            metric, relation = GATE_METRICS[bound], "<" if lower else ">"
            return f"stage {name} missed its gate: {metric} {value:.4g} {relation} {name}.gate.{bound}={limit:g}"
    return None


def _side_by_side(replies: dict[str, list[dict]], count: int) -> list[dict]:
    """The first `count` held-out prompts with every stage's greedy reply."""
    rows = []
    for i, record in enumerate(replies.get("base", [])[:count]):
        row = {"prompt": record["prompt"], "reference": record["reference"]}
        row.update({stage: recs[i]["reply"] for stage, recs in replies.items() if i < len(recs)})
        rows.append(row)
    return rows
