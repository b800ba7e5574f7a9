"""The fused kernels' module-level switches as command-line options of the developer tools
(tune_configs.py, pass_costs.py):

    --candidates=C      fused.TOPK_CANDIDATES = C
    --rounds=R          fused.CANDIDATE_ROUNDS = R
    --top=R,PER         fused.ENTMAX_TOP = (R, PER)
    --fold-rounds=N     fused.ENTMAX_FOLD_ROUNDS = N
    --split, --no-split fused.FORWARD_MASK_SPLIT = True / False
"""

from sparse_mosaics.attention import fused

VALUED = {
    "--candidates=": ("TOPK_CANDIDATES", int),
    "--rounds=": ("CANDIDATE_ROUNDS", int),
    "--top=": ("ENTMAX_TOP", lambda s: tuple(int(x) for x in s.split(","))),
    "--fold-rounds=": ("ENTMAX_FOLD_ROUNDS", int),
}
FLAGS = {"--split": ("FORWARD_MASK_SPLIT", True), "--no-split": ("FORWARD_MASK_SPLIT", False)}


def apply_knobs(args: list[str], tool: str) -> list[str]:
    """Set the knobs named in args (printing each as '<tool>: NAME = value'); the other args back."""
    rest = []
    for a in args:
        opt = next((o for o in VALUED if a.startswith(o)), None)
        if opt is not None:
            name, parse = VALUED[opt]
            setattr(fused, name, parse(a[len(opt):]))
        elif a in FLAGS:
            name, value = FLAGS[a]
            setattr(fused, name, value)
        else:
            rest.append(a)
            continue
        print(f"{tool}: {name} = {getattr(fused, name)!r}", flush=True)
    return rest
