"""The configuration: composed by Hydra from conf/, converted once into the sections'
dataclasses, each section checking itself, the rules across sections, the rollback
switches, renamed keys, and Hydra confined to the entry points."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import hydra
import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

from ptycho.config import (
    RENAMED,
    InferConfig,
    TrainConfig,
    check_infer,
    check_train,
    renamed_key_hint,
    rollback_overrides,
)
from ptycho.data import DataOptions, SimulationSpec, simulate
from ptycho.errors import ConfigError
from ptycho.hardware import CompileMode
from ptycho.model import ModelConfig, Precision
from ptycho.refine import RefineMode, RefineOptions
from ptycho.warp import Backend
from tests.conftest import compose_config, compose_raw

ROOT = Path(__file__).resolve().parents[2]


def test_the_composed_configuration_becomes_the_sections_dataclasses():
    config = compose_config(overrides=["debug=smoke", "refine=full", "translate=legacy"])
    assert isinstance(config, TrainConfig)
    assert isinstance(config.model, ModelConfig) and isinstance(config.refine, RefineOptions)
    assert isinstance(config.data, DataOptions) and isinstance(config.data, SimulationSpec)
    # Choices are str enums: they are the enum and compare equal to their strings.
    assert config.refine.mode is RefineMode.full and config.refine.mode == "full"
    assert config.translate.backend is Backend.legacy and f"{config.translate.backend}" == "legacy"
    assert config.compile.mode is CompileMode.auto  # the default (issue 21)
    assert config.model.precision is Precision.auto and config.model.filters == 4  # smoke
    assert isinstance(compose_config("infer"), InferConfig)


def test_the_yaml_files_state_only_what_differs_from_the_dataclass_defaults():
    """The default run composes to exactly the dataclasses' defaults (apart from what the
    schema leaves open), so there is one set of defaults."""
    config = compose_config()
    assert config.model == ModelConfig()
    assert config.train == type(config.train)()
    assert config.refine == RefineOptions()
    assert config.data == DataOptions()
    # ... and the simulation of the default data is simulate()'s own default scan.
    assert config.data.simulation(64) == SimulationSpec()


def test_the_test_scan_spec_differs_only_where_test_fields_say():
    data = compose_config().data
    train, test = data.simulation(64), data.simulation(64, test=True)
    changed = {
        field.name
        for field in dataclasses.fields(SimulationSpec)
        if getattr(train, field.name) != getattr(test, field.name)
    }
    assert changed == {"n_positions", "images", "seed"}
    assert (test.n_positions, test.seed) == (data.test_positions, data.test_seed)
    same = compose_config(overrides=["data=image_spiral"]).data
    assert same.simulation(64, test=True) == same.simulation(64)  # test_seed null


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("train.epoch=3", ConfigCompositionException),  # typo
        ("train.epochs=many", ConfigCompositionException),  # wrong type
        ("translate.backend=fast", ConfigCompositionException),  # not a choice
        ("model.precision=fp8", ConfigCompositionException),
        ("model.amplitude_activation=tanh", ConfigCompositionException),
        ("model.object_output=canvas", ConfigCompositionException),
        ("refine.loss=gauss", ConfigCompositionException),
        ("outputs.format=tiff", ConfigCompositionException),
        ("train.probe=guess", ConfigCompositionException),
        ("data.background_mode=divide", ConfigCompositionException),
        ("translate=fast", MissingConfigException),  # no such config
    ],
)
def test_hydra_rejects_typos_wrong_types_and_unknown_choices(override, error):
    with pytest.raises(error):
        compose_raw(overrides=[override])


def test_the_composed_schema_refuses_unknown_keys():
    cfg = compose_raw(overrides=["debug=smoke"])
    assert cfg.model.n is None and cfg.train.epochs == 1 and cfg.data.n_positions == 36
    with pytest.raises((ConfigKeyError, ValidationError, AttributeError)):
        cfg.train.epochz = 1


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["translate=legacy", "compile=jit"], "use translate=xla, or compile=graph"),
        (["model.n=100"], r"^model.n=100: must be 64, 128 or 256, or null \(the data's\)$"),
        (["model.gridsize=0"], r"^model.gridsize=0: must be >= 1$"),
        (["train.epochs=0"], r"^train.epochs=0: must be >= 1$"),
        (["train.mae_weight=0"], r"^train.poisson_weight and mae_weight: must be >= 0, not both"),
        (["reconstruct.batch_size=0"], r"^reconstruct.batch_size=0: must be >= 1$"),
        (["refine=object", "refine.iterations=0"], r"^refine.iterations=0: must be >= 1$"),
        (["refine=object", "refine.momentum=1"], r"^refine.momentum=1.0: must be in \[0, 1\)$"),
        (["data.nphotons=0"], r"^data.nphotons=0.0: must be > 0, or null"),
        (["data.n_positions=0"], r"^data.n_positions=0: must be >= 1$"),
        (["data.test_positions=0"], r"^data.test_positions=0: must be >= 1$"),
        (["data.step=-1"], r"^data.step=-1.0: must be > 0"),
        (["data.line_blur=[1,5]", "data.line_blur_weights=[1]"], "one weight >= 0 per"),
        (["data.line_blur=[]"], r"data.line_blur=\[\]: must be one or more blurs"),
        (["data=npz"], "data.path is required"),
        (["data=npz", "data.path=/no/such.npz"], r"^data.path=/no/such.npz: no such file$"),
        (["model.n=64", "data.n=128"], r"^data.n=128 but model.n=64: .* set model.n=128"),
        (
            ["translate=legacy", "compile=graph", "refine=positions", "refine.subpixel=bilinear"],
            "use refine.subpixel=fourier, translate=xla",
        ),
        (["distribute.cpu_devices=-1"], r"^distribute.cpu_devices=-1: must be >= 0$"),
        (["refine=full", "refine.probe_modes=0"], r"^refine.probe_modes=0: must be >= 1"),
        (["model.probe_modes=0"], r"^model.probe_modes=0: must be >= 1"),
        (["data.probe_modes=0"], r"^data.probe_modes=0: must be >= 1$"),
        (["data.coherence=0"], r"^data.coherence=0.0: must be in \(0, 1\]$"),
    ],
)
def test_each_rule_is_one_config_error_naming_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_train(compose_config(overrides=overrides))


def test_infer_needs_a_checkpoint_unless_it_refines(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint is required"):
        check_infer(compose_config("infer", ["data=grf"]))
    check_infer(compose_config("infer", ["data=grf", "refine=object"]))
    with pytest.raises(ConfigError, match="checkpoint=.*: no such file"):
        check_infer(compose_config("infer", [f"checkpoint={tmp_path}/none.keras", "data=grf"]))


def test_library_users_get_the_same_rules_from_the_classes_themselves():
    """The rule lives on the class: the solver and the builder refuse what the
    configuration would (one check per rule)."""
    with pytest.raises(ValueError, match=r"^iterations=0: must be >= 1$"):
        RefineOptions(mode="object", iterations=0).check()
    with pytest.raises(ValueError, match="n=100: must be 64, 128 or 256"):
        ModelConfig(n=100).check()
    with pytest.raises(ValueError, match="precision=fp8: must be one of auto, float32, bfloat16"):
        ModelConfig(precision="fp8").check()
    with pytest.raises(ValueError, match="loss=gauss: must be one of poisson, amplitude"):
        RefineOptions(loss="gauss").check()
    with pytest.raises(ValueError, match="nphotons=-1"):
        simulate(n=16, n_positions=4, nphotons=-1)


def test_renamed_keys_are_refused_with_their_new_name():
    assert renamed_key_hint(["debug=smoke", "infer_batch_size=8"]) == (
        "infer_batch_size is now reconstruct.batch_size: pass reconstruct.batch_size=..."
    )
    assert renamed_key_hint(["reconstruct.batch_size=8"]) is None
    for new in RENAMED.values():  # every new name exists in one of the schemas
        section, key = new.split(".")
        names = {f.name for f in dataclasses.fields(getattr(TrainConfig(), section))}
        assert key in names, new


def test_rollback_switches_apply_only_when_the_command_line_is_silent():
    env = {"USE_XLA_TRANSLATE": "0"}
    assert rollback_overrides([], env) == ["translate=legacy", "compile=graph"]
    assert rollback_overrides(["translate=xla"], env) == []
    assert rollback_overrides(["compile=eager"], env) == ["translate=legacy"]
    assert rollback_overrides([], {"USE_XLA_COMPILE": "0"}) == ["compile=graph"]
    assert rollback_overrides(["compile=jit"], {"USE_XLA_COMPILE": "0"}) == []
    assert rollback_overrides([], {"USE_XLA_TRANSLATE": "1"}) == []
    cfg = compose_config(overrides=rollback_overrides([], env))
    assert cfg.translate.backend == "legacy" and cfg.compile.mode == "graph"


def test_hydra_is_only_used_by_the_entry_points_and_the_glue():
    sources = {
        str(path.relative_to(ROOT / "ptycho")): path.read_text()
        for path in (ROOT / "ptycho").rglob("*.py")
    }
    users = {
        name for name, text in sources.items() if "import hydra" in text or "from hydra" in text
    }
    assert users <= {"config.py", "cli.py"}  # ConfigStore registration, the entry point
    readers = {name for name, text in sources.items() if "os.environ" in text}
    # HYDRA_FULL_ERROR for tracebacks; PTYCHO_VERBOSE and TF_CPP_MIN_LOG_LEVEL before
    # TensorFlow loads (the terminal's start-up notices); the cluster (TF_CONFIG, SLURM)
    # of a multi-worker run
    assert readers <= {"cli.py", "quiet.py", "__init__.py", "distribute.py"}
    assert hydra.__version__.startswith("1.")


def test_the_library_below_the_app_does_not_import_the_apps_configuration():
    """Sections are owned by the modules that use them: nothing below the app layer
    imports ptycho.config (the composition of sections) or the app."""
    app_layer = {"config.py", "cli.py", "app.py"}
    for path in (ROOT / "ptycho").rglob("*.py"):
        name = str(path.relative_to(ROOT / "ptycho"))
        if name in app_layer:
            continue
        text = path.read_text()
        for module in ("ptycho.config", "ptycho.app", "ptycho.cli"):
            assert f"from {module} import" not in text and f"import {module}" not in text, (
                name,
                module,
            )
