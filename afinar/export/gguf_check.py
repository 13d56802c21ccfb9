"""The GGUF verifier: each written file is read back with transformers' GGUF loader and compared with the
merged model (logits, tokenizer, chat template, rope factors) before it gets its final name.

The reader patch (`fast_gguf_reading`) lives here too: it only serves this check.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from afinar.core.errors import UserError
from afinar.export import verify


class GgufChecker:
    """Compares each GGUF file, read back by transformers, with the merged model (logits computed once)."""

    def __init__(self, model_dir: Path, tokenizer, config, vocab: dict[str, Any], rope: dict[str, Any],
                 head_dim: int):
        self.model_dir = model_dir
        self.rope = rope  # the writer's reading of the config's rope (gguf_export.rope_parameters)
        self.head_dim = head_dim
        self.tokenizer = tokenizer
        self.config = config
        self.vocab = vocab
        self.inputs = verify.verification_inputs(tokenizer)
        self._reference = None

    def reference(self):
        if self._reference is None:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            model.eval()
            self._reference = verify.compute_logits(model, self.inputs)
        return self._reference

    def check(self, path: Path, name: str, out) -> dict[str, Any]:
        """Check the file at `path`, to be called `name`, written with GGUF type `out` (its bounds)."""
        reference = self.reference()
        with fast_gguf_reading():
            metadata = self._check_metadata(path, out)
            tokenizer_ok = self._check_tokenizer(path)
            model = self._load_gguf_model(path)
        result = verify.compare_logits(reference, verify.compute_logits(model, self.inputs))
        del model
        result.update({
            "max_relative_diff_allowed": out.max_relative_diff,
            "min_top1_agreement": out.min_top1,
            "prompts": len(self.inputs),
            "tokenizer_ids_match": tokenizer_ok,
            **metadata,
        })
        problems = []
        if not result["relative_max_diff"] <= out.max_relative_diff:
            problems.append(
                f"diferencia máxima de logits {result['max_abs_logit_diff']:.4g} = "
                f"{result['relative_max_diff']:.3g} × "
                f"desviación típica, por encima de {out.max_relative_diff}"
            )
        if result["top1_agreement"] < out.min_top1:
            problems.append(
                f"el token más probable coincide en el {result['top1_agreement']:.1%} de las posiciones "
                f"(mínimo {out.min_top1:.0%})"
            )
        if not tokenizer_ok:
            problems.append("el tokenizador leído del GGUF no da los mismos ids que el original")
        if problems:
            raise UserError(
                f"El fichero {name} no reproduce el modelo fusionado: {'; '.join(problems)}."
            )
        return result

    def _check_metadata(self, path: Path, out) -> dict[str, Any]:
        import gguf

        reader = gguf.GGUFReader(path)
        field = reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        template = field.contents() if field is not None else None
        if template != self.vocab["chat_template"]:
            raise UserError(f"{path.name}: la plantilla de chat no se guardó bien en los metadatos GGUF.")
        f32 = gguf.GGMLQuantizationType.F32
        not_f32 = [t.name for t in reader.tensors if len(t.shape) == 1 and t.tensor_type != f32]
        if not_f32:
            raise UserError(f"{path.name}: tensores 1-D que no están en F32: {', '.join(not_f32[:3])}.")
        rope_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        rope_tensor = next((t for t in reader.tensors if t.name == rope_name), None)
        rope_ok = None
        if self.rope["rope_type"] == "llama3":
            expected = _transformers_llama3_factors(self.config, self.rope, self.head_dim)
            rope_ok = rope_tensor is not None and bool(
                np.allclose(np.asarray(rope_tensor.data, dtype=np.float32), expected, rtol=1e-5)
            )
            if not rope_ok:
                raise UserError(
                    f"{path.name}: falta rope_freqs.weight o no coincide con el escalado llama3 del modelo."
                )
        elif rope_tensor is not None:
            raise UserError(f"{path.name}: tiene rope_freqs.weight pero el modelo no usa el escalado llama3.")
        counts: dict[str, int] = {}
        for t in reader.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return {"tensor_types": counts, "tensors": len(reader.tensors), "rope_freqs_ok": rope_ok,
                "chat_template": True, "pre_tokenizer": self.vocab["pre"]}

    def _check_tokenizer(self, path: Path) -> bool:
        from transformers import AutoTokenizer

        read_back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return verify.verification_inputs(read_back) == self.inputs

    def _load_gguf_model(self, path: Path):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        rope = self.rope
        if rope["rope_type"] != "default":
            # transformers' GGUF reader ignores rope_freqs/rope scaling keys; its values were checked
            # above, so the model is given the merged model's rope to compare the rest of the file.
            config.rope_parameters = dict(rope)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=torch.float32
        )
        model.eval()
        return model


@contextmanager
def fast_gguf_reading() -> Iterator[None]:
    """Parse each GGUF file, and build each tensor-name map, once while a file is being checked.

    transformers builds a new gguf.GGUFReader for the config, the tokenizer and the weights (each parse
    of a 50k-token vocabulary costs seconds of Python), and a new TensorNameMap for every submodule of
    the model (hundreds). Both are read-only once built, so sharing them changes nothing but the time.
    """
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}
    maps: dict[tuple[Any, int], Any] = {}

    def shared_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    def shared_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[(arch, n_blocks)] = original_map(arch, n_blocks)
        return maps[(arch, n_blocks)]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, shared_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def _transformers_llama3_factors(config, rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """The same divisors, derived from transformers' own llama3 rope (an independent implementation)."""
    import copy

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](copy.deepcopy(config), "cpu")
    default = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return (default / scaled.double().numpy()).astype(np.float32)
