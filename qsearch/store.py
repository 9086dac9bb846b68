"""The results store: one Parquet file of immutable trial records per experiment.

Written by the driver as each trial completes, atomically (temp file, fsync, rename), so a
crash leaves the previous file intact. Readable by pandas or DuckDB without qsearch:
``pandas.read_parquet("runs/x/results.parquet")``. The schema version is in the file's
key-value metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qsearch import QSearchError
from qsearch.files import RESULTS_FILE

SCHEMA_VERSION = 2  # 2 added "steps"; version 1 files are read with it empty

SCHEMA = pa.schema([
    ("experiment_id", pa.string()),
    ("trial_id", pa.string()),
    ("trial_index", pa.int64()),
    ("stage", pa.string()),  # "search" | "final"
    ("strategy", pa.string()),
    ("task", pa.string()),
    ("model", pa.string()),
    ("dataset", pa.string()),
    ("budget", pa.string()),
    ("budget_kind", pa.string()),
    ("budget_value", pa.float64()),
    ("proxy_budget", pa.string()),
    ("candidate", pa.string()),  # Candidate JSON (exact round trip)
    ("width", pa.float64()),
    ("c_size", pa.float64()),
    ("bitops", pa.float64()),
    ("budget_ratio", pa.float64()),
    ("val_acc", pa.float64()),
    ("test_acc", pa.float64()),
    ("train_seconds", pa.float64()),
    ("wall_seconds", pa.float64()),
    ("node", pa.string()),
    ("status", pa.string()),  # ok | stopped (early, by a scheduler) | failed | diverged
    ("steps", pa.int64()),  # training steps behind val_acc (the trial's fidelity)
    ("error", pa.string()),
    ("seed", pa.int64()),
    ("spec_hash", pa.string()),
    ("metrics", pa.string()),  # everything else the task reported, as JSON
    ("finished_at", pa.float64()),
])


class ResultsStore:
    """Append-only trial records in ``<dir>/results.parquet``; one row per trial id."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / RESULTS_FILE
        self.rows: list[dict[str, Any]] = self._read() if self.path.exists() else []

    def _read(self) -> list[dict[str, Any]]:
        where = repr(str(self.path))
        try:
            table = pq.read_table(self.path)
        except (pa.ArrowException, OSError) as e:
            raise QSearchError(f"results file {where} is unreadable ({e}); restore it from a "
                               "backup or start a new experiment") from None
        meta = table.schema.metadata or {}
        version = meta.get(b"qsearch_schema_version", b"0").decode(errors="replace")
        if version == "1":
            if "steps" not in table.column_names:
                table = table.append_column("steps", pa.nulls(len(table), pa.int64()))
        elif version != str(SCHEMA_VERSION):
            raise QSearchError(f"results file {where} has schema version {version[:20]}; "
                               f"this qsearch reads version {SCHEMA_VERSION}")
        fix = "restore it from a backup or start a new experiment"
        missing = [n for n in SCHEMA.names if n not in table.column_names]
        extra = [n for n in table.column_names if n not in SCHEMA.names]
        if missing or extra:
            raise QSearchError(f"results file {where} does not hold qsearch results (it lacks "
                               f"{len(missing)} of their columns {missing[:3]}, and has "
                               f"{len(extra)} others {extra[:3]}); {fix}")
        try:
            table = table.select(SCHEMA.names).cast(SCHEMA)
        except pa.ArrowException as e:
            raise QSearchError(f"results file {where} has columns of the wrong type ({e}); "
                               f"{fix}") from None
        return table.to_pylist()

    def has(self, trial_id: str, stage: str = "search") -> bool:
        return any(r["trial_id"] == trial_id and r["stage"] == stage for r in self.rows)

    def append(self, row: dict[str, Any]) -> bool:
        """Add one record (ignored if that trial id and stage are already stored)."""
        if self.has(row["trial_id"], row.get("stage", "search")):
            return False
        unknown = set(row) - set(SCHEMA.names)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}")
        full = {name: row.get(name) for name in SCHEMA.names}
        if isinstance(full["metrics"], dict):
            full["metrics"] = json.dumps(full["metrics"], sort_keys=True, default=str)
        self.rows.append(full)
        self._write()
        return True

    def _write(self) -> None:
        table = pa.Table.from_pylist(self.rows, schema=SCHEMA).replace_schema_metadata(
            {"qsearch_schema_version": str(SCHEMA_VERSION)})
        tmp = self.path.with_suffix(".parquet.tmp")
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=SCHEMA.names)
