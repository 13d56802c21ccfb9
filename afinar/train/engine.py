"""Which training engine runs stage 03, and the settings it picks from the card's memory and capability.

Three engines train the same PEFT LoRA adapter (same keys, same file):
- "compiled": transformers + PEFT, a frozen 16-bit base (bf16, or fp16 on cards without bf16 such as the
  T4), order-preserving packing with flex attention (sparse document masks) and every decoder layer compiled
  with torch.compile (fused element-wise work around the matmuls). A 4-bit base is dequantized once: QLoRA
  dequantizes the same nf4 values on every forward, so the numbers are the same and only the repeated work
  goes away; it costs ~2.5 GB for a 1B model, which fits a 16 GB card with rows of 2048 tokens (BENCHMARKS.md).
  Where a kernel of this path does not run on the card (flex attention's Triton templates need more shared
  memory than some older cards have), the first step falls back to SDPA, then to uncompiled layers.
- "unsloth": Unsloth's kernels, for cards below COMPILED_MIN_GIB: its offloaded gradient checkpointing keeps
  a 1B model within a few GiB.
- "eager": transformers + PEFT without compiling (CPU, and any GPU when asked).

On cards with row-wise scaled FP8 matmuls (Hopper and newer) the compiled engine also runs the frozen base's
products in e4m3 (afinar.train.fp8), after checking on the user's own rows that the loss moves by less than 1 %.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from afinar.core.environment import DeviceInfo
from afinar.core.errors import UserError
from afinar.core.models import free_gpu_memory, unwrap_peft

ENGINES = ("auto", "unsloth", "compiled", "eager")
# A 16 GB T4 reports ~14.7 GiB. Below this, Unsloth (12 GB cards and smaller).
COMPILED_MIN_GIB = 14.0
# Triton (torch.compile, flex attention) generates code for compute capability 7.5 (T4) and newer.
COMPILED_MIN_CAPABILITY = (7, 5)
# The share of the card a plan may fill: a 16 GB card must stay under 12 GiB (the rest goes to the CUDA
# context, the allocator's fragmentation and whatever else the notebook holds).
MEMORY_SHARE = 0.8
# Measured on an H200 at Llama-3.2-1B shape (bench/bench_gpu_train.py, compiled engine): activation memory per
# token of a training step (rounded up), with and without gradient checkpointing, and what the weights, the
# optimizer and the loss tiles add. With checkpointing: 9.45 GiB peak for 16 rows of 2048, 17.7 GiB for 32
# with the FP8 base; without: 86.7 GiB for 32 rows (2026-12-02).
ACTIVATION_GIB_PER_TOKEN = 0.25 / 1024
ACTIVATION_GIB_PER_TOKEN_NO_CHECKPOINTING = 1.35 / 1024
FIXED_GIB = 4.0
# Checkpointing recomputes each layer's forward in the backward: without it a step did 31 % more tokens a
# second on the H200 (68,747 -> 90,255 at 32 rows, same call). It is worth its memory where at least this many
# rows fit without it; below that (16 GB cards: 2 rows) the per-step overhead would eat the gain, and the
# checkpointed plan is the one measured there.
MIN_ROWS_WITHOUT_CHECKPOINTING = 16
# 32 rows of 2048 on an H200: +2.7 % over 16 rows with the FP8 base, 17.7 GiB (BENCHMARKS.md); beyond that
# the step is already bound by the matmuls.
MAX_TOKENS_PER_STEP = 65536
# On a CPU every padded slot costs as much as a real token. Letting an example go back to fill the gap of one of
# the last 4 rows cuts tu_dataset.json's train split from 39 to 34 steps an epoch and its padded slots from 14.3 %
# to 7.2 % (prepare() + build_dataset() at 640 tokens); the long/short interleaving survives at that scale.
CPU_OPEN_ROWS = 4
# A small dataset packs into few rows: keep at least this many optimizer steps per epoch rather than
# filling the card (tu_dataset.json is ~30 rows of 2048 tokens: 16 rows a step would make 2 steps an epoch).
MIN_STEPS_PER_EPOCH = 20


@dataclass
class Plan:
    engine: str
    backend: str
    batch_size: int
    packing: bool
    gradient_checkpointing: bool
    dequantize_4bit: bool = False
    attn_implementation: str | None = None
    compile_layers: bool = False
    open_rows: int = 1  # afinar.train.packing.pack_in_order: rows an example may go back to fill
    share_prefix: bool = False  # afinar.train.packing: the examples' common leading tokens once per row
    fp8_base: bool = False  # afinar.train.fp8: the frozen base's matmuls in e4m3
    fp8_drift: float | None = None  # relative change of the loss on the user's rows, measured before training
    precision: str | None = None  # the compiled engine's base and autocast dtype: bf16, or fp16 without bf16
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def trainer_checkpointing(self) -> bool | None:
        """What SFTConfig gets: the plan's choice, or None for Unsloth, which checkpoints its own way."""
        return None if self.engine == "unsloth" else self.gradient_checkpointing


