"""Write image-text WebDataset shards in the img2dataset layout, from a folder or from a demo generator.

    python -m blip2_ds.data.write demo OUT_DIR [--num-train 2000 --num-val 200 --seed 0]
    python -m blip2_ds.data.write folder IMAGE_DIR CAPTIONS_FILE OUT_DIR [--prefix shard]

Layout (what img2dataset produces and what the streaming reader expects): shards named
``{prefix}-{00000..}.tar`` whose members come in per-sample runs ``{key}.jpg|png|webp``,
``{key}.txt`` (UTF-8 caption) and optionally ``{key}.json`` (metadata); beside every shard
``X.tar`` a ``X_stats.json`` whose ``"successes"`` is the shard's sample count, so the reader
can plan exact epochs without opening a single tar.

Shards are reproducible: the same input gives byte-identical tars (fixed member metadata, no
timestamps anywhere), which makes them cacheable and diffable. Each tar is written under a
``.tar.tmp`` name and renamed only when complete, after its stats file, so anything a reader can
glob as ``*.tar`` is whole and already has its stats.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Image kinds the reader decodes; "jpeg" is stored as "jpg" like img2dataset does, so one suffix
# per kind reaches the decoder.
IMAGE_EXTS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
CAPTION_FORMATS = ("COCO captions .json", ".csv with columns file_name|image|filepath,caption",
                   ".jsonl with {file_name|image, caption|text}")


@dataclass
class WriteSummary:
    """What a write produced: shard paths, sample count, skipped samples by reason, brace pattern."""

    shards: list[Path]
    samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    pattern: str = ""

    def describe(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{len(self.shards)} shard(s), {self.samples} sample(s), skipped: {skipped}\n"
                f"  {self.pattern or '(no shards written)'}")


def brace_pattern(out_dir: str | os.PathLike, prefix: str, first: int, last: int) -> str:
    """``out/prefix-{00000..00007}.tar`` (webdataset/braceexpand syntax); a plain path for one shard."""
    if last < first:
        return ""
    if first == last:
        return str(Path(out_dir) / f"{prefix}-{first:05d}.tar")
    return str(Path(out_dir) / f"{prefix}-{{{first:05d}..{last:05d}}}.tar")


def _check_key(key: str) -> None:
    # webdataset splits "dir/key.a.b" at the first dot of the base name, so a dot or slash in a
    # key would silently change the key (and merge or split samples) on the way back.
    if not isinstance(key, str) or not key or any(c in key for c in "./\\") or key.startswith("__"):
        raise ValueError(f"invalid sample key {key!r}: must be a non-empty string without '.', '/', "
                         "'\\' and not starting with '__'")


class ShardWriter:
    """Writes samples into ``{prefix}-{index:05d}.tar`` shards of ``samples_per_shard`` samples each.

    Use as a context manager. On a clean exit the last (possibly short) shard is published; if the
    block raises, the shard in progress is discarded (its ``.tar.tmp`` removed) and the shards
    already completed stay, so a crashed run never leaves a truncated ``.tar`` behind.
    An existing shard of the same name is replaced.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", samples_per_shard: int = 1000,
                 start_index: int = 0):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if not prefix or "/" in prefix:
            raise ValueError(f"invalid shard prefix {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.start_index = start_index
        self.shards: list[Path] = []
        self.samples = 0
        self._index = start_index
        self._seen: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0
        self._closed = False

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:05d}.tar"

    def _add(self, name: str, data: bytes) -> None:
        # Fixed metadata: nothing about the machine, user or time leaks in, so output is byte-stable.
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image_bytes: bytes, image_ext: str, caption: str, meta: dict | None = None) -> None:
        """Append one sample: ``{key}.{ext}``, ``{key}.txt`` and, if ``meta`` is given, ``{key}.json``.

        The json holds ``{"key", "caption", **meta}`` (keys sorted) like img2dataset's metadata.
        Keys must be unique within this writer: duplicates would merge silently downstream.
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        _check_key(key)
        ext = IMAGE_EXTS.get(str(image_ext).lower().lstrip("."))
        if ext is None:
            raise ValueError(f"unsupported image extension {image_ext!r} for key {key!r}; "
                             f"supported: {', '.join(sorted(IMAGE_EXTS))}")
        if not isinstance(caption, str):
            raise TypeError(f"caption for key {key!r} must be str, got {type(caption).__name__}")
        if key in self._seen:
            raise ValueError(f"duplicate sample key {key!r}")
        self._seen.add(key)
        if self._tar is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._tmp = self._path(self._index).with_suffix(".tar.tmp")
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self._add(f"{key}.{ext}", bytes(image_bytes))
        self._add(f"{key}.txt", caption.encode("utf-8"))
        if meta is not None:
            record = {"key": key, "caption": caption, **meta}
            self._add(f"{key}.json", json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        self._in_shard += 1
        self.samples += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._tar.close()
        path = self._path(self._index)
        stats = {"count": self._in_shard, "successes": self._in_shard,
                 "failed_to_download": 0, "failed_to_resize": 0}
        stats_path = path.with_name(f"{path.stem}_stats.json")
        stats_tmp = stats_path.with_suffix(".json.tmp")
        stats_tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(stats_tmp, stats_path)
        os.replace(self._tmp, path)  # last, so a visible .tar always has its stats
        self.shards.append(path)
        self._tar, self._tmp, self._in_shard = None, None, 0
        self._index += 1

    def close(self) -> WriteSummary:
        """Publish the shard in progress (if any) and return the summary. Idempotent."""
        if not self._closed:
            if self._tar is not None:
                self._finish_shard()
            self._closed = True
        return self.summary()

    def abort(self) -> None:
        """Drop the shard in progress; completed shards stay."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar, self._tmp = None, None
        self._closed = True

    def summary(self) -> WriteSummary:
        return WriteSummary(list(self.shards), self.samples, {},
                            brace_pattern(self.out_dir, self.prefix, self.start_index, self._index - 1))


