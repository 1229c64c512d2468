"""The pod runner's pure pieces: container paths rewritten to local ones, $(VAR) expansion."""

from pathlib import Path

import pytest

from .podrunner import Remap, expand, selected


@pytest.mark.parametrize("given, expected", [
    ("/data", "/L/data"),
    ("/data/", "/L/data/"),
    ("/data/out/x.safetensors", "/L/data/out/x.safetensors"),
    ("--out=/data/out", "--out=/L/data/out"),
    ("file:///data/base", "file:///L/data/base"),
    ("a /data b /data/c", "a /L/data b /L/data/c"),
    ("/database", "/database"),            # another path that only starts alike
    ("/srv/data", "/srv/data"),            # the mount path inside another path
    ("/data.bak", "/data.bak"),
    ("/data/sub/more", "/L/sub/more"),     # the longer mount wins
    ("/dev/termination-log", "/L/term"),
    ("", ""),
])
def test_remap_rewrites_whole_mount_paths_only(given, expected):
    remap = Remap({"/data": Path("/L/data"), "/data/sub": Path("/L/sub"),
                   "/dev/termination-log": Path("/L/term"), "/": Path("/ignored")})
    assert remap(given) == expected


def test_remap_without_mounts_and_none():
    assert Remap({})("/data") == "/data"
    assert Remap({"/x": Path("/y")})(None) is None


def test_expand_like_kubernetes():
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$$(A) $(MISSING) $", env) == "$(A) $(MISSING) $"
    assert expand(None, env) is None


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _pod(owners=(), annotations=None):
    refs = [_Obj(kind=k) for k in owners]
    return _Obj(metadata=_Obj(owner_references=refs, annotations=annotations))


@pytest.mark.parametrize("pod, runs", [
    (_pod(owners=["Job"]), True),
    (_pod(owners=["ReplicaSet"]), False),
    (_pod(annotations={"helm.sh/hook": "test"}), True),
    (_pod(annotations={"helm.sh/hook": "pre-install, test-success"}), True),
    (_pod(annotations={"helm.sh/hook": "pre-install"}), False),
    (_pod(annotations={"tests.deltafleet.dev/run-locally": "true"}), True),
    (_pod(), False),
])
def test_which_pods_the_runner_takes(pod, runs):
    assert selected(pod) is runs


@pytest.mark.parametrize("command, args, expected", [
    (None, None, ["deltafleet", "operator"]),                   # the image's ENTRYPOINT + CMD
    (None, ["crds"], ["deltafleet", "crds"]),                   # args replace CMD only
    (["sh", "-c"], None, ["sh", "-c"]),                         # command drops ENTRYPOINT and CMD
    (["python3"], ["-V"], ["python3", "-V"]),
])
def test_image_argv_follows_kubernetes_override_rules(command, args, expected):
    from .podrunner import image_argv

    c = _Obj(command=command, args=args)
    assert image_argv(c, {"Entrypoint": ["deltafleet"], "Cmd": ["operator"]}) == expected


def test_paths_inside_a_rootfs_follow_its_symlinks_there(tmp_path):
    from .sandbox import inside

    (tmp_path / "run").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to("/run")        # absolute: re-rooted, not the host's /run
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")             # relative, as in merged-/usr Debian
    assert inside(tmp_path, "/var/run/secrets/token") == tmp_path / "run" / "secrets" / "token"
    assert inside(tmp_path, "/bin/sh") == tmp_path / "usr" / "bin" / "sh"
    assert inside(tmp_path, "/models") == tmp_path / "models"
