"""The fast greedy loop (afinar.evaluate.decoding) gives exactly model.generate's tokens: real embedded model, fp32, CPU.

The batch has prompts of different lengths (left padding), the repetition penalty on, and rows that stop on EOS
at different steps while others run to the limit, so the penalty, the padding and the stop are all exercised.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import afinar.evaluate.decoding as decoding
from afinar.core.embedded import ensure_checkpoint
from afinar.evaluate.generation import (
    _generate_options, chat_prompt_ids, generate_answers, left_padded_batch, reference_generate,
)
from afinar.core.prompts import ensure_pad_token, question_messages

QUESTIONS = [
    "Explica la diferencia entre ADN y ARN en una frase.",
    "¿Cuántos cromosomas tiene una célula humana?",
    "¿Qué es una enzima?",
    "¿Qué función tiene la mitocondria?",
]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def model_and_tokenizer():
    path = ensure_checkpoint(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ensure_pad_token(tokenizer)
    return model, tokenizer


def _batch(tokenizer):
    return left_padded_batch(tokenizer, [chat_prompt_ids(tokenizer, question_messages(q)) for q in QUESTIONS])


@pytest.fixture(scope="module")
def references():
    """model.generate's tokens for QUESTIONS at each penalty, computed once for both modes: the same model,
    batch and options give the same tokens, and generate is the slow half of each comparison."""
    return {}


def _both(model, tokenizer, penalty, mode, references):
    batch = _batch(tokenizer)
    options = _generate_options(model, tokenizer, NEW_TOKENS, False, penalty)
    with torch.inference_mode():
        if penalty not in references:
            references[penalty] = reference_generate(model, batch, options)
        reference = references[penalty]
        fast = decoding.greedy_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS,
                                        repetition_penalty=penalty, stop_ids=options["eos_token_id"],
                                        pad_id=options["pad_token_id"], mode=mode)
    return reference, fast, options


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_fast_loop_gives_generate_tokens_with_penalty_and_eos(model_and_tokenizer, references, mode):
    # "eager" is what the CPU runs; "static" is the GPU path's StaticCache and fixed-width mask, without graphs.
    model, tokenizer = model_and_tokenizer
    outputs = {}
    for penalty in (1.0, 1.15):
        reference, fast, options = _both(model, tokenizer, penalty, mode, references)
        eos = options["eos_token_id"]
        assert fast.dtype == torch.long and fast.shape[0] == len(QUESTIONS)
        # Same tokens, and the same number of steps: the loop stops when every row has stopped, as generate does.
        assert torch.equal(fast, reference), f"penalty {penalty}, mode {mode}:\n{fast}\n{reference}"
        outputs[penalty] = fast
    # Without the penalty, two answers end on EOS inside 20 tokens and the others hit the limit: the batch ran
    # past a finished row, which must hold pad from then on.
    plain = outputs[1.0]
    ended = [bool(torch.isin(row, torch.tensor(eos)).any()) for row in plain]
    assert True in ended and False in ended
    for row, stopped in zip(plain, ended):
        if stopped:
            after = row.tolist()[[t in eos for t in row.tolist()].index(True) + 1:]
            assert all(t == options["pad_token_id"] for t in after)
    # The penalty really acted (else this test could not tell a loop that ignores it).
    assert not torch.equal(outputs[1.0][:, :NEW_TOKENS // 2], outputs[1.15][:, :NEW_TOKENS // 2])


@pytest.mark.slow
def _generate_and_static(model, tokenizer, questions, options):
    """(generate's tokens, the static session's tokens) for one left-padded batch of `questions`, 8 new tokens."""
    batch = left_padded_batch(tokenizer, [chat_prompt_ids(tokenizer, question_messages(q)) for q in questions])
    with torch.inference_mode():
        reference = reference_generate(model, batch, options)
        fast = decoding.greedy_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=8,
                                        repetition_penalty=1.15, stop_ids=options["eos_token_id"],
                                        pad_id=options["pad_token_id"], mode="static")
    return reference, fast


def test_a_reused_session_gives_generate_tokens(model_and_tokenizer):
    # The GPU path keeps one session (static cache, buffers, recorded step) per batch shape and reuses it for the
    # next batch of that shape: nothing of the first batch may leak into the second (cache, penalty mask, stops).
    model, tokenizer = model_and_tokenizer
    model.__dict__.pop(decoding.SESSIONS_ATTR, None)
    options = _generate_options(model, tokenizer, 8, False, 1.15)
    for questions in (QUESTIONS, QUESTIONS[::-1]):
        reference, fast = _generate_and_static(model, tokenizer, questions, options)
        assert torch.equal(fast, reference), questions
    assert len(model.__dict__[decoding.SESSIONS_ATTR]) == 1, "the second batch reused the first one's session"
    # SmolLM2 is a llama: the session decoded with q/k/v and gate/up as one product each (5 projections a layer)
    # and gave generate's tokens all the same; afterwards the model's own layers are back as they were.
    (session,) = model.__dict__[decoding.SESSIONS_ATTR].values()
    assert session.fused is not None and len(session.fused.forwards) == 5 * model.config.num_hidden_layers
    assert not any("forward" in module.__dict__ for module in model.modules())

    # Weights changed in place after the session was made: the reused session must answer with the new weights,
    # as generate does, not with its fused copies of the old ones. (x2 and /2 are exact in fp32.)
    layer = model.model.layers[0]
    changed = (layer.self_attn.k_proj.weight, layer.mlp.up_proj.weight)
    with torch.no_grad():
        for weight in changed:
            weight.mul_(2)
    try:
        reference, fast = _generate_and_static(model, tokenizer, QUESTIONS, options)
        assert len(model.__dict__[decoding.SESSIONS_ATTR]) == 1, "the same session, refreshed"
        assert torch.equal(fast, reference)
    finally:
        with torch.no_grad():
            for weight in changed:
                weight.div_(2)


def test_one_row_without_padding_matches_generate(model_and_tokenizer):
    # The chat case: one sequence, no padding, the default penalty; token limit short to keep the test quick.
    model, tokenizer = model_and_tokenizer
    prompt = torch.tensor([chat_prompt_ids(tokenizer, question_messages(QUESTIONS[2]))])
    batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    options = _generate_options(model, tokenizer, 8, False, 1.15)
    streamed = []
    with torch.inference_mode():
        reference = reference_generate(model, batch, options)
        fast = decoding.greedy_generate(model, prompt, batch["attention_mask"], max_new_tokens=8,
                                        repetition_penalty=1.15, stop_ids=options["eos_token_id"],
                                        pad_id=options["pad_token_id"], on_tokens=streamed.extend)
    assert torch.equal(fast, reference)
    # Streamed as produced, one slice per step on the CPU, adding up to the answer.
    assert len(streamed) == fast.shape[1] and [t for part in streamed for t in part] == fast[0].tolist()


@pytest.fixture
def loop_calls(monkeypatch):
    """The keyword arguments of every call to the real greedy loop, which still runs."""
    calls = []
    real = decoding.greedy_generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(decoding, "greedy_generate", spy)
    return calls


def test_generate_answers_uses_the_fast_loop(model_and_tokenizer, monkeypatch, loop_calls):
    model, tokenizer = model_and_tokenizer

    def no_generate(*args, **kwargs):
        raise AssertionError("generate_answers must not call model.generate for greedy answers")

    monkeypatch.setattr(model, "generate", no_generate)
    rows = generate_answers(model, tokenizer, QUESTIONS[:2], max_new_tokens=3, batch_size=2, seed=0,
                            repetition_penalty=1.25)
    assert [c["repetition_penalty"] for c in loop_calls] == [1.25] and [r["new_tokens"] for r in rows] == [3, 3]


def test_a_long_job_asks_for_the_compiled_step(model_and_tokenizer, monkeypatch, loop_calls):
    # generate_answers picks the decode mode by the job's size: the contrast set records graphs at once, a job of
    # COMPILE_PAYS_OFF_TOKENS or more compiles first. On the CPU both run the eager loop, with the same answers.
    model, tokenizer = model_and_tokenizer
    short = generate_answers(model, tokenizer, QUESTIONS[:2], max_new_tokens=3, batch_size=2, seed=0)
    monkeypatch.setattr(decoding, "COMPILE_PAYS_OFF_TOKENS", 2 * 3)  # this very job is now "long"
    long = generate_answers(model, tokenizer, QUESTIONS[:2], max_new_tokens=3, batch_size=2, seed=0)
    assert [c["mode"] for c in loop_calls] == ["auto", "compile"]
    assert [r["text"] for r in long] == [r["text"] for r in short]
    assert decoding.resolve_mode("compile", torch.device("cpu")) == "eager"


def test_a_failing_fast_loop_falls_back_to_generate(model_and_tokenizer, monkeypatch, capsys):
    import afinar.evaluate.generation as generation

    model, tokenizer = model_and_tokenizer
    expected = generate_answers(model, tokenizer, QUESTIONS[:2], max_new_tokens=4, batch_size=2, seed=0)

    def broken(*args, **kwargs):
        raise RuntimeError("forward parcheado que no acepta esta caché")

    monkeypatch.setattr(decoding, "greedy_generate", broken)
    monkeypatch.setattr(generation, "_FAST_LOOP_FAILED", set())
    rows = generate_answers(model, tokenizer, QUESTIONS[:2], max_new_tokens=4, batch_size=2, seed=0)
    assert [r["text"] for r in rows] == [r["text"] for r in expected]
    assert "model.generate" in capsys.readouterr().err


def test_cpu_never_records_graphs(monkeypatch):
    monkeypatch.delenv(decoding.MODE_ENV, raising=False)
    assert decoding.resolve_mode("auto", torch.device("cpu")) == "eager"
    assert decoding.resolve_mode("graphs", torch.device("cpu")) == "eager"
    monkeypatch.setattr(decoding, "_broken", {"graphs": "RuntimeError"})
    assert decoding.resolve_mode("auto", torch.device("cuda")) == "eager", "a mode that failed is not retried"
    monkeypatch.setattr(decoding, "_broken", {"compile": "RuntimeError"})
    assert decoding.resolve_mode("compile", torch.device("cuda")) == "graphs"
    with pytest.raises(ValueError):
        decoding.resolve_mode("vllm", torch.device("cpu"))


def test_a_model_patched_by_unsloth_keeps_its_own_generate(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    real_generate = model.generate
    calls = []

    def unsloth_fast_generate(*args, **kwargs):
        calls.append(kwargs["repetition_penalty"])
        return real_generate(*args, **kwargs)

    unsloth_fast_generate.__module__ = "unsloth.models.llama"  # where Unsloth's patched generate lives

    def not_for_unsloth(*args, **kwargs):
        raise AssertionError("Unsloth's forward must be driven by its own generate")

    monkeypatch.setattr(model, "generate", unsloth_fast_generate)
    monkeypatch.setattr(decoding, "greedy_generate", not_for_unsloth)
    rows = generate_answers(model, tokenizer, QUESTIONS[:1], max_new_tokens=2, batch_size=1, seed=0)
    assert calls == [1.15] and rows[0]["new_tokens"] == 2
