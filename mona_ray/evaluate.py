"""``python -m mona_ray.evaluate``: the selection-quality evaluation (``mona_ray/evaluation/evaluate.py``)."""

from .evaluation.evaluate import main

if __name__ == "__main__":
    main()
