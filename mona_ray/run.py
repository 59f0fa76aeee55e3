"""``python -m mona_ray.run``: the selection job (``mona_ray/pipeline/cli.py``)."""

from .pipeline.cli import main

if __name__ == "__main__":
    main()
