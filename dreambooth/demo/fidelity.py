"""Our small DreamBench: does a fine-tune learn the subject, keep following prompts, and leave the class alone?

Everything is judged by a small CNN (the "judge") trained on the synthetic world of dreambooth/demo/synthetic.py: for
a 32 px picture it tells the object (the four shapes or the demo subject), the object's colour and the
background's colour. It is trained from a seed in a few minutes (`python -m dreambooth.demo.fidelity train-judge`),
on rendered pictures and on the same pictures passed through the tiny model's autoencoder; its weights ship in
dreambooth/assets/tiny/judge.safetensors.

The scores, each in [0, 1]:
- subject fidelity: the judge's mean probability that "a sks shape" samples show the subject;
- prompt fidelity: the mean probability that "a sks shape on a green background" samples have a green
  background (no instance picture has one: the model has to combine the new word with what it knew);
- prior drift: how far plain "a shape" samples moved from the base model's samples of the same seeds (mean
  absolute pixel difference, 0 = unchanged): the language drift DreamBooth's prior preservation is there to
  prevent. Beside it, prior subject likeness (the judge's mean probability that those samples show the subject)
  and prior diversity (normalised entropy of the objects they show: 1 = all five alike, 0 = one kind only).
  On the tiny model with the demo's settings both separate the two: likeness 0.04 → 0.23 with prior
  preservation, → 0.80 without (diversity 0.91 against 0.43); drift 0.118 against 0.188. (On the previous
  tiny model, whose text encoder told "a sks shape" from "a shape" only weakly, only the pixel measure did.)
"""

import argparse
import itertools
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreambooth.demo import synthetic
from dreambooth.demo.settings import (
    CLASS_PROMPT,
    DEMO_MODEL_FILE,
    INSTANCE_IMAGES,
    INSTANCE_PROMPT,
    LORA_SETTINGS,
    SETTINGS,
)

JUDGE_FILE = Path(str(resources.files("dreambooth") / "assets" / "tiny" / "judge.safetensors"))
OBJECTS = (*synthetic.SHAPES, synthetic.SUBJECT)
COLOURS = tuple(synthetic.COLOURS)
SUBJECT_INDEX = OBJECTS.index(synthetic.SUBJECT)
# The prompts of the scores (the demo's instance and class prompts, and one that asks for a new background).
SUBJECT_PROMPT = INSTANCE_PROMPT
NEW_BACKGROUND = "green"
RECONTEXT_PROMPT = f"{INSTANCE_PROMPT} on a {NEW_BACKGROUND} background"
# Sampling for the scores: DDIM, few steps, the usual guidance (of 2, 4 and 7.5 it follows prompts best at 7.5)
SAMPLE_STEPS = 20
GUIDANCE = 7.5


