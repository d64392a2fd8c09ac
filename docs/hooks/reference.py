"""The configuration reference, generated from the schema when the site builds (an MkDocs hook).

The dataclasses (posttrain/config/, and each method's StageConfig subclass in posttrain/stages/)
give every field, its type and its default; the comment above the key in conf/ (else the comment
above the field in its dataclass) says what it does; each option's file gives its description
and its values. Nothing in the reference is written by hand:

    mkdocs build --strict                 # mkdocs.yml: hooks: [docs/hooks/reference.py]
    python docs/hooks/reference.py        # the fields that have no comment (tests/docs/ checks none)
"""

from __future__ import annotations

import dataclasses
import functools
import html
import inspect
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the checkout being documented, not another installed copy
    sys.path.insert(0, str(REPO))

from posttrain import config as schema  # noqa: E402
from posttrain.data.builtin import TaskSpec  # noqa: E402
from posttrain.stages import STAGES  # noqa: E402
from posttrain.stages.base import OnlineStageConfig  # noqa: E402

CONF = REPO / "conf"
# page (under docs/reference/) -> its title, in the order of the site's navigation
PAGES = {
    "index.md": "Configuration reference",
    "model.md": "model and peft",
    "data.md": "data",
    "stages.md": "stages and methods",
    "run.md": "run and recipes",
    "launcher.md": "launcher and deepspeed",
    "sweep.md": "sweep and logger",
}


# --- comments in the yaml and in the dataclasses -----------------------------------------

KEY = re.compile(r"^(\s*)([A-Za-z_]\w*)\s*:(.*)$")


@dataclass
class YamlFile:
    """One file of conf/: the comment block that opens it (the option's description) and the
    comment above each key, by dotted key (`tiny.hidden_size`)."""

    path: Path
    header: list[str] = field(default_factory=list)
    comments: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.relative_to(CONF).as_posix()

    @property
    def description(self) -> str:
        """The header's prose, without the command lines it shows."""
        return " ".join(line.strip() for line in self.header if not line.startswith("  "))

    @property
    def text(self) -> str:
        return self.path.read_text()

    @functools.cached_property
    def values(self) -> dict:
        """The file's keys and values as written (interpolations unresolved), flattened to dotted keys."""
        return flatten(yaml.safe_load(self.text) or {})


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        out[f"{prefix}{key}"] = value
    return out


def split_header(block: list[str], key: str) -> tuple[list[str], list[str]]:
    """The comment block that opens a file, before its first key: (the file's header, the key's
    comment). Both are written without a blank line between them in conf/; the header is what
    ends with a sentence's full stop or a command line (`#   posttrain ...`), else every line but
    the last, and the rest is the key's."""
    if key == "defaults":
        return block, []
    ends = [i for i, line in enumerate(block) if line.rstrip().endswith(".") or line.startswith("  ")]
    cut = ends[-1] + 1 if ends else len(block) - 1
    return block[:cut], block[cut:]


def parse_yaml(path: Path) -> YamlFile:
    found = YamlFile(path)
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    block_indent: int | None = None  # inside a `key: |` block scalar
    first = True
    for line in path.read_text().splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not stripped or indent > block_indent:
                continue
            block_indent = None
        if not stripped:
            if first and pending:  # a block ended by a blank line before any key: the header
                found.header += pending
            pending = []
            continue
        if stripped.startswith("#"):
            text = stripped[1:]
            if not text.strip().startswith("@package"):
                pending.append(text[1:] if text.startswith(" ") else text)
            continue
        match = KEY.match(line)
        if match is None or stripped.startswith("-"):
            pending = []
            continue
        key_indent, key, rest = len(match[1]), match[2], match[3].strip()
        if first:
            first = False
            header, pending = split_header(pending, key)
            found.header += header
        while stack and stack[-1][0] >= key_indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        if pending:
            found.comments[dotted] = " ".join(p.strip() for p in pending)
        pending = []
        stack.append((key_indent, key))
        if rest.startswith(("|", ">")):
            block_indent = key_indent
    return found


def yaml_file(name: str) -> YamlFile:
    return parse_yaml(CONF / name)


def group_files(group: str, first: tuple[str, ...] = ()) -> list[YamlFile]:
    """The options of a config group, the ones named in `first` first, then by name."""
    paths = sorted((CONF / group).glob("*.yaml"))
    paths.sort(key=lambda p: (p.stem not in first, first.index(p.stem) if p.stem in first else 0, p.stem))
    return [parse_yaml(p) for p in paths]


