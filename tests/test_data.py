"""Length-generalisation data: generators, text format + .idx, manifests, pack, batches, CLI."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from sparse_mosaics import cli
from sparse_mosaics.data import (
    PackedSplit,
    epoch_permutation,
    list_shards,
    make_batch,
    pack,
    read_example,
    read_lines,
    target_mask,
    target_positions,
    task_vocab,
)
from sparse_mosaics.data import formats as fm
from sparse_mosaics.data import lengthgen as lg
from sparse_mosaics.data.batching import score_groups


def gen(tmp_path, task, kind="train", seed=0, name=None, **kw):
    params = lg.task_params(task, **{k: kw.pop(k) for k in list(kw) if k in lg.DEFAULTS})
    if kind == "train":
        plan = lg.folder_plan("train", size=kw.get("size", 300), min_len=kw.get("min_len", 32),
                              max_len=kw.get("max_len", 64), val_lengths=kw.get("val_lengths", [64, 128]),
                              val_size=kw.get("val_size", 20))
    else:
        plan = lg.folder_plan("test", test_lengths=kw.get("test_lengths", [64, 256]), test_size=kw.get("test_size", 20))
    dest = tmp_path / (name or f"{task}_{kind}_{seed}")
    lg.write_folder(dest, task, params, seed, kind, plan)
    return dest


def files_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- vocabulary

def test_task_vocab_matches_reference_layout():
    assert task_vocab("copy") == {"bos": 32, "sep": 33, "eos": 34, "pad": 35, "vocab_size": 36, "n_data": 32}
    assert task_vocab("mqmtar") == {"bos": 259, "sep": 260, "eos": 261, "pad": 262, "vocab_size": 263, "n_data": 259}
    assert task_vocab("sort", vocab=10)["vocab_size"] == 14
    with pytest.raises(ValueError, match="unknown task"):
        task_vocab("count")


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("task", lg.TASKS)
def test_same_params_byte_identical_and_seed_matters(tmp_path, task):
    a = gen(tmp_path, task, seed=3, name="a")
    b = gen(tmp_path, task, seed=3, name="b")
    c = gen(tmp_path, task, seed=4, name="c")
    fa, fb, fc = files_bytes(a), files_bytes(b), files_bytes(c)
    assert fa == fb
    assert fa["train.src"] != fc["train.src"]
    assert fa["validation_0_64.src"] != fc["validation_0_64.src"]
    man = json.loads(fa["manifest.json"])
    assert man["files"]["train.src"] == fm.sha256_file(a / "train.src")
    assert "time" not in json.dumps(man).lower()
    fm.verify_manifest(a)


def test_test_folder_independent_of_training_and_of_other_lengths(tmp_path):
    t1 = gen(tmp_path, "copy", kind="test", name="t1", test_lengths=[64, 256])
    t2 = gen(tmp_path, "copy", kind="test", name="t2", test_lengths=[64, 128, 256])
    # same length -> same shard, even though its index moved
    assert (t1 / "test_0_64.src").read_bytes() == (t2 / "test_0_64.src").read_bytes()
    assert (t1 / "test_1_256.src").read_bytes() == (t2 / "test_2_256.src").read_bytes()
    # validation shards of two training sizes agree; training sets differ in length only
    a = gen(tmp_path, "copy", name="n300", size=300)
    b = gen(tmp_path, "copy", name="n500", size=500)
    assert (a / "validation_1_128.src").read_bytes() == (b / "validation_1_128.src").read_bytes()
    assert len(read_lines(b / "train.src")) == 500
    # validation and test shards of the same length are different data
    assert (a / "validation_0_64.src").read_bytes() != (t1 / "test_0_64.src").read_bytes()


# ----------------------------------------------------------------------------- task semantics

@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_copy_like_semantics(tmp_path, task):
    d = gen(tmp_path, task, size=400, vocab=16)
    src, trg = read_lines(d / "train.src"), read_lines(d / "train.trg")
    lengths = [len(s) for s in src]
    assert min(lengths) >= 32 and max(lengths) <= 64 and len(set(lengths)) > 20
    for s, t in zip(src, trg):
        assert all(0 <= x < 16 for x in s)
        expect = {"copy": s, "reverse": s[::-1], "sort": sorted(s)}[task]
        assert t == expect
    v = read_lines(d / "validation_1_128.src")
    assert {len(s) for s in v} == {128}


def test_mqmtar_semantics(tmp_path):
    d = gen(tmp_path, "mqmtar", size=300, val_lengths=[64, 1024])
    params = lg.task_params("mqmtar")
    for split in ("train", "validation_0_64", "validation_1_1024"):
        src, trg = read_lines(d / f"{split}.src"), read_lines(d / f"{split}.trg")
        for s, t in zip(src, trg):
            assert all(0 <= x <= 258 for x in s + t)
            queries, kv = s[-12:], s[:-12]
            # recover the pairs from the rows [.. k1 k2 1 v1 v2 0 ..]
            seps = [i for i, x in enumerate(kv) if x == 1]
            pairs = {(kv[i - 2], kv[i - 1]): (kv[i + 1], kv[i + 2]) for i in seps}
            m = len(seps)
            L = {"train": None, "validation_0_64": 64, "validation_1_1024": 1024}[split]
            if L is not None:
                assert m == lg.mqmtar_num_kv(L, params) == int(0.8 * L / 6)
                assert len(kv) == m * (L // m)
            else:
                assert 4 <= m <= 8
            w = len(kv) // m
            assert len(kv) == m * w
            for j in range(m):                    # every row holds exactly one pair, rest spaces
                row = kv[j * w:(j + 1) * w]
                assert row.count(1) == 1 and row.count(0) == w - 5
                i = row.index(1)
                assert 2 <= i <= w - 4 and row[i + 3] == 0
                assert all(x >= 3 for x in row[i - 2:i] + row[i + 1:i + 3])
            assert len(pairs) == m                                   # distinct keys
            assert len(set(pairs.values())) == m                     # distinct values
            assert queries[0::3] == [2] * 4 and t[0::3] == [2] * 4 and len(t) == 12
            for q in range(4):
                key = tuple(queries[3 * q + 1:3 * q + 3])
                assert pairs[key] == tuple(t[3 * q + 1:3 * q + 3])
    # seq length for L = 64 is |kv| + 26 = 90 positions in x (SPEC §3c)
    assert lg.mqmtar_src_len(64, params) + 1 + 12 + 1 == 90
    assert lg.mqmtar_src_len(4096, params) + 14 == 3848


def test_mqmtar_key_vocab_per_file_and_large_num_kv():
    p = lg.task_params("mqmtar", abc_size=8, kv_vocab=40)            # 64 combos, K = 40
    assert lg.mqmtar_kv_size(p) == 40
    keys, values = lg.mqmtar_file_vocab(lg.make_rng(0, "x"), p)
    assert keys.shape == (40, 2) and len({tuple(k) for k in keys}) == 40
    assert keys.min() >= 3 and keys.max() <= 10
    # num_kv capped by K: L = 2048 wants 273 pairs, gets 40 distinct ones
    src, trg = lg.generate_split("mqmtar", p, 0, "test", 5, 2048, 2048)
    for s in src:
        kv = s[:-12]
        assert kv.count(1) == 40 and len(kv) == 40 * (2048 // 40)
    rows = lg.distinct_rows(lg.make_rng(1), 50, 40, 40)               # permutation path
    assert all(sorted(r) == list(range(40)) for r in rows.tolist())
    rows = lg.distinct_rows(lg.make_rng(1), 2000, 5, 100)             # rejection path
    assert all(len(set(r)) == 5 for r in rows.tolist())
    assert Counter(rows.ravel().tolist()).most_common(1)[0][1] < 2000 * 5 / 100 * 1.5
    with pytest.raises(ValueError, match="too short"):
        lg.check_lengths("mqmtar", 4, 8, lg.task_params("mqmtar"))


# ----------------------------------------------------------------------------- text format

def test_format_and_idx_round_trip(tmp_path):
    d = gen(tmp_path, "sort", size=200)
    p = d / "train.src"
    text = p.read_bytes()
    lines = text.decode().split("\n")
    assert text.endswith(b"\n") and lines[-1] == ""
    idx = np.fromfile(str(p) + ".idx", dtype="<u8")
    assert len(idx) == 200 == (d / "train.src.idx").stat().st_size // 8
    starts = np.concatenate([[0], np.cumsum([len(x) + 1 for x in lines[:-1]])[:-1]])
    assert np.array_equal(idx, starts)
    assert np.array_equal(fm.build_index(p), idx)
    for i in (0, 17, 199):
        assert read_example(p, i) == [int(x) for x in lines[i].split()]
    with pytest.raises(IndexError):
        read_example(p, 200)
    # authors' data without .idx: built on first use
    (d / "train.trg.idx").unlink()
    assert len(read_lines(d / "train.trg")) == 200
    assert (d / "train.trg.idx").exists()


def test_format_lines_multi_digit_tokens():
    table, widths = fm.token_table(70000)                                # 8-byte words
    flat = np.array([0, 9, 10, 65535, 69999, 7, 123], dtype=np.int32)
    out, nb = fm.format_lines(flat, np.array([3, 2, 2]), table, widths)
    assert out.tobytes() == b"0 9 10\n65535 69999\n7 123\n"
    assert nb.tolist() == [7, 12, 6]


def test_malformed_folders_give_clear_errors(tmp_path):
    d = gen(tmp_path, "copy", size=50, val_lengths=[])
    bad = tmp_path / "bad"

    def fresh():
        if bad.exists():
            shutil.rmtree(bad)
        shutil.copytree(d, bad)

    fresh()
    (bad / "train.trg").unlink()
    (bad / "train.trg.idx").unlink()
    with pytest.raises(ValueError, match="missing target file train.trg"):
        pack(bad)

    fresh()
    lines = (bad / "train.trg").read_text().splitlines()
    (bad / "train.trg").write_text("\n".join(lines[:-1]) + "\n")
    (bad / "train.trg.idx").unlink()
    with pytest.raises(ValueError, match="train.src has 50 lines but train.trg has 49"):
        pack(bad)

    fresh()
    lines[6] = lines[6].replace(" ", " x7 ", 1)
    (bad / "train.trg").write_text("\n".join(lines) + "\n")
    (bad / "train.trg.idx").unlink()
    with pytest.raises(ValueError, match=r"train.trg: line 7: non-integer token 'x7'"):
        pack(bad)

    fresh()
    lines = (bad / "train.src").read_text().splitlines()
    lines[11] = lines[11] + " 32"
    (bad / "train.src").write_text("\n".join(lines) + "\n")
    (bad / "train.src.idx").unlink()
    with pytest.raises(ValueError, match=r"train.src: line 12: token 32 outside the data vocabulary 0..31"):
        pack(bad)

    fresh()
    (bad / "train.src.idx").write_bytes(b"\0" * 12)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        read_lines(bad / "train.src")

    fresh()
    (bad / "train.src.idx").write_bytes(np.array([0, 5, 9], dtype="<u8").tobytes())
    with pytest.raises(ValueError, match="delete the .idx"):
        read_lines(bad / "train.src")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .src files"):
        pack(empty)


def test_authors_folder_without_manifest(tmp_path):
    """A bare folder of .src/.trg files named like the authors' drops in; task from the path."""
    d = tmp_path / "reverse" / "30M_tr-32-64_val_64-256_t-64-512"
    d.mkdir(parents=True)
    (d / "test_0_4.src").write_text("1 2 3 4\n5 6 7 8\n")
    (d / "test_0_4.trg").write_text("4 3 2 1\n8 7 6 5")                 # no final newline
    (d / "test_1_8.src").write_text("1 2 3 4 5 6 7 8\n")
    (d / "test_1_8.trg").write_text("8 7 6 5 4 3 2 1\n")
    out = pack(d)
    ps = PackedSplit(d, "test_0_4")
    assert len(ps) == 2 and ps[1].tolist() == [32, 5, 6, 7, 8, 33, 8, 7, 6, 5, 34]
    assert list_shards(d, "test") == [("test_0_4", 0, 4), ("test_1_8", 1, 8)]
    assert list_shards(out, "test") == list_shards(d, "test")
    assert json.loads((out / "packed.json").read_text())["task"] == "reverse"
    with pytest.raises(ValueError, match="pass the task"):
        other = tmp_path / "somewhere"
        shutil.copytree(d, other)
        shutil.rmtree(other / "packed")
        pack(other)


