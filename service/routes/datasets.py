"""/v1/datasets: upload a CSV/JSONL file (checked as the CLI checks it), list, inspect, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, status

from service import datasets
from service.deps import SettingsDep, StoreDep
from service.routing import TextJsonRoute
from service.schemas import DatasetList, DatasetPublic, error_responses

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=TextJsonRoute)

UploadDep = Annotated[datasets.Upload, Depends(datasets.read_upload)]

# The form is read by read_upload (to refuse an oversize body before reading it), so FastAPI cannot derive the
# request body's schema from the signature; it is declared here.
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "CSV with a header row, or JSONL (one object per line); .csv, .jsonl or .json; "
                                "with labelled=false also .txt (one text per line)"},
        "text_column": {"type": "string", "default": "text", "examples": ["review"]},
        "label_column": {"type": "string", "default": "label", "examples": ["sentiment"]},
        "labelled": {"type": "string", "enum": ["true", "false"], "default": "true",
                     "description": "false: texts alone, checked as a causal-LM job reads them (only such jobs "
                                    "take the upload)"}}}}}}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic, openapi_extra=_UPLOAD_BODY,
             responses=error_responses(400, 411, 413, 415, 422),
             summary="Upload a labelled CSV or JSONL file, or texts alone")
def upload_dataset(upload: UploadDep, settings: SettingsDep, store: StoreDep) -> DatasetPublic:
    return datasets.save_upload(settings, store, upload)


@router.get("", response_model=DatasetList, summary="Built-in (pulled or not) and uploaded datasets")
def list_datasets(settings: SettingsDep, store: StoreDep) -> DatasetList:
    return DatasetList(items=datasets.list_datasets(settings, store))


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=error_responses(404),
            summary="A built-in dataset by name or an upload by id")
def get_dataset(dataset_id: str, settings: SettingsDep, store: StoreDep) -> DatasetPublic:
    return datasets.get_dataset(settings, store, dataset_id)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404, 409),
               summary="Delete an upload no queued or running job uses")
def delete_dataset(dataset_id: str, settings: SettingsDep, store: StoreDep) -> None:
    datasets.delete_dataset(settings, store, dataset_id)
