"""Aspect-ratio buckets: the grid, which bucket an image gets, one bucket per (global) micro-batch, the geometry
SDXL conditions on, and a bucketed, captioned run that resumes bit-identically after SIGTERM."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.buckets import assign_bucket, assign_buckets, bucket_grid, image_size
from dreambooth.data import DataStream, Example, LatentSource
from tests.test_bad_input import assert_user_error
from tests.train_helpers import base_args, sigterm_at_step, write_photos

GRIDS = [(1024, 256, 2048, 64), (512, 256, 1024, 64), (768, 256, 1536, 64), (32, 16, 64, 8)]


@pytest.mark.parametrize("resolution, low, high, step", GRIDS)
def test_buckets_are_about_resolution_squared_in_steps_within_the_sides(resolution, low, high, step):
    grid = bucket_grid(resolution, low, high, step)
    assert (resolution, resolution) in grid and len(grid) == len(set(grid)) > 3
    for h, w in grid:
        assert h % step == 0 and w % step == 0 and low <= min(h, w) and max(h, w) <= high
        assert h * w <= resolution**2  # never more pixels than the square
        assert (w, h) in grid  # portrait and landscape alike
        # about resolution²: one side is as long as it can be given the other
        assert (h + step) * w > resolution**2 or h + step > high or h * (w + step) > resolution**2 or w + step > high


def test_the_sdxl_grid_holds_the_usual_buckets():
    grid = bucket_grid(1024, 256, 2048, 64)
    assert {(896, 1152), (1152, 896), (832, 1216), (768, 1344), (1344, 768)} <= set(grid)


def test_an_image_gets_the_bucket_closest_to_its_aspect_and_is_never_upscaled():
    grid = bucket_grid(512, 256, 1024, 64)
    # big enough for every bucket: the closest aspect ratio of the whole grid
    rng = random.Random(0)
    for _ in range(300):
        h, w = rng.randint(1100, 4000), rng.randint(1100, 4000)
        bucket = assign_bucket(h, w, grid, 64)
        best = min(abs(math.log((b[1] / b[0]) / (w / h))) for b in grid)
        assert bucket in grid and abs(math.log((bucket[1] / bucket[0]) / (w / h))) == pytest.approx(best)
    assert assign_bucket(3000, 2000, grid, 64) == (640, 384)  # 3:2 portrait → 640 high, 384 wide (5:3)
    assert assign_bucket(2000, 3000, grid, 64) == (384, 640)
    assert assign_bucket(1000, 1000, grid, 64) == (512, 512)
    # smaller than its bucket: a smaller bucket of that shape, which the image fills (kohya's bucket_no_upscale)
    assert assign_bucket(500, 500, grid, 64) == (448, 448)
    assert assign_bucket(300, 400, grid, 64) == (256, 384)  # sides rounded down to steps, as kohya does
    for _ in range(300):
        h, w = rng.randint(128, 1200), rng.randint(128, 1200)
        bh, bw = assign_bucket(h, w, grid, 64)
        assert bh <= h and bw <= w and bh % 64 == 0 and bw % 64 == 0 and bh * bw <= 512 * 512


def _stream(batch_size, group, *, classes=True, counts=(5, 3, 2), seed=3, dropout=0.25):
    sizes = [(24, 40), (32, 32), (48, 16)]
    instances, buckets = [], {}
    for size, count in zip(sizes, counts, strict=True):
        for k in range(count):
            example = Example(f"{size[0]}x{size[1]}-{k}", f"sks {k}", 0)
            instances.append(example)
            buckets[example.path] = size
    class_examples = {0: [Example(f"c{k}", "thing", 0) for k in range(3)]} if classes else None
    return DataStream(instances, class_examples, seed, batch_size, random_flip=True, buckets=buckets, group=group,
                      caption_dropout=dropout)  # fmt: skip


def test_every_micro_batch_is_one_bucket_and_every_epoch_shows_every_image():
    stream = _stream(4, 4)
    assert stream.epoch_length == 8 + 4 + 4  # each bucket filled up to whole batches
    epochs = []
    for epoch in range(3):
        seen = []
        for index in range(epoch * 4, epoch * 4 + 4):
            batch = stream.batch(index)
            assert len({stream.buckets[e.path] for e in batch.examples[: batch.num_instance]}) == 1
            assert batch.size == stream.buckets[batch.examples[0].path]
            seen += [e.path for e in batch.examples[: batch.num_instance]]
        assert set(seen) == {e.path for e in stream.instances}
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order each epoch
    # a pure function of (seed, position): a fresh stream says the same, another seed does not
    assert [_stream(4, 4).batch(i).examples for i in range(12)] == [stream.batch(i).examples for i in range(12)]
    assert [_stream(4, 4, seed=4).batch(i).examples for i in range(12)] != [stream.batch(i).examples for i in range(12)]
    with pytest.raises(ValueError, match="straddle"):
        stream.at(2)  # a slice across two global micro-batches never happens (the loop starts them at multiples)


@pytest.mark.parametrize("world", [2, 4])
def test_process_slices_with_buckets_make_up_one_process_batches(world):
    one = _stream(4, 4)  # one process, 4 per micro-batch
    part = _stream(4 // world, 4)  # `world` processes, their share each, the same global micro-batch
    for index in range(20):
        big = one.batch(index)
        slices = [part.at(index * 4 + rank * (4 // world)) for rank in range(world)]
        assert all(s.size == big.size for s in slices)
        n = 4 // world
        assert [e for s in slices for e in s.examples[:n]] == big.examples[:4]
        assert [e for s in slices for e in s.examples[n:]] == big.examples[4:]
        assert [f for s in slices for f in s.flips[:n]] == big.flips[:4]
        assert [p for s in slices for p in s.prompts[:n]] == big.prompts[:4]


# ───────────────────────────── pixels and geometry ─────────────────────────────

RES = 32
# (width, height) of the photos: landscape 3:2, square, tall 3:7, and a small one (below its bucket)
SIZES = {"wide": (48, 32), "square": (32, 32), "tall": (24, 56), "small": (20, 20)}
BUCKET_FLAGS = ("--resolution", RES, "--buckets", "--bucket-step", 8, "--bucket-min-side", 16, "--bucket-max-side", 64)


def _photos(folder, names=("wide", "wide", "square", "square", "tall")):
    for k, name in enumerate(names):
        write_photos(folder / f"tmp{k}", count=1, size=SIZES[name], seed=k).joinpath("photo-0.png").rename(
            folder / f"{k}-{name}.png"
        )
    return folder


@pytest.fixture(scope="module")
def vae(model):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model / "vae")


def test_each_image_is_cut_to_its_bucket_and_its_geometry_recorded(vae, tmp_path):
    folder = _photos(tmp_path / "p", ("wide", "square", "tall", "small"))
    paths = sorted(folder.glob("*.png"))
    grid = bucket_grid(RES, 16, 64, 8)
    buckets = assign_buckets(paths, grid, 8)
    assert [buckets[p] for p in paths] == [(24, 40), (32, 32), (48, 16), (16, 16)]  # (h, w); small: not upscaled
    assert image_size(paths[0]) == (32, 48)
    instances = [Example(p, "sks", 0) for p in paths]
    class_image = tmp_path / "class.png"
    class_image.write_bytes(paths[1].read_bytes())
    classes = {0: [Example(class_image, "thing", 0)]}  # a square class image
    stream = DataStream(instances, classes, 1, 1, random_flip=False, buckets=buckets)
    source = LatentSource(vae, RES, True, torch.device("cpu"), torch.float32)
    rows = {}
    for index in range(4):
        batch = stream.batch(index)
        params = source.distributions(batch, stream)
        h, w = batch.size
        assert params.shape == (2, 8, h // 2, w // 2)  # the tiny VAE halves: latents of the bucket's shape
        assert batch.geometry.dtype == torch.float32 and batch.geometry.shape == (2, 6)
        rows[batch.examples[0].path.stem] = batch.geometry.tolist()
    # centred crops: (orig h, w, crop top, left, target h, w); instance row, then the class row cut to its bucket
    assert rows["0-wide"] == [[32, 48, 1, 0, 24, 40], [32, 32, 8, 0, 24, 40]]  # 48×32 → 40×27, 1 row off the top
    assert rows["1-square"] == [[32, 32, 0, 0, 32, 32], [32, 32, 0, 0, 32, 32]]
    assert rows["2-tall"] == [[56, 24, 0, 2, 48, 16], [32, 32, 0, 16, 48, 16]]  # 24×56 → 21×48, 16 wide from 2
    assert rows["3-small"] == [[20, 20, 0, 0, 16, 16], [32, 32, 0, 0, 16, 16]]  # downscaled to 16, never up
    # without buckets: the square crop of --resolution (the short side resized to it)
    plain = DataStream(instances[:1], None, 1, 1, random_flip=False)
    batch = plain.batch(0)
    source.distributions(batch, plain)
    assert batch.geometry.tolist() == [[32, 48, 0, 8, 32, 32]]
    # random crops and flips stay inside the resized image; the cache keeps one crop per (image, flip, bucket)
    flipping = DataStream(instances, classes, 1, 1, random_flip=True, buckets=buckets)
    cropping = LatentSource(vae, RES, False, torch.device("cpu"), torch.float32)
    cached = LatentSource(vae, RES, False, torch.device("cpu"), torch.float32)
    cached.build_cache(flipping.cache_entries(), True, seed=1)
    assert len(cached.cache) == 2 * (4 + 4)  # 4 instance crops + the class image in each of the 4 buckets, × flip
    for index in range(16):
        batch = flipping.batch(index)
        for source in (cropping, cached):
            source.distributions(batch, flipping)
            for (orig_h, orig_w, top, left, th, tw), example in zip(
                batch.geometry.tolist(), batch.examples, strict=True
            ):
                assert (orig_h, orig_w) == image_size(example.path) and (th, tw) == batch.size
                scale = max(th / orig_h, tw / orig_w)
                assert 0 <= top <= max(th, round(orig_h * scale)) - th
                assert 0 <= left <= max(tw, round(orig_w * scale)) - tw


# ───────────────────────────── training ─────────────────────────────


def test_buckets_need_a_resolution_in_steps(cli, model, photos, tmp_path):
    result = cli(*base_args(model, photos, tmp_path / "o", "--resolution", 96, "--buckets"))
    assert_user_error(result, "--resolution 96", "multiple of 64", "--resolution 64 or 128")
    assert_user_error(cli(*base_args(model, photos, tmp_path / "o", "--bucket-step", 8)), "--bucket-step", "--buckets")
    result = cli(*base_args(model, photos, tmp_path / "o", *BUCKET_FLAGS[:-2], "--bucket-max-side", 30))
    assert_user_error(result, "--bucket-max-side 30")


HARD = (
    *BUCKET_FLAGS, "--caption-extension", ".txt", "--caption-dropout", 0.3, "--max-train-steps", 4,
    "--learning-rate", "1e-3", "--train-batch-size", 2, "--save-interval", 100,
    "--train-text-encoder", "--random-flip", "--lr-scheduler", "cosine", "--no-cache-latents",
)  # fmt: skip


def _captioned_photos(folder):
    _photos(folder)
    (folder / "0-wide.txt").write_text("a photo of sks thing, wide")
    (folder / "2-square.txt").write_text("a green disc")  # gets the instance prompt in front
    return folder


def test_a_bucketed_captioned_run_resumes_bit_identically_after_sigterm(cli, model, tmp_path, monkeypatch):
    photos = _captioned_photos(tmp_path / "sks")
    straight = cli(*base_args(model, photos, tmp_path / "a", *HARD))
    assert straight.exit_code == 0, straight.stderr
    report = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert report["buckets"] == {"40x24": 2, "32x32": 2, "16x48": 1}  # width × height → images
    assert report["captions"] == 2 and report["caption_dropout"] == 0.3

    sigterm_at_step(monkeypatch, 2)
    assert cli(*base_args(model, photos, tmp_path / "b", *HARD)).exit_code == 130
    monkeypatch.undo()
    # the order of a bucketed run depends on the global micro-batch: another one is refused, not silently mixed
    other = list(HARD)
    other[other.index("--train-batch-size") + 1] = 1
    assert_user_error(cli(*base_args(model, photos, tmp_path / "b", *other)), "--buckets", "--train-batch-size")
    resumed = cli(*base_args(model, photos, tmp_path / "b", *HARD))
    assert resumed.exit_code == 0, resumed.stderr

    for part, file in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a, b = (
            load_file(out / "checkpoints" / "step-4" / part / f"{file}.safetensors")
            for out in (tmp_path / "a", tmp_path / "b")
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    resumed_report = json.loads((tmp_path / "b" / "train_report.json").read_text())
    assert resumed_report["losses"] == report["losses"]


def test_the_loop_hands_each_rows_geometry_to_the_family(cli, model, tmp_path, monkeypatch):
    from dreambooth.families.sd.family import StableDiffusion

    photos = _photos(tmp_path / "sks")
    classes = write_photos(tmp_path / "class", count=2, size=SIZES["square"], seed=9)
    seen = []
    predict = StableDiffusion.predict

    def recording(self, c, noisy, timesteps, cond, geometry=None):
        seen.append((noisy.shape, geometry))
        return predict(self, c, noisy, timesteps, cond, geometry)

    monkeypatch.setattr(StableDiffusion, "predict", recording)
    args = (*BUCKET_FLAGS, "--max-train-steps", 6, "--train-batch-size", 2, "--with-prior-preservation",
            "--class-prompt", "a photo of thing", "--class-data-dir", classes, "--num-class-images", 2)  # fmt: skip
    result = cli(*base_args(model, photos, tmp_path / "out", *args))  # cached latents (the default)
    assert result.exit_code == 0, result.stderr
    assert len(seen) == 6
    instance_sizes = {(h, w) for w, h in (SIZES[p.stem.split("-")[1]] for p in photos.glob("*.png"))}
    for shape, geometry in seen:
        assert geometry.shape == (4, 6) and geometry.dtype == torch.float32 and geometry.device.type == "cpu"
        targets = {tuple(row[4:]) for row in geometry.tolist()}
        assert len(targets) == 1 and tuple(x // 2 for x in targets.pop()) == tuple(shape[2:])  # one bucket
        assert {tuple(row[:2]) for row in geometry[:2].tolist()} <= instance_sizes  # instance rows
        assert {tuple(row[:2]) for row in geometry[2:].tolist()} == {(32, 32)}  # then the class rows
