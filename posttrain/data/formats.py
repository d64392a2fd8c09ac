"""Row formats users already have, checked and turned into the forms the trainers take.

    sft         {"messages": [...]}
    preference  {"prompt": [...], "chosen": [...], "rejected": [...]}   (conversational)
    unpaired    {"prompt": [...], "completion": [...], "label": bool}   (KTO)
    prompt      {"prompt": [...]}          (online stages: pairs, grpo; any format's prompt)

Formats: `messages` (ultrachat_200k), `prompt_completion` (strings or message lists),
`alpaca` (instruction/input/output), `sharegpt` (conversations of from/value),
`preference` (explicit prompt, or implicit: whole chosen/rejected conversations sharing a
prefix, as in ultrafeedback_binarized), `hh` (Anthropic HH "\\n\\nHuman: ...\\n\\nAssistant: ..."
text) and `unpaired` (prompt/completion/label). Paired rows feed an unpaired stage as two
rows each. A bad row raises RowError(field, problem); the loader adds the file and row.
Plain Python over column lists: a validation pass over 100k rows takes about a second.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable

from posttrain.errors import PosttrainError

FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "sharegpt", "preference", "hh", "unpaired", "prompt")
# formats each kind of stage takes, in the order `auto` tries them
KIND_FORMATS = {
    "sft": ("messages", "sharegpt", "alpaca", "prompt_completion"),
    "preference": ("preference", "hh"),
    "unpaired": ("unpaired", "preference", "hh"),
    # the online stages generate their own replies: any row's prompt will do
    "prompt": ("messages", "sharegpt", "alpaca", "prompt_completion", "preference", "hh", "prompt"),
}
REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
}
OPTIONAL = {"alpaca": ("input", "system"), "preference": ("prompt",), "hh": ()}
# `task` (built-in data) is kept so evaluation can report accuracy per task
KEPT = ("task",)
# fields a `columns:` mapping may rename into
COLUMN_FIELDS = tuple(sorted({c for cols in (*REQUIRED.values(), *OPTIONAL.values()) for c in cols}))
ROLES = ("system", "user", "assistant", "tool")
ARTICLE = {"user": "a user", "assistant": "an assistant"}
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
}  # fmt: skip


class DataError(PosttrainError, ValueError):
    """Bad data; one line naming the source, row and field, and what was expected."""


class RowError(ValueError):
    """A problem in one row: the field (`messages[2].role`) and what is wrong with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


class FormatError(ValueError):
    """The columns fit no format the stage takes; the message lists what would."""


# --- choosing a format ------------------------------------------------------------------


def _fits(fmt: str, columns: set[str]) -> bool:
    return set(REQUIRED[fmt]) <= columns


def looks_like_hh(value) -> bool:
    return isinstance(value, str) and value.lstrip("\n").startswith("Human:")


def detect(columns: list[str], kind: str, fmt: str, first_chosen=None) -> str:
    """The format of rows with these columns for a stage of `kind`; FormatError names the fix."""
    present = set(columns)
    allowed = KIND_FORMATS[kind]
    if fmt != "auto":
        if fmt not in allowed:
            raise FormatError(f"format {fmt!r} does not fit this {kind} stage; allowed: {', '.join(allowed)}")
        missing = [c for c in REQUIRED[fmt] if c not in present]
        if missing:
            raise FormatError(f"format {fmt}: {_missing(missing, columns)}")
        return fmt
    for candidate in allowed:
        if _fits(candidate, present):
            if candidate == "preference" and looks_like_hh(first_chosen):
                return "hh"
            return candidate
    # which other kind's rows these are (every row has a prompt: the online stages' kind says nothing)
    others = (fs for k, fs in KIND_FORMATS.items() if k not in (kind, "prompt"))
    other = next((f for fs in others for f in fs if _fits(f, present)), None)
    stage = f"{'an' if kind == 'unpaired' else 'a'} {kind} stage"
    hint = f"these rows look like {other} rows, which {stage} cannot train on; " if other else ""
    wanted = "; ".join(f"{f} ({', '.join(REQUIRED[f])})" for f in allowed)
    close = _close_matches([c for f in allowed for c in REQUIRED[f] if c not in present], columns)
    raise FormatError(
        f"{hint}{stage} needs the columns of one of: {wanted}; found: {', '.join(columns)}"
        f"{close}; rename columns with `columns: {{field: your_column}}`"
    )


