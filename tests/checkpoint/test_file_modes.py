"""Outputs keep the user's umask: checkpoint directories and every file in them (model.safetensors included) get
the modes a plain mkdir / open would give, not the 0700 / 0600 of temporary files (issue 15, item 6)."""

import contextlib
import os
import stat
import tempfile
from pathlib import Path

import pytest

import prunepath
from prunepath.checkpoint import atomic_replace_dir, current_umask
from prunepath.evaluation.reports import atomic_write_text


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_checkpoint_modes_follow_the_umask(tiny_model, tmp_path, mask):
    model = prunepath.moefy(tiny_model("llama"), neurons_per_expert=8, progress=False)
    with umask(mask):
        assert current_umask() == mask
        path = prunepath.save(model, tmp_path / "ckpt")
        assert mode(path) == 0o777 & ~mask
        files = sorted(p for p in path.iterdir())
        assert {p.name for p in files} >= {"model.safetensors", "config.json", "prunepath_config.json"}
        assert {p.name: mode(p) for p in files} == {p.name: 0o666 & ~mask for p in files}
        prunepath.save(model, path)  # replacing an existing checkpoint keeps them too
        assert mode(path) == 0o777 & ~mask and mode(path / "model.safetensors") == 0o666 & ~mask


def test_atomic_replace_dir_and_result_files_follow_the_umask(tmp_path):
    with umask(0o022):
        staging = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".out.tmp-"))  # 0700
        fd = os.open(staging / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        (staging / "sub").mkdir(mode=0o700)
        atomic_replace_dir(staging, tmp_path / "out")
        out = tmp_path / "out"
        assert (mode(out), mode(out / "weights.bin"), mode(out / "sub")) == (0o755, 0o644, 0o755)
        assert mode(atomic_write_text(tmp_path / "r.json", "{}\n")) == 0o644
