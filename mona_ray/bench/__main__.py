"""``python -m mona_ray.bench {score,embed,gpu,pipeline,width,less} [flags]``: print a table, write JSON."""

from __future__ import annotations

import argparse
import sys

from .common import DEFAULT_OUT_DIR, BenchError, write_report

SUBCOMMANDS = {
    "score": ("mona_ray.bench.score", "Jaccard scoring + top-k at 10k/100k/1M synthetic sparse rows"),
    "embed": ("mona_ray.bench.embed", "pipeline tokens/s vs the bare truncated forward, and vs the naive approach"),
    "gpu": ("mona_ray.bench.gpu", "the embedding actor's inner loop on a Llama-3-8B-shaped model: tokens/s and MFU"),
    "pipeline": ("mona_ray.bench.pipeline", "the real job end to end on N OpenHermes-shaped rows (tiny model, real tokenizer)"),
    "width": ("mona_ray.bench.width", "the paper's SAE width (131,072 x K=192): row density, store encodings, "
                                      "store/score/explain cost, row-by-row vs batched encode"),
    "less": ("mona_ray.bench.less", "LESS's gradient features per row (warm-up, gradient, projection) against the "
                                    "embedding pass on the same rows"),
}


def parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="python -m mona_ray.bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(sp)
        sp.add_argument("--out", default=None, help=f"JSON report path (default: {DEFAULT_OUT_DIR}/{name}.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.cmd is None:
        parser().print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.cmd][0])
    try:
        report, text = module.run(args)
    except BenchError as e:
        print(f"bench {args.cmd}: {e}", file=sys.stderr)
        return 2
    path = write_report(args.cmd, report, args.out, argv)
    print(text)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
