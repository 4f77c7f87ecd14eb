"""Config validation: every bad key names itself and what is allowed."""

import re
from pathlib import Path

import pytest

from distill.compress import QUANTIZABLE
from distill.config import ConfigError, FromModel, JobConfig, load_config, parse_config

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_defaults_are_a_runnable_minilm_job() -> None:
    config = parse_config({})
    assert config.teacher.name == "minilm-l6" and config.data.dataset == "reviews"
    assert config.student == FromModel(init="model", model="minilm-l6", num_layers=3)


@pytest.mark.parametrize("body, message", [
    ({"trian": {}}, "trian: unknown key; allowed keys: compress, data, device, distributed, evaluate, export, loss, "
                    "output_dir, precision, seed, student, task, teacher, train, version"),
    ({"task": "causal-lm", "loss": {"similarity_kl": 2}}, "loss.similarity_kl: not used by task 'causal-lm'; its "
                                                            "loss keys are temperature, alpha, divergence"),
    ({"task": "causal-lm", "loss": {"anchor_kl": 1}}, "loss.anchor_kl: not used by task 'causal-lm'"),
    ({"task": "sentence-embedding", "teacher": {"finetune_epochs": 4}},  # was ignored silently
     "teacher.finetune_epochs: not used by task 'sentence-embedding', whose teacher is used as it is"),
    ({"task": "sentence-embedding", "loss": {"divergence": "jsd"}}, "loss.divergence: not used by task "
                                                                     "'sentence-embedding'"),
    ({"loss": {"divergence": "js"}}, "loss.divergence: Input should be 'kd_kl', 'reverse_kl' or 'jsd'"),
    # Another task's keys (each was accepted and did nothing):
    ({"task": "causal-lm", "data": {"label_column": "y"}}, "data.label_column: not used by task 'causal-lm'; "
                                                            "remove it"),
    ({"task": "sentence-embedding", "export": {"teacher": False}}, "export.teacher: not used by task "
                                                                   "'sentence-embedding'; remove it"),
    ({"task": "sentence-embedding", "evaluate": {"latency_calls": 50}}, "evaluate.latency_calls: not used by task"),
    ({"distributed": {"nnodes": 2}}, "distributed.nnodes is 2: set distributed.rdzv_endpoint"),
    ({"task": "sentence-embedding", "compress": {"quantize": "static"}}, "compress.quantize: static INT8 is not "
                                                                          "available for task 'sentence-embedding'"),
    ({"task": "causal-lm", "compress": {"quantize": "static"}}, "compress.quantize: static INT8 is not available "
                                                                 "for task 'causal-lm'; use dynamic or none"),
    ({"compress": {"exclude_ops": QUANTIZABLE["dynamic"]}},
     "compress.exclude_ops: every op type dynamic quantization handles is excluded, so nothing would be INT8"),
    ({"compress": {"exclude_ops": ["Foo"]}}, "compress.exclude_ops: ['Foo'] are not op types dynamic quantization "
                                             "handles; allowed: ['Attention', "),
    ({"train": {"epoch": 3}}, "train.epoch: unknown key; allowed keys: batch_size, cache_teacher_logits"),
    ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1 (got 0)"),
    ({"seed": 2**64}, "seed: Input should be less than or equal to 4294967295 (got 18446744073709551616)"),
    ({"teacher": {"seed": -1}}, "teacher.seed: Input should be greater than or equal to 0 (got -1)"),
    ({"train": {"dropout": 1}}, "train.dropout: Input should be less than 1 (got 1)"),
    ({"train": {"ema_decay": 1}}, "train.ema_decay: Input should be less than 1 (got 1)"),
    ({"loss": {"alpha": 1.5}}, "loss.alpha: Input should be less than or equal to 1"),
    ({"student": {"init": "copy"}}, "student.init: 'copy' is not one; allowed: 'teacher', 'model', 'fresh'"),
    ({"student": {"layers": [1]}}, "student.init: missing; allowed: 'teacher', 'model', 'fresh'"),
    ({"student": {"init": "fresh", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64,
                  "layers": [1]}},
     "student.layers: unknown key; allowed keys: hidden_size, init, intermediate_size, num_heads, num_layers"),
    ({"student": {"init": "teacher"}}, "student.layers: Field required"),  # not student.teacher.layers: no such key
    ({"student": {"init": "model"}}, "student.model: Field required\nstudent.num_layers: Field required"),
    ({"data": {"transfer": ["a.txt", "b.txt"]}}, "data.transfer: allowed: a file path (.txt, CSV or JSONL) or "
                                                 "'builtin'"),  # one line, not one per branch of the union
    ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number (got inf)"),  # failed in training
    ({"loss": {"temperature": float("inf")}}, "loss.temperature: Input should be a finite number (got inf)"),
    ({"student": {"init": "fresh", "num_layers": 2, "hidden_size": 30, "num_heads": 4, "intermediate_size": 64}},
     "student.hidden_size (30) must be divisible by student.num_heads (4)"),
    ({"data": {"dataset": "files"}}, "data.dataset is 'files' but data.train is not set"),
    ({"data": {"train": "x.csv"}}, "only read when data.dataset is 'files'"),
    ({"version": 2}, "version: Input should be 1"),
    ({"teacher": {"head_epochs": 0, "finetune_epochs": 0}}, "teacher.head_epochs and teacher.finetune_epochs are "
                                                           "both 0: a teacher without the task's head would keep a "
                                                           "randomly initialized one"),
])
def test_bad_configs_name_the_key_and_what_is_allowed(body: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(body)
    assert message in str(error.value)


@pytest.mark.parametrize("body, unused", [
    ({"export": {"onnx": False, "opset": 18}, "compress": {"exclude_ops": ["Gather"]}},
     ["export.opset (as export.onnx is false)", "compress.exclude_ops (as export.onnx is false)"]),
    ({"compress": {"quantize": "none", "max_accuracy_drop": 2}},
     ["compress.max_accuracy_drop (as compress.quantize is 'none')"]),
    ({"compress": {"calibration_size": 50}}, ["compress.calibration_size (as INT8 is dynamic)"]),
    ({"compress": {"quantize": "static", "calibration_size": 50}}, []),
    ({"export": {"onnx": False}}, []),
])
def test_settings_another_switches_off_are_kept_and_named(body: dict, unused: list[str]) -> None:
    """Accepted, so switching export or INT8 back on needs no edit; pipeline.start_job warns with these."""
    assert parse_config(body).switched_off() == unused


def test_a_students_own_check_is_not_prefixed_with_its_init() -> None:
    fresh = {"init": "fresh", "num_layers": 2, "hidden_size": 30, "num_heads": 4, "intermediate_size": 64}
    with pytest.raises(ConfigError) as error:
        parse_config({"student": fresh})
    assert str(error.value) == "student.hidden_size (30) must be divisible by student.num_heads (4)"  # was after
    # "student.fresh: ", a key no config has


def test_a_value_of_the_wrong_type_for_transfer_is_one_line() -> None:
    with pytest.raises(ConfigError) as error:  # it was a line per branch of its union, naming pydantic's internals
        parse_config({"data": {"transfer": 5}})
    assert str(error.value) == "data.transfer: allowed: a file path (.txt, CSV or JSONL) or 'builtin' (got 5)"


def test_paths_expand_home_as_a_shell_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`~/out` as output_dir wrote the run into a directory named `~` under the current one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config = parse_config({"data": {"dataset": "files", "train": "~/train.csv", "validation": "~/v.csv",
                                    "test": "~/t.csv", "transfer": "~/transfer.txt"}, "output_dir": "~/out"})
    assert (config.data.train, config.data.validation, config.data.test, config.data.transfer, config.output_dir) == (
        tmp_path / "train.csv", tmp_path / "v.csv", tmp_path / "t.csv", tmp_path / "transfer.txt", tmp_path / "out")
    assert parse_config({"data": {"transfer": "builtin"}}).data.transfer == "builtin"


def test_a_key_given_twice_is_refused_naming_its_lines(tmp_path: Path) -> None:
    """YAML keeps the last: the second `train:` section replaced the first silently."""
    (tmp_path / "twice.yaml").write_text("train:\n  epochs: 2\nseed: 1\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="twice.yaml, line 4, column 1: 'train' is given twice, on lines 1 and 4; "
                                          "keep one$"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "merged.yaml").write_text("base: &b {epochs: 2, lr: 0.1}\ntrain: {<<: *b, lr: 0.2}\n")
    with pytest.raises(ConfigError, match="base: unknown key"):  # a merge's override is no repeat; read on
        load_config(tmp_path / "merged.yaml")


def test_load_config_reports_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "unclosed.yaml").write_text("train:\n  epochs: [1\n")  # one line, not PyYAML's three
    with pytest.raises(ConfigError, match=r"^\S+unclosed.yaml, line 3, column 1: expected ',' or ']', but got "
                                          r"'<stream end>' \(while parsing a flow sequence on line 2\)$"):
        load_config(tmp_path / "unclosed.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections, got list"):
        load_config(tmp_path / "list.yaml")


