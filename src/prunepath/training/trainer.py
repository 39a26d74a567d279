"""Joint training of backbone and routers (PAPER.md §4) on Hugging Face Accelerate.

The same code runs on one CPU, one GPU or several GPUs (``accelerate launch``, DDP): the model, optimizer and
RNG states go through :class:`accelerate.Accelerator`; the data stream is a pure function of the seed and the
micro-batch counter (each process takes its own share), so a checkpoint resumes exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.stats import s_ffn_tensor
from prunepath.training.config import TrainConfig
from prunepath.training.losses import call_aux_loss, distill_kl, get_aux_loss, router_distill_kl, routing_terms
from prunepath.training.schedule import get_stage_hook, resolve_layers
from prunepath.baselines import prepare_for_training
from prunepath.checkpoint import save
from prunepath.conversion.moefy import moefy
from prunepath.io import atomic_write_text
from prunepath.models.adapters import needs_bos
from prunepath.routing.control import configure
from prunepath.routing.ffn import is_converted
from prunepath.routing.ffn import prunepath_modules
from prunepath.stats import active_counts
from prunepath.training import calibration as cal
from prunepath.training.data import build_task_data

STATE_NAME = "trainer_state.json"
LOG_NAME = "train_log.jsonl"
CKPT_DIR = "checkpoints"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HEAD_PREFIXES = ("classifier", "score", "pre_classifier", "qa_outputs")


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
def is_causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel")) or hasattr(model, "lm_head")


def check_task(model: nn.Module, task: str) -> None:
    """A clear error for a task the model cannot do (e.g. instruction tuning an encoder)."""
    name = type(model).__name__
    if task in ("lm", "instruct") and not is_causal_lm(model):
        raise PrunePathError(f"--task {task} needs a causal language model with an LM head, but the model is a "
                             f"{name} (an encoder/backbone without one); use --task classify for encoders, or "
                             "pass a decoder model such as smollm2-135m")
    if task == "classify" and not name.endswith("ForSequenceClassification"):
        raise PrunePathError(f"--task classify needs a sequence-classification model, got a {name}; load it with "
                             "prunepath.load_model(NAME, task='classify', num_labels=N) (the CLI does this)")


# ---- deterministic data stream -------------------------------------------------------------------------------
class BatchStream:
    """Micro-batch ``mb`` of process ``rank``: rows ``perm_epoch[p : p + bs]`` of an epoch-wise seeded shuffle,
    where ``p = (mb · world + rank) · bs`` counts rows over epochs. Pure function of (seed, mb): exact resume."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if len(dataset) == 0:
            raise PrunePathError("the training data is empty")
        self.dataset, self.bs, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=g)}
        return self._perms[epoch]

    def batch(self, mb: int) -> dict[str, torch.Tensor]:
        n = len(self.dataset)
        start = (mb * self.world + self.rank) * self.bs
        rows = []
        for p in range(start, start + self.bs):
            rows.append(self.dataset[int(self._perm(p // n)[p % n])])
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ---- helpers -------------------------------------------------------------------------------------------------
def _distill_teacher(model: nn.Module, cfg: TrainConfig) -> nn.Module | None:
    """A frozen copy of the model as given, for ``cfg.distill``: a plain model is the dense teacher; a PrunePath
    checkpoint runs every expert with gates off (exactly the dense FFN for a freshly converted model)."""
    if not cfg.distill:
        return None
    import copy


    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if is_converted(teacher):
        configure(teacher, rule="all", gates=False)
    return teacher


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    router, head, backbone = [], [], []
    for name, p in model.named_parameters():
        if ".router." in f".{name}":
            router.append(p)
        elif name.split(".")[0] in HEAD_PREFIXES:
            head.append(p)
        else:
            backbone.append(p)
    if cfg.freeze_backbone:
        for p in backbone:
            p.requires_grad_(False)
    groups = []
    if backbone and not cfg.freeze_backbone:
        groups.append({"params": backbone, "lr": cfg.lr_backbone, "weight_decay": cfg.wd_backbone, "name": "backbone"})
    if head:
        groups.append({"params": head, "lr": cfg.lr_head if cfg.lr_head is not None else cfg.lr_backbone,
                       "weight_decay": cfg.wd_backbone, "name": "head"})
    if router:
        groups.append({"params": router, "lr": cfg.lr_router, "weight_decay": cfg.wd_router, "name": "router"})
    if not groups:
        raise PrunePathError("no trainable parameters: --freeze-backbone on a model without routers or head "
                             "leaves nothing to train")
    return groups


def _mixed_precision(p: str) -> str:
    return {"fp32": "no", "no": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def _inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}


def _task_tokens(batch: dict, task: str) -> int:
    if task == "classify":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != -100).sum())


def _checkpoints(root: Path) -> list[Path]:
    d = root / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted((p for p in d.glob("step-*") if (p / STATE_NAME).exists()), key=lambda p: int(p.name[5:]))


def _write_json_atomic(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@torch.no_grad()
def evaluate(model: nn.Module, dataset, task: str, *, batch_size: int = 4, device=None,
             max_batches: int | None = None, progress: bool = False) -> dict:
    """LM / instruct: mean token loss and perplexity; classify: accuracy. Plus s_FFN over non-pad tokens at
    the model's current routing."""

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    tot_loss, tot_tok, correct, seen = 0.0, 0, 0, 0
    counts: list[list[torch.Tensor]] = []
    converted = is_converted(model)
    n = len(dataset)
    batches = range(0, n, batch_size)
    if max_batches is not None:
        batches = list(batches)[:max_batches]
    for i in tqdm(batches, desc="evaluating", disable=not progress, leave=False):
        rows = [dataset[j] for j in range(i, min(n, i + batch_size))]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        out = model(**_inputs(batch, device), labels=batch["labels"].to(device))
        if task == "classify":
            correct += int((out.logits.argmax(-1).cpu() == batch["labels"]).sum())
            seen += len(rows)
        else:
            k = _task_tokens(batch, task)
            tot_loss += float(out.loss) * k
            tot_tok += k
        if converted:
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            c = active_counts(model, mask)
            counts = [a + [b] for a, b in zip(counts, c)] if counts else [[b] for b in c]
    model.train(was_training)
    res: dict = {}
    if task == "classify":
        res["accuracy"] = correct / max(seen, 1)
        res["examples"] = seen
    else:
        res["loss"] = tot_loss / max(tot_tok, 1)
        res["ppl"] = math.exp(min(res["loss"], 50.0))
        res["tokens"] = tot_tok
    if converted:
        e = model.prunepath_config.num_experts
        per_layer = [float(torch.cat(c).float().mean()) for c in counts]
        res["s_ffn"] = 1.0 - sum(per_layer) / len(per_layer) / e
        res["tau"] = model.prunepath_config.routing.tau
    else:
        res["s_ffn"] = 0.0
    return res


# ---- the trainer ---------------------------------------------------------------------------------------------
def prepare_model(model: nn.Module, cfg: TrainConfig, train_data, *, progress: bool = True) -> dict:
    """Convert a plain model (``--neurons-per-expert``, ``--clustering``) and apply the calibration options
    (always-on experts, sensitivity-based dense layers, router warm start). Returns what was decided."""

    info: dict = {}
    if cfg.method == "dense":
        if is_converted(model):
            raise PrunePathError("method 'dense' fine-tunes an unconverted model; pass the original model "
                                 "(the paper clusters the task-fine-tuned dense weights afterwards)")
        return info
    batches = None

    def calib():
        nonlocal batches
        if batches is None:
            batches = cal.calibration_batches(train_data, cfg.calib_tokens, batch_size=max(1, cfg.batch_size))
        return batches

    if not is_converted(model):
        acts = None
        if cfg.clustering == "coactivation":
            acts = cal.collect_ffn_activations(model, calib(), cfg.calib_tokens, progress=progress)
        npe = None if cfg.num_experts is not None else cfg.neurons_per_expert
        moefy(model, neurons_per_expert=npe, num_experts=cfg.num_experts, seed=cfg.seed,
                        clustering=cfg.clustering, progress=progress, calibration_activations=acts)
        info["converted"] = {"num_experts": model.prunepath_config.num_experts,
                             "neurons_per_expert": model.prunepath_config.neurons_per_expert,
                             "clustering": cfg.clustering}
    if cfg.method not in ("prunepath", "dense"):
        # A baseline installs its own router / routing before the optimiser exists (e.g. LTE's sigmoid router).

        prepare_for_training(model, cfg)
        return info
    configure(model, tau=cfg.tau_warmup, gate_offset=float(cfg.gate_offset))
    needs_inputs = cfg.always_on or cfg.warmstart_steps
    inputs = None
    if needs_inputs:
        ffns = prunepath_modules(model)
        inputs = cal.collect_ffn_inputs(model, ffns, calib(), progress)
    if cfg.always_on:
        info["always_on"] = cal.select_always_on(model, calib(), cfg.always_on, inputs=inputs)
    if cfg.auto_dense_layers:
        sens = cal.layer_sensitivity(model, calib(), cfg.tau_min, progress=progress)
        top = sorted(range(len(sens)), key=lambda i: -sens[i])[: cfg.auto_dense_layers]
        cfg.dense_layers = sorted(set(resolve_layers(cfg.dense_layers, len(sens))) | set(top))
        info["layer_sensitivity"] = sens
        info["dense_layers"] = cfg.dense_layers
    if cfg.warmstart_steps:
        info["warmstart_kl"] = cal.router_warmstart(
            model, calib(), cfg.warmstart_steps, lr=cfg.warmstart_lr, target=cfg.warmstart_target,
            temperature=cfg.warmstart_temperature, progress=progress, inputs=inputs)
    return info


def train(model: nn.Module, tokenizer, train_data, cfg: TrainConfig, *, eval_data=None,
          out_dir: str | os.PathLike | None = None, should_stop=None) -> TrainResult:
    """Train ``model`` on ``train_data`` (a dataset of dicts: input_ids, attention_mask, labels) with ``cfg``.

    Stage 1 (``cfg.stage1_steps``) and stage 2 (``cfg.stage2_steps``) routing is set before every step by the
    method's stage hook; the method's auxiliary losses are added to the task loss. With ``out_dir`` it writes a
    JSONL log of every step, checkpoints (``cfg.save_every``) with optimizer/scheduler/RNG state, and finally a
    ``prunepath.load``-able directory (``save_pretrained`` for method "dense"). ``should_stop`` (a callable,
    e.g. a deadline check) is asked after every step; when it returns True a checkpoint is saved and
    :class:`TrainingStopped` is raised.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg.validate()
    check_task(model, cfg.task)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise PrunePathError(f"--device {cfg.device} asked for a GPU but none is available here; use --device cpu")
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=_mixed_precision(cfg.precision))
    is_main = accelerator.is_main_process
    out = Path(out_dir or cfg.out).expanduser().resolve() if (out_dir or cfg.out) else None

    resume_dir = None
    if cfg.resume:
        if out is None and cfg.resume == "auto":
            raise PrunePathError("--resume auto needs --out (where the checkpoints are)")
        if cfg.resume == "auto":
            found = _checkpoints(out)
            resume_dir = found[-1] if found else None
            if resume_dir is None and is_main:
                print(f"[prunepath] no checkpoint in {out / CKPT_DIR}; starting from scratch")
        else:
            resume_dir = Path(cfg.resume).expanduser().resolve()
            if not (resume_dir / STATE_NAME).exists():
                raise PrunePathError(f"{resume_dir} is not a training checkpoint (no {STATE_NAME}); pass "
                                     f"--resume auto or a directory under OUT/{CKPT_DIR}")
    if out is not None and resume_dir is None and out.exists() and any(out.iterdir()):
        if (out / LOG_NAME).exists() or (out / CKPT_DIR).exists():
            raise PrunePathError(f"{out} already holds a training run; pass --resume to continue it or choose "
                                 "another --out")
        raise PrunePathError(f"{out} exists and is not empty; choose another --out (nothing is overwritten)")
    accelerator.wait_for_everyone()  # every process has checked ``out`` before the main one writes into it

    set_seed(cfg.seed)
    teacher = _distill_teacher(model, cfg)  # the model as given, before conversion or a resumed state
    state: dict = {}
    if resume_dir is not None:
        state = json.loads((resume_dir / STATE_NAME).read_text())
        # Options decided by calibration are restored, not recomputed (weights + buffers come from the state).
        cfg.dense_layers = state.get("derived", {}).get("dense_layers", cfg.dense_layers)
        calib_info = state.get("calibration", {})
        if cfg.method != "dense" and not is_converted(model):
            npe = None if cfg.num_experts is not None else cfg.neurons_per_expert
            moefy(model, neurons_per_expert=npe, num_experts=cfg.num_experts, seed=cfg.seed,
                            clustering="random", progress=False)  # structure only; weights come from the state
            model.prunepath_config.clustering = cfg.clustering
        if cfg.method not in ("prunepath", "dense"):
            # A baseline's own router (e.g. LTE's Linear with bias) must exist before the state is loaded,
            # exactly as prepare_model installs it on a fresh start; its weights then come from the state.

            prepare_for_training(model, cfg)
    else:
        calib_info = prepare_model(model, cfg, train_data, progress=cfg.progress and is_main)

    converted = is_converted(model)
    ffns = prunepath_modules(model) if converted else []
    aux_fn = get_aux_loss(cfg.method) if converted else None
    hook = get_stage_hook(cfg.method) if converted else None
    if converted and cfg.method not in ("prunepath",) and hook is None and aux_fn is None:
        raise PrunePathError(f"method {cfg.method!r} has no stage hook or loss registered; known methods register "
                             "them in prunepath.training (prunepath) or prunepath.baselines")
    if cfg.method != "prunepath" and converted:
        configure(model, method=cfg.method, params=dict(cfg.method_params) or None)
    for f in ffns:
        f.capture_router_logits = aux_fn is not None
        f.capture_norm_target = cfg.warmstart_temperature if cfg.router_distill else None

    model.to(accelerator.device)
    model.train()
    if teacher is not None:
        teacher.to(accelerator.device)
    groups = _param_groups(model, cfg)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups])
    group_names = [g["name"] for g in groups]
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: the step count here is already global, so the scheduler steps once per optimizer step.
    accelerator.register_for_checkpointing(scheduler)
    raw = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]

    step, mb = 0, 0
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        step, mb = int(state["step"]), int(state["micro_batch"])
    stream = BatchStream(train_data, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes)

    log_path = out / LOG_NAME if out is not None else None
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if log_path.exists():  # drop log lines past the resumed step
            kept = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in kept))
        _write_json_atomic(out / "train_config.json", cfg.to_dict())
    log_file = open(log_path, "a") if (log_path is not None and is_main) else None

    total = cfg.total_steps
    tokens_seen = int(state.get("tokens", 0))
    t0 = time.time() - float(state.get("seconds", 0.0))
    recent: list[dict] = []
    pbar = tqdm(total=total, initial=step, desc=f"train {cfg.method}", disable=not (cfg.progress and is_main),
                unit="step", dynamic_ncols=True)
    ga = cfg.grad_accum
    tau = None
    try:
        while step < total:
            stage, s_step, s_total = (1, step, cfg.stage1_steps) if step < cfg.stage1_steps else \
                (2, step - cfg.stage1_steps, cfg.stage2_steps)
            if hook is not None:
                hook(raw, stage, s_step, s_total, cfg)
            tau = raw.prunepath_config.routing.tau if converted else None
            # Step statistics stay on the device and are read back once per step: a float() per term, layer
            # and micro-batch would stall the GPU dozens of times a step.
            sums: dict[str, torch.Tensor] = {}

            def add(key: str, value: torch.Tensor) -> None:
                sums[key] = sums.get(key, 0.0) + value.detach().float() / ga
            for micro in range(ga):
                batch = stream.batch(mb)
                mb += 1
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
                dmask = mask.to(accelerator.device)  # once per micro-batch, not once per layer
                ctx = accelerator.no_sync(model) if micro < ga - 1 else nullcontext()
                with ctx:
                    inputs = _inputs(batch, accelerator.device)
                    with accelerator.autocast():
                        outputs = model(**inputs, labels=batch["labels"].to(accelerator.device))
                        task_loss = outputs.loss
                        terms: dict[str, torch.Tensor] = {}
                        if aux_fn is not None:
                            scores = [f.last_router_logits for f in ffns]
                            terms = call_aux_loss(aux_fn, scores, mask, cfg,
                                                  always_on=[f.always_on for f in ffns])
                        if cfg.router_distill:
                            rd = torch.stack([router_distill_kl(f.last_router_logits, f.last_norm_target, dmask,
                                                                f.always_on) for f in ffns]).mean()
                            terms["router_distill"] = cfg.router_distill * rd
                        main = task_loss
                        if teacher is not None:
                            with torch.no_grad():
                                t_logits = teacher(**inputs).logits
                            kl = distill_kl(outputs.logits, t_logits, batch["labels"], cfg.distill_temperature)
                            main = (1 - cfg.distill) * task_loss + cfg.distill * kl
                        loss = main + sum(terms.values()) if terms else main
                        if teacher is not None:
                            terms["distill"] = kl  # logged with the other terms; already inside ``main``
                    accelerator.backward(loss / ga)
                if aux_fn is not None:
                    with torch.no_grad():
                        add("H", torch.stack([routing_terms(f.last_router_logits.detach(), mask,
                                                            f.always_on)["ent"] for f in ffns]).mean())
                    for f in ffns:
                        f.last_router_logits = None  # release the graph
                        f.last_norm_target = None
                add("loss", loss)
                add("task", task_loss)
                for k, v in terms.items():
                    add(f"term:{k}", v)
                if converted:
                    add("s_ffn", s_ffn_tensor(raw, dmask))
                tokens_seen += int(mask.sum()) * accelerator.num_processes
            grad_norm = None
            if cfg.max_grad_norm:
                gn = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                grad_norm = float(gn) if gn is not None else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            keys = list(sums)
            vals = torch.stack([torch.as_tensor(sums[k], device=accelerator.device).float() for k in keys])
            if accelerator.num_processes > 1:
                # Each process saw its own shard of the batch: log the global mean, so a multi-GPU log reads
                # like a one-GPU log of the same global batch.
                vals = accelerator.reduce(vals, reduction="mean")
            read = dict(zip(keys, vals.tolist()))
            acc = {k: read.get(k, 0.0) for k in ("loss", "task", "H", "s_ffn")}
            terms_acc = {k[len("term:"):]: v for k, v in read.items() if k.startswith("term:")}

            rec = {"step": step, "stage": stage, "tau": tau, **acc, **terms_acc, "grad_norm": grad_norm,
                   "lr": {n: pg["lr"] for n, pg in zip(group_names, optimizer.param_groups)},
                   "tokens": tokens_seen, "elapsed_s": round(time.time() - t0, 3)}
            if not converted:
                rec.pop("H"), rec.pop("s_ffn")
            recent = (recent + [rec])[-10:]
            if log_file is not None and (step % cfg.log_every == 0 or step == total):
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
            post = {"loss": f"{acc['loss']:.3f}", "task": f"{acc['task']:.3f}"}
            post.update({k: f"{v:.2e}" for k, v in terms_acc.items()})
            if converted:
                post.update({"H": f"{acc['H']:.3f}", "tau": f"{tau:.3f}", "s": f"{acc['s_ffn']:.3f}"})
            pbar.set_postfix(post, refresh=False)
            pbar.update(1)

            if out is not None and cfg.save_every and step % cfg.save_every == 0 and step < total:
                _save_checkpoint(accelerator, out, step, mb, tokens_seen, time.time() - t0, cfg, calib_info)
            if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total and is_main:
                ev = evaluate(raw, eval_data, cfg.task, batch_size=cfg.batch_size, device=accelerator.device)
                if log_file is not None:
                    log_file.write(json.dumps({"step": step, "eval": ev}) + "\n")
                    log_file.flush()
                model.train()
            if should_stop is not None and step < total and should_stop():
                ckpt = None
                if out is not None:
                    if not (cfg.save_every and step % cfg.save_every == 0):
                        _save_checkpoint(accelerator, out, step, mb, tokens_seen, time.time() - t0, cfg, calib_info)
                    ckpt = str(out / CKPT_DIR / f"step-{step:07d}")
                raise TrainingStopped(step, ckpt)
    finally:
        pbar.close()
        if log_file is not None:
            log_file.close()
    for f in ffns:
        f.capture_router_logits = False
        f.capture_norm_target, f.last_norm_target = None, None
        f.last_router_logits = None
    accelerator.wait_for_everyone()

    eval_res: dict = {}
    if eval_data is not None and is_main:
        eval_res = evaluate(raw, eval_data, cfg.task, batch_size=cfg.batch_size, device=accelerator.device,
                            progress=cfg.progress)
    seconds = time.time() - t0
    result = TrainResult(
        out_dir=str(out) if out else None, steps=step, tokens=tokens_seen, seconds=seconds, final_tau=tau,
        train_loss=sum(r["task"] for r in recent) / max(len(recent), 1),
        s_ffn=sum(r.get("s_ffn", 0.0) for r in recent) / max(len(recent), 1),
        eval=eval_res, calibration=calib_info, log_path=str(log_path) if log_path else None)
    if out is not None and is_main:
        _save_final(raw, tokenizer, out, cfg, result)
    accelerator.wait_for_everyone()
    return result


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
