"""The greedy decoding loop behind the contrast answers (02 and 04) and `--chat`.

It computes exactly what `model.generate(do_sample=False, repetition_penalty=p, eos_token_id=stops,
pad_token_id=pad)` computes, token for token, but keeps every per-token decision on the device:

- the repetition penalty is transformers' CTRL-style rule (a positive logit of a token already in the sequence,
  prompt included, is divided by p, a negative one multiplied) applied through a [batch, vocab] presence mask,
  so no token list is gathered or copied to the host;
- a row that produced a stop token is marked finished on the device and gets the pad token from then on, as in
  `generate`; the host looks at "all rows finished" only every few steps (one sync per STOP_CHECK_EVERY tokens
  on a GPU, where each sync stalls the queue of kernels);
- on CUDA the KV cache is a StaticCache sized once for the batch (prompt + max_new_tokens, rounded up), so one
  decode step always has the same shapes and addresses and is recorded once as a CUDA graph and replayed for every
  token: the host launches one graph per token instead of hundreds of kernels. The cache, the buffers and the
  recorded graph form a session kept per batch shape (on the model), so a later call of the same shape only loads
  its prompt and replays: recording is paid once per shape and process, not per question.
  Optionally (mode "compile", for long jobs of a fixed shape) the whole step (forward, penalty, argmax, stop and
  cache bookkeeping) is first compiled with torch.compile (fused kernels) and then recorded; that pays a
  compilation (~15 s for a 1B model on an H200) once per shape and process.

On the CPU there are no graphs: the loop runs eagerly with the same DynamicCache, masks and positions that
`generate` uses, so the logits are bit-identical to `generate`'s (tests/test_decoding.py checks the tokens).
If recording or compiling fails on a GPU, the batch is answered again eagerly, with a message, never a crash.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from afinar.core.models import model_device, unwrap_peft

# One host sync (the "are all rows finished?" read, and the streamed tokens) every this many tokens on a GPU.
# Waste when every row has finished: at most STOP_CHECK_EVERY - 1 extra steps, each ~2 ms on an H200.
STOP_CHECK_EVERY = 16
# The static cache is rounded up to a multiple of this, so consecutive batches of similar prompts fall in the same
# session (below) and reuse its buffers, its recorded graph and its compiled code (torch.compile specialises on
# shapes). Attention over the unused slots costs little: at 256 slots the keys and values of one row are ~2% of
# the weights read per step.
CACHE_BUCKET = 128
# Sessions (static cache, buffers, recorded graph) kept per model, least recently used dropped first. Each holds
# its cache and the graph's memory pool: a few hundred MB for a 1B model and a batch of 16.
MAX_SESSIONS = 4
SESSIONS_ATTR = "_afinar_decode_sessions"  # where a model keeps its sessions (they die with it)
# AFINAR_COMPILE_MODE: torch.compile's mode for AFINAR_DECODE=compile (the whole decode step is compiled, then
# recorded as a CUDA graph by us, so inductor's own graphs stay off).
COMPILE_MODE_ENV = "AFINAR_COMPILE_MODE"
DEFAULT_COMPILE_MODE = "default"
# "static": the GPU path's StaticCache and fixed-width mask without graphs, anywhere (tests check it on the CPU).
MODES = ("auto", "eager", "graphs", "compile", "static")
# AFINAR_DECODE=eager|graphs|compile overrides "auto" (benchmarks and debugging).
MODE_ENV = "AFINAR_DECODE"

# A job that may decode at least this many tokens (questions x max_new_tokens) gets "compile" under "auto".
# Measured on the H200 (BENCHMARKS.md, issue 17): compiling costs ~18 s per batch shape and then saves
# 1/3,153 - 1/5,446 s per token in batches of 10, so it pays from ~133k tokens actually decoded; answers that stop
# at EOS decode fewer than their max_new_tokens, hence the margin. Not measured on other cards.
COMPILE_PAYS_OFF_TOKENS = 200_000

_broken: dict[str, str] = {}  # mode -> why it failed once in this process (never retried, one message)


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
    # The model's device decides the loop, not the inputs': _run moves the prompt to the model anyway.
    mode = resolve_mode(mode, None, model)
    if mode in ("graphs", "compile"):
        try:
            return _run(model, input_ids, attention_mask, max_new_tokens, repetition_penalty, stop_ids, pad_id,
                        on_tokens, mode)
        except Exception as err:  # noqa: BLE001 - any failure of the fast path falls back to the eager loop
            if _is_out_of_memory(err):
                model.__dict__.pop(SESSIONS_ATTR, None)  # free the cached shapes before the caller retries
                raise  # the caller halves the batch; eager would run out of memory as well
            _broken[mode] = f"{type(err).__name__}: {err}"
            log(f"Aviso: la generación rápida ({mode}) falló ({type(err).__name__}: {str(err)[:200]}); "
                "se sigue sin ella (más lenta, mismas respuestas).")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    return _run(model, input_ids, attention_mask, max_new_tokens, repetition_penalty, stop_ids, pad_id,
                on_tokens, "static" if mode == "static" else "eager")


def mode_for_job(decode_tokens: int) -> str:
    """The mode a job of this size asks for: "compile" when its compilation pays off, else "auto" (graphs)."""
    return "compile" if decode_tokens >= COMPILE_PAYS_OFF_TOKENS else "auto"


def resolve_mode(mode: str, device, model=None) -> str:
    """The loop actually used: graphs only on CUDA, and never a mode that already failed in this process."""
    requested = os.environ.get(MODE_ENV) or mode
    if requested not in MODES:
        raise ValueError(f"{MODE_ENV}/mode debe ser uno de {', '.join(MODES)} (se pidió {requested!r}).")
    device = device if device is not None else model_device(model)
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

    device = model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device).long()
    batch, width = input_ids.shape
    # "static" (no graphs) exists for the tests: the static-cache bookkeeping of the GPU path, checked on the CPU.
    if mode in ("graphs", "compile", "static"):
        return _run_static(model, input_ids, attention_mask, max_new_tokens, penalty, stop_ids, pad_id, on_tokens,
                           mode, device)
    # generate()'s positions: count of real tokens before each one, so left padding does not shift them.
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    # Generated positions are always attended (a finished row keeps attending its pads, as in generate()); the
    # mask grows by one column a step, exactly as generate() extends it.
    mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=1)
    prefill = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
    cache = prefill.past_key_values  # the same DynamicCache that generate() would make
    state = _State(batch, prefill.logits.shape[-1], max_new_tokens, device, penalty, stop_ids, pad_id)
    state.seen_prompt(input_ids)
    state.take(prefill.logits[:, -1].to(dtype=torch.float32))
    del prefill
    position = positions[:, -1:].clone()
    produced = 1
    streamed = 0
    while produced < max_new_tokens and not bool(state.done.all()):
        if on_tokens is not None:
            streamed = _stream(state, streamed, produced, on_tokens)
        position.add_(1)
        out = model(input_ids=state.token.view(batch, 1), attention_mask=mask[:, : width + produced],
                    position_ids=position, past_key_values=cache, use_cache=True, logits_to_keep=1)
        state.take(out.logits[:, -1].to(dtype=torch.float32))
        produced += 1
    if on_tokens is not None:
        _stream(state, streamed, produced, on_tokens)
    return state.out[:, :produced].cpu()


def _run_static(model, input_ids, attention_mask, max_new_tokens, penalty, stop_ids, pad_id, on_tokens, mode,
                device):
    """The GPU path: a reusable session (static cache, fixed buffers, one recorded decode step) per batch shape."""
    import torch

    batch, width = input_ids.shape
    total = -(-(width + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    session = _session(model, mode, batch, total, penalty, stop_ids, pad_id, device)
    if session.fused is not None:
        session.fused.refresh()
    positions = session.start(input_ids, attention_mask)
    prefill = model(input_ids=input_ids, attention_mask=session.mask, position_ids=positions,
                    past_key_values=session.cache, use_cache=True, logits_to_keep=1)
    logits = prefill.logits[:, -1].to(dtype=torch.float32)
    del prefill
    state = session.state_for(logits.shape[-1])
    state.seen_prompt(input_ids)
    state.take(logits)
    del logits

    produced = 1
    streamed = 0
    if device.type != "cuda" or mode == "static":
        while produced < max_new_tokens and not bool(state.done.all()):
            if on_tokens is not None:
                streamed = _stream(state, streamed, produced, on_tokens)
            session.step()
            produced += 1
        if on_tokens is not None:
            _stream(state, streamed, produced, on_tokens)
        return state.out[:, :produced].cpu()

    if session.replay is None and produced < max_new_tokens:
        # The recording does not run the step; the warm-up before it did (and compiled it, in "compile" mode).
        session.replay = _record(session.step, device)
        produced += 1
    since_check = 0
    while produced < max_new_tokens:
        if since_check >= STOP_CHECK_EVERY:
            since_check = 0
            if on_tokens is not None:
                streamed = _stream(state, streamed, produced, on_tokens)
            if bool(state.done.all()):
                break
        session.replay()
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


class _Session:
    """Static cache, mask, positions, decoding state and the recorded decode step of one batch shape.

    Every tensor the step reads or writes lives here at a fixed address, so the CUDA graph recorded by the first
    call is replayed by every later call of the same shape: a new call only copies its prompt's mask and positions
    in, resets the cache and runs its prefill. Recording (and, in "compile" mode, compiling) is paid once per shape
    and process, not once per question.
    """

    def __init__(self, model, mode, batch, total, penalty, stop_ids, pad_id, device):
        import torch
        from transformers import StaticCache

        self.model, self.batch, self.total, self.device = model, batch, total, device
        self.penalty, self.stop_ids, self.pad_id = penalty, stop_ids, pad_id
        self.cache = StaticCache(config=model.config, max_cache_len=total)
        self.mask = torch.ones(batch, total, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.state: _State | None = None
        self.replay: Callable[[], None] | None = None
        self.fused = _FusedProjections.of(model)
        self._decode = _compiled_step(self._step) if mode == "compile" else self._step

    def step(self) -> None:
        """One decode step; the fused projections are in place only while it runs (and while it is recorded)."""
        if self.fused is None:
            self._decode()
            return
        with self.fused.installed():
            self._decode()

    def start(self, input_ids, attention_mask):
        """Load a new prompt batch; returns its prefill positions."""
        width = input_ids.shape[1]
        self.cache.reset()
        # Generated positions are always attended (a finished row keeps attending its pads, as in generate());
        # the causal rule hides the slots not written yet. The full-width mask never changes during decoding.
        self.mask[:, :width].copy_(attention_mask)
        self.mask[:, width:].fill_(1)
        # generate()'s positions: count of real tokens before each one, so left padding does not shift them.
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.position.copy_(positions[:, -1:])
        if self.state is not None:
            self.state.reset()
        return positions

    def state_for(self, vocab: int) -> "_State":
        if self.state is None:
            self.state = _State(self.batch, vocab, self.total, self.device, self.penalty, self.stop_ids,
                                self.pad_id)
        return self.state

    def _step(self) -> None:
        self.position.add_(1)
        out = self.model(input_ids=self.state.token.view(self.batch, 1), attention_mask=self.mask,
                         position_ids=self.position, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.state.take(out.logits[:, -1].to(dtype=self.state.dtype))


# Model types whose attention calls q_proj, k_proj, v_proj (in that order) on one input and whose MLP calls
# gate_proj then up_proj on one input: the order _FusedProjections relies on.
FUSABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _FusedProjections:
    """q/k/v of each attention, and gate/up of each MLP, as one matrix product each while a session decodes.

    Decoding one token reads every weight once, and a small matrix product (k_proj and v_proj are 2048x512 on
    Llama-3.2-1B) takes a kernel launch and a few microseconds whatever its size: measured on the H200, q/k/v cost
    16 us a layer as three products and the step is ~300 kernels. One product over the concatenated weights
    reads the same bytes in one kernel. The first projection of a group computes the whole product and
    returns its slice; the next ones return theirs. The fused weights are copies (the model's own parameters
    are untouched, so saving, merging and training see nothing), held by the session: ~1.3 GB for a 1B model.
    """

    def __init__(self, groups):
        import torch

        # (module, its fused forward), made once: torch.compile guards on these function objects, so a session's
        # later calls (and the CUDA graph recording) must see the very same ones or it would compile again.
        self.forwards = []
        self.groups = []  # (the group's layers, their fused copy)
        for linears in groups:
            weight = torch.cat([linear.weight for linear in linears]).contiguous()
            sizes = [linear.out_features for linear in linears]
            slot = _Slot()
            self.forwards += [(linear, _group_slice(weight, sizes, index, slot)) for index, linear in enumerate(linears)]
            self.groups.append((linears, weight))
        self.versions = self._versions()

    def _versions(self) -> list[int]:
        return [linear.weight._version for linears, _ in self.groups for linear in linears]

    def refresh(self) -> None:
        """Copy the layers' weights again if any changed in place since (a recorded graph replays the copies,
        whereas the unfused layers it reads at their own addresses would already show the change)."""
        import torch

        now = self._versions()
        if now == self.versions:
            return
        with torch.inference_mode():  # the copies were made under inference mode; same addresses, graph still valid
            for linears, weight in self.groups:
                weight.copy_(torch.cat([linear.weight for linear in linears]))
        self.versions = now

    @classmethod
    def of(cls, model) -> "_FusedProjections | None":
        """The fused projections of a plain transformers model of a known layout; None for anything else."""
        import torch

        causal_lm = unwrap_peft(model)
        if getattr(getattr(causal_lm, "config", None), "model_type", None) not in FUSABLE_MODEL_TYPES:
            return None
        groups = []
        for module in causal_lm.modules():
            for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                linears = [getattr(module, name, None) for name in names]
                # Exactly torch's Linear without bias: a LoRA layer, a 4-bit layer or a bias takes another path.
                if all(type(linear) is torch.nn.Linear and linear.bias is None for linear in linears):
                    groups.append(linears)
        return cls(groups) if groups else None

    def installed(self):
        from contextlib import contextmanager

        @contextmanager
        def patched():
            try:
                for linear, forward in self.forwards:
                    linear.forward = forward
                yield
            finally:
                for linear, _ in self.forwards:
                    linear.__dict__.pop("forward", None)

        return patched()


class _Slot:
    """The slices of one fused product, between the call of the group's first projection and its last."""

    parts: list | None = None


