"""DreamBooth Box: fine-tune Stable Diffusion with DreamBooth, offline and reproducibly."""

__version__ = "0.1.0"
