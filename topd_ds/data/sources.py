"""Row sources: JSONL, Parquet and `datasets.save_to_disk` folders, read by index without loading them.

    src = open_source("train.jsonl")        # or "train.parquet", a folder of *.parquet, a save_to_disk folder
    len(src); src.row(17) -> dict; src.where(17) -> "train.jsonl:18"

Start-up cost and memory, for N rows:
* JSONL: one pass over the bytes finds the line starts (numpy, 16 MiB chunks); the index is two int64 arrays
  (16 bytes per row). `row(i)` is one `os.pread` + `json.loads`. A UTF-8 byte-order mark and CRLF line ends
  are accepted; blank lines are not rows.
* Parquet: the footer gives the row count per row group; nothing else is read until a row is asked for. `row(i)`
  decodes the row group holding i (the two most recent are kept).
* `datasets` folders: `datasets.load_from_disk` memory-maps the Arrow files; `row(i)` is `ds[i]`.

Errors name the file and the row: `file:LINE` for JSONL (lines counted from 1, as editors count them),
`file: row I` for Parquet and Arrow (rows counted from 0, as `ds[I]` and pandas count them).
"""

import glob
import json
import os
import threading
from bisect import bisect_right
from collections import OrderedDict

import numpy as np

from topd_ds.errors import DataError

_CHUNK = 16 << 20          # bytes per read while indexing a JSONL file
_BOM = b"\xef\xbb\xbf"
_BLANK_FIRST_BYTES = np.frombuffer(b" \t\r\n\f\v", dtype=np.uint8)
_ROW_GROUPS_KEPT = 2       # decoded Parquet row groups kept (sequential reads hit the same one)


class JsonlSource:
    """Rows of a JSONL file by index; see the module docstring."""

    def __init__(self, path: str):
        self.path, self._fd = path, None
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise DataError(f"{path}: cannot read: {err.strerror or err}") from err
        self.starts, self.ends, self._blank_lines = self._index()

    def _index(self):
        """(starts, ends, blank line numbers): byte ranges of the non-blank lines (ends exclude '\\n').

        One pass in 16 MiB chunks (flat memory): the newline positions and the byte after each, so a line that
        might be blank (empty, or starting with whitespace) is known without reading the file again."""
        size = os.fstat(self._fd).st_size
        newlines, next_bytes = [], []
        pos = 0
        while pos < size:
            chunk = np.frombuffer(os.pread(self._fd, min(_CHUNK, size - pos), pos), dtype=np.uint8)
            nl = np.flatnonzero(chunk == 10)
            after = np.full(len(nl), 123, dtype=np.uint8)  # '{' stands for "not whitespace"
            inside = nl + 1 < len(chunk)
            after[inside] = chunk[nl[inside] + 1]
            if len(nl) and not inside[-1] and pos + len(chunk) < size:  # the next line starts in the next chunk
                after[-1] = os.pread(self._fd, 1, pos + len(chunk))[0]
            if len(nl) and not inside[-1] and pos + len(chunk) >= size:
                after[-1] = 10  # the file ends with '\n': an empty last line
            newlines.append(nl + pos)
            next_bytes.append(after)
            pos += len(chunk)
        nl = np.concatenate(newlines) if newlines else np.zeros(0, dtype=np.int64)
        starts = np.concatenate([[0], nl + 1]).astype(np.int64)
        ends = np.concatenate([nl, [size]]).astype(np.int64)
        first_of_file = os.pread(self._fd, 4, 0)
        if first_of_file.startswith(_BOM):
            starts[0] = 3  # a byte-order mark (Windows editors, spreadsheet exports) is not part of the data
            first_of_file = first_of_file[3:]
        first = np.concatenate([np.frombuffer(first_of_file[:1] or b"\n", dtype=np.uint8)]
                               + (next_bytes or [np.zeros(0, dtype=np.uint8)]))
        # a line is blank when it is empty or only whitespace; only lines that are empty or start with whitespace
        # can be, so those few are read one by one
        maybe = np.flatnonzero((ends <= starts) | np.isin(first, _BLANK_FIRST_BYTES))
        blank = [i for i in maybe.tolist() if not os.pread(self._fd, int(ends[i] - starts[i]), int(starts[i])).strip()]
        keep = np.ones(len(starts), dtype=bool)
        keep[blank] = False
        return starts[keep], ends[keep], np.asarray(blank, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, i: int) -> str:
        """`file:LINE` of row i (blank lines before it counted, as an editor shows it)."""
        line = i  # 0-based line index: the smallest L with L - (blank lines <= L) == i and L not blank
        while True:
            moved = i + int(np.searchsorted(self._blank_lines, line, "right"))
            if moved == line:
                return f"{self.path}:{line + 1}"
            line = moved

    def row(self, i: int) -> dict:
        where = self.where(i)
        raw = os.pread(self._fd, int(self.ends[i] - self.starts[i]), int(self.starts[i]))
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not valid UTF-8 (byte {err.start})") from err
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from err
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        return record

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


