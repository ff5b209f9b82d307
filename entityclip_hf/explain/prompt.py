"""The one prompt that asks an LLM to explain the entities of a text, and the clean-up of what comes back.

Any change to these strings must bump PROMPT_VERSION: the version is part of every cache key, so explanations written
with an older prompt are never mistaken for new ones (tests/test_explain_cache.py guards the fingerprint).
"""

from __future__ import annotations

PROMPT_VERSION = "entity-v1"
SYSTEM_PROMPT = (
    "You are a knowledgeable news analyst. You explain the named entities (people, organisations, places, events, "
    "objects) mentioned in the text of a news image, so that someone can recognise them in the picture."
)
USER_PROMPT_TEMPLATE = (
    "Explain the entities in the following text: who or what each one is, what they typically look like "
    "(appearance, clothing, logos, buildings, landscape), where and when the scene takes place. Use only "
    "well-established facts and do not invent details. Answer in 2 to 4 concise sentences of plain text, without "
    "lists, headings or preamble.\n\nText: {text}"
)
# For models without a chat template (base models, /v1/completions): the same instructions as one document that
# the model continues after "Explanation:".
PLAIN_PROMPT_TEMPLATE = SYSTEM_PROMPT + "\n\n" + USER_PROMPT_TEMPLATE + "\n\nExplanation:"


def build_messages(text: str, use_system_role: bool = True) -> list[dict[str, str]]:
    """Chat messages asking for an explanation of the entities in ``text``.

    Some chat templates (older Mistral ones) reject a system role; with ``use_system_role=False`` the system prompt
    is put at the start of the user message instead.
    """
    user = USER_PROMPT_TEMPLATE.format(text=text)
    if use_system_role:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    return [{"role": "user", "content": SYSTEM_PROMPT + "\n\n" + user}]


def build_plain_prompt(text: str) -> str:
    """Plain-text prompt (no chat template) asking for an explanation of the entities in ``text``."""
    return PLAIN_PROMPT_TEMPLATE.format(text=text)


def clean_plain_continuation(generated: str) -> str:
    """Keep the first paragraph of a plain-prompt continuation.

    A base model continuing "Explanation:" tends to go on with a new "Text: ..." example after a blank line; the
    prompt asks for one paragraph, so everything after the first blank line is dropped.
    """
    return generated.strip().split("\n\n", 1)[0].strip()
