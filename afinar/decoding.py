"""The greedy decoding loop behind the contrast answers (02 and 04) and `--chat`.

It computes exactly what `model.generate(do_sample=False, repetition_penalty=p, eos_token_id=stops,
pad_token_id=pad)` computes, token for token, but keeps every per-token decision on the device:

- the repetition penalty is transformers' CTRL-style rule (a positive logit of a token already in the sequence,
  prompt included, is divided by p, a negative one multiplied) applied through a [batch, vocab] presence mask,
  so no token list is gathered or copied to the host;
- a row that produced a stop token is marked finished on the device and gets the pad token from then on, as in
  `generate`; the host looks at "all rows finished" only every few steps (one sync per STOP_CHECK_EVERY tokens
  on a GPU, where each sync stalls the queue of kernels);
- on CUDA the KV cache is a StaticCache sized once for the batch (prompt + max_new_tokens), so one decode step
  always has the same shapes and addresses and is recorded once as a CUDA graph and replayed for every token:
  the host launches one graph per token instead of hundreds of kernels, and the per-token Python of the model
  is paid once. Recording costs about one step, so short jobs (the 10 contrast questions) do not pay a compile.
  Optionally (mode "compile") the forward is first compiled with torch.compile (fused kernels, ~2x fewer
  launches) and then recorded; that pays a compilation once per process and suits long jobs.

On the CPU there are no graphs: the loop runs eagerly with the same DynamicCache, masks and positions that
`generate` uses, so the logits are bit-identical to `generate`'s (tests/test_decoding.py checks the tokens).
If recording or compiling fails on a GPU, the batch is answered again eagerly, with a message, never a crash.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

# One host sync (the "are all rows finished?" read, and the streamed tokens) every this many tokens on a GPU.
# Waste when every row has finished: at most STOP_CHECK_EVERY - 1 extra steps, each ~2 ms on an H200.
STOP_CHECK_EVERY = 16
# The static cache is rounded up to a multiple of this, so consecutive batches of similar prompts reuse the
# compiled code (torch.compile specialises on shapes) and the allocator's blocks.
CACHE_BUCKET = 64
# "static": the GPU path's StaticCache and fixed-width mask without graphs, anywhere (tests check it on the CPU).
MODES = ("auto", "eager", "graphs", "compile", "static")
# AFINAR_DECODE=eager|graphs|compile overrides "auto" (benchmarks and debugging).
MODE_ENV = "AFINAR_DECODE"

_broken: dict[str, str] = {}  # mode -> why it failed once in this process (never retried, one message)
_compiled: dict[int, Callable] = {}  # id(model) -> its compiled forward


def greedy_generate(
    model,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int,
    repetition_penalty: float,
    stop_ids: Sequence[int],
    pad_id: int,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
    mode: str = "auto",
    log: Callable[[str], None] | None = None,
):
    """Greedy continuation of a left-padded batch; returns a CPU LongTensor [batch, steps] of new tokens.

    steps <= max_new_tokens; after a row's stop token the row holds pad_id (like `generate`). `on_tokens`, if
    given, receives each newly produced slice of tokens (one list per row) as soon as the host has it: every
    token on the CPU, every STOP_CHECK_EVERY tokens with CUDA graphs.
    """
    import torch

    log = log or _stderr_log
    mode = resolve_mode(mode, input_ids.device if hasattr(input_ids, "device") else None, model)
    if mode in ("graphs", "compile"):
        try:
            return _run(model, input_ids, attention_mask, max_new_tokens, repetition_penalty, stop_ids, pad_id,
                        on_tokens, mode)
        except Exception as err:  # noqa: BLE001 - any failure of the fast path falls back to the eager loop
            if _is_out_of_memory(err):
                raise  # the caller halves the batch; eager would run out of memory as well
            _broken[mode] = f"{type(err).__name__}: {err}"
            log(f"Aviso: la generación rápida ({mode}) falló ({type(err).__name__}: {str(err)[:200]}); "
                "se sigue sin ella (más lenta, mismas respuestas).")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    return _run(model, input_ids, attention_mask, max_new_tokens, repetition_penalty, stop_ids, pad_id,
                on_tokens, "static" if mode == "static" else "eager")


def resolve_mode(mode: str, device, model=None) -> str:
    """The loop actually used: graphs only on CUDA, and never a mode that already failed in this process."""
    requested = os.environ.get(MODE_ENV) or mode
    if requested not in MODES:
        raise ValueError(f"{MODE_ENV}/mode debe ser uno de {', '.join(MODES)} (se pidió {requested!r}).")
    device = device if device is not None else _model_device(model)
    if requested == "static":
        return requested
    if getattr(device, "type", None) != "cuda":
        return "eager"
    if requested == "auto":
        requested = "graphs"
    if requested == "compile" and "compile" in _broken:
        requested = "graphs"
    if requested == "graphs" and "graphs" in _broken:
        requested = "eager"
    return requested


def _run(model, input_ids, attention_mask, max_new_tokens, penalty, stop_ids, pad_id, on_tokens, mode):
    import torch

    device = _model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device).long()
    batch, width = input_ids.shape
    total = width + max_new_tokens
    # "static" (no graphs) exists for the tests: the static-cache bookkeeping of the GPU path, checked on the CPU.
    static = mode in ("graphs", "compile", "static")
    if static:
        from transformers import StaticCache

        total = -(-total // CACHE_BUCKET) * CACHE_BUCKET
        cache = StaticCache(config=model.config, max_cache_len=total)
    else:
        cache = None  # the model makes the same DynamicCache that generate() would
    # Generated positions are always attended (a finished row keeps attending its pads, as in generate());
    # the causal rule hides the slots not written yet. With a static cache the full-width mask never changes.
    mask = torch.cat([attention_mask, attention_mask.new_ones(batch, total - width)], dim=1)
    # generate()'s positions: count of real tokens before each one, so left padding does not shift them.
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

    forward = _compiled_forward(model) if mode == "compile" else model
    prefill = model(input_ids=input_ids, attention_mask=mask if static else attention_mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache = prefill.past_key_values
    logits = prefill.logits[:, -1].to(dtype=torch.float32)
    del prefill

    state = _State(batch, logits.shape[-1], max_new_tokens, device, penalty, stop_ids, pad_id)
    state.seen_prompt(input_ids)
    state.take(logits)
    token = state.token.view(batch, 1)
    position = positions[:, -1:].clone()

    seen_length = [width + 1]  # prompt + the token fed in, a host int: reading state.count would sync

    def step() -> None:
        position.add_(1)
        # With the static cache the mask keeps its full width; with the dynamic one it grows by one column,
        # exactly as generate() extends it.
        step_mask = mask if static else mask[:, : seen_length[0]]
        seen_length[0] += 1
        out = forward(input_ids=token, attention_mask=step_mask, position_ids=position, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
        state.take(out.logits[:, -1].to(dtype=torch.float32))

    produced = 1
    streamed = 0
    if device.type != "cuda" or mode == "static":
        while produced < max_new_tokens and not bool(state.done.all()):
            if on_tokens is not None:
                streamed = _stream(state, streamed, produced, on_tokens)
            step()
            produced += 1
        if on_tokens is not None:
            _stream(state, streamed, produced, on_tokens)
        return state.out[:, :produced].cpu()

    run_step = step
    if static and produced < max_new_tokens:
        run_step = _record(step, device)  # the recording does not run the step; the warm-up before it did
        produced += 1
    since_check = 0
    while produced < max_new_tokens:
        if since_check >= STOP_CHECK_EVERY:
            since_check = 0
            if on_tokens is not None:
                streamed = _stream(state, streamed, produced, on_tokens)
            if bool(state.done.all()):
                break
        run_step()
        produced += 1
        since_check += 1
    torch.cuda.synchronize(device)
    # Steps past the point where every row had finished only added pad: trim them.
    out = state.out[:, :produced]
    finished_at = _last_useful_step(out, stop_ids)
    out = out[:, :finished_at].cpu()
    if on_tokens is not None and finished_at > streamed:
        on_tokens(out[:, streamed:finished_at].tolist())
    return out


class _State:
    """Per-row decoding state, all on the device and updated in place (so a CUDA graph can replay it)."""

    def __init__(self, batch, vocab, max_new_tokens, device, penalty, stop_ids, pad_id):
        import torch

        self.penalty = float(penalty)
        self.pad = torch.tensor(int(pad_id), device=device)
        self.stops = torch.tensor([int(s) for s in stop_ids], device=device)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device) if self.penalty != 1.0 else None
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.full((batch, max_new_tokens), int(pad_id), dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_new_tokens = max_new_tokens

    def seen_prompt(self, input_ids) -> None:
        # The whole prompt row counts, left padding included: generate() penalises input_ids as they are.
        if self.seen is not None:
            self.seen.scatter_(1, input_ids, True)

    def take(self, logits) -> None:
        """Penalise, pick the greedy token, pad finished rows, record it and update the masks; no host sync."""
        import torch

        if self.seen is not None:
            # transformers' RepetitionPenaltyLogitsProcessor gathers these logits, applies this same rule and
            # scatters them back; choosing by the presence mask gives the same values.
            penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        token = logits.argmax(dim=-1)
        token = torch.where(self.done, self.pad, token)
        # count never goes past max_new_tokens - 1 here: the host runs at most max_new_tokens steps.
        self.out.index_copy_(1, self.count, token.unsqueeze(1))
        self.count.add_(1)
        self.done.logical_or_((token.unsqueeze(1) == self.stops).any(dim=1))
        if self.seen is not None:
            self.seen.scatter_(1, token.unsqueeze(1), True)
        self.token.copy_(token)


def _record(step: Callable[[], None], device) -> Callable[[], None]:
    """Run `step` once for real (warm-up), then record it as a CUDA graph; returns the replay."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()  # a real step: its token counts; it also lets the kernels and cuBLAS set themselves up
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _compiled_forward(model):
    import torch

    key = id(model)
    if key not in _compiled:
        # No CUDA graphs from torch.compile ("default" mode): _record records the compiled kernels itself, with the
        # sampling and stop bookkeeping in the same graph. Dynamic shapes off: one batch shape per compile.
        _compiled[key] = torch.compile(model, dynamic=False, fullgraph=False)
    return _compiled[key]


def _stream(state, streamed: int, produced: int, on_tokens) -> int:
    if produced > streamed:
        on_tokens(state.out[:, streamed:produced].tolist())
    return produced


def _last_useful_step(out, stop_ids) -> int:
    """Number of steps up to the last one where some row still produced a real token (or its stop token)."""
    import torch

    if out.shape[1] == 0:
        return 0
    stops = torch.tensor(list(stop_ids), device=out.device)
    ended = torch.isin(out, stops)
    # A row is alive at step t if it had not stopped before t.
    stopped_before = torch.cumsum(ended.long(), dim=1) - ended.long() > 0
    alive = (~stopped_before).any(dim=0)
    useful = int(alive.nonzero().max()) + 1 if bool(alive.any()) else 0
    return max(useful, 1)


def _model_device(model):
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
