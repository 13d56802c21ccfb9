"""The one prompt definition: training, the contrast test and the exported chat template all use it.

An Alpaca entry (`instruction`, optional `input`, `output`) becomes a chat conversation that is rendered
with the model's own chat template, so the tuned model is asked questions exactly as it was trained.
"""

from __future__ import annotations

from typing import Any

# Kept short: a 135M model spends capacity on every prompt token, and the same system line is baked into
# the exported chat template, so Ollama and the Hub see what training saw.
SYSTEM_PROMPT = (
    "Eres un asistente académico de ciencias de la vida. Respondes en español, con rigor científico "
    "y de forma clara."
)

DEFAULT_SYSTEM_PROMPT = SYSTEM_PROMPT

# The run's system prompt (02's --system-prompt, recorded in run.json). Each stage is its own process and the
# prompt is one constant of the run, so a stage sets it once, right after reading run.json
# (configure_from_manifest), and every prompt built in that process (training, contrast, chat, Modelfile,
# model card) uses it, instead of passing it down through every function that renders a conversation.
_active = {"system_prompt": SYSTEM_PROMPT}


def system_prompt() -> str:
    return _active["system_prompt"]


def configure(text: str | None) -> None:
    _active["system_prompt"] = text if text else DEFAULT_SYSTEM_PROMPT


def configure_from_manifest(run_manifest: dict) -> None:
    """A run.json from before the setting existed was trained with the default, which is what stays."""
    configure(run_manifest.get("system_prompt"))


IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross-entropy default)

# Tried in order when the tokenizer has no pad token distinct from EOS. Padding with EOS would mask the
# EOS label too, and the model would never learn to stop ("never stops" is the classic failure).
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")


def user_text(instruction: str, input_text: str | None = None) -> str:
    instruction = instruction.strip()
    if input_text and input_text.strip():
        return f"{instruction}\n\n{input_text.strip()}"
    return instruction


def messages_for(entry: dict[str, Any], with_answer: bool = True) -> list[dict[str, str]]:
    messages = [
        {"role": "system", "content": system_prompt()},
        {"role": "user", "content": user_text(entry["instruction"], entry.get("input"))},
    ]
    if with_answer:
        messages.append({"role": "assistant", "content": entry["output"].strip()})
    return messages


def question_messages(question: str) -> list[dict[str, str]]:
    return messages_for({"instruction": question}, with_answer=False)


def prompt_ids(tokenizer, entry: dict[str, Any]) -> list[int]:
    """Token ids of everything the model reads before it answers (system, user, assistant header)."""
    ids = tokenizer.apply_chat_template(
        messages_for(entry, with_answer=False), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def tokenize_example(tokenizer, entry: dict[str, Any], max_seq_length: int) -> dict[str, list[int]]:
    """input_ids and labels with the loss on the response only and exactly one EOS at its end.

    The response is tokenized on its own after the generation prompt: that boundary is where generation
    starts too, so training and inference see the same token split.
    """
    prompt = prompt_ids(tokenizer, entry)
    eos = tokenizer.eos_token_id
    response = tokenizer(entry["output"].strip(), add_special_tokens=False)["input_ids"]
    while response and response[-1] == eos:  # an output that already ends in EOS must not get a second one
        response = response[:-1]
    response = response + [eos]
    input_ids = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    if len(input_ids) > max_seq_length:
        # Truncate the response, never the question, and keep the EOS so the model still learns to stop.
        keep = max(max_seq_length - len(prompt), 1)
        if keep <= 1 and len(prompt) >= max_seq_length:
            prompt = prompt[-(max_seq_length - 1):]
        response = response[: keep - 1] + [eos] if keep > 1 else [eos]
        input_ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
    return {"input_ids": input_ids, "labels": labels}


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token different from EOS, reusing one already in the vocabulary."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != eos:
            tokenizer.pad_token = candidate
            return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = tokenizer.unk_token
        return
    raise ValueError("El tokenizador no tiene ningún token de relleno distinto de EOS.")
