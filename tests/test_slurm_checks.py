"""SLURM checks, job script and the two small CLIs, without a cluster (env dicts as srun sets)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mgpr.errors import ConfigError, MgprError, SlurmMismatchError
from mgpr.run.slurm import (
    SlurmTask,
    check_slurm_task,
    job_body,
    job_template,
    read_slurm_task,
    render_job_script,
    resolve_devices,
)

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "job.slurm"

# What a task of `sbatch --ntasks-per-node=2 --gpus=2 --cpus-per-task=2` saw on the local cluster
# (SLURM 22.05, see notes/slurm-local.md), trimmed to the variables that matter.
STEP_ENV = {
    "CUDA_VISIBLE_DEVICES": "0,1",
    "SLURM_CPUS_PER_TASK": "2",
    "SLURM_GPUS": "2",
    "SLURM_GPUS_ON_NODE": "2",
    "SLURM_JOB_GPUS": "0,1",
    "SLURM_JOB_ID": "16",
    "SLURM_JOBID": "16",
    "SLURM_JOB_NAME": "mgpr",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NNODES": "1",
    "SLURM_NODEID": "0",
    "SLURM_NPROCS": "2",
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_PROCID": "1",
    "SLURM_STEPID": "0",
    "SLURM_STEP_GPUS": "0,1",
    "SLURM_STEP_ID": "0",
    "SLURM_TASKS_PER_NODE": "2",
}
# The batch shell of the same job: SLURM_PROCID=0 but no step id.
BATCH_ENV = {k: v for k, v in STEP_ENV.items() if "STEP" not in k} | {"SLURM_PROCID": "0"}


def task(**changes: object) -> SlurmTask:
    """The task of STEP_ENV with some fields changed."""
    base = read_slurm_task(STEP_ENV)
    assert base is not None
    fields = {f: getattr(base, f) for f in SlurmTask.__slots__} | changes
    return SlurmTask(**fields)  # type: ignore[arg-type]


# ---- read_slurm_task ---------------------------------------------------------------------------


def test_read_step_env() -> None:
    assert read_slurm_task(STEP_ENV) == SlurmTask(
        job_id="16",
        ntasks=2,
        ntasks_per_node=2,
        nnodes=1,
        procid=1,
        localid=1,
        nodeid=0,
        cpus_per_task=2,
        gpus_on_node=2,
        cuda_visible_devices="0,1",
        job_name="mgpr",
        step_id="0",
    )


@pytest.mark.parametrize(
    "env", [{}, {"PATH": "/bin"}, BATCH_ENV, {"SLURM_JOB_ID": "3", "SLURM_NTASKS": "2"}]
)
def test_read_outside_a_step_is_none(env: dict[str, str]) -> None:
    assert read_slurm_task(env) is None


def test_read_plain_srun_without_optional_vars() -> None:
    # `srun -n 2 ...` outside sbatch: no SLURM_NTASKS_PER_NODE, no CPUs/GPUs variables.
    env = {
        "SLURM_PROCID": "0",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NAME": "bash",
    }
    t = read_slurm_task(env)
    assert t is not None
    assert (t.ntasks, t.ntasks_per_node, t.nnodes, t.cpus_per_task, t.gpus_on_node) == (
        2,
        None,
        1,
        None,
        None,
    )
    assert t.cuda_visible_devices is None and t.job_name == "bash"


def test_read_multi_node_and_repeat_counts() -> None:
    env = STEP_ENV | {
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS_PER_NODE": "2(x2)",
    }
    t = read_slurm_task(env)
    assert t is not None and (t.nnodes, t.ntasks, t.ntasks_per_node, t.nodeid) == (2, 4, 2, 1)


def test_read_garbage_is_an_error() -> None:
    with pytest.raises(SlurmMismatchError, match="SLURM_NTASKS='x'"):
        read_slurm_task(STEP_ENV | {"SLURM_NTASKS": "x"})


# ---- resolve_devices ---------------------------------------------------------------------------


def test_resolve_outside_slurm() -> None:
    assert resolve_devices(None, None, None) == (1, 1)
    assert resolve_devices(None, None, None, default_devices=4) == (4, 1)
    assert resolve_devices(None, 2, 3) == (2, 3)


def test_resolve_under_srun_defaults_to_slurm() -> None:
    assert resolve_devices(task(), None, None) == (2, 1)
    assert resolve_devices(task(ntasks=8, ntasks_per_node=4, nnodes=2), None, None) == (4, 2)
    assert resolve_devices(task(ntasks=4, ntasks_per_node=None, nnodes=2), None, None) == (2, 2)
    # explicit values are kept (check_slurm_task refuses them if they disagree)
    assert resolve_devices(task(), 1, 1) == (1, 1)


@pytest.mark.parametrize(
    ("devices", "nodes", "key"), [(0, None, "gpus=0"), (None, 0, "num_nodes=0")]
)
def test_resolve_rejects_below_one(devices: int | None, nodes: int | None, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        resolve_devices(task(), devices, nodes)


# ---- check_slurm_task: refusals ----------------------------------------------------------------


def check(t: SlurmTask, **kw: object) -> list[str]:
    args: dict[str, object] = {
        "devices": None,
        "num_nodes": None,
        "workers": 1,
        "accelerator": "auto",
        "cuda_device_count": 2,
    }
    return check_slurm_task(t, **(args | kw))  # type: ignore[arg-type]


def test_consistent_job_has_no_warnings() -> None:
    assert check(task()) == []
    assert check(task(), devices=2, num_nodes=1, workers=1, accelerator="gpu") == []


def test_gpus_disagrees_with_ntasks_per_node() -> None:
    with pytest.raises(SlurmMismatchError) as err:
        check(task(ntasks=1, ntasks_per_node=1), devices=2)
    assert str(err.value) == (
        "gpus=2 but sbatch --ntasks-per-node=1: submit with --ntasks-per-node=2 "
        "--gpus-per-node=2, or drop gpus=."
    )
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, MgprError)


def test_ntasks_without_ntasks_per_node() -> None:
    with pytest.raises(SlurmMismatchError) as err:
        check(task(ntasks_per_node=None))
    msg = str(err.value)
    assert "SLURM_NTASKS=2" in msg
    assert "submit with --ntasks-per-node=N instead of --ntasks" in msg


def test_step_tasks_disagree_with_ntasks_per_node_times_nodes() -> None:
    with pytest.raises(SlurmMismatchError, match=r"--ntasks-per-node=2 x --nodes=1 is 2"):
        check(task(ntasks=3))


def test_num_nodes_disagrees_with_nodes() -> None:
    with pytest.raises(SlurmMismatchError) as err:
        check(task(), num_nodes=2)
    assert str(err.value) == (
        "num_nodes=2 but sbatch --nodes=1: submit with --nodes=2, or drop num_nodes=."
    )


def test_more_ranks_than_gpus() -> None:
    t = task(ntasks=4, ntasks_per_node=4, gpus_on_node=2)
    with pytest.raises(SlurmMismatchError) as err:
        check(t, accelerator="gpu", cuda_device_count=2)
    msg = str(err.value)
    assert "sbatch --ntasks-per-node=4" in msg and "only 2 GPU(s)" in msg
    assert "--gpus-per-node=4" in msg and "--ntasks-per-node=2" in msg
    # auto with a GPU present is GPU mode too
    with pytest.raises(SlurmMismatchError):
        check(t, accelerator="auto", cuda_device_count=2)
    # CPU ranks may outnumber GPUs
    assert check(t, accelerator="cpu", cuda_device_count=2, workers=0) == []


def test_gpus_per_task_is_refused_with_its_flag() -> None:
    # --gpus-per-task=1: the node has 2 GPUs but each task sees only its own.
    t = task(cuda_visible_devices="1", gpus_on_node=2)
    with pytest.raises(SlurmMismatchError) as err:
        check(t, accelerator="gpu", cuda_device_count=1)
    msg = str(err.value)
    assert "instead of --gpus-per-task" in msg and "--gpus-per-node=2" in msg


def test_gpu_accelerator_without_gpu() -> None:
    with pytest.raises(SlurmMismatchError, match="accelerator=gpu but no GPU is visible"):
        check(task(), accelerator="gpu", cuda_device_count=0)


def test_workers_above_cpus_per_task() -> None:
    with pytest.raises(SlurmMismatchError) as err:
        check(task(cpus_per_task=4), workers=8)
    assert str(err.value) == (
        "workers=8 but sbatch --cpus-per-task=4: submit with --cpus-per-task=9, or set workers=3."
    )


# ---- check_slurm_task: warnings ----------------------------------------------------------------


def test_warns_cpu_fallback_when_slurm_gave_gpus_torch_cannot_see() -> None:
    warnings = check(task(), cuda_device_count=0)
    assert any(
        "CUDA_VISIBLE_DEVICES=0,1" in w and "falling back to CPU ranks (gloo)" in w
        for w in warnings
    )


@pytest.mark.parametrize("name", ["bash", "interactive"])
def test_warns_job_name_disabling_lightning_slurm(name: str) -> None:
    warnings = check(task(job_name=name))
    assert any(f"'{name}'" in w and "--job-name=mgpr" in w for w in warnings)


def test_warns_workers_without_cpus_per_task_and_workers_equal_cpus() -> None:
    assert any("--cpus-per-task=4" in w for w in check(task(cpus_per_task=None), workers=3))
    assert any("set workers=1" in w for w in check(task(cpus_per_task=2), workers=2))


def test_warns_idle_gpus() -> None:
    t = task(ntasks=1, ntasks_per_node=1)
    assert any("1 GPU(s) stay idle" in w for w in check(t, cuda_device_count=2))


# ---- job script --------------------------------------------------------------------------------


def test_job_template_flags() -> None:
    text = JOB.read_text()
    for line in (
        "#SBATCH --job-name=mgpr",
        "#SBATCH --gpus=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --output=slurm_logs/%j.out",
        "#SBATCH --error=slurm_logs/%j.err",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
    ):
        assert line in text.splitlines(), line
    # No --ntasks-per-node default: with one, `sbatch --ntasks=2` is refused by sbatch with no
    # hint; without, mgpr's preflight refuses it naming --ntasks-per-node.
    assert not any(ln.startswith("#SBATCH --ntasks") for ln in text.splitlines())
    assert (REPO / "slurm_logs").is_dir()


def test_the_template_exists_once_and_ships_in_the_package() -> None:
    """jobs/job.slurm is a link to the package's template, which importlib.resources reads."""
    assert JOB.is_symlink()
    assert JOB.resolve() == REPO / "mgpr" / "run" / "templates" / "job.slurm"
    assert job_template() == JOB.read_text()
    assert job_body() == JOB.read_text().split("set -euo pipefail\n", 1)[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_job_template_and_rendered_script_parse() -> None:
    subprocess.run(["bash", "-n", str(JOB)], check=True)
    text = render_job_script(2, 2, 4, "1-00:00:00", "gpu", "acc", "mgpr", ["a=b c", "x='y'"])
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def _run_job_locally(
    tmp_path: Path, script: Path, args: list[str], cpus: str | None, mgpr: str | None = None
) -> list[str]:
    """Run a job script outside SLURM with a fake srun; return the argv srun received.

    ``mgpr``: the mgpr the script runs in the batch shell; default a stand-in that exits 0.
    """
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake_srun = bindir / "srun"
    fake_srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS_FILE"\n')
    fake_srun.chmod(0o755)
    fake_mgpr = bindir / "mgpr"  # the batch shell's `mgpr --slurm-preflight ...` passes
    fake_mgpr.write_text("#!/bin/bash\nexit 0\n")
    fake_mgpr.chmod(0o755)
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_ID": "42",
        "MGPR_BIN": mgpr or str(fake_mgpr),
        "SRUN_ARGS_FILE": str(tmp_path / "srun.args"),
    } | ({"SLURM_CPUS_PER_TASK": cpus} if cpus else {})
    proc = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "=== mgpr job 42" in proc.stdout
    return (tmp_path / "srun.args").read_text().splitlines()


