"""What the files of a diffusers model folder are called, whatever its family (and our record beside them)."""

PROVENANCE_FILE = "dreambooth.json"  # what made the folder: convert's analysis, training's step and base
# a component's weights file, by folder name
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
