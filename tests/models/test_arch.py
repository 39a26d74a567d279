"""Per-architecture facts in one place: the decode weight view of each family (models/arch)."""

import pytest

from prunepath.errors import PrunePathError
from prunepath.models.arch import DECODE_MODEL_TYPES, FFN_LINEARS, decode_view


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


def test_every_adapter_names_its_ffn_linears_for_wanda(tiny_model):
    from prunepath.models.adapters import ADAPTERS, adapter_for
    from prunepath.models.arch import ffn_linears

    assert {a.name for a in ADAPTERS} == set(FFN_LINEARS)
    for arch in ("llama", "gpt2"):
        model = tiny_model(arch)
        adapter = adapter_for(model)
        for site in adapter.sites(model):
            assert all(site.owner.get_submodule(path) is not None for path in ffn_linears(adapter.name))


def test_max_positions_reads_each_family_s_field():
    from transformers import GPT2Config, LlamaConfig
    from prunepath.models.arch import max_positions
    assert max_positions(GPT2Config(n_positions=64)) == 64
    assert max_positions(LlamaConfig(max_position_embeddings=128)) == 128
    assert max_positions(object()) is None
