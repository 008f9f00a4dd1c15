"""Entry point: `python main.py fit --config configs/quickstart.yaml`."""
from sae_lit.training.cli import cli_main

if __name__ == "__main__":
    cli_main()