class Judge(torch.nn.Module):
    """Four 3×3 convolutions with batch norm (32 → 4 px) and three heads: object, object colour, background colour."""

    def __init__(self) -> None:
        super().__init__()
        widths = (3, 32, 32, 64, 64)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, padding=1) for a, b in itertools.pairwise(widths))
        # batch norm: the shape head learns several times faster with it (the colours are easy either way)
        self.norms = torch.nn.ModuleList(torch.nn.BatchNorm2d(b) for b in widths[1:])
        self.hidden = torch.nn.Linear(64 * 4 * 4, 128)
        self.objects = torch.nn.Linear(128, len(OBJECTS))
        self.colours = torch.nn.Linear(128, len(COLOURS))
        self.backgrounds = torch.nn.Linear(128, len(COLOURS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: N×3×32×32 in [0, 1] → logits of objects, colours, backgrounds."""
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = F.relu(norm(conv(x)))
            if i < 3:  # 32 → 16 → 8 → 4: enough to tell four shapes apart, and cheap on a CPU
                x = F.max_pool2d(x, 2)
        h = F.relu(self.hidden(x.flatten(1)))
        return self.objects(h), self.colours(h), self.backgrounds(h)


# ───────────────────────────── training the judge ─────────────────────────────


def judge_data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pictures with their object, colour and background labels; a fifth of them show the subject.

    The subject appears on every background here, green included: the judge must recognise what the
    fine-tune is asked to make, not only what it was shown.
    """
    rng = random.Random(f"judge:{seed}")
    scenes = []
    for _ in range(count):
        if rng.random() < 0.2:
            scenes.append(synthetic.subject_scene(rng, rng.choice(COLOURS)))
        else:
            scenes.append(synthetic.random_scene(rng))
    images = torch.from_numpy(synthetic.pixels(scenes)).permute(0, 3, 1, 2).float() / 255
    objects = torch.tensor([OBJECTS.index(s.shape) for s in scenes])
    colours = torch.tensor([COLOURS.index(s.colour) if s.colour else -100 for s in scenes])  # subject: no colour
    backgrounds = torch.tensor([COLOURS.index(s.background) for s in scenes])
    return images, objects, colours, backgrounds


def roughen(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Make clean renders look like a small generative model's output: blurred, noisy, colours a little off."""
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(n, 1, 1, 1, generator=generator)
    x = x * (1 - amount) + blur * amount
    x = x + 0.1 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)  # colour cast
    x = x + 0.06 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


@torch.no_grad()
def through_autoencoder(vae, x: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """Pictures as the model's own autoencoder draws them (encoded, decoded): blurrier, colours a little off."""
    out = []
    for start in range(0, len(x), chunk):
        z = vae.encode(x[start : start + chunk] * 2 - 1).latent_dist.mean
        out.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def train_judge(vae, steps: int = 2000, batch: int = 64, seed: int = 0, images: int = 10_000) -> tuple[Judge, dict]:
    """Trained on every picture twice, as rendered and as the tiny model's autoencoder redraws it.

    The second half is what makes the judge read samples: a judge trained on clean renders only took even
    perfect autoencoder copies of the subject for something else.
    """
    torch.manual_seed(seed)
    clean, objects, colours, backgrounds = judge_data(images, seed)
    x = torch.cat([clean, through_autoencoder(vae, clean)])
    objects, colours, backgrounds = objects.repeat(2), colours.repeat(2), backgrounds.repeat(2)
    judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(x), (batch,), generator=generator)
        o, c, b = judge(roughen(x[idx], generator))
        loss = (
            F.cross_entropy(o, objects[idx]) + F.cross_entropy(c, colours[idx]) + F.cross_entropy(b, backgrounds[idx])
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    judge.eval().requires_grad_(False)
    # accuracy on pictures it never saw (another seed), as rendered and through the autoencoder
    tx, to, tc, tb = judge_data(1000, seed + 1)
    report = {"steps": steps, "seconds": round(time.perf_counter() - started, 1), "held_out_accuracy": {}}
    for name, pictures in (("rendered", tx), ("autoencoded", through_autoencoder(vae, tx))):
        o, c, b = judge(pictures)
        has_colour = tc >= 0
        report["held_out_accuracy"][name] = {
            "object": round((o.argmax(1) == to).float().mean().item(), 4),
            "colour": round((c.argmax(1)[has_colour] == tc[has_colour]).float().mean().item(), 4),
            "background": round((b.argmax(1) == tb).float().mean().item(), 4),
        }
    return judge, report


def save_judge(judge: Judge, dest: Path) -> None:
    from safetensors.torch import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in judge.state_dict().items()}, dest)


_judges: dict[Path, Judge] = {}


def load_judge(path: Path = JUDGE_FILE) -> Judge:
    from safetensors.torch import load_file

    if path not in _judges:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: make it with `python -m dreambooth.demo.fidelity train-judge`")
        judge = Judge()
        judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()})
        _judges[path] = judge.eval().requires_grad_(False)
    return _judges[path]


# ───────────────────────────── judging pictures ─────────────────────────────


@dataclass
class Verdicts:
    """Probabilities per picture: objects N×5 (OBJECTS), colours N×8 and backgrounds N×8 (COLOURS)."""

    objects: torch.Tensor
    colours: torch.Tensor
    backgrounds: torch.Tensor


