"""`python -m lightning_ppo fit --config configs/tiny.yaml` (see `--help`)."""

from lightning_ppo.cli import run

if __name__ == "__main__":
    run()
