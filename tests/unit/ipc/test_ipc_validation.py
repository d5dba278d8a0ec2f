"""pydantic's errors as one readable line, the same in every service and loader."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from cvmotion.ipc.validation import describe_problems


class _Inner(BaseModel):
    size: int


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    inner: _Inner


def test_locations_are_dotted_and_the_top_level_is_named() -> None:
    with pytest.raises(ValidationError) as caught:
        _Doc.model_validate({"name": 1, "inner": {"size": "x"}, "extra": 0})
    text = describe_problems(caught.value.errors())
    assert text.split("; ")[0].startswith("name: ")
    assert "inner.size: " in text
    assert "extra: Extra inputs are not permitted" in text
    with pytest.raises(ValidationError) as top:
        _Doc.model_validate([])
    assert describe_problems(top.value.errors(), root="document").startswith("document: ")
    assert describe_problems([]) == ""
