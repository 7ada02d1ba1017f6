"""The shared error base: a class line states a hierarchy's attributes, the envelope has
the OpenAI shape."""

from __future__ import annotations

import pytest

from synapse_common import api_error


class Base(api_error.ApiError):
    retry_hint = "never"


class Gone(Base, http_status=410, error_type="gone_error", retry_hint="later"):
    pass


def test_a_class_line_sets_the_attributes_its_base_declares() -> None:
    err = Gone("it left", param="id", code="gone")
    assert (Gone.http_status, Gone.error_type, Gone.retry_hint) == (410, "gone_error", "later")
    assert (Base.http_status, Base.retry_hint) == (500, "never")
    assert err.envelope() == {"error": {"message": "it left", "type": "gone_error",
                                        "param": "id", "code": "gone"}}


def test_a_misspelt_attribute_is_an_error_at_class_creation() -> None:
    with pytest.raises(TypeError, match="retry_hnit"):
        class Typo(Base, retry_hnit="later"):
            pass
