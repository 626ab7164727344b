"""A conversion's choices live in its plan: an interrupted conversion finishes with the command it prints,
pasted, whatever --target or --dtype it was started with; a contradiction names the option and both values;
no hint advises --overwrite while the directory holds this input's unfinished work."""

from __future__ import annotations

import json

import pytest

from w4a8conv.converting import convert as convert_module
from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.errors import W4A8ConvError
from w4a8conv.names import DESCRIPTION_FILE, STATE_DIR, TOOL_SECTION

from .conftest import cli, paste
from .test_parallel import tree_bytes


def interrupted(monkeypatch, src, out, **options) -> str:
    """Start a conversion and stop it with Ctrl-C once its plan is saved: the line it ends with."""
    real = convert_module._convert_shards

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "_convert_shards", stop)
    with pytest.raises(W4A8ConvError) as stopped:
        convert_checkpoint(src, out, **options)
    monkeypatch.setattr(convert_module, "_convert_shards", real)
    assert (out / STATE_DIR / "job.json").is_file() and not (out / DESCRIPTION_FILE).exists()
    return str(stopped.value)


@pytest.mark.parametrize(
    "options",
    [{"target": "vllm-ascend-0.23"}, {"dtype": "float16", "force_dtype": True}, {"checksums": False}],
    ids=["target", "dtype", "checksums"],
)
def test_the_printed_command_finishes_an_interrupted_conversion_with_its_choices(
    monkeypatch, source_checkpoints, tmp_path, options
):
    src, out = source_checkpoints["v1.0.0-per-channel"], tmp_path / "out"
    line = interrupted(monkeypatch, src, out, **options)
    assert line.endswith(f"finish it with `w4a8conv convert --in {src} --out {out} --resume`")
    result = paste(line)
    assert result.exit_code == 0, result.stderr
    convert_checkpoint(src, tmp_path / "straight", **options)
    assert tree_bytes(out) == tree_bytes(tmp_path / "straight")


def test_a_contradicting_option_is_refused_naming_both_values(monkeypatch, source_checkpoints, tmp_path):
    src, out = source_checkpoints["v1.0.0-per-channel"], tmp_path / "out"
    interrupted(monkeypatch, src, out, target="vllm-ascend-0.23")
    for args in (["--resume"], ["--resume", "--dry-run"]):
        code, _, stderr = cli("convert", "--in", src, "--out", out, *args, "--target", "vllm-ascend-0.25")
        assert code == 2 and stderr.count("\n") == 1
        assert (
            f"--out {out}: this conversion was started with --target vllm-ascend-0.23, not --target "
            "vllm-ascend-0.25; drop --target or pass the same"
        ) in stderr
    code, stdout, _ = cli("convert", "--in", src, "--out", out, "--resume", "--dry-run", "--json", "--target", "x")
    assert code == 2
    code, stdout, stderr = cli("convert", "--in", src, "--out", out, "--resume", "--dry-run", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["target"] == "vllm-ascend-0.23"  # the dry run takes the plan's choices too


def test_a_plain_rerun_names_what_differs_and_never_advises_overwrite(monkeypatch, source_checkpoints, tmp_path):
    src, out = source_checkpoints["v1.0.0-per-channel"], tmp_path / "out"
    interrupted(monkeypatch, src, out, target="vllm-ascend-0.23")
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--target", "vllm-ascend-0.25")
    assert code == 2 and "--overwrite" not in stderr
    assert "holds an unfinished conversion of this input started with --target vllm-ascend-0.23" in stderr
    assert paste(stderr).exit_code == 0
    section = json.loads((out / DESCRIPTION_FILE).read_text())[TOOL_SECTION]
    assert section["target"] == "vllm-ascend-0.23"


def test_dtype_contradicting_config_json_needs_force_dtype(source_checkpoints, tmp_path):
    src = source_checkpoints["v1.0.0-per-channel"]  # config.json: torch_dtype bfloat16
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "out", "--dtype", "float16")
    assert code == 2 and not (tmp_path / "out").exists()
    assert f"--dtype float16: {src / 'config.json'} declares torch_dtype bfloat16" in stderr
    assert "pass --force-dtype to convert for float16" in stderr
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "dry", "--dtype", "float16", "--dry-run")
    assert code == 2 and "declares torch_dtype bfloat16" in stderr
    assert cli("convert", "--in", src, "--out", tmp_path / "same", "--dtype", "bfloat16")[0] == 0
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "out", "--dtype", "float16", "--force-dtype")
    assert code == 0, stderr
    assert json.loads((tmp_path / "out" / DESCRIPTION_FILE).read_text())[TOOL_SECTION]["params_dtype"] == "float16"


def test_an_interrupted_share_of_an_array_reruns_by_pasting_its_line(monkeypatch, source_checkpoints, tmp_path):
    src, out = source_checkpoints["v1.0.0-per-channel"], tmp_path / "out"
    line = interrupted(monkeypatch, src, out, target="vllm-ascend-0.23", array_size=2, array_index=1)
    assert line.endswith(f"finish it with `w4a8conv convert --in {src} --out {out} --array-size 2 --array-index 1`")
    assert paste(line).exit_code == 0
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--array-size", "2", "--array-index", "0")
    assert code == 0, stderr  # the first job's choices, taken from the plan (cli adds the same --target)
    assert cli("finalize", out)[0] == 0
    convert_checkpoint(src, tmp_path / "straight", target="vllm-ascend-0.23")
    assert tree_bytes(out) == tree_bytes(tmp_path / "straight")
