"""metrics.csv in the run dir: a row per finished epoch (epoch, optimizer step, lr, the train and
val metrics, the time it ended), for `pandas.read_csv` or a spreadsheet beside TensorBoard.

Each epoch rewrites the file whole and atomically: the rows of the epochs before it are kept and
its own row replaces any later ones. So however a run stops and resumes (killed after this file
but before its checkpoint, resumed from best.pt), the file holds each epoch 1..n once, as the
checkpoints trained them.
"""

import csv
import io
from datetime import datetime, timezone
from pathlib import Path

from setrain.errors import SetrainError
from setrain.files import write_atomically


def write_epoch_row(path: Path, row: dict) -> None:
    """Record `row` (with an int "epoch") in the metrics file at `path`, with the time it ended."""
    columns, earlier = _read_rows(path)
    row = {**row, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys([*columns, *row])), lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept for epoch, kept in earlier if epoch < row["epoch"])
    writer.writerow(row)
    try:
        write_atomically(path, lambda file: file.write(text.getvalue().encode()))
    except OSError as error:
        raise SetrainError(
            f"Could not write {path} ({error.strerror or error}); free space or make {path.parent} writable, "
            f"then continue with resume=auto hydra.run.dir={path.parent}."
        ) from error


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The file's columns and its rows with their epochs; none where it does not exist yet."""
    if not path.is_file():
        return [], []
    try:
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            rows = [(int(row["epoch"]), row) for row in reader]
        return list(reader.fieldnames or []), rows
    except (csv.Error, KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
        raise SetrainError(
            f"{path} is not the metrics file setrain writes ({type(error).__name__}: {error}); move it "
            f"away (the checkpoints are intact), then continue with resume=auto hydra.run.dir={path.parent}."
        ) from error
