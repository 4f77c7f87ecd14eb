import csv
import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from distill.config import DataConfig, FromTeacher, JobConfig, TeacherConfig
from distill.data import (
    BUILTIN_DATASETS,
    NO_LABEL,
    DataError,
    Example,
    augment,
    check_builtin_keys,
    load_task_data,
    pull_dataset,
    pull_reviews,
    read_labeled_file,
    read_texts,
)
from distill.pipeline import start_job


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("text", "label")) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([list(header), *rows])
    return path


def write_jsonl(path: Path, objects: list[dict]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return path


def files(**kwargs) -> DataConfig:
    return DataConfig(dataset="files", **kwargs)


def test_csv_with_string_labels_splits_80_10_10(tmp_path):
    rows = [[f"review number {i}", ["pos", "neg", "meh"][i % 3]] for i in range(30)]
    data = load_task_data(files(train=write_csv(tmp_path / "train.csv", rows)))
    assert data.labels == ["meh", "neg", "pos"]
    assert (len(data.train), len(data.validation), len(data.test)) == (24, 3, 3)
    every = data.train + data.validation + data.test
    assert sorted(e.text for e in every) == sorted(r[0] for r in rows)
    assert all(data.labels[e.label] == rows[int(e.text.split()[-1])][1] for e in every)
    assert data.name == "train.csv" and data.transfer == []


def test_training_rows_that_repeat_held_out_texts_are_counted_and_one_file_is_not_both_held_out_splits(tmp_path):
    rows = [[f"review number {i}", ["pos", "neg"][i % 2]] for i in range(20)]
    train = write_csv(tmp_path / "train.csv", rows)
    held_out = write_csv(tmp_path / "held_out.csv", rows[:3])
    data = load_task_data(files(train=train, validation=held_out))
    assert data.repeats_left_out == 3 and data.summary()["repeats_left_out"] == 3
    assert load_task_data(files(train=train)).repeats_left_out == 0
    with pytest.raises(DataError, match=r"held_out.csv: data.validation and data.test name the same file, so the best "
                                        r"epoch would be chosen on the test texts"):
        load_task_data(files(train=train, validation=held_out, test=tmp_path / "." / "held_out.csv"))


def test_empty_fields_past_the_header_are_nothing(tmp_path):
    """A spreadsheet's export may end rows with commas; a field with something in it is refused (BAD_FILES)."""
    rows = [[f"review number {i}", ["pos", "neg"][i % 2], *[""] * (i % 3)] for i in range(20)]
    data = load_task_data(files(train=write_csv(tmp_path / "train.csv", rows)))
    assert data.labels == ["neg", "pos"] and len(data.train + data.validation + data.test) == 20


def test_an_integer_label_is_one_class_however_written(tmp_path):
    rows = [[f"review number {i}", ["1", "01", "+1", "0", "-0", "00"][i % 6]] for i in range(30)]
    data = load_task_data(files(train=write_csv(tmp_path / "train.csv", rows)))
    assert data.labels == ["0", "1"]


def test_jsonl_int_labels_sort_numerically_and_given_splits_are_kept(tmp_path):
    labels = [2, 10, 1]
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": labels[i % 3]}
                                                  for i in range(12)])
    validation = write_jsonl(tmp_path / "val.jsonl", [{"text": "v", "label": 10},
                                                      {"text": "w", "label": "2"}])
    test = write_jsonl(tmp_path / "test.json", [{"text": "x", "label": 1}])
    data = load_task_data(files(train=train, validation=validation, test=test))
    assert data.labels == ["1", "2", "10"]
    assert len(data.train) == 12  # nothing carved off
    assert data.validation == [Example("v", 2), Example("w", 1)]
    assert data.test == [Example("x", 0)]


