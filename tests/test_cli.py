"""The command line as its users expect it: job arrays, one JSON shape, results on stdout, help, --quiet."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from w4a8conv.cli import app
from w4a8conv.planning.planner import build_plan
from w4a8conv.reading.checkpoint import open_checkpoint

from .conftest import LEGACY_TARGET, cli


def _share_of(src, out, *args, env=None) -> tuple[int, dict, str]:
    result = CliRunner().invoke(
        app,
        ["convert", "--in", str(src), "--out", str(out), "--dry-run", "--json", "--target", LEGACY_TARGET, *args],
        env=env,
    )
    return result.exit_code, json.loads(result.stdout), result.stderr


@pytest.mark.parametrize(
    ("env", "index"),
    [
        ({"SLURM_ARRAY_TASK_ID": "2"}, 2),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"}, 2),  # sbatch --array=1-3
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}, 2),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_COUNT": "1"}, 2),  # explicit
        ({"JOB_COMPLETION_INDEX": "1"}, 1),  # a Kubernetes Indexed Job (completions: 3, completionMode: Indexed)
    ],
)
def test_the_array_index_comes_from_the_scheduler(source_checkpoints, tmp_path, env, index):
    src = source_checkpoints["mindie"]
    explicit = ("--array-index", "2") if env.get("SLURM_ARRAY_TASK_COUNT") == "1" else ()
    code, report, stderr = _share_of(src, tmp_path / "out", "--array-size", "3", *explicit, env=env)
    assert code == 0, stderr
    plan = build_plan(open_checkpoint(src), LEGACY_TARGET, array_size=3)
    assert list(report["share_shards"]) == list(plan.shares[index])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--array-size", "4"), "--array-size 4 without --array-index, and neither SLURM_ARRAY_TASK_ID nor"),
        (("--array-index", "1"), "--array-index 1 without --array-size"),
        (("--num-workers", "4"), "--num-workers is now --array-size: it splits the conversion into the jobs"),
        (("--worker-index", "1"), "--worker-index is now --array-index"),
        (("--array-size", "2", "--array-index", "0", "--verify"), "--verify in a job array"),
    ],
)
def test_a_job_array_is_said_in_full_or_refused(source_checkpoints, tmp_path, monkeypatch, args, message):
    for variable in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(variable, raising=False)
    code, _, stderr = cli("convert", "--in", source_checkpoints["mindie"], "--out", tmp_path / "out", *args)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_rerunning_one_slurm_task_the_usual_way_is_refused_not_taken_as_share_0(source_checkpoints, tmp_path):
    """`sbatch --array=2 script.sh` reruns task 2 as an array of one (SLURM_ARRAY_TASK_MIN=2): its index
    cannot be told, so it is refused with how to pass it, instead of converting share 0 again."""
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_COUNT": "1"}
    result = CliRunner().invoke(
        app,
        ["convert", "--in", str(source_checkpoints["mindie"]), "--out", str(tmp_path / "out"), "--array-size", "4"],
        env=env,
    )
    assert result.exit_code == 2 and "SLURM_ARRAY_TASK_COUNT=1 but --array-size 4" in result.stderr
    assert "pass --array-index" in result.stderr and not (tmp_path / "out").exists()


def test_a_failed_finalize_verify_publishes_nothing_and_a_plain_finalize_then_refuses(source_checkpoints, tmp_path):
    """finalize --verify verifies before it writes the description: a damaged share leaves the output
    visibly unfinished with the next step, and a retried plain finalize does not publish it after all."""
    src, out = source_checkpoints["v1.0.0-per-channel"], tmp_path / "out"
    for index in (0, 1):
        assert cli("convert", "--in", src, "--out", out, "--array-size", "2", "--array-index", str(index))[0] == 0
    shard = sorted(out.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # same size: the share still looks done
    shard.write_bytes(bytes(data))
    code, stdout, stderr = cli("finalize", out, "--verify", src)
    assert code == 1 and "not finalized, the verification failed" in stderr and "--array-index" in stderr
    assert "verification failed" in stdout  # the problems, listed
    assert not (out / "quant_model_description.json").exists() and (out / ".w4a8conv").is_dir()
    code, _, stderr = cli("finalize", out)
    assert code == 1 and "`finalize --verify` found it differs from its source" in stderr
    assert not (out / "quant_model_description.json").exists()
    code, _, stderr = cli("inspect", out)
    assert code != 0 and "unfinished" in stderr


def test_convert_verify_verifies_before_it_publishes(source_checkpoints, tmp_path, monkeypatch):
    src, out = source_checkpoints["v1.0.0-per-channel"], tmp_path / "out"
    from w4a8conv import verify as verify_module

    seen = []
    real = verify_module.verify_conversion

    def spy(src_, dst_, **options):
        seen.append((dst_ / "quant_model_description.json").exists())
        return real(src_, dst_, **options)

    monkeypatch.setattr(verify_module, "verify_conversion", spy)
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--verify")
    assert code == 0, stderr
    assert seen == [False] and (out / "quant_model_description.json").exists()


def test_finalize_verifies_and_a_retried_finalize_passes(source_checkpoints, tmp_path):
    src, out = source_checkpoints["mindie"], tmp_path / "out"
    for index in (0, 1):
        assert cli("convert", "--in", src, "--out", out, "--array-size", "2", "--array-index", str(index))[0] == 0
    code, stdout, _ = cli("finalize", out, "--verify", src, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["ok"] and report["verify"]["modules_checked"] == 30
    assert not report["already_finalized"]
    code, stdout, _ = cli("finalize", out)  # a retried CI step
    assert code == 0 and "already finalized" in stdout
    code, stdout, _ = cli("finalize", out, "--json")
    assert code == 0 and json.loads(stdout) == {"ok": True, "out_dir": str(out), "already_finalized": True}


def test_finalize_verify_fails_a_damaged_output(source_checkpoints, tmp_path):
    src, out = source_checkpoints["mindie"], tmp_path / "out"
    assert cli("convert", "--in", src, "--out", out, "--array-size", "1", "--array-index", "0")[0] == 0
    (out / "config.json").write_text("{}")
    code, stdout, _ = cli("finalize", out, "--verify", src)
    assert code == 1 and "verification failed" in stdout and "config.json" in stdout


def test_every_json_has_ok_first_and_the_same_names(source_checkpoints, converted_checkpoints, tmp_path):
    src, out = source_checkpoints["mindie"], tmp_path / "out"
    outputs = {
        "inspect": cli("inspect", src, "--json"),
        "dry-run": cli("convert", "--in", src, "--out", out, "--dry-run", "--json"),
        "convert": cli("convert", "--in", src, "--out", out, "--json"),
        "verify": cli("verify", src, out, "--json"),
        "synthetic": cli("synthetic", tmp_path / "syn", "--json"),
        "error": cli("inspect", tmp_path / "nowhere", "--json"),
    }
    reports = {name: json.loads(stdout) for name, (_, stdout, _) in outputs.items()}
    assert all(next(iter(r)) == "ok" for r in reports.values()), reports
    assert reports["error"] == {"ok": False, "error": f"{tmp_path / 'nowhere'}: not a directory"}
    for key in ("modules", "shards", "input_bytes", "output_bytes", "format", "group_size"):
        assert reports["inspect"][key] == reports["dry-run"][key] == reports["convert"][key], key
    assert reports["dry-run"]["in_dir"] == reports["convert"]["in_dir"] == reports["verify"]["in_dir"] == str(src)
    assert reports["dry-run"]["out_dir"] == reports["convert"]["out_dir"] == reports["verify"]["out_dir"] == str(out)
    assert reports["synthetic"]["out_dir"] == str(tmp_path / "syn")


def test_results_on_stdout_progress_on_stderr_json_or_not(source_checkpoints, tmp_path):
    src = source_checkpoints["mindie"]
    code, stdout, stderr = cli("convert", "--in", src, "--out", tmp_path / "a")
    assert code == 0 and stdout.startswith("converted mindie checkpoint") and "wrote " in stderr
    code, stdout, stderr = cli("convert", "--in", src, "--out", tmp_path / "b", "--json")
    assert code == 0 and json.loads(stdout)["ok"] and "wrote " in stderr
    code, stdout, stderr = cli("convert", "--in", src, "--out", tmp_path / "c", "--quiet")
    assert code == 0 and stdout == stderr == ""
    for command in (("verify", src, tmp_path / "a"), ("inspect", src), ("synthetic", tmp_path / "s")):
        code, stdout, _ = cli(*command)
        assert code == 0 and stdout, command
        quiet = (*command[:-1], tmp_path / "s-quiet") if command[0] == "synthetic" else command
        code, stdout, stderr = cli(*quiet, "-q")
        assert code == 0 and stdout == stderr == "", command


def test_verify_progress_says_verifying(source_checkpoints, converted_checkpoints, monkeypatch):
    monkeypatch.setattr("w4a8conv.cli.output.PROGRESS_INTERVAL", 0.0)
    code, _, stderr = cli("verify", source_checkpoints["mindie"], converted_checkpoints["mindie"])
    assert code == 0 and "verifying: " in stderr and "convert" not in stderr


def test_nothing_is_wrapped_or_printed_as_python(source_checkpoints, converted_checkpoints, tmp_path):
    deep = tmp_path / ("a-long-directory-name-" * 6) / "checkpoint"
    shutil.copytree(source_checkpoints["v1.0.0-per-channel"], deep)
    (deep / "quant_model_description.json").write_text(
        (deep / "quant_model_description.json").read_text().replace('"group_size": 0', '"group_size": 64')
    )
    code, stdout, _ = cli("inspect", deep)
    problem = next(line for line in stdout.splitlines() if "group_size is 64" in line)
    assert code == 2 and str(deep) in problem  # one line, however long
    untyped = tmp_path / "untyped"  # no W4A8 module left: no group size, no target that serves it
    shutil.copytree(source_checkpoints["mindie"], untyped)
    description = untyped / "quant_model_description.json"
    description.write_text(description.read_text().replace('"W4A8_DYNAMIC"', '"FLOAT"'))
    code, stdout, _ = cli("inspect", untyped)
    assert code == 2 and "None" not in stdout and "[]" not in stdout and "group size" in stdout


def test_help_and_module_entry_point():
    assert CliRunner().invoke(app, ["convert", "-h"]).exit_code == 0
    proc = subprocess.run([sys.executable, "-m", "w4a8conv", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("w4a8conv ")
    proc = subprocess.run([sys.executable, "-m", "w4a8conv", "-h"], capture_output=True, text=True)
    assert proc.returncode == 0 and "Usage: w4a8conv" in proc.stdout


def test_the_oldest_typer_tested_is_the_oldest_allowed():
    """pyproject.toml bounds Typer; `make test` runs the CLI tests on the lower bound, named in the Makefile."""
    root = Path(__file__).resolve().parent.parent
    spec = next(
        d for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"] if "typer" in d
    )
    floor, ceiling = re.fullmatch(r"typer>=([\d.]+),<([\d.]+)", spec).groups()
    oldest = re.search(r"^TYPER_OLDEST := typer==([\d.]+)$", (root / "Makefile").read_text(), re.M).group(1)
    assert oldest.startswith(floor) and tuple(map(int, version("typer").split(".")[:2])) < tuple(
        map(int, ceiling.split("."))
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--workers", "0"), "--workers 0: need at least 1"),
        (("--device", "cuda"), "--device cuda: torch sees no CUDA device"),
        (("--device", "tpu"), "--device tpu: choose one of"),
    ],
)
def test_a_dry_run_checks_every_argument_as_the_run_does(source_checkpoints, tmp_path, args, message):
    src = source_checkpoints["v1.0.0-per-channel"]
    runs = [
        cli("convert", "--in", src, "--out", tmp_path / name, *args, *more)
        for name, more in (("real", ()), ("dry", ("--dry-run",)))
    ]
    (real_code, _, real_err), (dry_code, _, dry_err) = runs
    assert real_code == dry_code == 2 and message in real_err and real_err == dry_err


def test_resume_of_a_finished_output_says_it_is_complete(source_checkpoints, tmp_path):
    src, out = source_checkpoints["v1.0.0-per-channel"], tmp_path / "out"
    assert cli("convert", "--in", src, "--out", out)[0] == 0
    code, stdout, _ = cli("convert", "--in", src, "--out", out, "--resume")
    assert code == 0 and f"{out} is already a complete conversion of {src}: nothing to do" in stdout
    code, stdout, _ = cli("convert", "--in", src, "--out", out, "--resume", "--json")
    assert code == 0 and json.loads(stdout)["already_complete"] is True


def test_finalize_of_an_interrupted_single_conversion_says_convert_resume(source_checkpoints, tmp_path, monkeypatch):
    from w4a8conv.converting import convert as convert_module

    src, out = source_checkpoints["v1.0.0-per-channel"], tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "_convert_shards", interrupted)
    assert cli("convert", "--in", src, "--out", out)[0] == 130
    monkeypatch.undo()
    code, _, stderr = cli("finalize", out)
    assert code == 1 and f"`w4a8conv convert --in {src.resolve()} --out {out} --resume`" in stderr
    other = source_checkpoints["mindie"]
    code, _, stderr = cli("convert", "--in", other, "--out", out, "--target", "vllm-ascend-0.23")
    assert code == 2 and "choose a new directory, or pass --overwrite to replace it" in stderr


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        (
            {"SLURM_ARRAY_TASK_ID": "5"},
            ("--array-size", "4"),
            "SLURM_ARRAY_TASK_ID=5 gives index 5, outside --array-size 4",
        ),
        ({"JOB_COMPLETION_INDEX": "9"}, ("--array-size", "2"), "JOB_COMPLETION_INDEX=9 gives index 9, outside"),
        ({}, ("--array-size", "0", "--array-index", "0"), "--array-size 0: must be positive"),
    ],
)
def test_an_array_index_out_of_range_names_where_it_came_from(source_checkpoints, tmp_path, env, args, message):
    result = CliRunner().invoke(
        app, ["convert", "--in", str(source_checkpoints["mindie"]), "--out", str(tmp_path / "o"), *args], env=env
    )
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_more_jobs_than_shards_warns_naming_the_empty_jobs(source_checkpoints, tmp_path):
    """An array job reports its index, the shards it wrote and that finalize is still needed."""
    src = source_checkpoints["v1.0.0-per-channel"]
    shards = len(list(src.glob("*.safetensors")))
    size = shards + 2
    code, stdout, stderr = cli(
        "convert", "--in", src, "--out", tmp_path / "o", "--array-size", size, "--array-index", 0, "--json"
    )
    assert code == 0, stderr
    empty = f"jobs {shards}, {shards + 1} have nothing to convert"
    assert f"warning: --array-size {size} but the output has {shards} shards: {empty}" in stderr
    report = json.loads(stdout)
    assert report["array_index"] == 0 and report["array_size"] == size and report["finalize_needed"] is True
    assert report["share_shards"] and report["empty_shares"] == [shards, shards + 1]


def test_argument_errors_typer_catches_are_one_json_document_with_json():
    for argv in (["convert", "--json", "--in", "x"], ["verify", "--json"], ["inspect", "--json", "--bogus", "x"]):
        done = subprocess.run([sys.executable, "-m", "w4a8conv", *argv], capture_output=True, text=True)
        assert done.returncode == 2, argv
        report = json.loads(done.stdout)
        assert report["ok"] is False and report["error"], argv
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr


def test_help_is_complete_at_80_columns_in_a_pipe():
    """No word cut to fit a column, square brackets shown as they are, --json a flag, -V beside --version."""
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    for argv in ([], ["convert"], ["inspect"], ["verify"], ["finalize"], ["synthetic"]):
        done = subprocess.run(
            [sys.executable, "-m", "w4a8conv", *argv, "--help"], capture_output=True, text=True, env=env
        )
        commands = done.stdout.split("Commands:")[1] if "Commands:" in done.stdout else ""
        assert done.returncode == 0 and "…" not in done.stdout and "..." not in commands
        assert all(len(line) <= 80 for line in done.stdout.splitlines()), argv
    convert = subprocess.run(
        [sys.executable, "-m", "w4a8conv", "convert", "-h"], capture_output=True, text=True, env=env
    )
    text = " ".join(convert.stdout.split())
    assert "SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN)" in text and "[auto|cpu|cuda|npu]" in text
    assert "--json Print one JSON object" in text
    top = subprocess.run([sys.executable, "-m", "w4a8conv", "-h"], capture_output=True, text=True, env=env).stdout
    assert "-V, --version" in top


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.8])
def test_ctrl_c_at_any_moment_is_one_line_and_130(source_checkpoints, tmp_path, delay):
    """Start-up (Python importing the modules), parsing, or the conversion itself: one line, exit 130."""
    src = source_checkpoints["v1.0.0-per-channel"]
    command = [os.path.join(os.path.dirname(sys.executable), "w4a8conv"), "convert", "--in", str(src), "--out"]
    process = subprocess.Popen([*command, str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    if process.returncode in (0, -signal.SIGINT):
        pytest.skip("finished before the signal, or signalled before Python ran any of its code")
    errors = [line for line in stderr.splitlines() if not line.startswith("[")]  # progress lines: "[  0.3s] ..."
    assert process.returncode == 130 and len(errors) == 1 and errors[0].startswith("error: "), stderr
    assert "SIGINT" in errors[0] and "Traceback" not in stderr


def test_an_assumed_model_dtype_is_said_and_dtype_sets_it(source_checkpoints, tmp_path):
    """msModelSlim's old API writes no config.json: the dtype the scales are rounded to is assumed, said
    once on stderr, and --dtype sets it (recorded in the artifact contract the plugin checks)."""
    src = tmp_path / "src"
    shutil.copytree(source_checkpoints["v1.0.0-per-group"], src)
    (src / "config.json").unlink()
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "a")
    assert code == 0 and "no config.json: assuming the model serves in bfloat16" in stderr and "--dtype" in stderr
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "b", "--dtype", "float16")
    assert code == 0 and "assuming" not in stderr
    section = json.loads((tmp_path / "b" / "quant_model_description.json").read_text())["w4a8conv"]
    assert section["params_dtype"] == "float16"
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "c", "--dtype", "int8")
    assert code == 2 and "--dtype int8: choose one of bfloat16, float16, float32" in stderr
    report = json.loads(cli("inspect", src, "--json")[1])
    assert report["params_dtype"].startswith("bfloat16 (assumed: no config.json")


def test_the_same_words_and_numbers_for_the_same_things(tmp_path):
    """synthetic, inspect and convert count the same bytes; the input is in_dir in every JSON; one shard
    is "1 shard"; group size 0 reads per-channel."""
    src = tmp_path / "src"
    made = json.loads(cli("synthetic", src, "--layout", "v1.0.0-per-channel", "--shards", "1", "--json")[1])
    inspected = json.loads(cli("inspect", src, "--json", "--target", "vllm-ascend-0.25")[1])
    dry = json.loads(cli("convert", "--in", src, "--out", tmp_path / "o", "--dry-run", "--json")[1])
    assert made["input_bytes"] == inspected["input_bytes"] == dry["input_bytes"]
    assert inspected["in_dir"] == str(src) and dry["in_dir"] == str(src) and "path" not in inspected
    code, stdout, _ = cli("convert", "--in", src, "--out", tmp_path / "o", "--dry-run", "--target", "vllm-ascend-0.25")
    assert code == 0 and "(per-channel)" in stdout and "into 1 shard," in stdout


def test_quiet_hides_progress_never_the_error_line(source_checkpoints, tmp_path):
    src, out = source_checkpoints["v1.0.0-per-channel"], tmp_path / "out"
    assert cli("convert", "--in", src, "--out", out, "-q")[0] == 0
    code, stdout, stderr = cli("convert", "--in", src, "--out", out, "-q")
    assert (
        code == 2
        and stdout == ""
        and stderr == f"error: --out {out}: holds a finished conversion; pass --overwrite to replace it\n"
    )


def test_a_failed_convert_verify_publishes_nothing_and_says_resume(source_checkpoints, tmp_path, monkeypatch):
    from w4a8conv import verify as verify_module
    from w4a8conv.verify.report import VerifyReport

    def failing(src, dst, **options):
        report = VerifyReport()
        report.problem(f"{dst}/x.safetensors: sha256 differs")
        return report

    monkeypatch.setattr(verify_module, "verify_conversion", failing)
    src, out = source_checkpoints["v1.0.0-per-channel"], tmp_path / "out"
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--verify")
    assert code == 1 and "not finalized, the verification failed" in stderr
    assert f"`w4a8conv convert --in {src.resolve()} --out {out} --resume --verify`" in stderr
    assert not (out / "quant_model_description.json").exists()


def test_importing_the_cli_elsewhere_leaves_the_signal_handlers_alone():
    """Only the command itself turns Ctrl-C during start-up into one line: a test runner (`python -m
    pytest`, whose __main__.py is not ours) or a library importing w4a8conv.cli keeps Python's own."""
    code = (
        "import sys, signal; sys.argv = ['/venv/lib/site-packages/pytest/__main__.py']; import w4a8conv.cli; "
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr


def test_check_engine_says_in_one_line_where_it_cannot_drive_the_engine(converted_checkpoints, tmp_path):
    """Here vLLM and vllm-ascend are not installed (make test-engine runs it against the real 0.23 code)."""
    code, stdout, stderr = cli("check-engine", converted_checkpoints["v1.0.0-per-channel"])
    assert code == 2 and stdout == ""
    assert stderr.startswith("error: check-engine: vLLM and vllm-ascend cannot be imported here (")
    assert stderr.count("\n") == 1
    code, _, stderr = cli("check-engine", tmp_path)
    assert code == 2 and f"{tmp_path}: no quant_model_description.json" in stderr
    code, _, stderr = cli("check-engine", converted_checkpoints["mindie"], "--tp", "0")
    assert code == 2 and "--tp 0: must be positive" in stderr
