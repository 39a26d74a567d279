"""The one job engine of the pipeline: jobs, a deadline, shards, resume and the resumable sweep loop.

``prunepath run`` (:mod:`~prunepath.pipeline.runner`), the LM study (:mod:`~prunepath.pipeline.lm_study`) and the
NLU study (:mod:`~prunepath.pipeline.nlu_study`) are built on it:

* :class:`Job` and :func:`run_jobs`: run jobs in order, skip the finished ones (resume), wait for dependencies,
  stop cleanly at a :class:`Deadline` (:class:`DeadlineReached`) and keep going past a failing job when the
  caller says how to record it;
* :func:`select_jobs`, :func:`shard_jobs`, :func:`parse_shard`: ``--jobs`` patterns and ``--shard i/n`` (whole
  chains per shard, so a shard never waits for another);
* :func:`read_rows`, :func:`append_row`, :func:`rewrite_rows`: JSON-lines files of finished rows that survive an
  interruption (a line cut short is dropped and recomputed);
* :func:`resumable_sweep`: the one loop over τ / knob / target points that skips the points already done.

Merging is the caller's: each study knows its own result files; the engine guarantees that every finished job
(or row) is on disk before the next starts.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable

from prunepath.errors import PrunePathError
from prunepath.io import atomic_write_text


class DeadlineReached(Exception):
    """The run stopped before its deadline; every finished piece of work is on disk."""


@dataclass
class Deadline:
    """An absolute ``time.time()`` (None: no deadline)."""

    at: float | None = None

    def left(self) -> float:
        return math.inf if self.at is None else self.at - time.time()

    def check(self, need: float = 0.0) -> None:
        """Raise :class:`DeadlineReached` when less than ``need`` seconds are left."""
        require(self.left(), need)


def require(left: float, need: float) -> None:
    """Raise :class:`DeadlineReached` when ``left`` seconds are fewer than ``need``."""
    if left < need:
        raise DeadlineReached(f"{max(left, 0):.0f} s left, need {need:.0f} s")


# ---- jobs ------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One unit of work. ``chain``: jobs of one chain run in one shard (a job depends only on earlier jobs of its
    chain); ``fn`` is called by the caller's ``execute`` (the engine never looks at it)."""

    id: str
    chain: str
    fn: Callable[..., Any]
    deps: list[str] = field(default_factory=list)
    args: dict = field(default_factory=dict)


def select_jobs(jobs: list[Job], patterns: list[str] | None) -> list[Job]:
    """The jobs whose id matches one of ``patterns`` (shell wildcards; None: all). Their dependencies must be
    finished already or selected too; a run only waits for them, it never starts unselected work."""
    if not patterns:
        return jobs
    chosen = [j for j in jobs if any(fnmatch.fnmatchcase(j.id, p) for p in patterns)]
    if not chosen:
        raise PrunePathError(f"jobs: no job matches {', '.join(patterns)}; jobs are "
                             f"{', '.join(j.id for j in jobs)}")
    return chosen


def chains_of(jobs: list[Job]) -> list[str]:
    seen: list[str] = []
    for j in jobs:
        if j.chain not in seen:
            seen.append(j.chain)
    return seen


def shard_jobs(jobs: list[Job], index: int, count: int) -> list[Job]:
    """The jobs of shard ``index`` of ``count``: whole chains, chain c (in order of first appearance) to shard
    c mod count; every job lands in exactly one shard and its dependencies in the same one."""
    if count < 1 or not 0 <= index < count:
        raise PrunePathError(f"--shard {index}/{count}: need 0 <= i < n (e.g. --shard 0/2 and --shard 1/2)")
    order = chains_of(jobs)
    mine = {c for i, c in enumerate(order) if i % count == index}
    return [j for j in jobs if j.chain in mine]


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise PrunePathError(f"--shard takes i/n, e.g. 0/2 (got {text!r})") from exc
    if n < 1 or not 0 <= i < n:
        raise PrunePathError(f"--shard {text}: need 0 <= i < n")
    return i, n


def run_jobs(jobs: Iterable[Job], *, is_done: Callable[[str], bool], execute: Callable[[Job], None],
             before: Callable[[Job], None] | None = None,
             on_error: Callable[[Job, Exception], str] | None = None,
             after: Callable[[Job], None] | None = None) -> dict:
    """Run ``jobs`` in order; returns {"ran", "left", "failed", "stopped"}.

    A job that ``is_done`` is skipped (resume); one whose dependencies are not done waits (listed in "left").
    ``before(job)`` may raise :class:`DeadlineReached` (e.g. :meth:`Deadline.check`), as may ``execute``: the run
    then stops, and every later job is listed as left. Any other exception goes to ``on_error(job, exc)``, which
    records it and returns the "left" line, or re-raises (without ``on_error`` it propagates). ``after(job)``
    runs after every attempted job (e.g. to free GPU memory)."""
    ran: list[str] = []
    left: list[str] = []
    failed: list[str] = []
    stopped: str | None = None
    for job in jobs:
        if is_done(job.id):
            continue
        missing = [d for d in job.deps if not is_done(d)]
        if stopped is not None or missing:
            left.append(job.id + (f" (waits for {', '.join(missing)})" if missing and stopped is None else ""))
            continue
        try:
            if before is not None:
                before(job)
            execute(job)
            ran.append(job.id)
        except DeadlineReached as why:
            stopped = str(why)
            left.append(job.id + " (interrupted: resumes on the next run)")
        except Exception as exc:  # noqa: BLE001 - one failing job must not stop the independent ones
            if on_error is None:
                raise
            left.append(on_error(job, exc))
            failed.append(job.id)
        finally:
            if after is not None:
                after(job)
    return {"ran": ran, "left": left, "failed": failed, "stopped": stopped}


# ---- rows that survive an interruption -------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (none when it does not exist), up to the first line cut short."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by an interruption: recompute from here
    return rows


def append_row(path: Path, row: dict, default: Callable = str) -> None:
    """Append one row (flushed at once: an interruption loses at most the line being written)."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=default) + "\n")
        f.flush()


def rewrite_rows(path: Path, rows: list[dict], default: Callable = float) -> None:
    """Write ``rows`` as JSON lines atomically (the file is always a complete earlier or later version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, default=default) + "\n" for r in rows))


def resumable_sweep(points: Iterable, done: dict, evaluate: Callable[[Any], dict], save: Callable[[dict], None], *,
                    key: Callable[[Any], Hashable] = lambda p: p,
                    before: Callable[[Any], None] | None = None) -> list[dict]:
    """The one sweep loop: for each point not in ``done`` (by ``key(point)``), ``before(point)`` (a deadline
    check, a log line), ``row = evaluate(point)``, ``save(row)`` and ``done[key] = row``. Returns the rows of
    ``points`` in order; ``done`` keeps any other rows it held (earlier runs' points)."""
    rows = []
    for p in points:
        k = key(p)
        if k not in done:
            if before is not None:
                before(p)
            row = evaluate(p)
            save(row)
            done[k] = row
        rows.append(done[k])
    return rows
