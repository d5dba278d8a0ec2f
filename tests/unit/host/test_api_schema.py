"""The host API's request models refuse what their documented schema refuses, and accept what it accepts."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from cvmotion.abi.images import image_path
from cvmotion.abi.sku import CATALOG, find_sku
from cvmotion.errors import ImageError
from cvmotion.host.api_schema import SIZE_PATTERN, CreateVm, KvRequest, MigrateRequest

VM = {"name": "web-1", "image": "memdirty"}


@pytest.mark.parametrize(
    "body",
    [
        {**VM},  # neither memory nor size
        {**VM, "memory": "64M", "size": "Standard_DC2as_v5"},  # both
        {**VM, "memory": None, "size": "Standard_DC2as_v5"},  # null is neither
        {**VM, "size": None, "memory": "64M"},
        {**VM, "memory": "64 M"},
        {**VM, "memory": 64 * 1024 * 1024 + 1},  # not a whole MiB
        {**VM, "memory": "64M", "vcpus": "2"},  # strict: no strings for integers
        {**VM, "memory": True},
        {**VM, "memory": "64M", "policy": -1},
        {**VM, "memory": "64M", "size_": 1},
        {**VM, "size": "Standard_DC3as_v5"},
        {"name": "Web_1", "image": "memdirty", "memory": "64M"},
        {"name": "web-1\n", "image": "memdirty", "memory": "64M"},
    ],
    ids=lambda body: str(body)[len(str(VM)) - 1 :][:40],
)
def test_create_vm_refuses(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CreateVm.model_validate(body)


@pytest.mark.parametrize(
    "extra",
    [{"memory": "64M"}, {"memory": 4 << 20}, {"memory": "1GiB"}, {"size": "dc2as_v5"}, {"size": "STANDARD_DC4AS_V5"}],
)
def test_create_vm_accepts(extra: dict[str, Any]) -> None:
    CreateVm.model_validate({**VM, **extra})


def test_the_size_pattern_is_the_catalogue_as_find_sku_reads_it() -> None:
    for name in CATALOG:
        for spelling in (name, name.lower(), name.upper(), name.removeprefix("Standard_")):
            assert re.fullmatch(SIZE_PATTERN, spelling)
            assert find_sku(spelling).name == name
    assert not re.fullmatch(SIZE_PATTERN, "Standard_")


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"op": "get", "key": "k"}, True),
        ({"op": "put", "key": "k", "value": "v"}, True),
        ({"op": "stats"}, True),
        ({"op": "get"}, False),
        ({"op": "stats", "key": "k"}, False),
        ({"op": "GET", "key": "k"}, False),
        ({"op": "list", "key": "k"}, False),
        ({"op": "get", "key": "k" * 65}, False),
    ],
)
def test_kv_requests(body: dict[str, Any], ok: bool) -> None:
    if ok:
        KvRequest.model_validate(body)
    else:
        with pytest.raises(ValidationError):
            KvRequest.model_validate(body)


def test_migrate_options_are_bounded() -> None:
    MigrateRequest.model_validate({"destination": "http://127.0.0.1:8082", "io_timeout_s": 5})
    for bad in (
        {"destination": "host-b"},
        {"destination": "http://b", "streams": 0},
        {"destination": "http://b", "x": 1},
    ):
        with pytest.raises(ValidationError):
            MigrateRequest.model_validate(bad)


def test_an_image_name_the_file_system_cannot_hold_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="not an image file"):
        image_path("0" * 5000)
