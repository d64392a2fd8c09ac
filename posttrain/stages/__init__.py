"""Stage registry: a method name -> its StageSpec. Adding a method is one file and one line here,
or, from another package, an entry point in the `posttrain.stages` group that names its StageSpec:

    # the package's pyproject.toml
    [project.entry-points."posttrain.stages"]
    my_method = "my_package.stage:STAGE"

The registering package's name and version are part of its stages' keys, so upgrading it
retrains them instead of reusing artifacts the old code made.
"""

from __future__ import annotations

from posttrain.config import ConfigError, StageConfig
from posttrain.stages import cpo, dpo, grpo, kto, orpo, pairs, rm, sft, simpo
from posttrain.stages.base import StageSpec

ENTRY_POINT_GROUP = "posttrain.stages"

BUILTIN: dict[str, StageSpec] = {
    "sft": sft.STAGE,
    "dpo": dpo.STAGE,
    "orpo": orpo.STAGE,
    "kto": kto.STAGE,
    "cpo": cpo.STAGE,
    "simpo": simpo.STAGE,
    "rm": rm.STAGE,
    "pairs": pairs.STAGE,
    "grpo": grpo.STAGE,
}


# every method: the built-in ones, then (after load_plugins) those of installed packages
STAGES: dict[str, StageSpec] = dict(BUILTIN)
# method -> "<distribution> <version>" of the package that registered it
PLUGINS: dict[str, str] = {}


def max_steps_rows(stage: StageConfig, world: int) -> int | None:
    """The train rows a stage keeps (a seeded sample, before anything is computed on them): what
    its max_steps optimizer steps read on `world` processes. None: every row (it trains by epochs,
    makes data, or its rows per step are not known before its trainer prepares them)."""
    spec = STAGES[stage.method]
    if stage.max_steps <= 0 or spec.make_trainer is None:
        return None
    return spec.rows_for_steps(stage, world)


def load_plugins() -> None:
    """Add the methods other installed packages register to STAGES, once. Called when a config
    is loaded, not on import, so a plugin's own module may import posttrain.stages."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"{entry.dist.name} {entry.dist.version}" if entry.dist else entry.value
        where = f"{ENTRY_POINT_GROUP} entry point {entry.name} = {entry.value!r} ({origin})"
        if entry.name in BUILTIN or entry.name == "none":
            raise ConfigError(f"{where}: {entry.name!r} is a built-in method name; register it under another")
        if PLUGINS.get(entry.name, origin) != origin:
            raise ConfigError(f"{where}: method {entry.name!r} is also registered by {PLUGINS[entry.name]}")
        if entry.name in PLUGINS:
            continue
        try:
            spec = entry.load()
        except Exception as e:  # a plugin's import error, reported as one line that names it
            raise ConfigError(f"{where} cannot be loaded: {type(e).__name__}: {e}") from None
        if not isinstance(spec, StageSpec) or not issubclass(spec.config_cls, StageConfig):
            raise ConfigError(
                f"{where} gives {type(spec).__name__}, not a StageSpec (posttrain.stages.base) "
                "whose config_cls subclasses posttrain.config.StageConfig"
            )
        STAGES[entry.name], PLUGINS[entry.name] = spec, origin
