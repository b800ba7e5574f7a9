# Everything Python the rules need: config validation, the grid of cells, path patterns,
# wildcard constraints, code fingerprints and resource helpers. Rules stay declarative.
#
# Kept cheap on purpose: on a cluster this file is re-parsed in every job. No torch, no scan
# of results/.

import json
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")  # also fills the schema defaults

# ---------------------------------------------------------------------------------------------
# The package next to this Snakefile is the one fingerprinted *and* the one every job runs
# (PYTHONPATH below), so code fingerprints always describe the code that produced a result.
# ---------------------------------------------------------------------------------------------
SRC = Path(workflow.basedir) / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from sparse_mosaics import provenance  # noqa: E402  (no torch import)


from sparse_mosaics.attention import registry  # noqa: E402  (torch-free: method names only)

# The command every rule calls: `python -m sparse_mosaics.cli` on the package next to this
# Snakefile. The path is substituted at run time only; the rules' shell templates (Snakemake's
# "code" rerun trigger) stay independent of where the checkout lives. (Deliberately not a
# `params:` entry, which `snakemake --lint` suggests: an absolute path there would rerun every
# job when the checkout moves; the package code is tracked by the `code` params instead.)
CLI = (
    f"PYTHONPATH={shlex.quote(str(SRC))}${{PYTHONPATH:+:$PYTHONPATH}} "
    "python -m sparse_mosaics.cli"
)

# ---------------------------------------------------------------------------------------------
# Config checks the schema cannot express
# ---------------------------------------------------------------------------------------------
NAME = config["name"]
LG = config["lengthgen"]
RES = config["resources"]

for _method in LG["methods"]:
    if not registry.is_valid_method(_method):
        raise WorkflowError(
            f"config lengthgen.methods: unknown attention method {_method!r}. "
            f"Valid forms: {registry.VALID_FORMS}"
        )

if LG["model"]["n_embd"] % LG["model"]["n_head"]:
    raise WorkflowError(
        f"config lengthgen.model: n_embd ({LG['model']['n_embd']}) must be divisible by "
        f"n_head ({LG['model']['n_head']})"
    )

_lo, _hi = LG["data"]["train_lengths"]
if _lo > _hi:
    raise WorkflowError(f"config lengthgen.data.train_lengths: min {_lo} > max {_hi}")


def per_task(value, task, key):
    """A config value given either for every task (a list) or per task (a mapping)."""
    if isinstance(value, dict):
        if task not in value:
            raise WorkflowError(f"config {key}: no entry for task {task!r}")
        return value[task]
    return value


for _task in LG["tasks"]:
    per_task(LG["sizes"], _task, "lengthgen.sizes")
    per_task(LG["data"]["test_lengths"], _task, "lengthgen.data.test_lengths")


def task_sizes(task):
    return sorted(per_task(LG["sizes"], task, "lengthgen.sizes"))


def test_lengths(task):
    return sorted(per_task(LG["data"]["test_lengths"], task, "lengthgen.data.test_lengths"))


def task_data_params(task):
    """The generator parameters of one task (schema defaults filled in)."""
    return dict(LG["data"]["tasks"][task])


# ---------------------------------------------------------------------------------------------
# The grid: one cell per (task, size, method, seed), known from the config (no checkpoints).
# ---------------------------------------------------------------------------------------------
CELLS = [
    {"task": task, "method": method, "size": size, "seed": seed}
    for task in LG["tasks"]
    for size in task_sizes(task)
    for method in LG["methods"]
    for seed in LG["seeds"]
]


def _alternatives(values):
    return "|".join(sorted({str(v) for v in values}, key=lambda v: (-len(v), v)))


wildcard_constraints:
    task=_alternatives(LG["tasks"]),
    method=_alternatives(LG["methods"]),
    size=_alternatives(s for t in LG["tasks"] for s in task_sizes(t)),
    seed=_alternatives(LG["seeds"]),
    dataset=f"test|n({_alternatives(s for t in LG['tasks'] for s in task_sizes(t))})",


# ---------------------------------------------------------------------------------------------
# Path patterns (wildcards stay literal: these are plain strings, formatted by Snakemake)
# ---------------------------------------------------------------------------------------------
RESULTS = f"results/{NAME}"
LOGS = f"{RESULTS}/logs"
DATA = f"{RESULTS}/data/lengthgen/{{task}}"  # + /n<size> (train, validation) or /test
TRAIN_DATA = f"{DATA}/n{{size}}"
TEST_DATA = f"{DATA}/test"
CELL_ID = "lengthgen/{task}/{method}/n{size}/s{seed}"
CELL = f"{RESULTS}/runs/{CELL_ID}"
TABLE = f"{RESULTS}/tables/lengthgen.parquet"
TABLE_SUMMARY = f"{RESULTS}/tables/lengthgen_summary.html"
FIGURES = f"{RESULTS}/figures"


