"""Task data: the built-in `reviews` dataset, user CSV/JSONL files, deterministic splits, transfer texts.

Splits: the training rows are shuffled with `random.Random(config.split_seed)` (default seed 13); each
held-out split that has no file of its own takes the next 10% of the shuffled rows (at least one row), and
the rest is the training split. So with no validation/test file the split is 80/10/10, with one of them given
it is 90/10, with both given nothing is carved off (the training rows are still shuffled so that
`config.limit`, which keeps the first N training rows, takes a random sample, not the head of a file that may
be sorted by label). The built-in dataset is always split 80/10/10.

Every problem with the data is a `DataError` whose message names the file, the line (1-based, as an editor
counts; a CSV header is line 1) and what is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import atomic
from distill.config import DataConfig
from teachers.registry import distill_home

Progress = Callable[[str], None]

HELD_OUT_FRACTION = 0.1


class DataError(ValueError):
    """Unusable task data; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into TaskData.labels, or NO_LABEL


NO_LABEL = -1  # a text read without a label: causal LMs learn from texts alone


@dataclass
class TaskData:
    name: str
    labels: list[str]  # label names; index = class id
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    transfer: list[str]  # unlabeled texts for the teacher to label; may be empty
    repeats_left_out: int = 0  # training rows that were validation/test texts too, left out of training

    def summary(self) -> dict[str, Any]:
        """Rows and label counts per split, and the transfer count (goes into report.json)."""
        splits = {"train": self.train, "validation": self.validation, "test": self.test}
        return {
            "name": self.name,
            "labels": list(self.labels),
            "splits": {split: {"rows": len(examples), "label_counts": self._label_counts(examples)}
                       for split, examples in splits.items()},
            "transfer": len(self.transfer),
            "repeats_left_out": self.repeats_left_out,
        }

    def _label_counts(self, examples: list[Example]) -> dict[str, int]:
        counts = Counter(e.label for e in examples)
        return {name: counts[i] for i, name in enumerate(self.labels)}


# ----------------------------------------------------------------------------------------------------------
# Built-in datasets

@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    source: str
    license: str
    labels: tuple[str, ...]
    pull: Callable[[Path, Progress], None]  # (cache file to write, progress)

    def cache_path(self, home: Path) -> Path:
        return home / "datasets" / self.name / f"{self.name}.jsonl"


VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
VADER_SNIPPETS_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
# The paper's other snippet sets (Amazon reviews, NYT editorials, tweets): unlabelled transfer texts for `reviews`.
VADER_TRANSFER = tuple(f"hutto_ICWSM_2014/{name}_GroundTruth.txt"
                       for name in ("amazonReviewSnippets", "nytEditorialSnippets", "tweets"))
TRANSFER_FILE = "transfer.txt"


