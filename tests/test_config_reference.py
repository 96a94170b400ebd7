"""docs/config.md is written from the schema and must stay what dentfed.config_reference writes."""

import re
from pathlib import Path

from pydantic import BaseModel

from dentfed.config_reference import _models, reference
from shared.config import Config

REPO = Path(__file__).resolve().parents[1]


def _schema_keys(model: type[BaseModel], path: str, out: dict[str, set[str]]) -> None:
    out.setdefault(path, set()).update(model.model_fields)
    for name, field in model.model_fields.items():
        for sub in _models(field.annotation):
            _schema_keys(sub, f"{path}.{name}", out)


def _doc_keys(text: str) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    section = None
    for line in text.splitlines():
        if m := re.fullmatch(r"## `([\w.]+)`", line):
            section = keys.setdefault(m[1], set())
        elif section is not None and (m := re.match(r"\| `(\w+)` \|", line)):
            section.add(m[1])
    return keys


def test_docs_config_md_is_what_the_schema_writes():
    written = (REPO / "docs" / "config.md").read_text()
    assert written == reference(), (
        "docs/config.md is out of date: python -m dentfed.config_reference > docs/config.md")


def test_every_section_and_key_of_the_schema_has_a_row():
    expected: dict[str, set[str]] = {}
    for name, field in Config.model_fields.items():
        for model in _models(field.annotation):
            _schema_keys(model, name, expected)
    documented = _doc_keys(reference())
    assert documented == expected
    assert sum(len(v) for v in expected.values()) > 130  # every leaf, not just the top


def test_rows_carry_the_schema_comments_types_and_defaults():
    rows = {(sec, k): line for sec, k, line in _rows(reference())}
    # a comment on the field's own line; a block above it; a block above covering the next
    assert "fedprox: weight of the proximal term" in rows[("federation", "proximal_mu")]
    assert "GroupNorm" in rows[("model", "norm")]
    assert "See `beta_1`." in rows[("federation", "tau")]
    # types, ranges, defaults, required keys, sections linked
    assert "`fedavg` \\| `fedprox`" in rows[("federation", "strategy")]
    assert "float (> 0, < 0.5)" in rows[("data", "val_fraction")]
    assert "| `0.15` |" in rows[("data", "val_fraction")]
    assert "*required*" in rows[("privacy.central", "noise_multiplier")]
    assert "[`privacy.dp_sgd`](#privacydp_sgd)" in rows[("privacy", "dp_sgd")]
    assert "| `[0.9, 0.999]` |" in rows[("train", "betas")]
    assert "| null |" in rows[("federation", "local_steps")]


def _rows(text: str):
    section = None
    for line in text.splitlines():
        if m := re.fullmatch(r"## `([\w.]+)`", line):
            section = m[1]
        elif section and (m := re.match(r"\| `(\w+)` \|", line)):
            yield section, m[1], line