def _compiled_batch(memory_gib: float, max_seq_length: int, per_token: float = ACTIVATION_GIB_PER_TOKEN) -> int:
    """Rows per step that fit in MEMORY_SHARE of the card (0 when none does), capped at MAX_TOKENS_PER_STEP."""
    row = max(max_seq_length, 1)
    budget = max(memory_gib * MEMORY_SHARE - FIXED_GIB, 0.0)
    rows = int(budget / (row * per_token))
    return min(rows, max(MAX_TOKENS_PER_STEP // row, 1))


def plan(settings: dict[str, Any], device: DeviceInfo, requested: str = "auto",
         memory_gib: float | None = None, packed_rows: int | None = None) -> Plan:
    """Pick the engine and fill in what the user left on automatic (batch_size / packing = None)."""
    if requested not in ENGINES:
        raise UserError(f"--engine {requested}: debe ser uno de {', '.join(ENGINES)}.")
    memory = memory_gib if memory_gib is not None else (device.memory_gib or 0.0)
    batch, packing, want_fp8 = settings.get("batch_size"), settings.get("packing"), settings.get("fp8")
    reasons: list[str] = []
    if device.kind != "cuda":
        if requested in ("unsloth", "compiled"):
            raise UserError(f"--engine {requested} necesita una GPU con CUDA; en CPU se entrena con --engine eager.")
        if want_fp8:
            raise UserError("--fp8 necesita una GPU con multiplicaciones FP8 (Hopper o posterior) y el motor "
                            "compilado; en CPU se entrena sin --fp8.")
        return Plan("eager", "hf", batch or 1, True if packing is None else packing, False,
                    open_rows=CPU_OPEN_ROWS, share_prefix=True, reasons=["CPU: transformers + PEFT sin compilar"])

    engine = requested
    if engine == "auto":
        if memory >= COMPILED_MIN_GIB and compiles_here(device):
            engine = "compiled"
            reasons.append(f"GPU de {memory:.0f} GiB{'' if device.bf16 else ' sin bf16 (fp16)'}: motor compilado "
                           f"con empaquetado (el más rápido medido, también en el plan de 16 GB)")
        elif settings.get("backend") == "unsloth":
            engine = "unsloth"
            reasons.append(f"GPU de {memory:.0f} GiB{'' if device.bf16 else ' sin bf16'}: Unsloth, la opción de "
                           f"menos memoria")
        else:
            engine = "eager"
            reasons.append("transformers + PEFT sin compilar (la etapa 02 eligió --backend hf)")
    if engine == "compiled" and not compiles_here(device):
        raise UserError(f"--engine compiled necesita una GPU de capacidad 7.5 o más (T4 en adelante) y "
                        f"{device.name} tiene {device.capability}: usa --engine unsloth.")

    if want_fp8 and engine != "compiled":
        raise UserError(f"--fp8 solo existe en el motor compilado y este entrenamiento usa {engine}: quita --fp8 "
                        f"o pide --engine compiled (GPU con bf16 y FP8: Hopper o posterior).")

    if engine == "compiled":
        from afinar.train import fp8  # delayed: fp8 imports torch, and planning must stay cheap (03 --check-data)

        fp8_runs_here = fp8.supported(device.capability)
        fp8_base = fp8_runs_here if want_fp8 is None else want_fp8
        if want_fp8 and not fp8_runs_here:
            raise UserError(f"--fp8: la GPU {device.name} (capacidad {device.capability}) no multiplica en FP8 con "
                            f"escala por fila; hace falta Hopper (9.0) o posterior. Quita --fp8.")
        if fp8_base:
            reasons.append("FP8 automático: las multiplicaciones de la base congelada en e4m3 (capacidad "
                           f"{device.capability}); LoRA, normas, atención y pérdida siguen en bf16"
                           if want_fp8 is None else "--fp8: multiplicaciones de la base congelada en e4m3")
        length = settings["max_seq_length"]
        # The rows a step should have: the user's, or as many as MAX_TOKENS_PER_STEP, fewer for small data.
        wanted = batch or max(MAX_TOKENS_PER_STEP // max(length, 1), 1)
        if not batch and packed_rows and packed_rows // MIN_STEPS_PER_EPOCH < wanted:
            wanted = max(1, packed_rows // MIN_STEPS_PER_EPOCH)
            reasons.append(f"los datos caben en {packed_rows} filas: lote de hasta {wanted} para dar al menos "
                           f"{MIN_STEPS_PER_EPOCH} pasos por época")
        fit_plain = _compiled_batch(memory, length, ACTIVATION_GIB_PER_TOKEN_NO_CHECKPOINTING)
        checkpointing = fit_plain < (wanted if batch else min(wanted, MIN_ROWS_WITHOUT_CHECKPOINTING))
        fit = max(1, _compiled_batch(memory, length) if checkpointing else fit_plain)
        share = f"el {MEMORY_SHARE * 100:.0f} % de {memory:.0f} GiB"
        if checkpointing:
            reasons.append(f"checkpointing de gradientes: sin él solo caben {fit_plain} filas de {length} tokens en "
                           f"{share} (la base descuantizada ocupa ~2,5 GB en un modelo 1B)")
        else:
            reasons.append(f"sin checkpointing de gradientes: {fit_plain} filas de {length} tokens caben en {share} "
                           f"sin recalcular nada (+31 % medido en la H200, BENCHMARKS.md)")
        if not batch:
            auto_batch = min(wanted, fit)
            reasons.append(f"lote automático: {auto_batch} filas de hasta {length} tokens")
        return Plan("compiled", "hf", batch or auto_batch, True if packing is None else packing, checkpointing,
                    dequantize_4bit=bool(settings.get("load_in_4bit")), attn_implementation="flex_attention",
                    compile_layers=True, open_rows=8, fp8_base=fp8_base,
                    precision="bf16" if device.bf16 else "fp16", reasons=reasons)
    # Unsloth and eager on a GPU: the seed's recipe, padded batches of 8. Unsloth checkpoints (offloaded) below
    # 24 GiB: a 16 GB card must stay under 12 GiB with rows of 2048 tokens. Eager keeps TRL's checkpointing,
    # as every GPU measurement of it did.
    checkpointing = memory < 24 or engine == "eager"
    if checkpointing:
        reasons.append(f"{memory:.0f} GiB: checkpointing de gradientes activado para no pasar de 12 GiB"
                       if engine == "unsloth" else "checkpointing de gradientes (el valor por defecto de TRL)")
    return Plan(engine, "unsloth" if engine == "unsloth" else "hf", batch or 8, False if packing is None else packing,
                checkpointing, reasons=reasons)


def compiles_here(device: DeviceInfo) -> bool:
    if device.kind != "cuda" or not device.capability:
        return False
    major, minor = (int(part) for part in device.capability.split(".")[:2])
    return (major, minor) >= COMPILED_MIN_CAPABILITY


def dequantize_4bit_(model, dtype=None) -> int:
    """Replace every bitsandbytes 4-bit Linear by a 16-bit nn.Linear (bf16 unless `dtype`) holding the same
    dequantized values."""
    import torch
    from torch import nn

    dtype = dtype or torch.bfloat16
    replaced = 0
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None:
            continue
        import bitsandbytes.functional as bnb_f

        dense = bnb_f.dequantize_4bit(weight.data, state).to(dtype)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=dense.device, dtype=dtype)
        linear.weight = nn.Parameter(dense, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    if replaced:
        # The model is no longer a 4-bit model: PEFT must not prepare it as one (no fp32 upcast of norms).
        # (what transformers' own remove_quantization_config does, plus the 4-bit flag PEFT reads).
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.is_loaded_in_4bit = False
        for module in model.modules():
            if getattr(getattr(module, "config", None), "_is_quantized", False):
                module.config._is_quantized = False
        free_gpu_memory()  # the packed 4-bit copies are gone
    return replaced


def percent(value: float) -> str:
    """A loss change as Spanish readers write it: 0,14 %."""
    return f"{value * 100:.2f} %".replace(".", ",")


def prepare_model_(model, plan: Plan, probe_rows: list[dict]) -> None:
    """What the plan does to a built PEFT model before training: e4m3 base (checked), compiled layers."""
    if plan.fp8_base:
        _use_fp8_if_it_holds_(model, plan, probe_rows)
    if plan.compile_layers:
        compile_layers_(model)


def _use_fp8_if_it_holds_(model, plan: Plan, probe_rows: list[dict]) -> None:
    from afinar.train import fp8  # delayed: fp8 imports torch (see plan)

    def fall_back(why: str) -> None:
        fp8.use_bf16_base_(model)
        plan.fp8_base = False
        plan.reasons.append(f"FP8 descartado: {why}; se entrena en bf16")

    fp8.use_fp8_base_(model)
    try:
        fp8_loss, bf16_loss = fp8.loss_drift(model, probe_rows)
    except (RuntimeError, NotImplementedError) as err:
        # A card newer than the ones measured whose torch build lacks row-wise e4m3 matmuls.
        fall_back(f"esta GPU no pudo multiplicar en e4m3 ({str(err)[:120]})")
        return
    plan.fp8_drift = round(fp8.relative_drift(fp8_loss, bf16_loss), 5)
    limit = f"límite {percent(fp8.MAX_LOSS_DRIFT)}"
    if plan.fp8_drift > fp8.MAX_LOSS_DRIFT:
        fall_back(f"en {len(probe_rows)} ejemplos tuyos la pérdida cambia un {percent(plan.fp8_drift)} ({limit})")
    else:
        plan.reasons.append(f"FP8 comprobado en {len(probe_rows)} ejemplos tuyos: pérdida {fp8_loss:.4f} frente "
                            f"a {bf16_loss:.4f} en bf16 (cambio {percent(plan.fp8_drift)}, {limit})")


def decoder_layers(model):
    inner = unwrap_peft(model)
    return inner.model.layers


def uncompile_layers_(model) -> None:
    """Undo compile_layers_: each layer runs its plain forward again."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None  # what nn.Module.compile sets; None = the eager forward


def kernel_fallback(model, plan: Plan):
    """For the trainer's first step: a function that, given the error of a kernel this card cannot run, moves
    the plan one step down (flex attention -> SDPA -> uncompiled layers) and says so, or returns False when
    nothing is left to drop. None when the plan uses neither compiled layers nor flex attention.

    Flex attention's Triton templates need more shared memory than some cards have (a T4 has 64 KiB per
    block; pytorch/pytorch#133254), which only shows when the kernels are compiled for the real shapes, that
    is, in the first step.
    """
    if not plan.compile_layers and plan.attn_implementation != "flex_attention":
        return None

    def fall_back(err: BaseException) -> bool:
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        if plan.attn_implementation == "flex_attention":
            inner = unwrap_peft(model)
            inner.set_attn_implementation("sdpa")  # packed rows keep their position_ids: same document masks
            plan.attn_implementation = "sdpa"
            instead = "atención SDPA (máscaras densas, más lenta) en lugar de flex"
        elif plan.compile_layers:
            uncompile_layers_(model)
            plan.compile_layers = False
            instead = "capas sin compilar"
        else:
            return False
        note = (f"Aviso: esta GPU no pudo ejecutar el primer paso ({type(err).__name__}: {first_line}); "
                f"se sigue con {instead}.")
        print(note, flush=True)
        plan.reasons.append(note)
        return True

    return fall_back


def compile_layers_(model) -> int:
    """torch.compile each decoder layer in place: identical layers share one compiled graph."""
    import torch

    # Packed batches change the document layout every step; allow the few shape variants to compile once.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)