@torch.no_grad()
def judge_images(images: list[Image.Image]) -> Verdicts:
    arrays = [np.asarray(im.convert("RGB").resize((synthetic.RESOLUTION,) * 2, Image.Resampling.BOX)) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    o, c, b = load_judge()(x)
    return Verdicts(o.softmax(1), c.softmax(1), b.softmax(1))


def subject_score(images: list[Image.Image]) -> float:
    """Mean probability that a picture shows the subject."""
    return judge_images(images).objects[:, SUBJECT_INDEX].mean().item()


def background_score(images: list[Image.Image], colour: str) -> float:
    return judge_images(images).backgrounds[:, COLOURS.index(colour)].mean().item()


def diversity(images: list[Image.Image]) -> float:
    """Normalised entropy of the objects the pictures show (their most likely label): 1 = all five alike."""
    labels = judge_images(images).objects.argmax(1)
    counts = torch.bincount(labels, minlength=len(OBJECTS)).float()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum() / math.log(len(OBJECTS)))


# ───────────────────────────── judging models ─────────────────────────────


def sampling_pipeline(model: Path, base_dir: Path | None = None):
    """A pipeline over a diffusers folder, or over `base_dir` with a LoRA file loaded into it the way users load
    it (diffusers' load_lora_weights, fused), sampling with DDIM (whatever scheduler the folder names)."""
    from diffusers import DDIMScheduler

    from dreambooth.families.base import ResolvedModel
    from dreambooth.sample import load_pipeline

    model = Path(model)
    if model.is_file():  # an exported LoRA
        pipe, _ = load_pipeline(ResolvedModel.of_folder(Path(base_dir)))
        pipe.load_lora_weights(str(model))
        pipe.fuse_lora()
    else:
        pipe, _ = load_pipeline(ResolvedModel.of_folder(model))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def samples(pipe, prompt: str, count: int, seed: int) -> list[Image.Image]:
    from dreambooth.sample import generate

    return generate(
        pipe, prompt, count, seed, resolution=synthetic.RESOLUTION, steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
        batch_size=count,
    )  # fmt: skip


@dataclass(frozen=True)
class Scores:
    subject_fidelity: float
    prompt_fidelity: float
    prior_drift: float
    prior_subject_likeness: float
    prior_diversity: float


def pixel_change(images: list[Image.Image], reference: list[Image.Image]) -> float:
    """Mean absolute difference, in [0, 1], between pictures and their references (same seeds, same prompt)."""
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    b = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in reference])
    return float(np.abs(a - b).mean() / 255)


def score_model(
    model_dir: Path,
    count: int = 16,
    seed: int = 0,
    base_class_samples: list[Image.Image] | None = None,
    base_dir: Path | None = None,
) -> tuple[Scores, dict[str, list[Image.Image]]]:
    """The scores of one model (a diffusers folder), and the samples they judged (`count` per prompt).

    Prior drift is measured against `base_class_samples` (the base model's "a shape" samples, same count and
    seed); without them the model is the base model itself, whose drift is 0. A LoRA file is judged loaded into
    `base_dir`.
    """
    pipe = sampling_pipeline(model_dir, base_dir)
    pictures = {
        prompt: samples(pipe, prompt, count, seed) for prompt in (SUBJECT_PROMPT, RECONTEXT_PROMPT, CLASS_PROMPT)
    }
    reference = base_class_samples if base_class_samples is not None else pictures[CLASS_PROMPT]
    scores = Scores(
        subject_fidelity=subject_score(pictures[SUBJECT_PROMPT]),
        prompt_fidelity=background_score(pictures[RECONTEXT_PROMPT], NEW_BACKGROUND),
        prior_drift=pixel_change(pictures[CLASS_PROMPT], reference),
        prior_subject_likeness=subject_score(pictures[CLASS_PROMPT]),
        prior_diversity=diversity(pictures[CLASS_PROMPT]),
    )
    return scores, pictures


def score_before_after(base_dir: Path, trained: Path, count: int = 16, seed: int = 0):
    """Scores and samples of the base model and of a fine-tune of it (a diffusers folder, or a LoRA file):
    ((before, samples), (after, samples))."""
    before = score_model(base_dir, count, seed)
    after = score_model(trained, count, seed, before[1][CLASS_PROMPT], base_dir)
    return before, after


