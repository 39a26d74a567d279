"""Training set-up: checks, resume or conversion and calibration, the optimizer and Accelerate (:func:`_set_up`),
the batch stream, the log, and the evaluation the trainer runs. The step loop is in :mod:`prunepath.training.trainer`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.state import state_of
from prunepath.training.config import TrainConfig
from prunepath.training.losses import get_aux_loss
from prunepath.training.schedule import get_stage_hook, resolve_layers
from prunepath.baselines import prepare_for_training
from prunepath.conversion.moefy import moefy
from prunepath.io import atomic_write_text
from prunepath.routing.control import configure
from prunepath.routing.ffn import is_converted
from prunepath.routing.ffn import prunepath_modules
from prunepath.stats import active_counts
from prunepath.training import calibration as cal

STATE_NAME = "trainer_state.json"
LOG_NAME = "train_log.jsonl"
CKPT_DIR = "checkpoints"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HEAD_PREFIXES = ("classifier", "score", "pre_classifier", "qa_outputs")


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
    router, head, backbone, frozen = [], [], [], []
    ffn_params = _ffn_param_ids(model) if cfg.train_scope == "ffn" else None
    for name, p in model.named_parameters():
        if ".router." in f".{name}":
            router.append(p)
        elif name.split(".")[0] in HEAD_PREFIXES:
            head.append(p)
        elif ffn_params is not None and id(p) not in ffn_params:
            frozen.append(p)
        else:
            backbone.append(p)
    for p in frozen + (backbone if cfg.freeze_backbone else []):
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


def _ffn_param_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of the PrunePath FFNs (``train_scope: ffn``; the model is converted by then)."""
    if not is_converted(model):
        raise PrunePathError("--train-scope ffn trains the converted FFNs only; it needs a PrunePath method "
                             "(not --method dense)")
    return {id(p) for m in prunepath_modules(model) for p in m.parameters()}


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
        e = state_of(model).config.num_experts
        per_layer = [float(torch.cat(c).float().mean()) for c in counts]
        res["s_ffn"] = 1.0 - sum(per_layer) / len(per_layer) / e
        res["tau"] = state_of(model).config.routing.tau
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
        info["converted"] = {"num_experts": state_of(model).config.num_experts,
                             "neurons_per_expert": state_of(model).config.neurons_per_expert,
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


@dataclass
class _Run:
    """What the step loop works with, built by :func:`_set_up`."""

    cfg: TrainConfig
    accelerator: object
    model: nn.Module  # as prepared by Accelerate
    raw: nn.Module  # the unwrapped model
    teacher: nn.Module | None
    optimizer: object
    scheduler: object
    group_names: list
    trainable: list
    stream: "BatchStream"
    converted: bool
    ffns: list
    aux_fn: object
    hook: object
    out: Path | None
    is_main: bool
    state: dict
    calib_info: dict
    step: int = 0
    mb: int = 0
    tokens_seen: int = 0


def _resume_dir(cfg: TrainConfig, out: Path | None, is_main: bool) -> Path | None:
    """The checkpoint to resume from (``cfg.resume``), after checking that ``out`` may be written."""
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
    return resume_dir


def _restore_or_prepare(model: nn.Module, cfg: TrainConfig, train_data, resume_dir: Path | None,
                        is_main: bool) -> tuple[dict, dict]:
    """(state, calibration info): a resumed run rebuilds the structure its state needs; a fresh one converts and
    calibrates the model (:func:`prepare_model`)."""
    if resume_dir is None:
        return {}, prepare_model(model, cfg, train_data, progress=cfg.progress and is_main)
    state = json.loads((resume_dir / STATE_NAME).read_text())
    # Options decided by calibration are restored, not recomputed (weights + buffers come from the state).
    cfg.dense_layers = state.get("derived", {}).get("dense_layers", cfg.dense_layers)
    calib_info = state.get("calibration", {})
    if cfg.method != "dense" and not is_converted(model):
        npe = None if cfg.num_experts is not None else cfg.neurons_per_expert
        moefy(model, neurons_per_expert=npe, num_experts=cfg.num_experts, seed=cfg.seed,
              clustering="random", progress=False)  # structure only; weights come from the state
        state_of(model).config.clustering = cfg.clustering
    if cfg.method not in ("prunepath", "dense"):
        # A baseline's own router (e.g. LTE's Linear with bias) must exist before the state is loaded,
        # exactly as prepare_model installs it on a fresh start; its weights then come from the state.
        prepare_for_training(model, cfg)
    return state, calib_info


def _set_up(model: nn.Module, train_data, cfg: TrainConfig, out_dir) -> _Run:
    """Checks, resume or conversion, the method's routing hooks, optimizer / scheduler, Accelerate."""
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
    resume_dir = _resume_dir(cfg, out, is_main)
    accelerator.wait_for_everyone()  # every process has checked ``out`` before the main one writes into it

    set_seed(cfg.seed)
    teacher = _distill_teacher(model, cfg)  # the model as given, before conversion or a resumed state
    state, calib_info = _restore_or_prepare(model, cfg, train_data, resume_dir, is_main)

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
    return _Run(cfg=cfg, accelerator=accelerator, model=model, raw=raw, teacher=teacher, optimizer=optimizer,
                scheduler=scheduler, group_names=group_names, trainable=trainable, stream=stream,
                converted=converted, ffns=ffns, aux_fn=aux_fn, hook=hook, out=out, is_main=is_main, state=state,
                calib_info=calib_info, step=step, mb=mb, tokens_seen=int(state.get("tokens", 0)))


def _open_log(out: Path | None, step: int, cfg: TrainConfig, is_main: bool):
    """(log path, open log file or None): the JSONL log cut back to ``step`` (a resume), and train_config.json."""
    log_path = out / LOG_NAME if out is not None else None
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if log_path.exists():  # drop log lines past the resumed step
            kept = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in kept))
        _write_json_atomic(out / "train_config.json", cfg.to_dict())
    log_file = open(log_path, "a") if (log_path is not None and is_main) else None
    return log_path, log_file
