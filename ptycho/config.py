"""Configuration schemas (structured configs) and the checks made before any work.

The dataclasses here are registered in Hydra's ConfigStore as the schemas of
``conf/train.yaml`` and ``conf/infer.yaml``: a misspelt key or a value of the wrong type
is rejected by Hydra when the configuration is composed. :func:`check_train` and
:func:`check_infer` then check what types cannot express (impossible combinations,
missing files) and raise :class:`ConfigError` with one line naming the field and the
fix.
"""

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import List, Optional

from ptycho.errors import ConfigError

# String choices of the model section (ptycho.model uses the same tuples).
MODEL_CHOICES = {
    "amplitude_activation": ("sigmoid", "softplus", "relu", "exponential"),
    "object_support": ("half", "full"),
    "object_output": ("patches", "group"),
    "precision": ("auto", "float32", "bfloat16"),
}
REFINE_MODES = ("off", "object", "positions", "full")
REFINE_LOSSES = ("poisson", "amplitude")

__all__ = [
    "MODEL_CHOICES",
    "REFINE_MODES",
    "ConfigError",
    "DataConfig",
    "InferConfig",
    "ModelSection",
    "RefineOptions",
    "TrainConfig",
    "TrainSection",
    "check_infer",
    "check_train",
    "refine_options",
    "register_configs",
    "rollback_overrides",
]


class Backend(Enum):
    xla = "xla"
    legacy = "legacy"


class CompileMode(Enum):
    jit = "jit"
    graph = "graph"
    eager = "eager"
    auto = "auto"  # per device and stage: ptycho.hardware.resolve_compile


class InferGroups(Enum):
    all = "all"
    tile = "tile"


class Strategy(Enum):
    none = "none"
    mirrored = "mirrored"
    multiworker = "multiworker"


class DataSource(Enum):
    simulate = "simulate"
    file = "file"


class ObjectKind(Enum):
    lines = "lines"
    grf = "grf"
    image = "image"


class ProbeKind(Enum):
    disk = "disk"
    fresnel = "fresnel"
    aberrated = "aberrated"
    gaussian = "gaussian"


class ScanKind(Enum):
    grid = "grid"
    spiral = "spiral"
    random = "random"


class Grouping(Enum):
    auto = "auto"
    block = "block"
    nearest = "nearest"


class Schedule(Enum):
    constant = "constant"
    cosine = "cosine"
    exponential = "exponential"


@dataclass
class TranslateSection:
    backend: Backend = Backend.xla


@dataclass
class CompileSection:
    mode: CompileMode = CompileMode.jit


@dataclass
class DistributeSection:
    """Data-parallel training with tf.distribute (ptycho/distribute.py)."""

    strategy: Strategy = Strategy.none
    cpu_devices: int = 0  # >= 2: split the CPU into logical devices (tests, a CPU-only dry run)


@dataclass
class DataConfig:
    """Where the scans come from: simulated (train and test objects differ) or files."""

    source: DataSource = DataSource.simulate
    path: Optional[str] = None  # file scan (.npz, .h5, .cxi) for source=file
    test_path: Optional[str] = None  # optional separate test scan; default: the train scan
    probe_path: Optional[str] = None  # probe for files without one (.npz/.h5 with probeGuess)
    object_kind: ObjectKind = ObjectKind.lines
    probe: ProbeKind = ProbeKind.aberrated
    probe_radius: float = 0.2
    fresnel_number: float = 8.0
    scan: ScanKind = ScanKind.grid
    n_positions: int = 6400
    test_positions: int = 1600
    step: float = 0.0625
    jitter: float = 0.0
    position_error: float = 0.0  # px rms of errors in the stored positions (truth kept)
    nphotons: Optional[float] = 1e9
    amplitude_range: List[float] = field(default_factory=lambda: [0.2, 1.0])
    phase_range: List[float] = field(default_factory=lambda: [-0.6, 0.6])
    images: List[str] = field(default_factory=lambda: ["camera", "moon"])
    test_images: List[str] = field(default_factory=lambda: ["coins", "text"])
    correlation_length: float = 4.0
    line_blur: List[float] = field(default_factory=lambda: [1.0, 5.0, 10.0])  # px, lines only
    line_blur_weights: Optional[List[float]] = field(default_factory=lambda: [1.0, 2.0, 5.0])
    seed: int = 0
    test_seed: Optional[int] = 1  # null: the test scan is the training scan itself
    grouping: Grouping = Grouping.auto  # auto | block (rasters) | nearest (any scan)
    n_groups: Optional[int] = None