def test_job_template_adds_defaults_unless_given(tmp_path: Path) -> None:
    argv = _run_job_locally(tmp_path, JOB, ["input_path=/d/o.tif", "model=fasterrcnn"], "4")
    assert argv == [
        "--kill-on-bad-exit=1",
        str(tmp_path / "bin" / "mgpr"),
        "input_path=/d/o.tif",
        "model=fasterrcnn",
        "output_dir=runs/slurm-42",
        "workers=3",
        "progress=false",
    ]
    argv = _run_job_locally(tmp_path, JOB, ["output_dir=x", "workers=0", "progress=true"], "4")
    assert argv[2:] == ["output_dir=x", "workers=0", "progress=true"]
    argv = _run_job_locally(tmp_path, JOB, [], None)  # no --cpus-per-task: leave workers alone
    assert argv[2:] == ["output_dir=runs/slurm-42", "progress=false"]


MGPR_BIN = str(Path(sys.executable).parent / "mgpr")


def test_job_template_passes_config_file_flags_and_keeps_the_files_keys(tmp_path: Path) -> None:
    """-cp/-cn go through to srun; job.slurm's defaults do not override keys the file sets."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "ortho.yaml").write_text("output_dir: runs/ortho\nworkers: 1\ntile_size: 256\n")
    args = ["-cp", "conf", "--config-name=ortho", "model=null"]
    argv = _run_job_locally(tmp_path, JOB, args, "4", mgpr=MGPR_BIN)
    assert argv[1:] == [MGPR_BIN, *args, "progress=false"]
    argv = _run_job_locally(
        tmp_path, JOB, ["-cn", "ortho", "-cp", "conf", "workers=0"], "4", MGPR_BIN
    )
    assert argv[2:] == ["-cn", "ortho", "-cp", "conf", "workers=0", "progress=false"]


def test_rendered_script_with_a_config_file(tmp_path: Path) -> None:
    text = render_job_script(2, 1, 4, "01:00:00", None, None, "mgpr", ["-cp", "conf", "-cn", "o"])
    assert 'set -- -cp conf -cn o "$@"' in text.splitlines()
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "o.yaml").write_text("progress: true\n")
    script = tmp_path / "job.sh"
    script.write_text(text)
    argv = _run_job_locally(tmp_path, script, ["tile_size=256"], "4", mgpr=MGPR_BIN)
    # progress is the file's; output_dir and workers are job.slurm's defaults
    assert argv[2:] == [
        "-cp", "conf", "-cn", "o", "tile_size=256", "output_dir=runs/slurm-42", "workers=3"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="-cn needs a value"):
        render_job_script(1, 1, 1, "10", None, None, "x", ["-cn"])


def test_rendered_script(tmp_path: Path) -> None:
    text = render_job_script(
        gpus_per_node=4,
        nodes=2,
        cpus_per_task=8,
        time="04:00:00",
        partition="gpu",
        account="X",
        job_name="mgpr",
        overrides=["input_path=/data/my ortho.tif", "model=fasterrcnn"],
    )
    lines = text.splitlines()
    for opt in (
        "--job-name=mgpr",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--time=04:00:00",
        "--partition=gpu",
        "--account=X",
        "--output=slurm_logs/%j.out",
        "--signal=USR1@120",
        "--requeue",
        "--open-mode=append",
    ):
        assert f"#SBATCH {opt}" in lines, opt
    assert text.endswith(job_body())
    script = tmp_path / "job.sh"
    script.write_text(text)
    argv = _run_job_locally(tmp_path, script, ["tile_size=256"], "8")
    assert argv[2:5] == ["input_path=/data/my ortho.tif", "model=fasterrcnn", "tile_size=256"]
    assert "workers=7" in argv
    no_extras = render_job_script(1, 1, 1, "10", None, None, "x", [])
    assert (
        "--partition" not in no_extras
        and "--account" not in no_extras
        and "set --" not in no_extras
    )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"job_name": "bash"}, "--job-name=bash"),
        ({"time": "4h"}, "--time='4h'"),
        ({"nodes": 0}, "--nodes=0"),
        ({"gpus_per_node": 0}, "--gpus-per-node=0"),
        ({"partition": "gpu\n#SBATCH --x"}, "--partition="),
        ({"overrides": ["--gpus"]}, "'--gpus' is not a Hydra override"),
    ],
)
def test_render_rejects(kwargs: dict[str, object], needle: str) -> None:
    args: dict[str, object] = {
        "gpus_per_node": 1,
        "nodes": 1,
        "cpus_per_task": 1,
        "time": "01:00:00",
        "partition": None,
        "account": None,
        "job_name": "mgpr",
        "overrides": [],
    } | kwargs
    with pytest.raises(ConfigError) as err:
        render_job_script(**args)  # type: ignore[arg-type]
    assert needle in str(err.value)


# ---- mgpr-slurm-job ----------------------------------------------------------------------------

runner = CliRunner()


def test_cli_slurm_job_prints_script() -> None:
    from mgpr.cli.slurm_job import app

    args = ["--gpus-per-node", "4", "--nodes", "2", "--cpus-per-task", "8", "--time", "04:00:00"]
    args += [
        "--partition",
        "gpu",
        "--account",
        "X",
        "--",
        "input_path=/data/ortho.tif",
        "model=fasterrcnn",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "#SBATCH --ntasks-per-node=4" in result.stdout
    assert "set -- input_path=/data/ortho.tif model=fasterrcnn" in result.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--gpus-per-node", "1", "--", "gpus=2"], "gpus=2 but --gpus-per-node 1"),
        (["--", "num_nodes=3"], "num_nodes=3 but --nodes 1"),
        (["--cpus-per-task", "1", "--", "workers=4"], "workers=4 but --cpus-per-task 1"),
        (["--", "tile_size=abc"], "does not fit key `tile_size`, which expects int"),
        (["--", "model=resnet5"], "did you mean model=resnet50?"),
    ],
)
def test_cli_slurm_job_refuses_what_the_job_would(args: list[str], said: str) -> None:
    """Each rendered with exit 0 and failed only at the job's preflight, after the queue."""
    from mgpr.cli.slurm_job import app

    result = runner.invoke(app, args)
    assert result.exit_code == 2 and said in result.output, result.output
    ok = runner.invoke(app, ["--gpus-per-node", "2", "--cpus-per-task", "3", "--", "gpus=2"])
    assert ok.exit_code == 0, ok.output  # what the allocation holds is fine


