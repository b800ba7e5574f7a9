# Evaluation: one deterministic pass over every test shard of the cell's task, teacher-forced
# (exact_match, token_accuracy / assoc_recall, loss) plus greedy decoding where configured.
# Output: the cell's tidy metrics.parquet (one row per test length x metric, provenance columns).


rule evaluate:
    input:
        cell=f"{CELL}/cell.json",
        model=f"{CELL}/model.pt",
        summary=f"{CELL}/train_summary.json",
        data=f"{TEST_DATA}/packed/packed.json",
    output:
        f"{CELL}/metrics.parquet",
    params:
        code=code("evaluate"),
    log:
        f"{LOGS}/evaluate/{CELL_ID}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{CELL_ID}.tsv"
    threads: threads_of("evaluate")
    resources:
        gpu=RES["evaluate"]["gpu"],
        runtime=runtime_of("evaluate"),
        mem_mb=RES["evaluate"]["mem_mb"],
        cpus_per_gpu=RES["evaluate"]["cpus_per_gpu"],
    retries: RES["evaluate"]["retries"]
    conda:
        "../../envs/torch-gpu.yaml"
    shell:
        "{CLI} evaluate --cell {input.cell} --model {input.model} --data $(dirname {input.data}) "
        "--out {output} --train-summary {input.summary} --quiet > {log} 2>&1"