def test_texts_alone_for_causal_lms_from_txt_and_unlabelled_jsonl(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line number {i}\n\n" for i in range(20)), encoding="utf-8")  # blank lines skipped
    data = load_task_data(files(train=corpus), labelled=False)
    assert (len(data.train), len(data.validation), len(data.test)) == (16, 2, 2) and data.labels == []
    every = data.train + data.validation + data.test
    assert sorted(e.text for e in every) == sorted(f"line number {i}" for i in range(20))
    assert {e.label for e in every} == {NO_LABEL}
    assert data.summary()["splits"]["train"] == {"rows": 16, "label_counts": {}}
    unlabelled = write_jsonl(tmp_path / "corpus.jsonl", [{"body": f"t{i}"} for i in range(10)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"body": "x"}])
    data = load_task_data(files(train=unlabelled, test=test, text_column="body"), labelled=False)
    assert (len(data.train), len(data.validation), data.test) == (9, 1, [Example("x", NO_LABEL)])
    with pytest.raises(DataError, match="corpus.jsonl, line 1: no key 'label'"):  # a classifier still needs them
        load_task_data(files(train=unlabelled, text_column="body"))


def test_only_test_given_splits_train_90_10(tmp_path):
    train = write_csv(tmp_path / "train.csv", [[f"t{i}", str(i % 2)] for i in range(40)])
    test = write_csv(tmp_path / "test.csv", [["x", "1"]])
    data = load_task_data(files(train=train, test=test))
    assert (len(data.train), len(data.validation), len(data.test)) == (36, 4, 1)


def test_too_few_rows_to_split_says_how_many_are_needed(tmp_path):
    three = write_csv(tmp_path / "three.csv", [["a", "0"], ["b", "1"], ["c", "0"]])
    with pytest.raises(DataError, match=r"three.csv: only 3 rows; at least 4 are needed: 2 to train on, and one for "
                                        r"each split carved from them \(validation, test\)$"):
        load_task_data(files(train=three))
    test = write_csv(tmp_path / "test.csv", [["x", "1"]])
    assert len(load_task_data(files(train=three, test=test)).train) == 2  # validation alone is carved


def test_split_is_deterministic_per_seed_and_limit_caps_train_only(tmp_path):
    train = write_csv(tmp_path / "train.csv", [[f"t{i}", str(i % 2)] for i in range(100)])
    a, b = load_task_data(files(train=train)), load_task_data(files(train=train))
    c = load_task_data(files(train=train, split_seed=14))
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    assert a.validation != c.validation
    limited = load_task_data(files(train=train, limit=10))
    assert limited.train == a.train[:10]
    assert (limited.validation, limited.test) == (a.validation, a.test)


def test_summary_counts_rows_and_labels(tmp_path):
    train = write_csv(tmp_path / "train.csv", [[f"t{i}", "ab"[i % 2]] for i in range(20)])
    transfer = tmp_path / "more.txt"
    transfer.write_text("one\ntwo\n", encoding="utf-8")
    summary = load_task_data(files(train=train, transfer=transfer)).summary()
    assert summary["labels"] == ["a", "b"] and summary["transfer"] == 2
    assert {s: v["rows"] for s, v in summary["splits"].items()} == {"train": 16, "validation": 2, "test": 2}
    assert sum(sum(v["label_counts"].values()) for v in summary["splits"].values()) == 20
    json.dumps(summary)  # goes into report.json


def test_bom_and_multiline_csv_field(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b'\xef\xbb\xbftext,label\n"two\nlines",a\n"",b\n')
    with pytest.raises(DataError, match=r"train\.csv, line 4: empty text"):  # lines counted past the quoted one
        read_labeled_file(path, "auto", "text", "label")
    path.write_bytes(b'\xef\xbb\xbftext,label\n"two\nlines",a\nthree,b\n')  # the BOM is not in the header
    assert read_labeled_file(path, "auto", "text", "label") == [("two\nlines", "a"), ("three", "b")]


