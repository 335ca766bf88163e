"""The parameter reference (docs/params.md), generated from the code so that it cannot drift: every key of the
schema in imgclf/params.py with its type or allowed values, its default (the shipped params.yaml), the stages
whose results it changes (dvc.yaml's params lists) and its comment in params.yaml.

    python -m imgclf.params_reference --write docs/params.md   # regenerate
    python -m imgclf.params_reference --check docs/params.md   # exit 1 when the file is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from imgclf.params import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
RULES = {
    "str": "text",
    "optstr": "text or null",
    "bool": "true or false",
    "auto_bool": "auto, true or false",
    "posint": "integer > 0",
    "nonnegint": "integer >= 0",
    "posfloat": "number > 0",
    "nonnegfloat": "number >= 0",
    "fraction": "number strictly between 0 and 1",
    "rgb": "three integers 0-255 (R, G, B)",
    "percentiles": "two percentiles [low, high], 0 <= low < high <= 100",
    "bits": "null or an integer 9-16",
    "frame": "middle, first, last or a 0-based frame number",
    "dicom_tag": "a DICOM attribute keyword (e.g. PatientID)",
    "backbones": "a non-empty list of registered backbones",
    "precision_overrides": "one entry per backbone: null or a precision",
    "overrides": "one entry per backbone: a section of train keys to change, maybe empty ({})",
}
HEADER = """# Parameters

Every key of `params.yaml`: its type or allowed values, the default the project ships, the stages that read it
(their `params` in `dvc.yaml`; `<bb>` is each backbone: a change reruns these and then whatever reads their
outputs, as far as the outputs change), and what it does (the comment beside it in `params.yaml`).
Generated from the code by `python -m imgclf.params_reference --write docs/params.md`; a test fails when this
page and the code disagree. Every stage checks the whole file before it runs: a typo in a key, a value of the
wrong type or out of range stops it with one line naming the key, the value and the fix.
"""


def schema_keys(schema: dict[str, Any] = SCHEMA, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, rule) for every leaf of the schema, in its order."""
    out: list[tuple[str, Any]] = []
    for key, rule in schema.items():
        if isinstance(rule, dict):
            out += schema_keys(rule, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", rule))
    return out


def describe_rule(rule: Any) -> str:
    if isinstance(rule, tuple):
        return " \\| ".join(f"`{choice}`" for choice in rule)
    return RULES[rule]


def comments(params_text: str) -> dict[str, str]:
    """Each key's comment in params.yaml: the text after `#` on its line and on the comment-only lines below it
    that line up with that `#` (a comment's continuation)."""
    out: dict[str, str] = {}
    path: list[tuple[int, str]] = []  # (indent, key) of the open sections
    last, column = "", -1
    for line in params_text.splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not stripped or stripped.startswith("- "):
            continue
        if stripped.startswith("#"):
            if last and line.find("#") == column:
                out[last] = f"{out[last]} {stripped[1:].strip()}".strip()
            continue
        match = re.match(r"([A-Za-z_0-9]+):", stripped)
        if not match:
            continue
        while path and path[-1][0] >= indent:
            path.pop()
        key = ".".join([k for _, k in path] + [match.group(1)])
        path.append((indent, match.group(1)))
        column = comment_column(line, match.end() + indent)
        last = key
        out[key] = line[column + 1 :].strip() if column >= 0 else ""
    return out


def comment_column(line: str, start: int) -> int:
    """Where a YAML comment starts on `line` after `start`: a `#` after white space and outside quotes; -1 if none."""
    quote = ""
    for i in range(start, len(line)):
        char = line[i]
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and line[i - 1] in " \t":
            return i
    return -1


def stages_of(dvc_yaml: dict[str, Any]) -> dict[str, list[str]]:
    """Each stage's params entries (`<bb>` for a foreach stage's item), by stage name."""
    out: dict[str, list[str]] = {}
    for name, stage in dvc_yaml["stages"].items():
        body, label = (stage["do"], f"{name}@<bb>") if "foreach" in stage else (stage, name)
        entries: list[str] = []
        for entry in body.get("params", []):
            if isinstance(entry, dict):  # {file: [keys]}
                entries += [key for keys in entry.values() for key in keys]
            else:
                entries.append(entry)
        out[label] = [entry.replace("${item}", "<bb>") for entry in entries]
    return out


def rerun_by(key: str, stages: dict[str, list[str]]) -> list[str]:
    """The stages that track `key`, a section above it, or (per backbone) `key.<bb>`."""
    found = []
    for stage, entries in stages.items():
        for entry in entries:
            if key == entry or key.startswith(entry + ".") or entry == f"{key}.<bb>":
                found.append(stage)
                break
    return found


def value_text(value: Any) -> str:
    if isinstance(value, dict | list):
        return "`" + yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip() + "`"
    return "`" + yaml.safe_dump(value).strip().removesuffix("...").strip() + "`"


def lookup(params: dict[str, Any], key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        node = node[part]
    return node


def render(root: Path = ROOT) -> str:
    """docs/params.md's text from the schema, the shipped params.yaml and dvc.yaml."""
    params_text = (root / "params.yaml").read_text(encoding="utf-8")
    params = yaml.safe_load(params_text)
    notes = comments(params_text)
    stages = stages_of(yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")))
    lines = [HEADER]
    section = None
    for key, rule in schema_keys():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += [
                f"\n## `{top}`\n",
                "| key | type or values | default | read by | what it does |",
                "|" + "---|" * 5,
            ]
            if notes.get(top):
                lines.insert(len(lines) - 2, f"{notes[top]}\n")
        reruns = ", ".join(f"`{s}`" for s in rerun_by(key, stages)) or "no stage (not a dependency)"
        text = notes.get(key, "").replace("|", "\\|")
        lines.append(f"| `{key}` | {describe_rule(rule)} | {value_text(lookup(params, key))} | {reruns} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write the reference to this file")
    group.add_argument("--check", type=Path, help="exit 1 when this file differs from the generated reference")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.write.write_text(text, encoding="utf-8")
        return 0
    if not args.check.is_file() or args.check.read_text(encoding="utf-8") != text:
        print(f"{args.check} is out of date: run python -m imgclf.params_reference --write {args.check}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
