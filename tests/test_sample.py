"""`dreambooth sample` on what users have: a LoRA training checkpoint as it is (the base its record names and the
adapter), a Flux full fine-tune's checkpoint (the base's parts by record, the transformer it holds), an exported
LoRA file on its base (--lora FILE[:SCALE]). Each checkpoint's samples are the ones training drew."""

import numpy as np
from PIL import Image

from tests.flux_helpers import FLUX_FLAGS, flux_args, write_flux_files
from tests.train_helpers import base_args

PROMPT = "a photo of sks thing"
SAMPLES = ("--save-sample-prompt", PROMPT, "--n-save-sample", 2, "--save-infer-steps", 2)


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.float32)


def test_a_lora_checkpoint_samples_as_it_is_and_its_file_on_the_base(cli, model, photos, tmp_path):
    out = tmp_path / "out"
    flags = ("--adapter", "lora", "--lora-rank", 4, "--max-train-steps", 2, "--learning-rate", "3e-2",
             "--export-single-file", *SAMPLES)  # fmt: skip
    assert cli(*base_args(model, photos, out, *flags)).exit_code == 0
    checkpoint = out / "checkpoints" / "step-2"
    result = cli("sample", checkpoint, "--prompt", PROMPT, "--num-images", 2, "--seed", 7, "--steps", 2,
                 "--output", tmp_path / "again")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    for i in range(2):  # the checkpoint's own samples (seed 7, the run's) are drawn again, pixel for pixel
        assert np.array_equal(pixels(tmp_path / "again" / f"sample-{i:02d}.png"),
                              pixels(checkpoint / "samples" / f"prompt0-{i:02d}.png"))  # fmt: skip

    exported = out / "export" / "out-lora-step-2.safetensors"
    on_base = cli("sample", model, "--lora", f"{exported}:1.0", "--prompt", PROMPT, "--num-images", 1, "--seed", 7,
                  "--steps", 2, "--resolution", 32, "--output", tmp_path / "file")  # fmt: skip
    assert on_base.exit_code == 0, on_base.stderr
    plain = cli("sample", model, "--prompt", PROMPT, "--num-images", 1, "--seed", 7, "--steps", 2, "--resolution", 32,
                "--output", tmp_path / "plain")  # fmt: skip
    assert plain.exit_code == 0
    with_lora, base, trained = (pixels(tmp_path / d / "sample-00.png") for d in ("file", "plain", "again"))
    # the file on the base draws what the checkpoint draws (up to its fp16 rounding), not what the base draws
    assert np.abs(with_lora - trained).mean() < 2.0 < np.abs(base - trained).mean()

    bad = cli("sample", model, "--lora", f"{exported}:much", "--prompt", PROMPT)
    assert bad.exit_code == 2 and "--lora" in bad.stderr


def test_a_flux_full_checkpoint_samples_from_its_base_by_record(cli, photos, tmp_path):
    files = write_flux_files(tmp_path / "flux")
    out = tmp_path / "out"
    flags = (*flux_args(files), *FLUX_FLAGS, "--max-train-steps", 1, "--learning-rate", "1e-3", *SAMPLES)
    assert cli(*base_args(files["transformer"], photos, out, *flags)).exit_code == 0
    checkpoint = out / "checkpoints" / "step-1"
    assert not (checkpoint / "text_encoder_2").exists()  # only what trained: the base is named, not copied
    result = cli("sample", checkpoint, "--prompt", PROMPT, "--num-images", 2, "--seed", 7, "--steps", 2,
                 "--output", tmp_path / "again")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    for i in range(2):
        assert np.array_equal(pixels(tmp_path / "again" / f"sample-{i:02d}.png"),
                              pixels(checkpoint / "samples" / f"prompt0-{i:02d}.png"))  # fmt: skip
    # and the Flux files themselves, with their parts' flags
    direct = cli("sample", files["transformer"], *flux_args(files), "--prompt", PROMPT, "--num-images", 1, "--steps",
                 2, "--resolution", 32, "--output", tmp_path / "base")  # fmt: skip
    assert direct.exit_code == 0, direct.stderr
    assert (tmp_path / "base" / "sample-grid.png").is_file()
