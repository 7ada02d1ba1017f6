"""Write the values table of a chart's README.md from the comments in its values.yaml.

A key is documented by a comment block right above it whose first line starts with
`# --` (the helm-docs convention); the block's further `#` lines continue the text, and
`# -- (type) text` names the type where the default does not show it. The
table (key, type, default, description) replaces what lies between the README's
`<!-- values:start -->` and `<!-- values:end -->` markers; the rest of the README is
written by hand.

    python charts/gen_readme.py            # rewrite charts/synapse/README.md
    python charts/gen_readme.py --check    # exit 1 when README.md is not current
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
from typing import Any

import yaml

CHART = pathlib.Path(__file__).resolve().parent / "synapse"
START, END = "<!-- values:start -->", "<!-- values:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(\s|$)")
TYPE = re.compile(r"^\((?P<type>[^)]+)\)\s*")
LONG_DEFAULT = 120


@dataclasses.dataclass(frozen=True)
class Documented:
    path: tuple[str, ...]
    text: str


def documented_keys(values_text: str) -> list[Documented]:
    """Every key with a `# --` block, in file order, with its full path."""
    found: list[Documented] = []
    stack: list[tuple[int, str]] = []
    doc: list[str] | None = None
    list_indent: int | None = None  # inside a list item: no key paths there
    for line in values_text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if stripped.startswith("# --"):
            doc = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if doc is not None:
                doc.append(stripped[1:].strip())
            continue
        if not stripped:
            doc = None
            continue
        if list_indent is not None and indent > list_indent:
            continue
        list_indent = None
        if stripped.startswith("- "):
            list_indent = indent
            continue
        match = KEY.match(line)
        if not match:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group("key")))
        if doc is not None:
            found.append(Documented(tuple(k for _, k in stack), " ".join(doc)))
        doc = None
    return found


def lookup(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = values
    for key in path:
        node = node[key]
    return node


def _type(value: Any) -> str:
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string"),
                       (list, "list"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def _default(value: Any) -> str:
    text = json.dumps(value, separators=(", ", ": "))
    if len(text) > LONG_DEFAULT:
        return "see [values.yaml](values.yaml)"
    return "`" + text.replace("|", "\\|") + "`"


def table(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for item in documented_keys(values_text):
        value = lookup(values, item.path)
        declared = TYPE.match(item.text)
        kind = declared.group("type") if declared else _type(value)
        text = item.text[declared.end():] if declared else item.text
        text = text.replace("|", "\\|")
        rows.append(f"| `{'.'.join(item.path)}` | {kind} | {_default(value)} | {text} |")
    return "\n".join(rows)


def undocumented(values_text: str) -> list[str]:
    """Leaf keys (lists count as leaves) that neither they nor an ancestor document."""
    covered = {d.path for d in documented_keys(values_text)}
    missing: list[str] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if any(path[:i] in covered for i in range(1, len(path) + 1)):
            return
        if isinstance(node, dict) and node:
            for key, child in node.items():
                walk(child, (*path, str(key)))
        else:
            missing.append(".".join(path))

    walk(yaml.safe_load(values_text), ())
    return missing


def render_readme(readme: str, values_text: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(values_text)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when README.md is stale")
    parser.add_argument("--chart", type=pathlib.Path, default=CHART)
    args = parser.parse_args(argv)
    readme_path = args.chart / "README.md"
    current = readme_path.read_text()
    wanted = render_readme(current, (args.chart / "values.yaml").read_text())
    if args.check:
        if current != wanted:
            print(f"{readme_path} is stale: run `python charts/gen_readme.py`", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
