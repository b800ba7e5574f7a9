"""Train one cell: a Memory Mosaics model on one task / method / dataset size / seed.

    sparse-mosaics train --cell cell.json --data PACKED_TRAIN_DIR --out CELL_DIR

The loop is nanoGPT's (SPEC.md §3c, "Training loop"), made resumable and bit-for-bit reproducible:

- AdamW with the model's decay groups (``model.configure_optimizers``, SPEC.md §2.8), gradient
  norm clipping at ``train.grad_clip``;
- cosine learning rate with linear warm-up (:func:`get_lr`);
- loss = masked cross-entropy on the target tokens and ``<eos>`` (SPEC.md §2.13), batches built by
  :func:`sparse_mosaics.data.make_batch`;
- bf16 autocast on CUDA, fp32 on CPU (``train.dtype = "auto"``);
- optionally ``torch.compile`` of the model's forward for the training loop (``train.compile``:
  false, true = the default Inductor backend, an Inductor mode such as "reduce-overhead" (CUDA
  graphs: batches are then padded to multiples of 16 tokens, so few graphs are recorded), or a
  backend name such as "aot_eager"); the Triton kernels are ``torch.library`` custom ops under
  compile, so the model is one graph. Checkpoints and
  ``model.pt`` hold the uncompiled module's state dict, so resume and evaluation are unaffected;
- seeded: ``torch.manual_seed(seed)`` before the model is built; the data order is a pure function
  of (seed, epoch) (:class:`DataOrder`); dropout draws from the global torch RNG, whose state is
  saved in every checkpoint.

Number of optimizer steps: ``max_iters`` if set, else ceil(epochs · N / batch_size). Batch i holds the
items i·B … (i+1)·B − 1 of the stream "epoch-0 permutation, epoch-1 permutation, …", so an epoch's
last batch may be completed from the next epoch, and with ``max_iters`` unset the very last batch
of the run is short (like the reference DataLoader, which does not drop the last batch).

Outputs in CELL_DIR (all written atomically):

- ``checkpoint.pt``: model, optimizer, step, RNG states (torch CPU and CUDA), curve so far, elapsed
  time; every ``checkpoint_interval`` steps and at the end. Re-running the same command resumes from
  it and gives the same final weights as an uninterrupted run (bit-for-bit on CPU).
- ``model.pt``: {"model": state_dict, "model_config": dict, "cell": dict, ...}, loadable with
  ``torch.load(path, weights_only=True)``.
- ``curve.parquet``: step, loss, lr, tokens_per_s, elapsed_s; one row every ``log_interval`` steps
  and one for the last step. ``loss`` is the mean training loss over the steps since the previous
  row; ``lr`` the learning rate of the row's step; ``tokens_per_s`` counts non-pad input tokens.
- ``train.log``: human-readable log lines (appended across resumes).
- ``train_summary.json``: train_seconds, n_params, steps, final_loss, device, versions, ...

A NaN/Inf loss raises :class:`NonFiniteLoss` (a :class:`CommandError`: the CLI exits 2) naming the
step; ``model.pt`` is not written and the last good ``checkpoint.pt`` is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cell import compile_backend, compile_kwargs, resume_digest, uses_cuda_graphs
from .errors import CommandError
from .io import torch_save_atomic, write_json_atomic, write_parquet_atomic


# ---------------------------------------------------------------------------------------------
# Schedule and data order
# ---------------------------------------------------------------------------------------------


def get_lr(it: int, lr: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """Cosine learning rate with linear warm-up (nanoGPT, SPEC.md §3c).

        lr(it) = lr · it / warmup                                             it < warmup
               = min_lr                                                       it > decay
               = min_lr + ½ (1 + cos(π (it − warmup) / (decay − warmup))) (lr − min_lr)   otherwise

    ``it`` is the 0-based index of the optimizer step. If decay <= warmup, the rate is min_lr from the
    end of warm-up on.
    """
    if it < warmup_iters:
        return lr * it / warmup_iters
    if it > lr_decay_iters or lr_decay_iters <= warmup_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # in [0, 1]
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (lr - min_lr)


def num_steps(train: dict, n_examples: int) -> int:
    """max_iters if set, else ceil(epochs · N / batch_size)."""
    if train["max_iters"] is not None:
        return int(train["max_iters"])
    return max(1, math.ceil(train["epochs"] * n_examples / train["batch_size"]))


class DataOrder:
    """The deterministic order of training examples: a fresh permutation of range(N) per epoch.

    The permutation of epoch e is :func:`sparse_mosaics.data.epoch_permutation` (N, seed, e)
    (PCG64 seeded by SeedSequence([seed, e])): a pure function of (seed, e), so resuming only needs the step number. Batch i is the items
    [i·B, min((i+1)·B, total)) of the concatenated epoch permutations (total = None: unbounded).
    """

    def __init__(self, n: int, batch_size: int, seed: int, total_items: int | None = None):
        self.n, self.batch_size, self.seed, self.total_items = n, batch_size, seed, total_items
        self._epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            from .data import epoch_permutation

            self._perm = epoch_permutation(self.n, self.seed, epoch)
            self._epoch = epoch
        return self._perm

    def batch(self, i: int) -> np.ndarray:
        """Example indices of batch i (0-based)."""
        start = i * self.batch_size
        stop = start + self.batch_size
        if self.total_items is not None:
            stop = min(stop, self.total_items)
        if stop <= start:
            raise IndexError(f"batch {i} is past the end of the data ({self.total_items} items)")
        out = []
        pos = start
        while pos < stop:
            epoch, off = divmod(pos, self.n)
            take = min(stop - pos, self.n - off)
            out.append(self.permutation(epoch)[off : off + take])
            pos += take
        return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# Devices, precision, logging
# ---------------------------------------------------------------------------------------------


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CommandError(f"--device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available on this machine")
    return dev


def autocast_context(device: torch.device, dtype: str = "auto"):
    """bf16 autocast on CUDA (auto/bfloat16); fp32 (no autocast) on CPU unless bfloat16 is asked."""
    if dtype == "float32" or (dtype == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def versions() -> dict:
    from .provenance import code_version, environment

    env = environment()
    return {
        "code_version": code_version(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": env["torch_version"],
        "triton": env["triton_version"],
        "device_name": env["device"],
    }


class TrainLog:
    """Log lines to ``train.log`` (appended) and stderr; a tqdm bar when stderr is a terminal."""

    def __init__(self, path: Path, total: int, initial: int, quiet: bool = False):
        self.file = open(path, "a", buffering=1)
        self.quiet = quiet
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        self.file.write(line + "\n")
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def progress(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()


class NonFiniteLoss(CommandError):
    """The training loss became NaN or Inf (the message names the step)."""


# ---------------------------------------------------------------------------------------------
# Model and data glue
# ---------------------------------------------------------------------------------------------


def task_vocab(cell: dict) -> dict:
    """Special token ids and vocab_size of the cell's task (sparse_mosaics.data.lengthgen.task_vocab)."""
    from .data.lengthgen import vocab_for_params

    return vocab_for_params(cell["task"], data_params(cell))


