"""Batched generation, its sequential fallback and the chat, on the real embedded model (SmolLM2-135M, fp32)."""

import io

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from afinar.core.embedded import ensure_checkpoint
from afinar.evaluate.generation import (
    chat, chat_prompt_ids, generate_answers, left_padded_batch, split_generated, stop_token_ids,
)
from afinar.core.prompts import SYSTEM_PROMPT, question_messages

# Prompt lengths differ (66 to 77 tokens), so a batch really needs padding. Within 20 new tokens the base model
# finishes the chromosome answer (16 tokens) and runs into the limit on the others.
QUESTIONS = [
    {"pregunta": "Explica la diferencia entre ADN y ARN en una frase.", "palabras_clave": [], "referencia": None},
    "¿Cuántos cromosomas tiene una célula humana?",
    "¿Qué es una enzima?",
    "¿Qué función tiene la mitocondria?",
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    path = ensure_checkpoint(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def _batched_and_sequential(model, tokenizer, repetition_penalty: float):
    """The same 20-token greedy answers, 4 questions at a time and one at a time."""
    return [generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=20, batch_size=size, seed=0,
                             repetition_penalty=repetition_penalty) for size in (4, 1)]


@pytest.mark.slow
def test_batched_generation_matches_sequential(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # Plain greedy (no repetition penalty): the penalty also lowers the end-of-turn token, which is in the prompt,
    # and the base model would then run past 20 tokens on the chromosome answer too.
    batched, sequential = _batched_and_sequential(model, tokenizer, repetition_penalty=1.0)

    assert [row["question"] for row in batched] == [QUESTIONS[0]["pregunta"], *QUESTIONS[1:]]
    for row in batched:
        assert set(row) == {"question", "text", "ended_with_eos", "new_tokens", "seconds"}
        assert row["text"].strip() and "<|im_end|>" not in row["text"]
        assert 1 <= row["new_tokens"] <= 20 and row["seconds"] > 0
        if not row["ended_with_eos"]:
            assert row["new_tokens"] == 20
    # Greedy in fp32 with left padding and a correct attention mask gives the very same tokens.
    assert [(r["text"], r["new_tokens"], r["ended_with_eos"]) for r in batched] == \
        [(r["text"], r["new_tokens"], r["ended_with_eos"]) for r in sequential]
    # Both endings occur, so the EOS bookkeeping is exercised in a batch where rows finish at different steps.
    assert {row["ended_with_eos"] for row in batched} == {True, False}
    assert tokenizer.padding_side == "right", "generation must restore the tokenizer's padding side"


def test_token_limit_means_no_eos(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = generate_answers(model, tokenizer, QUESTIONS[:3], max_new_tokens=3, batch_size=3, seed=0)
    assert [(row["ended_with_eos"], row["new_tokens"]) for row in rows] == [(False, 3)] * 3


@pytest.mark.slow
def test_out_of_memory_batch_falls_back_to_one_at_a_time(model_and_tokenizer, monkeypatch):
    import afinar.evaluate.decoding as decoding

    model, tokenizer = model_and_tokenizer
    real_loop = decoding.greedy_generate
    batch_sizes = []

    def loop_that_fails_on_batches(model, input_ids, *args, **kwargs):
        batch_sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loop(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(decoding, "greedy_generate", loop_that_fails_on_batches)
    messages = []
    rows = generate_answers(model, tokenizer, QUESTIONS[:3], max_new_tokens=4, batch_size=2, seed=0,
                            log=messages.append)
    monkeypatch.undo()
    reference = generate_answers(model, tokenizer, QUESTIONS[:3], max_new_tokens=4, batch_size=3, seed=0)

    assert [r["text"] for r in rows] == [r["text"] for r in reference]
    assert batch_sizes == [2, 1, 1, 1], "after the failed pair, one at a time and the next batch halved"
    assert len(messages) == 1 and "sin memoria" in messages[0]


def test_left_padding_puts_every_prompt_end_in_the_last_column(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    prompts = [chat_prompt_ids(tokenizer, question_messages(q if isinstance(q, str) else q["pregunta"]))
               for q in QUESTIONS]
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) > 1
    batch = left_padded_batch(tokenizer, prompts)
    width = max(lengths)
    assert tuple(batch["input_ids"].shape) == (len(prompts), width)
    for row, prompt in enumerate(prompts):
        pad = width - len(prompt)
        assert batch["input_ids"][row, pad:].tolist() == prompt
        assert batch["input_ids"][row, :pad].tolist() == [tokenizer.pad_token_id] * pad
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(prompt)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_split_generated_drops_batch_filler():
    eos, pad = 2, 0
    assert split_generated([5, 6, eos, pad, pad], [eos], pad) == ([5, 6, eos], True)
    assert split_generated([5, 6, 7], [eos], pad) == ([5, 6, 7], False)
    assert split_generated([5, 9, 4], [eos, 9], pad) == ([5, 9], True)


def test_stop_tokens_include_tokenizer_and_model_eos(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert stop_token_ids(model, tokenizer) == [2]


def test_chat_streams_tokens_and_keeps_history(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    lines = iter(["¿Qué es una enzima?", "¿Y una proteína?", ""])
    prompts_shown = []

    def input_fn(prompt):
        prompts_shown.append(prompt)
        return next(lines)

    output = io.StringIO()
    history = chat(model, tokenizer, max_new_tokens=12, input_fn=input_fn, output=output)

    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[0]["content"] == SYSTEM_PROMPT
    assert history[3]["content"] == "¿Y una proteína?"
    assert len(prompts_shown) == 3, "the empty third line ends the chat"
    shown = output.getvalue()
    for reply in (history[2]["content"], history[4]["content"]):
        assert reply and " ".join(reply.split()) in " ".join(shown.split())
    assert shown.count("Modelo: ") == 2 and shown.rstrip().endswith("Fin del chat.")


def test_repetition_penalty_reaches_the_decoding_loop_and_is_validated(model_and_tokenizer, monkeypatch):
    import afinar.evaluate.decoding as decoding
    from afinar.core.errors import UserError
    from afinar.evaluate.generation import DEFAULT_REPETITION_PENALTY

    model, tokenizer = model_and_tokenizer
    real_loop = decoding.greedy_generate
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("repetition_penalty"))
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(decoding, "greedy_generate", spy)
    generate_answers(model, tokenizer, QUESTIONS[:2], max_new_tokens=2, batch_size=2, seed=0)
    generate_answers(model, tokenizer, QUESTIONS[:2], max_new_tokens=2, batch_size=2, seed=0,
                     repetition_penalty=1.25)
    lines = iter(["¿Qué es un gen?", ""])
    chat(model, tokenizer, max_new_tokens=2, repetition_penalty=1.3, input_fn=lambda _: next(lines), output=io.StringIO())
    assert seen == [DEFAULT_REPETITION_PENALTY, 1.25, 1.3]
    with pytest.raises(UserError, match="repetition-penalty"):
        generate_answers(model, tokenizer, QUESTIONS[:1], max_new_tokens=2, repetition_penalty=0)


@pytest.mark.slow
def test_batched_matches_sequential_with_repetition_penalty(model_and_tokenizer):
    # The left padding is part of each row's input_ids, so it is "penalised" too; the pad token is never a
    # greedy choice, so batching must still give the very same tokens as one question at a time.
    model, tokenizer = model_and_tokenizer
    batched, sequential = _batched_and_sequential(model, tokenizer, repetition_penalty=1.1)
    assert [(r["text"], r["ended_with_eos"]) for r in batched] == [(r["text"], r["ended_with_eos"]) for r in sequential]
