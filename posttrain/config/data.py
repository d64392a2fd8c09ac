"""The `data` section (conf/data/): the built-in tasks, and the rows each kind of stage reads: one
source or a mixture, its held-out split and curation. A stage's `data` is one `DataSource`.

    posttrain data.sft.path=/data/chat.jsonl data.sft.max_rows=20000
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config.build import STAGE_PREFIX, check_local_path
from posttrain.data import formats
from posttrain.data.builtin import TaskSpec
from posttrain.errors import require


@dataclass
class SourceConfig:
    """One source of a stage's rows: `builtin:sft`, `builtin:preference`, a hub id, a file or a folder."""

    path: str = "builtin:sft"
    # hub config name
    name: str | None = None
    # a subfolder of the dataset (Anthropic/hh-rlhf: harmless-base)
    data_dir: str | None = None
    split: str = "train"
    revision: str | None = None
    # named held-out split; null: hold out the stage's eval_fraction of `split`
    eval_split: str | None = None
    # row format: auto (from the columns) or one of formats.FORMATS
    format: str = "auto"
    # posttrain field -> the source's column (`chosen: response_a`)
    columns: dict[str, str] = field(default_factory=dict)
    # share of the mixture (relative to the other weighted sources); null: every row once
    weight: float | None = None
    # exactly this many rows (sampled, or repeated when the source has fewer)
    rows: int | None = None

    def validate(self, key: str) -> None:
        require(bool(self.path), f"{key}.path", "is empty; give a file, a folder, a hub id or builtin:sft")
        allowed = ", ".join(formats.FORMATS)
        require(self.format in formats.FORMATS, f"{key}.format", f"{self.format!r} is not one of {allowed}")
        for target, column in self.columns.items():
            fields = ", ".join(formats.COLUMN_FIELDS)
            require(target in formats.COLUMN_FIELDS, f"{key}.columns.{target}", f"not a field; allowed: {fields}")
            require(isinstance(column, str) and bool(column), f"{key}.columns.{target}", "must name a column")
        require(self.weight is None or self.weight > 0, f"{key}.weight", f"{self.weight} must be > 0 or null")
        require(self.rows is None or self.rows > 0, f"{key}.rows", f"{self.rows} must be > 0 or null")
        require(self.weight is None or self.rows is None, f"{key}.rows", "give weight or rows, not both")
        if self.path.startswith("builtin:"):
            builtins = ("builtin:sft", "builtin:preference")
            require(self.path in builtins, f"{key}.path", f"{self.path!r} is not one of {', '.join(builtins)}")
        elif self.path.startswith(STAGE_PREFIX):  # an earlier data stage's output (checked with the chain)
            require(bool(self.path[len(STAGE_PREFIX) :]), f"{key}.path", "stage: needs the stage's name")
        else:
            check_local_path(self.path, f"{key}.path")


# how score.balance groups rows: none, by source (a mixture's part) or by the rows' `task` field
BALANCES = ("none", "source", "task")
# scorers that read a model's own likelihood of each reply (posttrain/likelihood.py), where no reward exists
LIKELIHOOD_SCORERS = ("loss", "ifd")


