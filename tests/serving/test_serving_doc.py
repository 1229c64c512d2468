"""docs/serving.md's "Run a pool" example, replayed as tests/images/test_deploy_doc.py replays
docs/deploy.md: the page's `<!-- replay -->` blocks, run as written (`pool.yaml` from the page,
`deltafleet serve --config pool.yaml` as a real process on a real local Ray) against the serving
toy model laid out where the page's `/models` paths point. The one change made to the page's
file: `/models` is a temporary folder, and on a machine without CUDA its `num_gpus: 1` is 0.
The example sets `auth: none`, so the tenant answers without a key, and what it answers is what
the merged fine-tune generates."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from images.test_deploy_doc import commands, replay_blocks
from ports import free_port

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
TENANT = "team-a/support-bot"  # the tenant and base folder the page's pool.yaml names
BASE_FOLDER = "llama-2-7b"
SERVED_AS = "team-a/alpha"  # the toy delta laid out as that tenant's
PROMPT = "The quick brown fox"


def page_blocks() -> tuple[list[str], str]:
    """(the commands, pool.yaml) of the page's "Run a pool" section."""
    text = DOC.read_text()
    section = text[text.index("### Run a pool"):]
    section = section[: section.index("\n### ", 1)]
    blocks = replay_blocks(section)
    files = {name: body for name, body in blocks if name}
    return [c for name, body in blocks if name is None for c in commands(body)], files["pool.yaml"]


def test_the_page_has_the_blocks_the_replay_needs():
    lines, pool_yaml = page_blocks()
    assert lines == ["deltafleet serve --config pool.yaml          # local Ray; prints http://127.0.0.1:8000/<pool>/v1"]
    for needed in ("auth: none", "/models/", BASE_FOLDER, TENANT, "num_gpus: 1"):
        assert needed in pool_yaml, needed


def on_this_machine(pool_yaml: str, store: Path) -> str:
    import torch

    text = pool_yaml.replace("/models", str(store))
    return text if torch.cuda.is_available() else text.replace("num_gpus: 1", "num_gpus: 0")


@pytest.fixture(scope="module")
def pool(toy, tmp_path_factory):
    """The page's pool, started by the page's command; yields its printed endpoint."""
    lines, pool_yaml = page_blocks()
    work = tmp_path_factory.mktemp("serving-doc")
    store = work / "models"
    shutil.copytree(toy.base_dir, store / BASE_FOLDER)
    delta = store / "deltas" / TENANT / "g1" / "delta.safetensors"
    delta.parent.mkdir(parents=True)
    shutil.copy(toy.deltas[SERVED_AS], delta)
    (work / "pool.yaml").write_text(on_this_machine(pool_yaml, store))
    port = free_port()
    (command,) = lines
    argv = shlex.split(command, comments=True)
    argv[0] = str(Path(sys.executable).parent / argv[0])  # the venv's deltafleet
    ray_dir = tempfile.mkdtemp(prefix="dfdoc-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([*argv, "--port", str(port)], cwd=work, env={**env, "RAY_TMPDIR": ray_dir},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("serving; Ctrl-C to stop" in line for line in said):
            assert proc.poll() is None, "".join(said)
            assert time.monotonic() < deadline, "".join(said)
            time.sleep(0.5)
        (url,) = [m.group(1) for line in said if (m := re.match(r"llama2-7b: (\S+)", line))]
        yield url, said
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as the command says: it stops Serve and its Ray
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its Ray outlived it
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_the_page_serves_the_tenant_without_a_key(pool, toy, reference_greedy):
    url, said = pool
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/llama2-7b/v1", url), said
    base = url.removesuffix("/v1")
    deadline = time.monotonic() + 120
    while True:  # the page: a tenant loads in the background after the pool is RUNNING
        states = httpx.get(f"{base}/-/tenants", timeout=10).json()["tenants"]
        if states.get(TENANT, {}).get("state") == "ready" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert states[TENANT]["state"] == "ready", states
    r = httpx.post(f"{url}/completions", json={"model": TENANT, "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200, r.text  # no key: the page's auth: none
    ids = toy.tokenizer(PROMPT).input_ids
    want = toy.tokenizer.decode(reference_greedy(toy.merged_dirs[SERVED_AS], ids, 12), skip_special_tokens=True)
    assert r.json()["choices"][0]["text"] == want
