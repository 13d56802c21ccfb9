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


def conversation_messages(entry: dict[str, Any]) -> list[dict[str, str]]:
    """A multi-turn entry's messages, with the run's system prompt unless the data brings its own."""
    turns = [dict(turn) for turn in entry["turns"]]
    if turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt()})
    return turns


def _template_ids(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                        return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def tokenize_conversation(tokenizer, entry: dict[str, Any], max_seq_length: int) -> dict[str, list[int]]:
    """input_ids and labels of a whole conversation, with the loss on every assistant turn and nothing else.

    The conversation is rendered by the chat template, as the chat (afinar.evaluate.generation) renders its history
    at inference. Each assistant turn's tokens are found by rendering the conversation up to that turn's
    generation prompt (where the answer starts) and up to the end of that turn (its end-of-turn token
    included, so the model learns to stop after every answer); both renderings are prefixes of the whole.
    """
    messages = conversation_messages(entry)
    eos = tokenizer.eos_token_id
    full = _template_ids(tokenizer, messages, False)
    labels = [IGNORE_INDEX] * len(full)
    ends: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_template_ids(tokenizer, messages[:index], True))
        end = len(_template_ids(tokenizer, messages[: index + 1], False))
        if not 0 < start < end <= len(full):
            raise ValueError(f"La plantilla de chat no permite separar el turno {index} de la conversación.")
        # A template that closes a turn with more than the end-of-turn token ("<|im_end|>\n") leaves the
        # rest unlabelled: what the model must learn is to stop, at EOS.
        stop = end
        while stop > start and full[stop - 1] != eos:
            stop -= 1
        stop = stop if stop > start else end
        labels[start:stop] = full[start:stop]
        ends.append(stop)
    if len(full) <= max_seq_length:
        return {"input_ids": full, "labels": labels}
    # Too long: keep whole turns while they fit; if not even the first answer fits, cut it and keep its EOS.
    fitting = [end for end in ends if end <= max_seq_length]
    if fitting:
        cut = fitting[-1]
        return {"input_ids": full[:cut], "labels": labels[:cut]}
    ids = full[: max_seq_length - 1] + [eos]
    kept = labels[: max_seq_length - 1] + [eos]
    return {"input_ids": ids, "labels": kept}


def tokenize_example(tokenizer, entry: dict[str, Any], max_seq_length: int) -> dict[str, list[int]]:
    """input_ids and labels with the loss on the response only and exactly one EOS at its end.

    The response is tokenized on its own after the generation prompt: that boundary is where generation
    starts too, so training and inference see the same token split. A multi-turn entry (`turns`) goes
    through tokenize_conversation: the loss on every assistant turn.
    """
    if entry.get("turns"):
        return tokenize_conversation(tokenizer, entry, max_seq_length)
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
