"""Model references carry an optional Hub revision as `id@rev` through CLI, Job args and serve configs."""

import pytest

from deltafleet.compress.checkpoint import InputError, resolve_model_dir
from deltafleet.compress.modelref import looks_like_hub_id, split_revision


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("org/name", ("org/name", None)),
        ("org/name@main", ("org/name", "main")),
        ("org/name@0123abcd", ("org/name", "0123abcd")),
        ("/models/bases/tiny", ("/models/bases/tiny", None)),
        ("/models/a@b/c", ("/models/a@b/c", None)),  # '@' inside a path is not a revision
        ("org/name@", ("org/name@", None)),
    ],
)
def test_split_revision(ref, expected):
    assert split_revision(ref) == expected


def test_hub_ids_and_paths_are_told_apart():
    assert looks_like_hub_id("org/name@v1") and looks_like_hub_id("org/name")
    assert not looks_like_hub_id("./org/name") and not looks_like_hub_id("/abs/dir") and not looks_like_hub_id("a/b/c")


def test_pinned_revision_offline_is_refused_with_the_reference(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"base nobody/nothing@v2: no such folder, and not available"):
        resolve_model_dir("nobody/nothing@v2", "base")
