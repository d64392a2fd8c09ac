"""Stage keys and the cache index: a stage whose key matches a finished artifact is reused.

A stage's key hashes what decides its weights: its own config (minus logging, checkpoint
and evaluation settings), the model and PEFT settings, the seed, the world size (part of
the global batch), its data's fingerprint and its parent's key. The index
(`<run.cache_dir>/stages/<key>.json`) points at the one folder where a key is being or
was trained, so a sweep or a re-run in a new folder finds it.

    keys = stage_keys(cfg)                # {"sft": "3f2a...", "align": "9c01..."}
    StageIndex(cfg.run.cache_path).lookup(keys["sft"])
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain import artifacts, checkpoints, rewards
from posttrain.artifacts import file_digest, hash_json
from posttrain.config import (
    LIKELIHOOD_SCORERS,
    STAGE_PREFIX,
    Config,
    ConfigError,
    DataSource,
    ModelConfig,
    ScoreConfig,
    StageConfig,
    planned_world_size,
)
from posttrain.data.builtin import GENERATOR_VERSION, TaskSpec
from posttrain.data.files import data_files
from posttrain.stages import PLUGINS, STAGES, max_steps_rows

# Bump when a change to posttrain makes old artifacts differ from what the code now trains.
KEY_VERSION = 1
# model fields that describe the weights `path` names without deciding them (hub_id decides them
# only where it stands in for a missing package, and base_key then names it)
MODEL_NOT_IN_KEY = ("architecture", "hub_id")
# Stage fields that do not change the trained weights (activation checkpointing recomputes the
# same activations); global_batch_size is in the key through the accumulation derived from it
NOT_IN_KEY = (
    "logging_steps",
    "eval",
    "per_device_eval_batch_size",
    "checkpoint_steps",
    "global_batch_size",
    "activation_checkpointing",
)
# Stage fields added after keys were made, left out of the key at the value that trains as before
# (so adding a field does not retrain every cached stage)
KEY_OMITS_AT = {
    "reward_weights": None,
    "steps_per_generation": None,
    "epsilon_high": None,
    "mask_truncated_completions": False,
    "importance_sampling_level": "token",
    "band": None,
    "padding_free": False,
    "optimizer": "adamw",
    "compile": False,
    "liger": False,
}


# --- data fingerprints ------------------------------------------------------------------


def data_fingerprint(src: DataSource, builtin: TaskSpec, keys: dict[str, str] | None = None) -> str:
    """A hash of the data settings and of the rows' content, computed without loading them.

    Local files are hashed byte for byte; the built-in data by its generator settings; an
    earlier data stage's pairs by that stage's key (`keys`); a hub dataset by id, config,
    split and revision (pin `revision` for a reproducible key).
    """
    content: dict[str, Any] = {"data": data_settings(src), "sources": []}
    if src.score.by is not None:  # what decides the scores: a function's source, a model's key
        content["scorer"] = score_identity(src.score, "data.score.by", keys or {})
    for source in src.source_list():
        local = Path(source.path).expanduser()
        if source.path.startswith("builtin:"):
            content["sources"].append({"builtin": builtin.fingerprint()})
        elif source.path.startswith(STAGE_PREFIX):
            producer = source.path[len(STAGE_PREFIX) :]
            content["sources"].append({"stage": (keys or {}).get(producer, producer)})
        elif local.is_file():
            content["sources"].append({local.name: file_digest(local)})
        elif local.is_dir():
            content["sources"].append({str(f.relative_to(local)): file_digest(f) for f in data_files(local)})
        else:
            content["sources"].append({"hub": source.path})
    return hash_json(content)


def data_settings(src: DataSource) -> dict[str, Any]:
    """A stage's data settings as its key reads them: curation by score only where it is on, so
    keys made before it existed stay the same."""
    settings = dataclasses.asdict(src)
    if src.score.by is None:
        del settings["score"]
    else:  # the scoring model is named by its key, in the scorer's identity
        del settings["score"]["model"]
        for name, off in (("length_bins", 1), ("sample_from", None)):
            if settings["score"][name] == off:  # keys from before these settings existed stay the same
                del settings["score"][name]
    return settings


# --- stage keys -------------------------------------------------------------------------


def base_key(model: ModelConfig) -> str:
    """What names the base weights: hub id or folder (with revision), a GGUF file's content, or the
    tiny model's settings."""
    if model.path.startswith("builtin:"):
        identity = {"path": model.path, "revision": model.revision, "tiny": dataclasses.asdict(model.tiny)}
    else:
        identity = checkpoints.identity(model)
    return hash_json({"base": identity, "version": KEY_VERSION})