BAD_FILES = [
    # (file name, content, substrings the message must contain)
    ("bad.csv", b"text,label\ngood,a\nbad \xff byte,b\n", ["line 3", "not valid UTF-8"]),
    ("bad.csv", b"text,sentiment\ngood,a\n", ["line 1", "no column 'label'", "'text', 'sentiment'"]),
    ("bad.jsonl", b'{"text": "a", "label": 1}\n{"text": "b"}\n', ["line 2", "no key 'label'", "'text'"]),
    ("bad.jsonl", b'{"text": "a", "label": 1}\n[1, 2]\n', ["line 2", "expected a JSON object, got list"]),
    ("bad.jsonl", b'{"text": "a", "label": 1}\n\n{"text": oops}\n', ["line 3", "not valid JSON"]),
    ("bad.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": ' + b"1" * 5000 + b"}\n",
     ["line 2", "more than 4,300 digits"]),
    ("bad.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     ["line 2", "nested too deep"]),
    ("bad.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": "\\ud800"}\n',
     ["line 2", "'label' holds an unpaired UTF-16 surrogate ('\\ud800' at character 0)"]),
    ("bad.jsonl", b'{"text": "fine \\ud83d\\ude00 \\udc00", "label": 1}\n',  # a pair is an emoji, then a lone one
     ["line 1", "'text' holds an unpaired UTF-16 surrogate ('\\udc00' at character 7)"]),
    ("bad.csv", b"text,label\ngood,a\n  ,b\n", ["line 3", "empty text"]),
    ("bad.csv", b"text,label\ngood,a\nfine,b\nno label,\n", ["line 4", "missing label"]),
    ("bad.csv", b"text,label\ngood,a\nshort row\n", ["line 3", "missing label"]),
    # A score column read as classes: one per value (a CSV's 0.005 ... 1.0 made 188).
    ("bad.csv", b"text,label\ngood,1\nbad,0.0\n", ["line 3", "label '0.0' in 'label' is a number with a fraction"]),
    # JSONL's 0/1 and "neg"/"pos" were four classes.
    ("bad.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label": "neg"}\n',
     ["line 2", "label 'neg' in 'label' is a name, but line 1's ('0') is an integer; give every label as the same "
                "kind"]),
    # Its label was `really good` (a class of its own) and `positive` was dropped.
    ("bad.csv", b"text,label\ngood,a\ngood film, really good,positive\n",
     ["line 3", "3 fields, but the header names 2; quote a field that holds a comma"]),
    ("bad.jsonl", b'{"text": "a", "label": null}\n', ["line 1", "missing label"]),
    ("bad.csv", b'text,label\ngood,a\n"an open quote,b\nfine,a\n', ["line 3", "missing label in column 'label' (the "
                                                                    "text runs over several lines: a quote left "
                                                                    "open?)"]),
    ("bad.json", b'[{"text": "a", "label": 1}]\n', ["line 1", "expected a JSON object, got list; JSONL (.jsonl or "
                                                    ".json) holds one object per line, not an array of them"]),
    ("bad.jsonl", b'{"text": "a", "label": 0.5}\n', ["line 1", "string or an integer"]),
    ("bad.csv", b"", ["line 1", "empty"]),
    ("bad.csv", b"text,label\n", ["line 1", "no data rows"]),
    ("bad.jsonl", b"\n\n", ["line 1", "no data rows"]),
    ("bad.csv", b"text,label\na,same\nb,same\nc,same\n", ["lines 2-4", "'same'", "at least 2 classes"]),
    ("bad.csv", b"text,label\ngood,a\n" + b"x" * 131_073 + b",b\n", ["line 3", "not readable as CSV",
                                                                  "field larger than field limit (131072); an "
                                                                  "unclosed quote runs a field on", "from JSONL"]),
    ("bad.csv", b'"text,label\ngood,a\n' + b"x" * 131_073 + b"\n", ["line 1", "not readable as CSV"]),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_FILES)
def test_bad_training_file_names_file_line_and_problem(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        load_task_data(files(train=path))
    message = str(error.value)
    assert message.startswith(str(path))
    for part in expected:
        assert part in message


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=rf"^data\.train: {tmp_path}/nope\.csv does not exist$"):
        load_task_data(files(train=tmp_path / "nope.csv"))
    (tmp_path / "train.tsv").write_text("text\tlabel\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^data\.transfer: .*/more\.txt does not exist$"):  # before the others are read
        load_task_data(files(train=tmp_path / "train.tsv", transfer=tmp_path / "more.txt"))
    with pytest.raises(DataError, match=r"train\.tsv: .*\.csv, \.jsonl or \.json \(a job's config may set "):
        load_task_data(files(train=tmp_path / "train.tsv"))
    with pytest.raises(DataError, match=r"texts: a directory; give a CSV or JSONL file"):
        read_texts((tmp_path / "texts").mkdir() or tmp_path / "texts", "auto", "text")


