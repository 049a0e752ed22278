"""`petformers report --output_dir RUN`: write RUN/report.html and print its path."""

from __future__ import annotations

from petformers.report import write_report


def register(subparsers):
    p = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a run",
        description="Write RUN/report.html: config, data summary, loss curves, eval metrics before and after "
                    "fine-tuning, sample generations and artefacts. Missing pieces are shown as not available.")
    p.add_argument("--output_dir", required=True, help="the run's output directory (RUN)")
    p.set_defaults(func=run)


def run(args):
    print(write_report(args.output_dir))
    return 0
