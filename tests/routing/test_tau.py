"""τ has one owner: ``TAU_ALL`` and ``validate_tau`` in routing/config; the decode engine works on its own copy of
the routing settings (issue 14)."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the decode engine on the CPU; must precede the kernels' import

import pytest  # noqa: E402

import prunepath  # noqa: E402
from prunepath.errors import PrunePathError  # noqa: E402
from prunepath.routing.config import TAU_ALL, RoutingConfig, is_valid_tau, validate_tau  # noqa: E402
from prunepath.training.config import TrainConfig  # noqa: E402


def test_dense_tau_is_the_default_everywhere():
    assert TAU_ALL == 1.05
    assert RoutingConfig().tau == TAU_ALL
    assert TrainConfig().tau_warmup == TAU_ALL


@pytest.mark.parametrize("tau, upper, open_upper, ok", [
    (0.5, None, False, True), (5.0, None, False, True), (0.0, None, False, False), (-1, None, False, False),
    (math.nan, None, False, False), ("x", None, False, False), (2.0, 2.0, False, True), (2.01, 2.0, False, False),
    (1.0, 1.0, True, False), (0.99, 1.0, True, True), (TAU_ALL, TAU_ALL, False, True)])
def test_validate_tau_ranges(tau, upper, open_upper, ok):
    assert is_valid_tau(tau, upper, open_upper=open_upper) is ok
    if ok:
        assert validate_tau(tau, upper, open_upper=open_upper) == float(tau)
    else:
        with pytest.raises(PrunePathError):
            validate_tau(tau, upper, open_upper=open_upper)


def test_validate_tau_messages_are_the_callers():
    with pytest.raises(PrunePathError, match="tau must be > 0 .*1.05 for all experts"):
        RoutingConfig(tau=0.0)
    with pytest.raises(PrunePathError, match=r"tau_start must be in \(0, 1.05\]"):
        TrainConfig(tau_start=1.5).validate()


def test_routing_config_copy_is_independent():
    r = RoutingConfig(tau=0.7, layer_tau={1: 0.5})
    c = r.copy()
    c.tau, c.layer_tau[1] = 0.3, 0.2
    assert r.tau == 0.7 and r.layer_tau == {1: 0.5}


def test_decode_engine_set_tau_leaves_the_model_config_alone(tiny_model):
    from prunepath.decoding.engine import DecodeEngine

    model = tiny_model("llama")
    prunepath.moefy(model, neurons_per_expert=16, seed=0)
    prunepath.configure(model, tau=0.6)
    eng = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    assert eng.routing is not model.prunepath.config.routing
    eng.set_tau(0.3)
    assert model.prunepath.config.routing.tau == 0.6
    assert float(eng.layers[0].sparse.router.tau) == pytest.approx(0.3)
    eng.sync_routing(model.prunepath.config.routing)
    assert eng.routing is not model.prunepath.config.routing and eng.routing.tau == 0.6
