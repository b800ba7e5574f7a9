"""The Snakemake workflow: planning the paper grid, config validation, profiles, and a tiny grid run
end to end in a temporary copy of the repository (partial reruns by code fingerprint, data
regeneration byte for byte).

The end-to-end tests (marked ``workflow``) share one run of a tiny config (2 methods x 2 tasks x
1 seed, a few training steps) in a copy of the repository, so editing the copy's code never
touches the real tree.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args, cwd, snakefile=REPO / "Snakefile", env=None, timeout=900, check=True):
    """Run snakemake in ``cwd`` (the process's cwd and --directory, so relative paths such as
    --configfile resolve there) and return the CompletedProcess (text)."""
    cmd = [*SNAKEMAKE, "--snakefile", str(snakefile), "--directory", str(cwd), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def job_counts(output: str) -> dict[str, int]:
    """The dry run's 'Job stats' table as {rule: count}."""
    counts = {}
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("job") and "count" in line)
    except StopIteration:
        return counts
    for line in lines[start + 2:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def load_config(name):
    return yaml.safe_load((REPO / "config" / name).read_text())


def n_cells(cfg) -> int:
    lg = cfg["lengthgen"]
    sizes = lg["sizes"]
    n_sizes = sum(len(sizes[t]) if isinstance(sizes, dict) else len(sizes) for t in lg["tasks"])
    return len(lg["methods"]) * len(lg["seeds"]) * n_sizes


# ---------------------------------------------------------------------------------------------
# Planning (dry runs): fast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["paper.yaml", "gpu.yaml", "config.yaml"])
def test_dry_run_plans_one_training_job_per_cell(name, tmp_path):
    cfg = load_config(name)
    t0 = time.perf_counter()
    p = snakemake("-n", "--quiet", "rules", "--configfile", REPO / "config" / name, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    counts = job_counts(p.stdout)
    expected = n_cells(cfg)
    if name == "paper.yaml":  # 8 methods x 4 tasks x 3 seeds x 1 size per task
        assert expected == 8 * 4 * 3
    assert counts["train"] == expected
    assert counts["evaluate"] == expected
    assert counts["cell_config"] == expected
    n_data = sum(len(s) if isinstance(s := cfg["lengthgen"]["sizes"], list) else len(s[t]) for t in cfg["lengthgen"]["tasks"])
    assert counts["generate_train"] == n_data
    assert counts["generate_test"] == len(cfg["lengthgen"]["tasks"])
    assert counts["pack"] == n_data + len(cfg["lengthgen"]["tasks"])
    for rule in ("aggregate_lengthgen", "plot_lengthgen", "plot_kernels", "all"):
        assert counts[rule] == 1
    assert elapsed < 30, f"dry run took {elapsed:.1f}s"


def test_configs_cover_every_key_of_the_default():
    """A --configfile is merged over config/config.yaml by Snakemake: the presets must set every
    key the default sets, or smoke values would leak into paper runs."""

    def paths(d, prefix=()):
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("tasks",):
                yield from paths(v, prefix + (k,))
            else:
                yield prefix + (k,)

    default = set(paths(load_config("config.yaml")))
    for name in ("paper.yaml", "gpu.yaml"):
        other = set(paths(load_config(name)))
        # sizes may be a list in one file and a per-task mapping in the other
        missing = {p for p in default - other if not any(q[: len(p)] == p for q in other)}
        assert not missing, f"{name} lacks keys of config.yaml: {sorted(missing)}"


def _write_config(path, mutate):
    cfg = load_config("config.yaml")
    mutate(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["lengthgen"]["methods"].append("top0_softmax"), r"unknown attention method 'top0_softmax'"),
        (lambda c: c["lengthgen"]["methods"].append("entmax_3"), r"unknown attention method 'entmax_3'"),
        (lambda c: c["lengthgen"]["model"].update(n_embed=64), r"n_embed"),
        (lambda c: c["lengthgen"].update(tasks=["copy", "count"]), r"count"),
        (lambda c: c["lengthgen"]["model"].update(n_head=5), r"n_embd \(32\) must be divisible by n_head \(5\)"),
        (lambda c: c["lengthgen"]["data"].update(train_lengths=[16, 8]), r"train_lengths: min 16 > max 8"),
        (lambda c: c["lengthgen"]["train"].update(compile=3), r"compile"),
        (lambda c: c["lengthgen"].update(sizes={"copy": [100]}), r"lengthgen.sizes: no entry for task 'reverse'"),
        (lambda c: c.update(name="a/b"), r"name"),
    ],
)
def test_bad_config_is_refused_before_anything_runs(tmp_path, mutate, message):
    cfg = _write_config(tmp_path / "bad.yaml", mutate)
    p = snakemake("-n", "--configfile", cfg, cwd=tmp_path, check=False)
    assert p.returncode != 0
    assert re.search(message, p.stdout + p.stderr), (p.stdout + p.stderr)[-3000:]
    assert not (tmp_path / "results").exists()