def stage_content(stage: StageConfig, cfg: Config) -> dict[str, Any]:
    """The part of the config that decides a stage's weights (recorded in its manifest): with
    max_steps, the rows those steps read (all the stage keeps, posttrain.stages.max_steps_rows); for
    a method another package registers, that package's name and version."""
    own = {
        k: v
        for k, v in dataclasses.asdict(stage).items()
        if k not in NOT_IN_KEY and not (k in KEY_OMITS_AT and v == KEY_OMITS_AT[k])
    }
    own["data"] = data_settings(stage.data)
    content = {
        "stage": own,
        "model": {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in MODEL_NOT_IN_KEY},
        "peft": dataclasses.asdict(cfg.peft),
        "seed": cfg.run.seed,
        "world_size": planned_world_size(cfg.launcher),
    }
    if (rows := max_steps_rows(stage, content["world_size"])) is not None:
        content["max_steps_rows"] = rows
    if stage.method in PLUGINS:
        content["plugin"] = PLUGINS[stage.method]
    return content


def stage_keys(cfg: Config) -> dict[str, str]:
    """Every stage's key, in chain order (`base` first)."""
    keys = {"base": base_key(cfg.model)}
    # the key of the model each stage hands on (a data stage hands on its parent's)
    model_keys = dict(keys)
    previous = "base"
    for name, stage in cfg.stages.items():
        parent = previous if stage.init_from == "previous" else stage.init_from
        content = {
            "config": stage_content(stage, cfg),
            "parent": model_keys[parent],
            "data": data_fingerprint(stage.data, cfg.data.builtin, keys),
            "version": KEY_VERSION,
        }
        if stage.reference:
            content["reference"] = model_keys[stage.reference]
        if STAGES[stage.method].uses_reward:
            content["reward"] = reward_identity(stage.reward, f"{name}.reward", keys)
        keys[name] = hash_json(content)
        model_keys[name] = model_keys[parent] if STAGES[stage.method].model_kind == "none" else keys[name]
        previous = name
    return keys


def reward_identity(spec: str | list[str], key: str, keys: dict[str, str]) -> Any:
    """What decides an online stage's rewards: the built-in checker's version, an rm stage's key,
    a reward model folder's manifest key, or a user function's import path and source (a list
    of sources: theirs, in order)."""
    if not isinstance(spec, str):
        return [reward_identity(source, key, keys) for source in spec]
    if spec == rewards.BUILTIN:
        return {"builtin": GENERATOR_VERSION}
    if spec == rewards.BUILTIN_PARTIAL:
        return {"builtin_partial": GENERATOR_VERSION}
    if spec in keys:
        return {"reward_model": keys[spec]}
    if rewards.is_function(spec):
        return rewards.function_identity(spec, key)
    manifest = artifacts.read_manifest(Path(spec).expanduser()) or {}
    return {"reward_model": manifest.get("key", spec)}


def score_identity(score: ScoreConfig, key: str, keys: dict[str, str]) -> Any:
    """What decides a stage's row scores: a likelihood scorer and its model's key (the base's or an
    earlier stage's), or the reward source's identity."""
    if score.by in LIKELIHOOD_SCORERS:
        return {"likelihood": score.by, "model": keys.get(score.model, score.model)}
    return reward_identity(score.by, key, keys)


def eval_key(stage: StageConfig, cfg: Config, eval_rows) -> str:
    """What decides a stage's held-out numbers besides its weights: its eval settings and the
    held-out rows themselves (a change to any stage's curation or training rows leaves it alone)."""
    rows = None if eval_rows is None else hash_json(eval_rows.to_list())
    return hash_json({"eval": dataclasses.asdict(stage.eval), "rows": rows, "seed": cfg.run.seed})


# --- the index --------------------------------------------------------------------------


