# Aggregation: every cell's metrics.parquet -> one tidy experiment table, checked for
# completeness (every cell x test length x metric present, no NaN), plus an HTML summary
# (mean and spread over seeds) for the report.


rule aggregate_lengthgen:
    input:
        cell_files(f"{CELL}/metrics.parquet"),
    output:
        table=report(
            TABLE,
            caption="../report/lengthgen_table.rst",
            category="Tables",
            labels={"experiment": "lengthgen", "file": "all metrics (Parquet)"},
        ),
        summary=report(
            TABLE_SUMMARY,
            caption="../report/lengthgen_summary.rst",
            category="Tables",
            labels={"experiment": "lengthgen", "file": "summary over seeds"},
        ),
    params:
        test_lengths=test_length_spec(),
        code=code("aggregate"),
    log:
        f"{LOGS}/aggregate/lengthgen.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{CLI} aggregate --experiment lengthgen --out {output.table} --summary {output.summary} "
        "{params.test_lengths} {input} > {log} 2>&1"


rule tables:
    input:
        table_targets(),
    localrule: True
