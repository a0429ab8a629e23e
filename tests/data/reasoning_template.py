"""A ChatML chat template that renders reasoning, written for the tests (the built-in SmolLM2 template renders none).

It has the shape reasoning templates have: an assistant message's ``reasoning_content``, when set, is
rendered inside ``<think>`` tags before its content. Its spacing (``</think>`` then one newline) differs
from the project's own ``<think>`` convention (two), so a test can tell which of the two rendered a turn.
"""

REASONING_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' and m.reasoning_content %}"
    "{{ '<think>\\n' + m.reasoning_content.strip() + '\\n</think>\\n' }}"
    "{% endif %}"
    "{{ m.content + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def reasoning_tokenizer(tokenizer):
    """A shallow copy of ``tokenizer`` whose chat template renders ``reasoning_content``."""
    import copy

    tok = copy.copy(tokenizer)
    tok.chat_template = REASONING_TEMPLATE
    return tok
