"""Single file ⇄ diffusers: safe loading, model detection, key maps, convert, export."""
