"""Chat templates of the supported families, used when a processor ships none (tiny models, old folders).

Each renders the conversation format the family was trained with, for messages in the processor format
(``{"role": ..., "content": [{"type": "image"}, {"type": "text", "text": ...}]}``):

- ``llava`` (LLaVA-1.5, Vicuna): ``USER: <image>\\n{text} ASSISTANT:``
- ``llava_next`` (LLaVA-NeXT-Mistral): ``[INST] <image>\\n{text} [/INST]`` (Mistral has no system role: a
  system text is written before the first ``[INST]``)
- ``qwen2_vl`` (Qwen2-VL / Qwen2.5-VL, ChatML):
  ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n``
  ``<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\\n<|im_start|>assistant\\n``

A checkpoint's own template (``processor.chat_template``) always takes precedence.
"""

from __future__ import annotations

_LLAVA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_LLAVA_NEXT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + c['text'] }}{% endfor %}"
    "{% endif %}{% endfor %}"
)

_QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"llava": _LLAVA, "llava_next": _LLAVA_NEXT, "qwen2_vl": _QWEN2_VL}