@dataclass
class ScoreConfig:
    """Curation by score (posttrain/data/score.py): every train row scored, the best kept."""

    # the scorer, any reward source: builtin, builtin_partial, my_pkg.rewards:score, an earlier
    # rm stage of the recipe, or a folder holding an rm artifact; or the model's own signal: loss
    # (the reply's log-likelihood per token) or ifd (instruction-following difficulty); null: no scoring
    by: str | None = None
    # rows kept: a count (1000) or a share (0.25) of the rows curation left; null: every row at
    # or above min_score
    keep: float | None = None
    # rows scoring below this are dropped; null: no threshold
    min_score: float | None = None
    # the kept count is shared out in proportion to each group's rows: none, source, task
    balance: str = "none"
    # the kept count is also shared out evenly over this many bins of row length within each
    # group (1: none), so the kept rows span the data's lengths: a reward model or a likelihood
    # favours some lengths
    length_bins: int = 1
    # draw the kept count at random from this best share of each group's rows (0.5: the better
    # half) instead of taking the very best, which are also a scorer's easiest; null: the best
    sample_from: float | None = None
    # the model whose likelihood loss and ifd read: base, or an earlier causal-LM stage of the recipe
    model: str = "base"

    def validate(self, key: str) -> None:
        if self.by is None:
            require(
                self.keep is None and self.min_score is None,
                f"{key}.by",
                "is null: name the scorer that keep/min_score rank by (builtin, module:function, an rm stage)",
            )
            return
        keep = self.keep
        require(keep is None or keep > 0, f"{key}.keep", f"{keep} must be a row count (>= 1) or a share in (0, 1)")
        require(keep is None or keep < 1 or float(keep).is_integer(), f"{key}.keep", f"{keep} is not a whole count")
        require(keep is not None or self.min_score is not None, f"{key}.keep", "give keep or min_score (or both)")
        allowed = ", ".join(BALANCES)
        require(self.balance in BALANCES, f"{key}.balance", f"{self.balance!r} is not one of {allowed}")
        require(self.length_bins >= 1, f"{key}.length_bins", f"{self.length_bins} must be 1 (none) or more bins")
        share = self.sample_from
        require(share is None or 0 < share <= 1, f"{key}.sample_from", f"{share} must be a share in (0, 1]")
        require(share is None or keep is not None, f"{key}.sample_from", "draws keep rows: give keep")
        require(
            self.model == "base" or self.by in LIKELIHOOD_SCORERS,
            f"{key}.model",
            f"{self.model!r} is read only by a likelihood scorer ({', '.join(LIKELIHOOD_SCORERS)}); by is {self.by!r}",
        )


@dataclass
class DataSource:
    """A stage's rows: one source (`path` ...) or a mixture (`sources`), held-out split and curation."""

    path: str | None = "builtin:sft"
    name: str | None = None
    data_dir: str | None = None
    split: str = "train"
    revision: str | None = None
    eval_split: str | None = None
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    # a mixture: several sources, each with its own path, format, columns, weight or rows
    sources: list[SourceConfig] = field(default_factory=list)
    # share of each source's train split held out when it names no eval_split
    eval_fraction: float = 0.05
    # cap on train rows after curation and mixing (seeded sample); with weights, the mixture's size
    max_rows: int | None = None
    max_eval_rows: int | None = None
    # duplicate rows dropped: none, exact (same text), normalized (same text ignoring case,
    # whitespace and punctuation)
    dedup: str = "exact"
    # rows shorter than this many tokens are dropped (0: no lower bound)
    min_tokens: int = 0
    # rows longer than the stage's max_length: truncate (TRL cuts them) or drop
    overlong: str = "truncate"
    # train rows identical to a held-out row are dropped (no test leakage)
    drop_held_out_overlap: bool = True
    # score every train row and keep the best (after the filters above, before mixing)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def source_list(self) -> list[SourceConfig]:
        """The sources to load: the mixture, or the one source the shorthand fields name."""
        if self.sources:
            return list(self.sources)
        fields = ("path", "name", "data_dir", "split", "revision", "eval_split", "format", "columns")
        return [SourceConfig(**{f: getattr(self, f) for f in fields})]

    def validate(self, key: str) -> None:
        if self.sources:
            require(
                self.path is None,
                f"{key}.path",
                f"give one source (path) or a mixture (sources), not both; set {key}.path=null",
            )
            for i, source in enumerate(self.sources):
                source.validate(f"{key}.sources[{i}]")
        else:
            require(self.path is not None, f"{key}.path", "is null and there are no sources; give a path")
            self.source_list()[0].validate(key)
        require(0 <= self.eval_fraction < 1, f"{key}.eval_fraction", f"{self.eval_fraction} is not in [0, 1)")
        for name in ("max_rows", "max_eval_rows"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{key}.{name}", f"{value} must be a positive row count or null")
        dedups = ("none", "exact", "normalized")
        require(self.dedup in dedups, f"{key}.dedup", f"{self.dedup!r} is not one of {', '.join(dedups)}")
        require(self.min_tokens >= 0, f"{key}.min_tokens", f"{self.min_tokens} must be >= 0")
        overlongs = ("truncate", "drop")
        require(self.overlong in overlongs, f"{key}.overlong", f"{self.overlong!r} is not one of truncate, drop")
        self.score.validate(f"{key}.score")


@dataclass
class DataConfig:
    builtin: TaskSpec = field(default_factory=TaskSpec)
    sft: DataSource = field(default_factory=DataSource)
    preference: DataSource = field(default_factory=lambda: DataSource(path="builtin:preference"))
