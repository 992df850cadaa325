"""The ``aotgrad`` command line (console script and ``python -m aotgrad``).

Only argument parsing, exit codes and output destinations live here; what
``explain`` computes and how it is rendered is in ``aotgrad.explain``.

Exit status: 0 when compiled outputs and gradients match eager, 1 when they
do not, 2 for a usage error (bad arguments, a target that cannot be loaded,
an unavailable partitioner), 3 when compiling or running the target fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Sequence

EPILOG = """\
examples:
  aotgrad explain                              the built-in transformer
  aotgrad explain mypkg.models:make            your factory: make() -> (model_or_fn, example_inputs)
  aotgrad explain path/to/file.py:make --graphs
  aotgrad explain --partitioner mincut --json report.json
  aotgrad explain --html report.html --budget-bytes 2000000

exit status: 0 matches eager, 1 mismatch, 2 usage error, 3 compile/run failure
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aotgrad", description="aotgrad: ahead-of-time autograd for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ex = sub.add_parser(
        "explain", help="compile a training step and report graphs, saved tensors, timings",
        description="Compile a training step (forward + loss + backward) with aotgrad, check "
                    "it against eager, and report graph sizes, the tensors saved for the "
                    "backward and the time spent in each pipeline stage.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("target", nargs="?", metavar="MODULE:FACTORY",
                    help="a factory returning (nn.Module or function, example_inputs); "
                         "default: the built-in small transformer")
    ex.add_argument("--partitioner", choices=("default", "mincut"), default="default",
                    help="how to split the joint graph (default: %(default)s)")
    ex.add_argument("--budget", type=float, metavar="B",
                    help="activation memory budget in [0, 1] (fraction of what min-cut "
                         "saves); implies --partitioner mincut")
    ex.add_argument("--policy", metavar="MODULE:NAME",
                    help="partition with this aotgrad.MemoryPolicy (or a function returning "
                         "one): save / recompute / offload by tag or op")
    ex.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH "
                    "('-' for stdout, replacing the text report)")
    ex.add_argument("--html", metavar="PATH",
                    help="also write one self-contained HTML page to PATH: the step's memory "
                         "timeline, the Pareto curve of a budget sweep, the plan table and "
                         "the graphs drawn")
    ex.add_argument("--budget-bytes", type=int, metavar="N",
                    help="a peak budget in bytes to show the step against (a line on the "
                         "page's timeline; it does not change the plan)")
    ex.add_argument("--pareto", metavar="B,B,...",
                    help="activation budgets to sweep with the min-cut partitioner, each "
                         "checked against eager and timed ('none' to skip; default with "
                         "--html: 1.0,0.7,0.5,0.3,0.1,0.0)")
    ex.add_argument("--graphs", action="store_true",
                    help="print the forward and backward graph code")
    ex.add_argument("--repeat", type=int, default=3, metavar="N",
                    help="warm steps to time, compiled and eager (0 to skip; default: 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "explain":
        parser.print_help()
        return 2
    return _explain(args)


def _explain(args: argparse.Namespace) -> int:
    from .explain import (PARETO_BUDGETS, ExplainError, explain, load_policy, load_target,
                          pareto_sweep, render, resolve_partitioner)

    def error(msg: str) -> None:
        print(f"aotgrad explain: error: {msg}", file=sys.stderr)

    if args.budget is not None:
        if not 0.0 <= args.budget <= 1.0:
            error(f"--budget must be in [0, 1], not {args.budget}")
            return 2
        args.partitioner = "mincut"
    if args.budget_bytes is not None and args.budget_bytes <= 0:
        error(f"--budget-bytes must be a positive number of bytes, not {args.budget_bytes}")
        return 2
    try:
        budgets = _pareto_budgets(args.pareto, PARETO_BUDGETS if args.html else ())
    except ValueError as e:
        error(str(e))
        return 2
    if args.html:
        problem = _unwritable(args.html)
        if problem:
            error(f"cannot write the HTML report to {args.html}: {problem}")
            return 2
    policy = None
    try:
        resolve_partitioner(args.partitioner)  # fail fast, before any work
        if args.policy is not None:
            policy = load_policy(args.policy)
        target = load_target(args.target)
    except ExplainError as e:
        error(str(e))
        return 2
    try:
        report = explain(target, partitioner=args.partitioner, repeat=max(args.repeat, 0),
                         budget=args.budget, policy=policy,
                         policy_name=f"policy {args.policy}", budget_bytes=args.budget_bytes)
        if budgets:
            report.pareto = pareto_sweep(target, report, budgets, repeat=max(args.repeat, 0))
    except ExplainError as e:
        error(str(e))
        return 2
    except Exception as e:  # the user's program or aotgrad failed: show where
        traceback.print_exc()
        error(f"compiling or running {target.name} failed: {type(e).__name__}: {e}")
        return 3
    status = 0 if report.ok and all(p.ok for p in report.pareto) else 1
    try:
        if args.json == "-":
            json.dump(report.to_json(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render(report, graphs=args.graphs))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report.to_json(), f, indent=2)
                print(f"\nreport written to {args.json}")
        if args.html:
            from .report_html import write_html

            write_html(report, args.html)
            if args.json != "-":
                print(f"HTML report written to {args.html}")
        sys.stdout.flush()
    except BrokenPipeError:  # `aotgrad explain | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError as e:
        error(f"cannot write the report: {e}")
        return 2
    return status


def _pareto_budgets(spec: str | None, default: tuple) -> tuple[float, ...]:
    if spec is None:
        return tuple(default)
    if spec.strip().lower() in ("", "none"):
        return ()
    try:
        budgets = tuple(float(b) for b in spec.split(","))
    except ValueError:
        raise ValueError(f"--pareto takes budgets in [0, 1] separated by commas, not {spec!r}")
    bad = [b for b in budgets if not 0.0 <= b <= 1.0]
    if bad:
        raise ValueError(f"--pareto budgets must be in [0, 1], not {bad[0]}")
    return budgets


def _unwritable(path: str) -> str:
    """Why ``path`` cannot be written ("" when it can), checked before any work."""
    if os.path.isdir(path):
        return "it is a directory"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"no such directory {folder}"
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return "permission denied"
    return ""


if __name__ == "__main__":
    sys.exit(main())