def test_cli_slurm_job_output_file_and_force(tmp_path: Path) -> None:
    from mgpr.cli.slurm_job import app

    out = tmp_path / "job.sh"
    assert runner.invoke(app, ["--output", str(out)]).exit_code == 0
    assert out.read_text().startswith("#!/bin/bash") and os.access(out, os.X_OK)
    again = runner.invoke(app, ["--output", str(out)])
    assert again.exit_code == 2 and "pass --force" in again.stderr
    assert runner.invoke(app, ["--output", str(out), "--force", "--nodes", "3"]).exit_code == 0
    assert "#SBATCH --nodes=3" in out.read_text()


def test_cli_slurm_job_says_when_the_log_folder_is_missing(tmp_path: Path, monkeypatch) -> None:
    """sbatch does not create slurm_logs/: the job then fails at once and leaves no log."""
    from mgpr.cli.slurm_job import app

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["--", "model=null"])
    assert result.exit_code == 0 and result.stdout.startswith("#!/bin/bash")
    assert "has no slurm_logs/ folder: run `mkdir slurm_logs`" in result.stderr
    (tmp_path / "slurm_logs").mkdir()
    assert "slurm_logs" not in runner.invoke(app, ["--", "model=null"]).stderr


def test_cli_slurm_job_errors_are_one_line() -> None:
    from mgpr.cli.slurm_job import app

    bad_key = runner.invoke(app, ["--", "tile_sise=512"])
    assert bad_key.exit_code == 2
    assert bad_key.stderr.strip().splitlines() == [
        "unknown mgpr config key 'tile_sise' in override 'tile_sise=512': did you mean tile_size=?"
    ]
    bad_name = runner.invoke(app, ["--job-name", "interactive"])
    assert bad_name.exit_code == 2 and "--job-name=interactive" in bad_name.stderr
    assert runner.invoke(app, ["--nodes", "0"]).exit_code == 2  # typer's own range check


