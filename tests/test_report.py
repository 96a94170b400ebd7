"""Markdown tables in reports keep what they were given."""

from __future__ import annotations

import pandas as pd

from shared.report_tables import render_table


def test_tables_keep_trailing_zeros_and_integer_counts():
    df = pd.DataFrame({"positive": [127, 3], "prevalence": [0.108, 0.2],
                       "auc": ["1.000", "0.5 ± 0.1"]}, index=["a", "b"])
    rows = render_table(df).splitlines()[2:]
    assert [c.strip() for c in rows[0].split("|")[1:-1]] == ["a", "127", "0.108", "1.000"]
    assert [c.strip() for c in rows[1].split("|")[1:-1]] == ["b", "3", "0.2", "0.5 ± 0.1"]
