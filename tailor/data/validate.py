"""Great Expectations 1.x suites over the raw rows of each input; the first failure becomes one line.

The context is ephemeral (in memory, no files, no network) and progress bars are off. Each input gets
a suite built from `Rules`: not empty, required columns, no missing text, text length bounds, a bounded
share of duplicate rows, labels in their known set. UTF-8 and JSON/CSV syntax are checked earlier,
while reading (`sources.read_text`), because a frame cannot hold undecodable bytes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tailor.data.sources import DataError, Raw


@dataclass(frozen=True)
class Labels:
    column: str
    allowed: tuple[str, ...]
    named: str  # how the message names the set, e.g. "the 9 CrowS-Pairs types"


@dataclass(frozen=True)
class Rules:
    required: tuple[str, ...]
    text: tuple[str, ...]  # string columns: no missing values, length in [min_len, max_chars]
    unique: tuple[str, ...]  # a row's identity for the duplicate share (joined when several)
    max_chars: int
    max_duplicate_ratio: float
    min_len: int = 0  # corpora drop short documents later (min_chars); eval sets must not be empty strings
    labels: tuple[Labels, ...] = field(default_factory=tuple)


class Validator:
    """One ephemeral GX context reused for every input of a build."""

    def __init__(self) -> None:
        import great_expectations as gx  # ~5 s import: paid only by code that validates
        from great_expectations.data_context.types.base import (
            DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig)

        self._gx = gx
        cfg = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                                progress_bars=ProgressBarsConfig(globally=False), analytics_enabled=False)
        ctx = gx.get_context(mode="ephemeral", project_config=cfg)
        self._batches = ctx.data_sources.add_pandas("tailor").add_dataframe_asset("rows") \
            .add_batch_definition_whole_dataframe("all")
        self.seconds = 0.0

    def check(self, raw: Raw, rules: Rules) -> list[dict[str, Any]]:
        """Validate `raw.frame`; return the per-expectation summary or raise DataError on the first failure."""
        t0 = time.perf_counter()
        try:
            return self._check(raw, rules)
        finally:
            self.seconds += time.perf_counter() - t0

    def _check(self, raw: Raw, rules: Rules) -> list[dict[str, Any]]:
        E = self._gx.expectations
        df = raw.frame
        _check_types(raw, rules)
        key = "+".join(rules.unique)
        if len(rules.unique) > 1 and all(c in df.columns for c in rules.unique):
            cols = [df[c].astype(str).tolist() for c in rules.unique]  # zip, not DataFrame.agg: 100x faster
            df = df.assign(**{key: ["\x1f".join(t) for t in zip(*cols, strict=True)]})
        plan: list[tuple[Any, str | None]] = [(E.ExpectTableRowCountToBeBetween(min_value=1), None)]
        plan += [(E.ExpectColumnToExist(column=c), c) for c in rules.required]
        plan += [(E.ExpectColumnValuesToNotBeNull(column=c), c) for c in rules.text]
        plan += [(E.ExpectColumnValueLengthsToBeBetween(column=c, min_value=rules.min_len,
                                                        max_value=rules.max_chars), c) for c in rules.text]
        plan.append((E.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column=key, min_value=1.0 - rules.max_duplicate_ratio), key))
        plan += [(E.ExpectColumnValuesToBeInSet(column=lb.column, value_set=list(lb.allowed)), lb.column)
                 for lb in rules.labels]
        suite = self._gx.ExpectationSuite(name=f"tailor-{raw.name}", expectations=[e for e, _ in plan])
        res = self._batches.get_batch(batch_parameters={"dataframe": df}).validate(
            suite, result_format={"result_format": "COMPLETE", "partial_unexpected_count": 5})
        # GX does not keep the suite's order in its results: match them by (type, column)
        by_key = {(r.expectation_config.type, r.expectation_config.kwargs.get("column")): r for r in res.results}
        summary = [{"expectation": "valid_utf8", "column": None, "success": True, "observed": len(raw.files)}]
        for exp, col in plan:
            r = by_key[(exp.expectation_type, col)]
            summary.append({"expectation": exp.expectation_type, "column": col, "success": bool(r.success),
                            "observed": _plain(r.result.get("observed_value", r.result.get("unexpected_count")))})
            if not r.success:
                raise DataError(_message(raw, rules, df, exp.expectation_type, col, r))
        return summary


def _check_types(raw: Raw, rules: Rules) -> None:
    """GX's length metric crashes on non-strings; name the first such value instead."""
    for c in rules.text:
        if c not in raw.frame.columns:
            continue
        bad = raw.frame[c].map(lambda v: not isinstance(v, str) and not _missing(v))
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise DataError(f"{_where(raw, i)}: column {c} has non-text values "
                            f"(row {_row_in_file(raw, i)}: {type(raw.frame[c].iloc[i]).__name__})")


def _missing(v: Any) -> bool:
    """None, NaN or pd.NA: what pandas puts where a JSON key was absent (a list is not missing)."""
    return v is None or v is pd.NA or (isinstance(v, float) and v != v)


def _where(raw: Raw, row: int | None = None) -> str:
    """The file to name: the row's own file when an input spans several files."""
    if row is not None and len(raw.files) > 1 and "file" in raw.frame.columns:
        return raw.source.show(raw.source.path / str(raw.frame["file"].iloc[row]))
    return raw.source.show()


def _row_in_file(raw: Raw, row: int) -> int:
    """1-based row number within the row's own file (inputs may span several files)."""
    if "file" not in raw.frame.columns:
        return row + 1
    files = raw.frame["file"]
    return int((files.iloc[: row + 1] == files.iloc[row]).sum())


def _message(raw: Raw, rules: Rules, df: pd.DataFrame, kind: str, col: str | None, r: Any) -> str:
    res = r.result or {}
    info = r.exception_info or {}
    if info.get("raised_exception"):
        return f"{raw.source.show()}: {kind} on {col} could not run ({info.get('exception_message')})"
    idx = res.get("unexpected_index_list") or []
    first = df.index.get_loc(idx[0]) if idx and not isinstance(idx[0], dict) else None
    where = _where(raw, first)
    n = res.get("unexpected_count")
    if kind == "expect_table_row_count_to_be_between":
        return f"{where}: is empty (no rows)"
    if kind == "expect_column_to_exist":
        return f"{where}: missing required column {col!r}"
    if kind == "expect_column_values_to_not_be_null":
        return f"{where}: column {col} has {n} missing values"
    if kind == "expect_column_value_lengths_to_be_between":
        at = f" (row {_row_in_file(raw, first)}: {len(str(df[col].iloc[first]))} chars)" if first is not None else ""
        return f"{where}: column {col} has {n} values outside {rules.min_len}..{rules.max_chars} chars{at}"
    if kind == "expect_column_proportion_of_unique_values_to_be_between":
        dup = 1.0 - float(res.get("observed_value") or 0.0)
        return (f"{where}: {dup:.0%} of rows are duplicates ({col}), "
                f"above max_duplicate_ratio={rules.max_duplicate_ratio}")
    if kind == "expect_column_values_to_be_in_set":
        named = next(lb.named for lb in rules.labels if lb.column == col)
        bad = sorted({str(v) for v in res.get("unexpected_list") or res.get("partial_unexpected_list") or []})
        return f"{where}: column {col} has values outside {named}: {bad[:5]}"
    return f"{where}: {kind} failed on {col}"


def _plain(v: Any) -> Any:
    """numpy scalars -> JSON-friendly Python values."""
    if hasattr(v, "item"):
        return v.item()
    return v if v is None or isinstance(v, (int, float, str, bool)) else str(v)
