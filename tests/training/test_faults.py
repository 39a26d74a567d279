"""Reliability under real faults: a process killed with SIGKILL in the middle of ``prunepath.save`` or of a
training checkpoint, damaged weight files, checkpoints from a newer prunepath, and resume after a kill.

The saves and the training run that get killed run in child processes (tiny models, CPU), so the kill is a
real ``kill -9`` of a process that is writing, not a simulated exception."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import prunepath
from prunepath import PrunePathError
from prunepath.checkpoint import current_umask
from prunepath.training.config import TrainConfig
from prunepath.training.trainer import _checkpoints, train
from test_train_helpers import one_thread, tiny_llama, tiny_lm_data

TESTS = Path(__file__).resolve().parents[1]  # tests/, where the helper modules the scripts import live


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def digests(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → SHA-256): 'identical' means byte for byte."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}."))


def spawn(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=TESTS, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("child never reached the point to kill")
        time.sleep(0.02)


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


SAVE_CHILD = """
    import sys, time
    from pathlib import Path
    import torch, safetensors.torch
    import prunepath
    from conftest import _tiny

    target, ready = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    model = prunepath.moefy(_tiny("llama"), neurons_per_expert=8, progress=False)
    prunepath.configure(model, tau=0.5)
    prunepath.save(model, target)                      # the previous checkpoint
    real = safetensors.torch.save_model

    def stalled_save_model(m, filename, metadata=None):  # half the file is on disk when the kill lands
        real(m, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        ready.write_text("mid-write")
        time.sleep(300)

    safetensors.torch.save_model = stalled_save_model
    prunepath.configure(model, tau=0.33)
    prunepath.save(model, target)
"""


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    target, ready = tmp_path / "ckpt", tmp_path / "ready"
    proc = spawn(SAVE_CHILD, str(target), str(ready))
    wait_for(ready, proc)
    before = digests(target)
    kill9(proc)

    assert digests(target) == before  # untouched, byte for byte
    model, _ = prunepath.load(target)
    assert model.prunepath.config.routing.tau == 0.5
    # The half-written staging directory is left behind and is never taken for a checkpoint.
    (tmp, ) = leftovers(tmp_path, "ckpt")
    assert (tmp / "model.safetensors").exists() and not (tmp / "prunepath_config.json").exists()
    with pytest.raises(PrunePathError, match="temporary directory left by an interrupted save.*delete it"):
        prunepath.load(tmp)
    # A directory holding weights but not the marker file (written last) is an incomplete checkpoint.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((target / "model.safetensors").read_bytes())
    (partial / "config.json").write_bytes((target / "config.json").read_bytes())
    with pytest.raises(PrunePathError, match="incomplete PrunePath checkpoint.*interrupted save"):
        prunepath.load(partial)
    # The next save to the same path replaces the checkpoint and removes the dead process's leftovers.
    prunepath.configure(model, tau=0.7)
    prunepath.save(model, target)
    assert prunepath.load(target)[0].prunepath.config.routing.tau == 0.7
    assert leftovers(tmp_path, "ckpt") == []


RANDOM_KILL_CHILD = """
    import hashlib, json, os, random, signal, sys, time
    from pathlib import Path
    import torch
    import prunepath
    from prunepath.checkpoint import current_umask, read_config
    from conftest import _tiny

    root, kills = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    model = prunepath.moefy(_tiny("llama"), neurons_per_expert=8, progress=False)
    taus = (0.5, 0.33)

    def digests(d):
        # What a checkpoint holds: the tensors, the configs and the code (safetensors' header order of its
        # metadata varies between writes, and with it the file's checksum, so those are compared by content)
        from safetensors.torch import load_file
        out = {}
        for p in sorted(d.rglob("*")):
            if p.name == "model.safetensors":
                out[p.name] = {k: hashlib.sha256(v.numpy().tobytes()).hexdigest()
                               for k, v in load_file(str(p)).items()}
            elif p.name == "prunepath_config.json":
                out[p.name] = {k: v for k, v in json.loads(p.read_text()).items() if k != "weights_sha256"}
            elif p.is_file():
                out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    refs = []
    for i, tau in enumerate(taus):
        prunepath.configure(model, tau=tau)
        refs.append(digests(prunepath.save(model, root / f"ref{i}")))
    target = root / "ckpt"
    prunepath.configure(model, tau=taus[0])
    prunepath.save(model, target)
    rng = random.Random(1234)
    seen = {"old": 0, "new": 0, "leftovers": 0}
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # the victim: saves the two versions in turn until it is killed
            try:
                for i in range(10**6):
                    prunepath.configure(model, tau=taus[(i + 1) % 2])
                    prunepath.save(model, target)
            finally:
                os._exit(3)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        now = digests(target)  # always one complete version, never a mixture
        assert now in refs, sorted(now)
        seen["old" if now == refs[0] else "new"] += 1
        assert prunepath.load(target)[0].prunepath.config.routing.tau in taus
        for tmp in root.glob(".ckpt.*"):
            seen["leftovers"] += 1
            try:
                read_config(tmp)
                raise SystemExit(f"leftover {tmp} was taken for a checkpoint")
            except prunepath.PrunePathError:
                pass
    prunepath.save(model, target)  # cleans up after the dead savers
    assert not list(root.glob(".ckpt.*")), list(root.glob(".ckpt.*"))
    print(json.dumps(seen))
"""


def test_kill_at_random_points_of_repeated_saves(tmp_path):
    proc = spawn(RANDOM_KILL_CHILD, str(tmp_path), "10")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["old"] + seen["new"] == 10


def test_damaged_weights_are_a_clear_error(tmp_path):
    model = prunepath.moefy(tiny_llama(0), neurons_per_expert=8, progress=False)
    path = prunepath.save(model, tmp_path / "c")
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    damaged = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "header": good[:8] + b"\x00" * 64 + good[72:],
        "bit flip in the data": good[:-64] + bytes(b ^ 0xFF for b in good[-64:]),
    }
    for what, data in damaged.items():
        weights.write_bytes(data)
        with pytest.raises(PrunePathError) as info:
            prunepath.load(path)
        msg = str(info.value)
        assert str(weights) in msg and "corrupt" in msg and "re-create the checkpoint" in msg, (what, msg)
        assert "Traceback" not in msg
    weights.write_bytes(good)
    prunepath.load(path)
    # Without its recorded checksum (an older checkpoint) a truncated file is still caught by the format check.
    meta = json.loads((path / "prunepath_config.json").read_text())
    del meta["weights_sha256"]
    (path / "prunepath_config.json").write_text(json.dumps(meta))
    weights.write_bytes(good[:-10])
    with pytest.raises(PrunePathError, match="model.safetensors is corrupt"):
        prunepath.load(path)


def test_checkpoint_from_a_newer_prunepath_asks_for_an_upgrade(tmp_path):
    model = prunepath.moefy(tiny_llama(0), neurons_per_expert=8, progress=False)
    path = prunepath.save(model, tmp_path / "c")
    meta = json.loads((path / "prunepath_config.json").read_text())
    assert meta["format_version"] == 1 and meta["prunepath_version"] == prunepath.__version__
    meta.update(format_version=2, prunepath_version="9.1.0", a_field_from_the_future=True)
    (path / "prunepath_config.json").write_text(json.dumps(meta))
    with pytest.raises(PrunePathError, match=r"saved by a newer prunepath 9\.1\.0 .*upgrade prunepath"):
        prunepath.load(path)
    from prunepath.cli.main import main

    assert main(["info", str(path)]) == 2
    # Unknown keys alone (same format) are ignored, so a minor addition does not lock older readers out.
    meta["format_version"] = 1
    (path / "prunepath_config.json").write_text(json.dumps(meta))
    prunepath.load(path)


TRAIN_CHILD = """
    import sys, time
    from pathlib import Path
    import torch
    import prunepath
    import prunepath.training.trainer as T
    from prunepath.training.config import TrainConfig
    from test_train_helpers import tiny_llama, tiny_lm_data

    out, ready, cfg = Path(sys.argv[1]), Path(sys.argv[2]), TrainConfig(**__import__("json").loads(sys.argv[3]))
    real = T._write_json_atomic

    def stalled(path, obj):  # the step-4 checkpoint's weights/optimizer are on disk, its marker is not
        if path.name == T.STATE_NAME and path.parent.name == ".step-0000004.tmp":
            ready.write_text("in checkpoint")
            time.sleep(300)
        real(path, obj)

    T._write_json_atomic = stalled
    torch.set_num_threads(1)
    T.train(prunepath.moefy(tiny_llama(0), neurons_per_expert=8, progress=False), None, tiny_lm_data(), cfg,
            out_dir=out)
"""


def _train_cfg(**kw) -> TrainConfig:
    base = dict(stage1_steps=3, stage2_steps=3, tau_min=0.5, tau_rounds=2, batch_size=4, seq_len=32, device="cpu",
                lr_backbone=1e-3, progress=False, seed=0, save_every=2, keep_checkpoints=5, lr_scheduler="linear",
                warmup_steps=2, grad_accum=2)
    base.update(kw)
    return TrainConfig(**base)


def test_kill_during_training_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    out, ready = tmp_path / "run", tmp_path / "ready"
    proc = spawn(TRAIN_CHILD, str(out), str(ready), json.dumps(_train_cfg().to_dict()))
    # Meanwhile, here: the uninterrupted reference run.
    data = tiny_lm_data()
    ref = prunepath.moefy(tiny_llama(0), neurons_per_expert=8, progress=False)
    train(ref, None, data, _train_cfg(), out_dir=tmp_path / "ref")
    wait_for(ready, proc)
    kill9(proc)

    ckpts = out / "checkpoints"
    assert _checkpoints(out) == [ckpts / "step-0000002"]  # the half-written step 4 is not a checkpoint
    assert (ckpts / ".step-0000004.tmp").is_dir() and not (ckpts / ".step-0000004.tmp" / "trainer_state.json").exists()
    assert not (out / "prunepath_config.json").exists()  # no final model yet
    with pytest.raises(PrunePathError, match="already holds a training run; pass --resume"):
        train(prunepath.moefy(tiny_llama(0), neurons_per_expert=8, progress=False), None, data, _train_cfg(),
              out_dir=out)

    # Resume in this (another) process from other initial weights: everything comes from the step-2 checkpoint.
    resumed = prunepath.moefy(tiny_llama(7), neurons_per_expert=8, progress=False)
    res = train(resumed, None, data, _train_cfg(resume="auto"), out_dir=out)
    assert res.steps == 6
    sa, sb = ref.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [s for s in range(1, 7)]
    assert not (ckpts / ".step-0000004.tmp").exists() and (ckpts / "step-0000004").is_dir()
    final, _ = prunepath.load(out)
    assert all(torch.equal(sa[k], final.state_dict()[k]) for k in sa)
    umask = current_umask()  # the trained model, like every output, keeps the user's umask
    assert {(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()} == {0o666 & ~umask}
