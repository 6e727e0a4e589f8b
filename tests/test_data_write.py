"""Shard writing: layout, stats, determinism, round-trips through tarfile and webdataset, the demo set."""
import csv
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from blip2_ds.data.write import (ALL_COLOURS, COLOURS, RELATIONS, SHAPES, SIZES, ShardWriter, brace_pattern,
                                 demo_caption, read_captions, write_demo_dataset, write_from_folder)
from conftest import ROOT, subprocess_env


def _digest(paths) -> dict:
    return {Path(p).name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_samples(out_dir, n, per_shard, meta=True):
    with ShardWriter(out_dir, "s", per_shard) as w:
        for i in range(n):
            w.write(f"k{i:04d}", f"img{i}".encode(), "jpeg", f"caption {i} é",
                    {"i": i} if meta else None)
    return w


def _jpeg(colour=(200, 10, 10), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ ShardWriter

def test_writer_rolls_shards_and_writes_stats(tmp_path):
    w = _write_samples(tmp_path, 23, 10)
    assert [p.name for p in w.shards] == ["s-00000.tar", "s-00001.tar", "s-00002.tar"]
    summary = w.close()  # idempotent
    assert summary.samples == 23 and summary.pattern == str(tmp_path / "s-{00000..00002}.tar")
    for path, expected in zip(w.shards, [10, 10, 3]):
        stats = json.loads(path.with_name(path.stem + "_stats.json").read_text())
        assert stats["successes"] == stats["count"] == expected
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        assert len(_members(path)) == 3 * expected
    # nothing but shards and stats, no temporaries left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"s-0000{i}.tar" for i in range(3)] + [f"s-0000{i}_stats.json" for i in range(3)])


def test_writer_exact_multiple_has_no_empty_shard_and_start_index(tmp_path):
    with ShardWriter(tmp_path, "p", 5, start_index=7) as w:
        for i in range(10):
            w.write(str(i), b"x", "png", "c")
    assert [p.name for p in w.shards] == ["p-00007.tar", "p-00008.tar"]
    assert w.summary().pattern == str(tmp_path / "p-{00007..00008}.tar")
    assert brace_pattern(tmp_path, "p", 3, 3) == str(tmp_path / "p-00003.tar")


def test_members_ordered_per_key_and_round_trip(tmp_path):
    w = _write_samples(tmp_path, 4, 10)
    members = _members(w.shards[0])
    assert [name for name, _ in members[:3]] == ["k0000.jpg", "k0000.txt", "k0000.json"]
    assert [name for name, _ in members][3::3] == ["k0001.jpg", "k0002.jpg", "k0003.jpg"]
    data = dict(members)
    assert data["k0002.jpg"] == b"img2" and data["k0002.txt"].decode("utf-8") == "caption 2 é"
    assert json.loads(data["k0002.json"]) == {"key": "k0002", "caption": "caption 2 é", "i": 2}
    with tarfile.open(w.shards[0]) as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) == (0, 0, 0, 0o644, "", "")


def test_webdataset_reads_shards(tmp_path):
    webdataset = pytest.importorskip("webdataset")
    w = _write_samples(tmp_path, 12, 5)
    samples = list(webdataset.WebDataset([str(p) for p in w.shards], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"k{i:04d}" for i in range(12)]
    assert samples[7]["jpg"] == b"img7" and samples[7]["txt"] == "caption 7 é".encode()
    assert json.loads(samples[7]["json"])["i"] == 7
    # the brace pattern works as a webdataset url too
    assert len(list(webdataset.WebDataset(w.summary().pattern, shardshuffle=False))) == 12


def test_writer_byte_identical_on_rerun(tmp_path):
    a = _write_samples(tmp_path / "a", 17, 6)
    time.sleep(1.1)  # a timestamp leaking into the tar would now differ
    b = _write_samples(tmp_path / "b", 17, 6)
    assert _digest(a.shards) == _digest(b.shards)


def test_writer_rejects_bad_input(tmp_path):
    with ShardWriter(tmp_path, "s", 10) as w:
        w.write("a", b"x", "jpg", "c")
        with pytest.raises(ValueError, match="duplicate sample key 'a'"):
            w.write("a", b"y", "jpg", "c")
        with pytest.raises(ValueError, match="unsupported image extension 'gif'"):
            w.write("b", b"x", "gif", "c")
        for bad in ("", "a.b", "a/b", "__x"):
            with pytest.raises(ValueError, match="invalid sample key"):
                w.write(bad, b"x", "jpg", "c")
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, "s", 0)


def test_writer_discards_partial_shard_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "s", 2) as w:
            for i in range(3):
                w.write(str(i), b"x", "jpg", "c")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-00000.tar", "s-00000_stats.json"]


