"""Entry point: `python main.py fit --config configs/quickstart.yaml`."""
from sae_lit.training.cli import main

if __name__ == "__main__":
    main()
