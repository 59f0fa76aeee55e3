"""``python -m mona_ray.train_sae``: SAE training (``mona_ray/sae_training/train.py``)."""

from .sae_training.train import main

if __name__ == "__main__":
    main()