# ----------------------------------------------------------------------------- pack + batches

@pytest.mark.parametrize("task", ["reverse", "mqmtar"])
def test_pack_round_trip(tmp_path, task):
    d = gen(tmp_path, task, size=250)
    out = pack(d)
    v = task_vocab(task)
    meta = json.loads((out / "packed.json").read_text())
    assert meta["source_manifest_sha256"] == fm.sha256_file(d / "manifest.json")
    assert set(meta["splits"]) == {"train", "validation_0_64", "validation_1_128"}
    for split in meta["splits"]:
        src, trg = read_lines(d / f"{split}.src"), read_lines(d / f"{split}.trg")
        ps = PackedSplit(out, split)
        assert len(ps) == len(src)
        assert ps.tokens.dtype == np.uint16 and isinstance(ps.tokens, np.memmap)
        for i in range(len(ps)):
            assert ps[i].tolist() == [v["bos"]] + src[i] + [v["sep"]] + trg[i] + [v["eos"]]
        assert ps.lengths.tolist() == [len(s) + len(t) + 3 for s, t in zip(src, trg)]
    assert [s[2] for s in list_shards(d, "validation")] == [64, 128]
    with pytest.raises(ValueError, match="manifest.json is for task"):
        pack(d, tmp_path / "wrong", task="sort" if task != "sort" else "copy")
    # packing twice gives identical bytes
    first = files_bytes(out)
    pack(d)
    assert files_bytes(out) == first


