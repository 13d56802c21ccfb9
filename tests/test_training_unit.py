"""The CPU loss path: same value and gradients as the model's own loss, response tokens only."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def peft_model(embedded_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.core.settings import LORA_TARGET_MODULES

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TARGET_MODULES, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config), AutoTokenizer.from_pretrained(embedded_path)


def _batch(tokenizer, packed: bool):
    from afinar.train.packing import Collator, pack_in_order
    from afinar.core.prompts import tokenize_example

    entries = [
        {"instruction": "¿Qué es el estroma?", "output": "Es el líquido que rodea los tilacoides del cloroplasto."},
        {"instruction": "Define la fotólisis del agua.", "output": "La ruptura del agua por la luz en el fotosistema II."},
        {"instruction": "¿Respiran las plantas?", "output": "Sí, de día y de noche, en sus mitocondrias."},
    ]
    rows = [tokenize_example(tokenizer, e, 256) for e in entries]
    if packed:
        rows = pack_in_order(rows, 160)
    batch = Collator(tokenizer.pad_token_id)(rows)
    batch.pop("real_tokens")
    batch.pop("row_lengths")
    return batch


@pytest.mark.parametrize("packed", [False, True])
def test_response_only_loss_matches_model_loss(peft_model, packed):
    import torch

    from afinar.train.training import response_only_loss

    model, tokenizer = peft_model
    batch = _batch(tokenizer, packed)
    model.zero_grad()
    reference = model(**batch).loss
    reference.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ours = response_only_loss(model, batch)
    ours.backward()
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)
    for name, grad in want.items():
        got = dict(model.named_parameters())[name].grad
        assert torch.allclose(got, grad, rtol=1e-4, atol=1e-7), name


def test_packed_rows_keep_examples_apart(peft_model):
    """A packed row must score each example exactly as if it were alone (block-diagonal attention)."""
    import torch

    from afinar.train.training import response_only_loss

    model, tokenizer = peft_model
    with torch.no_grad():
        packed = response_only_loss(model, _batch(tokenizer, True))
        padded = response_only_loss(model, _batch(tokenizer, False))
    assert torch.allclose(packed, padded, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_shared_prefix_rows_train_exactly_like_separate_copies(peft_model, implementation):
    """The CPU plan keeps the system prompt once per packed row: same loss and LoRA gradients, fewer tokens."""
    import torch

    from afinar.core.prompts import tokenize_example
    from afinar.train.packing import Collator, common_prefix, pack_in_order
    from afinar.train.training import response_only_loss, use_shared_prefix_mask

    model, tokenizer = peft_model
    entries = [
        {"instruction": "¿Qué es el estroma?", "output": "Es el líquido que rodea los tilacoides del cloroplasto."},
        {"instruction": "Define la fotólisis del agua.", "output": "La ruptura del agua por la luz en el fotosistema II."},
        {"instruction": "¿Respiran las plantas?", "output": "Sí, de día y de noche, en sus mitocondrias."},
        {"instruction": "¿Dónde ocurre el ciclo de Calvin?", "output": "En el estroma, mientras hay luz."},
    ]
    # A prompt longer than the rows: tokenize_example cuts it at the start, so it lacks the common prefix and
    # must get a row of its own.
    long_prompt = {"instruction": "Resume este texto: " + "La clorofila absorbe luz roja y azul. " * 40,
                   "output": "La clorofila absorbe sobre todo luz roja y azul."}
    rows = [tokenize_example(tokenizer, e, 160) for e in entries + [long_prompt]]
    prefix = common_prefix(rows, 160)
    shared = len(prefix)
    assert shared >= 20  # the system prompt and the user header of the chat template
    assert rows[-1]["input_ids"][:shared] != prefix

    def loss_and_grads(batch):
        batch.pop("row_lengths")
        tokens = batch.pop("real_tokens")
        use_shared_prefix_mask(model, batch, shared)  # as AfinarTrainer.compute_loss does before the forward
        model.zero_grad()
        loss = response_only_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, tokens

    previous = model.config._attn_implementation, model.config.use_cache
    model.set_attn_implementation(implementation)
    # As the Trainer sets it: with a cache, transformers would not look for packed rows in the position ids.
    model.config.use_cache = False
    try:
        # Several rows a batch, so padding (segment -1) is checked too.
        apart = Collator(tokenizer.pad_token_id)(pack_in_order(rows, 160))
        together_rows = pack_in_order(rows, 160, shared_prefix=prefix)
        together = Collator(tokenizer.pad_token_id)(together_rows)
        positions_apart = int(apart["input_ids"].ne(tokenizer.pad_token_id).sum())
        loss_apart, grads_apart, tokens_apart = loss_and_grads(apart)
        loss_together, grads_together, tokens_together = loss_and_grads(together)
    finally:
        model.set_attn_implementation(previous[0])
        model.config.use_cache = previous[1]
    assert sum(len(r["input_ids"]) for r in together_rows) < positions_apart - shared
    assert rows[-1]["input_ids"] in [r["input_ids"] for r in together_rows]  # alone in its row
    assert tokens_together == tokens_apart  # tokens/s still counts the examples' own tokens
    assert torch.allclose(loss_together, loss_apart, rtol=1e-5, atol=1e-6)
    for name, grad in grads_apart.items():
        assert torch.allclose(grads_together[name], grad, rtol=1e-3, atol=1e-6), name


def test_loraplus_moves_lora_b_ratio_times_faster(embedded_path):
    """LoRA+ (bench/cpu_quality_sweep.py's `lpr`): after one AdamW step, lora_B moved `ratio` times as far as lora_A,
    and every trainable parameter is still in exactly one group."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.core.settings import LORA_TARGET_MODULES
    from afinar.train.training import lora_b_faster, response_only_loss

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Two groups, as the Trainer builds them (with and without weight decay).
    optimizer = torch.optim.AdamW([{"params": trainable[::2], "weight_decay": 0.0},
                                   {"params": trainable[1::2], "weight_decay": 0.0}], lr=1e-3)
    lora_b_faster(optimizer, model, 4.0)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    response_only_loss(model, _batch(AutoTokenizer.from_pretrained(embedded_path), packed=False)).backward()
    optimizer.step()
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()
             if p.requires_grad}
    # Adam's first step moves each weight by ~lr (the gradient over its own magnitude).
    step_a = max(v for name, v in moved.items() if "lora_A" in name)
    step_b = max(v for name, v in moved.items() if "lora_B" in name)
    assert step_a == pytest.approx(1e-3, rel=0.05) and step_b == pytest.approx(4e-3, rel=0.05)