def pip_download_vader(dest: Path) -> Path:
    """Download the vaderSentiment 3.3.2 sdist into `dest` with pip (the only network access); return it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "vaderSentiment==3.3.2", "--dest", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise DataError(f"could not download vaderSentiment==3.3.2 from PyPI "
                        f"(pip exited {done.returncode}):\n{tail}")
    return dest / VADER_SDIST


def pull_reviews(dest: Path, progress: Progress,
                 download: Callable[[Path], Path] = pip_download_vader,
                 sdist_sha256: str = VADER_SDIST_SHA256,
                 snippets_sha256: str = VADER_SNIPPETS_SHA256) -> None:
    """Write the Rotten-Tomatoes snippets of the VADER paper (MIT) to `dest` as JSONL.

    Rows with score 0 are dropped; label is 'positive' for score > 0, else 'negative'.
    """
    with tempfile.TemporaryDirectory() as tmp:
        progress("downloading the vaderSentiment==3.3.2 sdist from PyPI")
        sdist = download(Path(tmp))
        data = sdist.read_bytes()
    _check_sha256(sdist.name, data, sdist_sha256)
    inner = _tar_member(sdist.name, data, VADER_INNER_TAR)
    raw = _tar_member(VADER_INNER_TAR, inner, VADER_SNIPPETS)
    _check_sha256(VADER_SNIPPETS, raw, snippets_sha256)

    # The sdist checksum pins these too. Written first: a present reviews.jsonl means the pull completed.
    transfer = [" ".join(line.split("\t", 2)[2].split())
                for member in VADER_TRANSFER
                for line in _tar_member(VADER_INNER_TAR, inner, member).decode("utf-8").splitlines() if line.strip()]
    _write_lines_atomic(dest.with_name(TRANSFER_FILE), transfer)

    rows = []
    # The checksum pins the content, so splitting on the file's CRLF line ends and tabs is safe.
    for line in raw.decode("utf-8").splitlines():
        id_, score_text, text = line.split("\t")
        score = float(score_text)
        if score == 0:  # neutral: no sentiment label
            continue
        label = "positive" if score > 0 else "negative"
        rows.append({"id": int(id_), "text": text.strip(), "label": label, "score": score})
    _write_lines_atomic(dest, [json.dumps(row, ensure_ascii=False) for row in rows])
    counts = Counter(r["label"] for r in rows)
    progress(f"wrote {len(rows)} reviews ({counts['positive']} positive, {counts['negative']} negative) "
             f"to {dest}, and {len(transfer)} unlabelled transfer texts")


def _check_sha256(name: str, data: bytes, expected: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataError(f"{name}: sha256 is {actual}, expected {expected}; "
                        f"the download is corrupt or was changed")


def _tar_member(archive: str, data: bytes, member: str) -> bytes:
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            extracted = tar.extractfile(member)
            if extracted is None:
                raise KeyError(member)
            return extracted.read()
    except (KeyError, tarfile.TarError) as e:
        raise DataError(f"{archive}: cannot read {member} from the archive ({e})") from None


def _write_lines_atomic(dest: Path, lines: list[str]) -> None:
    atomic.write_text(dest, "".join(line + "\n" for line in lines))


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "reviews": BuiltinDataset(
        name="reviews",
        description="10,568 Rotten-Tomatoes review snippets, positive/negative by human sentiment score",
        source=f"{VADER_SNIPPETS} in the vaderSentiment==3.3.2 sdist (Hutto & Gilbert, ICWSM 2014)",
        license="MIT",
        labels=("negative", "positive"),
        pull=pull_reviews,
    ),
}


def _builtin(name: str) -> BuiltinDataset:
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown dataset {name!r}; built-in datasets: {', '.join(BUILTIN_DATASETS)} "
                        f"(or 'files' to read your own train/validation/test files)")
    return BUILTIN_DATASETS[name]


def pull_dataset(name: str, progress: Progress | None = None, home: Path | None = None) -> Path:
    """Download a built-in dataset into `home`/datasets/<name>/ (default: distill_home()); return the file.

    A dataset already cached is left as it is (the cache is written atomically, so it is never half-written).
    """
    dataset = _builtin(name)
    dest = dataset.cache_path(home or distill_home())
    report = progress or (lambda _: None)
    if dest.exists():
        report(f"{name} is already cached at {dest}")
    else:
        dataset.pull(dest, report)
    return dest


# ----------------------------------------------------------------------------------------------------------
# Reading files

@dataclass(frozen=True)
class _Row:
    line: int
    text: str
    label: str


def _error(path: Path, line: int, problem: str) -> DataError:
    return DataError(f"{path}, line {line}: {problem}")


def _resolve_format(path: Path, format: str) -> str:
    if format != "auto":
        return format
    by_suffix = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
    if path.is_dir():
        raise DataError(f"{path}: a directory; give a CSV or JSONL file")
    if path.suffix.lower() not in by_suffix:
        raise DataError(f"{path}: cannot tell the format from the extension {path.suffix!r}; name the file "
                        f".csv, .jsonl or .json (a job's config may set data.format to 'csv' or 'jsonl' instead)")
    return by_suffix[path.suffix.lower()]


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _error(path, line, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start}); "
                                 f"save the file as UTF-8") from None
    return text.removeprefix("\ufeff")  # a BOM, as spreadsheet programs write it


def _records(path: Path, format: str, columns: list[str]) -> list[tuple[int, list[Any]]]:
    """(line, values of `columns`) per data row; None where a CSV row is short or a JSONL value is null."""
    text = _read_text(path)
    records: list[tuple[int, list[Any]]] = []
    if format == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        last = 0
        try:  # csv.Error: e.g. a field over csv's 131,072-character limit (a stray quote makes one of the rest)
            header = next(reader, None)
            if header is None:
                raise _error(path, 1, "the file is empty; a CSV needs a header row naming the columns")
            for column in columns:
                if column not in header:
                    found = ", ".join(map(repr, header))
                    raise _error(path, 1, f"no column {column!r}; the header has columns: {found}")
            where = [header.index(c) for c in columns]
            last = reader.line_num
            for values in reader:
                # A quoted field may span lines, so the record starts just after the previous one ended.
                start, last = last + 1, reader.line_num
                if any(value.strip() for value in values[len(header):]):
                    raise _error(path, start, f"{len(values)} fields, but the header names {len(header)}; quote a "
                                              f"field that holds a comma (\"good film, really\",positive)")
                if values:  # csv yields [] for a blank line
                    records.append((start, [values[i] if i < len(values) else None for i in where]))
        except csv.Error as e:
            hint = ("; an unclosed quote runs a field on into the rows after it, and texts really this long read "
                    "from JSONL, which has no such limit") if "field limit" in str(e) else ""
            raise _error(path, last + 1, f"not readable as CSV: {e}{hint}") from None
        if not records:
            raise _error(path, last, "no data rows after the header")
        return records

    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e.msg}); JSONL needs one JSON object per line"
            raise _error(path, number, problem) from None
        except (ValueError, RecursionError):  # Python's JSON reader refuses these valid ones
            raise _error(path, number, "not readable: a number with more than 4,300 digits, or values nested "
                                       "too deep") from None
        if not isinstance(obj, dict):  # a .json file of one array, say: JSON Lines is one object per line
            raise _error(path, number, f"expected a JSON object, got {type(obj).__name__}; JSONL (.jsonl or .json) "
                                       f"holds one object per line, not an array of them")
        for column in columns:
            if column not in obj:
                found = ", ".join(map(repr, obj))
                raise _error(path, number, f"no key {column!r}; the object has keys: {found}")
        for column in columns:
            _check_unicode(path, number, column, obj[column])
        records.append((number, [obj[c] for c in columns]))
    if not records:
        raise _error(path, 1, "no data rows; JSONL needs one JSON object per line")
    return records


def _check_unicode(path: Path, line: int, column: str, value: Any) -> None:
    """A JSON string may hold an unpaired surrogate escape ("\\ud800"), which no UTF-8 file, database or answer can
    carry: refused here, not a failure wherever the text is written next."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _error(path, line, f"{column!r} holds an unpaired UTF-16 surrogate ({value[e.start]!r} at "
                                     f"character {e.start}), which is not text") from None


