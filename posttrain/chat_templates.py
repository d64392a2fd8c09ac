"""Named chat templates for tokenizers that lack one (`model.chat_template: chatml`).

Every assistant turn sits inside `{% generation %}...{% endgeneration %}` so that
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the reply and
its end token: the mask SFT's assistant-only loss needs.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Zephyr (HuggingFaceH4/zephyr-7b-beta): `<|role|>` headers, turns closed by the eos token.
ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Llama 3 instruct format; `<|eot_id|>` ends every turn.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

CHAT_TEMPLATES = {"chatml": CHATML, "zephyr": ZEPHYR, "llama3": LLAMA3}


def resolve(template: str | None) -> str | None:
    """A template name from CHAT_TEMPLATES, a Jinja string, or None for the tokenizer's own."""
    if template is None:
        return None
    return CHAT_TEMPLATES.get(template, template)