def test_snakefile_does_not_import_torch(tmp_path):
    """The Snakefile is re-parsed in every cluster job: it must stay light (no torch)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, runpy\n"
        "sys.argv = ['snakemake', '-n', '--quiet', 'rules', '--snakefile', sys.argv[1], '--directory', sys.argv[2],\n"
        "            '--configfile', sys.argv[3]]\n"
        "from snakemake.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    p = subprocess.run([sys.executable, str(probe), str(REPO / "Snakefile"), str(tmp_path), str(REPO / "config" / "paper.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert "NO_TORCH" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]


def test_profiles_use_real_options_and_rules():
    help_text = subprocess.run([*SNAKEMAKE, "--help"], capture_output=True, text=True).stdout
    rules = {"generate_train", "generate_test", "pack", "cell_config", "train", "evaluate",
             "aggregate_lengthgen", "plot_lengthgen", "plot_kernels"}
    for name in ("local", "cluster"):
        profile = yaml.safe_load((REPO / "workflow" / "profiles" / name / "profile.yaml").read_text())
        for key in profile:
            assert f"--{key}" in help_text, f"{name}/profile.yaml: {key} is not a snakemake option"
        for rule in profile.get("set-resources", {}):
            assert rule in rules, f"{name}/profile.yaml: set-resources for unknown rule {rule}"
    cluster = yaml.safe_load((REPO / "workflow" / "profiles" / "cluster" / "profile.yaml").read_text())
    assert cluster["executor"] == "slurm"
    assert {"slurm_account", "slurm_partition"} <= set(cluster["default-resources"])
    assert cluster["set-resources"]["train"]["gpu"] == 1 and cluster["set-resources"]["evaluate"]["gpu"] == 1
    assert "runtime" not in cluster["set-resources"]["train"]  # keeps the rules' attempt-scaled runtime


def test_cluster_profile_plans_gpu_jobs(tmp_path):
    """The Slurm profile's resources reach the jobs (dry run; conda lines dropped: no conda here)."""
    prof = tmp_path / "cluster"
    prof.mkdir()
    text = (REPO / "workflow" / "profiles" / "cluster" / "profile.yaml").read_text()
    keep = [line for line in text.splitlines() if not line.startswith(("software-deployment-method", "conda-prefix"))]
    (prof / "profile.yaml").write_text("\n".join(keep) + "\n")
    p = snakemake("-n", "--profile", prof, "--configfile", REPO / "config" / "paper.yaml", cwd=tmp_path)
    train = p.stdout[p.stdout.index("rule train:"):]
    train = train[: train.index("Shell command")] if "Shell command" in train else train[:3000]
    resources = re.search(r"resources: (.*)", train).group(1)
    for item in ("slurm_account=my_account", "slurm_partition=gpu", "gpu=1", "cpus_per_gpu=8", "runtime=720", "mem_mb=64000"):
        assert item in resources, (item, resources)
    gen = p.stdout[p.stdout.index("rule generate_train:"):]
    gen_res = re.search(r"resources: (.*)", gen).group(1)
    assert "slurm_partition=cpu" in gen_res and "gpu=" not in gen_res, gen_res


# ---------------------------------------------------------------------------------------------
# End to end on a tiny grid, in a copy of the repository
# ---------------------------------------------------------------------------------------------

