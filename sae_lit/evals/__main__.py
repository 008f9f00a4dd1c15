"""python -m sae_lit.evals --sae DIR --config CFG (see sae_lit.evals.evaluate)."""
from sae_lit.evals.evaluate import main

if __name__ == "__main__":
    main()
