"""Train PtychoPINN: ``python train.py [group=choice ...] [key=value ...]``.

Composes ``conf/train.yaml`` (every key: docs/configuration.md) and runs
:func:`ptycho.app.train` in a Hydra run folder (:func:`ptycho.cli.main`).
"""

from ptycho.cli import main

if __name__ == "__main__":
    main("train")