# ---------------------------------------------------------------------------------------------
# From an image folder plus a captions file
# ---------------------------------------------------------------------------------------------

def _image_ext(file_name: str, where: str) -> str:
    ext = Path(file_name).suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise ValueError(f"unsupported image extension {Path(file_name).suffix or '(none)'!r} for "
                         f"{file_name!r} ({where}); supported: .jpg .jpeg .png .webp")
    return ext


def _pick(row: dict, names: tuple[str, ...]):
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    return None


def _read_coco(data: dict) -> tuple[list[tuple[str, str, str, dict]], dict[str, int]]:
    """One record per (image, caption) pair, keys ``{image_id:09d}_{n}`` with n the caption's rank."""
    skipped: dict[str, int] = {}
    by_image: dict = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    known = {img["id"] for img in data["images"]}
    orphans = sum(len(v) for k, v in by_image.items() if k not in known)
    if orphans:
        skipped["unknown_image_id"] = orphans
    records = []
    for img in data["images"]:
        image_id, file_name = img["id"], img["file_name"]
        captions = by_image.get(image_id, [])
        if not captions:
            skipped["no_caption"] = skipped.get("no_caption", 0) + 1
        stem = f"{image_id:09d}" if isinstance(image_id, int) else str(image_id)
        for n, caption in enumerate(captions):
            records.append((file_name, caption, f"{stem}_{n}", {"image_id": image_id}))
    return records, skipped


def _from_rows(rows, path: Path, what: str) -> list[tuple[str, str, str, dict]]:
    """Rows of dicts (csv or json lines) -> records keyed by their 0-based row number."""
    records = []
    for i, row in enumerate(rows):
        file_name = _pick(row, ("file_name", "image", "filepath"))
        caption = _pick(row, ("caption", "text"))
        if file_name is None or caption is None:
            raise ValueError(f"{path}: {what} {i + 1} lacks an image (file_name|image|filepath) "
                             f"or a caption (caption|text): {row!r}")
        records.append((str(file_name), str(caption), f"{i:09d}", {}))
    return records


def read_captions(captions_file: str | os.PathLike) -> tuple[list[tuple[str, str, str, dict]], dict[str, int]]:
    """Parse a captions file into ``(file_name, caption, key, extra_meta)`` records + skip counts.

    The format comes from the extension: ``.json`` (COCO captions, or a list of row objects),
    ``.jsonl``/``.jsonlines`` (one object per line), ``.csv`` (header row). Anything else is an
    error rather than a guess, because a mis-parsed captions file silently trains on garbage.
    """
    path = Path(captions_file)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    suffix = path.suffix.lower()
    accepted = "accepted formats: " + "; ".join(CAPTION_FORMATS)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); {accepted}") from None
        if isinstance(data, dict) and "images" in data and "annotations" in data:
            try:
                return _read_coco(data)
            except (KeyError, TypeError) as e:
                raise ValueError(f"{path}: malformed COCO captions (images need 'id', 'file_name'; "
                                 f"annotations need 'image_id', 'caption'): {e!r}") from None
        if isinstance(data, list) and all(isinstance(r, dict) for r in data):
            return _from_rows(data, path, "entry"), {}
        raise ValueError(f"{path}: JSON is neither COCO captions (keys 'images', 'annotations') nor a "
                         f"list of records; {accepted}")
    if suffix in (".jsonl", ".jsonlines"):
        rows = []
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {n} is not valid JSON ({e})") from None
                    if not isinstance(rows[-1], dict):
                        raise ValueError(f"{path}: line {n} is not a JSON object")
        return _from_rows(rows, path, "record"), {}
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if not ({"file_name", "image", "filepath"} & set(header)) or not ({"caption", "text"} & set(header)):
                raise ValueError(f"{path}: CSV header {header} needs an image column (file_name, image or "
                                 "filepath) and a caption column (caption or text)")
            reader.fieldnames = header
            return _from_rows(list(reader), path, "data row"), {}
    raise ValueError(f"{path}: unknown captions file format {suffix or '(no extension)'!r}; {accepted}")