TINY_METHODS = ["softmax", "biweight"]
TINY_TASKS = ["copy", "mqmtar"]
TINY_LENGTHS = [8, 16, 32]


def tiny_config() -> dict:
    cfg = load_config("config.yaml")
    lg = cfg["lengthgen"]
    cfg["name"] = "tiny"
    lg.update(methods=TINY_METHODS, tasks=TINY_TASKS, seeds=[0], sizes=[96])
    lg["data"].update(validation_lengths=[16], validation_size=8, test_lengths=TINY_LENGTHS, test_size=8)
    lg["model"].update(n_layer=1, n_embd=16, n_head=2, pmem_size=8)
    lg["train"].update(batch_size=16, max_iters=4, warmup_iters=1, log_interval=2, checkpoint_interval=2, eval_interval=2)
    lg["eval"].update(batch_size=8, greedy_max_examples_per_length=2)
    return cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A copy of the repository (src/, Snakefile, workflow/, config/, envs/) and a finished tiny run in it."""
    root = tmp_path_factory.mktemp("wf")
    repo = root / "repo"
    for part in ("src", "workflow", "config", "envs"):
        shutil.copytree(REPO / part, repo / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(REPO / "Snakefile", repo / "Snakefile")
    work = root / "work"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    # The copied package is the one imported, fingerprinted and run (PYTHONPATH, and the workflow
    # puts the Snakefile's src/ first anyway).
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    run = dict(cwd=work, snakefile=repo / "Snakefile", env=env)
    t0 = time.perf_counter()
    p = snakemake("--cores", "2", "--configfile", "config.yaml", **run)
    return {"repo": repo, "work": work, "run": run, "seconds": time.perf_counter() - t0, "log": p.stderr}


def dry_run_counts(tiny_run, *targets) -> dict[str, int]:
    p = snakemake("-n", *targets, "--configfile", "config.yaml", **tiny_run["run"])  # --configfile takes 1+ values
    if "Nothing to be done" in p.stdout + p.stderr:
        return {}
    return job_counts(p.stdout)


@pytest.mark.workflow
def test_tiny_run_end_to_end(tiny_run):
    work = tiny_run["work"]
    res = work / "results" / "tiny"
    table = pd.read_parquet(res / "tables" / "lengthgen.parquet")
    expected = {
        "copy": {"exact_match", "token_accuracy", "loss", "greedy_exact_match"},
        "mqmtar": {"assoc_recall", "exact_match", "loss", "greedy_exact_match"},
    }
    for task, method, L in itertools.product(TINY_TASKS, TINY_METHODS, TINY_LENGTHS):
        rows = table[(table.task == task) & (table.method == method) & (table.test_length == L)]
        assert set(rows.metric) == expected[task], (task, method, L)
        assert len(rows) == len(expected[task])
    assert len(table) == sum(len(expected[t]) for t in TINY_TASKS) * len(TINY_METHODS) * len(TINY_LENGTHS)
    assert not table["value"].isna().any()
    assert table[[c for c in table.columns if c not in ("alpha", "k")]].notna().all().all()
    assert set(table.seed) == {0} and set(table["size"]) == {96}
    acc = table[table.metric != "loss"]["value"]
    assert ((acc >= 0) & (acc <= 1)).all()
    # per cell: the cell config the workflow wrote, the training outputs and the logs
    cell = res / "runs" / "lengthgen" / "copy" / "biweight" / "n96" / "s0"
    for f in ("cell.json", "model.pt", "checkpoint.pt", "curve.parquet", "train.log", "train_summary.json", "metrics.parquet"):
        assert (cell / f).stat().st_size > 0, f
    assert (res / "logs" / "train" / "lengthgen" / "copy" / "biweight" / "n96" / "s0.log").exists()
    for fig in ("lengthgen_accuracy", "kernels"):
        for ext in ("pdf", "png"):
            assert (res / "figures" / f"{fig}.{ext}").stat().st_size > 1000, f"{fig}.{ext}"
    assert (res / "tables" / "lengthgen_summary.html").read_text().startswith("<!DOCTYPE html>")
    # a second run has nothing to do
    p = snakemake("-n", "--configfile", "config.yaml", **tiny_run["run"])
    assert "Nothing to be done" in p.stdout + p.stderr, p.stdout[-3000:]


@pytest.mark.workflow
def test_report_builds(tiny_run):
    report = tiny_run["work"] / "results" / "tiny" / "report.html"
    snakemake("--report", report, "--configfile", "config.yaml", **tiny_run["run"])
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 10_000
    for name in ("lengthgen_accuracy.png", "kernels.png", "lengthgen.parquet", "lengthgen_summary.html"):
        assert name in html, name


@pytest.mark.workflow
def test_editing_plot_code_reruns_only_figures(tiny_run):
    module = tiny_run["repo"] / "src" / "sparse_mosaics" / "figures" / "lengthgen.py"
    original = module.read_bytes()
    try:
        module.write_bytes(original + b"\n# a comment changes the figures' code fingerprint\n")
        counts = dry_run_counts(tiny_run)
        assert counts, "editing plotting code must rerun the figures"
        assert set(counts) <= {"plot_lengthgen", "plot_kernels", "figures", "all"}, counts
        assert counts.get("plot_lengthgen") == 1
    finally:
        module.write_bytes(original)
    assert dry_run_counts(tiny_run) == {}


@pytest.mark.workflow
def test_editing_model_code_reruns_training(tiny_run):
    module = tiny_run["repo"] / "src" / "sparse_mosaics" / "model" / "mosaic.py"
    original = module.read_bytes()
    try:
        module.write_bytes(original + b"\n# a comment changes the training code fingerprint\n")
        counts = dry_run_counts(tiny_run)
        n = len(TINY_METHODS) * len(TINY_TASKS)
        assert counts.get("train") == n and counts.get("evaluate") == n, counts
        assert "generate_train" not in counts and "pack" not in counts, counts
    finally:
        module.write_bytes(original)
    assert dry_run_counts(tiny_run) == {}


@pytest.mark.workflow
def test_config_edits_rerun_only_affected_jobs(tiny_run):
    """Adding a method runs only the new cells; editing `eval` re-evaluates without retraining."""
    work = tiny_run["work"]
    cfg = tiny_config()
    cfg["lengthgen"]["methods"] = TINY_METHODS + ["top4_uniform"]
    (work / "more.yaml").write_text(yaml.safe_dump(cfg))
    p = snakemake("-n", "--configfile", "more.yaml", **tiny_run["run"])
    counts = job_counts(p.stdout)
    assert counts == {"cell_config": 2, "train": 2, "evaluate": 2, "aggregate_lengthgen": 1,
                      "plot_lengthgen": 1, "all": 1}, counts
    cfg = tiny_config()
    cfg["lengthgen"]["eval"]["batch_size"] = 4
    (work / "eval.yaml").write_text(yaml.safe_dump(cfg))
    p = snakemake("-n", "--configfile", "eval.yaml", **tiny_run["run"])
    counts = job_counts(p.stdout)
    n = len(TINY_METHODS) * len(TINY_TASKS)
    assert counts == {"cell_config": n, "evaluate": n, "aggregate_lengthgen": 1, "plot_lengthgen": 1, "all": 1}, counts


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.workflow
def test_deleted_data_folder_is_regenerated_byte_identical(tiny_run):
    res = tiny_run["work"] / "results" / "tiny" / "data" / "lengthgen"
    folders = [res / "mqmtar" / "n96", res / "copy" / "test"]
    before = {f: _hashes(f) for f in folders}
    assert all(len(h) > 5 for h in before.values())
    for f in folders:
        shutil.rmtree(f)
    # Everything downstream is up to date, so only the `data` target asks for the folders again.
    assert dry_run_counts(tiny_run) == {}
    counts = dry_run_counts(tiny_run, "data")
    assert counts == {"generate_train": 1, "generate_test": 1, "pack": 2, "data": 1}, counts
    snakemake("--cores", "2", "data", "--configfile", "config.yaml", **tiny_run["run"])
    for f in folders:
        assert _hashes(f) == before[f], f"{f} differs after regeneration"
    # byte-identical data (same checksums): nothing downstream is out of date
    assert dry_run_counts(tiny_run) == {}
