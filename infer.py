"""Reconstruct a scan with a trained model: ``python infer.py checkpoint=... data.path=...``.

Thin entry point: composes the configuration (conf/infer.yaml) and hands it to
``ptycho.app.infer``. ``USE_XLA_TRANSLATE=0`` / ``USE_XLA_COMPILE=0`` select the legacy
warp / no XLA when the command line does not choose.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

if "verbose=true" in sys.argv[1:]:  # before ptycho loads TensorFlow: show its notices too
    os.environ["PTYCHO_VERBOSE"] = "1"

from ptycho.cli import precheck, run_job  # noqa: E402
from ptycho.config import register_configs, rollback_overrides  # noqa: E402

CONF = Path(__file__).resolve().parent / "conf"
register_configs()
sys.argv += rollback_overrides(sys.argv[1:], os.environ)
precheck(CONF, "infer", sys.argv[1:])


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ptycho import app

    run_job(app.infer, cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
