"""Batches for the length-generalisation tasks (SPEC.md §3c, "Token layout" and "Collate").

One example is seq = [bos] + src + [sep] + trg + [eos]. The model reads x = seq[:-1] and predicts
y = seq[1:]; a batch right-pads both with <pad> to max(len(seq)) - 1 and carries
lengths = len(seq) - 1 = len(x). The loss is taken where

    loss_mask[b, t] = (t >= first index of <sep> in x[b]) & (x[b, t] != <pad>)

i.e. on the y-positions of the target tokens and of the final <eos>.

torch is imported inside the functions so that ``sparse_mosaics.data`` stays light for the CLI.
"""

from __future__ import annotations

import numpy as np


def make_batch(seqs, vocab: dict, device=None, pad_multiple: int = 1) -> dict:
    """Collate full sequences into {x, y, loss_mask, lengths} torch tensors.

    seqs: list of 1-D int sequences (lists or arrays), each [bos] + src + [sep] + trg + [eos].
    Returns x, y: (B, T) int64 with T = max(len(seq)) - 1 rounded up to a multiple of
    ``pad_multiple``, right-padded with vocab["pad"]; loss_mask: (B, T) bool; lengths: (B,) int64
    = len(seq) - 1. Extra padding changes no loss (the model is causal, pads are masked out) and
    bounds the number of distinct batch shapes (one CUDA graph each under compile with graphs).
    """
    import torch

    if len(seqs) == 0:
        raise ValueError("make_batch: empty list of sequences")
    pad, sep = vocab["pad"], vocab["sep"]
    lens = np.array([len(s) for s in seqs], dtype=np.int64)         # (B,)
    if lens.min() < 2:
        raise ValueError("make_batch: every sequence needs at least 2 tokens")
    B, T = len(seqs), int(lens.max()) - 1
    T = -(-T // pad_multiple) * pad_multiple
    seq = np.full((B, T + 1), pad, dtype=np.int64)                  # (B, T+1)
    for i, s in enumerate(seqs):
        seq[i, : lens[i]] = np.asarray(s, dtype=np.int64)
    pos = np.arange(T)[None, :]                                     # (1, T)
    x = np.where(pos < (lens - 1)[:, None], seq[:, :-1], pad)       # (B, T) drop each seq's last token
    y = seq[:, 1:]                                                  # (B, T)
    is_sep = x == sep
    first_sep = np.where(is_sep.any(1), is_sep.argmax(1), T)       # (B,) T when there is no <sep>
    loss_mask = (pos >= first_sep[:, None]) & (x != pad)
    out = {
        "x": torch.from_numpy(np.ascontiguousarray(x)),
        "y": torch.from_numpy(np.ascontiguousarray(y)),
        "loss_mask": torch.from_numpy(loss_mask),
        "lengths": torch.from_numpy(lens - 1),
    }
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def sep_positions(batch: dict, vocab: dict):
    """(B,) int64: index of the first <sep> in x (= y-position of the first target token)."""
    import torch

    is_sep = batch["x"] == vocab["sep"]
    if not bool(is_sep.any(1).all()):
        raise ValueError("sep_positions: a sequence of the batch has no <sep> token")
    return is_sep.to(torch.int8).argmax(1)


def target_positions(batch: dict, task: str, vocab: dict, num_q: int = 4, v_len: int = 2):
    """y-positions to score, grouped: LongTensor (B, G, g), -1 where a group is shorter.

    copy/reverse/sort: G = 1 group, the target tokens without <eos>:
        positions p_sep .. lengths - 2  (g = the longest target in the batch).
    mqmtar: G = num_q queries of g = v_len value tokens. The target [2 v1 v2] * num_q starts at
        p_sep, so query q's values sit at p_sep + q (1 + v_len) + 1 + j, j < v_len — offsets
        (1,2), (4,5), (7,8), (10,11) for the defaults. The query separators are not scored.
    A sample is exactly right when every valid position of every group is right; for mqmtar
    associative recall is the fraction of groups (queries) entirely right.
    """
    import torch

    p = sep_positions(batch, vocab)                                  # (B,)
    if task == "mqmtar":
        q = torch.arange(num_q).view(1, num_q, 1)
        j = torch.arange(v_len).view(1, 1, v_len)
        pos = p.view(-1, 1, 1) + q * (1 + v_len) + 1 + j              # (B, num_q, v_len)
        if bool((pos >= batch["lengths"].view(-1, 1, 1)).any()):
            raise ValueError("target_positions: mqmtar target shorter than num_q * (1 + v_len)")
        return pos
    if task in ("copy", "reverse", "sort"):
        trg_len = batch["lengths"] - 1 - p                           # (B,) without <eos>
        g = int(trg_len.max())
        j = torch.arange(g).view(1, g)
        pos = torch.where(j < trg_len.view(-1, 1), p.view(-1, 1) + j, torch.full_like(j, -1))
        return pos.unsqueeze(1)                                      # (B, 1, g)
    raise ValueError(f"target_positions: unknown task {task!r}")


def target_mask(batch: dict, task: str, vocab: dict, num_q: int = 4, v_len: int = 2):
    """(B, T) bool: True at the y-positions :func:`target_positions` lists."""
    import torch

    pos = target_positions(batch, task, vocab, num_q=num_q, v_len=v_len).flatten(1)   # (B, G*g)
    mask = torch.zeros(batch["y"].shape, dtype=torch.bool)
    valid = pos >= 0
    rows = torch.arange(pos.shape[0]).view(-1, 1).expand_as(pos)
    mask[rows[valid], pos[valid]] = True
    return mask


def score_groups(pred, y, positions):
    """Per-group correctness: (B, G) bool, a group is right when all its valid positions are.

    pred, y: (B, T) token ids; positions: (B, G, g) from :func:`target_positions`.
    Returns (group_ok (B, G) bool, n_correct (B,) int64 tokens right, n_tokens (B,) int64 scored).
    """
    import torch

    valid = positions >= 0
    idx = positions.clamp(min=0).flatten(1)                          # (B, G*g)
    hit = (pred.gather(1, idx) == y.gather(1, idx)).view(positions.shape) & valid
    group_ok = (hit | ~valid).all(-1)
    return group_ok, hit.flatten(1).sum(1).to(torch.int64), valid.flatten(1).sum(1).to(torch.int64)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """Example order of one epoch: Generator(PCG64(SeedSequence([seed, epoch]))).permutation(n)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    return rng.permutation(int(n))
