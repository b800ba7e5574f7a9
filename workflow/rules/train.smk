# Training: one Memory Mosaics model per cell (task x method x size x seed).
#
#   results/<name>/runs/lengthgen/<task>/<method>/n<size>/s<seed>/
#       cell.json            the cell config (CONTRACTS.md), written by rule cell_config
#       model.pt             final weights (torch.load(..., weights_only=True))
#       checkpoint.pt        resumable state; deliberately NOT a declared output, so Snakemake
#                            never deletes it: a retried (preempted) job resumes from it, and
#                            `sparse-mosaics train` itself ignores a checkpoint written for another
#                            cell config or other training code
#       curve.parquet        step, loss, lr, tokens_per_s, elapsed_s
#       train.log            human-readable progress (appended across resumes)
#       train_summary.json   train_seconds, n_params, steps, final loss, device, versions


rule cell_config:
    output:
        f"{CELL}/cell.json",
    params:
        # The cell config as JSON (sorted keys, as sparse_mosaics.io.write_json_atomic writes it).
        # It holds only the config sub-dicts of this cell: editing one task's data parameters,
        # the model, training or evaluation settings rewrites only the affected cell.json files.
        # A shell job (not `run:`): local `run:` jobs are spawned as a fresh Snakemake process
        # each, seconds per cell; this is a printf.
        cell=cell_json,
    log:
        f"{LOGS}/cell_config/{CELL_ID}.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "printf '%s\\n' {params.cell:q} > {output}.tmp && mv {output}.tmp {output} "
        "&& echo 'wrote {output}' > {log}"


rule train:
    input:
        # ancient(): cell.json also carries the eval section, which must not retrain. Training
        # reruns through params (the training-relevant parts of the cell) and code instead.
        cell=ancient(f"{CELL}/cell.json"),
        data=f"{TRAIN_DATA}/packed/packed.json",
    output:
        model=f"{CELL}/model.pt",
        curve=f"{CELL}/curve.parquet",
        summary=f"{CELL}/train_summary.json",
    params:
        data=cell_data,
        model=cell_model,
        train=cell_train_weights,
        code=code("train"),
    log:
        f"{LOGS}/train/{CELL_ID}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{CELL_ID}.tsv"
    threads: threads_of("train")
    resources:
        gpu=RES["train"]["gpu"],
        runtime=runtime_of("train"),
        mem_mb=RES["train"]["mem_mb"],
        cpus_per_gpu=RES["train"]["cpus_per_gpu"],
    retries: RES["train"]["retries"]
    conda:
        "../../envs/torch-gpu.yaml"
    shell:
        "{CLI} train --cell {input.cell} --data $(dirname {input.data}) "
        "--out $(dirname {output.model}) --quiet > {log} 2>&1"


rule train_all:
    input:
        cell_files(f"{CELL}/model.pt"),
    localrule: True
