"""Write docs/configuration.md from the configuration's dataclasses and conf/.

    python docs/generate.py            # rewrite docs/configuration.md
    python docs/generate.py --check    # exit 1 if it is stale (tests/unit/test_docs.py)

Every key of ``train.py`` and ``infer.py`` is a field of a section's dataclass
(:mod:`ptycho.config`); its type, default and the docstring under it are read from the
code, and the config groups from the files under ``conf/``, so the page cannot drift.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import re
import sys
import textwrap
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "configuration.md"


def markdown(text: str) -> str:
    """reStructuredText inline markup as Markdown: ``x`` and :role:`x` -> `x`."""
    text = re.sub(r":(?:class|func|meth|mod|attr):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("|", "\\|")


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of ``cls`` and its bases (the string literal right
    after the field's annotated assignment), joined into one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for statement, following in zip(body, body[1:], strict=False):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def type_name(annotation) -> str:
    """``int``, ``float or null``, ``list of float``, ``a | b | c`` (an enum's choices)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        return " or ".join(type_name(arg) for arg in inner) + " or null"
    if origin is list:
        return f"list of {type_name(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{member.value}`" for member in annotation)
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return (
            "`["
            + ", ".join(f"{item:g}" if isinstance(item, float) else str(item) for item in value)
            + "]`"
        )
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def section_table(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            continue
        key = f"{prefix}{field.name}"
        meaning = markdown(docs.get(field.name, ""))
        rows.append(
            f"| `{key}` | {type_name(hints[field.name])} | {default_text(field)} | {meaning} |"
        )
    return rows


def group_choices(group: str) -> list[tuple[str, str]]:
    """(choice, the first sentence of its file's comments) of a config group folder."""
    choices = []
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        comments = [
            line.lstrip("#").strip()
            for line in path.read_text().splitlines()
            if line.startswith("#") and not line.startswith("# @package")
        ]
        choices.append((path.stem, markdown(first_sentence(" ".join(comments)))))
    return choices


def default_choices(name: str) -> dict[str, str]:
    """The group choices of ``conf/<name>.yaml``'s defaults list."""
    from omegaconf import OmegaConf

    chosen = {}
    for entry in OmegaConf.load(ROOT / "conf" / f"{name}.yaml").defaults:
        if isinstance(entry, str):
            continue
        for group, choice in entry.items():
            chosen[str(group)] = "none" if choice is None else str(choice)
    return chosen


def render() -> str:
    from ptycho.config import RENAMED, InferConfig, TrainConfig

    train, infer = default_choices("train"), default_choices("infer")
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `python docs/generate.py` from the dataclasses of each section",
        "     and the files under conf/; edit those, not this page. -->",
        "",
        "`python train.py [group=choice ...] [key=value ...]` and `python infer.py ...` compose",
        "`conf/train.yaml` / `conf/infer.yaml` with Hydra. Each section below is a dataclass",
        "owned by the module that uses it (the class is named under the heading); a misspelt",
        "key, a wrong type or an unknown choice is refused when the configuration is",
        "composed, and every other rule by the section's own `check()` or by",
        "`ptycho/config.py` (rules across sections), before any work, with one line naming",
        "the field and the fix (exit code 2).",
        "",
        "## Config groups",
        "",
        "A group picks a file of settings (`data=grf`); keys override single values",
        "(`data.step=0.1`).",
        "",
        "| group | choice | train.py default | infer.py default | what it is |",
        "| --- | --- | --- | --- | --- |",
    ]
    groups = [p.name for p in sorted((ROOT / "conf").iterdir()) if p.is_dir() and p.name != "hydra"]
    for group in groups:
        for choice, comment in group_choices(group):
            marks = ["yes" if chosen.get(group) == choice else "" for chosen in (train, infer)]
            lines.append(f"| `{group}` | `{choice}` | {marks[0]} | {marks[1]} | {comment} |")
    for choice, comment in group_choices("hydra/launcher"):
        lines.append(f"| `hydra/launcher` | `{choice}` | | | {comment} |")
    lines += ["", "## Keys", ""]
    seen: set[str] = set()
    for config in (TrainConfig, InferConfig):
        hints = typing.get_type_hints(config)
        for field in dataclasses.fields(config):
            section = hints[field.name]
            if not dataclasses.is_dataclass(section) or field.name in seen:
                continue
            seen.add(field.name)
            users = [
                name
                for name, klass in (("train.py", TrainConfig), ("infer.py", InferConfig))
                if field.name in {f.name for f in dataclasses.fields(klass)}
            ]
            summary = markdown(" ".join((inspect.getdoc(section) or "").split("\n\n")[0].split()))
            lines += [
                f"### `{field.name}`",
                "",
                f"{summary} Used by {' and '.join(users)}; `{section.__module__}."
                f"{section.__qualname__}`.",
                "",
                *section_table(section, f"{field.name}."),
                "",
            ]
    for config, script in ((TrainConfig, "train.py"), (InferConfig, "infer.py")):
        lines += [f"### Top-level keys of {script}", "", *section_table(config, ""), ""]
    lines += [
        "## Renamed keys",
        "",
        "Keys of earlier versions are refused with their new name (docs/migrating.md):",
        "",
        "| was | now |",
        "| --- | --- |",
        *(f"| `{old}` | `{new}` |" for old, new in RENAMED.items()),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is stale: run python docs/generate.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
