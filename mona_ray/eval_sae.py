"""``python -m mona_ray.eval_sae``: SAE evaluation (``mona_ray/sae_training/evaluate.py``)."""

from .sae_training.evaluate import main

if __name__ == "__main__":
    main()
