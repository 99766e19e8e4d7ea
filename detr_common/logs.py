"""Run logging: console set-up and the upstream-compatible ``log.txt`` (one JSON per epoch)."""
import json
import logging
import sys
from pathlib import Path

from .distributed import is_main_process


def setup_console_logging():
    """INFO lines on stderr from the main process only (others log warnings and errors)."""
    logging.basicConfig(
        level=logging.INFO if is_main_process() else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
        force=True)


def append_log(output_dir, record):
    """Append one JSON line to ``output_dir/log.txt`` (main process only)."""
    if not output_dir or not is_main_process():
        return
    path = Path(output_dir) / "log.txt"
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path):
    """The records of a ``log.txt`` as a list of dicts."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def epoch_record(epoch, train_stats, test_stats, n_parameters):
    """The log.txt record of one epoch: ``train_<name>``, ``test_<name>`` and extras."""
    record = {"epoch": epoch}
    record.update({f"train_{k}": v for k, v in train_stats.items()})
    record.update({f"test_{k}": v for k, v in test_stats.items()})
    record["n_parameters"] = n_parameters
    return record
