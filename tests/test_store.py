"""Results store integrity: atomic writes, immutability, schema version, plain readers."""

import subprocess
import sys
import textwrap

import pandas as pd
import pyarrow.parquet as pq
import pytest

from qsearch import QSearchError
from qsearch.files import RESULTS_FILE as FILENAME
from qsearch.store import ResultsStore


def row(i: int, **kw) -> dict:
    return {"experiment_id": "e", "trial_id": f"t{i}", "trial_index": i, "stage": "search",
            "strategy": "uniform", "status": "ok", "val_acc": 0.5 + i / 100,
            "metrics": {"steps": 10}, **kw}


def test_rows_are_written_as_they_come_and_readable_without_qsearch(tmp_path):
    store = ResultsStore(tmp_path)
    for i in range(3):
        assert store.append(row(i))
        assert len(pd.read_parquet(tmp_path / FILENAME)) == i + 1
    meta = pq.read_schema(tmp_path / FILENAME).metadata
    assert meta[b"qsearch_schema_version"] == b"2"
    assert ResultsStore(tmp_path).rows == store.rows


def test_version_1_files_read_with_their_steps_unknown_and_are_kept_on_append(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(row(0, steps=10))
    table = pq.read_table(tmp_path / FILENAME).drop_columns(["steps"])
    pq.write_table(table.replace_schema_metadata({"qsearch_schema_version": "1"}),
                   tmp_path / FILENAME)
    old = ResultsStore(tmp_path)
    assert old.rows[0]["steps"] is None and old.rows[0]["val_acc"] == 0.5
    old.append(row(1, steps=20))
    assert [r["steps"] for r in ResultsStore(tmp_path).rows] == [None, 20]


def test_records_are_immutable_once_written(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(row(0))
    assert not store.append(row(0, val_acc=0.99))  # same trial and stage: ignored
    assert ResultsStore(tmp_path).rows[0]["val_acc"] == 0.5
    assert store.append(row(0, stage="final"))  # the final stage is another record


def test_crash_between_write_and_rename_keeps_the_previous_file(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(row(0))
    before = (tmp_path / FILENAME).read_bytes()
    script = textwrap.dedent(f"""
        import os
        from qsearch.store import ResultsStore
        store = ResultsStore({str(tmp_path)!r})
        os.replace = lambda *a: os._exit(9)  # the process dies right before the rename
        store.append({row(1)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == 9
    assert (tmp_path / FILENAME).read_bytes() == before  # previous file intact
    assert (tmp_path / (FILENAME + ".tmp")).exists()  # the interrupted write, never renamed
    again = ResultsStore(tmp_path)
    assert [r["trial_id"] for r in again.rows] == ["t0"]
    again.append(row(1))
    assert [r["trial_id"] for r in ResultsStore(tmp_path).rows] == ["t0", "t1"]


def test_unknown_columns_and_other_schema_versions_are_refused(tmp_path):
    store = ResultsStore(tmp_path)
    with pytest.raises(ValueError, match="unknown result columns"):
        store.append(row(0, colour="blue"))
    store.append(row(0))
    table = pq.read_table(tmp_path / FILENAME)
    pq.write_table(table.replace_schema_metadata({"qsearch_schema_version": "99"}),
                   tmp_path / FILENAME)
    with pytest.raises(QSearchError, match="schema version 99"):
        ResultsStore(tmp_path)