def dataclass_comments(cls: type) -> dict[str, str]:
    """The comment above each field in the dataclass's source (a subclass's over its bases')."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        lines = textwrap.dedent(inspect.getsource(klass)).splitlines()
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("class "))
        pending: list[str] = []
        for line in lines[start + 1 :]:
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped[1:].strip())
                continue
            match = re.match(r"^    (\w+)\s*:", line)
            if match and pending:
                found[match[1]] = " ".join(pending)
            pending = []
    return found


# --- fields ---------------------------------------------------------------------------------


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def section_type(tp: Any) -> type | None:
    """The dataclass a field holds (also when it may be null), else None."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    found = [t for t in options if dataclasses.is_dataclass(t)]
    return found[0] if found else None


def yaml_value(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    value = list(value) if isinstance(value, tuple) else value
    if isinstance(value, str) and value and value == value.strip():
        return value
    return yaml.safe_dump([value], default_flow_style=True, width=10_000, sort_keys=False).strip()[1:-1]


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def prose(text: str) -> str:
    """A comment as Markdown: angle brackets shown, not read as HTML (`<stage>/adapter/`)."""
    return html.escape(text, quote=False)


@dataclass
class Entry:
    """One field as the reference shows it."""

    key: str  # as a user writes it after the section's name: `tiny.hidden_size`
    anchor: str
    type: str
    default: Any
    comment: str | None
    where: str  # the file its comment came from
    link: str | None = None  # a field that holds another section: where that is documented


@dataclass
class Block:
    """A run of fields to document: a dataclass's fields (less `skip`), found in `sources`."""

    cls: type
    anchor: str  # prefix of every entry's anchor
    # where comments come from, in order: (yaml file, key prefix), or None for the dataclass's own
    sources: list[tuple[YamlFile, str] | None]
    skip: frozenset[str] = frozenset()
    # fields that hold another documented section: field -> link
    links: dict[str, str] = field(default_factory=dict)
    # where defaults come from, in order (the default option's file, as a user gets it; a prefix
    # of dotted keys), before the dataclass's own
    values: list[tuple[YamlFile, str]] = field(default_factory=list)

    def entries(self) -> list[Entry]:
        return list(self._entries(self.cls, ""))

    def _entries(self, cls: type, prefix: str):
        hints = typing.get_type_hints(cls)
        own = dataclass_comments(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if key in self.skip:
                continue
            comment, where = self.comment(key, own.get(f.name), cls)
            nested = section_type(hints[f.name])
            link = self.links.get(key)
            default = next(
                (v[prefix_ + key] for file, prefix_ in self.values if prefix_ + key in (v := file.values)),
                default_of(f),
            )
            shown = None if dataclasses.is_dataclass(default) or isinstance(default, dict) and nested else default
            anchor = f"{self.anchor}-{key.replace('.', '-')}"
            yield Entry(key, anchor, type_name(hints[f.name]), shown, comment, where, link)
            if nested is not None and link is None:
                yield from self._entries(nested, key + ".")

    def comment(self, key: str, own: str | None, cls: type) -> tuple[str | None, str]:
        for source in self.sources:
            if source is None:
                if own:
                    return own, f"{cls.__module__.replace('.', '/')}.py"
                continue
            file, prefix = source
            if (text := file.comments.get(prefix + key)) is not None:
                return text, f"conf/{file.name}"
        return (own, f"{cls.__module__.replace('.', '/')}.py") if own else (None, "")


def render_entries(entries: list[Entry], level: str = "###") -> list[str]:
    out = []
    for e in entries:
        out += [f"{level} `{e.key}` {{ #{e.anchor} }}", ""]
        default = f" · default `{yaml_value(e.default)}`" if e.default is not None or e.type.endswith("null") else ""
        if e.link:
            out += [f"`{e.type}`{default} · see [{e.link.split('#')[-1]}]({e.link})", ""]
        else:
            out += [f"`{e.type}`{default}", ""]
        if e.comment:
            out += [prose(e.comment), ""]
        if e.where:
            out += [f"<small markdown>from `{e.where}`</small>", ""]
    return out


def render_options(files: list[YamlFile], group: str, default: str | None) -> list[str]:
    """A table of a group's options, then each option's file, folded."""
    out = ["| option | what it is |", "|---|---|"]
    for f in files:
        mark = " (default)" if f.path.stem == default else ""
        cell = prose(f.description).replace("|", "\\|") or "-"  # a pipe in <|eot_id|> would end the cell
        out.append(f"| `{group}={f.path.stem}`{mark} | {cell} |")
    out.append("")
    for f in files:
        out += [f'??? example "`{group}={f.path.stem}`: conf/{f.name}"', "", "    ```yaml"]
        out += [f"    {line}".rstrip() for line in f.text.rstrip().splitlines()]
        out += ["    ```", ""]
    return out


# --- the pages ----------------------------------------------------------------------------


def root_defaults() -> dict[str, str]:
    """group -> its default option, from conf/config.yaml's defaults list."""
    tree = yaml.safe_load((CONF / "config.yaml").read_text())
    out = {}
    for item in tree["defaults"]:
        if isinstance(item, dict):
            (group, option), *_ = item.items()
            out[group.split("@")[0].removeprefix("optional ").strip()] = str(option)
    return out


@dataclass
class Page:
    name: str
    lines: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines += lines

    def fields(self, block: Block, level: str = "###") -> None:
        self.blocks.append(block)
        self.lines += render_entries(block.entries(), level)


def front(title: str, intro: str) -> list[str]:
    # search.boost: a field's own entry comes before the pages that mention it
    return ["---", "search:", "  boost: 2", "---", "", f"# {title}", "", intro, ""]


GENERATED = (
    "*Generated from the schema when the site is built (`docs/hooks/reference.py`): fields, types and "
    "defaults from the dataclasses, what each does from the comment above it in `conf/`.*"
)


def model_page(defaults: dict[str, str]) -> Page:
    page = Page("model.md", front("model and peft", GENERATED))
    models = group_files("model", ("tiny",))
    page.add("## `model` { #model }", "", f"The model every stage starts from ({schema.ModelConfig.__module__}).", "")
    page.fields(Block(schema.ModelConfig, "model", [(f, "") for f in models] + [None], values=[(models[0], "")]))
    page.add("## `model` options", "", *render_options(models, "model", defaults.get("model")))
    pefts = group_files("peft", ("lora", "none"))
    page.add(
        "## `peft` { #peft }",
        "",
        "Full fine-tuning, LoRA or QLoRA, for every stage (a stage's own `peft` overrides it).",
        "",
    )
    page.fields(Block(schema.PeftConfig, "peft", [(f, "") for f in pefts] + [None], values=[(pefts[1], "")]))
    page.add("## `peft` options", "", *render_options(pefts, "peft", defaults.get("peft")))
    return page


def data_page(defaults: dict[str, str]) -> Page:
    page = Page("data.md", front("data", GENERATED))
    files = group_files("data", ("ultrachat_ultrafeedback", "tiny"))
    tiny = [f for f in files if f.path.stem == "tiny"]
    page.add(
        "## `data.builtin` { #data-builtin }",
        "",
        "The built-in verifiable tasks (`builtin:sft`, `builtin:preference`).",
        "",
    )
    page.fields(
        Block(TaskSpec, "data-builtin", [(f, "builtin.") for f in tiny] + [None], values=[(tiny[0], "builtin.")])
    )
    page.add(
        "## A data source: `data.sft`, `data.preference` { #data }",
        "",
        "The rows of one kind of stage: one source, or a mixture (`sources`), its held-out split and "
        "curation. `data.sft` defaults to `builtin:sft`, `data.preference` to `builtin:preference`; a "
        "stage's `data` is one of these (`sft.data: ${data.sft}`) or a source of its own.",
        "",
    )
    sources = [(f, f"{kind}.") for kind in ("sft", "preference") for f in files] + [None]
    page.fields(Block(schema.DataSource, "data", sources, links={"sources": "#data-sources-item"}))
    page.add(
        "## A mixture's source: `sources[]` { #data-sources-item }",
        "",
        "One entry of a data source's `sources` list.",
        "",
    )
    page.fields(Block(schema.SourceConfig, "data-sources-item", [None, *sources]))
    page.add("## `data` options", "", *render_options(files, "data", defaults.get("data")))
    return page


def stages_page(defaults: dict[str, str]) -> Page:
    page = Page("stages.md", front("stages and methods", GENERATED))
    shared, online = yaml_file("shared/stage.yaml"), yaml_file("shared/online.yaml")
    page.add(
        "## Fields every stage shares",
        "",
        "Every stage section (`sft`, `align`, `pairs`, and the ones you add with `+align@align2=dpo`) "
        "has these; set them as `<stage>.<field>`, e.g. `align.max_steps=100`. Their defaults are "
        "`conf/shared/stage.yaml`'s, which each method's option pulls in; a method's option changes some.",
        "",
    )
    stage_link = {"data": "data.md#data"}
    page.fields(Block(schema.StageConfig, "stage", [(shared, ""), None], links=stage_link, values=[(shared, "")]))
    base = {f.name for f in dataclasses.fields(schema.StageConfig)}
    online_fields = {f.name for f in dataclasses.fields(OnlineStageConfig)}
    page.add(
        "## Fields every online stage shares",
        "",
        "The stages that sample replies from their model and score them (`grpo`, `pairs`): `conf/shared/online.yaml`.",
        "",
    )
    page.fields(Block(OnlineStageConfig, "online", [(online, ""), None], skip=frozenset(base), values=[(online, "")]))
    page.add(
        "## Methods",
        "",
        "One option per method and stage group; `method` names the registry entry "
        "(`posttrain/stages/<method>.py`). Each lists its own fields, then the shared ones it changes.",
        "",
    )
    for group in ("sft", "align", "pairs"):
        for option in group_files(group):
            tree = yaml.safe_load(option.text)
            if tree.get("method", "none") == "none":
                continue
            cls = STAGES[tree["method"]].config_cls
            is_online = issubclass(cls, OnlineStageConfig)
            inherited = online_fields if is_online else base
            page.add(f"### `{group}={option.path.stem}` {{ #{group}-{option.path.stem} }}", "")
            page.add(prose(option.description), "", f"`method: {tree['method']}` · `conf/{option.name}`", "")
            layers = [(option, ""), *([(online, "")] if is_online else []), (shared, "")]
            own = Block(cls, f"{group}-{option.path.stem}", [*layers, None], skip=frozenset(inherited), values=layers)
            page.fields(own, level="####")
            # the shared fields whose value this option changes (what `group=option` sets over them)
            changed = [
                (key, value)
                for key, value in option.values.items()
                if key.split(".")[0] in inherited - {"data"} and not isinstance(value, dict)
                for before in [
                    next(
                        (f.values[key] for f, _ in layers[1:] if key in f.values),
                        default_of_key(OnlineStageConfig if is_online else schema.StageConfig, key),
                    )
                ]
                if value != before
            ]
            if changed:
                page.add("Shared fields this option changes:", "", "| field | value |", "|---|---|")
                for key, value in changed:
                    where = "online" if key.split(".")[0] in online_fields - base else "stage"
                    page.add(f"| [`{key}`](#{where}-{key.replace('.', '-')}) | `{yaml_value(value)}` |")
                page.add("")
    for group in ("sft", "align", "pairs"):
        page.add(
            f"## `{group}` options {{ #{group} }}", "", *render_options(group_files(group), group, defaults.get(group))
        )
    tuned = group_files("tuned")
    page.add(
        "## Tuned settings { #tuned }",
        "",
        "`conf/tuned/<model>_<align>.yaml`, applied to the `align` section when the model and the "
        "method match (`model=tiny align=orpo` gets `tiny_orpo`); a model of yours never inherits them.",
        "",
        *render_options(tuned, "tuned", None),
    )
    return page


def default_of_key(cls: type, key: str) -> Any:
    """A dataclass's default at a dotted key (`eval.num_prompts`)."""
    value: Any = cls()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def run_page(defaults: dict[str, str]) -> Page:
    page = Page("run.md", front("run and recipes", GENERATED))
    root = yaml_file("config.yaml")
    page.add("## `run` { #run }", "", root.comments.get("run", ""), "")
    page.fields(Block(schema.RunConfig, "run", [(root, "run."), None], values=[(root, "run.")]))
    recipes = group_files("recipe", (defaults.get("recipe", ""),))
    page.add(
        "## Recipes { #recipe }",
        "",
        "Whole pipelines (`recipes/`, also `conf/recipe/`), chosen with `recipe=NAME`; applied last, "
        "so a recipe may set any group or value.",
        "",
        *render_options(recipes, "recipe", defaults.get("recipe")),
    )
    return page


def launcher_page(defaults: dict[str, str]) -> Page:
    page = Page("launcher.md", front("launcher and deepspeed", GENERATED))
    launchers = group_files("launcher", ("torchrun", "local"))
    page.add("## `launcher` { #launcher }", "", schema.LauncherConfig.__doc__ or "", "")
    local = [f for f in launchers if f.path.stem == "local"]
    page.fields(
        Block(schema.LauncherConfig, "launcher", [(f, "") for f in launchers] + [None], values=[(local[0], "")])
    )
    page.add("## `launcher` options", "", *render_options(launchers, "launcher", defaults.get("launcher")))
    zeros = group_files("deepspeed", ("none",))
    page.add("## `deepspeed` { #deepspeed }", "", " ".join((schema.DeepSpeedConfig.__doc__ or "").split()), "")
    page.fields(Block(schema.DeepSpeedConfig, "deepspeed", [(f, "") for f in zeros] + [None], values=[(zeros[0], "")]))
    page.add("## `deepspeed` options", "", *render_options(zeros, "deepspeed", defaults.get("deepspeed")))
    return page


def sweep_page(defaults: dict[str, str]) -> Page:
    page = Page("sweep.md", front("sweep and logger", GENERATED))
    root = yaml_file("config.yaml")
    page.add("## `sweep` { #sweep }", "", root.comments.get("sweep", ""), "")
    page.fields(Block(schema.SweepConfig, "sweep", [(root, "sweep."), None], values=[(root, "sweep.")]))
    loggers = group_files("logger", ("wandb", "none"))
    page.add(
        "## `logger` { #logger }", "", "Where each stage's training metrics go, besides its own `metrics.jsonl`.", ""
    )
    page.fields(Block(schema.LoggerConfig, "logger", [(f, "") for f in loggers] + [None], values=[(loggers[1], "")]))
    page.add("## `logger` options", "", *render_options(loggers, "logger", defaults.get("logger")))
    for group in ("hydra/sweeper", "hydra/launcher"):
        anchor = group.replace("/", "-")
        page.add(f"## `{group}` options {{ #{anchor} }}", "", *render_options(group_files(group), group, None))
    return page


def index_page(defaults: dict[str, str], pages: list[Page]) -> Page:
    page = Page("index.md", ["# Configuration reference", "", GENERATED, ""])
    root = yaml_file("config.yaml")
    page.add(
        "`posttrain` composes `conf/config.yaml` with one option of each group, then the recipe, then "
        "your overrides: `group=option` picks a file, `key=value` sets a field, `+group@name=option` adds "
        "a section (a second alignment stage), `~key` removes one. `posttrain --cfg job` prints the result, "
        "`posttrain plan=true` checks it.",
        "",
        "| group | default | options | fields |",
        "|---|---|---|---|",
    )
    where = {
        "model": "model.md", "data": "data.md", "sft": "stages.md", "align": "stages.md", "pairs": "stages.md",
        "peft": "model.md", "deepspeed": "launcher.md", "launcher": "launcher.md", "logger": "sweep.md",
        "tuned": "stages.md", "recipe": "run.md",
    }  # fmt: skip
    for group, target in where.items():
        options = ", ".join(f"`{p.stem}`" for p in sorted((CONF / group).glob("*.yaml")))
        default = f"`{defaults[group]}`" if group in defaults and "$" not in defaults[group] else "-"
        page.add(f"| `{group}` | {default} | {options} | [{PAGES[target]}]({target}#{group}) |")
    page.add("", "The root config, `conf/config.yaml`:", "", "```yaml", *root.text.rstrip().splitlines(), "```", "")
    page.add("## Pages", "")
    page.add(*[f"- [{PAGES[p.name]}]({p.name})" for p in pages], "")
    return page


def build_pages() -> list[Page]:
    defaults = root_defaults()
    pages = [
        model_page(defaults),
        data_page(defaults),
        stages_page(defaults),
        run_page(defaults),
        launcher_page(defaults),
        sweep_page(defaults),
    ]
    return [index_page(defaults, pages), *pages]


def missing_comments(pages: list[Page] | None = None) -> list[str]:
    """Every documented field with no comment, in conf/ or in its dataclass: `page: key`."""
    return [
        f"{page.name}: {entry.anchor}"
        for page in pages or build_pages()
        for block in page.blocks
        for entry in block.entries()
        if not entry.comment
    ]


# --- the MkDocs hook --------------------------------------------------------------------------


def on_files(files, config):  # noqa: ANN001 (MkDocs' File and config types)
    import logging

    from mkdocs.structure.files import File

    pages = build_pages()
    for missing in missing_comments(pages):
        logging.getLogger("mkdocs.plugins.reference").warning(f"reference: no comment for {missing}")
    for page in pages:
        files.append(File.generated(config, f"reference/{page.name}", content="\n".join(page.lines) + "\n"))
    return files


if __name__ == "__main__":
    print("\n".join(missing_comments()) or "every field has a comment")