def data_params(cell: dict) -> dict:
    """The task's generator parameters (defaults filled in) from the cell's ``data`` section."""
    from .data.lengthgen import task_params

    try:
        return task_params(cell["task"], **cell.get("data", {}))
    except (TypeError, ValueError) as e:
        raise CommandError(f"cell config: key 'data': {e}") from None


def build_model_config(cell: dict, vocab: dict):
    """MemoryMosaicConfig from cell.model + vocab_size (task) + method (cell)."""
    from .model import MemoryMosaicConfig

    try:
        return MemoryMosaicConfig(**cell["model"], vocab_size=int(vocab["vocab_size"]), method=cell["method"])
    except (TypeError, ValueError) as e:
        raise CommandError(f"cell config: key 'model': {e}") from None


def batch_to_device(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in batch.items()}


def model_forward(model, batch: dict):
    """(logits, loss) with the loss on the batch's loss mask (target tokens and <eos>)."""
    return model(batch["x"], targets=batch["y"], loss_mask=batch["loss_mask"], lengths=batch["lengths"])


# Under CUDA-graph compile modes (train.compile: reduce-overhead, ...) every distinct batch shape
# records its own graph: batches are padded to a multiple of this many tokens (the model is causal
# and pads are masked out, so the loss is unchanged). 16 wastes at most 15 tokens a row (130 -> 144
# for the length-generalisation cell) and bounds the graphs to max_len / 16.
GRAPH_PAD_MULTIPLE = 16


