# Figures: drawn from the Parquet tables only (seconds; `snakemake figures` never retrains),
# one colour and marker per method shared by every figure (sparse_mosaics.figures.style).


rule plot_lengthgen:
    input:
        TABLE,
    output:
        pdf=f"{FIGURES}/lengthgen_accuracy.pdf",
        png=report(
            f"{FIGURES}/lengthgen_accuracy.png",
            caption="../report/lengthgen_accuracy.rst",
            category="Figures",
            labels={"figure": "length generalisation"},
        ),
    params:
        train_lengths=LG["data"]["train_lengths"],
        code=code("figures"),
    log:
        f"{LOGS}/figures/lengthgen_accuracy.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{CLI} plot lengthgen --table {input} --out {output.pdf} "
        "--train-lengths {params.train_lengths} > {log} 2>&1"


rule plot_kernels:
    output:
        pdf=f"{FIGURES}/kernels.pdf",
        png=report(
            f"{FIGURES}/kernels.png",
            caption="../report/kernels.rst",
            category="Figures",
            labels={"figure": "kernels (Figure 1)"},
        ),
    params:
        # Figure 1 evaluates the attention weight functions themselves.
        code=code("figures", "attention"),
    log:
        f"{LOGS}/figures/kernels.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{CLI} plot kernels --out {output.pdf} > {log} 2>&1"


rule figures:
    input:
        figure_targets(),
    localrule: True
