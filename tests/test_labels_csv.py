"""The one labels-CSV reader (``embedstore.store.labels.read_labels_csv``): what the store's task
import and the heads' labelled sets both read, and its one-line refusals."""
from __future__ import annotations

from pathlib import Path

import pytest

from embedstore.errors import LabelsError
from embedstore.store.labels import _task_rows, read_labels_csv


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_columns_keep_every_column_and_path_is_the_key(tmp_path):
    f = write(tmp_path / "l.csv", " path , label,split,patient\na.png, tumor ,train,p1\nb.png,normal,,p2\n")
    cols = read_labels_csv(f)
    assert cols == {"key": ["a.png", "b.png"], "label": ["tumor", "normal"], "split": ["train", ""],
                    "patient": ["p1", "p2"]}
    assert _task_rows(cols) == [{"key": "a.png", "label": "tumor", "split": "train", "group": None},
                                {"key": "b.png", "label": "normal", "split": None, "group": None}]


def test_short_rows_read_as_empty_cells(tmp_path):
    f = write(tmp_path / "l.csv", "key,label,group\na,x\nb,y,g\n")
    assert read_labels_csv(f)["group"] == ["", "g"]


@pytest.mark.parametrize("text,match", [
    ("file,class\nx,1\n", "needs columns key"),
    ("key,label\na,x\nb,\n", r"1 row\(s\) with an empty label \(first: line 3\)"),
    ("path,label\n,x\n", r"empty path \(first: line 2\)"),
    ("key,label\n", "a header but no rows"),
])
def test_bad_files_are_one_line(tmp_path, text, match):
    with pytest.raises(LabelsError, match=match):
        read_labels_csv(write(tmp_path / "l.csv", text))


def test_missing_file(tmp_path):
    with pytest.raises(LabelsError, match="does not exist"):
        read_labels_csv(tmp_path / "nope.csv")