def test_make_batch_and_target_positions(tmp_path):
    v = task_vocab("copy")
    seqs = [[32, 1, 2, 3, 33, 1, 2, 3, 34], [32, 5, 6, 33, 5, 6, 34]]
    b = make_batch(seqs, v)
    assert b["x"].dtype == torch.int64 and b["x"].shape == (2, 8)
    assert b["x"][1].tolist() == [32, 5, 6, 33, 5, 6, 35, 35]
    assert b["y"][1].tolist() == [5, 6, 33, 5, 6, 34, 35, 35]
    assert b["lengths"].tolist() == [8, 6]
    # loss on exactly the target tokens + eos
    for i, s in enumerate(seqs):
        ys = b["y"][i][b["loss_mask"][i]].tolist()
        sep = s.index(33)
        assert ys == s[sep + 1:]
    pos = target_positions(b, "copy", v)
    assert pos.tolist() == [[[4, 5, 6]], [[3, 4, -1]]]
    assert target_mask(b, "copy", v).sum(1).tolist() == [3, 2]
    pred = b["y"].clone()
    pred[1, 4] = 0
    ok, nc, nt = score_groups(pred, b["y"], pos)
    assert ok.tolist() == [[True], [False]] and nc.tolist() == [3, 1] and nt.tolist() == [3, 2]

    # mqmtar: value tokens at (1,2),(4,5),(7,8),(10,11) of the target
    d = gen(tmp_path, "mqmtar", kind="test", test_lengths=[64], test_size=8)
    ps = PackedSplit(pack(d), "test_0_64")
    vm = task_vocab("mqmtar")
    b = make_batch([ps[i] for i in range(len(ps))], vm)
    trg = read_lines(d / "test_0_64.trg")
    pos = target_positions(b, "mqmtar", vm)
    assert pos.shape == (8, 4, 2)
    vals = b["y"].gather(1, pos.flatten(1)).view(8, 4, 2)
    assert vals.tolist() == [[t[1:3], t[4:6], t[7:9], t[10:12]] for t in trg]
    assert (b["loss_mask"].sum(1) == 13).all()
    assert (target_mask(b, "mqmtar", vm).sum(1) == 8).all()


