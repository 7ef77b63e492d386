"""What a person looks at after a run (issue 17): OUTPUT/report.html, the loss plot, labelled sample grids.

One tiny `dreambooth train` (4 steps, a checkpoint every 2, samples at each) gives the run folder; the page is
checked on that folder as written, after an interruption (no train_report.json), with its samples gone, and in a
real headless Chromium when one is installed (the test image has it): it renders, every image loads, and no
request leaves file://.
"""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.grids import READABLE_SIDE, comparison_grid, labelled_grid, readable
from dreambooth.plots import loss_plot, smoothed
from tests.train_helpers import base_args

PROMPT = "a photo of sks thing on a beach at sunset, wide angle, golden light, very detailed"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, model, photos) -> Path:
    from dreambooth.cli import main

    out = tmp_path_factory.mktemp("report") / "out"
    args = base_args(model, photos, out, "--max-train-steps", 4, "--save-interval", 2, "--save-sample-prompt",
                     PROMPT, "--n-save-sample", 2, "--save-infer-steps", 2)  # fmt: skip
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code == 0
    return out


@pytest.fixture
def run_copy(run_folder, tmp_path) -> Path:
    return Path(shutil.copytree(run_folder, tmp_path / "out"))


class Page(HTMLParser):
    """The page's images (src, width), links and text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag in ("a", "link", "script", "iframe"):
            self.links.append(attrs.get("href") or attrs.get("src") or "")

    def handle_data(self, data):
        self.text.append(data)

    @property
    def words(self) -> str:
        return " ".join(" ".join(self.text).split())


def read_page(folder: Path) -> Page:
    return Page((folder / "report.html").read_text(encoding="utf-8"))


def test_train_writes_a_page_with_every_checkpoints_samples_labelled(run_folder):
    page = read_page(run_folder)
    text = page.words
    assert "done" in text and "finished: 4 of 4 steps" in text
    srcs = [img["src"] for img in page.images]
    seed = json.loads((run_folder / "train_report.json").read_text())["seed"]  # image i: seed + i
    for step in (2, 4):  # each checkpoint's samples, by relative path, under the prompt and with their seeds
        for i in range(2):
            assert f"checkpoints/step-{step}/samples/prompt0-{i:02d}.png" in srcs
            assert f"step {step} · seed {seed + i}" in text
    assert PROMPT in text
    assert "loss_curve.png" in srcs
    for img in page.images:  # every image is a file of the run, and tiny samples are shown at a readable size
        assert not re.match(r"[a-z]+:|//", img["src"]) and (run_folder / img["src"]).is_file(), img["src"]
        if "samples/prompt" in img["src"]:
            assert int(img["width"]) >= READABLE_SIDE
    assert not [link for link in page.links if re.match(r"https?:|//", link)]
    assert "<script" not in (run_folder / "report.html").read_text()
    # a bare `train` has no manifest: its stage table is the training, with the loop's speed
    assert "of which the training loop" in text and "steps/s" in text


def test_the_loss_plot_and_grids_replace_the_hand_drawn_ones(run_folder):
    report = json.loads((run_folder / "train_report.json").read_text())
    assert report["losses"]["skipped"] == []  # fp32: no step skipped, and the field is recorded
    assert Image.open(run_folder / "loss_curve.png").size == (1100, 638)  # matplotlib's figure, not 800×400
    grid = Image.open(run_folder / "checkpoints" / "step-4" / "samples" / "prompt0-grid.png")
    # two 32 px samples, enlarged to 256 px tiles, with a header (step, prompt) and a caption row under them
    assert grid.width >= 2 * READABLE_SIDE and grid.height > READABLE_SIDE + 60


def test_an_interrupted_run_gets_its_page_from_the_last_checkpoint(cli, run_copy):
    for name in ("train_report.json", "loss_curve.png", "report.html"):  # what a kill after step-2's save leaves
        (run_copy / name).unlink()
    shutil.rmtree(run_copy / "checkpoints" / "step-4")

    result = cli("report", run_copy)

    assert result.exit_code == 0, result.stderr
    text = read_page(run_copy).words
    assert "interrupted" in text and "2 of 4 steps" in text and "run the same command again" in text
    assert (run_copy / "loss_curve.png").is_file()  # drawn from the checkpoint's loss history
    assert "step-2" in text and "step-4" not in text


def test_a_run_without_samples_gets_a_page_that_says_so(cli, run_copy):
    for step in (2, 4):
        shutil.rmtree(run_copy / "checkpoints" / f"step-{step}" / "samples")

    result = cli("report", run_copy)

    assert result.exit_code == 0, result.stderr
    assert "No samples: none of the 2 checkpoints has a samples/ folder" in read_page(run_copy).words


def test_report_on_a_folder_that_is_not_a_run_is_one_line_and_exit_2(cli, tmp_path):
    (tmp_path / "photos").mkdir()
    result = cli("report", tmp_path / "photos")
    assert result.exit_code == 2
    assert f"error: {tmp_path / 'photos'} is not a run's output folder" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "photos" / "report.html").exists()


# ───────────────────────────── the pieces ─────────────────────────────


def test_smoothing_skips_non_finite_values_and_is_unbiased_at_the_start():
    values = [1.0, float("nan"), 1.0, 3.0]
    out = smoothed(values, span=3)
    assert out[0] == 1.0 and out[1] == 1.0 and out[2] == 1.0  # no pull towards 0, NaN ignored
    assert 1.0 < out[3] < 3.0


def test_loss_plot_marks_skipped_steps_and_checkpoints(tmp_path):
    losses = {"instance": [0.5, 0.4, 0.45, 0.3], "class": [0.2, 0.25, 0.2, 0.22], "lr": [1e-4] * 4, "skipped": [2]}
    path = loss_plot(losses, tmp_path / "plot.png", checkpoints=[2, 4])
    with Image.open(path) as image:
        colours = {c for _, c in image.convert("RGB").getcolors(1 << 20)}
    assert (198, 40, 40) in colours  # the skipped step's red marker (plots.SKIP_COLOR) is drawn


def test_grids_enlarge_small_samples_pixel_for_pixel_and_label_them():
    tile = Image.new("RGB", (32, 32), (255, 0, 0))
    tile.putpixel((0, 0), (0, 0, 255))
    big = readable(tile)
    assert big.size == (256, 256) and big.getpixel((7, 7)) == (0, 0, 255) and big.getpixel((8, 8)) == (255, 0, 0)
    grid = labelled_grid([tile] * 3, "a " * 80, seeds=[5, 6, 7], step=40, columns=2)
    assert grid.width >= 2 * 256 and grid.height > 2 * 256 + 80  # two rows, a wrapped prompt above, captions
    rows = [("before", [tile] * 2), ("after: step-40", [tile] * 2)]
    before_after = comparison_grid([("a sks shape", rows)], [0, 1])
    assert before_after.height > 2 * 256 and before_after.width > 2 * 256 + 150  # a label column on the left


# ───────────────────────────── in a real browser ─────────────────────────────

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# put into a copy of the page (beside it, so relative paths resolve), first thing in <head>: it records every
# attempt the browser makes to load something the page's Content-Security-Policy forbids (anything but this folder's
# files), and after load every image's natural width and every URL the page's elements and styles refer to; the
# result goes into the DOM, which --dump-dom prints
PROBE = """<script>
const violations = [];
document.addEventListener("securitypolicyviolation", e => violations.push(e.blockedURI + " " + e.violatedDirective));
addEventListener("load", () => {
  const urls = [];
  for (const element of document.querySelectorAll("*")) {
    const style = getComputedStyle(element);
    for (const value of [style.backgroundImage, style.listStyleImage, style.content, style.cursor]) {
      for (const m of value.matchAll(/url\\("?([^")]*)"?\\)/g)) urls.push(m[1]);
    }
  }
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    images: [...document.images].map(i => ({src: i.currentSrc, complete: i.complete, width: i.naturalWidth})),
    urls: [...urls, ...[...document.images].map(i => i.currentSrc)],
    violations,
  });
  document.body.append(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary here (the test image has Debian's chromium)")
def test_the_page_renders_in_chromium_every_image_loads_nothing_leaves_the_folder(run_copy, tmp_path):
    page = (run_copy / "report.html").read_text(encoding="utf-8")
    # the page allows no script (its Content-Security-Policy); the probe's copy allows its own inline one
    probe_page = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    (run_copy / "probe.html").write_text(probe_page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
               "--virtual-time-budget=10000"]  # fmt: skip

    dom = subprocess.run([*browser, "--dump-dom", (run_copy / "probe.html").as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    found = json.loads(Page(dom.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0]).words)
    assert len(found["images"]) == len(Page(page).images) >= 5
    for image in found["images"]:
        assert image["complete"] and image["width"] > 0, image  # loaded and decoded
    assert found["violations"] == []  # nothing tried to load from anywhere else
    root = run_copy.resolve().as_uri() + "/"
    assert found["urls"] and all(url.startswith(root) for url in found["urls"]), found["urls"]

    shot = tmp_path / "shot.png"
    subprocess.run([*browser, "--window-size=1280,2000", f"--screenshot={shot}", (run_copy / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    with Image.open(shot) as image:  # the page itself (scripts off) renders: not a blank screen
        assert image.size == (1280, 2000) and len(image.convert("RGB").getcolors(1 << 20)) > 100