# ------------------------------------------------------------------------------- from a folder

@pytest.fixture
def image_folder(tmp_path):
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    (d / "a.jpg").write_bytes(_jpeg((200, 0, 0)))
    Image.new("RGB", (5, 7), "blue").save(d / "b.png")
    Image.new("RGB", (4, 4), "green").save(d / "sub" / "c.webp")
    (d / "d.JPEG").write_bytes(_jpeg((0, 0, 200), (3, 3)))
    return d


def _shard_samples(summary):
    out = {}
    for path in summary.shards:
        for name, data in _members(path):
            key, ext = name.split(".", 1)
            out.setdefault(key, {})[ext] = data
    return out


def test_from_folder_coco(tmp_path, image_folder):
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 22, "file_name": "b.png"},
                       {"id": 3, "file_name": "missing.jpg"}, {"id": 4, "file_name": "sub/c.webp"}],
            "annotations": [{"image_id": 22, "caption": "blue one"}, {"image_id": 1, "caption": "red one"},
                            {"image_id": 22, "caption": "a blue thing"}, {"image_id": 3, "caption": "gone"},
                            {"image_id": 99, "caption": "orphan"}]}
    cap = tmp_path / "captions.json"
    cap.write_text(json.dumps(coco))
    summary = write_from_folder(image_folder, cap, tmp_path / "out", "coco", samples_per_shard=2, shuffle_seed=None)
    assert summary.samples == 3 and len(summary.shards) == 2
    assert summary.skipped == {"missing_image": 1, "no_caption": 1, "unknown_image_id": 1}
    samples = _shard_samples(summary)
    assert list(samples) == ["000000001_0", "000000022_0", "000000022_1"]
    assert samples["000000022_1"]["txt"] == b"a blue thing"
    assert samples["000000022_0"]["png"] == (image_folder / "b.png").read_bytes()  # copied as-is
    meta = json.loads(samples["000000022_0"]["json"])
    assert (meta["source"], meta["width"], meta["height"], meta["image_id"]) == ("b.png", 5, 7, 22)
    stats = [json.loads(p.with_name(p.stem + "_stats.json").read_text())["successes"] for p in summary.shards]
    assert stats == [2, 1]


def test_from_folder_spreads_the_captions_of_an_image(tmp_path, image_folder):
    """COCO lists 5 captions per image: written as listed they sit together and meet in one batch."""
    coco = {"images": [{"id": i, "file_name": "a.jpg"} for i in range(40)],
            "annotations": [{"image_id": i, "caption": f"caption {n} of {i}"} for i in range(40) for n in range(5)]}
    cap = tmp_path / "captions.json"
    cap.write_text(json.dumps(coco))

    def same_image_pairs_per_batch(summary, batch=10) -> float:
        keys = list(_shard_samples(summary))
        batches = [[key.split("_")[0] for key in keys[b:b + batch]] for b in range(0, len(keys), batch)]
        return sum(len(b) - len(set(b)) for b in batches) / len(batches)

    shuffled = write_from_folder(image_folder, cap, tmp_path / "shuffled", samples_per_shard=50)
    listed = write_from_folder(image_folder, cap, tmp_path / "listed", samples_per_shard=50, shuffle_seed=None)
    assert same_image_pairs_per_batch(listed) == 8  # 2 images x 5 captions in every batch of 10
    assert same_image_pairs_per_batch(shuffled) < 2  # chance: 45 pairs x 4/199 = 0.9
    again = write_from_folder(image_folder, cap, tmp_path / "again", samples_per_shard=50)
    assert [p.read_bytes() for p in again.shards] == [p.read_bytes() for p in shuffled.shards]  # reproducible
    assert sorted(_shard_samples(shuffled)) == sorted(_shard_samples(listed))


@pytest.mark.parametrize("image_col,caption_col", [("file_name", "caption"), ("image", "caption"),
                                                    ("filepath", "text")])