def test_set_overrides_keys_on_top_of_the_file_and_is_validated_with_it(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("train:\n  epochs: 2\nstudent:\n  init: teacher\n  layers: [0, 1]\nloss:\n")
    config = load_config(tmp_path / "job.yaml", ["train.lr=3e-4", "student.layers=[0, 5]", "seed=7",
                                                 "loss.temperature=4", "teacher.name=org/a=b"])
    assert (config.train.epochs, config.train.lr, config.student.layers, config.seed) == (2, 3e-4, [0, 5], 7)
    assert config.loss.temperature == 4  # a section the file leaves empty
    assert config.teacher.name == "org/a=b"  # split at the first '='
    fresh = load_config(tmp_path / "job.yaml", ["loss.alpha=0", "student={init: fresh, num_layers: 1, hidden_size: 16, "
                                                "num_heads: 2, intermediate_size: 32}"])  # a whole section replaced
    assert (fresh.student.init, fresh.train.epochs) == ("fresh", 2)
    for override, message in (("train.epoch=3", "train.epoch: unknown key; allowed keys: batch_size"),
                              ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1"),
                              ("train.epochs", "--set 'train.epochs': expected KEY=VALUE"),
                              ("train..epochs=1", "--set 'train..epochs=1': expected KEY=VALUE"),
                              ("train.epochs.x=1", "--set 'train.epochs.x=1': train.epochs is a value, not a section"),
                              ("seed=[1", "--set 'seed=[1': the value is not YAML")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(tmp_path / "job.yaml", [override])


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_shipped_examples_validate(name: str, distill_home: Path) -> None:
    config = load_config(EXAMPLES / name)
    assert isinstance(config, JobConfig)
    assert config.output_dir == distill_home / "runs" / Path(name).stem
