"""Subject tokens for model ids (`schemas.subjects.model_token`): any id maps to a valid token,
distinct ids to distinct tokens, and the token decodes back to its id."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import subjects

TOKEN = re.compile(r"^[A-Za-z0-9_-]*$")  # a subject token and a JetStream consumer name alike


@given(st.text())
def test_any_model_id_round_trips_through_a_plain_token(model_id: str) -> None:
    token = subjects.model_token(model_id)
    assert TOKEN.match(token)
    assert subjects.model_id_from_token(token) == model_id


@given(st.text(), st.text())
def test_distinct_ids_never_share_a_token(a: str, b: str) -> None:
    if a != b:
        assert subjects.model_token(a) != subjects.model_token(b)


@given(st.text(alphabet="_-aZ0/.", max_size=12), st.text(alphabet="_-aZ0/.", max_size=12))
def test_ids_made_of_escape_characters_stay_apart(a: str, b: str) -> None:
    """The characters the encoding itself uses are where a careless scheme would collide."""
    assert (subjects.model_token(a) == subjects.model_token(b)) == (a == b)


def test_examples_and_what_could_not_be_a_token() -> None:
    assert subjects.model_token("meta-llama/Llama-3.1-8B") == "meta-llama_2FLlama-3_2E1-8B"
    assert subjects.model_token("a_b") == "a__b"
    assert subjects.model_id_from_token(subjects.model_token("naïve 模型")) == "naïve 模型"
    for bad in ("a_", "a_2", "a_zz", "a.b", "a_2f"):  # a dangling or lower-case escape, a raw dot
        with pytest.raises(ValueError):
            subjects.model_id_from_token(bad)


@given(st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True), st.text(min_size=1))
def test_work_subjects_name_their_pool_and_model(pool: str, model_id: str) -> None:
    assert subjects.parse_work_subject(subjects.work_subject(pool, model_id)) == (pool, model_id)
