import json

import pytest
import torch

import prunepath
from prunepath import PrunePathError


@pytest.fixture
def converted(tiny_model):
    return prunepath.moefy(tiny_model("llama"), neurons_per_expert=8, progress=False)


def test_layout_and_routing_are_saved(converted, tmp_path):
    prunepath.configure(converted, tau=0.42, rule="nucleus", gate_offset=2.0, layer_tau={0: 1.5})
    path = prunepath.save(converted, tmp_path / "c")
    meta = json.loads((path / "prunepath_config.json").read_text())
    assert meta["num_experts"] == 8 and meta["neurons_per_expert"] == 8 and meta["adapter"] == "gated-mlp"
    loaded, _ = prunepath.load(path)
    r = loaded.prunepath.config.routing
    assert (r.tau, r.rule, r.gate_offset, r.layer_tau) == (0.42, "nucleus", 2.0, {0: 1.5})
    for a, b in zip(prunepath.prunepath_modules(converted), prunepath.prunepath_modules(loaded)):
        assert torch.equal(a.neuron_index, b.neuron_index)
        assert b.routing is r  # one shared settings object: configure() reaches every layer


def test_load_errors(converted, tmp_path):
    with pytest.raises(PrunePathError, match="no such checkpoint"):
        prunepath.load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(PrunePathError, match="not a PrunePath checkpoint"):
        prunepath.load(tmp_path / "plain")
    path = prunepath.save(converted, tmp_path / "c")
    (path / "prunepath_config.json").write_text("{not json")
    with pytest.raises(PrunePathError, match="corrupt"):
        prunepath.load(path)


def test_corrupt_weights(converted, tmp_path):
    path = prunepath.save(converted, tmp_path / "c")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(PrunePathError, match="corrupt"):
        prunepath.load(path)


def test_save_never_overwrites_foreign_files(converted, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(PrunePathError, match="not a PrunePath checkpoint"):
        prunepath.save(converted, target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no temp directories left behind


def test_save_replaces_an_older_checkpoint(converted, tmp_path):
    path = prunepath.save(converted, tmp_path / "c")
    prunepath.configure(converted, tau=0.33)
    prunepath.save(converted, path)
    assert prunepath.load(path)[0].prunepath.config.routing.tau == 0.33
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_save_dense_model_is_refused(tiny_model, tmp_path):
    with pytest.raises(PrunePathError, match="moefy"):
        prunepath.save(tiny_model("llama"), tmp_path / "x")


def test_load_model_resolves_checkpoints_and_errors(converted, tmp_path):
    path = prunepath.save(converted, tmp_path / "c")
    model, tok = prunepath.load_model(str(path))
    assert prunepath.is_converted(model) and tok is None
    with pytest.raises(PrunePathError, match="no such model directory"):
        prunepath.load_model(str(tmp_path / "nope"))
    with pytest.raises(PrunePathError, match="not a built-in name"):
        prunepath.load_model("surely-not-a-model-name-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrunePathError, match="no config.json"):
        prunepath.load_model(str(tmp_path / "empty"))