def _compiled_forward(fwd, batch: dict, backend: str | None):
    """model_forward(fwd, batch); a torch.compile backend failure becomes a CommandError naming train.compile."""
    if backend is None:
        return model_forward(fwd, batch)
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        return model_forward(fwd, batch)
    except BackendCompilerFailed as e:
        why = " ".join(line.strip() for line in str(e).splitlines()
                       if line.strip() and not line.startswith("Set TORCHDYNAMO_VERBOSE"))[:500]
        raise CommandError(f"train.compile: torch.compile backend {backend!r} failed ({why}); "
                           "set train.compile: false to train eagerly") from None


def open_split(folder, split: str, cell: dict, vocab: dict, flag: str = "--data"):
    """PackedSplit(folder, split), checked against the cell's task and token layout."""
    from .data import PackedSplit

    folder = Path(folder)
    if not folder.is_dir():
        raise CommandError(f"{flag} {folder}: not a directory")
    try:
        ps = PackedSplit(folder, split)
    except (FileNotFoundError, ValueError, OSError, KeyError) as e:
        raise CommandError(f"{flag} {folder}: cannot open the packed {split!r} split: {e}") from None
    if ps.task is not None and ps.task != cell["task"]:
        raise CommandError(f"{flag} {folder}: packed data is for task {ps.task!r}, the cell's task is {cell['task']!r}")
    theirs = {k: ps.vocab.get(k) for k in ("bos", "sep", "eos", "pad", "vocab_size")}
    ours = {k: vocab[k] for k in theirs}
    if theirs != ours:
        raise CommandError(f"{flag} {folder}: packed token layout {theirs} != the cell's {ours} (check the cell's 'data' section)")
    return ps


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict:
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def load_checkpoint(path: Path) -> dict:
    """torch.load(weights_only=True) with a clear error naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, not a torch file, unsafe pickle
        raise CommandError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e}); delete it to restart the cell") from None
    missing = [k for k in ("model", "optimizer", "step", "rng", "curve", "resume_digest") if k not in ckpt] if isinstance(ckpt, dict) else ["<dict>"]
    if missing:
        raise CommandError(f"{path}: not a sparse-mosaics training checkpoint (missing {', '.join(missing)}); delete it to restart the cell")
    return ckpt


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    elapsed_s: float = 0.0  # training wall time over all runs so far
    tokens: int = 0  # non-pad input tokens seen
    curve: dict = field(default_factory=lambda: {k: [] for k in CURVE_COLUMNS})
    # accumulator of the current log interval
    acc_loss: float = 0.0
    acc_steps: int = 0
    acc_tokens: int = 0
    acc_time: float = 0.0


CURVE_COLUMNS = ("step", "loss", "lr", "tokens_per_s", "elapsed_s")


def curve_frame(curve: dict):
    import pandas as pd

    return pd.DataFrame(
        {
            "step": pd.Series(curve["step"], dtype="int64"),
            "loss": pd.Series(curve["loss"], dtype="float64"),
            "lr": pd.Series(curve["lr"], dtype="float64"),
            "tokens_per_s": pd.Series(curve["tokens_per_s"], dtype="float64"),
            "elapsed_s": pd.Series(curve["elapsed_s"], dtype="float64"),
        }
    )


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train_cell(
    cell: dict,
    data_dir,
    out_dir,
    *,
    device: str | None = None,
    stop_after: int | None = None,
    quiet: bool = False,
) -> dict:
    """Train one cell (validated ``cell`` dict) and write its outputs in ``out_dir``.

    Args:
        stop_after: testing hook — return right after this many completed steps, without writing a
            checkpoint or model.pt (as if the job were killed there).
        quiet: log to train.log only.

    Returns:
        the train_summary dict (or {"stopped_at": step} when ``stop_after`` stopped the run).
    """
    from .data import make_batch
    from .model import MemoryMosaic
    from .provenance import config_digest, scope_fingerprint

    tc = cell["train"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, model_path = out / "checkpoint.pt", out / "model.pt"

    torch.set_num_threads(int(tc["threads"]))
    dev = pick_device(device)
    vocab = task_vocab(cell)
    train_set = open_split(data_dir, "train", cell, vocab)
    n = len(train_set)
    if n == 0:
        raise CommandError(f"--data {data_dir}: the 'train' split is empty")
    total = num_steps(tc, n)
    decay_iters = tc["lr_decay_iters"] if tc["lr_decay_iters"] is not None else total
    total_items = None if tc["max_iters"] is not None else math.ceil(tc["epochs"] * n)
    order = DataOrder(n, tc["batch_size"], cell["seed"], total_items)

    # Model: seeded init, then the optimizer with the model's decay groups.
    torch.manual_seed(cell["seed"])
    mcfg = build_model_config(cell, vocab)
    model = MemoryMosaic(mcfg).to(dev)
    optimizer = model.configure_optimizers(tc["weight_decay"], tc["lr"], (tc["beta1"], tc["beta2"]), dev.type)

    digest = resume_digest(cell)
    code_fp = scope_fingerprint("train")
    state = TrainState()
    log = TrainLog(out / "train.log", total, 0, quiet=quiet)
    try:
        if ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path)
            if ckpt["resume_digest"] != digest or ckpt.get("code_fingerprint") != code_fp:
                what = "cell config" if ckpt["resume_digest"] != digest else "training code"
                log(f"{ckpt_path}: written for a different {what}; starting the cell from scratch")
            elif ckpt["step"] > total:
                raise CommandError(f"{ckpt_path}: at step {ckpt['step']}, past this cell's {total} steps")
            else:
                try:
                    model.load_state_dict(ckpt["model"])
                    optimizer.load_state_dict(ckpt["optimizer"])
                except (RuntimeError, ValueError, KeyError) as e:
                    raise CommandError(f"{ckpt_path}: does not match the model/optimizer ({e}); delete it to restart") from None
                _set_rng_state(ckpt["rng"], dev)
                state = TrainState(
                    step=int(ckpt["step"]), elapsed_s=float(ckpt["elapsed_s"]), tokens=int(ckpt["tokens"]),
                    curve={k: list(v) for k, v in ckpt["curve"].items()}, **ckpt["acc"],
                )
                log(f"resumed from {ckpt_path} at step {state.step}/{total}")
        if state.step == 0:
            log(
                f"cell {cell['name']}: {cell['experiment']}/{cell['task']}/{cell['method']} n{cell['size']} s{cell['seed']}; "
                f"{n} examples, {total} steps of batch {tc['batch_size']}, {model.num_parameters():,} parameters, "
                f"device {dev}, dtype {tc['dtype']}, threads {tc['threads']}"
            )
            if n != cell["size"]:
                log(f"warning: the data folder has {n} training examples, the cell's size is {cell['size']}")
        backend = compile_backend(tc["compile"])
        graphs = backend is not None and uses_cuda_graphs(tc["compile"])
        pad_multiple = GRAPH_PAD_MULTIPLE if graphs else 1  # one CUDA graph is recorded per batch shape
        if backend is not None:
            mode = f", mode {tc['compile']}" if compile_kwargs(tc["compile"]).get("mode") else ""
            log(f"torch.compile on (backend {backend}{mode}): the first steps, and any new batch shape, compile first "
                f"(tens of seconds on a GPU)" + (f"; batches padded to multiples of {GRAPH_PAD_MULTIPLE} tokens" if graphs else ""))
        if log.bar is not None:
            log.bar.n = state.step
            log.bar.refresh()

        def save_checkpoint():
            torch_save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": state.step,
                    "data_position": state.step * tc["batch_size"],
                    "rng": _rng_state(dev),
                    "elapsed_s": state.elapsed_s,
                    "tokens": state.tokens,
                    "curve": state.curve,
                    "acc": {"acc_loss": state.acc_loss, "acc_steps": state.acc_steps,
                            "acc_tokens": state.acc_tokens, "acc_time": state.acc_time},
                    "resume_digest": digest,
                    "code_fingerprint": code_fp,
                    "cell": cell,
                    "model_config": _plain_config(mcfg),
                },
                ckpt_path,
            )

        model.train()
        # The loop calls fwd; checkpoints and model.pt save model (no "_orig_mod." key prefixes).
        fwd = model if backend is None else torch.compile(model, **compile_kwargs(tc["compile"]))
        ctx = autocast_context(dev, tc["dtype"])
        pending = []  # (step, loss tensor): checked for NaN/Inf at each flush (one sync per flush)

        def flush():
            if not pending:
                return
            values = torch.stack([l for _, l in pending]).float().cpu().tolist()
            for (s, _), v in zip(pending, values):
                if not math.isfinite(v):
                    msg = f"non-finite training loss ({v}) at step {s} of cell {cell['name']}; model.pt not written"
                    log(msg)
                    raise NonFiniteLoss(msg)
            state.acc_loss += float(sum(values))
            state.acc_steps += len(values)
            pending.clear()

        t_last = time.perf_counter()
        while state.step < total:
            it = state.step
            lr = get_lr(it, tc["lr"], tc["min_lr"], tc["warmup_iters"], decay_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order.batch(it)
            batch = make_batch([train_set[int(i)] for i in idx], vocab, pad_multiple=pad_multiple)
            n_tok = int(batch["lengths"].sum())
            batch = batch_to_device(batch, dev)
            if graphs:  # a new iteration: the previous replay's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with ctx:
                _, loss = _compiled_forward(fwd, batch, backend)
            loss.backward()
            if tc["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            pending.append((state.step, loss.detach().clone() if graphs else loss.detach()))
            state.tokens += n_tok
            state.acc_tokens += n_tok
            log.progress(1)
            if stop_after is not None and state.step >= stop_after and state.step < total:
                return {"stopped_at": state.step}

            last = state.step == total
            if state.step % tc["log_interval"] == 0 or last or state.step % tc["checkpoint_interval"] == 0:
                flush()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                now = time.perf_counter()
                state.elapsed_s += now - t_last
                state.acc_time += now - t_last
                t_last = now
            if state.step % tc["log_interval"] == 0 or last:
                mean_loss = state.acc_loss / max(state.acc_steps, 1)
                tps = state.acc_tokens / state.acc_time if state.acc_time > 0 else float("nan")
                for k, v in zip(CURVE_COLUMNS, (state.step, mean_loss, lr, tps, state.elapsed_s)):
                    state.curve[k].append(v)
                state.acc_loss, state.acc_steps, state.acc_tokens, state.acc_time = 0.0, 0, 0, 0.0
                if log.bar is not None:
                    log.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    log.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {state.step}/{total} loss {mean_loss:.4f} lr {lr:.3e} tok/s {tps:.0f}\n")
                else:
                    log(f"step {state.step}/{total} loss {mean_loss:.4f} lr {lr:.3e} tok/s {tps:.0f} elapsed {state.elapsed_s:.1f}s")
            if state.step % tc["checkpoint_interval"] == 0 or last:
                save_checkpoint()
        flush()

        # Outputs: curve, model, summary (model.pt last-but-one: the summary marks completion).
        final_loss = state.curve["loss"][-1] if state.curve["loss"] else float("nan")
        write_parquet_atomic(curve_frame(state.curve), out / "curve.parquet")
        torch_save_atomic(
            {
                "model": model.state_dict(),
                "model_config": _plain_config(mcfg),
                "cell": cell,
                "step": state.step,
                "config_digest": config_digest(cell),
                "code_fingerprint": code_fp,
            },
            model_path,
        )
        summary = {
            "cell": cell["name"],
            "train_seconds": state.elapsed_s,
            "n_params": int(model.num_parameters()),
            "steps": state.step,
            "epochs_seen": state.step * tc["batch_size"] / n if total_items is None else total_items / n,
            "tokens": state.tokens,
            "final_loss": final_loss,
            "device": str(dev),
            "dtype": tc["dtype"],
            "compile": tc["compile"],
            "threads": int(tc["threads"]),
            "config_digest": config_digest(cell),
            "code_fingerprint": code_fp,
            "versions": versions(),
        }
        write_json_atomic(out / "train_summary.json", summary)
        log(f"done: {state.step} steps, final loss {final_loss:.4f}, {state.elapsed_s:.1f}s; wrote {model_path}")
        return summary
    finally:
        log.close()


def _plain_config(cfg) -> dict:
    """A dataclass config as a dict of plain python types (safe for weights_only loading)."""
    import dataclasses

    d = dataclasses.asdict(cfg)
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = list(v)
    return d
