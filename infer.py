"""Reconstruct a scan: ``python infer.py checkpoint=<model.keras> data.path=<scan>``.

Composes ``conf/infer.yaml`` (every key: docs/configuration.md) and runs
:func:`ptycho.app.infer` in a Hydra run folder (:func:`ptycho.cli.main`).
"""

from ptycho.cli import main

if __name__ == "__main__":
    main("infer")