def _group_slice(weight, sizes, index, slot):
    """The forward of member `index` of a fused group: the first computes the product, each returns its slice."""
    import torch

    def forward(x):
        if index == 0:
            slot.parts = list(torch.nn.functional.linear(x, weight).split(sizes, dim=-1))
        part = slot.parts[index]
        if index == len(sizes) - 1:
            slot.parts = None  # nothing stays alive past the group (nor becomes an output of the compiled step)
        return part

    return forward


def _session(model, mode, batch, total, penalty, stop_ids, pad_id, device) -> _Session:
    """The model's session for this shape and these settings (made on first use, least recently used dropped)."""
    from collections import OrderedDict

    sessions = model.__dict__.get(SESSIONS_ATTR)
    if sessions is None:
        sessions = OrderedDict()
        model.__dict__[SESSIONS_ATTR] = sessions  # dies with the model, not kept by this module
    compile_mode = os.environ.get(COMPILE_MODE_ENV, DEFAULT_COMPILE_MODE) if mode == "compile" else None
    key = (mode, compile_mode, batch, total, float(penalty), tuple(int(s) for s in stop_ids), int(pad_id), str(device))
    session = sessions.pop(key, None)
    if session is None:
        session = _Session(model, mode, batch, total, penalty, stop_ids, pad_id, device)
        while len(sessions) >= MAX_SESSIONS:
            sessions.popitem(last=False)
    sessions[key] = session
    return session


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
        self.dtype = torch.float32  # the penalty and the argmax work on fp32 logits, as generate()'s do

    def reset(self) -> None:
        """Ready for a new batch of the same shape, keeping every tensor at its address."""
        if self.seen is not None:
            self.seen.zero_()
        self.done.zero_()
        self.out.fill_(int(self.pad))
        self.count.zero_()

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
        # count never goes past the width of out here: the host runs at most max_new_tokens steps.
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


def _compiled_step(step: Callable[[], None]) -> Callable[[], None]:
    """The whole decode step (forward, penalty, argmax, stop and cache bookkeeping) as one compiled function.

    Inductor fuses the small kernels between the matrix products (norms, rotary, residuals, the penalty into the
    argmax); _record then records the fused kernels as one CUDA graph. Inductor's own CUDA graphs stay off (the
    "-no-cudagraphs" modes, or "default"): two graph layers would copy the inputs on every step.
    """
    import torch

    mode = os.environ.get(COMPILE_MODE_ENV, DEFAULT_COMPILE_MODE)
    if mode not in ("default", "max-autotune-no-cudagraphs"):
        raise ValueError(f"{COMPILE_MODE_ENV} debe ser default o max-autotune-no-cudagraphs (se pidió {mode!r}).")
    # One compilation per session (shape); the default limit of 8 would silently fall back to eager later on.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    fullgraph = os.environ.get("AFINAR_COMPILE_FULLGRAPH", "1") != "0"  # 0: let dynamo split the step (debugging)
    return torch.compile(step, mode=None if mode == "default" else mode, dynamic=False, fullgraph=fullgraph)


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


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
