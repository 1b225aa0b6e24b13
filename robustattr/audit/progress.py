"""Progress of an audit, readable in any log: rich bars on a terminal; elsewhere (CI, SLURM logs, a pipe) plain
lines with the part, done/total, percentage, elapsed time and ETA, at most one per part every ``every`` seconds
plus its last."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class PlainProgress:
    """Line-per-update progress for non-terminal output."""

    def __init__(self, stream: TextIO, every: float = 10.0) -> None:
        self.stream = stream
        self.every = every
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, label: str, total: int, completed: int = 0, cached: bool = False) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"label": label, "total": max(1, total), "done": completed, "start": time.perf_counter(),
                            "printed": 0.0}  # fmt: skip
        if cached:
            self._print(f"{label}: cached (0 s)")
        else:
            self._print(f"{label}: 0/{total}")
        return task

    def advance(self, task: int, amount: int = 1) -> None:
        t = self.tasks[task]
        t["done"] = min(t["total"], t["done"] + amount)
        now = time.perf_counter()
        if t["done"] >= t["total"] or now - t["printed"] >= self.every:
            t["printed"] = now
            elapsed = now - t["start"]
            eta = elapsed / t["done"] * (t["total"] - t["done"]) if t["done"] else float("nan")
            end = "done" if t["done"] >= t["total"] else f"ETA {_clock(eta)}"
            self._print(f"{t['label']}: {t['done']}/{t['total']} ({100 * t['done'] // t['total']}%), "
                        f"{_clock(elapsed)} elapsed, {end}")  # fmt: skip

    def note(self, line: str) -> None:
        self._print(line)

    def _print(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class RichProgress:
    """rich's bars, with the same small interface."""

    def __init__(self) -> None:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()]  # fmt: skip
        self.progress = Progress(*columns, transient=False)

    def __enter__(self) -> RichProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def add_task(self, label: str, total: int, completed: int = 0, cached: bool = False) -> int:
        label = escape(label) + (" (cached)" if cached else "")
        return self.progress.add_task(label, total=total, completed=completed)

    def advance(self, task: int, amount: int = 1) -> None:
        self.progress.advance(task, amount)

    def note(self, line: str) -> None:
        self.progress.console.print(escape(line))


class QuietProgress(PlainProgress):
    """No display: the processes of a job other than rank 0."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def _print(self, line: str) -> None:
        return None


def progress_display(
    stream: TextIO | None = None, every: float = 10.0, quiet: bool = False
) -> PlainProgress | RichProgress:
    if quiet:
        return QuietProgress()
    stream = stream if stream is not None else sys.stdout
    return RichProgress() if stream.isatty() else PlainProgress(stream, every)


class JobProgress:
    """The progress of a whole job, shown once: every process adds its finished units to the job's counter of
    the part (`Shard.add`); rank 0's display shows the counter. Every process adds the same parts in the same
    order, so a part's number is the same everywhere. Outside a job it is the display itself."""

    def __init__(self, display: PlainProgress | RichProgress, shard) -> None:
        self.display, self.shard = display, shard
        self.tasks: list[dict] = []
        self.key = f"robustattr/audit/{time.time_ns() if not shard.distributed else shard.broadcast(time.time_ns())}"

    def add_task(self, label: str, total: int, completed: int = 0, cached: bool = False) -> int:
        task = self.display.add_task(label, total=total, completed=completed, cached=cached)
        self.tasks.append({"id": task, "total": max(1, total), "shown": completed})
        return len(self.tasks) - 1

    def advance(self, task: int, amount: int = 1) -> None:
        t = self.tasks[task]
        counted = self.shard.add(f"{self.key}/{task}", amount) if self.shard.distributed else None
        now = t["shown"] + amount if counted is None else counted
        now = min(now, t["total"])
        if now > t["shown"]:
            self.display.advance(t["id"], now - t["shown"])
            t["shown"] = now

    def advance_here(self, task: int, amount: int = 1) -> None:
        """Progress that every process makes alike (a section whose engine shares the work): rank 0's counts."""
        if self.shard.main:
            t = self.tasks[task]
            amount = min(amount, t["total"] - t["shown"])
            if amount > 0:
                self.display.advance(t["id"], amount)
                t["shown"] += amount

    def finish(self, task: int) -> None:
        """The part is done (for the whole job: called once every process finished its share)."""
        t = self.tasks[task]
        if t["shown"] < t["total"]:
            self.display.advance(t["id"], t["total"] - t["shown"])
            t["shown"] = t["total"]

    def note(self, line: str) -> None:
        self.display.note(line)