def write_from_folder(image_dir: str | os.PathLike, captions_file: str | os.PathLike, out_dir: str | os.PathLike,
                      prefix: str = "shard", samples_per_shard: int = 1000, start_index: int = 0,
                      shuffle_seed: int | None = 0) -> WriteSummary:
    """Shard an image folder with its captions; image bytes are copied as-is (no re-encoding).

    The samples are written in a random order drawn from ``shuffle_seed`` (None: as listed). Listed
    order keeps the captions of one image together (COCO: 5, Visual Genome: dozens), and the reader
    makes batches of neighbouring samples, so they would meet in one batch as each other's negatives:
    wrong ITC targets, and the likeliest ITM "no match" draws. The original samples batches at random.

    Every record is validated (image extension) before the first shard is written, so a bad
    captions file fails fast without leaving partial output. Missing or undecodable image files
    and empty captions are skipped and counted in ``summary.skipped`` instead of aborting a long
    run. Each sample's json carries ``source`` (the file name as listed), ``width``, ``height``.
    """
    from PIL import Image

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    records, skipped = read_captions(captions_file)
    keys = set()
    for i, (file_name, _, key, _) in enumerate(records):
        _image_ext(file_name, f"entry {i + 1} of {captions_file}")
        if key in keys:  # e.g. an image id listed twice in a COCO file
            raise ValueError(f"{captions_file}: entry {i + 1} ({file_name!r}) repeats sample key {key!r}")
        keys.add(key)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    with ShardWriter(out_dir, prefix, samples_per_shard, start_index) as writer:
        for file_name, caption, key, extra in records:
            caption = caption.strip()
            if not caption:
                skip("empty_caption")
                continue
            image_path = image_dir / file_name
            try:
                data = image_path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                skip("missing_image")
                continue
            try:  # header only: catches truncated/mislabelled files before they reach training
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
            except Exception:
                skip("unreadable_image")
                continue
            meta = {"source": file_name, "width": width, "height": height, **extra}
            writer.write(key, data, _image_ext(file_name, ""), caption, meta)
    summary = writer.summary()
    summary.skipped = skipped
    return summary


# ---------------------------------------------------------------------------------------------
# Demo data set: synthetic shapes with captions that describe them
# ---------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (240, 220, 30), "purple": (140, 40, 170), "orange": (250, 140, 20)}
NEUTRALS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.40}  # object side as a fraction of the image side
RELATIONS = ("above", "below", "to the left of", "to the right of")
ALL_COLOURS = {**COLOURS, **NEUTRALS}


def _demo_scene(rng: random.Random, s: int) -> dict:
    """Draw a scene description (what the caption states) plus exact boxes for rendering.

    Object colours never equal the background's, and the two objects of a pair differ in colour,
    so every colour word in a caption is visible in its image. Sizes and positions get small
    jitter so equal captions still give different pictures.
    """
    def obj(size_name: str, colour: str, cx: float, cy: float, side: float) -> dict:
        h = side / 2
        return {"shape": rng.choice(SHAPES), "colour": colour, "size": size_name,
                "box": [round(cx - h), round(cy - h), round(cx + h), round(cy + h)]}

    def side(size_name: str) -> float:
        return SIZES[size_name] * s * rng.uniform(0.9, 1.1)

    if rng.random() < 0.4:  # one object on a coloured or neutral background
        colour = rng.choice(list(COLOURS))
        background = rng.choice([c for c in ALL_COLOURS if c != colour])
        size_name = rng.choice(list(SIZES))
        d = side(size_name)
        cx, cy = (rng.uniform(d / 2 + 1, s - d / 2 - 1) for _ in range(2))
        return {"background": background, "relation": None, "objects": [obj(size_name, colour, cx, cy, d)]}
    # two objects: the first is in the half named by the relation, the second in the other half
    background = rng.choice(list(NEUTRALS))
    c1, c2 = rng.sample(list(COLOURS), 2)
    relation = rng.choice(RELATIONS)
    objects = []
    for i, colour in enumerate((c1, c2)):
        size_name = rng.choice(list(SIZES))
        d = side(size_name)
        first_half = (i == 0) == (relation in ("above", "to the left of"))
        lo, hi = (0, s / 2) if first_half else (s / 2, s)
        along = rng.uniform(lo + d / 2 + 1, hi - d / 2 - 1)  # along the relation's axis
        across = rng.uniform(d / 2 + 1, s - d / 2 - 1)
        cx, cy = (across, along) if relation in ("above", "below") else (along, across)
        objects.append(obj(size_name, colour, cx, cy, d))
    return {"background": background, "relation": relation, "objects": objects}


