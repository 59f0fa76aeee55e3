"""Selection-quality evaluation on a labelled pool: data loading, metrics, plots, report.
The command line is ``python -m mona_ray.evaluate`` (``mona_ray/evaluate.py``)."""
