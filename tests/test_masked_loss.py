"""--masked-loss: a mask per photo (photo.mask.png, or the photo's alpha channel) weighs the loss. What a black
region does (nothing), that the mask is cut, flipped and bucketed with its photo, resume, alpha, refusals, the
report — with and without cached latents, for SD and Flux."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from dreambooth.buckets import assign_buckets, bucket_grid
from dreambooth.config import build_train_config
from dreambooth.data import (
    DataStream,
    Example,
    LatentSource,
    instance_examples,
    load_mask,
    load_rgb,
    scan_images,
    to_tensor,
)
from dreambooth.tiny_model import write_tiny_diffusers, write_tiny_flux
from dreambooth.validation import prepare
from tests.flux_helpers import FLUX_FLAGS
from tests.test_bad_input import assert_user_error
from tests.train_helpers import RES, base_args, straight_and_resumed, write_photos

LORA = ("--adapter", "lora", "--lora-rank", 4, "--save-interval", 100, "--learning-rate", "1e-2")
CACHES = ["--cache-latents", "--no-cache-latents"]


def lora(out, step):
    folder = out / "checkpoints" / f"step-{step}" / "lora"
    return {f"{p.stem}.{k}": v for p in folder.glob("*.safetensors") for k, v in load_file(p).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def report(out):
    return json.loads((out / "train_report.json").read_text())


def left_half(size, value: int = 255) -> Image.Image:
    """A mask of `size` (w, h): its left part `value`, the rest black (asymmetric: a flip shows)."""
    mask = Image.new("L", size, 0)
    mask.paste(value, (0, 0, size[0] * 3 // 8, size[1]))
    return mask


def masked_pair(tmp_path):
    """Two folders of two photos that differ only where the mask is black: photo-1 is another picture in each and
    its mask is all black; photo-0 is the same, with a partial mask, in both."""
    folders = []
    for name, seed in (("a", 0), ("b", 1)):
        folder = write_photos(tmp_path / name, count=2)
        other = write_photos(tmp_path / f"other-{name}", count=2, seed=seed + 10, hue=90 * seed)
        (folder / "photo-1.png").write_bytes((other / "photo-1.png").read_bytes())
        left_half((40, 48)).save(folder / "photo-0.mask.png")
        Image.new("L", (40, 48), 0).save(folder / "photo-1.mask.png")
        folders.append(folder)
    assert (folders[0] / "photo-1.png").read_bytes() != (folders[1] / "photo-1.png").read_bytes()
    return folders


# ───────────────────────────── the effect ─────────────────────────────


@pytest.mark.parametrize("cache", CACHES)
def test_pixels_under_a_black_mask_train_nothing(cli, model, tmp_path, cache):
    """Photos that differ only where their masks are black train to the same weights, bit for bit; without
    --masked-loss they do not. (Only the loss is masked: the VAE and the denoiser see the whole picture, so pixels
    under a black part of a partly white mask still move the weights through the white part's prediction, as in
    kohya's; a wholly black mask makes the photo weigh nothing at all.)"""
    a, b = masked_pair(tmp_path)
    flags = (*LORA, "--max-train-steps", 4, "--random-flip", cache)
    for folder in (a, b):
        result = cli(*base_args(model, folder, tmp_path / f"{folder.name}-masked", *flags, "--masked-loss"))
        assert result.exit_code == 0, result.stderr
    assert same(lora(tmp_path / "a-masked", 4), lora(tmp_path / "b-masked", 4))
    if cache == "--cache-latents":
        for folder in (a, b):
            assert cli(*base_args(model, folder, tmp_path / f"{folder.name}-whole", *flags)).exit_code == 0
        assert not same(lora(tmp_path / "a-whole", 4), lora(tmp_path / "b-whole", 4))
        # the masked run learned something: not the base, not the unmasked run
        assert not same(lora(tmp_path / "a-masked", 4), lora(tmp_path / "a-whole", 4))


@pytest.mark.parametrize("family", ["sdxl", "flux-dev"])
def test_sdxl_and_flux_mask_their_latents(cli, tmp_path, family):
    """SDXL's loss is SD's layout; Flux packs latents 2×2 into tokens and unpacks its prediction: the mask weighs
    that unpacked loss."""
    if family == "sdxl":
        model, extra = write_tiny_diffusers(tmp_path / "sdxl", seed=0, model_type="sdxl"), ()
    else:
        model, extra = write_tiny_flux(tmp_path / "flux", seed=0), FLUX_FLAGS
    a, b = masked_pair(tmp_path)
    flags = (*extra, *LORA, "--max-train-steps", 3, "--random-flip")
    for folder in (a, b):
        result = cli(*base_args(model, folder, tmp_path / f"{folder.name}-masked", *flags, "--masked-loss"))
        assert result.exit_code == 0, result.stderr
    assert same(lora(tmp_path / "a-masked", 3), lora(tmp_path / "b-masked", 3))
    assert cli(*base_args(model, a, tmp_path / "a-whole", *flags)).exit_code == 0
    assert cli(*base_args(model, b, tmp_path / "b-whole", *flags)).exit_code == 0
    assert not same(lora(tmp_path / "a-whole", 3), lora(tmp_path / "b-whole", 3))


# ───────────────────────────── the data path ─────────────────────────────


def painted(folder, size=(64, 40)):
    """A photo with noise everywhere and a red rectangle off-centre (left, upper), and its mask: white exactly on
    the rectangle."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    photo = Image.fromarray((rng.random((size[1], size[0], 3)) * 60 + 40).astype(np.uint8), "RGB")
    box = (6, 4, 26, 30)
    photo.paste((255, 0, 0), box)
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    photo.save(folder / "wide.png")
    mask.save(folder / "wide.mask.png")
    return folder / "wide.png"


def expected_mask(mask: Image.Image, geometry, flip: bool) -> torch.Tensor:
    """The mask cut where the geometry says its photo was cut (the crop's corner is in the mirrored image's pixels
    when flipped), averaged over the tiny VAE's 2×2 pixels per latent pixel."""
    orig_h, orig_w, top, left, target_h, target_w = (int(v) for v in geometry)
    scale = max(target_h / orig_h, target_w / orig_w)
    resized = mask.resize((max(target_w, round(orig_w * scale)), max(target_h, round(orig_h * scale))),
                          Image.Resampling.BICUBIC, reducing_gap=3.0)  # fmt: skip
    if flip:
        resized = ImageOps.mirror(resized)
    pixels = torch.from_numpy(np.asarray(resized.crop((left, top, left + target_w, top + target_h)), np.float32))
    return (pixels / 255.0).reshape(target_h // 2, 2, target_w // 2, 2).mean(dim=(1, 3))


def test_a_mask_is_cut_flipped_and_bucketed_with_its_photo(model, tmp_path):
    from diffusers import AutoencoderKL

    photo = painted(tmp_path / "p")
    # the photo's masked region is red: wherever the cut mask is white the cut photo is red, wherever black it is not
    for seed in range(6):
        pixels, _, weights = to_tensor(load_rgb(photo), (24, 40), False, random.Random(seed), seed % 2 == 1,
                                       load_mask(photo.with_name("wide.mask.png"), photo))  # fmt: skip
        inside, outside = weights[0] == 1.0, weights[0] == 0.0
        assert inside.sum() > 40 and outside.sum() > 400
        assert torch.equal(pixels[:, inside], torch.tensor([[1.0], [-1.0], [-1.0]]).expand(3, int(inside.sum())))
        assert (pixels[0, outside] < 0).all()  # noise ≤ 100 of 255, never red
    # through the stream and the latent source, on a bucket crop with random flips; cached and not
    vae = AutoencoderKL.from_pretrained(model / "vae")
    [instance] = instance_examples({0: [photo]}, [_concept(photo.parent)], None, masks=True)
    assert instance.mask == photo.with_name("wide.mask.png")
    klass = Example(photo, "thing", 0)  # the same picture as a class image: trains whole
    buckets = assign_buckets([photo], bucket_grid(RES, 16, 64, 8), 8)
    assert buckets[photo] == (24, 40)
    stream = DataStream([instance], {0: [klass]}, 5, 1, random_flip=True, buckets=buckets)
    mask = load_mask(instance.mask, photo)
    on_the_fly = LatentSource(vae, RES, False, torch.device("cpu"), torch.float32, masked=True)
    cached = LatentSource(vae, RES, False, torch.device("cpu"), torch.float32, masked=True)
    cached.build_cache(stream.cache_entries(), True, seed=5)
    assert len(cached.cache) == 4  # (photo with its mask, photo whole) × flip: the mask is part of the key
    flips = set()
    for index in range(8):
        batch = stream.batch(index)
        for source in (on_the_fly, cached):
            params = source.distributions(batch, stream)
            assert batch.masks.shape == (2, 1, 12, 20) == (2, 1, *params.shape[2:])
            torch.testing.assert_close(batch.masks[0, 0], expected_mask(mask, batch.geometry[0], batch.flips[0]))
            assert torch.equal(batch.masks[1], torch.ones(1, 12, 20))  # the class row
        flips.add(batch.flips[0])
    assert flips == {False, True}
    # without --masked-loss: no masks at all
    plain = LatentSource(vae, RES, False, torch.device("cpu"), torch.float32)
    batch = stream.batch(0)
    plain.distributions(batch, stream)
    assert batch.masks is None


def _concept(folder):
    from dreambooth.config import Concept

    return Concept("a photo of sks thing", folder)


def test_mask_files_are_never_photos_and_grey_weighs_between(tmp_path):
    folder = write_photos(tmp_path / "p", count=2)
    left_half((40, 48), 128).save(folder / "photo-0.mask.png")
    Image.new("L", (40, 48), 0).save(folder / "PHOTO-9.MASK.PNG")  # a mask without its photo: ignored too
    assert [p.name for p in scan_images(folder, RES, "--instance-data-dir")] == ["photo-0.png", "photo-1.png"]
    weights = np.asarray(load_mask(folder / "photo-0.mask.png", folder / "photo-0.png"))
    assert set(np.unique(weights)) == {0, 128}


def test_validation_images_use_their_masks(model, tmp_path):
    from diffusers import AutoencoderKL

    folder = write_photos(tmp_path / "held", count=2)
    Image.new("L", (40, 48), 0).save(folder / "photo-0.mask.png")  # photo-0 measures nothing; photo-1 whole
    flags = {"model": str(model), "instance_data_dir": str(folder), "instance_prompt": "a photo of sks thing",
             "output": str(tmp_path / "out"), "resolution": RES, "masked_loss": True}  # fmt: skip
    cfg = build_train_config(None, flags)
    examples = instance_examples({0: sorted(folder.glob("photo-?.png"))}, cfg.concepts, None, masks=True)
    vset = prepare(cfg, examples, AutoencoderKL.from_pretrained(model / "vae"), torch.device("cpu"), 1)
    assert vset.masks.shape == (2, 1, 16, 16)
    assert torch.equal(vset.masks[0], torch.zeros(1, 16, 16)) and torch.equal(vset.masks[1], torch.ones(1, 16, 16))


# ───────────────────────────── resume, alpha, the report ─────────────────────────────


@pytest.mark.parametrize("cache", CACHES)
def test_a_masked_run_resumes_bit_identically(cli, model, tmp_path, monkeypatch, cache):
    photos = write_photos(tmp_path / "photos", count=3)
    left_half((40, 48)).save(photos / "photo-0.mask.png")
    left_half((40, 48), 100).save(photos / "photo-2.mask.png")
    classes = write_photos(tmp_path / "classes", count=2, seed=4)
    flags = (*LORA, "--max-train-steps", 4, "--masked-loss", "--random-flip", cache, "--with-prior-preservation",
             "--class-prompt", "a photo of thing", "--class-data-dir", classes, "--num-class-images", 2)  # fmt: skip
    straight_and_resumed(cli, monkeypatch, model, photos, tmp_path, flags, stop_at=2)
    assert same(lora(tmp_path / "a", 4), lora(tmp_path / "b", 4))
    assert report(tmp_path / "a")["losses"]["loss"] == report(tmp_path / "b")["losses"]["loss"]


def with_alpha(folder, alphas: dict[str, Image.Image]):
    """The photos named in `alphas` saved again as RGBA with that alpha channel."""
    for name, alpha in alphas.items():
        image = Image.open(folder / name).convert("RGBA")
        image.putalpha(alpha)
        image.save(folder / name)


def test_an_alpha_channel_is_the_mask_when_there_is_no_mask_file(cli, model, tmp_path):
    """A photo with transparency trains exactly as its (flattened) picture with that alpha as its mask file."""
    alpha = left_half((40, 48), 200)
    transparent = write_photos(tmp_path / "alpha", count=2)
    with_alpha(transparent, {"photo-0.png": alpha})
    files = write_photos(tmp_path / "files", count=2)
    load_rgb(transparent / "photo-0.png").save(files / "photo-0.png")  # what training sees of the RGBA photo
    alpha.save(files / "photo-0.mask.png")
    flags = (*LORA, "--max-train-steps", 3, "--masked-loss", "--random-flip")
    for folder in (transparent, files):
        assert cli(*base_args(model, folder, tmp_path / f"{folder.name}-out", *flags)).exit_code == 0
    assert same(lora(tmp_path / "alpha-out", 3), lora(tmp_path / "files-out", 3))
    assert report(tmp_path / "alpha-out")["masked_loss"] == {
        "instance_images": 2, "from_files": 0, "from_alpha": 1, "whole": 1,
    }  # fmt: skip
    assert report(tmp_path / "files-out")["masked_loss"]["from_files"] == 1


def test_the_report_counts_the_masks(cli, model, tmp_path):
    photos = write_photos(tmp_path / "photos", count=5)
    left_half((40, 48)).save(photos / "photo-0.mask.png")
    left_half((40, 48), 60).save(photos / "photo-1.mask.png")
    with_alpha(photos, {"photo-1.png": Image.new("L", (40, 48), 0),  # its mask file wins over its alpha
                        "photo-2.png": left_half((40, 48)),
                        "photo-3.png": Image.new("L", (40, 48), 255)})  # fully opaque: no mask  # fmt: skip
    flags = (*LORA, "--max-train-steps", 1, "--no-cache-latents")
    result = cli(*base_args(model, photos, tmp_path / "out", *flags, "--masked-loss"))
    assert result.exit_code == 0, result.stderr
    got = report(tmp_path / "out")
    assert got["instance_images"] == 5  # the mask files are not photos
    assert got["masked_loss"] == {"instance_images": 5, "from_files": 2, "from_alpha": 1, "whole": 2}
    assert "3 of 5 instance images have a mask" in result.stderr + result.stdout
    page = (tmp_path / "out" / "report.html").read_text()
    assert "masked_loss" in page and "from_alpha" in page
    assert cli(*base_args(model, photos, tmp_path / "plain", *flags)).exit_code == 0
    plain = report(tmp_path / "plain")
    assert plain["instance_images"] == 5 and plain["masked_loss"] is None
    assert "from_alpha" not in (tmp_path / "plain" / "report.html").read_text()


# ───────────────────────────── refusals ─────────────────────────────


def test_bad_masks_are_refused_by_name(cli, model, tmp_path):
    photos = write_photos(tmp_path / "photos", count=2)
    Image.new("L", (40, 48), 0).save(photos / "photo.mask.png")  # beside no photo: not photo-0's
    result = cli(*base_args(model, photos, tmp_path / "o", "--masked-loss"))
    assert_user_error(result, "--masked-loss", f"no image in the instance folder {photos}", "photo-0.mask.png",
                      "photo.mask.png")  # fmt: skip
    Image.new("L", (48, 40), 0).save(photos / "photo-1.mask.png")  # turned: 48×40 for a 40×48 photo
    result = cli(*base_args(model, photos, tmp_path / "o", "--masked-loss"))
    assert_user_error(result, str(photos / "photo-1.mask.png"), "48×40", str(photos / "photo-1.png"), "40×48")
    (photos / "photo-1.mask.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = cli(*base_args(model, photos, tmp_path / "o", "--masked-loss"))
    assert_user_error(result, f"mask file {photos / 'photo-1.mask.png'} cannot be read")
    # without --masked-loss, masks are not looked at (nor taken for photos)
    assert cli(*base_args(model, photos, tmp_path / "o", *LORA, "--max-train-steps", 1)).exit_code == 0


def test_dreambooth_run_takes_a_changed_mask_for_another_training(tmp_path):
    """`dreambooth run` skips a finished training whose inputs are unchanged: a mask file is one of them."""
    from dreambooth.pipeline import Hasher, mask_digests

    photos = write_photos(tmp_path / "photos", count=2)
    images = {0: sorted(photos.glob("photo-?.png"))}
    left_half((40, 48)).save(photos / "photo-0.mask.png")
    before = mask_digests(Hasher({}), images)
    assert before[str(photos / "photo-1.mask.png")] is None
    left_half((40, 48), 90).save(photos / "photo-0.mask.png")
    after = mask_digests(Hasher({}), images)
    assert before[str(photos / "photo-0.mask.png")] != after[str(photos / "photo-0.mask.png")]
