"""One cell's config: the keys of ``cell.json``, their defaults and their validation.

    cell = load_cell("cell.json")        # validated, defaults filled in; errors name the key

A cell is one (experiment, task, method, seed, dataset size) point of the grid with its model,
train and eval sections; the Snakefile writes it, ``sparse-mosaics train`` and ``evaluate`` read
it. :func:`resume_digest` is the part of it a checkpoint must match to be resumed.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from .errors import CommandError


EXPERIMENTS = ("lengthgen",)
LENGTHGEN_TASKS = ("copy", "reverse", "sort", "mqmtar")

# train.* keys and their defaults (None = "derive": lr_decay_iters -> total steps, max_iters -> epochs).
TRAIN_DEFAULTS = {
    "batch_size": 32,
    "lr": 1e-3,
    "min_lr": 5e-5,
    "warmup_iters": 0,
    "lr_decay_iters": None,
    "epochs": 1,
    "max_iters": None,
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "grad_clip": 1.0,
    "checkpoint_interval": 1000,
    "log_interval": 100,
    "eval_interval": 1000,
    "dtype": "auto",
    # torch.compile the forward of the training loop: false (eager), true (the default Inductor
    # backend), an Inductor mode ("reduce-overhead": CUDA graphs) or the name of a torch.compile
    # backend ("inductor", "aot_eager", ...).
    "compile": False,
    "threads": 1,
}

# eval.* keys (read by sparse_mosaics.evaluate).
EVAL_DEFAULTS = {
    "batch_size": 32,
    "max_examples_per_length": None,
    # Upper bound on B * T (input tokens) per evaluation batch: long shards use smaller batches.
    "token_budget": 16384,
    # Autoregressive greedy decoding re-runs the whole model once per target token (no KV cache):
    # O(L) forwards per batch, so it is bounded by default. null -> the same examples as the
    # teacher-forced metrics; 0 -> skip greedy_exact_match.
    "greedy_max_examples_per_length": 256,
}

TOP_LEVEL_REQUIRED = ("name", "experiment", "task", "method", "seed", "size", "model", "train")
TOP_LEVEL_OPTIONAL = ("data", "eval", "code_fingerprint")
DTYPES = ("auto", "float32", "bfloat16")

# Keys that do not change what is computed: a checkpoint written with other values still resumes.
# (compile: the same model and loss, only fused differently, so float rounding may differ.)
_RESUME_IGNORED_TRAIN_KEYS = ("threads", "checkpoint_interval", "eval_interval", "compile")


def _cfg_error(source, key, msg):
    return CommandError(f"{source}: key '{key}': {msg}")


def _check_number(source, key, value, *, integer=False, minimum=None, strictly=False, allow_none=False):
    if value is None and allow_none:
        return
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise _cfg_error(source, key, f"must be {kind}{' or null' if allow_none else ''}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _cfg_error(source, key, f"must be finite, got {value!r}")
    if minimum is not None and (value <= minimum if strictly else value < minimum):
        raise _cfg_error(source, key, f"must be {'>' if strictly else '>='} {minimum}, got {value!r}")


def _with_defaults(source, name: str, section, defaults: dict) -> dict:
    """The ``name`` section (a dict of known keys only) with the defaults filled in."""
    if not isinstance(section, dict):
        raise _cfg_error(source, name, f"must be an object, got {section!r}")
    for key in section:
        if key not in defaults:
            raise _cfg_error(source, f"{name}.{key}", f"unknown key (valid: {', '.join(defaults)})")
    return {**defaults, **section}


def compile_backends() -> list[str]:
    """Names torch.compile accepts as ``backend=`` (torch._dynamo.list_backends, all tags)."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def compile_modes() -> list[str]:
    """torch.compile's Inductor modes ("reduce-overhead" = CUDA graphs, "max-autotune", ...)."""
    import torch._inductor

    return sorted(torch._inductor.list_mode_options())


def compile_backend(value) -> str | None:
    """The torch.compile backend of a (validated) ``train.compile`` value; None = eager."""
    if value is False:
        return None
    return "inductor" if value is True or value in compile_modes() else value


