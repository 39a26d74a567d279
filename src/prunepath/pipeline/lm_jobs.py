"""The LM study's jobs: one function per job kind, each ``fn(ctx, job) -> result dict``; see
:mod:`prunepath.pipeline.lm_study`."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from typing import Callable

from prunepath.errors import PrunePathError
from prunepath.evaluation import inner
from prunepath.evaluation.sweep import nearest_sparsity, pareto_front
from prunepath.baselines import activation
from prunepath.baselines import fitting
from prunepath.baselines.calibration import collect_ffn_inputs, token_batches
from prunepath.baselines.calibration import expert_mass
from prunepath.baselines.knobs import knob_for_sparsity
from prunepath.baselines.static import prune_experts
from prunepath.baselines.wanda import input_norms, target_linears
from prunepath.data.instruct import load_examples
from prunepath.data.lm import build_instruct_dataset
from prunepath.evaluation.allocation import allocate_layer_tau
from prunepath.evaluation.common import ActiveMeter, pad_id
from prunepath.evaluation.generation import greedy_batch, stop_ids, uses_chat_template
from prunepath.evaluation.reconstruction import topk_reconstruction
from prunepath.models.adapters import needs_bos
from prunepath.state import state_of
from prunepath.training.selfgen import SelfCorpusInterrupted
from prunepath.training.trainer import TrainingStopped, _checkpoints, train_from_config
from prunepath.training.trainer import evaluate
import prunepath
from prunepath.routing.config import TAU_ALL, is_valid_tau
from prunepath.evaluation import generation
from prunepath.baselines import wanda
from prunepath.pipeline.jobs import resumable_sweep
from prunepath.pipeline.lm_context import (ACTIVATION_JOBS, Context, DeadlineReached, Job, _log, _small, _strip,
                                           _structure, train_config)


def job_dense(ctx: Context, job: Job) -> dict:
    model, tok = ctx.load_base()
    res = ctx.ppl(model, tok)
    return {"records": [ctx.record("dense", res, variant="no training")]}


def job_train(ctx: Context, job: Job) -> dict:
    """Train one run on the study budget, resuming from its last checkpoint; stops (checkpointed) at the
    deadline."""

    run = job.args["run"]
    ctx.check(float(ctx.cfg.get("min_train_s", 0)))  # data + warm start + a first checkpoint must fit
    cfg = train_config(ctx.cfg, run, str(ctx.torch_device()).split(":")[0])
    path = ctx.ckpt(run)
    if path.exists() and not _checkpoints(path):
        shutil.rmtree(path)  # started but never checkpointed: start again
    if path.exists():
        state = json.loads((_checkpoints(path)[-1] / "trainer_state.json").read_text())["config"]
        if (state["stage1_steps"], state["stage2_steps"]) != (cfg.stage1_steps, cfg.stage2_steps):
            raise PrunePathError(f"{job.id}: the checkpoint in {path} was trained for {state['stage1_steps']}+"
                                 f"{state['stage2_steps']} steps but this run asks for {cfg.stage1_steps}+"
                                 f"{cfg.stage2_steps} (train_tokens changed?); pass the same --train-tokens as "
                                 "before or delete that folder")
        cfg.resume = "auto"
        _log(f"{job.id}: resuming from {_checkpoints(path)[-1].name}")
    model, tok = ctx.load_base()
    margin = float(ctx.cfg.get("save_margin_s", 25))
    _log(f"{job.id}: {cfg.method}, {cfg.stage1_steps}+{cfg.stage2_steps} steps x {cfg.tokens_per_step} tokens")
    t = time.time()
    try:
        result = train_from_config(model, tok, cfg, out_dir=path,
                                   should_stop=lambda: ctx.left() < margin)
    except TrainingStopped as stop:
        raise DeadlineReached(f"{job.id} checkpointed at step {stop.step}") from None
    except SelfCorpusInterrupted as stop:
        raise DeadlineReached(f"{job.id}: self-distillation corpus {stop}") from None
    return {"records": [], "train": {"run": run, "method": cfg.method, "tokens": result.tokens,
                                     "budget": int(ctx.cfg["train_tokens"]),
                                     "steps": result.steps, "seconds_total": round(result.seconds, 1),
                                     "seconds_this_call": round(time.time() - t, 1),
                                     "final_train_loss": result.train_loss, "final_s_ffn": result.s_ffn,
                                     "config": cfg.to_dict(), "calibration": _small(result.calibration)}}


def job_eval_dense_ft(ctx: Context, job: Job) -> dict:
    model, tok = ctx.load_ckpt("dense-ft")
    res = ctx.ppl(model, tok)
    return {"records": [ctx.record("dense-finetuned", res, variant="dense fine-tuned",
                                   train_tokens=ctx.train_tokens("dense-ft"))]}


def _sweep(ctx: Context, job: Job, points: list, apply: Callable, make_row: Callable) -> list[dict]:
    """Evaluate ``points`` one by one (``apply(point)`` sets the model up), continuing after the ones done."""
    def evaluate(p) -> dict:
        row = make_row(p, apply(p))
        row["_point"] = p
        return row

    def save(row: dict) -> None:
        ctx.add_partial(job.id, row)
        _log(f"{job.id} {row['_point']}: s_FFN {row['s_ffn']:.3f} PPL {row['ppl']:.3f}")

    done = {json.dumps(r["_point"]): r for r in ctx.partial(job.id)}
    return resumable_sweep(points, done, evaluate, save, key=json.dumps,
                           before=lambda p: ctx.check(float(ctx.cfg["min_job_s"])))


def _variant_label(ctx: Context, run: str) -> str:
    name = "main" if run.startswith("taumin-") else run
    return str(ctx.cfg["variants"].get(name, {}).get("label", name))


def job_eval_prunepath(ctx: Context, job: Job) -> dict:
    """A trained PrunePath checkpoint: the τ sweep (``sweep``) and its τ_min ± near_tau; the main run also gives
    the density profile and the top-k reconstruction."""

    run = job.args["run"]
    model, tok = ctx.load_ckpt(run)
    info = json.loads((ctx.ckpt(run) / "train_result.json").read_text()) if (ctx.ckpt(run) / "train_result.json").exists() else {}
    tcfg = json.loads((ctx.ckpt(run) / "train_config.json").read_text())
    tau_min = float(tcfg["tau_min"])
    variant, train_tokens = _variant_label(ctx, run), int(info.get("tokens", 0))
    seed = int(tcfg.get("seed", ctx.cfg["seed"]))  # a variant may train with its own seed
    near = sorted({round(tau_min + d, 4) for d in ctx.cfg["near_tau"] if is_valid_tau(tau_min + d, TAU_ALL)}, reverse=True)
    points = sorted({float(t) for t in ctx.cfg["sweep_taus"]} | set(near), reverse=True) if job.args["sweep"] \
        else near

    def apply(tau):
        with prunepath.routing(model, tau=tau):
            return ctx.ppl(model, tok)

    struct = _structure(model)

    def make_row(tau, res):
        row = ctx.record("prunepath-sweep", res, tau=tau, tau_min=tau_min, variant=variant,
                         train_tokens=train_tokens, run=run, seed=seed, **struct)
        row["_active_hist"] = res.get("active_hist")
        row["_num_experts"] = res.get("num_experts")
        return row

    rows = _sweep(ctx, job, points, apply, make_row)
    records = []
    for r in rows:
        r = dict(r)
        if r["tau"] in near:  # the checkpoint at (and near) the τ it was trained to
            records.append({**_strip(r), "method": "prunepath"})
        if job.args["sweep"]:
            records.append(_strip(r))
    records += _inner_grid(ctx, job, model, tok, run, rows, dict(tau_min=tau_min, variant=variant,
                                                              train_tokens=train_tokens, run=run, seed=seed,
                                                              **struct))
    out: dict = {"records": records}
    if run == "main":
        out["density"] = _density(ctx, rows)
        out["topk"] = _topk(ctx, model, tok, "prunepath", {"tau": TAU_ALL}, run)
    return out


def _inner_grid(ctx: Context, job: Job, model, tok, run: str, tau_rows: list[dict], extra: dict) -> list[dict]:
    """A variant with ``inner_targets``: in-expert thresholds calibrated on the calibration text, evaluated on the
    grid ``inner_taus`` × ``inner_targets`` × ``inner_allocations`` (uniform: the variant's training split
    ``inner_mid_bias``; block: TEAL's per-layer split); every grid point (``prunepath-inner-grid``) and the grid's
    frontier with the τ sweep (``prunepath-inner``)."""
    var = ctx.cfg["variants"].get(run, {})
    fractions = [float(f) for f in var.get("inner_targets") or []]
    if not fractions:
        return []
    taus = [float(t) for t in var.get("inner_taus") or [TAU_ALL, 0.95, 0.9, 0.85, 0.8]]
    calib = ctx.cfg["baselines"]["calib"]
    allocations = [str(a) for a in var.get("inner_allocations") or ["uniform"]]
    stats = inner.collect_inner_stats(model, tok, calib, max_tokens=int(ctx.cfg["activation"]["calib_tokens"]),
                                      window=int(ctx.cfg["evaluation"]["window"]))
    specs = {(f, a): inner.inner_spec(stats, f, mid_bias=float(var.get("inner_mid_bias", 0.0)), allocation=a,
                                      model=model) for f in fractions for a in allocations}

    def apply(point):
        tau, f, a = point
        inner.apply_inner(model, specs[f, a])
        try:
            with prunepath.routing(model, tau=tau):
                return ctx.ppl(model, tok)
        finally:
            inner.apply_inner(model, None)

    def make_row(point, res):
        spec = specs[point[1], point[2]]
        return ctx.record("prunepath-inner-grid", res, tau=point[0], inner_target=point[1],
                          inner_allocation=point[2], inner_f_in=spec["f_in"], inner_f_mid=spec["f_mid"],
                          s_experts=res.get("s_experts"), inner_calibration=spec["calibration"], **extra)

    grid = _sweep(ctx, job, [[t, f, a] for t in taus for a in allocations for f in fractions], apply, make_row)
    grid = [_strip(r) for r in grid]
    front = pareto_front(grid + [{**_strip(r), "inner_target": 0.0} for r in tau_rows])
    return grid + [{**r, "method": "prunepath-inner"} for r in front]


def _density(ctx: Context, rows: list[dict]) -> list[dict]:
    """Per-layer histograms of active experts per token at the τ nearest each target s_FFN."""
    out = []
    for target in ctx.cfg["density"]["targets"]:
        r = nearest_sparsity([r for r in rows if r.get("_active_hist")], float(target))
        out.append({"model": r["model"], "tau": r["tau"], "s_ffn": r["s_ffn"], "target_s_ffn": float(target),
                    "num_experts": r["_num_experts"], "tokens": r["eval_tokens"], "data": r["eval_data"],
                    "layers": [{"layer": i, "counts": {str(n): int(c) for n, c in enumerate(h) if c}}
                               for i, h in enumerate(r["_active_hist"])]})
    return out


def _topk(ctx: Context, model, tok, router: str, dense_routing: dict, source: str) -> list[dict]:
    """Top-k reconstruction of one router, FFN inputs from an all-expert forward."""

    try:
        with prunepath.routing(model, **dense_routing):
            rows = topk_reconstruction(model, tok, ctx.eval_ids(), max_tokens=int(ctx.cfg["topk"]["max_tokens"]),
                                       window=int(ctx.cfg["evaluation"]["window"]), progress=False)
    except Exception as exc:  # noqa: BLE001 - a side measurement must not lose the job's main results
        _log(f"top-k reconstruction for {router} failed: {exc!r}")
        return [{"router": router, "error": repr(exc)}]
    return [{"router": router, "source": source, "model": ctx.display(), **r} for r in rows]


def _calib_inputs(ctx: Context, model, tok):

    b = ctx.cfg["baselines"]
    batches = token_batches(tok, ctx.calib_texts(), seq_len=int(b["calib_seq_len"]), max_tokens=int(b["calib_tokens"]))
    dev = ctx.torch_device()
    return [x.to(dev) for x in collect_ffn_inputs(model, batches, progress=False)]


def job_eval_lte(ctx: Context, job: Job) -> dict:

    model, tok = ctx.load_ckpt("lte")
    inputs = _calib_inputs(ctx, model, tok)
    tt = ctx.train_tokens("lte")
    eta = ctx.cfg["lte"].get("method_params", {}).get("eta")
    points = [{"threshold": 0.5}] + [{"target": float(t)} for t in ctx.cfg["baselines"]["targets"]]

    def apply(p):
        if "threshold" in p:
            delta, s_cal = p["threshold"], None
        else:
            delta, s_cal = knob_for_sparsity(model, inputs, "lte", p["target"])
        prunepath.configure(model, method="lte", params={"soft": False, "threshold": float(delta)})
        return {**ctx.ppl(model, tok), "_delta": delta, "_s_cal": s_cal}

    def make_row(p, res):
        return ctx.record("lte", res, delta=res["_delta"], knob={"threshold": res["_delta"]}, eta=eta,
                          target_s_ffn=p.get("target"), s_ffn_calibration=res["_s_cal"], train_tokens=tt,
                          variant="trained (method lte)")

    rows = _sweep(ctx, job, points, apply, make_row)
    recs = [_strip(r) for r in rows]
    return {"records": recs, "topk": _topk(ctx, model, tok, "lte", {"method": "lte",
                                                                   "params": {"soft": False, "threshold": 0.0}}, "lte")}


def _base_model(ctx: Context, to_device: bool = True):
    """The dense model the pruning / router baselines start from (``baselines.base``), its training tokens and
    the results' variant label."""
    if ctx.cfg["baselines"]["base"] == "original":
        model, tok = ctx.load_base()
        if not to_device:
            model.cpu()
        return model, tok, 0, "original"
    model, tok = ctx.load_ckpt("dense-ft", to_device=to_device)
    return model, tok, ctx.train_tokens("dense-ft"), "dense-finetuned"


def job_wanda(ctx: Context, job: Job) -> dict:
    import torch


    model, tok, tt, base = _base_model(ctx)
    mods = target_linears(model, "ffn")
    saved = {n: m.weight.detach().clone() for n, m in mods.items()}
    state: dict = {}

    def apply(s):
        if "norms" not in state:
            b = ctx.cfg["baselines"]
            state["norms"] = input_norms(model, mods, token_batches(
                tok, ctx.calib_texts(), seq_len=int(b["calib_seq_len"]), max_tokens=int(b["calib_tokens"])), False)
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(saved[n])
        info = wanda.apply_wanda(model, tok, [], float(s), norms=state["norms"], progress=False)
        return ctx.ppl(model, tok) | {"_achieved": info["sparsity"]}

    def make_row(s, res):
        return ctx.record("wanda", res, knob={"weight_sparsity": s}, weight_sparsity=res["_achieved"],
                          train_tokens=tt, variant=f"on {base}",
                          note="s_ffn = FFN weight sparsity (unstructured; no speed-up)")

    rows = _sweep(ctx, job, [float(s) for s in ctx.cfg["baselines"]["wanda"]], apply, make_row)
    return {"records": [_strip(r) for r in rows]}


def _converted_base(ctx: Context):

    model, tok, tt, base = _base_model(ctx, to_device=False)  # cluster on the CPU, then move
    npe = int(ctx.cfg["train"].get("neurons_per_expert", 32))
    prunepath.moefy(model, neurons_per_expert=npe, seed=int(ctx.cfg["seed"]), progress=False)
    model.to(ctx.torch_device()).eval()
    return model, tok, tt, base


def job_router_baseline(ctx: Context, job: Job) -> dict:
    """MoEfication top-k (k sweep) or D2DMoE (τ sweep): router fitted on the frozen dense-finetuned model."""

    method = job.args["method"]
    model, tok, tt, base = _converted_base(ctx)
    inputs = _calib_inputs(ctx, model, tok)
    b = ctx.cfg["baselines"]
    ctx.check(float(ctx.cfg["min_job_s"]))
    t = time.time()
    info = fitting.fit_router(model, method=method, steps=int(b["fit_steps"]), batch_size=int(b["fit_batch"]),
                              lr=float(b["fit_lr"]), inputs=inputs, seed=int(ctx.cfg["seed"]), progress=False)
    fit_s = round(time.time() - t, 1)
    fit_loss = sum(info["final_loss"]) / len(info["final_loss"])

    def apply(target):
        knob, s_cal = knob_for_sparsity(model, inputs, method, float(target))
        setting = {"k": int(knob)} if method == "moefication" else {"tau": float(knob)}
        prunepath.configure(model, method=method, **setting)
        return {**ctx.ppl(model, tok), "_setting": setting, "_s_cal": s_cal}

    def make_row(target, res):
        st = res["_setting"]
        return ctx.record("moefication-topk" if method == "moefication" else method, res, knob=st,
                          k=st.get("k"), tau=st.get("tau"), target_s_ffn=float(target),
                          s_ffn_calibration=res["_s_cal"], fit_final_loss_mean=fit_loss, fit_s=fit_s,
                          train_tokens=tt, variant=f"router fitted on frozen {base}")

    rows = _sweep(ctx, job, [float(t) for t in b["targets"]], apply, make_row)
    out = {"records": [_strip(r) for r in rows]}
    if method == "moefication":
        e = state_of(model).config.num_experts
        out["topk"] = _topk(ctx, model, tok, "moefication", {"method": "moefication", "k": e}, f"{base} + fit")
    return out


def job_static(ctx: Context, job: Job) -> dict:
    import torch


    model, tok, tt, base = _converted_base(ctx)
    state: dict = {}

    def apply(s):
        if "mass" not in state:
            inputs = _calib_inputs(ctx, model, tok)
            with torch.no_grad():
                state["mass"] = [expert_mass(f, x).sum(0).double().cpu()
                                 for f, x in zip(prunepath.prunepath_modules(model), inputs)]
        prune_experts(model, tok, [], float(s), mass=state["mass"], progress=False)
        return ctx.ppl(model, tok)

    def make_row(s, res):
        return ctx.record("static", res, knob={"sparsity": s}, target_s_ffn=float(s), train_tokens=tt,
                          variant=f"experts pruned on {base}")

    rows = _sweep(ctx, job, [float(t) for t in ctx.cfg["baselines"]["targets"]], apply, make_row)
    return {"records": [_strip(r) for r in rows]}


def job_activation(ctx: Context, job: Job) -> dict:
    """TEAL (uniform or greedy allocation) or CATS on the original model: thresholds calibrated once on the
    calibration text for every target; s_FFN is the measured fraction of FFN bytes not read per token."""

    method, allocation = ACTIVATION_JOBS[job.args["method"]]
    model, tok = ctx.load_base()
    a = ctx.cfg["activation"]
    state: dict = {}

    def apply(target):
        if "stats" not in state:
            t = time.time()
            state["stats"] = activation.collect_activation_stats(
                model, tok, ctx.calib_texts(), max_tokens=int(a["calib_tokens"]),
                seq_len=int(ctx.cfg["evaluation"]["window"]), progress=False)
            state["calib_s"] = round(time.time() - t, 1)
        spec = activation.teal_thresholds(state["stats"], float(target), allocation=allocation) \
            if method == "teal" else activation.cats_thresholds(state["stats"], float(target))
        activation.apply_activation_sparsity(model, spec)
        return ctx.ppl(model, tok)

    def make_row(target, res):
        return ctx.record(job.args["method"], res, target_s_ffn=float(target), knob={"target": float(target)},
                          variant="training-free, on original" + (f", {allocation} allocation" if allocation else ""),
                          calib_tokens=int(a["calib_tokens"]), calib_s=state.get("calib_s"),
                          note="s_ffn = measured fraction of FFN weight bytes not read per token")

    rows = _sweep(ctx, job, [float(t) for t in a["targets"]], apply, make_row)
    return {"records": [_strip(r) for r in rows]}


def job_allocation(ctx: Context, job: Job) -> dict:
    """Per-layer τ chosen on calibration text for each global target s_FFN (``allocation.method``), evaluated."""

    run = job.args["run"]
    model, tok = ctx.load_ckpt(run)
    al = ctx.cfg["allocation"]
    info = json.loads((ctx.ckpt(run) / "train_result.json").read_text())
    calib = ctx.calib_texts()

    def apply(target):
        t = time.time()
        chosen = allocate_layer_tau(model, tok, calib, float(target), method=str(al["method"]),
                                    max_tokens=int(al["calib_tokens"]),
                                    window=int(ctx.cfg["evaluation"]["window"]), progress=False)
        with prunepath.routing(model, layer_tau=chosen["layer_tau"]):
            res = ctx.ppl(model, tok)
        return {**res, "_alloc": {"layer_tau": chosen["layer_tau"], "s_ffn_calibration": chosen.get("s_ffn"),
                                  "alloc_s": round(time.time() - t, 1)}}

    struct = _structure(model)

    def make_row(target, res):
        return ctx.record("prunepath-alloc", res, target_s_ffn=float(target), run=run, **struct,
                          variant=f"{_variant_label(ctx, run)}, {al['method']} per-layer τ",
                          train_tokens=int(info.get("tokens", 0)), **res["_alloc"])

    rows = _sweep(ctx, job, [float(t) for t in al["targets"]], apply, make_row)
    return {"records": [_strip(r) for r in rows]}


def _gen_taus(ctx: Context) -> list[tuple[float, float]]:
    """(τ, s_FFN) of the generating checkpoint nearest each generation target s_FFN (from its sweep)."""
    rows = json.loads(ctx.job_file(f"eval-{ctx.cfg['generation']['run']}").read_text())["records"]
    rows = [r for r in rows if r["method"] == "prunepath-sweep"]
    picked = []
    for t in ctx.cfg["generation"]["targets"]:
        r = nearest_sparsity(rows, float(t))
        if (r["tau"], r["s_ffn"]) not in picked:
            picked.append((r["tau"], r["s_ffn"]))
    return picked


def _systems(ctx: Context):
    """(name, tau, model, tok) for dense and the generating checkpoint (``generation.run``, default main) at the
    generation τs (models loaded lazily)."""
    yield "dense", None, *ctx.load_base()
    model, tok = ctx.load_ckpt(ctx.cfg["generation"]["run"])
    for tau, _ in _gen_taus(ctx):
        yield f"prunepath@{tau:g}", tau, model, tok


def _systems_sweep(ctx: Context, job: Job, evaluate: Callable, save: Callable) -> None:
    """The generation jobs' sweep over systems (dense, PrunePath at each τ), continuing after the finished ones."""
    done = {r["_point"]: r for r in ctx.partial(job.id)}
    resumable_sweep(_systems(ctx), done, evaluate, save, key=lambda system: system[0],
                    before=lambda system: ctx.check(float(ctx.cfg["min_job_s"])))


def job_gen_xsum(ctx: Context, job: Job) -> dict:
    """Greedy summaries (ROUGE is scored on another machine from the predictions)."""
    import torch


    g = ctx.cfg["generation"]
    examples = load_examples(g["xsum"])[: int(g["xsum_docs"])]

    def summarise(system) -> dict:
        name, tau, model, tok = system
        t = time.time()
        bos = int(tok.bos_token_id) if needs_bos(model, tok) else None
        chat, stops = uses_chat_template(tok), stop_ids(tok)
        meter, pre = ActiveMeter(model), ActiveMeter(model)
        preds = []
        batch = int(g.get("batch_size", 16))
        ctxm = prunepath.routing(model, tau=tau) if tau is not None else contextlib.nullcontext()
        with ctxm, torch.inference_mode():
            for i in range(0, len(examples), batch):
                # a system may take minutes: stop before the deadline, not after it (the system is redone on resume)
                ctx.check(3 * (time.time() - t) * batch / i if i else 0.0)
                chunk = examples[i:i + batch]
                prompts = [generation._prompt_ids(tok, ex, int(g["max_input_tokens"]), bos, chat) for ex in chunk]
                outs = greedy_batch(model, prompts, int(g["max_new_tokens"]), stops,
                                    pad=pad_id(tok), prefill_meter=pre, decode_meter=meter)
                for j, (ex, out) in enumerate(zip(chunk, outs)):
                    text = tok.decode(out, skip_special_tokens=True).strip().split("\n\n")[0].strip()
                    preds.append({"system": name, "tau": tau, "id": ex.get("id", i + j), "prediction": text,
                                  "reference": ex.get("summary", ex["response"]).strip()})
        m = meter.result()
        return {"_point": name, "system": name, "tau": tau, "s_ffn_decode": m["s_ffn"],
                "s_ffn_prefill": pre.result()["s_ffn"], "examples": len(preds),
                "seconds": round(time.time() - t, 1), "predictions": preds}

    def save(row: dict) -> None:
        ctx.add_partial(job.id, row)
        _log(f"{job.id} {row['system']}: {row['examples']} summaries, decode s_FFN {row['s_ffn_decode']:.3f}")

    _systems_sweep(ctx, job, summarise, save)
    rows = ctx.partial(job.id)
    summary = [{k: v for k, v in r.items() if k not in ("_point", "predictions")} for r in rows]
    return {"records": [], "gen_xsum": {"model": ctx.display(), "data": g["xsum"],
                                        "max_new_tokens": g["max_new_tokens"], "decoding": "greedy",
                                        "systems": summary},
            "gen_predictions": [p for r in rows for p in r["predictions"]]}


def job_gen_alpaca(ctx: Context, job: Job) -> dict:
    """Prompt-masked instruction loss on the Alpaca sample and a few greedy generations, dense vs sparse."""
    import torch


    g = ctx.cfg["generation"]
    examples = load_examples(g["alpaca"])
    # the last examples: the study never trains on Alpaca, but keep away from the head used elsewhere
    loss_ex = examples[-int(g["alpaca_examples"]):]
    gen_ex = examples[: int(g["alpaca_generations"])]

    def instruct(system) -> dict:
        name, tau, model, tok = system
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        ds = build_instruct_dataset(loss_ex, tok, 512)
        bos = int(tok.bos_token_id) if needs_bos(model, tok) else None
        ctxm = prunepath.routing(model, tau=tau) if tau is not None else contextlib.nullcontext()
        with ctxm, torch.inference_mode():
            ev = evaluate(model, ds, "instruct", batch_size=8, device=ctx.torch_device())
            # through the chat template, as XSum: the bare prompt gets end-of-turn at once
            prompts = [generation._prompt_ids(tok, ex, int(g["max_input_tokens"]), bos, uses_chat_template(tok))
                       for ex in gen_ex]
            outs = greedy_batch(model, prompts, int(g["max_new_tokens"]) * 2, stop_ids(tok), pad=pad_id(tok))
            gens = [{"prompt": ex["prompt"], "response": tok.decode(out, skip_special_tokens=True).strip(),
                     "reference": ex["response"]} for ex, out in zip(gen_ex, outs)]
        return {"_point": name, "system": name, "tau": tau, "loss": ev["loss"], "ppl": ev["ppl"],
                "tokens": ev["tokens"], "s_ffn": ev["s_ffn"], "generations": gens}

    def save(row: dict) -> None:
        ctx.add_partial(job.id, row)
        _log(f"{job.id} {row['system']}: instruction loss {row['loss']:.3f} at s_FFN {row['s_ffn']:.3f}")

    _systems_sweep(ctx, job, instruct, save)
    rows = [{k: v for k, v in r.items() if k != "_point"} for r in ctx.partial(job.id)]
    return {"records": [], "gen_alpaca": {"model": ctx.display(), "data": g["alpaca"],
                                          "loss_examples": len(loss_ex), "seq_len": 512, "systems": rows}}


# ---- driver --------------------------------------------------------------------------------------------------