def test_from_folder_csv(tmp_path, image_folder, image_col, caption_col):
    cap = tmp_path / "captions.csv"
    with cap.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([image_col, caption_col])
        writer.writerows([["a.jpg", "red, with a comma"], ["nope.png", "missing"], ["sub/c.webp", "green"],
                          ["d.JPEG", 'quoted "blue"'], ["a.jpg", "red again"]])
    summary = write_from_folder(image_folder, cap, tmp_path / "out", samples_per_shard=10, shuffle_seed=None)
    assert summary.samples == 4 and summary.skipped == {"missing_image": 1}
    samples = _shard_samples(summary)
    assert list(samples) == ["000000000", "000000002", "000000003", "000000004"]
    assert samples["000000000"]["txt"] == b"red, with a comma"
    assert samples["000000003"]["txt"] == b'quoted "blue"' and "jpg" in samples["000000003"]
    assert samples["000000002"]["webp"] == (image_folder / "sub" / "c.webp").read_bytes()


def test_from_folder_jsonl(tmp_path, image_folder):
    cap = tmp_path / "captions.jsonl"
    cap.write_text("\n".join(json.dumps(r) for r in [
        {"file_name": "a.jpg", "caption": "red"}, {"image": "b.png", "text": "blue"},
        {"image": "x/y.jpg", "caption": "missing"}]) + "\n\n")
    summary = write_from_folder(image_folder, cap, tmp_path / "out", "j", shuffle_seed=None)
    assert summary.samples == 2 and summary.skipped == {"missing_image": 1}
    assert [s["txt"] for s in _shard_samples(summary).values()] == [b"red", b"blue"]


def test_from_folder_errors(tmp_path, image_folder):
    bad_fmt = tmp_path / "captions.parquet"
    bad_fmt.write_text("x")
    with pytest.raises(ValueError, match=r"captions\.parquet.*unknown captions file format.*\.csv"):
        read_captions(bad_fmt)
    gif = tmp_path / "gif.csv"
    gif.write_text("file_name,caption\na.jpg,ok\nanim.gif,nope\n")
    with pytest.raises(ValueError, match=r"unsupported image extension '\.gif' for 'anim\.gif'"):
        write_from_folder(image_folder, gif, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # validated before anything was written
    no_cols = tmp_path / "cols.csv"
    no_cols.write_text("path,label\na.jpg,x\n")
    with pytest.raises(ValueError, match="needs an image column"):
        read_captions(no_cols)
    not_coco = tmp_path / "other.json"
    not_coco.write_text('{"foo": 1}')
    with pytest.raises(ValueError, match="neither COCO"):
        read_captions(not_coco)
    with pytest.raises(FileNotFoundError):
        read_captions(tmp_path / "absent.csv")
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.png"}],
                               "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(ValueError, match="repeats sample key '000000001_0'"):
        write_from_folder(image_folder, dup, tmp_path / "out")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match="malformed COCO"):
        read_captions(broken)


def test_from_folder_unreadable_image_skipped(tmp_path, image_folder):
    (image_folder / "broken.jpg").write_bytes(b"not a jpeg")
    cap = tmp_path / "c.csv"
    cap.write_text("file_name,caption\nbroken.jpg,x\na.jpg,  \na.jpg,ok\n")
    summary = write_from_folder(image_folder, cap, tmp_path / "out")
    assert summary.samples == 1
    assert summary.skipped == {"unreadable_image": 1, "empty_caption": 1}


# --------------------------------------------------------------------------------------- demo set

def _nearest_colour(rgb) -> str:
    return min(ALL_COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(ALL_COLOURS[n], rgb)))


def _parse_caption(caption: str) -> dict:
    """Inverse of the caption grammar, written independently of the generator."""
    def obj(words):
        assert len(words) == 4 and words[0] == "a", words
        assert words[1] in SIZES and words[2] in COLOURS and words[3] in SHAPES, words
        return {"size": words[1], "colour": words[2], "shape": words[3]}

    if caption.endswith(" background"):
        head, background = caption[: -len(" background")].rsplit(" on a ", 1)
        return {"background": background, "relation": None, "objects": [obj(head.split())]}
    for relation in RELATIONS:
        if f" {relation} " in caption:
            left, right = caption.split(f" {relation} ")
            return {"relation": relation, "objects": [obj(left.split()), obj(right.split())]}
    raise AssertionError(caption)