def compile_kwargs(value) -> dict | None:
    """torch.compile keyword arguments of a (validated) ``train.compile`` value; None = eager.

    true = {} (Inductor, default mode); an Inductor mode name = {"mode": name}; any other string
    = {"backend": name}.
    """
    if value is False:
        return None
    if value is True:
        return {}
    return {"mode": value} if value in compile_modes() else {"backend": value}


def uses_cuda_graphs(value) -> bool:
    """Whether a ``train.compile`` value replays CUDA graphs (outputs are overwritten by the next
    replay, and every new batch shape records a new graph)."""
    import torch._inductor

    modes = torch._inductor.list_mode_options()
    return value == "cudagraphs" or (isinstance(value, str) and bool(modes.get(value, {}).get("triton.cudagraphs")))


def _check_compile(source, key, value) -> None:
    if not isinstance(value, (bool, str)) or value == "":
        raise _cfg_error(source, key, "must be false, true (torch.compile's default Inductor backend), an Inductor "
                                      "mode such as \"reduce-overhead\" or the name of a torch.compile backend such "
                                      f"as \"aot_eager\", got {value!r}")
    if isinstance(value, str) and value not in compile_modes():
        backends = compile_backends()
        if value not in backends:
            raise _cfg_error(source, key, f"unknown torch.compile backend or mode {value!r} (backends: "
                                          f"{', '.join(backends)}; modes: {', '.join(compile_modes())})")


def model_config_fields() -> set | None:
    """The field names of MemoryMosaicConfig (None if the model package cannot be imported)."""
    try:
        import dataclasses

        from .model import MemoryMosaicConfig
    except ImportError:
        return None
    return {f.name for f in dataclasses.fields(MemoryMosaicConfig)}


