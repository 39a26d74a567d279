"""Every training setting in one dataclass; recipes (YAML/JSON) hold the same keys, CLI flags override them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from prunepath.errors import PrunePathError
from prunepath.errors import unknown_names_message
from prunepath.routing.config import TAU_ALL, validate_mid_bias, validate_tau

TASKS = ("lm", "classify", "instruct")
SCHEDULES = ("linear", "fixed", "sample")
TRAIN_SCOPES = ("all", "ffn")
PRECISIONS = ("no", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Settings of ``prunepath train`` (defaults: the authors' release, PAPER.md §4).

    Steps are optimizer steps; one step sees ``batch_size × grad_accum × seq_len`` tokens (per process).
    """

    # what to train
    model: str = "smollm2-135m"
    task: str = "lm"
    data: str | None = None
    eval_data: str | None = None  # default: the validation split of ``data``
    out: str | None = None
    method: str = "prunepath"  # "prunepath", "dense" (plain fine-tuning, no routing) or a registered baseline
    method_params: dict = field(default_factory=dict)
    # conversion of a plain model
    neurons_per_expert: int = 32
    num_experts: int | None = None
    clustering: str = "kmeans"  # kmeans | random | coactivation (calibration activations collected here)
    # schedule (PAPER §4)
    stage1_steps: int = 100
    stage2_steps: int = 100
    tau_warmup: float = TAU_ALL
    tau_start: float = 1.0
    tau_min: float = 0.7
    tau_schedule: str = "linear"
    tau_rounds: int = 10
    # "sample" (beyond the paper): each stage-2 step draws τ uniformly from [tau_min, tau_start], or runs every
    # expert (TAU_ALL) with probability tau_all_prob, so one checkpoint is trained for the whole τ range and
    # its all-expert model stays anchored to the teacher
    tau_all_prob: float = 0.25
    # in-expert activation sparsity (beyond the paper): each stage-2 step zeroes, inside the active experts, the
    # smallest fraction f of the FFN inputs and of the intermediate entries (TEAL-style, thresholds from the
    # batch), f drawn uniformly from [0, inner_sparsity_max], or f = 0 with probability inner_off_prob; 0: off
    inner_sparsity_max: float = 0.0
    inner_off_prob: float = 0.125
    # f is a byte fraction; inner_mid_bias κ shifts it towards the intermediate (routing.config.inner_split):
    # f_in = f·(1 − κ), f_mid = f·(1 + 2κ) for a gated FFN; 0 thresholds both at f
    inner_mid_bias: float = 0.0
    # losses
    eta: float = 3e-4  # L_ent weight
    lam: float = 1e-3  # L_bal weight
    gamma: float = 0.0  # L_gate weight
    # optimisation
    lr_backbone: float = 1e-4
    wd_backbone: float = 0.0
    lr_router: float = 1e-3
    wd_router: float = 1e-2
    lr_head: float | None = None  # a new classification head (default: lr_backbone)
    lr_scheduler: str = "constant"  # any transformers scheduler name (constant, linear, cosine, ...)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    freeze_backbone: bool = False
    train_scope: str = "all"  # all | ffn (only the FFN experts, routers and a new head train; attention,
    #                           embeddings and norms stay as loaded)
    batch_size: int = 1
    grad_accum: int = 1
    seq_len: int = 256
    precision: str = "fp32"  # fp32 | bf16 | fp16 (accelerate mixed precision)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # data
    max_train_tokens: int | None = None  # cap on tokenised training text (default: what the steps need)
    max_eval_tokens: int | None = 32768
    valid_fraction: float = 0.05
    text_field: str | None = None
    num_labels: int | None = None
    glue_task: str | None = None  # sst2 | mrpc | rte | cola when the file name does not tell
    # beyond the paper (FINDINGS.md), all off by default
    gate_offset: float = 0.0
    # False: experts are summed unscaled (no gate sigmoid), so with every expert on (τ > 1) the router is not
    # needed at all and its bytes are not read
    gates: bool = True
    warmstart_steps: int = 0  # router warm start (KL to each expert's share of the true output), backbone frozen
    warmstart_target: str = "output_norm"  # output_norm | activation_mass
    warmstart_lr: float = 1e-2
    warmstart_temperature: float = 1.0
    calib_tokens: int = 4096  # calibration tokens for warm start / always-on / sensitivity / co-activation
    dense_layers: list = field(default_factory=list)  # layer indices kept dense (negative = from the end)
    auto_dense_layers: int = 0  # keep the k most τ-sensitive layers dense (measured on calibration data)
    layer_tau: dict = field(default_factory=dict)  # per-layer τ_min {layer: tau}
    always_on: int = 0  # experts per layer that always run (largest max output norm on calibration data)
    distill: float = 0.0  # weight α of the KL to the frozen dense model's next-token distribution (0: off)
    distill_temperature: float = 1.0
    # weight of a KL from each token's true expert-output-norm shares (the warm-start target, recomputed on the
    # current weights every step, temperature warmstart_temperature) to the router softmax (0: off)
    router_distill: float = 0.0
    # self-distillation corpus (``data: self:N[+corpus]``): prompt_tokens, new_tokens, temperature, top_p,
    # chat_fraction, prompts (source of prompt passages), batch_size — see prunepath.training.selfgen
    self_corpus: dict = field(default_factory=dict)
    # bookkeeping
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    eval_every: int = 0
    log_every: int = 1
    progress: bool = True
    resume: str | None = None  # "auto" (latest in OUT/checkpoints) or a checkpoint directory

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.task not in TASKS:
            raise PrunePathError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.tau_schedule not in SCHEDULES:
            raise PrunePathError(f"unknown --tau-schedule {self.tau_schedule!r}; choose linear, fixed or sample")
        if not 0 <= self.inner_sparsity_max < 1:
            raise PrunePathError(f"--inner-sparsity-max must be in [0, 1) (got {self.inner_sparsity_max}): the "
                                 "largest fraction of FFN inputs / intermediates zeroed in a training step (0: off)")
        if not 0 <= self.inner_off_prob <= 1:
            raise PrunePathError(f"--inner-off-prob must be in [0, 1] (got {self.inner_off_prob})")
        validate_mid_bias(self.inner_mid_bias, "--inner-mid-bias")
        if self.inner_sparsity_max > 0 and self.method != "prunepath":
            raise PrunePathError(f"--inner-sparsity-max trains PrunePath experts; not available for --method "
                                 f"{self.method}")
        if not 0 <= self.tau_all_prob <= 1:
            raise PrunePathError(f"--tau-all-prob must be in [0, 1] (got {self.tau_all_prob}): the probability "
                                 "that a stage-2 step of --tau-schedule sample runs every expert")
        if self.train_scope not in TRAIN_SCOPES:
            raise PrunePathError(f"unknown --train-scope {self.train_scope!r}; choose all or ffn")
        if self.train_scope == "ffn" and self.method == "dense":
            raise PrunePathError("--train-scope ffn trains the converted FFNs; it needs a PrunePath method, not "
                                 "--method dense")
        if self.method != "dense":
            validate_tau(self.tau_min, 1.0, open_upper=True,
                         message=f"--tau-min must be in (0, 1) (got {self.tau_min}); τ ≥ 1 keeps every expert, "
                                 "so nothing would be sparse. The paper uses e.g. 0.7")
        for layer, t in (self.layer_tau or {}).items():
            validate_tau(t, TAU_ALL, message=f"layer_tau[{layer}] = {t} must be in (0, {TAU_ALL}]")
        validate_tau(self.tau_start, TAU_ALL, message=f"tau_start must be in (0, {TAU_ALL}] (got {self.tau_start})")
        for name in ("stage1_steps", "stage2_steps", "warmstart_steps", "save_every", "eval_every",
                     "always_on", "auto_dense_layers", "warmup_steps"):
            if getattr(self, name) < 0:
                raise PrunePathError(f"{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.stage1_steps + self.stage2_steps < 1:
            raise PrunePathError("nothing to train: --stage1-steps + --stage2-steps must be at least 1")
        for name in ("batch_size", "grad_accum", "seq_len", "tau_rounds", "log_every", "neurons_per_expert",
                     "calib_tokens"):
            if getattr(self, name) < 1:
                raise PrunePathError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.precision not in PRECISIONS:
            raise PrunePathError(f"unknown precision {self.precision!r}; choose fp32, bf16 or fp16")
        if self.warmstart_target not in ("output_norm", "activation_mass"):
            raise PrunePathError("warmstart_target must be output_norm or activation_mass")
        for name in ("lr_backbone", "lr_router", "eta", "lam", "gamma", "wd_backbone", "wd_router"):
            if getattr(self, name) < 0:
                raise PrunePathError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not 0 <= self.distill <= 1:
            raise PrunePathError(f"--distill is the weight of the distillation loss, in [0, 1] (got {self.distill}); "
                                 "the task loss gets 1 − distill")
        if self.router_distill < 0:
            raise PrunePathError(f"--router-distill is a loss weight, >= 0 (got {self.router_distill})")
        if self.router_distill and self.method != "prunepath":
            raise PrunePathError("--router-distill trains PrunePath's softmax router; it does not apply to "
                                 f"method {self.method!r}")
        if self.distill_temperature <= 0:
            raise PrunePathError(f"--distill-temperature must be > 0 (got {self.distill_temperature})")
        if self.distill and self.task == "classify":
            raise PrunePathError("--distill needs a causal LM task (lm or instruct): a new classification head has "
                                 "no trained teacher to distil from")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise PrunePathError(f"--device must be auto, cpu or cuda (got {self.device!r})")
        self.layer_tau = {int(k): float(v) for k, v in (self.layer_tau or {}).items()}
        self.dense_layers = [int(x) for x in (self.dense_layers or [])]

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    # ---- (de)serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> "TrainConfig":
        d = {k.replace("-", "_"): v for k, v in (d or {}).items()}
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise PrunePathError(f"{where}: {unknown_names_message(unknown, cls.keys())} (all settings: "
                                 "`prunepath train --help`, keys with _ instead of -)")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """A YAML (.yaml/.yml) or JSON recipe; unknown keys are rejected by name."""
        return cls.from_dict(load_recipe(path), where=str(path))


def load_recipe(path: str | Path) -> dict:
    """The raw mapping of a YAML/JSON recipe file, with clear errors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PrunePathError(f"no such recipe file: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - yaml and json raise different types
        raise PrunePathError(f"{p} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: "
                             f"{str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PrunePathError(f"{p} must hold a mapping of setting: value")
    return data
