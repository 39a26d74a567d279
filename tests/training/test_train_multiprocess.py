"""Data-parallel training: two processes (torchrun, gloo on the CPU) train like one process on the global batch.

The trainer is Accelerate-based: ``BatchStream`` gives rank r micro-batch rows ``(mb·world + r)·bs …``, so two
processes with batch b see exactly the rows one process with batch 2b sees, DDP averages their gradients, and the
logged loss is the mean over processes. Stage 1 (all experts) is then the same computation; stage 2 may differ in
the last digits (the balance term is not linear in the batch).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import word_tokenizer


@pytest.fixture
def tiny_run_inputs(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    words = [f"w{i}" for i in range(60)]
    tok = word_tokenizer(words)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(int.from_bytes(os.urandom(2), "little"))  # fresh random weights each run
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    rng = random.Random(0)
    (tmp_path / "text.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(200)) for _ in range(40)))
    return tmp_path


def _train(tmp_path, out: str, batch: int, launcher: list[str]) -> list[dict]:
    args = ["train", "--model", str(tmp_path / "tiny"), "--task", "lm", "--data", str(tmp_path / "text.txt"),
            "--seq-len", "32", "--stage1-steps", "3", "--stage2-steps", "3", "--tau-min", "0.7",
            "--neurons-per-expert", "16", "--device", "cpu", "--no-progress", "--seed", "0",
            "--batch-size", str(batch), "--out", str(tmp_path / out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launcher, "-m", "prunepath.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / out / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_on_the_global_batch(tiny_run_inputs):
    one = _train(tiny_run_inputs, "one", 8, [])
    two = _train(tiny_run_inputs, "two", 4, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]  # both count the global batch
    for a, b in zip(one, two):
        tol = 1e-5 if a["stage"] == 1 else 1e-3
        assert abs(a["loss"] - b["loss"]) < tol, (a["step"], a["loss"], b["loss"])
        assert a["tau"] == pytest.approx(b["tau"])