def _text(path: Path, line: int, column: str, value: Any) -> str:
    if not isinstance(value, str):
        if value is None:
            raise _error(path, line, f"no text in column {column!r}")
        raise _error(path, line, f"text in {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _error(path, line, f"empty text in column {column!r}")
    return value


INTEGER = re.compile(r"[+-]?[0-9]+")
FRACTION = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?[0-9]+[eE][+-]?[0-9]+")


def _read_rows(path: Path, format: str, text_column: str, label_column: str) -> list[_Row]:
    if text_column == label_column:  # every text its own class
        raise DataError(f"{path}: the text and the label are both read from column {text_column!r}; "
                        f"label_column must name another column")
    rows, first_label = [], None
    for line, (text, label) in _records(path, _resolve_format(path, format), [text_column, label_column]):
        if isinstance(label, bool) or not isinstance(label, str | int | None):
            raise _error(path, line, f"label in {label_column!r} must be a string or an integer, "
                                     f"got {type(label).__name__} {label!r}")
        raw = "" if label is None else str(label).strip()
        if not raw:
            # A quote left open reads every row after it as one field: the text then spans lines, with no label.
            spans_lines = isinstance(text, str) and "\n" in text
            unclosed = " (the text runs over several lines: a quote left open?)" if spans_lines else ""
            raise _error(path, line, f"missing label in column {label_column!r}{unclosed}")
        if FRACTION.fullmatch(raw):  # a CSV's numbers are strings: a score column would become a class per value
            raise _error(path, line, f"label {raw!r} in {label_column!r} is a number with a fraction; classes are "
                                     f"strings or integers (0/1, not 0.0/1.0; a continuous score is not classes)")
        if INTEGER.fullmatch(raw):  # one class however written: a CSV's 1, 01 and +1 were three
            raw = str(int(raw))
        first_label = first_label or (line, raw)
        if _kind(raw) != _kind(first_label[1]):  # 0/1 beside neg/pos made four classes
            raise _error(path, line, f"label {raw!r} in {label_column!r} is {_kind(raw)}, but line "
                                     f"{first_label[0]}'s ({first_label[1]!r}) is {_kind(first_label[1])}; give "
                                     f"every label as the same kind")
        rows.append(_Row(line, _text(path, line, text_column, text), raw))
    return rows


def read_labeled_file(path: Path, format: str, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """(text, raw label string) per row of a CSV (header row required) or JSONL file.

    format 'auto' goes by the extension: .csv, .jsonl or .json.
    """
    return [(r.text, r.label) for r in _read_rows(path, format, text_column, label_column)]


def read_texts(path: Path, format: str, text_column: str) -> list[str]:
    """Unlabeled texts: a .txt file is one text per line (blank lines skipped); otherwise the text column of a
    CSV/JSONL file, `format` as for read_labeled_file (a blank text there is an error)."""
    if path.suffix.lower() == ".txt":
        texts = [line.rstrip("\r") for line in _read_text(path).split("\n") if line.strip()]
        if not texts:
            raise _error(path, 1, "no texts; the file is empty or blank")
        return texts
    return [_text(path, line, text_column, values[0])
            for line, values in _records(path, _resolve_format(path, format), [text_column])]


def _kind(label: str) -> str:
    return "an integer" if INTEGER.fullmatch(label) else "a name"


def _sorted_labels(raw: set[str]) -> list[str]:
    if all(INTEGER.fullmatch(s) for s in raw):
        return sorted(raw, key=int)  # "2" before "10"
    return sorted(raw)


def _examples(path: Path, rows: list[_Row], labels: list[str], known_from: str) -> list[Example]:
    index = {name: i for i, name in enumerate(labels)}
    for row in rows:
        if row.label not in index:
            raise _error(path, row.line, f"label {row.label!r} never occurs in {known_from}; "
                                         f"known labels: {', '.join(labels)}")
    return [Example(r.text, index[r.label]) for r in rows]


# ----------------------------------------------------------------------------------------------------------
# Splits and loading

def _split(examples: list[Example], seed: int, carve_validation: bool, carve_test: bool,
           ) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, test): shuffle, then each carved split takes the next 10% (at least one row)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    size = max(1, int(len(examples) * HELD_OUT_FRACTION))
    validation = shuffled[:size] if carve_validation else []
    test = shuffled[len(validation):len(validation) + size] if carve_test else []
    return shuffled[len(validation) + len(test):], validation, test


def _load_files(config: DataConfig, labelled: bool) -> TaskData:
    assert config.train is not None  # DataConfig requires it for dataset 'files'
    train_path = config.train
    labels: list[str] = []
    if labelled:
        columns = (config.format, config.text_column, config.label_column)
        rows = _read_rows(train_path, *columns)
        raw_labels = {r.label for r in rows}
        if len(raw_labels) < 2:
            raise DataError(f"{train_path}: all {len(rows)} rows (lines {rows[0].line}-{rows[-1].line}) have "
                            f"label {rows[0].label!r}; distillation needs at least 2 classes")
        labels = _sorted_labels(raw_labels)
        known_from = f"the training file {train_path}"

        def read(path: Path) -> list[Example]:
            return _examples(path, _read_rows(path, *columns), labels, known_from)
    else:
        def read(path: Path) -> list[Example]:
            return [Example(text, NO_LABEL) for text in read_texts(path, config.format, config.text_column)]

    files = {"validation": config.validation, "test": config.test}
    validation, test = files.values()
    if validation is not None and test is not None and validation.resolve() == test.resolve():
        raise DataError(f"{config.test}: data.validation and data.test name the same file, so the best epoch would be "
                        f"chosen on the test texts and their accuracy be optimistic; give a test file of other texts, "
                        f"or leave data.test out (it is then carved from the training file)")
    given = {split: read(path) for split, path in files.items() if path is not None}
    examples = read(train_path)
    train, validation, test = _split(examples, config.split_seed, "validation" not in given, "test" not in given)
    if len(train) < 2:
        carved = [split for split in files if split not in given]
        raise DataError(f"{train_path}: only {len(examples)} rows; at least {2 + len(carved)} are needed: 2 to train "
                        f"on" + (f", and one for each split carved from them ({', '.join(carved)})" if carved else ""))
    return TaskData(name=train_path.name, labels=labels, train=train,
                    validation=given.get("validation", validation), test=given.get("test", test), transfer=[])


def check_builtin_keys(config: DataConfig) -> None:
    """DataError for a key a built-in dataset would silently ignore: its columns are its own; data.text_column and
    data.format are read from a transfer file only. Checked when a job starts afresh (a config saved before the
    check still loads its data: a resumed job, a comparison on a job's data)."""
    dataset = _builtin(config.dataset)
    reads_transfer_file = config.transfer not in (None, "builtin")
    ignored = {"label_column": "label"} | ({} if reads_transfer_file else {"text_column": "text", "format": "auto"})
    for key, default in ignored.items():
        if (value := getattr(config, key)) != default:
            files = "data.train files" if key == "label_column" else "data.train and data.transfer files"
            raise DataError(f"data.{key}: {value!r}, but the built-in dataset {dataset.name!r} has its own columns "
                            f"and {key} applies to {files} only; remove the key (or set it to {default!r})")


def _load_builtin(config: DataConfig) -> TaskData:
    dataset = _builtin(config.dataset)
    path = dataset.cache_path(distill_home())
    if not path.exists():
        raise DataError(f"dataset {dataset.name!r} is not downloaded yet ({path} is missing): "
                        f"run `distill datasets pull {dataset.name}`")
    labels = list(dataset.labels)
    rows = _read_rows(path, "jsonl", "text", "label")
    examples = _examples(path, rows, labels, f"dataset {dataset.name!r}")
    train, validation, test = _split(examples, config.split_seed, True, True)
    return TaskData(name=dataset.name, labels=labels, train=train, validation=validation, test=test,
                    transfer=[])


def load_task_data(config: DataConfig, *, labelled: bool = True) -> TaskData:
    """Labeled splits and transfer texts for a job; see the module docstring for the split scheme. `labelled=False`
    (causal LMs) reads files for their texts alone: a .txt file one text per line, CSV/JSONL their text column."""
    for key in ("train", "validation", "test", "transfer"):
        if isinstance(path := getattr(config, key), Path) and not path.exists():
            raise DataError(f"data.{key}: {path} does not exist")
    data = _load_files(config, labelled) if config.dataset == "files" else _load_builtin(config)
    # A text the job is scored on is never trained on: its copies leave the training rows (a file with repeated
    # rows would otherwise put one copy in train and one in test), the transfer texts and the perturbed copies.
    held_out = {_words(e.text) for e in data.validation + data.test}
    train = [e for e in data.train if _words(e.text) not in held_out]
    if not train:
        raise DataError(f"{data.name}: every training row is also a validation/test text; add rows, or give "
                        f"validation/test files that do not repeat the training texts")
    data.train, data.repeats_left_out = train, len(data.train) - len(train)
    if config.limit is not None:
        data.train = data.train[:config.limit]  # already shuffled: a random sample, the same per seed
    # A file's classes were checked as it was read; the rows left after the held-out texts and the limit may have
    # one (a built-in dataset has thousands of each, but not under a small limit).
    trained_classes = {e.label for e in data.train}
    if data.labels and len(trained_classes) < 2 and (config.dataset == "files" or config.limit is not None):
        kept = "" if config.limit is None else f" and keeping the first {config.limit} (data.limit)"
        raise DataError(f"{data.name}: the {len(data.train)} training rows left after removing validation/test "
                        f"texts{kept} all have label {data.labels[trained_classes.pop()]!r}; distillation needs at "
                        f"least 2 classes to train on: add training rows of the others, or validation/test files "
                        f"that do not repeat them")
    if config.transfer == "builtin":
        path = _builtin(config.dataset).cache_path(distill_home()).with_name(TRANSFER_FILE)
        if not path.exists():  # a cache pulled before the transfer texts existed
            raise DataError(f"{path} is missing: delete {path.parent} and run `distill datasets pull "
                            f"{config.dataset}` again")
        data.transfer = read_texts(path, "auto", "text")
    elif config.transfer is not None:
        data.transfer = read_texts(config.transfer, config.format, config.text_column)
    if config.augment:
        data.transfer += augment([e.text for e in data.train], config.augment, seed=config.split_seed)
    data.transfer = [text for text in data.transfer if _words(text) not in held_out]
    return data


def _words(text: str) -> str:
    """The text as the tokenizers see it: its words, whitespace aside."""
    return " ".join(text.split())


def augment(texts: list[str], copies: int, seed: int) -> list[str]:
    """Up to `copies` perturbed variants of each text, for the teacher to label: more of the teacher's function for
    the student to match, from the task's own distribution (Tang et al. 2019, "Distilling task-specific knowledge
    from BERT into simple neural networks", §3.1: masking and n-gram sampling). A variant is, with probability 1/2,
    a random span of at least 3 of the text's words; then each word is dropped with probability 0.1. Empty variants
    and copies of the original are skipped."""
    rng = random.Random(seed)
    variants = []
    for text in texts:
        words = text.split()
        for _ in range(copies):
            kept = words
            if len(kept) > 3 and rng.random() < 0.5:
                length = rng.randint(3, len(kept) - 1)
                start = rng.randint(0, len(kept) - length)
                kept = kept[start:start + length]
            variant = " ".join(word for word in kept if rng.random() >= 0.1)
            if variant and variant != _words(text):
                variants.append(variant)
    return variants