# ---- mgpr-doctor -------------------------------------------------------------------------------

LINE = re.compile(r"^(OK  |WARN|FAIL)  [\w ]+: .+")


def test_doctor_runs_here(tmp_path: Path) -> None:
    from mgpr.cli.doctor import app

    result = runner.invoke(app, ["--model", "resnet50", "--output-dir", str(tmp_path / "runs")])
    assert result.exit_code in (0, 1), result.output
    lines = result.stdout.splitlines()
    assert lines and all(LINE.match(line) for line in lines), lines
    checks = {line[6:].split(":", 1)[0] for line in lines}
    assert {
        "torch",
        "gpus",
        "nccl",
        "gloo",
        "rasterio",
        "slurm",
        "cpus",
        "shared memory",
        "weights resnet50",
        "disk",
    } <= checks
    assert (result.exit_code == 1) == any(line.startswith("FAIL") for line in lines)


def test_doctor_shared_memory_check(tmp_path: Path) -> None:
    from mgpr.cli.doctor import Status, check_shared_memory

    (ok,) = check_shared_memory(2, 8, 512)
    assert (
        ok.status is Status.OK and "need up to 0.08 GiB" in ok.line()
    )  # 2 x 7 x 8 x 3 x 512^2 bytes
    assert check_shared_memory(0, None, None)[0].finding.startswith("workers=0")
    (warn,) = check_shared_memory(64, 64, 4096)  # 64 x 7 x 64 x 48 MiB = 1.3 TiB: never fits
    assert warn.status is Status.WARN and "workers=64, batch_size=64, tile_size=4096" in warn.line()
    assert "--shm-size" in warn.line()
    (gone,) = check_shared_memory(2, 8, 512, path=str(tmp_path / "no-shm"))
    assert gone.status is Status.OK and "not checked" in gone.finding


