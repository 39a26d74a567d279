"""Resuming a baseline whose router differs from PrunePath's (LTE: Linear with bias) rebuilds that router before
the checkpoint is loaded, so the resumed run ends with exactly the weights of an uninterrupted one. Regression
test for the study's "Unexpected key(s) in state_dict: ...mlp.router.bias" on resuming train-lte."""

import shutil

import pytest
import torch

import prunepath
from prunepath.training.config import TrainConfig
from prunepath.training.trainer import train
from test_train_helpers import one_thread, tiny_llama, tiny_lm_data


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _cfg(**kw) -> TrainConfig:
    base = dict(method="lte", method_params={"eta": 0.5, "threshold": 0.5}, neurons_per_expert=8,
                stage1_steps=3, stage2_steps=3, tau_min=0.5, batch_size=4, seq_len=32, device="cpu",
                progress=False, seed=0, save_every=2, keep_checkpoints=5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("preconverted", [False, True], ids=["plain-model", "converted-model"])
@pytest.mark.parametrize("ckpt_step", [2, 4], ids=["stage1", "stage2"])
def test_lte_resume_matches_uninterrupted_run(tmp_path, preconverted, ckpt_step):
    data = tiny_lm_data()

    def fresh(seed):
        m = tiny_llama(seed)
        return prunepath.moefy(m, neurons_per_expert=8, progress=False) if preconverted else m

    a = fresh(0)
    train(a, None, data, _cfg(), out_dir=tmp_path / "a")
    assert a.prunepath.config.router == "lte"
    assert any(k.endswith("mlp.router.bias") for k in a.state_dict())
    ckpt = tmp_path / "a" / "checkpoints" / f"step-{ckpt_step:07d}"
    assert ckpt.is_dir(), sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoints" / ckpt.name)
    # A new process rebuilds the model from other initial weights: everything must come from the checkpoint.
    b = fresh(7)
    res = train(b, None, data, _cfg(resume="auto"), out_dir=tmp_path / "b")
    assert res.steps == 6
    assert b.prunepath.config.router == "lte"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.prunepath.config.routing.method == "lte" and b.prunepath.config.routing.params.get("soft") is False
