"""Data-parallel training: 2 torchrun workers on the CPU (gloo) train like 1 process with the same global batch.

The workers run this module (`python -m torch.distributed.run ... -m tests.test_distributed OUT`): `_train` is the
same code in one process and in two, so the test compares like with like.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from distill import distributed, pipeline, tasks
from distill.cli import main as cli
from distill.config import ConfigError, DistributedConfig, LossConfig, TrainConfig, parse_config
from distill.engine import BEST, CHECKPOINT, Split, Teacher, fit
from distill.tasks import SequenceClassification, predict_distilled
from tests.conftest import synthetic_rows, write_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
# 64 training examples in global batches of 7: 10 steps an epoch, the last of one example, so rank 1 gets an empty
# slice there (and the 3/4 splits elsewhere are unequal): the weighting of both is under test.
CFG = TrainConfig(epochs=2, batch_size=7, lr=1e-3, checkpoint_every=3)
# Summation order differs (two partial means, then gloo's all-reduce), and AdamW's normalized steps amplify float
# noise a little over 20 steps; with dropout off nothing else differs.
ATOL = 1e-4


def _classifier(vocab: int, seed: int, hidden: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=hidden * 2, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout differs by rank
    return BertForSequenceClassification(config)


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class Crash(Exception):
    pass


class CrashAtStep(SequenceClassification):
    """Fails on every rank at the same training step (as a killed job would), before that step's all-reduce."""

    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0

    def loss(self, *args: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.step:
            raise Crash
        return super().loss(*args)


def _train(out: Path) -> dict[str, Any]:
    """Four fits (plain KD with cached teacher logits; the same crashed at step 14 and resumed from its step-12
    checkpoint; the same keeping an average of the weights, train.ema_decay; hidden-state MSE through a learned
    projection) → weights (the average as kept in best/), metrics and every rank's events.

    The hidden-state run reads texts cut to 4 tokens: its loss is a mean over tokens while ranks are weighted by
    examples, which is exact only when every example has as many tokens (otherwise close: 1e-3 on these weights).
    """
    task = SequenceClassification()
    tokenizer = write_tiny_tokenizer(out / f"tok-{distributed.rank()}")
    rows = synthetic_rows(96, seed=3)
    encoded = task.encode(tokenizer, [t for t, _ in rows], 16)
    labels = torch.tensor([int(label == "positive") for _, label in rows])
    teacher = Teacher(_classifier(len(tokenizer), seed=7).eval(), tokenizer)
    teacher_outputs = predict_distilled(task, teacher.model, tokenizer, encoded)
    short = task.encode(tokenizer, [t for t, _ in rows[:64]], 4)
    train = Split(short, labels[:64], teacher_inputs=short)
    cached = Split(encoded[:64], labels[:64], teacher_outputs=teacher_outputs[:64])
    validation = Split(encoded[64:], labels[64:], teacher_inputs=encoded[64:], teacher_outputs=teacher_outputs[64:])
    events: list[tuple[str, dict[str, Any]]] = []

    plain = _classifier(len(tokenizer), seed=1)
    result = fit(task, plain, tokenizer, cached, validation, CFG, run_dir=out / "plain", seed=5,
                 on_event=lambda kind, data: events.append((kind, data)))
    with pytest.raises(Crash):
        fit(CrashAtStep(14), _classifier(len(tokenizer), seed=1), tokenizer, cached, validation, CFG,
            run_dir=out / "resumed", seed=5)
    resumed = _classifier(len(tokenizer), seed=99)  # weights come from the checkpoint
    fit(task, resumed, tokenizer, cached, validation, CFG, run_dir=out / "resumed", seed=5, resume=True)
    averaging = CFG.model_copy(update={"ema_decay": 0.9})
    averaged = fit(task, _classifier(len(tokenizer), seed=1), tokenizer, cached, validation, averaging,
                   run_dir=out / "averaged", seed=5)
    narrow = _classifier(len(tokenizer), seed=1, hidden=16)
    fit(task, narrow, tokenizer, train, validation, CFG.model_copy(update={"epochs": 1}), run_dir=out / "hidden",
        seed=5, teacher=teacher, loss=LossConfig(hidden_mse=1.0), layer_map=[1, 2])
    # gather_rows with unequal blocks (rank r holds r + 1 rows of value r + 1), each rank's loss weighted r + 1.
    rows = torch.full((distributed.rank() + 1, 2), float(distributed.rank() + 1), requires_grad=True)
    gathered = distributed.gather_rows(rows)
    (gathered.sum() * (distributed.rank() + 1)).backward()
    # A rank standing in (rank 1; the engine's stand-in example) adds no rows and gets no gradient from any loss.
    stand_in = torch.full((1, 2), float(distributed.rank() + 1), requires_grad=True)
    with distributed.standing_in(distributed.rank() == 1):
        without = distributed.gather_rows(stand_in)
    without.sum().backward()
    kept = BertForSequenceClassification.from_pretrained(out / "averaged" / BEST)
    return {"plain": _weights(plain), "resumed": _weights(resumed), "hidden": _weights(narrow),
            "averaged": _weights(kept), "averaged_history": averaged.history, "history": result.history,
            "steps": result.steps, "events": distributed.gather(events),
            "gathered": gathered.detach(), "gathered_grad": rows.grad,
            "stand_in_gathered": without.detach(), "stand_in_grads": distributed.gather(stand_in.grad)}


def _torchrun(module_args: list[str], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    command = distributed.torchrun_command(DistributedConfig(nproc_per_node=nproc), "test", *module_args)
    return subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # starts several processes: tens of seconds
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path: Path) -> None:
    distributed.place("cpu")  # like the workers (gloo): the comparison is about DDP, not about devices
    one = _train(tmp_path / "one")
    done = _torchrun(["tests.test_distributed", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=False)

    assert two["steps"] == one["steps"] == 20
    for name in ("plain", "averaged", "hidden"):
        assert torch.allclose(two[name], one[name], atol=ATOL), (name, (two[name] - one[name]).abs().max())
    assert not torch.allclose(one["averaged"], one["plain"], atol=ATOL)  # the average is not the trained weights
    for history in ("history", "averaged_history"):
        for a, b in zip(two[history], one[history], strict=True):
            assert a == pytest.approx(b, abs=1e-6)  # accuracy/agreement on 32 examples: the same predictions
    # Resume under DDP: every rank reloads the checkpoint and continues exactly.
    assert torch.equal(two["resumed"], two["plain"])
    # Rank 0 alone emits (the same events as one process; its loss is the global batch's) and writes.
    rank0, rank1 = two["events"]
    assert rank1 == []
    assert [kind for kind, _ in rank0] == [kind for kind, _ in one["events"][0]]
    losses = [(a["loss"], b["loss"]) for (kind, a), (_, b) in zip(rank0, one["events"][0], strict=True)
              if kind == "progress"]
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in losses)
    for run in ("plain", "resumed", "averaged", "hidden"):
        assert sorted(p.name for p in (tmp_path / "two" / run).iterdir()) == ["best", CHECKPOINT]
    # Rank 0's view: its row and rank 1's two; its row's gradient sums both ranks' losses (1 + 2).
    assert two["gathered"].tolist() == [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
    assert two["gathered_grad"].tolist() == [[3.0, 3.0]]
    assert one["gathered"].tolist() == [[1.0, 1.0]] and one["gathered_grad"].tolist() == [[1.0, 1.0]]
    # Rank 1 standing in: both ranks' losses read rank 0's row alone (gradient 1 + 1); rank 1's row none.
    assert two["stand_in_gathered"].tolist() == [[1.0, 1.0]]
    assert [grad.tolist() for grad in two["stand_in_grads"]] == [[[2.0, 2.0]], [[0.0, 0.0]]]
    assert one["stand_in_gathered"].tolist() == [[1.0, 1.0]]


@pytest.mark.slow  # starts several processes: tens of seconds
def test_distill_run_relaunches_itself_through_torchrun(tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    """The real path: `distill run` with nproc_per_node 2 → torchrun → the pipeline on both ranks (teacher head and
    DDP fine-tuning, logits broadcast from rank 0, DDP distillation) → rank 0 evaluates and reports. The 1-process
    run after it reuses the teacher the 2 processes prepared."""
    job = {"teacher": {"name": str(tiny_teacher_dir), "head_epochs": 3, "head_lr": 1e-2, "finetune_epochs": 2,
                       "finetune_lr": 3e-3, "batch_size": 16},
           "data": {"dataset": "files", "train": str(synthetic_csv), "max_length": 16},
           "student": {"init": "fresh", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32},
           "train": {"epochs": 3, "batch_size": 16, "lr": 5e-3}, "export": {"onnx": False}}
    reports = {}
    for nproc in (2, 1):
        config = tmp_path / f"job{nproc}.yaml"
        config.write_text(yaml.safe_dump({**job, "distributed": {"nproc_per_node": nproc}}))
        assert cli(["run", str(config), "--output-dir", str(tmp_path / f"out{nproc}")]) == 0
        reports[nproc] = json.loads((tmp_path / f"out{nproc}" / "report.json").read_text())
    stdout = capfd.readouterr().out
    assert stdout.count('"student_test_accuracy"') == 2  # one summary per run: rank 1 prints nothing
    one, two = reports[1]["student"], reports[2]["student"]
    assert two["steps"] == one["steps"] == 3 * 20  # 320 training examples in global batches of 16
    # Dropout masks differ by rank, so the two runs match in outcome, not bit for bit.
    assert two["test_agreement"] >= 0.9 and one["test_agreement"] >= 0.9
    assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 0.05
    assert reports[1]["teacher"]["prepared_from_cache"] and reports[2]["teacher"]["test_accuracy"] >= 0.9


@pytest.mark.slow  # starts torchrun and two workers
def test_a_multi_process_run_with_bad_input_is_one_line_with_exit_code_2(tiny_teacher_dir: Path, tmp_path: Path,
                                                                        capfd: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"teacher": {"name": str(tiny_teacher_dir)},
                                      "data": {"dataset": "files", "train": str(tmp_path / "missing.csv"),
                                               "max_length": 16},
                                      "distributed": {"nproc_per_node": 2}}))
    assert cli(["run", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert err.count("distill: error: ") == 1 and f"data.train: {tmp_path / 'missing.csv'} does not exist" in err, err
    assert "Traceback" not in err


def test_a_job_computes_where_its_device_says() -> None:
    assert distributed.place("cpu") == torch.device("cpu") == distributed.device()
    assert distributed.place("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device: 'cuda', but torch sees no GPU.*allowed: 'auto'.*or 'cpu'"):
            distributed.place("cuda")
    with pytest.raises(ConfigError, match=r"device: Input should be 'auto', 'cpu' or 'cuda' \(got 'gpu'\)"):
        parse_config({"device": "gpu"})


def test_a_bf16_job_on_a_cpu_without_bf16_kernels_is_warned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, dict]] = []
    for precision, slow in (("bf16", True), ("bf16", False), ("fp32", True)):
        monkeypatch.setattr(pipeline, "bf16_is_slow", lambda device, slow=slow: slow)
        config = parse_config({"precision": precision, "output_dir": str(tmp_path), "device": "cpu"})
        pipeline.start_job(config, lambda kind, data: events.append((kind, data)), resume=False)
    assert len(events) == 1 and events[0][0] == "log"  # the bf16 job on the slow CPU, no other
    assert "precision 'bf16' on a CPU without bf16 kernels" in events[0][1]["message"]
    assert not tasks.bf16_is_slow(torch.device("cuda"))  # it judges CPUs only


def test_torchrun_command_for_one_and_several_nodes() -> None:
    local = distributed.torchrun_command(DistributedConfig(nproc_per_node=4), "job", "distill.pipeline", "dir")
    assert local[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m",
                         "distill.pipeline", "dir"]
    nodes = DistributedConfig(nproc_per_node=2, nnodes=3, rdzv_endpoint="head:29500")
    assert distributed.torchrun_command(nodes, "job", "m")[3:7] == [
        "--nnodes=3", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29500", "--rdzv-id=job"]
    assert not distributed.wanted(DistributedConfig()) and distributed.wanted(nodes)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)


if __name__ == "__main__":  # a torchrun worker of the first test
    with distributed.process_group("cpu"):
        distributed.place("cpu")
        out = Path(sys.argv[1])
        result = _train(out)
        if distributed.is_main():
            torch.save(result, out / "result.pt")