def test_label_missing_from_training_names_line_and_known_labels(tmp_path):
    train = write_csv(tmp_path / "train.csv", [["a", "neg"], ["b", "pos"], ["c", "neg"]])
    validation = write_csv(tmp_path / "val.csv", [["d", "pos"], ["e", "maybe"]])
    with pytest.raises(DataError) as error:
        load_task_data(files(train=train, validation=validation))
    message = str(error.value)
    assert message.startswith(f"{validation}, line 3: label 'maybe' never occurs in the training file")
    assert "known labels: neg, pos" in message


def test_transfer_texts_from_txt_and_csv(tmp_path):
    txt = tmp_path / "unlabeled.txt"
    txt.write_bytes(b"first text\r\n\r\n  \nsecond text\n")
    assert read_texts(txt, "csv", "text") == ["first text", "second text"]  # .txt wins over the format
    table = write_csv(tmp_path / "unlabeled.csv", [["x", "1"], ["y", "2"]], header=("body", "id"))
    assert read_texts(table, "auto", "body") == ["x", "y"]
    blank = write_csv(tmp_path / "blank.csv", [["x"], [" "]], header=("text",))
    with pytest.raises(DataError, match=r"blank\.csv, line 3: empty text"):
        read_texts(blank, "auto", "text")
    train = write_csv(tmp_path / "train.csv", [[f"t{i}", str(i % 2)] for i in range(10)],
                      header=("body", "id"))
    config = files(train=train, transfer=table, text_column="body", label_column="id")
    assert load_task_data(config).transfer == ["x", "y"]


def test_augment_makes_seeded_word_subsequences_and_joins_the_transfer_texts(tmp_path):
    texts = ["a gripping and beautifully shot film with a story", "dull", "far too long"]
    variants = augment(texts, copies=4, seed=0)
    assert variants == augment(texts, copies=4, seed=0) and variants != augment(texts, copies=4, seed=1)
    assert 0 < len(variants) <= 12 and "dull" not in variants and "" not in variants
    # A text with extra spaces is not its own variant once they are gone (86 of 22,836 reviews variants were).
    assert augment(["great  movie was fine "], copies=10, seed=0).count("great movie was fine") == 0
    for variant in variants:  # every variant keeps words of one source text, in order
        assert any(_in_order(variant.split(), text.split()) for text in texts)
    assert any(len(v.split()) < 9 for v in variants if _in_order(v.split(), texts[0].split()))
    train = write_csv(tmp_path / "train.csv", [[f"word{i} other words here", str(i % 2)] for i in range(20)])
    data = load_task_data(files(train=train, augment=2))
    assert 0 < len(data.transfer) <= 2 * len(data.train)
    assert load_task_data(files(train=train)).transfer == []


def test_a_text_scored_on_is_never_trained_on(tmp_path):
    """Repeated rows split apart, a transfer text or a perturbed copy equal to a held-out text: all left out of
    training (before, 9 of 15 test texts of a file with repeated rows were also training rows)."""
    rows = [[f"film number {i} was {'good' if i % 2 else 'bad'}", str(i % 2)] for i in range(100)]
    train = write_csv(tmp_path / "train.csv", rows + rows[:50])
    test_texts = [e.text for e in load_task_data(files(train=train)).test]
    transfer = tmp_path / "transfer.txt"
    transfer.write_text("\n".join([test_texts[0], "  " + test_texts[1].replace(" ", "   "), "an unseen text"]) + "\n")
    data = load_task_data(files(train=train, transfer=transfer, augment=20))
    held_out = {e.text for e in data.validation + data.test}
    assert [e.text for e in data.test] == test_texts  # the split itself is unchanged
    assert not held_out & {e.text for e in data.train}
    assert not held_out & {" ".join(t.split()) for t in data.transfer}
    assert "an unseen text" in data.transfer
    assert len(data.train) < 80 + 50  # the copies of held-out rows left