def _close_matches(names: list[str], columns: list[str]) -> str:
    """ " (did you mean 'chosne' for 'chosen'?)" for columns that look like misspelled field names."""
    pairs = []
    for name in dict.fromkeys(names):
        close = difflib.get_close_matches(name, columns, n=1, cutoff=0.7)
        if close:
            pairs.append(f"{close[0]!r} for {name!r}")
    return f" (did you mean {', '.join(pairs)}?)" if pairs else ""


def _missing(names: list[str], columns: list[str]) -> str:
    return f"no column {', '.join(map(repr, names))}; found: {', '.join(columns)}{_close_matches(names, columns)}"


def needed_columns(fmt: str, columns: list[str]) -> list[str]:
    optional = (c for c in (*OPTIONAL.get(fmt, ()), *KEPT) if c in columns)
    return [*REQUIRED[fmt], *optional]


# --- conversations ------------------------------------------------------------------------


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


def _messages(value, field: str) -> list[dict]:
    """Checked copies of a list of {'role', 'content'} messages (extra keys dropped)."""
    if not isinstance(value, list) or not value:
        raise RowError(field, f"expected a non-empty list of messages, got {_type(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{field}[{i}]", f"expected {{'role': ..., 'content': ...}}, got {str(m)[:60]}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise RowError(f"{field}[{i}].role", f"{role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"{field}[{i}].content", f"expected a string, got {_type(content)}")
        out.append({"role": role, "content": content})
    return out


def check_turns(parts: list[tuple[str, list[dict]]], ends_with: str) -> None:
    """Roles that form turns: an optional system message first, then user and assistant in
    turn (tool results only after an assistant), ending with `ends_with`."""
    previous = None
    for field, messages in parts:
        for i, m in enumerate(messages):
            role, where = m["role"], f"{field}[{i}].role"
            if role == "system" and previous is not None:
                raise RowError(where, "a system message may only come first")
            if role == "user" and previous == "user":
                raise RowError(where, "a second user turn in a row; user and assistant turns must alternate")
            if role == "assistant" and previous in (None, "system"):
                raise RowError(where, "the conversation starts with an assistant turn; it must start with user")
            if role == "assistant" and previous == "assistant":
                raise RowError(where, "a second assistant turn in a row; user and assistant turns must alternate")
            if role == "tool" and previous not in ("assistant", "tool"):
                raise RowError(where, "a tool result must follow an assistant turn")
            previous = role
    if ends_with == "assistant" and not any(m["role"] == "assistant" for _, ms in parts for m in ms):
        raise RowError(parts[0][0], "has no assistant turn to learn from")
    if previous != ends_with:
        field, messages = parts[-1]
        raise RowError(
            f"{field}[{len(messages) - 1}].role", f"{previous!r}; this must end with {ARTICLE[ends_with]} turn"
        )


def _as_messages(value, role: str, field: str) -> list[dict]:
    """A string is one message of `role`; a list is checked messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(value, field)
    raise RowError(field, f"expected a string or a list of messages, got {_type(value)}")


def _string(row: dict, field: str, optional: bool = False) -> str:
    value = row.get(field)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {_type(value)}")
    return value


# --- one converter per format ---------------------------------------------------------------


def from_messages(row: dict) -> dict:
    messages = _messages(row["messages"], "messages")
    check_turns([("messages", messages)], ends_with="assistant")
    return {"messages": messages}


def from_sharegpt(row: dict) -> dict:
    value = row["conversations"]
    if not isinstance(value, list) or not value:
        raise RowError("conversations", f"expected a non-empty list of turns, got {_type(value)}")
    messages = []
    for i, turn in enumerate(value):
        if isinstance(turn, dict) and "role" in turn:  # some sharegpt dumps use role/content
            messages.append(_messages([turn], f"conversations[{i}]")[0])
            continue
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"conversations[{i}]", f"expected {{'from': ..., 'value': ...}}, got {str(turn)[:60]}")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise RowError(f"conversations[{i}].from", f"{turn['from']!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn["value"], str):
            raise RowError(f"conversations[{i}].value", f"expected a string, got {_type(turn['value'])}")
        messages.append({"role": role, "content": turn["value"]})
    check_turns([("conversations", messages)], ends_with="assistant")
    return {"messages": messages}


def from_alpaca(row: dict) -> dict:
    instruction, extra = _string(row, "instruction"), _string(row, "input", optional=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = _string(row, "system", optional=True)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _string(row, "output")}]
    return {"messages": messages}


def _prompt_and_reply(row: dict, reply_field: str) -> tuple[list[dict], list[dict]]:
    prompt = _as_messages(row["prompt"], "user", "prompt")
    reply = _as_messages(row[reply_field], "assistant", reply_field)
    check_turns([("prompt", prompt)], ends_with="user")
    check_turns([("prompt", prompt), (reply_field, reply)], ends_with="assistant")
    return prompt, reply


def from_prompt_completion(row: dict) -> dict:
    prompt, completion = _prompt_and_reply(row, "completion")
    return {"messages": prompt + completion}


def split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Implicit prompt: the longest shared prefix of two conversations is the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _implicit_pair(chosen: list[dict], rejected: list[dict]) -> dict:
    for field, conversation in (("chosen", chosen), ("rejected", rejected)):
        check_turns([(field, conversation)], ends_with="assistant")
    prompt, chosen, rejected = split_conversations(chosen, rejected)
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("chosen", "chosen and rejected share no prompt (no common turns ending with a user turn)")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def from_preference(row: dict) -> dict:
    chosen_value = row["chosen"]
    if isinstance(chosen_value, list) and chosen_value and isinstance(chosen_value[0], dict):
        if chosen_value[0].get("role") != "assistant":  # whole conversations (ultrafeedback_binarized)
            chosen, rejected = _messages(chosen_value, "chosen"), _messages(row["rejected"], "rejected")
            return _implicit_pair(chosen, rejected)
    if row.get("prompt") is None:
        raise RowError("prompt", "missing: 'chosen' is a bare reply, so the row needs a prompt")
    prompt, chosen = _prompt_and_reply(row, "chosen")
    _, rejected = _prompt_and_reply(row, "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh(text, field: str) -> list[dict]:
    """'\\n\\nHuman: q\\n\\nAssistant: a' -> messages."""
    if not isinstance(text, str):
        raise RowError(field, f"expected HH text, got {_type(text)}")
    pieces = HH_TURN.split("\n\n" + text.lstrip("\n"))
    if pieces[0].strip():
        raise RowError(field, f"expected text starting with '\\n\\nHuman: ', got {text[:40]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said} for who, said in zip(pieces[1::2], pieces[2::2], strict=True)]


def from_hh(row: dict) -> dict:
    return _implicit_pair(parse_hh(row["chosen"], "chosen"), parse_hh(row["rejected"], "rejected"))


def from_unpaired(row: dict) -> dict:
    prompt, completion = _prompt_and_reply(row, "completion")
    label = row["label"]
    if isinstance(label, str):  # CSV cells
        label = {"true": True, "1": True, "false": False, "0": False}.get(label.strip().lower(), label)
    elif label in (0, 1) and not isinstance(label, float):
        label = bool(label)
    if not isinstance(label, bool):
        raise RowError("label", f"expected true (desirable) or false (undesirable), got {label!r}")
    return {"prompt": prompt, "completion": completion, "label": label}


def from_prompt(row: dict) -> dict:
    prompt = _as_messages(row["prompt"], "user", "prompt")
    check_turns([("prompt", prompt)], ends_with="user")
    return {"prompt": prompt}


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
    "preference": from_preference,
    "hh": from_hh,
    "unpaired": from_unpaired,
    "prompt": from_prompt,
}


def as_unpaired(pair: dict) -> list[dict]:
    """A preference pair as two KTO rows: chosen desirable, rejected undesirable."""
    return [
        {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
        {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False},
    ]


def as_prompt(row: dict) -> dict:
    """The prompt of a converted row: the turns before a conversation's last reply, or its prompt."""
    if "messages" in row:
        messages = row["messages"]
        return {"prompt": messages[:-1] if messages[-1]["role"] == "assistant" else messages}
    return {"prompt": row["prompt"]}


def convert(columns: dict[str, list], fmt: str, kind: str, where: Callable[[int], str]) -> list[dict]:
    """Every row checked and converted; a bad row raises DataError naming the row (`where(i)`),
    the field and the problem."""
    names = list(columns)
    converter = CONVERTERS[fmt]
    unpair = kind == "unpaired" and fmt != "unpaired"
    kept = [c for c in KEPT if c in columns]
    rows = []
    for i, values in enumerate(zip(*columns.values(), strict=True)):
        row = dict(zip(names, values, strict=True))
        try:
            out = converter(row)
        except RowError as e:
            raise DataError(f"{where(i)}: {e.field}: {e.problem}") from None
        if kind == "prompt":
            out = as_prompt(out)
        for name in kept:
            out[name] = row[name]
        rows += as_unpaired(out) if unpair else [out]
    return rows
