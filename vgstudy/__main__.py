"""`python -m vgstudy run | sweep | report | params | predict`: the study runner and single-image prediction.

The commands are thin: `vgstudy.study` runs, sweeps and reports notebooks, `vgstudy.predict` predicts.

    python -m vgstudy run 00 -p seed=1 -f notebooks/params/00_task_and_data-study.yaml --out runs
    python -m vgstudy sweep sweep.yaml --shard 0/4 --jobs 2 --gpus 8
    python -m vgstudy report runs/00_task_and_data --by n_eval
    python -m vgstudy params 00
    python -m vgstudy predict --checkpoint runs/01_transvg/p-1234 --image photo.jpg --text "the left dog" --out box.png

Bad parameters stop a command before anything runs, with one message listing every problem (exit code 2); a failed
run exits with 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vgstudy import study
from vgstudy.errors import ConfigError, VGStudyError


def _pairs(texts: list[str]) -> dict[str, str]:
    """`key=value` arguments as a dict of strings (the schema coerces them)."""
    pairs = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-p {text!r}: expected key=value")
        pairs[key.strip()] = value
    return pairs


def _given_values(notebook: study.Notebook, args: argparse.Namespace) -> dict[str, object]:
    """-f files in order, then -p pairs, then --out / --run-id; later wins. Paths resolved where they were written."""
    given: dict[str, object] = {}
    for file in args.file:
        values = study.read_parameter_file(file)
        given |= study.absolute_paths(notebook.schema, values, Path(file).resolve().parent)
    command_line = _pairs(args.param)
    if args.out is not None:
        command_line["out_dir"] = args.out
    if args.run_id is not None:
        command_line["run_id"] = args.run_id
    return given | study.absolute_paths(notebook.schema, command_line, Path.cwd())


def _run(args: argparse.Namespace) -> int:
    notebook = study.find_notebook(args.notebook)
    run = study.plan_run(notebook, _given_values(notebook, args))
    print(f"running {notebook.name} into {run.run_dir}", file=sys.stderr, flush=True)
    record = study.execute(run, args.kernel)
    if record["status"] != "done":
        print(f"failed after {record['seconds']} s: {record['error']}", file=sys.stderr)
    print(run.run_dir)
    return 0 if record["status"] == "done" else 1


def _sweep(args: argparse.Namespace) -> int:
    sweep = study.load_sweep(args.sweep)
    overrides = study.absolute_paths(sweep.notebook.schema, {"out_dir": args.out}, Path.cwd()) if args.out else {}
    runs = study.plan_sweep(sweep, overrides)
    index, count = study.parse_shard(args.shard)
    mine = runs[index::count]
    print(f"shard {index}/{count}: {len(mine)} of the sweep's {len(runs)} runs", file=sys.stderr)
    outcome = study.run_sweep(mine, resume=args.resume, jobs=args.jobs, gpus=args.gpus, kernel=args.kernel)
    for run_dir, status in outcome.items():
        print(f"{status:8s} {run_dir}")
    return 1 if "failed" in outcome.values() else 0


def _report(args: argparse.Namespace) -> int:
    runs, unfinished = study.collect(args.runs)
    if unfinished:
        print(f"left out {len(unfinished)} run(s) that did not finish, e.g. {unfinished[0]}", file=sys.stderr)
    if not runs:
        raise ConfigError(f"report: no finished runs under {', '.join(args.runs)}")
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by is not None else None
    tables = study.summarise(runs, by)
    written = study.write_report(tables, args.out or args.runs[0])
    print(study.report_markdown(tables))
    print("written: " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


def _params(args: argparse.Namespace) -> int:
    if args.notebook is not None:
        notebooks = [study.find_notebook(args.notebook)]
    else:
        notebooks = [study.load_notebook(path) for path in study.project_notebooks()]
    text = study.parameters_markdown(notebooks)
    if args.readme is None:
        print(text, end="")
    elif args.notebook is not None:
        raise ConfigError("params --readme writes every notebook's table: give no NOTEBOOK with it")
    else:
        changed = study.update_readme(args.readme, text)
        print(f"{args.readme}: {'updated' if changed else 'already up to date'}", file=sys.stderr)
    return 0


def _site(args: argparse.Namespace) -> int:
    from vgstudy.site import build_site  # local import: only this command needs nbconvert

    pages = build_site(args.notebooks, args.out)
    for page in pages:
        print(f"{page.file}: {page.title} ({page.figures} figures)")
    print(f"written: {Path(args.out) / 'index.html'}", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from vgstudy.predict import load_predictor, read_image  # local import: only this command needs the models

    image = read_image(args.image)  # a bad image fails before the model is built
    predictor = load_predictor(args.checkpoint, model=args.model, device=args.device)
    prediction = predictor.predict(image, args.text)
    print(" ".join(f"{value:.2f}" for value in prediction.box_xyxy))
    if args.out is not None:
        print(f"written: {prediction.overlay(args.out)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m vgstudy`."""
    parser = argparse.ArgumentParser(prog="python -m vgstudy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="execute one notebook into its run folder (always: a finished run there is redone)"
    )
    run.add_argument("notebook", help="a name (00_task_and_data), a prefix (00) or a path")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a parameter (repeatable)")
    run.add_argument(
        "-f", "--file", action="append", default=[], metavar="PARAMS.yaml", help="YAML file of parameters (repeatable)"
    )
    run.add_argument("--out", help="out_dir: runs go into OUT/<notebook>/<run id>/")
    run.add_argument("--run-id", help="the run folder's name (default: p-<hash of the parameters>)")
    run.add_argument("--kernel", help="Jupyter kernel (default: the notebook's)")
    run.set_defaults(handler=_run)

    sweep = commands.add_parser("sweep", help="execute every point of a parameter grid, skipping finished runs")
    sweep.add_argument("sweep", help="the sweep file (notebook, parameters, grid)")
    sweep.add_argument("--shard", help="i/n: run every n-th grid point from i (default: from a Slurm job array)")
    sweep.add_argument("--resume", action="store_true", help="also rerun failed, killed or unfinished runs")
    sweep.add_argument("--jobs", type=int, default=1, help="runs executed at once, each in its own process")
    sweep.add_argument("--gpus", type=int, help="GPUs on this machine, shared among the jobs via CUDA_VISIBLE_DEVICES")
    sweep.add_argument("--out", help="out_dir for every run (overrides the sweep file)")
    sweep.add_argument("--kernel", help="Jupyter kernel (default: the notebook's)")
    sweep.set_defaults(handler=_sweep)

    report = commands.add_parser("report", help="tables of the finished runs' metrics: mean, std, n per group")
    report.add_argument("runs", nargs="+", help="folders searched for finished runs")
    report.add_argument("--out", help="where report.md, report.html and report.csv go (default: the first folder)")
    report.add_argument("--by", help="key,key: the parameters that make a group (default: those that vary, but seed)")
    report.set_defaults(handler=_report)

    params = commands.add_parser("params", help="the notebooks' parameters as Markdown tables")
    params.add_argument("notebook", nargs="?", help="one notebook (default: all)")
    params.add_argument("--readme", help="write the tables between the markers of this README instead of printing")
    params.set_defaults(handler=_params)

    site = commands.add_parser("site", help="the executed notebooks as a static HTML site, readable offline")
    site.add_argument(
        "--notebooks", default="notebooks", help="folder of the executed NN_name.ipynb (default: notebooks)"
    )
    site.add_argument("--out", default="runs/site", help="where index.html and the pages go (default: runs/site)")
    site.set_defaults(handler=_site)

    predict = commands.add_parser(
        "predict", help="the box an expression refers to in one image: prints x1 y1 x2 y2 (pixels of the image)"
    )
    predict.add_argument(
        "--checkpoint", required=True, help="a run folder, a checkpoint folder (checkpoints/step-N) or a .safetensors"
    )
    predict.add_argument("--model", help="registered model name (default: the run's model.json card)")
    predict.add_argument("--image", required=True, help="the image file (JPEG, PNG, ...)")
    predict.add_argument("--text", required=True, help="the referring expression")
    predict.add_argument("--out", help="also write the image with the box drawn, as a PNG")
    predict.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    predict.set_defaults(handler=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; the exit code: 0 fine, 1 a run failed, 2 bad input (the message says what to fix)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except VGStudyError as e:
        print(f"vgstudy {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