class ParquetSource:
    """Rows of one or more Parquet files (in name order) by index; see the module docstring."""

    def __init__(self, paths: list, label: str):
        import pyarrow.parquet as pq

        self.label = label
        self.files, self.group_starts, self.group_where = [], [], []
        n = 0
        for path in paths:
            try:
                f = pq.ParquetFile(path)
            except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
                raise DataError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from err
            self.files.append(f)
            first_in_file = n
            for g in range(f.metadata.num_row_groups):
                self.group_starts.append(n)
                self.group_where.append((len(self.files) - 1, g, first_in_file))
                n += f.metadata.row_group(g).num_rows
        self.n_rows = n
        self.paths = list(paths)
        self._groups = OrderedDict()  # group index -> its decoded pyarrow Table
        self._lock = threading.Lock()  # the pipeline thread and the trainer may read at once

    def __len__(self) -> int:
        return self.n_rows

    def _locate(self, i: int):
        g = bisect_right(self.group_starts, i) - 1
        file_idx, local_group, first_in_file = self.group_where[g]
        return g, file_idx, local_group, i - first_in_file

    def where(self, i: int) -> str:
        _, file_idx, _, row_in_file = self._locate(i)
        return f"{self.paths[file_idx]}: row {row_in_file}"

    def row(self, i: int) -> dict:
        g, file_idx, local_group, _ = self._locate(i)
        with self._lock:
            table = self._groups.get(g)
            if table is None:
                try:
                    table = self.files[file_idx].read_row_group(local_group)
                except Exception as err:
                    raise DataError(f"{self.where(i)}: cannot decode its row group "
                                    f"({str(err).splitlines()[0]})") from err
                self._groups[g] = table
                while len(self._groups) > _ROW_GROUPS_KEPT:
                    self._groups.popitem(last=False)
            else:
                self._groups.move_to_end(g)
        # only the row asked for becomes Python objects (a whole group of long responses would cost ~50 ms)
        return table.slice(i - self.group_starts[g], 1).to_pylist()[0]


class ArrowDatasetSource:
    """Rows of a `datasets.save_to_disk` folder (memory-mapped Arrow) by index."""

    def __init__(self, path: str):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as err:
            raise DataError(f"{path}: not a datasets.save_to_disk folder ({str(err).splitlines()[0]})") from err
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise DataError(f"{path}: holds the splits {', '.join(ds)}; name one folder, e.g. "
                                f"{os.path.join(path, next(iter(ds)))}")
            ds = next(iter(ds.values()))
        self.path, self.ds = path, ds

    def __len__(self) -> int:
        return len(self.ds)

    def where(self, i: int) -> str:
        return f"{self.path}: row {i}"

    def row(self, i: int) -> dict:
        return self.ds[int(i)]


def open_source(path: str):
    """The reader for `path`: a .jsonl/.json file, a .parquet file, a folder of .parquet files (searched
    recursively, as Hugging Face dataset repositories lay them out), or a `datasets.save_to_disk` folder."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")) or \
                os.path.exists(os.path.join(path, "state.json")):
            return ArrowDatasetSource(path)
        parquet = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if parquet:
            return ParquetSource(parquet, path)
        raise DataError(f"{path}: a folder with neither .parquet files nor a datasets.save_to_disk layout "
                        f"(state.json / dataset_dict.json)")
    if path.endswith(".parquet"):
        if not os.path.isfile(path):
            raise DataError(f"{path}: cannot read: No such file or directory")
        return ParquetSource([path], path)
    return JsonlSource(path)
