"""The job engine (prunepath.pipeline.jobs): resume, deadline, shards + merge, failures, the sweep loop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from prunepath.errors import PrunePathError
from prunepath.pipeline import jobs as J


class FileJobs:
    """A tiny study on the engine: a finished job leaves out/<id>.json; merge() gathers every finished job."""

    def __init__(self, out: Path, deadline: J.Deadline | None = None, need: float = 0.0) -> None:
        self.out, self.deadline, self.need, self.calls = out, deadline or J.Deadline(), need, []

    def is_done(self, job_id: str) -> bool:
        return (self.out / f"{job_id}.json").exists()

    def execute(self, job: J.Job) -> None:
        self.deadline.check(self.need)
        self.calls.append(job.id)
        (self.out / f"{job.id}.json").write_text(json.dumps(job.fn()))

    def run(self, jobs: list[J.Job], **kw) -> dict:
        return J.run_jobs(jobs, is_done=self.is_done, execute=self.execute, **kw)

    def merge(self, jobs: list[J.Job]) -> dict:
        return {j.id: json.loads((self.out / f"{j.id}.json").read_text()) for j in jobs if self.is_done(j.id)}


def make_jobs() -> list[J.Job]:
    return [J.Job("a1", "A", lambda: {"v": 1}), J.Job("b1", "B", lambda: {"v": 2}),
            J.Job("a2", "A", lambda: {"v": 3}, deps=["a1"]), J.Job("c1", "C", lambda: {"v": 4}),
            J.Job("b2", "B", lambda: {"v": 5}, deps=["b1"])]


def test_resume_skips_finished_jobs(tmp_path):
    study = FileJobs(tmp_path)
    (tmp_path / "b1.json").write_text(json.dumps({"v": 2}))  # finished by an earlier run
    res = study.run(make_jobs())
    assert study.calls == ["a1", "a2", "c1", "b2"] and res["ran"] == study.calls
    assert res["left"] == [] and res["stopped"] is None
    again = FileJobs(tmp_path)
    assert again.run(make_jobs())["ran"] == [] and again.calls == []


def test_a_job_waits_for_its_dependencies(tmp_path):
    study = FileJobs(tmp_path)
    res = study.run([j for j in make_jobs() if j.id != "a1"])
    assert "a2" not in study.calls and "a2 (waits for a1)" in res["left"]


def test_deadline_stops_cleanly_and_the_next_run_resumes(tmp_path):
    jobs = make_jobs()
    study = FileJobs(tmp_path, J.Deadline(time.time() + 3600), need=10.0)
    real_execute = study.execute

    def execute(job):  # the deadline comes near after two jobs
        if len(study.calls) == 2:
            study.deadline = J.Deadline(time.time() + 5.0)
        real_execute(job)

    res = J.run_jobs(jobs, is_done=study.is_done, execute=execute)
    assert res["ran"] == ["a1", "b1"] and "s left, need 10 s" in res["stopped"]
    assert res["left"] == ["a2 (interrupted: resumes on the next run)", "c1", "b2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a1.json", "b1.json"]  # nothing half-written
    resumed = FileJobs(tmp_path)
    assert resumed.run(jobs)["ran"] == ["a2", "c1", "b2"]
    assert resumed.merge(jobs) == {"a1": {"v": 1}, "b1": {"v": 2}, "a2": {"v": 3}, "c1": {"v": 4}, "b2": {"v": 5}}


def test_shards_split_whole_chains_and_merge_to_the_full_result(tmp_path):
    jobs = make_jobs()
    shards = [J.shard_jobs(jobs, i, 2) for i in range(2)]
    assert [[j.id for j in s] for s in shards] == [["a1", "a2", "c1"], ["b1", "b2"]]
    for s in shards:  # every job in exactly one shard, with its dependencies
        ids = {j.id for j in s}
        assert all(set(j.deps) <= ids for j in s)
    for s in shards:  # each shard runs on its own (as a separate process would), into the same folder
        assert FileJobs(tmp_path).run(s)["left"] == []
    alone = tmp_path / "alone"
    alone.mkdir()
    FileJobs(alone).run(jobs)
    assert FileJobs(tmp_path).merge(jobs) == FileJobs(alone).merge(jobs)
    assert J.parse_shard("1/2") == (1, 2) and J.parse_shard(None) == (0, 1)
    for bad in ("2/2", "x"):
        with pytest.raises(PrunePathError):
            J.parse_shard(bad)


def test_select_jobs_by_pattern():
    jobs = make_jobs()
    assert [j.id for j in J.select_jobs(jobs, ["a*"])] == ["a1", "a2"]
    assert J.select_jobs(jobs, None) is jobs
    with pytest.raises(PrunePathError, match="no job matches"):
        J.select_jobs(jobs, ["zz*"])


def test_a_failing_job_is_recorded_and_the_others_go_on(tmp_path):
    jobs = make_jobs()
    jobs[0] = J.Job("a1", "A", lambda: 1 / 0)
    study = FileJobs(tmp_path)
    seen = []
    res = study.run(jobs, on_error=lambda job, exc: seen.append((job.id, type(exc))) or f"{job.id} (FAILED)")
    assert seen == [("a1", ZeroDivisionError)] and res["failed"] == ["a1"]
    assert res["ran"] == ["b1", "c1", "b2"] and res["left"] == ["a1 (FAILED)", "a2 (waits for a1)"]
    (tmp_path / "x").mkdir()
    with pytest.raises(ZeroDivisionError):  # without on_error a failure propagates
        FileJobs(tmp_path / "x").run(jobs[:1])


def test_rows_survive_a_line_cut_short(tmp_path):
    path = tmp_path / "rows.jsonl"
    J.append_row(path, {"tau": 0.9})
    J.append_row(path, {"tau": 0.7})
    with open(path, "a") as f:
        f.write('{"tau": 0.')  # an interruption mid-line
    assert J.read_rows(path) == [{"tau": 0.9}, {"tau": 0.7}]
    J.rewrite_rows(tmp_path / "sub" / "p.jsonl", [{"a": 1}])
    assert J.read_rows(tmp_path / "sub" / "p.jsonl") == [{"a": 1}] and J.read_rows(tmp_path / "none") == []


def test_resumable_sweep_evaluates_only_missing_points():
    done = {0.9: {"tau": 0.9, "old": True}, 2.0: {"tau": 2.0}}
    evaluated, saved, before = [], [], []

    def evaluate(t):
        evaluated.append(t)
        return {"tau": t}

    rows = J.resumable_sweep([0.9, 0.7, 0.5], done, evaluate, saved.append, before=before.append)
    assert evaluated == before == [0.7, 0.5] and saved == [{"tau": 0.7}, {"tau": 0.5}]
    assert rows == [{"tau": 0.9, "old": True}, {"tau": 0.7}, {"tau": 0.5}]
    assert set(done) == {0.9, 0.7, 0.5, 2.0}  # earlier points are kept
    keyed = J.resumable_sweep([[1, "a"]], {json.dumps([1, "a"]): {"x": 1}}, evaluate, saved.append, key=json.dumps)
    assert keyed == [{"x": 1}]
