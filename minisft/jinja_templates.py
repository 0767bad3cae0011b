"""The Jinja text of the SmolLM2 and ChatML chat templates, as tokenizer_config.json carries them.

minisft renders conversations in Python (chat_template.py) and never executes Jinja. But a model it
saves must carry the template it was trained with: transformers' apply_chat_template reads that
text. rundir.py writes it into final/, default_model.py into the embedded default.
"""

# (SmolLM3's 5.6 kB template is not carried: a SmolLM3 model
# brings its own.) Tests check these strings against the real template files.
JINJA = {
    "smollm2": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
