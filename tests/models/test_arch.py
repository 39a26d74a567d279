"""Per-architecture facts in one place: the decode weight view of each family (models/arch)."""

import pytest

from prunepath.errors import PrunePathError
from prunepath.models.arch import DECODE_MODEL_TYPES, decode_view


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decode_view_has_every_layer_in_linear_layout(tiny_model, arch):
    model = tiny_model(arch)
    view = decode_view(model, max_len=16)
    cfg = model.config
    assert len(view.layers) == cfg.num_hidden_layers
    hidden = view.embed.shape[1]
    q = view.heads * view.head_dim
    kv = view.kv_heads * view.head_dim
    for lv in view.layers:
        assert lv.qkv_w.shape == (q + 2 * kv, hidden)
        assert lv.o_w.shape == (hidden, q)
    assert view.rms is (arch == "llama")
    assert (view.cos is None) is (arch == "gpt2") and (view.wpe is None) is (arch == "llama")
    if arch == "llama":
        assert view.cos.shape == (16, view.head_dim)


def test_decode_view_names_the_supported_families(tiny_model):
    assert set(DECODE_MODEL_TYPES) == {"llama", "mistral", "qwen2", "gpt2"}
    model = tiny_model("llama")
    model.config.model_type = "bert"
    with pytest.raises(PrunePathError, match="supports llama, mistral, qwen2, gpt2"):
        decode_view(model, 16)
