"""Train PtychoPINN: ``python train.py [group=choice ...] [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from ptycho import app


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    app.train(cfg)


if __name__ == "__main__":
    main()
