"""GGUF files (`pyramoe.inference.gguf`): a tiny llama/Mixtral-style GGUF written with the `gguf`
package's writer from one of our models (q/k rows permuted as llama.cpp's converter does, Q4_0
matrices, a Q8_0 output layer, F32 norms and router) loads back with its Q4_0 weights exactly, its
logits close to our own int4 model's, and the native step equal to the PyTorch step on it."""

from __future__ import annotations

import numpy as np
import pytest
import test_native_decode as native_cases
import torch

from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.gguf import load_gguf, permute_rope_rows, unpermute_rope_rows
from pyramoe.inference.native import layout_of, load_library
from pyramoe.inference.packing import quantize_model

gguf = pytest.importorskip("gguf")
CONFIG = native_cases._llama(moe={"gate_norm": "after_drop"})  # llama.cpp renormalises the top-k weights


def _write(model, path, head_type=None, extra=None):
    """`extra(writer)` adds more metadata (a tokenizer)."""
    kind = gguf.GGMLQuantizationType
    head_type = head_type or kind.Q8_0
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.d_model // cfg.n_heads)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_eps)
    writer.add_expert_count(8)
    writer.add_expert_used_count(2)

    def put(name, tensor, qtype=kind.F32):
        array = tensor.detach().float().numpy()
        if qtype != kind.F32:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array))

    put("token_embd.weight", model.tok_emb.weight)
    put("output_norm.weight", model.ln_f.weight)
    put("output.weight", model.lm_head.weight, head_type)
    q4 = kind.Q4_0
    d, heads, kv = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
    for i, block in enumerate(model.blocks):
        put(f"blk.{i}.attn_norm.weight", block.ln_attn.weight)
        put(f"blk.{i}.ffn_norm.weight", block.ln_ffn.weight)
        q, k, v = block.attn.qkv.weight.split([d, d // heads * kv, d // heads * kv])
        put(f"blk.{i}.attn_q.weight", permute_rope_rows(q, heads), q4)
        put(f"blk.{i}.attn_k.weight", permute_rope_rows(k, kv), q4)
        put(f"blk.{i}.attn_v.weight", v, q4)
        put(f"blk.{i}.attn_output.weight", block.attn.proj.weight, q4)
        if block.is_moe:
            experts = block.ffn.experts
            gate, up = experts.w_in.chunk(2, dim=1)
            put(f"blk.{i}.ffn_gate_inp.weight", block.ffn.router.weight)
            put(f"blk.{i}.ffn_gate_exps.weight", gate, q4)
            put(f"blk.{i}.ffn_up_exps.weight", up, q4)
            put(f"blk.{i}.ffn_down_exps.weight", experts.w_out, q4)
        else:
            gate, up = block.ffn.fc_in.weight.chunk(2)
            put(f"blk.{i}.ffn_gate.weight", gate, q4)
            put(f"blk.{i}.ffn_up.weight", up, q4)
            put(f"blk.{i}.ffn_down.weight", block.ffn.fc_out.weight, q4)
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_rope_row_permutation_round_trips():
    rows = torch.arange(32 * 3).reshape(32, 3)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(rows, 4), 4), rows)
    assert not torch.equal(permute_rope_rows(rows, 4), rows)


def test_gguf_q4_0_loads_exactly_and_close_to_our_int4_model(tmp_path):
    source = native_cases._model(CONFIG, torch.float32)
    path = _write(source, tmp_path / "tiny.gguf")
    loaded, held = load_gguf(path)
    assert held["quantize"] == "int4" and held["formats"]["lm_head"] == "q8_0"
    assert layout_of(loaded.blocks[0].attn.qkv) == "int4" and layout_of(loaded.lm_head) == "int8"
    # The Q4_0 weights arrive exactly: what gguf's own dequantizer gives for the file, q/k unpermuted.
    reader = gguf.GGUFReader(str(path))
    file_q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    values = torch.from_numpy(gguf.quants.dequantize(file_q.data, file_q.tensor_type).copy())
    ours = loaded.blocks[1].attn.qkv.packed_weight.dequantize()[: CONFIG.d_model]
    torch.testing.assert_close(ours, unpermute_rope_rows(values.reshape(ours.shape), CONFIG.n_heads), rtol=0, atol=0)
    # Logits close to our own int4 model of the same weights (two quantizers of the same format,
    # rounding ties apart; the head through Q8_0 then int8).
    reference = native_cases._model(CONFIG, torch.float32)
    quantize_model(reference, "int4")
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, ours, exact = (m(tokens).logits for m in (reference, loaded, source))
    assert (ours - theirs).abs().max() <= 0.02 * exact.abs().max()
    assert (ours - exact).abs().max() <= 0.25 * exact.abs().max()


@pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the native step is not built")
def test_engine_loads_a_gguf_file_native_equal_pytorch(tmp_path):
    path = _write(native_cases._model(CONFIG, torch.float32), tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.F16)
    prompts, params = [[5, 6, 7], [8, 9]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    # quantize=None, as `pyramoe generate` passes without --quantize: the file's format still applies.
    engines = [Engine.load(path, dtype="fp32", max_batch=2, native=native, quantize=None) for native in (True, False)]
    ours, theirs = (e.generate(prompts, params) for e in engines)
    assert [e.decode_path for e in engines] == ["native", "pytorch"]
    assert engines[0].quantize == "int4" and layout_of(engines[0].model.lm_head) == "int8"  # F16 head: int8 at load
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]


def test_bad_gguf_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ValueError, match=f"^{bad}: ") as raised:
        load_gguf(bad)
    assert "\n" not in str(raised.value)
