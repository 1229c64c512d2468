"""The CLIs: a successful compress writes what a Job reports; every bad input is refused with a
one-line message naming what and where, and a non-zero exit (no traceback)."""

import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch

from deltafleet.cli import COMMANDS, main
from deltafleet.compress.result import CompressResult


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *argv, match: str) -> str:
    rc, _, err = run(capsys, *argv)
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err  # progress lines may precede it
    line = errors[0]
    assert match in line, line
    return line


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from deltafleet.toymodels import toy_eval_text, toy_pair, toy_train_text

    base, ft = toy_pair("llama")
    return {"base": str(base), "ft": str(ft), "cal": str(toy_train_text("llama")), "eval": str(toy_eval_text("llama"))}


FAST = ["--steps", "2", "--samples", "4", "--eval-samples", "4", "--seq-len", "64", "--lr", "1e-3"]


def test_compress_cli_writes_delta_result_and_termination_log(llama, tmp_path, capsys, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("DELTAFLEET_TERMINATION_LOG", str(log))
    rc, out, _ = run(capsys, "compress", "--base", llama["base"], "--finetuned", llama["ft"], "--out", str(tmp_path / "o"),
                     "--calibration", llama["cal"], "--eval-data", llama["eval"], *FAST)
    assert rc == 0
    assert "retained" in out
    result = CompressResult.model_validate_json(log.read_text())
    assert result == CompressResult.model_validate_json((tmp_path / "o" / "result.json").read_text())
    assert result.delta_uri == str((tmp_path / "o" / "delta.safetensors").resolve())

    rc, out, _ = run(capsys, "inspect", result.delta_uri)
    assert rc == 0 and "ratio" in out and "matrices" in out
    rc, out, _ = run(capsys, "inspect", "--json", result.delta_uri)
    info = json.loads(out)
    assert info["compressed_matrices"] == 28 and info["file_bytes"] == result.sizes.delta_bytes
    assert info["compression_ratio"] == pytest.approx(result.sizes.compression_ratio)


def test_missing_paths(llama, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    line = refused(capsys, "compress", "--base", missing, "--finetuned", llama["ft"], "--out", str(tmp_path / "o"),
                   match="no such folder")
    assert line.startswith("deltafleet compress: error: base ") and missing in line
    refused(capsys, "compress", "--base", llama["base"], "--finetuned", missing, "--out", str(tmp_path / "o"),
            match=f"fine-tune {missing}: no such folder")
    refused(capsys, "compress", "--base", llama["base"], "--finetuned", llama["ft"], "--out", str(tmp_path / "o"),
            "--calibration", missing, *FAST, match=f"calibration {missing}: no such file or folder")
    refused(capsys, "merge", "--base", llama["base"], "--delta", missing, "--out", str(tmp_path / "m"),
            match=f"{missing}: no such delta file")
    refused(capsys, "inspect", missing, match="no such delta file")


def test_not_a_safetensors_checkpoint(llama, tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(f"{llama['base']}/config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    refused(capsys, "compress", "--base", str(folder), "--finetuned", llama["ft"], "--out", str(tmp_path / "o"),
            match="only pickle .bin weights found")


def test_different_architectures(llama, tmp_path, capsys):
    from deltafleet.toymodels import toy_pair

    qwen_ft = str(toy_pair("qwen2")[1])
    line = refused(capsys, "compress", "--base", llama["base"], "--finetuned", qwen_ft, "--out", str(tmp_path / "o"),
                   match="different architectures")
    assert "LlamaForCausalLM" in line and "Qwen2ForCausalLM" in line


def test_different_shapes(llama, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(llama["base"])
    config.intermediate_size += 32
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    line = refused(capsys, "compress", "--base", llama["base"], "--finetuned", str(tmp_path / "wide"),
                   "--out", str(tmp_path / "o"), match="different shapes for model.layers.0.mlp")
    assert "(384, 128)" in line or "(128, 384)" in line


@pytest.fixture(scope="module")
def delta_file(llama, tmp_path_factory):
    from deltafleet.toymodels import toy_delta

    return toy_delta("llama")


def test_wrong_base_refused(llama, delta_file, tmp_path, capsys):
    line = refused(capsys, "merge", "--base", llama["ft"], "--delta", str(delta_file), "--out", str(tmp_path / "m"),
                   match="wrong base model")
    assert str(delta_file) in line
    assert not (tmp_path / "m").exists()


def test_wrong_base_real_process(llama, delta_file, tmp_path):
    """The installed command, as a Job would run it: exit code 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "deltafleet", "merge", "--base", llama["ft"], "--delta", str(delta_file),
                           "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "wrong base model" in errors[0]


def test_truncated_and_tampered_delta(delta_file, tmp_path, capsys):
    data = delta_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    line = refused(capsys, "inspect", str(truncated), match=str(truncated))
    assert "readable" in line or "truncated" in line
    tampered = tmp_path / "tampered.safetensors"
    flipped = bytearray(data)
    flipped[len(data) - 1000] ^= 0x01
    tampered.write_bytes(bytes(flipped))
    refused(capsys, "inspect", str(tampered), match="content hash mismatch")


def test_delta_for_other_architecture_refused(delta_file, tmp_path, capsys):
    from deltafleet.toymodels import toy_pair

    refused(capsys, "merge", "--base", str(toy_pair("qwen2")[0]), "--delta", str(delta_file), "--out", str(tmp_path / "m"),
            match="wrong base model")


def test_outputs_that_cannot_be_written_are_refused_before_any_work(llama, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out in (a_file, a_file / "under"):
        refused(capsys, "compress", "--base", llama["base"], "--finetuned", llama["ft"], "--out", str(out), *FAST,
                match=f"--out {out}: {a_file} is a file, not a folder")
    refused(capsys, "compress", "--base", llama["base"], "--finetuned", llama["ft"], "--out", str(tmp_path / "o"),
            "--termination-log", str(tmp_path / "missing" / "deep" / "log"), *FAST, match="--termination-log")
    assert not (tmp_path / "o").exists(), "nothing valid-looking is left behind"
    refused(capsys, "compress", "--base", llama["base"], "--finetuned", llama["ft"], "--out", str(tmp_path / "o"),
            "--device", "tpu9", *FAST, match="--device tpu9: expected auto, cpu, cuda or cuda:N")


def test_bad_text_is_refused_naming_its_flag(llama, tmp_path, capsys):
    common = ["compress", "--base", llama["base"], "--finetuned", llama["ft"], "--out", str(tmp_path / "o"), *FAST]
    elf = tmp_path / "program.txt"
    elf.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    refused(capsys, *common, "--calibration", str(elf), match=f"--calibration {elf}: not a text file (a NUL byte at offset 7)")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1") * 100)
    refused(capsys, *common, "--calibration", str(latin1), match="not UTF-8 text (invalid byte at offset 3)")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused(capsys, *common, "--calibration", llama["cal"], "--eval-data", str(empty),
            match=f"--eval-data {empty}: 0 tokens of text, fewer than one 64-token sample")
    assert not (tmp_path / "o").exists()


def test_a_fine_tune_that_is_its_base_is_refused(llama, tmp_path, capsys):
    refused(capsys, "compress", "--base", llama["base"], "--finetuned", llama["base"] + "/", "--out", str(tmp_path / "o"),
            *FAST, match="--base and --finetuned are the same model")


def test_a_gpt2_style_model_names_conv1d(llama, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=512, n_positions=128, bos_token_id=0, eos_token_id=0)
    for name in ("gpt-base", "gpt-ft"):
        GPT2LMHeadModel(cfg).save_pretrained(tmp_path / name)
    refused(capsys, "compress", "--base", str(tmp_path / "gpt-base"), "--finetuned", str(tmp_path / "gpt-ft"),
            "--out", str(tmp_path / "o"), *FAST, match="Conv1D layers (GPT-2 style), which deltafleet does not compress")


def test_merge_and_inspect_take_the_folder_compress_wrote_and_merge_never_overwrites(llama, delta_file, tmp_path, capsys):
    folder = delta_file.parent
    rc, out, _ = run(capsys, "inspect", str(folder))
    assert rc == 0 and str(delta_file) in out
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    refused(capsys, "merge", "--base", llama["base"], "--delta", str(folder), "--out", str(a_file), match="is a file")
    assert a_file.read_text() == "keep me"
    empty = tmp_path / "no-delta-here"
    empty.mkdir()
    refused(capsys, "inspect", str(empty), match=f"{empty}: a folder without delta.safetensors")
    rc, out, _ = run(capsys, "merge", "--base", llama["base"], "--delta", str(folder), "--out", str(tmp_path / "m"))
    assert rc == 0 and (tmp_path / "m" / "config.json").is_file()


def test_progress_is_one_line_per_stage_off_a_terminal(llama, tmp_path):
    """A Job's log is not a terminal: each stage prints when it starts and ends, no redrawn bars."""
    proc = subprocess.run([sys.executable, "-m", "deltafleet", "compress", "--base", llama["base"], "--finetuned", llama["ft"],
                           "--out", str(tmp_path / "o"), "--calibration", llama["cal"], "--eval-data", llama["eval"], *FAST],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr[-2000:]
    stages = [l for l in proc.stderr.splitlines() if l.startswith("[progress] ")]
    assert any("stage 1: sign + scale: started" in l for l in stages)
    assert any("stage 2: scale distillation (mse): done, 2 in" in l for l in stages)
    assert len(proc.stderr.splitlines()) < 40, proc.stderr


class _Parsed(Exception):
    """Raised instead of parsing: the parser a command built is all the walk below needs."""


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _parser_of(command: str, monkeypatch) -> argparse.ArgumentParser:
    import importlib

    built = []

    def capture(self, *args, **kwargs):
        built.append(self)
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        m.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        with pytest.raises(_Parsed):
            importlib.import_module(COMMANDS[command][0]).main([])
    return built[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_a_help_line_and_every_description_whole_sentences(command, monkeypatch):
    for parser in _parsers(_parser_of(command, monkeypatch)):
        no_help = [a.option_strings or [a.dest] for a in parser._actions if not (a.help or "").strip()]
        assert not no_help, f"{parser.prog}: without a help line: {no_help}"
        description = " ".join((parser.description or "").split())
        assert description, f"{parser.prog}: no description"
        assert description.endswith((".", "!", "?")), f"{parser.prog}: description cut mid-sentence: {description!r}"