def cell_files(pattern, cells=None):
    """``pattern`` (with {task} {method} {size} {seed}) formatted for every cell."""
    return [pattern.format(**cell) for cell in (CELLS if cells is None else cells)]


def data_targets():
    out = []
    for task in LG["tasks"]:
        for size in task_sizes(task):
            out.append(f"{TRAIN_DATA}/packed/packed.json".format(task=task, size=size))
        out.append(f"{TEST_DATA}/packed/packed.json".format(task=task))
    return out


def table_targets():
    return [TABLE, TABLE_SUMMARY]


def figure_targets():
    return [
        f"{FIGURES}/{fig}.{ext}"
        for fig in ("lengthgen_accuracy", "kernels")
        for ext in ("pdf", "png")
    ]


# ---------------------------------------------------------------------------------------------
# Code fingerprints: a rule reruns when (and only when) the package code it runs changes.
# ---------------------------------------------------------------------------------------------
def code(scope, *extra):
    """Fingerprint of a provenance.CODE_SCOPES scope (the package files the rule's command
    uses, its CLI module included) plus ``extra`` package paths (e.g. "attention" for Figure 1,
    which draws the attention weights)."""
    try:
        return provenance.code_fingerprint(*provenance.CODE_SCOPES[scope], *extra)
    except FileNotFoundError as e:
        raise WorkflowError(f"code fingerprint of {scope!r}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Per-cell config (cell.json; CONTRACTS.md "Cell config")
# ---------------------------------------------------------------------------------------------
def cell_data(wildcards):
    return task_data_params(wildcards.task)


def cell_model(wildcards):
    return LG["model"]


def cell_train(wildcards):
    """The cell's train section; torch threads follow the rule's threads (resources.train)."""
    return {**LG["train"], "threads": RES["train"]["threads"]}


# Keys of the train section that do not change the trained weights (the trainer's resume check
# ignores them too): editing them rewrites cell.json but does not retrain. (compile changes only
# how the same model is executed: fused kernels round differently, the model and loss are the same.)
_OPERATIONAL_TRAIN_KEYS = ("threads", "checkpoint_interval", "compile")


def cell_train_weights(wildcards):
    return {k: v for k, v in LG["train"].items() if k not in _OPERATIONAL_TRAIN_KEYS}


def cell_eval(wildcards):
    return LG["eval"]


def cell_json(wildcards):
    """:func:`cell_config` as the text of cell.json."""
    return json.dumps(cell_config(wildcards), indent=2, sort_keys=True)


def cell_config(wildcards):
    """The cell config written to cell.json and read by `sparse-mosaics train/evaluate`."""
    return {
        "name": NAME,
        "experiment": "lengthgen",
        "task": wildcards.task,
        "method": wildcards.method,
        "seed": int(wildcards.seed),
        "size": int(wildcards.size),
        "data": cell_data(wildcards),
        "model": cell_model(wildcards),
        "train": cell_train(wildcards),
        "eval": cell_eval(wildcards),
    }


# ---------------------------------------------------------------------------------------------
# Resources (config section `resources`; site specifics live in the profiles)
# ---------------------------------------------------------------------------------------------
def threads_of(rule_name):
    return RES[rule_name]["threads"]


def runtime_of(rule_name):
    """Attempt-scaled runtime in minutes: a retried (e.g. timed-out) job gets k x the time."""
    base = RES[rule_name]["runtime"]

    def runtime(wildcards, attempt):
        return base * attempt

    return runtime


# ---------------------------------------------------------------------------------------------
# Command-line flags of `sparse-mosaics generate` (one --flag per generator parameter) and
# `sparse-mosaics aggregate`
# ---------------------------------------------------------------------------------------------
def _flags(options):
    parts = []
    for key, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        parts.append(f"--{key.replace('_', '-')} " + " ".join(shlex.quote(str(v)) for v in values))
    return " ".join(parts)


def generate_train_flags(wildcards):
    d = LG["data"]
    return _flags(
        {
            **task_data_params(wildcards.task),
            "seed": d["seed"],
            "min_len": d["train_lengths"][0],
            "max_len": d["train_lengths"][1],
            "val_lengths": sorted(d["validation_lengths"]),
            "val_size": d["validation_size"],
        }
    )


def generate_test_flags(wildcards):
    d = LG["data"]
    return _flags(
        {
            **task_data_params(wildcards.task),
            "seed": d["seed"],
            "test_lengths": test_lengths(wildcards.task),
            "test_size": d["test_size"],
        }
    )


def test_length_spec():
    """`--test-lengths TASK=L1,L2,...` of `sparse-mosaics aggregate`, once per task."""
    return " ".join(
        f"--test-lengths {task}=" + ",".join(str(L) for L in test_lengths(task)) for task in LG["tasks"]
    )