@dataclass
class ModelSection:
    n: int = 64
    gridsize: int = 2
    filters: int = 16
    amplitude_activation: str = "softplus"
    probe_trainable: bool = False
    probe_mask_radius: Optional[float] = None
    canvas_pad: Optional[int] = None
    object_support: str = "half"
    object_output: str = "patches"
    offset_input: bool = False
    precision: str = "auto"


@dataclass
class TrainSection:
    epochs: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    schedule: Schedule = Schedule.constant
    final_learning_rate: float = 1e-4  # end of the cosine / exponential schedule
    poisson_weight: float = 0.0
    mae_weight: float = 1.0
    seed: int = 0
    eval_every: int = 10  # epochs between test-scan evaluations (0: only at the end)
    log_every_steps: int = 10  # steps between per-step loss points in TensorBoard
    max_minutes: Optional[float] = 9.0  # stop after the epoch that crosses this wall time
    eval_minutes: List[float] = field(default_factory=list)  # also evaluate at these times


@dataclass
class RefineOptions:
    """Physics refinement after the network, or alone (the ``refine`` section; see
    ptycho/refine.py). Checked by :func:`refine_options`, not on composition."""

    mode: str = "off"  # off | object | positions (object + positions) | full (+ probe)
    iterations: int = 30  # passes over every scan position
    max_seconds: Optional[float] = None  # stop after the iteration that crosses this
    batch_size: int = 64  # positions per step
    loss: str = "poisson"  # poisson | amplitude (Gaussian on sqrt(counts))
    step: float = 1.0  # object step, in units of the preconditioned (Gauss-Newton) step
    final_step: float = 0.02  # the cosine schedule ends at step * final_step
    momentum: float = 0.8  # heavy-ball momentum of the object update
    regularisation: float = 1.0  # delta: preconditioner sum|P|^2 + delta * max
    truncation: float = 1.0  # Poisson gradient factor (1 - n/I) bounded below by -this
    smoothness: float = 30.0  # weight of sum |grad O|^2 (a prior; counts units)
    position_start: int = 3  # first iteration that moves positions
    position_step: float = 0.8  # pixels per unit normalised gradient
    max_position_step: float = 0.4  # pixels, per step
    max_position_correction: float = 8.0  # pixels, in all
    probe_start: int = 10  # first iteration that updates the probe (mode=full)
    probe_step: float = 1.0
    eval_every: int = 5  # iterations between progress lines / TensorBoard points
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.mode in REFINE_MODES, f"mode={self.mode}: one of {', '.join(REFINE_MODES)}"),
            (self.loss in REFINE_LOSSES, f"loss={self.loss}: one of {', '.join(REFINE_LOSSES)}"),
            (self.iterations >= 1, f"iterations={self.iterations}: must be >= 1"),
            (
                self.max_seconds is None or self.max_seconds > 0,
                f"max_seconds={self.max_seconds}: must be > 0 or null",
            ),
            (self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1"),
            (self.step > 0, f"step={self.step}: must be > 0"),
            (0 < self.final_step <= 1, f"final_step={self.final_step}: must be in (0, 1]"),
            (0 <= self.momentum < 1, f"momentum={self.momentum}: must be in [0, 1)"),
            (self.regularisation > 0, f"regularisation={self.regularisation}: must be > 0"),
            (self.truncation > 0, f"truncation={self.truncation}: must be > 0"),
            (self.position_step > 0, f"position_step={self.position_step}: must be > 0"),
            (
                self.max_position_step > 0,
                f"max_position_step={self.max_position_step}: must be > 0 (pixels)",
            ),
            (
                self.max_position_correction > 0,
                f"max_position_correction={self.max_position_correction}: must be > 0 (pixels)",
            ),
            (self.probe_step > 0, f"probe_step={self.probe_step}: must be > 0"),
            (self.position_start >= 0, f"position_start={self.position_start}: must be >= 0"),
            (self.probe_start >= 0, f"probe_start={self.probe_start}: must be >= 0"),
            (self.eval_every >= 1, f"eval_every={self.eval_every}: must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def refines_positions(self) -> bool:
        return self.mode in ("positions", "full")

    @property
    def refines_probe(self) -> bool:
        return self.mode == "full"


@dataclass
class MetricsSection:
    register: bool = True
    remove_phase_ramp: bool = False


@dataclass
class TrainConfig:
    translate: TranslateSection = field(default_factory=TranslateSection)
    compile: CompileSection = field(default_factory=CompileSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    refine: RefineOptions = field(default_factory=RefineOptions)
    distribute: DistributeSection = field(default_factory=DistributeSection)
    infer_batch_size: int = 64
    infer_groups: InferGroups = InferGroups.all
    align_phase: bool = True
    resume: bool = False
    verbose: bool = False  # debug logs and TensorFlow's native start-up notices


@dataclass
class InferConfig:
    checkpoint: Optional[str] = None
    translate: TranslateSection = field(default_factory=TranslateSection)
    compile: CompileSection = field(default_factory=CompileSection)
    data: DataConfig = field(default_factory=DataConfig)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    refine: RefineOptions = field(default_factory=RefineOptions)
    n: int = 64  # pattern size of a simulated scan when no checkpoint sets it
    infer_batch_size: int = 64
    infer_groups: InferGroups = InferGroups.all
    align_phase: bool = True
    verbose: bool = False  # debug logs and TensorFlow's native start-up notices


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (``train_schema``, ``infer_schema``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="infer_schema", node=InferConfig)


def rollback_overrides(argv: list, environ: dict) -> list:
    """Overrides implied by the rollback switches when the command line is silent.

    ``USE_XLA_TRANSLATE=0`` selects ``translate=legacy`` and ``USE_XLA_COMPILE=0``
    selects ``compile=graph``, unless the arguments already choose them. Since the
    legacy warp cannot run under XLA, ``USE_XLA_TRANSLATE=0`` alone also selects
    ``compile=graph`` when the command line does not choose a compile mode.
    """
    extra = []
    chosen = {arg.lstrip("+~").split("=", 1)[0] for arg in argv if "=" in arg}
    compile_chosen = bool(chosen & {"compile", "compile.mode"})
    if environ.get("USE_XLA_TRANSLATE") == "0" and not chosen & {"translate", "translate.backend"}:
        extra.append("translate=legacy")
        if not compile_chosen:
            extra.append("compile=graph")
    graph_already = "compile=graph" in extra
    if environ.get("USE_XLA_COMPILE") == "0" and not compile_chosen and not graph_already:
        extra.append("compile=graph")
    return extra


def _value(choice) -> str:
    return choice.value if isinstance(choice, Enum) else str(choice)


def _check_backend(cfg) -> None:
    if _value(cfg.translate.backend) == "legacy" and _value(cfg.compile.mode) == "jit":
        raise ConfigError(
            "translate=legacy cannot run with compile=jit (ImageProjectiveTransformV3 has no "
            "XLA kernel): use translate=xla, or compile=graph for the legacy path"
        )


def refine_options(section) -> RefineOptions:
    """The composed ``refine`` section as checked :class:`RefineOptions`; ConfigError
    names the field when a value is out of range."""
    from omegaconf import OmegaConf

    fields = OmegaConf.to_container(section) if OmegaConf.is_config(section) else dict(section)
    try:
        return RefineOptions(**fields)
    except ValueError as error:
        raise ConfigError(f"refine.{error}") from error


def _check_refine(cfg) -> None:
    mode = cfg.refine.mode
    if mode in ("positions", "full") and _value(cfg.translate.backend) == "legacy":
        raise ConfigError(
            f"refine={mode} moves the scan positions through the warp's offset gradient, "
            "which translate=legacy does not have: use translate=xla, or refine=object"
        )
    if mode != "off":
        refine_options(cfg.refine)


def _check_data_files(data) -> None:
    if _value(data.source) == "file":
        if not data.path:
            raise ConfigError("data.path is required for a file scan: data=npz data.path=scan.npz")
    for name in ("path", "test_path", "probe_path"):
        value = getattr(data, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"data.{name}={value}: no such file")
    if _value(data.source) == "simulate":
        if data.n_positions < 1 or data.test_positions < 1:
            raise ConfigError("data.n_positions and data.test_positions must be >= 1")
        if data.nphotons is not None and not data.nphotons > 0:
            raise ConfigError(f"data.nphotons={data.nphotons}: must be > 0, or null (noiseless)")
        if not 0 < data.step:
            raise ConfigError(f"data.step={data.step}: must be > 0 (fraction of N)")
        if not data.position_error >= 0:
            raise ConfigError(f"data.position_error={data.position_error}: must be >= 0 (pixels)")


def check_train(cfg) -> None:
    """Checks of a composed train config that need no TensorFlow; raise ConfigError."""
    _check_backend(cfg)
    model, train, data = cfg.model, cfg.train, cfg.data
    if model.n not in (64, 128, 256):
        raise ConfigError(f"model.n={model.n}: must be 64, 128 or 256")
    if model.gridsize < 1:
        raise ConfigError(f"model.gridsize={model.gridsize}: must be >= 1")
    if model.filters < 1:
        raise ConfigError(f"model.filters={model.filters}: must be >= 1")
    for key, choices in MODEL_CHOICES.items():
        if model[key] not in choices:
            raise ConfigError(f"model.{key}={model[key]}: must be one of {', '.join(choices)}")
    if train.epochs < 1:
        raise ConfigError(f"train.epochs={train.epochs}: must be >= 1")
    if train.batch_size < 1:
        raise ConfigError(f"train.batch_size={train.batch_size}: must be >= 1")
    if not train.learning_rate > 0:
        raise ConfigError(f"train.learning_rate={train.learning_rate}: must be > 0")
    if (
        train.poisson_weight < 0
        or train.mae_weight < 0
        or (train.poisson_weight + train.mae_weight == 0)
    ):
        raise ConfigError("train.poisson_weight and train.mae_weight must be >= 0, not both 0")
    if cfg.infer_batch_size < 1:
        raise ConfigError(f"infer_batch_size={cfg.infer_batch_size}: must be >= 1")
    _check_refine(cfg)
    _check_data_files(data)
    if _value(data.source) == "simulate":
        groups = data.n_groups or data.n_positions
        if train.batch_size > groups:
            raise ConfigError(
                f"train.batch_size={train.batch_size} is larger than the {groups} training "
                "samples: lower train.batch_size or raise data.n_positions"
            )
        blurs, weights = list(data.line_blur), data.line_blur_weights
        if not blurs or min(blurs) < 0:
            raise ConfigError(f"data.line_blur={blurs}: must be one or more blurs >= 0 (pixels)")
        if weights is not None and (
            len(weights) != len(blurs) or min(weights) < 0 or max(weights) <= 0
        ):
            raise ConfigError(
                f"data.line_blur_weights={list(weights)}: must be one weight >= 0 per "
                f"data.line_blur entry ({len(blurs)}), not all 0, or null for equal weights"
            )


def check_infer(cfg) -> None:
    """Checks of a composed infer config that need no TensorFlow; raise ConfigError."""
    _check_backend(cfg)
    _check_refine(cfg)
    if not cfg.checkpoint and cfg.refine.mode == "off":
        raise ConfigError(
            "checkpoint is required: infer.py checkpoint=outputs/<run>/model.keras, or "
            "refine=object for an iterative reconstruction without a network"
        )
    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise ConfigError(f"checkpoint={cfg.checkpoint}: no such file")
    if cfg.n not in (64, 128, 256):
        raise ConfigError(f"n={cfg.n}: must be 64, 128 or 256")
    if cfg.infer_batch_size < 1:
        raise ConfigError(f"infer_batch_size={cfg.infer_batch_size}: must be >= 1")
    _check_data_files(cfg.data)
