"""Rendering: a normalised conversation -> the text the model sees -> token ids and a pooling mask.

Rendering (``chat_template`` | ``plain``) returns the text and the character spans that
hold message content, so that pooling can optionally ignore template tokens (role
markers, the default system prompt SmolLM2's template inserts into every sample).
Conversations come from :func:`mona_ray.core.records.normalize_record`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import InputError


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # [start, end) character spans of message content
    roles: tuple[str, ...] = ()  # the role of each span's message (same length as spans)


def render(messages: list[dict], tokenizer=None, mode: str = "chat_template",
           system_prompt: str | None = None) -> Rendered:
    """Render a conversation as the model sees it, with the spans of its content.

    ``system_prompt``: when set (even to ""), added as a system message to conversations
    that have none, replacing a template's default one.
    """
    if system_prompt is not None and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    if mode == "plain":
        parts, spans, pos = [], [], 0
        for m in messages:
            if parts:
                parts.append("\n\n")
                pos += 2
            parts.append(m["content"])
            spans.append((pos, pos + len(m["content"])))
            pos += len(m["content"])
        return Rendered("".join(parts), tuple(spans), tuple(m["role"] for m in messages))
    if mode != "chat_template":
        raise ValueError(f"render.mode={mode!r}: use chat_template or plain")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InputError("render.mode=chat_template but the tokenizer has no chat template; set render.mode=plain")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, roles, pos = [], [], 0
    for m in messages:  # contents appear in order; find each after the previous one
        c = m["content"]
        if not c:
            continue
        at = text.find(c, pos)
        if at < 0:  # a template that rewrites content (strip, etc.): fall back to a stripped match
            at = text.find(c.strip(), pos)
            c = c.strip()
        if at >= 0:
            spans.append((at, at + len(c)))
            roles.append(m["role"])
            pos = at + len(c)
    return Rendered(text, tuple(spans), tuple(roles))


def tokenize(rendered: Rendered, tokenizer, max_length: int, exclude: str = "none") -> tuple[list[int], list[int]]:
    """Token ids (truncated to ``max_length``) and a 0/1 pooling mask.

    ``exclude``: ``none`` pools every real token; ``special`` drops special tokens (BOS,
    ``<|im_start|>``...), including the attention-sink first token; ``template`` keeps only
    tokens inside message content (drops role markers and template-inserted text too).
    """
    return tokenize_many([rendered], tokenizer, max_length, exclude)[0]


def tokenize_many(rendered: list[Rendered], tokenizer, max_length: int, exclude: str = "none"
                  ) -> list[tuple[list[int], list[int]]]:
    """:func:`tokenize` for many rows in one tokenizer call (a fast tokenizer encodes the batch
    in Rust, in parallel); each row's ids are the same as when it is tokenized alone."""
    if exclude not in ("none", "special", "template"):
        raise ValueError(f"pool.exclude={exclude!r}: use none, special or template")
    if not rendered:
        return []
    enc = tokenizer([r.text for r in rendered], add_special_tokens=False, truncation=True, max_length=max_length,
                    return_offsets_mapping=exclude == "template")
    special = set(tokenizer.all_special_ids)
    out = []
    for j, r in enumerate(rendered):
        ids = enc["input_ids"][j]
        if exclude == "none":
            mask = [1] * len(ids)
        elif exclude == "special":
            mask = [0 if t in special else 1 for t in ids]
        else:
            inside = in_spans(enc["offset_mapping"][j], r.spans)
            mask = [1 if t not in special and x else 0 for x, t in zip(inside, ids)]
        if ids and not any(mask):
            mask = [1] * len(ids)  # nothing left to pool: fall back to every token rather than an empty mean
        out.append((ids, mask))
    return out


def in_spans(offsets, spans) -> list[bool]:
    """For each token's character ``(start, end)`` offsets, whether it overlaps one of ``spans``
    (a zero-width token never does)."""
    return [b > a and any(a < e and b > st for st, e in spans) for a, b in offsets]
