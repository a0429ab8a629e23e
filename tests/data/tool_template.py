"""A ChatML chat template with tool support, written for the tests (the built-in SmolLM2 template has none).

It renders what Qwen2.5-style templates render: the tool definitions in the system turn, each tool
call as ``<tool_call>{"name", "arguments"}</tool_call>`` in the assistant turn, tool results as a
``tool`` turn. Used by giving a copy of the real tokenizer this ``chat_template``.
"""

TOOL_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages and messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{% endif %}"
    "{{ 'Tools:\\n' }}{% for t in tools %}{{ t.function | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% elif messages and messages[0].role == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}{% if not (loop.first and m.role == 'system') %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
    "{% for c in m.tool_calls or [] %}"
    "{{ '<tool_call>' }}{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}{{ '</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tool_tokenizer(tokenizer):
    """A shallow copy of ``tokenizer`` whose chat template supports tools (the original is left as it is)."""
    import copy

    tok = copy.copy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok
