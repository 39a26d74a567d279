"""Joint training of backbone and routers (PAPER.md §4) on Hugging Face Accelerate.

The same code runs on one CPU, one GPU or several GPUs (``accelerate launch``, DDP): the model, optimizer and
RNG states go through :class:`accelerate.Accelerator`; the data stream is a pure function of the seed and the
micro-batch counter (each process takes its own share), so a checkpoint resumes exactly.

This module holds the step loop (:func:`train`, :func:`_train_step`, :func:`assemble_loss`) and the checkpoints;
the set-up (resume, conversion, optimizer, the batch stream, evaluation) is in :mod:`prunepath.training.setup`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.state import state_of
from prunepath.stats import activation_s_ffn, s_ffn_tensor
from prunepath.training.config import TrainConfig
from prunepath.training.losses import call_aux_loss, distill_kl, router_distill_kl, routing_terms
from prunepath.checkpoint import save
from prunepath.models.adapters import needs_bos
from prunepath.routing.ffn import is_converted
from prunepath.training.data import build_task_data
from prunepath.training.setup import (  # noqa: F401  (re-exported: tests and callers import them from here)
    _checkpoints, _distill_teacher, _inputs, _mixed_precision, _open_log, _param_groups, _restore_or_prepare,
    _resume_dir, _Run, _set_up, _task_tokens, _write_json_atomic, BatchStream, check_task, CKPT_DIR, evaluate,
    HEAD_PREFIXES, is_causal_lm, LOG_NAME, MODEL_INPUTS, prepare_model, STATE_NAME)


@dataclass
class TrainResult:
    out_dir: str | None
    steps: int
    tokens: int
    seconds: float
    final_tau: float | None
    train_loss: float  # mean task loss over the last (up to 10) steps
    s_ffn: float  # live s_FFN over the last (up to 10) steps
    eval: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    log_path: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class TrainingStopped(Exception):
    """Raised by :func:`train` when ``should_stop()`` said so: a checkpoint of the last finished step was saved
    (with ``out_dir``), so ``resume="auto"`` continues from it."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        super().__init__(f"training stopped at step {step} (checkpoint: {checkpoint})")
        self.step, self.checkpoint = step, checkpoint


# ---- checks --------------------------------------------------------------------------------------------------
def train(model: nn.Module, tokenizer, train_data, cfg: TrainConfig, *, eval_data=None,
          out_dir: str | os.PathLike | None = None, should_stop=None) -> TrainResult:
    """Train ``model`` on ``train_data`` (a dataset of dicts: input_ids, attention_mask, labels) with ``cfg``.

    Stage 1 (``cfg.stage1_steps``) and stage 2 (``cfg.stage2_steps``) routing is set before every step by the
    method's stage hook; the method's auxiliary losses are added to the task loss. With ``out_dir`` it writes a
    JSONL log of every step, checkpoints (``cfg.save_every``) with optimizer/scheduler/RNG state, and finally a
    ``prunepath.load``-able directory (``save_pretrained`` for method "dense"). ``should_stop`` (a callable,
    e.g. a deadline check) is asked after every step; when it returns True a checkpoint is saved and
    :class:`TrainingStopped` is raised.

    Read top to bottom: set-up (:func:`_set_up`), the step loop (:func:`_train_step` runs one optimizer step,
    :func:`assemble_loss` builds each micro-batch's loss), checkpointing (:func:`_after_step`,
    :func:`_save_checkpoint`) and the final save.
    """
    run = _set_up(model, train_data, cfg, out_dir)
    out, is_main, raw = run.out, run.is_main, run.raw
    log_path, log_file = _open_log(out, run.step, cfg, is_main)
    total = cfg.total_steps
    t0 = time.time() - float(run.state.get("seconds", 0.0))
    recent: list[dict] = []
    pbar = tqdm(total=total, initial=run.step, desc=f"train {cfg.method}", disable=not (cfg.progress and is_main),
                unit="step", dynamic_ncols=True)
    tau = None
    try:
        while run.step < total:
            stage, s_step, s_total = (1, run.step, cfg.stage1_steps) if run.step < cfg.stage1_steps else \
                (2, run.step - cfg.stage1_steps, cfg.stage2_steps)
            if run.hook is not None:
                run.hook(raw, stage, s_step, s_total, cfg)
            tau = state_of(raw).config.routing.tau if run.converted else None
            sums, grad_norm = _train_step(run)
            run.step += 1
            rec, acc, terms_acc = _step_record(run, sums, stage, tau, grad_norm, t0)
            recent = (recent + [rec])[-10:]
            if log_file is not None and (run.step % cfg.log_every == 0 or run.step == total):
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
            post = {"loss": f"{acc['loss']:.3f}", "task": f"{acc['task']:.3f}"}
            post.update({k: f"{v:.2e}" for k, v in terms_acc.items()})
            if run.converted:
                post.update({"H": f"{acc['H']:.3f}", "tau": f"{tau:.3f}", "s": f"{acc['s_ffn']:.3f}"})
            pbar.set_postfix(post, refresh=False)
            pbar.update(1)
            _after_step(run, t0, eval_data, log_file, should_stop)
    finally:
        pbar.close()
        if log_file is not None:
            log_file.close()
    for f in run.ffns:
        f.capture_router_logits = False
        f.capture_norm_target, f.last_norm_target = None, None
        f.last_router_logits = None
        f.inner_fraction = None  # batch thresholds are a training device; inference uses calibrated ones
    run.accelerator.wait_for_everyone()

    eval_res: dict = {}
    if eval_data is not None and is_main:
        eval_res = evaluate(raw, eval_data, cfg.task, batch_size=cfg.batch_size, device=run.accelerator.device,
                            progress=cfg.progress)
    seconds = time.time() - t0
    result = TrainResult(
        out_dir=str(out) if out else None, steps=run.step, tokens=run.tokens_seen, seconds=seconds, final_tau=tau,
        train_loss=sum(r["task"] for r in recent) / max(len(recent), 1),
        s_ffn=sum(r.get("s_ffn", 0.0) for r in recent) / max(len(recent), 1),
        eval=eval_res, calibration=run.calib_info, log_path=str(log_path) if log_path else None)
    if out is not None and is_main:
        _save_final(raw, tokenizer, out, cfg, result)
    run.accelerator.wait_for_everyone()
    return result


def assemble_loss(model: nn.Module, inputs: dict, labels: torch.Tensor, mask: torch.Tensor, dmask: torch.Tensor,
                  ffns: list, aux_fn, teacher: nn.Module | None, cfg: TrainConfig):
    """One micro-batch's forward and loss: ``(task_loss, loss, terms)``.

    loss = task loss — or (1 − α)·task + α·KL to the frozen dense teacher with ``--distill α`` — plus the method's
    weighted auxiliary terms (``aux_fn``) and the router-distillation term (``--router-distill λ``). ``terms``
    holds every added term by name (and the distillation KL, already inside the main term, for the log)."""
    outputs = model(**inputs, labels=labels)
    task_loss = outputs.loss
    terms: dict[str, torch.Tensor] = {}
    if aux_fn is not None:
        scores = [f.last_router_logits for f in ffns]
        terms = call_aux_loss(aux_fn, scores, mask, cfg, always_on=[f.always_on for f in ffns])
    if cfg.router_distill:
        rd = torch.stack([router_distill_kl(f.last_router_logits, f.last_norm_target, dmask, f.always_on)
                          for f in ffns]).mean()
        terms["router_distill"] = cfg.router_distill * rd
    main = task_loss
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        kl = distill_kl(outputs.logits, t_logits, labels, cfg.distill_temperature)
        main = (1 - cfg.distill) * task_loss + cfg.distill * kl
    loss = main + sum(terms.values()) if terms else main
    if teacher is not None:
        terms["distill"] = kl  # logged with the other terms; already inside ``main``
    return task_loss, loss, terms


def _train_step(run: _Run) -> tuple[dict, float | None]:
    """One optimizer step over ``cfg.grad_accum`` micro-batches: (per-step sums on the device, grad norm)."""
    cfg, accelerator, ga = run.cfg, run.accelerator, run.cfg.grad_accum
    # Step statistics stay on the device and are read back once per step: a float() per term, layer
    # and micro-batch would stall the GPU dozens of times a step.
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + value.detach().float() / ga
    for micro in range(ga):
        batch = run.stream.batch(run.mb)
        run.mb += 1
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        dmask = mask.to(accelerator.device)  # once per micro-batch, not once per layer
        ctx = accelerator.no_sync(run.model) if micro < ga - 1 else nullcontext()
        with ctx:
            inputs = _inputs(batch, accelerator.device)
            with accelerator.autocast():
                task_loss, loss, terms = assemble_loss(run.model, inputs, batch["labels"].to(accelerator.device),
                                                       mask, dmask, run.ffns, run.aux_fn, run.teacher, cfg)
            accelerator.backward(loss / ga)
        if run.aux_fn is not None:
            with torch.no_grad():
                add("H", torch.stack([routing_terms(f.last_router_logits.detach(), mask,
                                                    f.always_on)["ent"] for f in run.ffns]).mean())
            for f in run.ffns:
                f.last_router_logits = None  # release the graph
                f.last_norm_target = None
        add("loss", loss)
        add("task", task_loss)
        for k, v in terms.items():
            add(f"term:{k}", v)
        if run.converted:
            add("s_ffn", s_ffn_tensor(run.raw, dmask))
        run.tokens_seen += int(mask.sum()) * accelerator.num_processes
    grad_norm = None
    if cfg.max_grad_norm:
        gn = accelerator.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
        grad_norm = float(gn) if gn is not None else None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


