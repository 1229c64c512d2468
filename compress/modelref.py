"""Model references: a local folder, a Hugging Face id, or an id pinned to a revision.

`org/name@<branch|tag|commit>` pins a Hub revision (Hub ids cannot contain '@'), so one
string carries it through CLI flags, Job args and serve configs alike. Pure: no torch.
"""

from __future__ import annotations


def split_revision(ref: str) -> tuple[str, str | None]:
    """'org/name@abc123' -> ('org/name', 'abc123'); anything without '@' -> (ref, None)."""
    name, sep, revision = ref.rpartition("@")
    if not (sep and name and revision) or "/" in revision:
        return ref, None
    return name, revision


def looks_like_hub_id(ref: str) -> bool:
    name, _ = split_revision(ref)
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))