def validate_cell(cell, source="cell config") -> dict:
    """Check a cell config (CONTRACTS.md "Cell config") and return a copy with defaults filled in.

    Raises:
        CommandError: naming ``source`` and the first bad key (dotted: ``train.lr``).
    """
    if not isinstance(cell, dict):
        raise CommandError(f"{source}: must be a JSON object, got {type(cell).__name__}")
    for key in TOP_LEVEL_REQUIRED:
        if key not in cell:
            raise _cfg_error(source, key, "missing (required)")
    for key in cell:
        if key not in TOP_LEVEL_REQUIRED + TOP_LEVEL_OPTIONAL:
            raise _cfg_error(source, key, f"unknown key (valid: {', '.join(TOP_LEVEL_REQUIRED + TOP_LEVEL_OPTIONAL)})")
    cell = copy.deepcopy(cell)

    for key in ("name", "experiment", "task", "method"):
        if not isinstance(cell[key], str) or not cell[key]:
            raise _cfg_error(source, key, f"must be a non-empty string, got {cell[key]!r}")
    if cell["experiment"] not in EXPERIMENTS:
        raise _cfg_error(source, "experiment", f"unsupported {cell['experiment']!r} (supported: {', '.join(EXPERIMENTS)})")
    if cell["experiment"] == "lengthgen" and cell["task"] not in LENGTHGEN_TASKS:
        raise _cfg_error(source, "task", f"unknown lengthgen task {cell['task']!r} (valid: {', '.join(LENGTHGEN_TASKS)})")
    from .attention import get_method

    try:
        get_method(cell["method"])
    except ValueError as e:
        raise _cfg_error(source, "method", str(e)) from None
    _check_number(source, "seed", cell["seed"], integer=True, minimum=0)
    _check_number(source, "size", cell["size"], integer=True, minimum=1)

    # data: generator parameters (vocab, abc_size, ...), passed through to the data package.
    cell.setdefault("data", {})
    if not isinstance(cell["data"], dict):
        raise _cfg_error(source, "data", f"must be an object, got {cell['data']!r}")

    # model: MemoryMosaicConfig fields except vocab_size and method.
    model = cell["model"]
    if not isinstance(model, dict):
        raise _cfg_error(source, "model", f"must be an object, got {model!r}")
    for key in ("vocab_size", "method"):
        if key in model:
            raise _cfg_error(source, f"model.{key}", "must not be set (it comes from the task / the cell's method)")
    fields = model_config_fields()
    if fields is not None:
        for key in model:
            if key not in fields:
                valid = ", ".join(sorted(fields - {"vocab_size", "method"}))
                raise _cfg_error(source, f"model.{key}", f"unknown MemoryMosaicConfig field (valid: {valid})")

    # train
    train = cell["train"] = _with_defaults(source, "train", cell["train"], TRAIN_DEFAULTS)
    t = lambda k: f"train.{k}"  # noqa: E731
    _check_number(source, t("batch_size"), train["batch_size"], integer=True, minimum=1)
    _check_number(source, t("lr"), train["lr"], minimum=0)
    _check_number(source, t("min_lr"), train["min_lr"], minimum=0)
    _check_number(source, t("warmup_iters"), train["warmup_iters"], integer=True, minimum=0)
    _check_number(source, t("lr_decay_iters"), train["lr_decay_iters"], integer=True, minimum=0, allow_none=True)
    _check_number(source, t("epochs"), train["epochs"], minimum=0, strictly=True)
    _check_number(source, t("max_iters"), train["max_iters"], integer=True, minimum=1, allow_none=True)
    _check_number(source, t("weight_decay"), train["weight_decay"], minimum=0)
    for key in ("beta1", "beta2"):
        _check_number(source, t(key), train[key], minimum=0)
        if train[key] >= 1:
            raise _cfg_error(source, t(key), f"must be < 1, got {train[key]!r}")
    _check_number(source, t("grad_clip"), train["grad_clip"], minimum=0)  # 0 -> no clipping
    for key in ("checkpoint_interval", "log_interval", "eval_interval", "threads"):
        _check_number(source, t(key), train[key], integer=True, minimum=1)
    if train["dtype"] not in DTYPES:
        raise _cfg_error(source, t("dtype"), f"must be one of {', '.join(DTYPES)}, got {train['dtype']!r}")
    _check_compile(source, t("compile"), train["compile"])

    # the task's generator parameters and the full model config must be constructible
    try:
        from .data.lengthgen import task_params, vocab_for_params

        vocab = vocab_for_params(cell["task"], task_params(cell["task"], **cell["data"]))
    except (TypeError, ValueError) as e:
        raise _cfg_error(source, "data", str(e)) from None
    if fields is not None:
        from .model import MemoryMosaicConfig

        try:
            MemoryMosaicConfig(**model, vocab_size=int(vocab["vocab_size"]), method=cell["method"])
        except (TypeError, ValueError) as e:
            raise _cfg_error(source, "model", str(e)) from None

    # eval
    ev = cell["eval"] = _with_defaults(source, "eval", cell.get("eval", {}), EVAL_DEFAULTS)
    _check_number(source, "eval.batch_size", ev["batch_size"], integer=True, minimum=1)
    _check_number(source, "eval.max_examples_per_length", ev["max_examples_per_length"], integer=True, minimum=1, allow_none=True)
    _check_number(source, "eval.token_budget", ev["token_budget"], integer=True, minimum=1)
    _check_number(source, "eval.greedy_max_examples_per_length", ev["greedy_max_examples_per_length"],
                  integer=True, minimum=0, allow_none=True)
    return cell


def load_cell(path) -> dict:
    """Read and validate ``cell.json`` (errors name the file and the key)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise CommandError(f"cannot read cell config {path}: {e.strerror or e}") from None
    try:
        cell = json.loads(text)
    except json.JSONDecodeError as e:
        raise CommandError(f"{path}: not valid JSON ({e})") from None
    return validate_cell(cell, source=str(path))


def resume_digest(cell: dict) -> str:
    """Digest of the parts of the cell that determine the trained weights.

    Operational keys (threads, checkpoint_interval, eval_interval, compile) and the eval section are
    left out, so changing them does not invalidate a checkpoint.
    """
    from .provenance import config_digest

    c = copy.deepcopy(cell)
    c.pop("eval", None)
    c.pop("name", None)
    c.pop("code_fingerprint", None)
    for key in _RESUME_IGNORED_TRAIN_KEYS:
        c["train"].pop(key, None)
    return config_digest(c)
