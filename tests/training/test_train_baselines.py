"""The trainer runs LTE (a baseline) through the same command: its router, soft stage 1, hard stage 2."""

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


def test_lte_trains_with_its_own_router_and_ends_hard(tmp_path):
    model = prunepath.moefy(tiny_llama(0), neurons_per_expert=8, progress=False)
    cfg = TrainConfig(method="lte", method_params={"eta": 1.0, "threshold": 0.5}, stage1_steps=4, stage2_steps=4,
                      tau_min=0.5, batch_size=4, seq_len=32, device="cpu", progress=False, seed=0)
    train(model, None, tiny_lm_data(), cfg, out_dir=tmp_path / "lte")
    assert model.prunepath.config.router == "lte"
    routing = model.prunepath.config.routing
    assert routing.method == "lte" and routing.params.get("soft") is False
    loaded, _ = prunepath.load(tmp_path / "lte")
    assert loaded.prunepath.config.router == "lte" and loaded.prunepath.config.routing.method == "lte"
    ids = torch.randint(0, 60, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
