"""The built-in tiny model follows prompts, and DreamBooth on it learns the demo subject (dreambooth/fidelity.py).

These run the real model and the real trainer: a trainer that does not learn fails the first fine-tuning
assertion, one whose prior-preservation loss does nothing fails the drift comparison.
"""

import random

import pytest

from dreambooth import fidelity, synthetic


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fidelity")


@pytest.fixture(scope="module")
def base(work):
    return fidelity.base_model(work)


def test_the_judge_tells_the_subject_from_the_shapes_and_reads_backgrounds():
    rng = random.Random(7)
    subjects = [synthetic.subject_scene(rng, colour) for colour in fidelity.COLOURS for _ in range(2)]
    shapes = [synthetic.random_scene(rng) for _ in range(32)]
    assert fidelity.subject_score([synthetic.render(s) for s in subjects]) > 0.9
    assert fidelity.subject_score([synthetic.render(s) for s in shapes]) < 0.05
    green = [synthetic.render(s) for s in subjects if s.background == "green"]
    assert fidelity.background_score(green, "green") > 0.9


def test_the_pretrained_model_follows_prompted_colours_far_above_chance(base):
    """Measured on these 24 prompts: colour 0.46, background 0.54 (chance 0.125 each); shape 0.33 (chance 0.25)
    is only a little above chance on this model (see dreambooth/assets/tiny/README.md), so it is not asserted."""
    result = fidelity.prompt_following(base, count=24)
    accuracy = result["accuracy"]
    assert accuracy["colour"] >= 0.3, result
    assert accuracy["background"] >= 0.35, result


def test_fine_tuning_learns_the_subject_and_prior_preservation_limits_drift(base, work):
    """The demo's settings (UNet, lr 1e-3, 150 steps, batch 4) with and without prior preservation.

    Measured on this model: subject fidelity 0.12 → 0.43 with the prior (0.31 without); prior drift 0.136 with
    the prior against 0.192 without. A trainer that does not update fails the first assertion; one whose prior
    loss has no effect drifts as far as without it and fails the last.
    """
    with_prior = fidelity.fine_tune(base, work / "prior", work, with_prior_preservation=True)
    without_prior = fidelity.fine_tune(base, work / "no-prior", work, with_prior_preservation=False)
    (before, _), (kept, _) = fidelity.score_before_after(base, with_prior["final_checkpoint"])
    _, (drifted, _) = fidelity.score_before_after(base, without_prior["final_checkpoint"])

    assert before.subject_fidelity < 0.2  # the base model has never seen the glyph
    assert kept.subject_fidelity > before.subject_fidelity + 0.2, (before, kept)
    assert drifted.subject_fidelity > before.subject_fidelity + 0.1, (before, drifted)
    # the class images hold "a shape" where the base model had it; without them it moves ~40 % further
    assert kept.prior_drift < 0.85 * drifted.prior_drift, (kept, drifted)