def fidelity_report(before: Scores, after: Scores, count: int, seed: int) -> dict:
    """What `dreambooth demo` writes to fidelity.json: the scores of the base model and of the fine-tuned one."""
    report = {f"{k}_before": round(v, 4) for k, v in asdict(before).items()}
    report |= {f"{k}_after": round(v, 4) for k, v in asdict(after).items()}
    report["prior_drift"] = report.pop("prior_drift_after")
    del report["prior_drift_before"]  # 0 by definition: the base model against itself
    report["judged"] = {
        "samples_per_prompt": count,
        "seed": seed,
        "sampler": f"DDIM, {SAMPLE_STEPS} steps, guidance {GUIDANCE}",
        "subject_prompt": SUBJECT_PROMPT,
        "prompt_fidelity_prompt": RECONTEXT_PROMPT,
        "class_prompt": CLASS_PROMPT,
    }
    return report


# ───────────────────────────── fine-tuning on the demo subject (tests, bench) ─────────────────────────────


def base_model(folder: Path) -> Path:
    """The built-in tiny model as a diffusers folder under `folder` (converted once)."""
    from dreambooth.formats.convert import ConvertOptions, convert

    dest = Path(folder) / "base"
    if not (dest / "model_index.json").is_file():
        convert(DEMO_MODEL_FILE, dest, ConvertOptions(overwrite=True))
    return dest


def fine_tune(base: Path, output: Path, work: Path, **overrides) -> dict:
    """`dreambooth train` on the demo subject with the demo's settings, `overrides` winning; returns its report.

    Instance pictures and class images live under `work` and are shared by every run given the same `work`
    (class images depend only on the base model, their prompt and the seed).
    """
    from dreambooth.config import build_train_config
    from dreambooth.train import train

    instances = Path(work) / "instance"
    if not instances.is_dir():
        synthetic.write_instance_images(instances, n=INSTANCE_IMAGES, seed=0)
    settings = {
        **SETTINGS,
        **(LORA_SETTINGS if overrides.get("adapter") == "lora" else {}),
        "save_sample_prompt": (),
        "model": base,
        "output": output,
        "instance_data_dir": instances,
        "instance_prompt": INSTANCE_PROMPT,
        "class_prompt": CLASS_PROMPT,
        "class_data_dir": Path(work) / "class_images",
        **overrides,
    }
    return train(build_train_config(None, settings))


def prompt_following(model_dir: Path, count: int = 128, seed: int = 0) -> dict:
    """How often samples of "a <colour> <shape> on a <colour> background" show what was asked, per attribute.

    The prompts are `count` random combinations (object and background colours differ, as in pretraining);
    chance is 1/4 for the shape, 1/8 for each colour, 1/256 for all three at once.
    """
    pipe = sampling_pipeline(model_dir)
    rng = random.Random(f"prompts:{seed}")
    hits = {"shape": 0, "colour": 0, "background": 0, "all": 0}
    for i in range(count):
        colour, background = rng.sample(COLOURS, 2)
        shape = rng.choice(synthetic.SHAPES)
        (image,) = samples(pipe, f"a {colour} {shape} on a {background} background", 1, seed + i)
        v = judge_images([image])
        right = {
            "shape": OBJECTS[v.objects[0].argmax()] == shape,
            "colour": COLOURS[v.colours[0].argmax()] == colour,
            "background": COLOURS[v.backgrounds[0].argmax()] == background,
        }
        right["all"] = all(right.values())
        for k, ok in right.items():
            hits[k] += ok
    return {
        "prompts": count,
        "accuracy": {k: round(v / count, 4) for k, v in hits.items()},
        "chance": {"shape": 0.25, "colour": 0.125, "background": 0.125, "all": round(1 / 256, 4)},
        "sampler": f"DDIM, {SAMPLE_STEPS} steps, guidance {GUIDANCE}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the judge, or measure a model's prompt following.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-judge", help=f"train the judge and write {JUDGE_FILE.name}")
    train.add_argument("--out", type=Path, default=JUDGE_FILE)
    train.add_argument("--seed", type=int, default=0)
    follow = sub.add_parser("prompt-following", help="measure how well a diffusers folder follows prompts")
    follow.add_argument("model_dir", type=Path)
    follow.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "train-judge":
        with tempfile.TemporaryDirectory() as tmp:
            vae = sampling_pipeline(base_model(Path(tmp))).vae
        judge, report = train_judge(vae, seed=args.seed)
        save_judge(judge, args.out)
        print(json.dumps(report, indent=2))
    else:
        print(json.dumps(prompt_following(args.model_dir, args.prompts), indent=2))


if __name__ == "__main__":
    main()