def test_epoch_permutation():
    a = epoch_permutation(100, 1, 0)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_permutation(100, 1, 0))
    assert not np.array_equal(a, epoch_permutation(100, 1, 1))
    assert not np.array_equal(a, epoch_permutation(100, 2, 0))


# ----------------------------------------------------------------------------- CLI

def test_cli_generate_and_pack(tmp_path, capsys):
    root = tmp_path / "data"
    args = ["generate", "--task", "copy", "--split", "train", "--size", "120", "--seed", "5",
            "--out-root", str(root), "--val-lengths", "64", "--val-size", "10", "--quiet"]
    assert cli.main(args) == 0
    folder = root / "lengthgen" / "copy" / "n120"
    man = json.loads((folder / "manifest.json").read_text())
    assert man["splits"]["train"]["count"] == 120 and man["seed"] == 5
    before = files_bytes(folder)
    assert cli.main(args) == 0                                         # up to date: untouched
    assert "up to date" in capsys.readouterr().err
    assert files_bytes(folder) == before
    # different parameters: refused without --force, replaced with it
    args2 = [a if a != "5" else "6" for a in args]
    assert cli.main(args2) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(args2 + ["--force"]) == 0
    assert files_bytes(folder)["train.src"] != before["train.src"]
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())   # no temp leftovers

    (root / "lengthgen" / "copy" / "test").mkdir()                       # an empty folder is not refused
    assert cli.main(["generate", "--task", "copy", "--split", "test", "--seed", "5", "--out-root", str(root),
                     "--test-lengths", "64", "128", "--test-size", "7", "--quiet"]) == 0
    test = root / "lengthgen" / "copy" / "test"
    assert list_shards(test, "test") == [("test_0_64", 0, 64), ("test_1_128", 1, 128)]

    assert cli.main(["pack", str(test), "--quiet"]) == 0
    assert len(PackedSplit(test, "test_1_128")) == 7
    assert cli.main(["pack", str(test), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert PackedSplit(tmp_path / "p", "test_0_64")[0][0] == 32


def test_cli_bad_arguments(tmp_path, capsys):
    root = str(tmp_path / "data")
    assert cli.main(["generate", "--task", "copy", "--split", "train", "--seed", "0", "--out-root", root]) == 2
    assert "--size" in capsys.readouterr().err
    assert cli.main(["generate", "--task", "mqmtar", "--split", "test", "--seed", "0", "--out-root", root,
                     "--test-lengths", "4"]) == 2
    assert "too short" in capsys.readouterr().err
    assert cli.main(["generate", "--task", "copy", "--split", "train", "--size", "10", "--seed", "0",
                     "--out-root", root, "--min-len", "9", "--max-len", "3"]) == 2
    assert cli.main(["pack", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):                                  # argparse: unknown task
        cli.main(["generate", "--task", "count", "--split", "train", "--seed", "0", "--out-root", root])
