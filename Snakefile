# sparse-mosaics: "Sparse Attention as Compact Kernel Regression" as one Snakemake DAG.
#
#   generate data -> pack -> train one Memory Mosaic per (task x method x size x seed) cell
#   -> evaluate every test length -> results/<name>/tables/*.parquet -> figures -> report
#
#   snakemake --cores 2                                     # the smoke grid (config/config.yaml)
#   snakemake -n --configfile config/paper.yaml             # plan the paper grid
#   snakemake --profile workflow/profiles/cluster --configfile config/paper.yaml
#   snakemake --report results/<name>/report.html           # HTML report of figures and tables
#
# All logic lives in the Python package (src/sparse_mosaics) behind `sparse-mosaics <command>`;
# the rules only wire files together. Nothing here imports torch (this file is re-parsed in
# every cluster job).

from snakemake.utils import min_version

min_version("9.19")


configfile: "config/config.yaml"  # relative to the working directory (--directory)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/figures.smk"


rule all:
    default_target: True
    input:
        table_targets(),
        figure_targets(),