def demo_caption(scene: dict) -> str:
    """The demo caption grammar, one sentence per scene:

    one object:  ``a {size} {colour} {shape} on a {background} background``
    two objects: ``a {size} {colour} {shape} {relation} a {size} {colour} {shape}``
    with size in small|large, colour in red|green|blue|yellow|purple|orange, shape in
    circle|square|triangle, background in those colours or white|gray|black, relation in
    above|below|to the left of|to the right of.
    """
    phrases = [f"a {o['size']} {o['colour']} {o['shape']}" for o in scene["objects"]]
    if scene["relation"] is None:
        return f"{phrases[0]} on a {scene['background']} background"
    return f"{phrases[0]} {scene['relation']} {phrases[1]}"


def _render(scene: dict, s: int, rng: random.Random) -> bytes:
    from PIL import Image, ImageDraw

    def jitter(rgb):  # slight tint so one colour word covers a range of pixel values
        return tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in rgb)

    im = Image.new("RGB", (s, s), jitter(ALL_COLOURS[scene["background"]]))
    draw = ImageDraw.Draw(im)
    for o in scene["objects"]:
        x0, y0, x1, y1 = o["box"]
        fill = jitter(COLOURS[o["colour"]])
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def demo_samples(num: int, seed: int = 0, split: str = "train", image_size: int = 64):
    """Yield ``(key, jpeg_bytes, caption, scene)``; a pure function of (seed, split, image_size)."""
    # A string seed is hashed with SHA-512 by random.Random, so it is stable across processes
    # (unlike hash()), and each split gets its own independent stream.
    rng = random.Random(f"blip2_ds-demo/{split}/{seed}")
    for i in range(num):
        scene = _demo_scene(rng, image_size)
        yield f"{i:09d}", _render(scene, image_size, rng), demo_caption(scene), scene


def write_demo_dataset(out_dir: str | os.PathLike, num_train: int = 2000, num_val: int = 200, seed: int = 0,
                       image_size: int = 64, samples_per_shard: int = 250) -> dict[str, WriteSummary]:
    """Write the synthetic demo set: ``out_dir/train/demo-*.tar`` and held-out ``out_dir/val/demo-*.tar``.

    Byte-identical for equal arguments. The val split draws from its own random stream, so its
    images are new (captions come from a finite grammar and may repeat train captions). Each
    sample's json holds the generating ``scene`` so tests and probes can check captions against
    pixels. Returns ``{"train": summary, "val": summary}``; ``summary.pattern`` is the brace pattern.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 to fit two objects, got {image_size}")
    out = {}
    for split, num in (("train", num_train), ("val", num_val)):
        with ShardWriter(Path(out_dir) / split, "demo", samples_per_shard) as writer:
            for key, jpeg, caption, scene in demo_samples(num, seed, split, image_size):
                writer.write(key, jpeg, "jpg", caption,
                             {"split": split, "width": image_size, "height": image_size, "scene": scene})
        out[split] = writer.summary()
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_ds.data.write",
                                     description="Write img2dataset-layout WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="synthetic shapes-and-colours demo set (train + val)")
    demo.add_argument("out_dir")
    demo.add_argument("--num-train", type=int, default=2000)
    demo.add_argument("--num-val", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--samples-per-shard", type=int, default=250)
    demo.add_argument("--image-size", type=int, default=64)
    folder = sub.add_parser("folder", help="an image folder plus a COCO .json / .csv / .jsonl captions file")
    folder.add_argument("image_dir")
    folder.add_argument("captions_file")
    folder.add_argument("out_dir")
    folder.add_argument("--prefix", default="shard")
    folder.add_argument("--samples-per-shard", type=int, default=1000)
    folder.add_argument("--seed", type=int, default=0, help="of the random sample order (so that several "
                        "captions of one image do not share a batch)")
    folder.add_argument("--keep-order", action="store_true", help="write the samples in the listed order")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    try:
        if args.command == "demo":
            if args.num_train < 0 or args.num_val < 0:
                raise ValueError("--num-train and --num-val must be >= 0")
            results = write_demo_dataset(args.out_dir, args.num_train, args.num_val, args.seed,
                                         args.image_size, args.samples_per_shard)
        else:
            results = {"folder": write_from_folder(args.image_dir, args.captions_file, args.out_dir,
                                                   args.prefix, args.samples_per_shard,
                                                   shuffle_seed=None if args.keep_order else args.seed)}
    except (ValueError, OSError) as e:
        msg = str(e).replace("\n", " ")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    for name, summary in results.items():
        print(f"{name}: {summary.describe()}")
    print(f"done in {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