def test_demo_dataset_deterministic_consistent_and_fast(tmp_path):
    t0 = time.perf_counter()
    result = write_demo_dataset(tmp_path / "a", num_train=2000, num_val=200, seed=0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, elapsed
    train, val = result["train"], result["val"]
    assert train.samples == 2000 and len(train.shards) == 8 and val.samples == 200
    assert train.pattern == str(tmp_path / "a" / "train" / "demo-{00000..00007}.tar")
    assert val.pattern == str(tmp_path / "a" / "val" / "demo-00000.tar")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train", "val"]

    again = write_demo_dataset(tmp_path / "b", num_train=2000, num_val=200, seed=0)
    assert _digest(train.shards) == _digest(again["train"].shards)
    assert _digest(val.shards) == _digest(again["val"].shards)

    samples = _shard_samples(train)
    assert len(samples) == 2000
    relations, kinds = set(), set()
    for key, s in list(samples.items())[:300]:
        caption = s["txt"].decode()
        scene = json.loads(s["json"])["scene"]
        assert demo_caption(scene) == caption
        parsed = _parse_caption(caption)
        assert parsed["relation"] == scene["relation"]
        assert [{k: o[k] for k in ("size", "colour", "shape")} for o in scene["objects"]] == parsed["objects"]
        relations.add(parsed["relation"])
        kinds.update((o["colour"], o["shape"]) for o in parsed["objects"])
        im = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        assert im.size == (64, 64)
        boxes = [o["box"] for o in scene["objects"]]
        for o, (x0, y0, x1, y1) in zip(parsed["objects"], boxes):
            # bottom-centre-ish point is inside a circle, square and upward triangle alike
            assert _nearest_colour(im.getpixel(((x0 + x1) // 2, (y0 + 2 * y1) // 3))) == o["colour"], key
        if parsed["relation"] is not None:
            (a, b) = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in boxes]
            axis, sign = {"above": (1, -1), "below": (1, 1), "to the left of": (0, -1),
                          "to the right of": (0, 1)}[parsed["relation"]]
            assert sign * (a[axis] - b[axis]) > 0, caption
        else:
            assert _nearest_colour(im.getpixel((0, 0))) == parsed["background"] or \
                   _nearest_colour(im.getpixel((63, 63))) == parsed["background"]
    assert relations == {None, *RELATIONS}
    assert len(kinds) == len(COLOURS) * len(SHAPES)

    val_samples = _shard_samples(val)
    overlap = {s["jpg"] for s in val_samples.values()} & {s["jpg"] for s in samples.values()}
    assert not overlap
    assert [s["txt"] for s in val_samples.values()][:20] != [s["txt"] for s in samples.values()][:20]


def test_demo_seed_changes_output(tmp_path):
    a = write_demo_dataset(tmp_path / "a", num_train=20, num_val=5, seed=0, image_size=96, samples_per_shard=8)
    b = write_demo_dataset(tmp_path / "b", num_train=20, num_val=5, seed=1, image_size=96, samples_per_shard=8)
    assert len(a["train"].shards) == 3
    assert _digest(a["train"].shards) != _digest(b["train"].shards)
    assert Image.open(io.BytesIO(_members(a["train"].shards[0])[0][1])).size == (96, 96)


# -------------------------------------------------------------------------------------------- CLI

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "blip2_ds.data.write", *map(str, args)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)


def test_cli_demo_and_folder(tmp_path, image_folder):
    r = _cli("demo", tmp_path / "demo", "--num-train", 30, "--num-val", 10, "--samples-per-shard", 10)
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "demo" / "train" / "demo-{00000..00002}.tar") in r.stdout
    assert str(tmp_path / "demo" / "val" / "demo-00000.tar") in r.stdout
    cap = tmp_path / "c.csv"
    cap.write_text("file_name,caption\na.jpg,red\nmissing.jpg,x\n")
    r = _cli("folder", image_folder, cap, tmp_path / "out", "--prefix", "mine")
    assert r.returncode == 0, r.stderr
    assert "1 sample(s)" in r.stdout and "missing_image=1" in r.stdout
    assert str(tmp_path / "out" / "mine-00000.tar") in r.stdout


def test_cli_bad_input_exits_2(tmp_path, image_folder):
    bad = tmp_path / "captions.txt"
    bad.write_text("x")
    r = _cli("folder", image_folder, bad, tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown captions file format" in r.stderr
    r = _cli("folder", tmp_path / "no_such_dir", bad, tmp_path / "out")
    assert r.returncode == 2 and "image folder not found" in r.stderr
    r = _cli("demo", tmp_path / "d", "--image-size", 8)
    assert r.returncode == 2 and r.stderr.startswith("error:")
    assert _cli("demo").returncode == 2  # argparse usage error
