"""Datasets over HTTP: the built-in ones (pulled or not) and uploaded CSV/JSONL files.

An upload is checked exactly as `distill run` checks a training file (distill.data: columns, empty texts, labels,
at least two classes, enough rows to split; with `labelled=false`, texts alone, as a causal-LM job reads them),
then kept as settings.datasets_dir/<id>/data.<format>; a job uses it with `data.dataset: "upload:<id>"`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from distill import atomic
from distill.config import DataConfig
from distill.data import BUILTIN_DATASETS, DataError, load_task_data
from service.deps import SettingsDep
from service.runner import UPLOAD_PREFIX, upload_path
from service.schemas import DatasetPublic, ServiceError
from service.settings import Settings
from service.store import Dataset, Store, now

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}  # .txt: one text per line
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small text fields around the file
COPY_CHUNK = 1024 * 1024
UPLOAD_PARTS = ("file", "text_column", "label_column", "labelled")  # the multipart form of POST /v1/datasets


@dataclass
class Upload:
    file: BinaryIO
    filename: str
    text_column: str
    label_column: str
    labelled: bool


async def read_upload(request: Request, settings: SettingsDep) -> AsyncIterator[Upload]:
    """The multipart form of POST /v1/datasets; an oversize body is refused before it is read, so the body must
    say its size: Starlette spools a form's file part to disk whole, with no limit of its own."""
    length = request.headers.get("content-length", "")
    if not (length.isascii() and length.isdigit()):
        raise ServiceError(411, "send the upload with a Content-Length header (a chunked body cannot be checked "
                                f"against the {settings.max_upload_bytes:,}-byte limit before it is stored)")
    if int(length) > settings.max_upload_bytes + FORM_OVERHEAD_BYTES:
        raise ServiceError(413, f"the request body is {int(length):,} bytes; uploads are limited to "
                                f"{settings.max_upload_bytes:,} bytes (max_upload_bytes)")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ServiceError(415, "send multipart/form-data with the CSV or JSONL file in the part 'file' (and "
                                "optional text_column, label_column fields)")
    try:  # room for every part to arrive, so that a misplaced one gets its own message below
        form = await request.form(max_files=len(UPLOAD_PARTS), max_fields=len(UPLOAD_PARTS) - 1)
    except HTTPException as e:  # Starlette's word on a malformed or overfull form
        raise ServiceError(400, f"{e.detail}; the form's parts are {', '.join(UPLOAD_PARTS)}") from None
    except ClientDisconnect:  # the client went away mid-body: nothing to answer, nothing kept
        raise ServiceError(400, "the upload was cut off before its end") from None
    try:
        unknown = next((key for key in form if key not in UPLOAD_PARTS), None)
        if unknown is not None:  # a misspelt label_column would otherwise be the default, silently
            raise ServiceError(422, f"{unknown}: unknown form part; allowed: {', '.join(UPLOAD_PARTS)}")
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise ServiceError(422, "file: missing; send the CSV or JSONL file as the multipart part 'file'")
        columns = {key: form.get(key) or default for key, default in (("text_column", "text"),
                                                                       ("label_column", "label"))}
        for key, value in columns.items():
            if not isinstance(value, str):
                raise ServiceError(422, f"{key}: must be a text field naming a column, not a file")
        labelled = form.get("labelled") or "true"
        if not isinstance(labelled, str):
            raise ServiceError(422, "labelled: must be a text field (true or false), not a file")
        if labelled not in ("true", "false"):
            raise ServiceError(422, f"labelled: {labelled!r}; allowed: true (the default: rows with labels) or false "
                                    f"(texts alone, for causal-LM jobs)")
        yield Upload(file.file, file.filename or "upload", columns["text_column"], columns["label_column"],
                     labelled == "true")
    finally:
        await form.close()


