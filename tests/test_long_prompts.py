"""Prompts longer than CLIP's 75 tokens: said once per run (how many, the longest, how many tokens were cut off), and
with --max-token-length 150|225 read in 75-token chunks as kohya reads them — for training, class images and samples.
The chunked encoding is checked against one built by hand from the same tokenizer and encoder."""

import json

import pytest
import torch

from dreambooth import families
from dreambooth.families.base import Dtypes, ResolvedModel
from dreambooth.tiny_model import write_tiny_diffusers
from tests.train_helpers import base_args

F32 = Dtypes(torch.float32, torch.float32, torch.float32)
LONG = "a photo of sks thing, " + ", ".join(f"detail number {i} in the picture" for i in range(16))  # ~125 tokens


def words(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def by_hand(encoder, tokenizer, prompt: str, penultimate: bool = False):
    """Two chunks of 75 tokens, each <BOS> … <EOS>/padding to 77, encoded apart; joined: the first <BOS>, 75 + 75
    token states, the last chunk's final state."""
    tokens = words(tokenizer, prompt)[:150]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for part in (tokens[:75], tokens[75:150]):
        ids = [bos, *part, eos]  # each chunk framed on its own
        chunks.append(ids + [pad] * (77 - len(ids)))
    states, pooled = [], []
    with torch.no_grad():
        for ids in chunks:
            out = encoder(torch.tensor([ids]), output_hidden_states=True)
            states.append(out.hidden_states[-2] if penultimate else out[0])
            pooled.append(getattr(out, "text_embeds", None))
    joined = torch.cat([states[0][:, :1], states[0][:, 1:76], states[1][:, 1:76], states[1][:, 76:]], dim=1)
    return joined, pooled[0]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return write_tiny_diffusers(tmp_path_factory.mktemp("sdxl") / "model", model_type="sdxl")


def test_a_150_token_prompt_is_encoded_in_two_chunks_as_built_by_hand(model, sdxl):
    """SD 1.x: the last hidden states; SDXL: both encoders' penultimate ones side by side and encoder 2's pooled
    output from the first chunk. At 75, the encoding is today's, bit for bit."""
    sd = families.get("sd1")
    c = sd.load(ResolvedModel.of_folder(model), F32)
    encoder, tokenizer = c.text_encoders["text_encoder"], c.tokenizers["text_encoder"]
    assert 75 < len(words(tokenizer, LONG)) < 150
    with torch.no_grad():
        ours = sd.encode_text(c.text_encoders, c.tokenizers, [LONG], 150)["hidden"]
        usual = sd.encode_text(c.text_encoders, c.tokenizers, [LONG], 75)["hidden"]
        cut = encoder(tokenizer([LONG], padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids)[0]  # fmt: skip
    reference, _ = by_hand(encoder, tokenizer, LONG)
    assert ours.shape == (1, 152, 32) and torch.allclose(ours, reference, atol=1e-6)
    assert torch.equal(usual, cut)

    xl = families.get("sdxl")
    c = xl.load(ResolvedModel.of_folder(sdxl), F32)
    with torch.no_grad():
        cond = xl.encode_text(c.text_encoders, c.tokenizers, [LONG], 150)
    one, _ = by_hand(c.text_encoders["text_encoder"], c.tokenizers["text_encoder"], LONG, penultimate=True)
    two, pooled = by_hand(c.text_encoders["text_encoder_2"], c.tokenizers["text_encoder_2"], LONG, penultimate=True)
    assert torch.allclose(cond["hidden"], torch.cat([one, two], dim=-1), atol=1e-6)
    assert torch.allclose(cond["pooled"], pooled, atol=1e-6)  # SDXL's pad is "!", not <EOS>: framed all the same


def test_a_long_prompt_is_reported_and_read_whole_with_max_token_length(cli, model, photos, tmp_path):
    quick = ("--max-train-steps", 1, "--save-sample-prompt", LONG, "--n-save-sample", 1, "--save-infer-steps", 2)
    cut = cli(*base_args(model, photos, tmp_path / "cut", *quick, "--instance-prompt", LONG))
    assert cut.exit_code == 0, cut.stderr
    assert "longer than the 75 tokens CLIP reads" in cut.stderr and "--max-token-length" in cut.stderr
    report = json.loads((tmp_path / "cut" / "train_report.json").read_text())
    counts = report["long_prompts"]["CLIP"]
    assert counts["window"] == 75 and counts["over"] == 1 and counts["longest"] > 75
    assert counts["tokens_dropped"] == counts["longest"] - 75 and report["max_token_length"] == 75
    assert "prompts cut off" in (tmp_path / "cut" / "report.html").read_text()

    whole = cli(*base_args(model, photos, tmp_path / "whole", *quick, "--instance-prompt", LONG,
                           "--max_token_length", 150, "--with-prior-preservation", "--class-prompt", LONG,
                           "--class-data-dir", tmp_path / "class", "--num-class-images", 1,
                           "--class-inference-steps", 2))  # fmt: skip
    assert whole.exit_code == 0, whole.stderr
    assert "longer than" not in whole.stderr
    report = json.loads((tmp_path / "whole" / "train_report.json").read_text())
    assert report["long_prompts"]["CLIP"]["over"] == 0 and report["max_token_length"] == 150
    assert len(list((tmp_path / "class").glob("*.png"))) == 1  # class images from the long class prompt, whole
    assert (tmp_path / "whole" / "checkpoints" / "step-1" / "samples" / "prompt0-00.png").is_file()
    refused = cli(*base_args(model, photos, tmp_path / "x", "--max-token-length", 100))
    assert refused.exit_code == 2 and "--max-token-length" in refused.stderr