class StageIndex:
    """key -> the folder that holds (or is training) that stage, shared by every run on this cache."""

    def __init__(self, cache_path: Path):
        self.folder = cache_path / "stages"

    def entry(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def lock_path(self, key: str) -> Path:
        return self.folder / f"{key}.lock"

    def register(self, key: str, stage_dir: Path) -> None:
        artifacts.write_json_atomic(self.entry(key), {"path": str(stage_dir.resolve())})

    def lookup(self, key: str) -> Path | None:
        """The registered folder for `key`, if it still holds that key (complete or not)."""
        try:
            folder = Path(json.loads(self.entry(key).read_text())["path"])
        except (OSError, ValueError, KeyError):
            return None
        manifest = artifacts.read_manifest(folder)
        return folder if manifest is not None and manifest.get("key") == key else None


# --- where each stage lives -------------------------------------------------------------


@dataclass
class Placement:
    """What to do for a stage: reuse a complete artifact, resume a checkpoint, or train afresh."""

    action: Literal["reuse", "resume", "train"]
    # the folder that holds (or will hold) the artifact; outside the run folder when found via the index
    folder: Path
    checkpoint: Path | None = None


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed = []
        for k in sorted(set(old) | set(new)):
            changed += config_changes(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return changed
    return [] if old == new else [prefix]


def check_run_folder(cfg: Config, keys: dict[str, str]) -> None:
    """Before anything trains: refuse a run folder whose stages were made with another config."""
    for name, stage in cfg.stages.items():
        folder = cfg.run.output_path / name
        if not folder.exists():
            continue
        manifest = artifacts.read_manifest(folder)
        where = f"run.output_dir: {folder}"
        if not folder.is_dir():
            raise ConfigError(
                f"{where} is a file in the way of stage {name}'s folder; move it or choose another run.output_dir"
            )
        complete = manifest is not None and manifest.get("status") == "complete"
        if not complete and (why := artifacts.unwritable(folder)) is not None:  # resumed or replaced: written
            raise ConfigError(f"{where}: cannot write stage {name}'s folder: {why}")
        if manifest is None:
            if folder.is_dir() and any(folder.iterdir()):
                raise ConfigError(f"{where} exists but is not a posttrain stage; choose a new run.output_dir")
            continue
        if manifest.get("key") == keys[name]:
            if complete and not cfg.run.reuse and not folder.is_symlink() and not artifacts.awaits_evaluation(manifest):
                raise ConfigError(f"{where} holds this stage complete; run.reuse=false needs a new run.output_dir")
            continue
        changes = config_changes(manifest.get("content", {}), stage_content(stage, cfg)) or ["its data or parent"]
        if complete:
            raise ConfigError(
                f"{where} holds a complete stage made with a different config (changed: {', '.join(changes)}); "
                "finished stages are never overwritten: choose a new run.output_dir"
            )
        if cfg.run.resume:
            raise ConfigError(
                f"{where} holds an unfinished stage with a different config (changed: {', '.join(changes)}); "
                "its checkpoint cannot be resumed: set run.resume=false to discard it, or choose a new run.output_dir"
            )


def place_stage(name: str, key: str, cfg: Config, index: StageIndex) -> Placement:
    """Decide, under the stage's lock, where stage `name` comes from."""
    own = cfg.run.output_path / name
    candidates = [own, index.lookup(key)] if cfg.run.reuse or cfg.run.resume else [own]
    found = []
    for folder in dict.fromkeys(c.resolve() for c in candidates if c is not None and c.exists()):
        manifest = artifacts.read_manifest(folder)
        if manifest is not None and manifest.get("key") == key:
            found.append((folder, manifest))
    for folder, manifest in found:
        own_unevaluated = folder == own.resolve() and artifacts.awaits_evaluation(manifest)
        if manifest["status"] != "complete" or not (cfg.run.reuse or own_unevaluated):
            continue
        problem = artifacts.damage(folder, manifest)
        if problem is None:
            return Placement("reuse", folder)
        if folder == own.resolve():
            raise ConfigError(
                f"run.output_dir: stage {name} in {folder} is damaged ({problem}); choose a new run.output_dir"
            )
        print(f"[posttrain] not reusing {folder}: {problem}", flush=True)
    for folder, manifest in found:
        checkpoint = artifacts.last_checkpoint(folder)
        if manifest["status"] != "complete" and cfg.run.resume and checkpoint is not None:
            return Placement("resume", folder, checkpoint)
    return Placement("train", own)


def link_stage(own: Path, folder: Path) -> None:
    """Make the run folder's `<stage>` entry point at `folder` (a symlink when it lives elsewhere)."""
    if own.resolve() == folder.resolve():
        return
    if own.is_symlink() or own.is_file():
        own.unlink()
    elif own.exists():
        artifacts.remove_folder(own)  # an unfinished attempt (check_run_folder refused anything complete)
    own.symlink_to(folder, target_is_directory=True)
