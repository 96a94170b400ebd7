"""docs/config.md, written from the one config schema (`shared/config.py`).

Every key of every section with its type or allowed values, its range, its default and the
schema's own comment on it, so the reference cannot drift from the code:
`tests/test_config_reference.py` fails when docs/config.md is not what this module writes.
Regenerate with `python -m dentfed.config_reference > docs/config.md`.
"""

from __future__ import annotations

import ast
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from shared.config import Config

HEADER = """# Configuration reference

Written from the schema in `shared/config.py` by `python -m dentfed.config_reference >
docs/config.md` (a test checks that this file is what it writes, so edit the schema's comments,
not this file). Every section and key is optional unless its default says *required*; unknown
keys and wrong types are errors that name the key's path. Checks across keys (e.g. a warm-up
shorter than the run, krum's clinic count) are the validators in `shared/config.py`; example
files are in `configs/`.
"""


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The config sections (pydantic models) an annotation holds, e.g. `X | None` -> [X]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models(a)]


def _type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(f"`{v}`" for v in args)
    if origin is typing.Annotated:  # e.g. PositiveFloat inside a tuple
        limits = _range_text(list(args[1:]))
        return _type_text(args[0]) + (f" ({limits})" if limits else "")
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return " or ".join(_type_text(a) for a in kept) + (" or null" if len(kept) < len(args)
                                                            else "")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is list or (origin is tuple and Ellipsis in args):
        return f"list of {_type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    return getattr(annotation, "__name__", str(annotation))


def _range_text(metadata: list[Any]) -> str:
    """pydantic's constraints (annotated_types Ge, Gt, Le, Lt, MinLen) as text."""
    parts = []
    for m in metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if type(m).__name__ == attr.capitalize():
                parts.append(f"{sign} {getattr(m, attr)}")
        if type(m).__name__ == "MinLen":
            parts.append(f"at least {m.min_length} item(s)")
    return ", ".join(parts)


def _anchor(path: str) -> str:
    """GitHub's anchor of a heading "## `a.b`"."""
    return path.replace(".", "")


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "*required*"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(its defaults)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value}`"


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """Each field's comment in the class source: the comment lines right above it and a
    comment on its own line(s)."""
    source = textwrap.dedent(inspect.getsource(model))
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].strip() != tok.string:
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    head, last_line = None, -1  # a comment block above a field also covers the fields
    for node in body.body:      # that follow it line by line (e.g. beta_1, beta_2, tau)
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        own = [trailing[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
               if n in trailing]
        name = node.target.id
        if above:
            head = name
        elif own or node.lineno != last_line + 1:
            head = None
        inherit = head and not _models(model.model_fields[name].annotation)  # not a section
        out[name] = " ".join(above + own) or (f"See `{head}`." if inherit else "")
        last_line = node.end_lineno or node.lineno
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section(path: str, model: type[BaseModel], out: list[str],
             todo: list[tuple[str, type[BaseModel]]]) -> None:
    out.append(f"\n## `{path}`\n")
    doc = inspect.getdoc(model)
    if doc and doc != inspect.getdoc(BaseModel):
        out.append(" ".join(doc.split()) + "\n")
    comments = _comments(model)
    out.append("| key | type | default | meaning |\n|---|---|---|---|")
    for name, field in model.model_fields.items():
        subs = _models(field.annotation)
        kind = _type_text(field.annotation)
        limits = _range_text(field.metadata)
        if limits:
            kind += f", {limits}" if kind.endswith(")") else f" ({limits})"
        note = comments.get(name, "")
        if subs:
            sub = f"{path}.{name}"
            note = (note + " " if note else "") + f"See [`{sub}`](#{_anchor(sub)})."
            todo.extend((f"{path}.{name}", m) for m in subs)
        out.append(f"| `{name}` | {_cell(kind)} | {_cell(_default_text(field))} | "
                   f"{_cell(note)} |")


def reference() -> str:
    """The text of docs/config.md."""
    out = [HEADER]
    out.append("Sections: " + ", ".join(f"[`{n}`](#{_anchor(n)})" for n in Config.model_fields)
               + ".")
    todo: list[tuple[str, type[BaseModel]]] = []
    for name, field in Config.model_fields.items():
        for model in _models(field.annotation):
            _section(name, model, out, todo)
            while todo:
                sub_path, sub = todo.pop(0)
                _section(sub_path, sub, out, todo)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