@pytest.mark.parametrize("dtype_name, merged", [("float32", True), ("bfloat16", False)])
def test_after_passes_merge_the_adapter_only_in_fp32(embedded_path, dtype_name, merged):
    """04 on the CPU scores the tuned model with the adapter merged (faster, the exported model) only in fp32, where
    the logits match base + adapter computed apart; in bf16 the merge would round the adapter's changes away."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.stages.stage_export import _adapter_merged

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_path, dtype=dtype),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    ids = AutoTokenizer.from_pretrained(embedded_path)("La fotólisis del agua libera oxígeno.", return_tensors="pt")
    with torch.inference_mode():
        apart = model(**ids).logits
        with _adapter_merged(model):
            layer = model.base_model.model.model.layers[0].self_attn.q_proj
            assert layer.merged is merged
            inside = model(**ids).logits
        assert not layer.merged
        after = model(**ids).logits
    # Merging and unmerging add and subtract B·A in fp32: equal up to rounding (bf16: never merged, exactly equal).
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if merged else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(after, apart, **tolerance)
    torch.testing.assert_close(inside, apart, **tolerance)


def test_orpo_rows_score_each_answer_as_if_alone(peft_model):
    """ORPO (03 --preference orpo): the rejected answer rides in the chosen example's row, sharing its prompt.
    The chosen answers train exactly as without it, and the odds-ratio term equals the one computed from each
    answer scored alone."""
    import torch
    import torch.nn.functional as F

    from afinar.core.prompts import tokenize_example
    from afinar.evaluate.logprobs import right_padded, sequence_logps
    from afinar.train.packing import Collator
    from afinar.train.training import build_dataset, response_only_loss, use_shared_prefix_mask

    model, tokenizer = peft_model
    entries = [
        {"instruction": "¿De dónde sale el oxígeno de la fotosíntesis?", "output": "Del agua, en la fotólisis.",
         "rejected": "Del dióxido de carbono que absorbe la hoja."},
        {"instruction": "¿Qué es el estroma?", "output": "Es el líquido que rodea los tilacoides del cloroplasto."},
        {"instruction": "¿Respiran las plantas?", "output": "Sí, de día y de noche, en sus mitocondrias.",
         "rejected": "No, las plantas solo hacen la fotosíntesis."},
        {"instruction": "¿Dónde ocurre el ciclo de Calvin?", "output": "En el estroma, mientras hay luz."},
    ]
    model.config.use_cache = False

    def loss_of(rejected: bool, beta: float):
        dataset, prefix = build_dataset(entries, tokenizer, 256, packing=True, open_rows=1, share_prefix=True,
                                        rejected=rejected)
        batch = Collator(tokenizer.pad_token_id)(list(dataset))
        batch.pop("row_lengths"), batch.pop("real_tokens")
        use_shared_prefix_mask(model, batch, len(prefix))
        pair_ids = batch.pop("pair_ids", None)
        with torch.no_grad():
            return response_only_loss(model, batch, pair_ids=pair_ids, orpo_beta=beta), pair_ids

    plain, _ = loss_of(False, 0.0)
    sft_only, pair_ids = loss_of(True, 0.0)
    orpo, _ = loss_of(True, 0.5)
    assert pair_ids is not None and int(pair_ids.max()) >= 1 and int(pair_ids.min()) <= -1
    assert torch.allclose(sft_only, plain, rtol=1e-5)  # the rejected branches change nothing for the chosen

    with torch.no_grad():
        def mean_logps(outputs):
            rows = [tokenize_example(tokenizer, {**e, "output": o}, 256) for e, o in outputs]
            summed, counts = sequence_logps(model, right_padded(rows, tokenizer.pad_token_id))
            return summed / counts

        with_rejected = [e for e in entries if "rejected" in e]
        chosen = mean_logps([(e, e["output"]) for e in with_rejected])
        wrong = mean_logps([(e, e["rejected"]) for e in with_rejected])
    odds = lambda m: m - torch.log(-torch.expm1(m))  # noqa: E731
    expected = plain + 0.5 * (-F.logsigmoid(odds(chosen) - odds(wrong))).mean()
    assert torch.allclose(orpo, expected, rtol=1e-4)
