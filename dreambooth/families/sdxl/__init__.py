"""Stable Diffusion XL's training (family.py). Its single-file layout is the SGM one that families/sd/ reads and
writes for the whole lineage (SDXL's two encoders, its conditioner prefixes, its LoRA names in the SGM layout)."""