def save_upload(settings: Settings, store: Store, upload: Upload) -> DatasetPublic:
    """Copy (at most max_upload_bytes), check as the CLI would, then publish the directory and the record."""
    format = FORMATS.get(Path(upload.filename).suffix.lower())
    if format is None:
        raise ServiceError(422, f"file: cannot tell the format of {upload.filename!r}; name it .csv, .jsonl or "
                                f".json (.txt for texts alone)")
    if format == "txt" and upload.labelled:
        raise ServiceError(422, f"file: {upload.filename!r} is texts alone (one per line), which only causal-LM jobs "
                                f"read; send labelled=false with it, or a CSV/JSONL file with a label column")
    dataset_id = uuid.uuid4().hex[:12]
    final = upload_path(settings, dataset_id, format)
    work = final.parent.with_name(dataset_id + atomic.STAGED)  # published by one rename once it passed every check
    work.mkdir(parents=True)
    try:
        size = _copy_capped(upload.file, work / final.name, settings.max_upload_bytes)
        # format "auto": the stored file's suffix (data.csv, data.jsonl, data.txt) says it, for jobs too
        config = DataConfig(dataset="files", train=work / final.name, text_column=upload.text_column,
                            label_column=upload.label_column)
        try:
            data = load_task_data(config, labelled=upload.labelled)
        except DataError as e:  # name the file as the client knows it, not its (temporary) path on the server
            message = str(e).replace(str(work / final.name), upload.filename)
            if message.startswith(f"{final.name}:"):  # messages about the whole file start with its name
                message = upload.filename + message.removeprefix(final.name)
            raise ServiceError(422, message) from None
        os.replace(work, final.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts: Counter[str] = Counter()
    splits = data.summary()["splits"].values()
    for split in splits:
        counts.update(split["label_counts"])
    record = Dataset(id=dataset_id, name=upload.filename, filename=final.name, format=format,
                     text_column=upload.text_column, label_column=upload.label_column,
                     rows=sum(split["rows"] for split in splits),
                     labels=data.labels, label_counts=dict(counts), size_bytes=size, created_at=now())
    store.add_dataset(record)
    return DatasetPublic.of(record)


def remove_unfinished_uploads(settings: Settings, store: Store) -> None:
    """Upload folders no record names: those a stopped server was still checking, one published by a server that
    stopped before recording it, one whose delete removed the record and stopped before the folder."""
    for folder in settings.datasets_dir.iterdir():
        if folder.name.endswith(atomic.STAGED) or store.get_dataset(folder.name) is None:
            shutil.rmtree(folder, ignore_errors=True)


def _copy_capped(source: BinaryIO, target: Path, limit: int) -> int:
    size = 0
    with target.open("wb") as out:
        while chunk := source.read(COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, f"file: more than {limit:,} bytes; uploads are limited to {limit:,} bytes "
                                        f"(max_upload_bytes)")
            out.write(chunk)
    return size


def list_datasets(settings: Settings, store: Store) -> list[DatasetPublic]:
    return [_builtin(settings, name) for name in BUILTIN_DATASETS] + [DatasetPublic.of(d)
                                                                      for d in store.list_datasets()]


def get_dataset(settings: Settings, store: Store, dataset_id: str) -> DatasetPublic:
    if dataset_id in BUILTIN_DATASETS:
        return _builtin(settings, dataset_id)
    return DatasetPublic.of(_upload(store, dataset_id))


def delete_dataset(settings: Settings, store: Store, dataset_id: str) -> None:
    if dataset_id in BUILTIN_DATASETS:
        raise ServiceError(409, f"{dataset_id!r} is a built-in dataset; only uploads can be deleted")
    record = _upload(store, dataset_id)
    deleted, users = store.delete_dataset(record.id)
    if users:
        raise ServiceError(409, f"dataset {dataset_id!r} is used by queued or running jobs: {', '.join(users)}; "
                                f"cancel them or wait until they end")
    if not deleted:  # another DELETE of it got there first
        raise ServiceError(404, _not_found(dataset_id))
    shutil.rmtree(upload_path(settings, record.id, record.format).parent, ignore_errors=True)


def _upload(store: Store, dataset_id: str) -> Dataset:
    record = store.get_dataset(dataset_id.removeprefix(UPLOAD_PREFIX))
    if record is None:
        raise ServiceError(404, _not_found(dataset_id))
    return record


def _not_found(dataset_id: str) -> str:
    return f"no dataset {dataset_id!r}; GET /v1/datasets lists the built-in and uploaded ones"


def _builtin(settings: Settings, name: str) -> DatasetPublic:
    dataset = BUILTIN_DATASETS[name]
    return DatasetPublic(id=name, kind="builtin", reference=name, name=name, description=dataset.description,
                         pulled=dataset.cache_path(settings.home).exists(), labels=list(dataset.labels))
