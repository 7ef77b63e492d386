"""Prompts longer than CLIP's window, for SD 1.x/2.x and SDXL (`--max-token-length 75|150|225`, kohya's name).

CLIP reads 77 tokens: <BOS>, 75 of the prompt, <EOS> (or padding). A longer prompt is cut there unless it is read
in 75-token chunks, each framed by its own <BOS> … <EOS> and encoded on its own, and the chunks' hidden states joined
into one longer sequence the UNet's cross-attention takes whatever its length: kohya's `--max_token_length` (the
WebUI and ComfyUI read long prompts in the same chunks). Joined as kohya joins them: the first chunk's <BOS>, every
chunk's 75 token states, the last chunk's final state, so 150 tokens make 152 states. SDXL's pooled embedding is the
first chunk's, as kohya takes it. With 75 (the default) nothing changes: one chunk is exactly today's encoding.
"""

import torch

WINDOW = 75  # the prompt's tokens in one CLIP chunk: 77 less <BOS> and <EOS>
MAX_TOKEN_LENGTHS = (75, 150, 225)


def token_counts(tokenizer, prompts: list[str]) -> list[int]:
    """How many tokens each prompt is, without <BOS>/<EOS> and without cutting."""
    ids = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [len(i) for i in ids]


def chunk_ids(tokenizer, prompts: list[str], max_tokens: int) -> torch.Tensor:
    """[B, chunks, 77]: the prompts' first `max_tokens` tokens in 75-token chunks, each <BOS> … <EOS>/padding."""
    length = tokenizer.model_max_length  # 77
    ids = tokenizer(prompts, padding="max_length", max_length=max_tokens + 2, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    bos, eos, pad = ids[:, :1], tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, max_tokens + 1, length - 2):
        chunk = torch.cat([bos, ids[:, start : start + length - 2], ids[:, -1:]], dim=1)
        # padding that is not <EOS> (SD 2.x's and SDXL's second tokenizer pad with "!"): a chunk that stops short of
        # the prompt's end still ends in <EOS>, and one past it reads as the empty prompt, <BOS> <EOS> <pad>…
        cut = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
        chunk[cut, -1] = eos
        empty = chunk[:, 1] == pad
        chunk[empty, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def join_chunks(states: torch.Tensor) -> torch.Tensor:
    """[B, chunks, 77, D] → [B, 75 · chunks + 2, D]: the first <BOS>, each chunk's token states, the last state."""
    b, n, length, d = states.shape
    middle = states[:, :, 1 : length - 1].reshape(b, n * (length - 2), d)
    return torch.cat([states[:, 0, :1], middle, states[:, -1, -1:]], dim=1)


def encode(encoder, tokenizer, prompts: list[str], max_tokens: int, *, penultimate: bool = False):
    """(hidden states, the first chunk's pooled output or None) of `prompts` read in chunks of 75 tokens.
    `penultimate`: the encoder's second-to-last hidden states (SDXL), else its last (SD 1.x/2.x)."""
    ids = chunk_ids(tokenizer, prompts, max_tokens)
    b, n, length = ids.shape
    out = encoder(ids.reshape(b * n, length).to(next(encoder.parameters()).device), output_hidden_states=penultimate)
    states = out.hidden_states[-2] if penultimate else out[0]
    pooled = getattr(out, "text_embeds", None)
    pooled = pooled.reshape(b, n, -1)[:, 0] if pooled is not None else None
    return join_chunks(states.reshape(b, n, length, -1)), pooled
