"""The Stable Diffusion lineage, SD 1.x/2.x (training: family.py) and the single-file layout SDXL shares with them
(LDM/SGM): what each file holds and how it is told apart (spec.py, detect.py), its key tables (layout.py), the
components cut out of it and checked (components.py, shapes.py), the diffusers folder it becomes (convert.py) and
the file it is exported as (export.py), its LoRA files (lora.py), a replacement VAE (vae_file.py)."""
