"""Answering the contrast questions (batched, left-padded) and the interactive chat.

Stage 02 answers with the base model ("antes") and stage 04 with the tuned one ("después") through
`generate_answers`, with the same settings, so the two sets of answers differ only by the training.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TextIO

from afinar.core.errors import UserError
from afinar.core.models import free_gpu_memory, model_device, unwrap_peft
from afinar.core.prompts import ensure_pad_token, question_messages, user_text
from afinar.evaluate.decoding import mode_for_job
from afinar.evaluate.questions import question_text

# 200 tokens: the training answers are short paragraphs (44-75 tokens with the SmolLM2 tokenizer, fewer with
# Llama's), so a model that learned to stop has ~3x headroom, while one that loops is cut after a bounded time
# and the cut itself shows up as ended_with_eos=False.
DEFAULT_MAX_NEW_TOKENS = 200
# 16: the 10 contrast questions go in one batch. A decode step reads all the weights whatever the batch, so on
# a GPU and on the CPU a batch of 10 costs about what a batch of 2 does; with 8, the 10 questions took two
# nearly full-price batches (8 + 2), half the possible speed-up (issue 17).
DEFAULT_BATCH_SIZE = 16
# A mild repetition penalty, between Ollama's default (1.1) and the 1.2 of the CTRL paper that introduced it.
# Greedy decoding of a 135M model falls into loops ("la luz de la luz de la..."); on the CPU demo 1.1 left one
# answer of ten above 10 % repeated 3-grams and 1.15 none (BENCHMARKS.md, issue 4). Stage 02 records the value in
# run.json and stage 04 reuses it, so "antes" and "después" are always generated alike; the Ollama Modelfile and
# the model card use the same value. 1.0 turns it off.
DEFAULT_REPETITION_PENALTY = 1.15
# Typed alone, these end the chat (an empty line does too): a notebook user has no Ctrl+D.
END_WORDS = ("salir", "adiós", "adios", "exit", "quit")


def generate_answers(
    model,
    tokenizer,
    questions: Sequence[str | dict[str, Any]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    do_sample: bool = False,
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Answer each question; one row per question, in the given order.

    Row: {"question", "text", "ended_with_eos", "new_tokens", "seconds"}. `new_tokens` counts the generated
    tokens including the final EOS; `seconds` is the row's share of its batch's wall time (a batch is timed as
    a whole), so the rows add up to the total. Greedy unless do_sample; `repetition_penalty` (1.0 = none) is
    transformers' CTRL-style penalty, which divides a positive logit (multiplies a negative one) of every token
    already in the sequence, prompt included. Batches are left-padded; a batch that
    runs out of GPU memory is answered one question at a time and later batches are halved.
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens debe ser al menos 1 (se pidió {max_new_tokens}).")
    if batch_size < 1:
        raise UserError(f"El tamaño de lote de generación debe ser al menos 1 (se pidió {batch_size}).")
    check_repetition_penalty(repetition_penalty)
    log = log or _stderr_log
    texts = [question_text(q) for q in questions]
    if not texts:
        return []
    ensure_pad_token(tokenizer)
    prompts = [chat_prompt_ids(tokenizer, question_messages(text)) for text in texts]
    # Similar lengths share a batch, so little compute goes to padding; rows are put back in order at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    options = _generate_options(model, tokenizer, max_new_tokens, do_sample, repetition_penalty)
    # Short jobs (the contrast set) decode with recorded graphs at once; a long evaluation compiles the step first.
    options["decode_mode"] = mode_for_job(len(prompts) * max_new_tokens)
    _seed_everything(seed)

    results: dict[int, dict[str, Any]] = {}
    began = time.perf_counter()
    with _inference(model):
        start = 0
        while start < len(order):
            # Equal batches (11 questions at 8 a batch: 6 + 5, not 8 + 3), since a batch costs about its longest
            # row's steps whatever its size.
            left = len(order) - start
            chunk = order[start:start + -(-left // -(-left // batch_size))]
            try:
                answered = _answer_chunk(model, tokenizer, [prompts[i] for i in chunk], options)
            except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, the rest is re-raised
                if not _is_out_of_memory(err) or len(chunk) == 1:
                    raise
                free_gpu_memory()
                log(f"Aviso: sin memoria al generar {len(chunk)} respuestas a la vez; se generan de una en una "
                    f"y los lotes siguientes serán de {max(1, batch_size // 2)}.")
                batch_size = max(1, batch_size // 2)
                answered = [row for i in chunk for row in _answer_chunk(model, tokenizer, [prompts[i]], options)]
            for index, row in zip(chunk, answered):
                results[index] = {"question": texts[index], **row}
            start += len(chunk)
            elapsed = time.perf_counter() - began
            left = elapsed / start * (len(order) - start)
            print(f"  generación: {start}/{len(order)} respuestas, {elapsed:.0f} s"
                  + (f", quedan ~{left:.0f} s" if start < len(order) else ""), flush=True)
    return [results[i] for i in range(len(texts))]


def check_repetition_penalty(value: float) -> None:
    if not value > 0:
        raise UserError(f"--repetition-penalty debe ser mayor que 0 (se pidió {value}); 1.0 es sin penalización.")


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def left_padded_batch(tokenizer, prompts: Sequence[Sequence[int]]) -> dict[str, Any]:
    """input_ids and attention_mask tensors with the padding on the left.

    Left, so every row's last column is its own last prompt token and all rows continue from the same column.
    """
    with _padding_side(tokenizer, "left"):
        return tokenizer.pad({"input_ids": [list(p) for p in prompts]}, padding=True, return_tensors="pt",
                             return_attention_mask=True)


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an assistant turn: the tokenizer's EOS plus the model's (Llama 3 lists several)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for candidate in [tokenizer.eos_token_id, *(_as_list(configured))]:
        if candidate is not None and int(candidate) not in ids:
            ids.append(int(candidate))
    if not ids:
        raise ValueError("Ni el tokenizador ni el modelo definen un token EOS.")
    return ids


def split_generated(new_ids: Sequence[int], stop_ids: Sequence[int], pad_id: int | None) -> tuple[list[int], bool]:
    """The tokens one row really generated (through its EOS) and whether it stopped on EOS.

    Rows that finish early in a batch are filled with pad up to the longest row; those fillers are dropped.
    """
    stops = set(stop_ids)
    kept: list[int] = []
    for token in new_ids:
        token = int(token)
        kept.append(token)
        if token in stops:
            return kept, True
    while kept and pad_id is not None and kept[-1] == pad_id and pad_id not in stops:
        kept.pop()
    return kept, False


def chat(
    model,
    tokenizer,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    input_fn: Callable[[str], str] = input,
    output: TextIO = sys.stdout,
    first_question: str | None = None,
    interactive: bool = True,
) -> list[dict[str, str]]:
    """Talk to the model turn by turn, streaming its tokens, until an empty line, "salir" (or end of input).

    The conversation keeps the training prompt definition (same system prompt, same chat template) and the
    whole history; the oldest turns are dropped only if the history would not fit in the context window.
    `first_question` is answered before anything is read (the notebook's "prueba el modelo" cell); with
    `interactive` False nothing is read at all. Returns the conversation as chat messages.
    """
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            output.write(text + ("\n" if stream_end else ""))
            output.flush()

    ensure_pad_token(tokenizer)
    stop_ids = stop_token_ids(model, tokenizer)
    options = _generate_options(model, tokenizer, max_new_tokens, False, repetition_penalty)
    device = model_device(model)
    history: list[dict[str, str]] = []
    if interactive:
        output.write("Chat con el modelo afinado. Escribe tu pregunta; una línea vacía o «salir» termina.\n")
        output.flush()
    import torch

    pending = [first_question] if first_question and first_question.strip() else []
    with _inference(model):
        while True:
            if pending:
                line = pending.pop()
                output.write(f"Tú: {line}\n")
            elif not interactive:
                break
            else:
                try:
                    line = input_fn("Tú: ")
                except EOFError:
                    break
            if not line.strip() or line.strip().lower() in END_WORDS:
                break
            if history:
                history.append({"role": "user", "content": user_text(line)})
            else:
                history = question_messages(line)
            prompt = _fit_context(model, tokenizer, history, max_new_tokens)
            output.write("Modelo: ")
            output.flush()
            batch = {"input_ids": torch.tensor([prompt], device=device)}
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            streamer = _Streamer(tokenizer, skip_prompt=False, skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)

            ended = [False]

            def shown(rows: list[list[int]]) -> None:
                for token in rows[0]:
                    ended[0] = ended[0] or token in stop_ids  # the EOS and the pads after it are not text
                    if not ended[0]:
                        streamer.put(torch.tensor([token]))

            new_ids = _continue(model, batch, options, on_tokens=shown)
            streamer.end()
            reply_ids, _ = split_generated(new_ids[0].tolist(), stop_ids, tokenizer.pad_token_id)
            history.append({"role": "assistant", "content": decode(tokenizer, reply_ids)})
    if interactive:
        output.write("Fin del chat.\n")
    output.flush()
    return history


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def _answer_chunk(model, tokenizer, prompts: list[list[int]], options: dict[str, Any]) -> list[dict[str, Any]]:
    batch = left_padded_batch(tokenizer, prompts)
    device = model_device(model)
    batch = {key: value.to(device) for key, value in batch.items()}
    started = time.perf_counter()
    new_ids = _continue(model, batch, options)
    _synchronize(device)
    seconds = time.perf_counter() - started
    rows = []
    for sequence in new_ids.tolist():
        ids, ended = split_generated(sequence, options["eos_token_id"], options["pad_token_id"])
        rows.append({"text": decode(tokenizer, ids), "ended_with_eos": ended, "new_tokens": len(ids),
                     "seconds": round(seconds / len(prompts), 4)})
    return rows


def _continue(model, batch: dict[str, Any], options: dict[str, Any], on_tokens=None):
    """The new tokens of each row ([batch, steps], pad after a row's EOS): afinar.evaluate.decoding's greedy loop, the
    same tokens as `model.generate` with these options; `generate` itself only for sampling or a model whose
    generation_config asks for a logits processor that loop does not reproduce."""
    if not options["do_sample"] and _plain_greedy(model) and id(model) not in _FAST_LOOP_FAILED:
        from afinar.evaluate.decoding import greedy_generate

        try:
            return greedy_generate(model, batch["input_ids"], batch["attention_mask"],
                                   max_new_tokens=options["max_new_tokens"],
                                   repetition_penalty=options["repetition_penalty"],
                                   stop_ids=options["eos_token_id"], pad_id=options["pad_token_id"],
                                   on_tokens=on_tokens, mode=options.get("decode_mode", "auto"))
        except Exception as err:  # noqa: BLE001 - a model whose forward the loop cannot drive still answers
            if _is_out_of_memory(err):
                raise
            # E.g. a backend that patches the forward for its own cache: generate() knows how to drive it.
            _FAST_LOOP_FAILED.add(id(model))
            _stderr_log(f"Aviso: el bucle de generación propio falló ({type(err).__name__}: {str(err)[:200]}); "
                        "se usa model.generate para este modelo.")
    return reference_generate(model, batch, options)


def _unsloth_patched(model) -> bool:
    causal_lm = unwrap_peft(model)
    patched = (getattr(type(causal_lm), "forward", None), getattr(causal_lm, "generate", None),
               getattr(model, "generate", None))
    return any(str(getattr(f, "__module__", "") or "").startswith("unsloth") for f in patched)


_FAST_LOOP_FAILED: set[int] = set()  # id() of models whose forward afinar.evaluate.decoding could not drive


def reference_generate(model, batch: dict[str, Any], options: dict[str, Any]):
    """`model.generate` with the same options: the reference the fast loop must match token for token."""
    keys = ("max_new_tokens", "do_sample", "num_beams", "repetition_penalty", "eos_token_id", "pad_token_id",
            "temperature", "top_p", "top_k")
    generated = model.generate(**batch, **{k: options[k] for k in keys if k in options})
    return generated[:, batch["input_ids"].shape[1]:].cpu()


# generation_config fields that add a logits processor to greedy `generate`; afinar.evaluate.decoding reproduces only the
# repetition penalty and the stop on EOS, so a model that sets any of these goes through `generate` instead.
_UNSUPPORTED_GENERATION_FIELDS = ("no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
                                  "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                                  "forced_eos_token_id", "sequence_bias", "encoder_repetition_penalty",
                                  "exponential_decay_length_penalty", "renormalize_logits")


def _plain_greedy(model) -> bool:
    if _unsloth_patched(model):
        # Unsloth replaces the forward with its own inference kernels and KV cache, which drive only through its
        # patched generate() (it switches the model to its inference mode, FastLanguageModel.for_inference, and
        # back): our loop would hand that forward a transformers cache it does not expect.
        return False
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    for field in _UNSUPPORTED_GENERATION_FIELDS:
        value = getattr(config, field, None)
        if value not in (None, 0, False, 1.0, [], ()):
            return False
    return True


def _generate_options(model, tokenizer, max_new_tokens: int, do_sample: bool,
                      repetition_penalty: float = DEFAULT_REPETITION_PENALTY) -> dict[str, Any]:
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_beams": 1,
        "repetition_penalty": float(repetition_penalty),
        "eos_token_id": stop_token_ids(model, tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if not do_sample:
        # Llama's generation_config ships temperature/top_p for sampling; blank them so greedy runs warn-free.
        options.update({"temperature": None, "top_p": None, "top_k": None})
    return options


def _fit_context(model, tokenizer, history: list[dict[str, str]], max_new_tokens: int) -> list[int]:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    prompt = chat_prompt_ids(tokenizer, history)
    # history[0] is the system prompt and history[-1] the new question: drop whole old turns in between.
    while limit and len(prompt) + max_new_tokens > limit and len(history) > 3:
        del history[1:3]
        prompt = chat_prompt_ids(tokenizer, history)
    return prompt


@contextmanager
def _inference(model) -> Iterator[None]:
    """Eval mode (no dropout: greedy must be reproducible) and no autograd; restores the previous mode."""
    import torch

    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


@contextmanager
def _padding_side(tokenizer, side: str) -> Iterator[None]:
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _synchronize(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
