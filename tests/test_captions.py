"""Per-image captions (sidecar files) and caption dropout: read, fall back, keep the trigger, refuse non-UTF-8."""

import json

import pytest

from dreambooth.config import Concept
from dreambooth.data import DataStream, Example, class_examples_of, instance_caption, instance_examples, read_caption
from tests.test_bad_input import assert_user_error
from tests.train_helpers import base_args, write_photos


def test_captions_are_read_as_utf8_first_line_with_or_without_a_bom(tmp_path):
    image = tmp_path / "photo-0.png"
    (tmp_path / "photo-0.txt").write_bytes("\ufeff\n  sks dog in the snow, café  \nsecond line\n".encode())
    assert read_caption(image, ".txt") == "sks dog in the snow, café"
    (tmp_path / "photo-0.caption").write_text("sks dog asleep", encoding="utf-8")
    assert read_caption(image, ".caption") == "sks dog asleep"  # any extension
    assert read_caption(tmp_path / "photo-1.png", ".txt") == ""  # no file: no caption
    (tmp_path / "photo-2.txt").write_text(" \n\n")
    assert read_caption(tmp_path / "photo-2.png", ".txt") == ""  # blank file: no caption


def test_the_trigger_is_kept_and_missing_captions_fall_back_to_the_instance_prompt(tmp_path):
    photos = write_photos(tmp_path / "sks", count=4)
    (photos / "photo-0.txt").write_text("sks dog on a sofa")  # has the identifier: used as it is
    (photos / "photo-1.txt").write_text("a dog running on the beach")  # lacks it: the instance prompt goes first
    (photos / "photo-2.txt").write_text("")  # empty: the instance prompt
    concept = Concept("a photo of sks dog", photos, class_prompt="a photo of dog")
    examples = instance_examples({0: sorted(photos.glob("*.png"))}, (concept,), ".txt")
    assert [e.prompt for e in examples] == [
        "sks dog on a sofa",
        "a photo of sks dog, a dog running on the beach",
        "a photo of sks dog",
        "a photo of sks dog",  # photo-3 has no caption file
    ]
    assert [e.captioned for e in examples] == [True, True, False, False]
    # without a class prompt the identifier is the whole instance prompt; matching is by whole words, any case
    assert instance_caption("SKS, on grass", "sks", None) == "SKS, on grass"
    assert instance_caption("sksx on grass", "sks", None) == "sks, sksx on grass"
    assert instance_caption("a dog", "a photo of sks dog", None) == "a photo of sks dog, a dog"
    # without the flag nothing is read: every image trains with the instance prompt, as before
    assert {e.prompt for e in instance_examples({0: sorted(photos.glob("*.png"))}, (concept,), None)} == {
        "a photo of sks dog"
    }


def test_class_images_use_their_own_captions_or_the_class_prompt(tmp_path):
    folder = write_photos(tmp_path / "class", count=2)
    (folder / "photo-1.txt").write_text("a brown dog")
    examples = class_examples_of(sorted(folder.glob("*.png")), "a photo of dog", 0, ".txt")
    assert [e.prompt for e in examples] == ["a photo of dog", "a brown dog"]  # no trigger added to class images


def test_a_caption_file_that_is_not_utf8_is_refused_by_name(cli, model, tmp_path):
    photos = write_photos(tmp_path / "sks", count=2)
    (photos / "photo-1.txt").write_bytes("sks dog, caf\u00e9".encode("latin-1"))
    result = cli(*base_args(model, photos, tmp_path / "out", "--caption-extension", ".txt"))
    assert_user_error(result, str(photos / "photo-1.txt"), "UTF-8")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_bad_caption_dropout_and_extension_are_refused(cli, model, photos, tmp_path):
    assert_user_error(cli(*base_args(model, photos, tmp_path / "o", "--caption-dropout", 1)), "--caption-dropout")
    assert_user_error(cli(*base_args(model, photos, tmp_path / "o", "--caption-extension", "a/b")), "--caption-ext")


def _stream(dropout: float, seed: int = 5, with_classes: bool = True) -> DataStream:
    instances = [Example(f"i{k}", f"sks {k}", 0) for k in range(7)]
    classes = {0: [Example(f"c{k}", "dog", 0) for k in range(3)]} if with_classes else None
    return DataStream(instances, classes, seed, 4, random_flip=False, caption_dropout=dropout)


@pytest.mark.parametrize("share", [0.1, 0.35])
def test_caption_dropout_takes_its_share_deterministically_and_spares_class_rows(share):
    batches = [_stream(share).batch(i) for i in range(1000)]
    instance_prompts = [p for b in batches for p in b.prompts[: b.num_instance]]
    dropped = instance_prompts.count("") / len(instance_prompts)
    assert abs(dropped - share) < 0.03, dropped  # 4000 draws: the share is within about 4 standard errors
    assert all(p == "dog" for b in batches for p in b.prompts[b.num_instance :])  # class rows keep their prompt
    # a pure function of (seed, position): a fresh stream (a resumed run, another process) draws the same
    again = _stream(share)
    assert [again.at(17 + i).prompts for i in range(50)] == [_stream(share).at(17 + i).prompts for i in range(50)]
    assert [_stream(share, seed=6).batch(i).prompts for i in range(50)] != [b.prompts for b in batches[:50]]
    # the prompt cache is built from all_prompts, which holds the empty caption
    assert "" in _stream(share).all_prompts() and "" not in _stream(0.0).all_prompts()
    assert all(p for b in (_stream(0.0).batch(i) for i in range(100)) for p in b.prompts)


def test_a_captioned_run_reports_its_captions_and_dropout(cli, model, tmp_path):
    photos = write_photos(tmp_path / "sks", count=3)
    (photos / "photo-0.txt").write_text("a photo of sks thing on grass")
    (photos / "photo-1.txt").write_text("a red disc")
    args = ("--caption-extension", "txt", "--caption-dropout", 0.5, "--max-train-steps", 2)
    result = cli(*base_args(model, photos, tmp_path / "out", *args))
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["captions"] == 2 and report["caption_dropout"] == 0.5 and report["caption_extension"] == ".txt"
    assert report["settings"]["caption_extension"] == ".txt" and report["buckets"] is None


def test_a_run_records_caption_files_as_training_inputs_and_starts_afresh_when_one_changes(cli, tmp_path, tiny_sd1):
    from tests.test_pipeline import manifest

    photos = write_photos(tmp_path / "photos", count=3)
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{tiny_sd1}"\noutput = "out"\n[train]\ninstance_data_dir = "{photos}"\n'
        'instance_prompt = "a photo of sks thing"\nresolution = 32\nseed = 3\nmax_train_steps = 2\n'
        'caption_extension = ".txt"\ncaption_dropout = 0.2\nbuckets = true\nbucket_step = 8\nbucket_min_side = 16\n'
    )
    caption = photos / "photo-0.txt"
    caption.write_text("a photo of sks thing by the sea")
    assert cli("run", "--config", config).exit_code == 0
    inputs = manifest(tmp_path / "out")["stages"]["train"]["inputs"]
    assert inputs["captions"][str(caption)] is not None and inputs["buckets"] is True
    assert inputs["captions"][str(tmp_path / "photos" / "photo-1.txt")] is None  # no file: recorded as such
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["captions"] == 1 and report["buckets"] == {"32x32": 3}  # 40×48 photos: nearest to square

    caption.write_text("a photo of sks thing in the snow")
    result = cli("run", "--config", config)
    assert result.exit_code == 0, result.stderr
    assert "starts afresh" in result.stderr
