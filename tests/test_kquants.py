"""K-quants (Q4_K, Q5_K, Q6_K) against llama.cpp's own quantizer, and llama-quantize's tensor-type mix.

How tests/fixtures/kquants_reference.json was produced (the program is not part of the project):
ggml's C sources at ggml-org/ggml commit d99724f2b141fed9e1a9f402213506c081433465 (the `ggml/`
directory llama.cpp vendors) were compiled with `gcc -O2` (x86-64, no -march, so no FMA contraction,
as ggml-base is built) together with a 20-line main() that reads float32 values from stdin and
writes what `quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`, `quantize_row_q6_K_ref`,
`quantize_row_q4_0_ref`, `quantize_row_q5_0_ref`, `quantize_row_q5_1_ref` and
`quantize_row_q8_0_ref` return (the functions `llama-quantize` calls through `ggml_quantize_chunk`
when no importance matrix is given). The inputs, 4 super-blocks of 256 values per case, are stored in
the fixture: standard normal values, heavy tails (Student t, 2 degrees of freedom), bf16-rounded
weights like a merged checkpoint's (many exact ties for rounding), and edge blocks (all zeros, all
equal, one zero sub-block, all positive).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from afinar.export import gguf_export, kquants

FIXTURE = Path(__file__).parent / "fixtures" / "kquants_reference.json"
REFERENCE = json.loads(FIXTURE.read_text())
CASES = sorted(REFERENCE["cases"])
TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
Q = gguf.GGMLQuantizationType


def _case(name: str) -> tuple[np.ndarray, dict[str, bytes]]:
    case = REFERENCE["cases"][name]
    values = np.frombuffer(base64.b64decode(case["input_f32_base64"]), dtype=np.float32)
    return values, {t: base64.b64decode(v) for t, v in case["expected_base64"].items()}


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("case", CASES)
def test_blocks_match_llama_cpp_reference_quantizer(case, type_name):
    values, expected = _case(case)
    # Two rows of 512 values, as the exporter passes a weight matrix.
    ours = gguf_export.quantize(values.reshape(2, 512), Q[type_name])
    assert ours.dtype == np.uint8 and ours.shape[0] == 2
    assert ours.tobytes() == expected[type_name]


def test_fixture_covers_the_tricky_blocks():
    values, expected = _case("edge_zero_flat_positive")
    assert not values[:256].any() and np.all(values[256:512] == 1.5) and not values[512:544].any()
    assert np.all(values[768:] > 0)
    # The all-zero super-block is all-zero bytes in Q6_K (ggml clears it) and has zero scales in Q4_K.
    assert expected["Q6_K"][:210] == bytes(210)
    assert expected["Q4_K"][:4] == bytes(4)


@pytest.mark.parametrize("type_name,max_rmse", [("Q4_K", 0.08), ("Q5_K", 0.04), ("Q6_K", 0.02)])
def test_gguf_dequantizer_reads_back_close_values(type_name, max_rmse):
    values = np.random.default_rng(7).standard_normal((48, 1024)).astype(np.float32)
    packed = kquants.quantize(values, type_name)
    _, type_size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    assert packed.shape == (48, 1024 // 256 * type_size)
    restored = gguf.quants.dequantize(packed, Q[type_name])
    error = restored - values
    # Measured 0.072, 0.036 and 0.018 for unit-variance values: about halving per extra bit.
    assert float(np.sqrt(np.mean(error ** 2))) < max_rmse
    assert restored.shape == values.shape


def test_result_does_not_depend_on_chunks_or_threads(monkeypatch):
    values = np.random.default_rng(3).standard_normal((10, 768)).astype(np.float32)
    whole = {t: kquants.quantize(values, t, threads=1) for t in kquants.BLOCK_BYTES}
    monkeypatch.setattr(kquants, "CHUNK_SUPER_BLOCKS", 4)  # 30 super-blocks → 8 chunks
    for type_name, expected in whole.items():
        assert np.array_equal(kquants.quantize(values, type_name, threads=3), expected)


def test_sums_add_positions_in_c_order():
    # The byte-exact match relies on numpy summing axis 0 row after row (not pairwise) in float32.
    rng = np.random.default_rng(5)
    terms = (rng.standard_normal((32, 5000)) * np.exp(rng.uniform(-8, 8, (32, 5000)))).astype(np.float32)
    expected = np.zeros(5000, dtype=np.float32)
    for row in terms:
        expected += row
    assert np.array_equal(kquants._sequential_sum(terms), expected)


def test_rows_must_fill_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(np.zeros((2, 576), dtype=np.float32), "Q4_K")


# -------------------------------------------------------------------------------- tensor-type mix


def _plans(layers: int, hidden: int, intermediate: int, kv_out: int, vocab: int, tied: bool = True):
    plans = [gguf_export._TensorPlan("e", "token_embd.weight", (vocab, hidden)),
             gguf_export._TensorPlan("n", "output_norm.weight", (hidden,))]
    if not tied:
        plans.append(gguf_export._TensorPlan("o", "output.weight", (vocab, hidden)))
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_out, hidden)),
                            ("attn_v", (kv_out, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (intermediate, hidden)), ("ffn_up", (intermediate, hidden)),
                            ("ffn_down", (hidden, intermediate)), ("attn_norm", (hidden,)),
                            ("ffn_norm", (hidden,))):
            plans.append(gguf_export._TensorPlan(f"{i}{name}", f"blk.{i}.{name}.weight", shape))
    return plans[::-1]  # any input order: the mix follows llama.cpp's own order


def _types(out_type: str, plans, layers: int, heads: int = 32, kv_heads: int = 8):
    chosen = gguf_export.tensor_types(plans, gguf_export._out_types()[out_type], layers, heads, kv_heads)
    return {name: qtype.name for name, qtype in chosen.items()}


def test_use_more_bits_layers():
    assert [i for i in range(16) if gguf_export.use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(30) if gguf_export.use_more_bits(i, 30)] == \
        [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_q4_k_m_mix_of_llama_3_2_1b():
    types = _types("q4_k_m", _plans(16, 2048, 8192, 512, 128256), 16)
    more_bits = {0, 1, 4, 7, 10, 13, 14, 15}
    assert types["token_embd.weight"] == "Q6_K"  # tied: it is also the output matrix
    assert types["output_norm.weight"] == "F32"
    for i in range(16):
        assert types[f"blk.{i}.attn_v.weight"] == ("Q6_K" if i in more_bits else "Q4_K")
        assert types[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more_bits else "Q4_K")
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{name}.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"
    q5 = _types("q5_k_m", _plans(16, 2048, 8192, 512, 128256), 16)
    assert q5["blk.0.attn_v.weight"] == "Q6_K" and q5["blk.2.attn_v.weight"] == "Q5_K"
    assert q5["blk.3.ffn_gate.weight"] == "Q5_K" and q5["token_embd.weight"] == "Q6_K"


def test_smollm2_rows_of_576_fall_back_like_llama_cpp():
    plans = _plans(30, 576, 1536, 192, 49152)
    types = _types("q4_k_m", plans, 30, 9, 3)
    assert types["token_embd.weight"] == "Q8_0"  # 576 is not a multiple of 256
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.3.attn_v.weight"] == "Q5_0"  # Q6_K, Q4_K → …
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.3.ffn_down.weight"] == "Q4_K"  # 1536 = 6×256
    assert {types[f"blk.7.{n}.weight"] for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} == {"Q5_0"}
    q5 = _types("q5_k_m", plans, 30, 9, 3)
    assert q5["blk.3.attn_q.weight"] == "Q5_1" and q5["blk.3.ffn_down.weight"] == "Q5_K"
    q4_0 = _types("q4_0", plans, 30, 9, 3)
    assert q4_0["token_embd.weight"] == "Q8_0"  # Q6_K would not fit either
    assert q4_0["blk.0.attn_v.weight"] == "Q4_0" and q4_0["blk.0.ffn_down.weight"] == "Q4_0"


def test_untied_output_and_plain_types():
    plans = _plans(16, 2048, 8192, 512, 128256, tied=False)
    types = _types("q4_k_m", plans, 16)
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    q4_0 = _types("q4_0", plans, 16)
    assert q4_0["output.weight"] == "Q6_K" and q4_0["token_embd.weight"] == "Q4_0"
    assert q4_0["blk.0.attn_v.weight"] == "Q4_0"  # the _M layer rule is only for K mixes
    assert _types("q8_0", plans, 16)["output.weight"] == "Q8_0"


def test_llama_order_is_loader_order():
    names = [p.name for p in gguf_export.llama_order(_plans(12, 256, 512, 64, 100))]
    assert names[:2] == ["output_norm.weight", "token_embd.weight"]
    assert names.index("blk.2.attn_q.weight") < names.index("blk.10.attn_k.weight")
    assert names[2:11] == sorted(n for n in names if n.startswith("blk.0."))


# ------------------------------------------------------------------------------------ the 04 option


def test_unknown_gguf_type_stops_stage_04_before_any_heavy_work(tmp_path):
    import subprocess
    import sys

    from afinar.core import manifest
    from afinar.core.layout import OutputLayout

    layout = OutputLayout.at(tmp_path / "salida")
    layout.root.mkdir(parents=True)
    manifest.write(layout, {"model": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                            "settings": {"seed": 42, "precision": "fp32"},
                            "stages": {"load": {"status": "done"}, "train": {"status": "done"}}})
    script = Path(__file__).resolve().parents[1] / "04_inference_and_export.py"
    proc = subprocess.run([sys.executable, str(script), "--output-dir", str(layout.root), "--gguf", "q4_k_m,q4_k"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--gguf" in proc.stderr and "q4_k" in proc.stderr and "q4_k_m" in proc.stderr  # names the option
    assert "Cargando el modelo" not in proc.stdout  # stopped before loading anything
    assert sorted(p.name for p in layout.root.iterdir()) == ["run.json"]


def test_gguf_option_values(capsys):
    from afinar.stages.stage_export import _gguf_formats

    assert _gguf_formats("Q4_K_M, q8_0") == ["q4_k_m", "q8_0"]
    assert _gguf_formats("none") == []
    # An unknown type is refused once, by the parser, before the stage runs (exit 2, naming the option).
    script = _load_04()
    assert script.parse_args(["--gguf", "q4_k_m,q8_0"]).gguf == "q4_k_m,q8_0"
    with pytest.raises(SystemExit) as stopped:
        script.parse_args(["--gguf", "q4_k_s"])
    assert stopped.value.code == 2 and "--gguf" in capsys.readouterr().err


def _load_04():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "04_inference_and_export.py"
    spec = importlib.util.spec_from_file_location("script_04_for_kquants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modelfile_and_model_card_name_the_type(tmp_path):
    from afinar.export.model_card import render_model_card
    from afinar.export.modelfile import modelfile_text

    text = modelfile_text("./model-q4_k_m.gguf", "chatml", gguf_type=gguf_export.TYPE_DESCRIPTIONS["q4_k_m"])
    assert text.startswith("FROM ./model-q4_k_m.gguf\n# Tipo GGUF: Q4_K_M: ")
    assert "# Tipo GGUF" not in modelfile_text("./model-q8_0.gguf", "chatml")
    (tmp_path / "model-q4_k_m.gguf").write_bytes(b"GGUF" + bytes(1_000_000))
    (tmp_path / "model-q8_0.gguf").write_bytes(b"GGUF" + bytes(2_000_000))
    (tmp_path / "Modelfile").write_text(text)
    card = render_model_card(tmp_path, kind="gguf", manifest={"model": {"base_model": "smollm2-135m"}})
    assert "- `model-q4_k_m.gguf` (1.0 MB) — Q4_K_M: 4,5 bits por peso en la mayoría" in card
    assert "- `model-q8_0.gguf` (2.0 MB) — Q8_0: 8,5 bits por peso" in card
    assert "# Tipo GGUF: Q4_K_M" in card  # the Modelfile shown in the card