def test_doctor_slurm_check_in_and_out_of_a_task(tmp_path: Path) -> None:
    from mgpr.cli.doctor import Accelerator, DoctorOptions, Status, check_slurm

    opts = DoctorOptions(4, None, Accelerator.AUTO, ("resnet50",), tmp_path)
    assert [f.line() for f in check_slurm({}, opts, 0)] == ["OK    slurm: not in a SLURM task"]
    assert "batch shell" in check_slurm(BATCH_ENV, opts, 0)[0].finding
    bad = check_slurm(STEP_ENV, opts, 0)  # workers=4 > --cpus-per-task=2
    assert bad[0].status is Status.FAIL and "--cpus-per-task=5" in bad[0].line()
    ok = check_slurm(STEP_ENV, DoctorOptions(1, None, Accelerator.AUTO, (), tmp_path), 0)
    assert [f.status for f in ok] == [Status.OK, Status.WARN]  # WARN: CPU fallback
    assert "falling back to CPU ranks" in ok[1].line()


def test_slurm_module_imports_no_torch_lightning_or_typer() -> None:
    code = (
        "import sys, mgpr.run.slurm; "
        "bad = [m for m in ('torch', 'lightning', 'typer') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---- batch-shell preflight (jobs/job.slurm runs `mgpr --slurm-preflight` before srun) -------

BATCH = {
    "SLURM_JOB_ID": "7",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_NODEID": "0",
    "SLURM_LOCALID": "0",
}


@pytest.mark.parametrize(
    ("env", "gpus", "workers", "flag"),
    [
        ({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}, 1, 0, "--ntasks-per-node=1"),
        ({"SLURM_NTASKS": "2"}, None, 0, "--ntasks-per-node=N instead of --ntasks"),
        ({"SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2"}, None, 0, "--ntasks-per-node=N"),
        (
            {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "2"},
            None,
            3,
            "--cpus-per-task=4",
        ),
    ],
)
def test_preflight_refuses_in_the_batch_shell(
    env: dict[str, str], gpus: int | None, workers: int, flag: str
) -> None:
    from mgpr.run.slurm import preflight

    with pytest.raises(SlurmMismatchError, match=re.escape(flag)):
        preflight(BATCH | env, gpus, None, workers)


def test_preflight_passes_a_consistent_job_and_outside_slurm() -> None:
    from mgpr.run.slurm import preflight, read_batch_allocation

    env = BATCH | {
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_CPUS_PER_TASK": "4",
    }
    preflight(env, 2, 2, 3)
    task = read_batch_allocation(env)
    assert task is not None and (task.ntasks, task.nnodes, task.procid) == (4, 2, 0)
    preflight({}, 8, 3, 99)  # not in a job: nothing to check
    assert read_batch_allocation({}) is None


def test_a_sigterm_under_srun_says_it_may_be_a_dead_rank() -> None:
    """srun --kill-on-bad-exit TERMs every task when one dies (the OOM killer): the others'
    line read as a plain interrupt; under a multi-task job it names how to tell."""
    from mgpr.run.predict import slurm_stop_hint

    env = {"SLURM_JOB_ID": "897", "SLURM_NTASKS": "2"}
    hint = slurm_stop_hint("SIGTERM", env, requeued=False)
    assert "rank N died and srun stopped the others" in hint
    assert "sacct -j 897 -o JobID,State,ExitCode,MaxRSS" in hint
    assert slurm_stop_hint("SIGINT", env, requeued=False) == ""  # Ctrl-C is the user's
    assert slurm_stop_hint("SIGTERM", env, requeued=True) == ""  # preempted and requeued
    assert "unless SLURM requeues job 897 itself, as on preemption" in hint  # a TERM may be
    one = slurm_stop_hint("SIGTERM", {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, False)
    assert "unless SLURM requeues job 1 itself" in one and "rank N died" not in one
    assert slurm_stop_hint("SIGTERM", {}, requeued=False) == ""  # not under SLURM


def test_doctor_fails_accelerator_gpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """mgpr refuses accelerator=gpu where torch sees no GPU; the doctor only warned (exit 0)."""
    import torch

    from mgpr.cli.doctor import Accelerator, Status, check_torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpus = {f.check: f for f in check_torch(Accelerator.GPU)}["gpus"]
    assert gpus.status == Status.FAIL and "accelerator=gpu asks for one" in gpus.finding
    assert {f.check: f for f in check_torch(Accelerator.AUTO)}["gpus"].status == Status.WARN


def test_srun_n2_without_ntasks_per_node_is_one_line_before_the_join(tmp_path: Path) -> None:
    """``srun -n2 mgpr ...`` run by hand (no job.slurm preflight): Lightning's SLURMEnvironment
    refused it inside the join with a traceback per rank and exit 1."""
    from conftest import mgpr_cmd, subprocess_env

    env = {k: v for k, v in STEP_ENV.items() if k != "SLURM_NTASKS_PER_NODE"}
    env |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    proc = subprocess.run(
        mgpr_cmd("use_fake_data=true", "model=null", f"output_dir={tmp_path / 'run'}"),
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mgpr: error: SLURM started 2 tasks (SLURM_NTASKS=2) without")


def test_usr1_requeues_only_an_attempt_that_finished_a_tile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--time shorter than the USR1 lead plus start-up: every attempt is warned before its
    first tile; requeued regardless, the job restarted forever (3 requeues of 0 tiles seen)."""
    import time

    from mgpr.run import signals
    from mgpr.run.predict import _has_published_parts

    calls: list[list[str]] = []

    def scontrol(cmd, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv("SLURM_JOB_ID", "135")
    monkeypatch.setattr(subprocess, "run", scontrol)
    assert signals.requeue_on_usr1("SIGUSR1", 0, progressed=False) is False and calls == []
    assert signals.requeue_on_usr1("SIGUSR1", 0, progressed=True) is True
    assert calls == [["scontrol", "requeue", "135"]]
    assert signals.requeue_on_usr1("SIGTERM", 0, progressed=True) is False  # SLURM's own
    # progress = a part published by this command (its manifest's mtime), not an earlier one's
    parts = tmp_path / "parts"
    parts.mkdir()
    earlier = parts / "r0-a-000001.manifest.parquet"
    earlier.write_bytes(b"x")
    os.utime(earlier, (time.time() - 3600, time.time() - 3600))
    started = time.time() - 60
    assert not _has_published_parts(tmp_path, started)
    (parts / "r0-b-000001.manifest.parquet").write_bytes(b"x")
    assert _has_published_parts(tmp_path, started)