def _step_record(run: _Run, sums: dict, stage: int, tau, grad_norm, t0: float) -> tuple[dict, dict, dict]:
    """The step's log record (one host read of the sums; the global mean over processes)."""
    accelerator = run.accelerator
    keys = list(sums)
    vals = torch.stack([torch.as_tensor(sums[k], device=accelerator.device).float() for k in keys])
    if accelerator.num_processes > 1:
        # Each process saw its own shard of the batch: log the global mean, so a multi-GPU log reads
        # like a one-GPU log of the same global batch.
        vals = accelerator.reduce(vals, reduction="mean")
    read = dict(zip(keys, vals.tolist()))
    acc = {k: read.get(k, 0.0) for k in ("loss", "task", "H", "s_ffn")}
    terms_acc = {k[len("term:"):]: v for k, v in read.items() if k.startswith("term:")}

    rec = {"step": run.step, "stage": stage, "tau": tau, **acc, **terms_acc, "grad_norm": grad_norm,
           "lr": {n: pg["lr"] for n, pg in zip(run.group_names, run.optimizer.param_groups)},
           "tokens": run.tokens_seen, "elapsed_s": round(time.time() - t0, 3)}
    if not run.converted:
        rec.pop("H"), rec.pop("s_ffn")
    elif run.cfg.inner_sparsity_max:  # this step's in-expert byte fraction (0: thresholds off)
        pair = run.ffns[0].inner_fraction if run.ffns else None
        rec["inner"] = float(activation_s_ffn(*pair, gated=run.ffns[0].gated)) if pair else 0.0
    return rec, acc, terms_acc


def _after_step(run: _Run, t0: float, eval_data, log_file, should_stop) -> None:
    """Checkpointing (``cfg.save_every``), periodic evaluation, and a stop asked for by ``should_stop``."""
    cfg, step, out, total = run.cfg, run.step, run.out, run.cfg.total_steps
    if out is not None and cfg.save_every and step % cfg.save_every == 0 and step < total:
        _save_checkpoint(run.accelerator, out, step, run.mb, run.tokens_seen, time.time() - t0, cfg, run.calib_info)
    if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total and run.is_main:
        ev = evaluate(run.raw, eval_data, cfg.task, batch_size=cfg.batch_size, device=run.accelerator.device)
        if log_file is not None:
            log_file.write(json.dumps({"step": step, "eval": ev}) + "\n")
            log_file.flush()
        run.model.train()
    if should_stop is not None and step < total and should_stop():
        ckpt = None
        if out is not None:
            if not (cfg.save_every and step % cfg.save_every == 0):
                _save_checkpoint(run.accelerator, out, step, run.mb, run.tokens_seen, time.time() - t0, cfg,
                                 run.calib_info)
            ckpt = str(out / CKPT_DIR / f"step-{step:07d}")
        raise TrainingStopped(step, ckpt)


def _save_checkpoint(accelerator, out: Path, step: int, mb: int, tokens: int, seconds: float,
                     cfg: TrainConfig, calib_info: dict) -> None:
    root = out / CKPT_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    # Pickle (not safetensors): tied embeddings share storage, which safetensors refuses.
    accelerator.save_state(str(tmp), safe_serialization=False)
    if accelerator.is_main_process:
        _write_json_atomic(tmp / STATE_NAME, {
            "step": step, "micro_batch": mb, "tokens": tokens, "seconds": seconds, "config": cfg.to_dict(),
            "derived": {"dense_layers": cfg.dense_layers}, "calibration": calib_info})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in _checkpoints(out)[: -cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _save_final(model: nn.Module, tokenizer, out: Path, cfg: TrainConfig, result: TrainResult) -> None:
    """Write the trained model into ``out`` itself: staged in a temp dir, files moved in, the file that makes the
    directory loadable (prunepath_config.json / config.json) last."""

    staging = out / ".final.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    extra = {"training": cfg.to_dict(), "result": {k: v for k, v in result.to_dict().items() if k != "calibration"}}
    if is_converted(model):
        save(model, staging, tokenizer=tokenizer, extra=extra)
        last = "prunepath_config.json"
    else:
        staging.mkdir(parents=True)
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        last = "config.json"
    names = sorted(p.name for p in staging.iterdir())
    for name in [n for n in names if n != last] + [last]:
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)
    _write_json_atomic(out / "train_result.json", result.to_dict())


def train_from_config(model: nn.Module, tokenizer, cfg: TrainConfig, *,
                      out_dir: str | os.PathLike | None = None, should_stop=None) -> TrainResult:
    """Build ``cfg``'s task data (exactly the tokens the steps need, per process) and :func:`train` on it —
    what ``prunepath train`` and ``prunepath run`` both do."""

    check_task(model, cfg.task)
    if tokenizer is not None and tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    world = int(os.environ.get("WORLD_SIZE", "1"))
    need = cfg.total_steps * cfg.tokens_per_step * world + cfg.seq_len
    bos = tokenizer is not None and cfg.task == "lm" and needs_bos(model, tokenizer)
    train_ds, eval_ds, info = build_task_data(cfg, tokenizer, max_train_tokens=need, block_bos=bos, model=model,
                                              should_stop=should_stop)
    print(f"[prunepath] data: {json.dumps(info)}; {len(train_ds)} training rows of {cfg.seq_len} tokens; "
          f"{cfg.total_steps} steps × {cfg.tokens_per_step} tokens/step/process", flush=True)
    return train(model, tokenizer, train_ds, cfg, eval_data=eval_ds, out_dir=out_dir or cfg.out,
                 should_stop=should_stop)