def test_training_rows_left_with_one_class_are_refused(tmp_path):
    """The file's classes were checked before its validation/test texts left it: a job trained on one class."""
    train = write_csv(tmp_path / "train.csv", [[f"good film {i}", "1"] for i in range(20)] + [["awful", "0"],
                                                                                            ["bad plot", "0"]])
    rows = [["awful", "0"], ["bad plot", "0"], ["good film 0", "1"]]
    held_out = files(train=train, validation=write_csv(tmp_path / "val.csv", rows),
                     test=write_csv(tmp_path / "test.csv", rows))
    with pytest.raises(DataError, match="the 19 training rows left after removing validation/test texts all have "
                                        "label '1'; distillation needs at least 2 classes"):
        load_task_data(held_out)
    with pytest.raises(DataError, match=r"the 1 training rows left .* and keeping the first 1 \(data.limit\)"):
        load_task_data(held_out.model_copy(update={"limit": 1}))


def test_training_rows_that_are_all_held_out_texts_are_refused(tmp_path):
    train = write_csv(tmp_path / "train.csv", [["same", "0"], ["other", "1"]] * 5)
    rows = [["same", "0"], ["other", "1"]]
    with pytest.raises(DataError, match="every training row is also a validation/test text"):
        load_task_data(files(train=train, validation=write_csv(tmp_path / "val.csv", rows),
                             test=write_csv(tmp_path / "test.csv", rows)))


def _in_order(words: list[str], source: list[str]) -> bool:
    it = iter(source)
    return all(word in it for word in words)


def test_reviews_reads_cache_under_distill_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path))
    cache = BUILTIN_DATASETS["reviews"].cache_path(tmp_path)
    assert cache == tmp_path / "datasets" / "reviews" / "reviews.jsonl"
    cache.parent.mkdir(parents=True)
    write_jsonl(cache, [{"id": i, "text": f"r{i}", "label": ["negative", "positive"][i % 2], "score": 1.0}
                        for i in range(50)])
    data = load_task_data(DataConfig(limit=10))
    assert data.name == "reviews" and data.labels == ["negative", "positive"]
    assert (len(data.train), len(data.validation), len(data.test)) == (10, 5, 5)
    assert all(data.labels[e.label] == ["negative", "positive"][int(e.text[1:]) % 2] for e in data.train)


def test_keys_a_builtin_dataset_would_ignore_are_refused_when_a_job_starts(tmp_path, monkeypatch, tiny_teacher_dir):
    """A built-in dataset's columns are its own: label_column, and text_column/format unless a transfer file is
    read with them, were silently ignored. A config saved before the check still loads its data."""
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path))
    cache = BUILTIN_DATASETS["reviews"].cache_path(tmp_path)
    cache.parent.mkdir(parents=True)
    write_jsonl(cache, [{"id": i, "text": f"r{i}", "label": ["negative", "positive"][i % 2], "score": 1.0}
                        for i in range(50)])
    for key, value in (("label_column", "sentiment"), ("text_column", "review"), ("format", "csv")):
        with pytest.raises(DataError, match=rf"^data.{key}: '{value}', but the built-in dataset 'reviews' has its "
                                            rf"own columns"):
            check_builtin_keys(DataConfig(**{key: value}))
        assert len(load_task_data(DataConfig(**{key: value})).train) == 40
    transfer = write_csv(tmp_path / "more.csv", [["unlabelled one"], ["unlabelled two"]], header=("review",))
    read_with_them = DataConfig(transfer=transfer, text_column="review", format="csv")
    check_builtin_keys(read_with_them)
    assert load_task_data(read_with_them).transfer == ["unlabelled one", "unlabelled two"]
    with pytest.raises(DataError, match="^data.label_column: 'sentiment'"):
        check_builtin_keys(DataConfig(transfer=transfer, text_column="review", label_column="sentiment"))
    job = JobConfig(teacher=TeacherConfig(name=str(tiny_teacher_dir)),
                    data=DataConfig(label_column="sentiment", max_length=16),
                    student=FromTeacher(init="teacher", layers=[0]), output_dir=tmp_path / "job")
    with pytest.raises(DataError, match="^data.label_column: 'sentiment'"):
        start_job(job, None, resume=False)


