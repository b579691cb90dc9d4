"""JSON Lines record of an agent run: one object per line, written as it happens."""

import json
import time
from pathlib import Path


class StepLog:
    """Appends records to ``path`` (None: keeps them in ``records`` only).

    Each record has ``event`` ("run_start", "generation", "tool", "run_end"), ``step``
    and ``time`` (Unix seconds); see ``Agent`` for the other fields.
    """

    def __init__(self, path=None):
        self.path = Path(path) if path is not None else None
        self.records = []
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, event, step, **fields):
        record = {"event": event, "step": step, "time": round(time.time(), 6), **fields}
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False, default=repr) + "\n")
            self._file.flush()
        return record

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def read_log(path):
    """The records of a step log."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
