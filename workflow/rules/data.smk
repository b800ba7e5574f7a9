# Data: seeded synthetic datasets in the authors' format, then packed for training.
#
#   results/<name>/data/lengthgen/<task>/n<size>/   train.* + validation_<i>_<L>.* + manifest.json
#   results/<name>/data/lengthgen/<task>/test/      test_<i>_<L>.* + manifest.json (size-independent)
#   .../packed/                                     <split>.tokens.npy, <split>.offsets.npy, packed.json
#
# manifest.json (written last, after every file) stands for the folder: the generator replaces
# the whole folder atomically, so a present manifest means a complete folder. --force: Snakemake
# decides when a folder is stale (params, code), and the generator then replaces it, packed/
# included (pack always reruns after generate).


rule generate_train:
    output:
        f"{TRAIN_DATA}/manifest.json",
    params:
        flags=generate_train_flags,  # task parameters, seed, lengths and sizes
        code=code("generate"),
    log:
        f"{LOGS}/data/{{task}}/n{{size}}.log",
    threads: threads_of("data")
    resources:
        runtime=runtime_of("data"),
        mem_mb=RES["data"]["mem_mb"],
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{CLI} generate --task {wildcards.task} --split train --size {wildcards.size} "
        "{params.flags} --out $(dirname {output}) --force > {log} 2>&1"


rule generate_test:
    output:
        f"{TEST_DATA}/manifest.json",
    params:
        flags=generate_test_flags,
        code=code("generate"),
    log:
        f"{LOGS}/data/{{task}}/test.log",
    threads: threads_of("data")
    resources:
        runtime=runtime_of("data"),
        mem_mb=RES["data"]["mem_mb"],
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{CLI} generate --task {wildcards.task} --split test "
        "{params.flags} --out $(dirname {output}) --force > {log} 2>&1"


rule pack:
    input:
        f"{DATA}/{{dataset}}/manifest.json",
    output:
        f"{DATA}/{{dataset}}/packed/packed.json",
    params:
        code=code("pack"),
    log:
        f"{LOGS}/data/{{task}}/{{dataset}}.pack.log",
    threads: threads_of("data")
    resources:
        runtime=runtime_of("data"),
        mem_mb=RES["data"]["mem_mb"],
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{CLI} pack $(dirname {input}) > {log} 2>&1"


rule data:
    input:
        data_targets(),
    localrule: True