def test_reviews_missing_cache_says_how_to_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path))
    with pytest.raises(DataError, match="run `distill datasets pull reviews`"):
        load_task_data(DataConfig())
    with pytest.raises(DataError, match="unknown dataset 'nope'; built-in datasets: reviews"):
        load_task_data(DataConfig(dataset="nope"))


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SNIPPETS = "1\t2.5\tA joy. \r\n2\t-1.25\tDull and long.\r\n3\t0\tA film.\r\n4\t0.1\tFine, I guess."


def fake_sdist() -> tuple[bytes, bytes]:
    """(sdist, snippets file) laid out like the real vaderSentiment-3.3.2.tar.gz."""
    snippets = SNIPPETS.encode()
    transfer = {f"hutto_ICWSM_2014/{name}_GroundTruth.txt": f"1\t0.5\t{name}  one \r\n2\t-1\t{name} two\r\n".encode()
                for name in ("amazonReviewSnippets", "nytEditorialSnippets", "tweets")}
    inner = tar_gz({"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": snippets, **transfer})
    return tar_gz({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}), snippets


def test_pull_reviews_parses_a_fake_sdist(tmp_path, monkeypatch):
    sdist, snippets = fake_sdist()

    def download(dest: Path) -> Path:
        (dest / "vaderSentiment-3.3.2.tar.gz").write_bytes(sdist)
        return dest / "vaderSentiment-3.3.2.tar.gz"

    dest = tmp_path / "home" / "datasets" / "reviews" / "reviews.jsonl"
    messages: list[str] = []
    pull_reviews(dest, messages.append, download=download, sdist_sha256=hashlib.sha256(sdist).hexdigest(),
                 snippets_sha256=hashlib.sha256(snippets).hexdigest())
    rows = [json.loads(line) for line in dest.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"id": 1, "text": "A joy.", "label": "positive", "score": 2.5},
        {"id": 2, "text": "Dull and long.", "label": "negative", "score": -1.25},
        {"id": 4, "text": "Fine, I guess.", "label": "positive", "score": 0.1},
    ]
    transfer = dest.with_name("transfer.txt")
    assert transfer.read_text().splitlines() == [f"{name} {n}" for name in ("amazonReviewSnippets",
                                                 "nytEditorialSnippets", "tweets") for n in ("one", "two")]
    assert sorted(dest.parent.iterdir()) == [dest, transfer]  # no temp file left behind
    assert "wrote 3 reviews (2 positive, 1 negative)" in messages[-1] and "6 unlabelled" in messages[-1]

    # The built-in transfer texts come with the dataset.
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    assert len(load_task_data(DataConfig(transfer="builtin")).transfer) == 6
    transfer.unlink()
    with pytest.raises(DataError, match="transfer.txt is missing: delete .* and run `distill datasets pull reviews`"):
        load_task_data(DataConfig(transfer="builtin"))

    # Already cached: pull_dataset leaves it alone (and so does not download).
    assert pull_dataset("reviews", home=tmp_path / "home") == dest

    with pytest.raises(DataError, match="vaderSentiment-3.3.2.tar.gz: sha256 is"):
        pull_reviews(tmp_path / "other.jsonl", messages.append, download=download)  # the real checksums
    assert not (tmp_path / "other.jsonl").exists()


@pytest.mark.slow
def test_pull_real_reviews(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path))
    path = pull_dataset("reviews")
    assert path == tmp_path / "datasets" / "reviews" / "reviews.jsonl"
    data = load_task_data(DataConfig())
    every = data.train + data.validation + data.test
    assert len(every) == 10568
    assert len(load_task_data(DataConfig(transfer="builtin")).transfer) == 13098
    assert Counter(data.labels[e.label] for e in every) == {"positive": 5242, "negative": 5326}
    assert (len(data.train), len(data.validation), len(data.test)) == (8456, 1056, 1056)
