"""Generation: the static-cache Decoder (eager and compiled) against the eager reference and full recomputation, for
MoE, dense (sliding window), hybrid (linear attention) and MLA models; streaming, argument checks, recompiles."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from moeformer import ModelConfig, build_model, quantize
from moeformer.models.generation import Decoder, cached_decoder

VOCAB = 97
MOE = {"num_experts": 4, "top_k": 2, "ffn_dim": 32}
MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
YARN = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0}
KINDS = {  # two layers each: one compiled prefill and step per kind take ~10 s apiece on a CPU
    "moe": dict(moe=MOE, qk_norm="full"),  # OLMoE-like: routed experts, QK-norm over all heads
    "dense": dict(sliding_window=6),
    "hybrid": dict(attention_types=["gla", "softmax"], linear_attention={"chunk_size": 4}),
    "mla": dict(attention_types=["mla"], mla=MLA, moe=MOE, first_k_dense=1, rope_scaling=YARN),  # DeepSeek-like
}


def tiny(kind: str, **overrides) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64, attn_backend="sdpa"
    )
    return ModelConfig(**{**base, **KINDS[kind], **overrides})


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """One model per kind for the module: their compiled decoders (kept on the model) are shared by the tests."""
    built = {}
    for i, kind in enumerate(KINDS):
        torch.manual_seed(100 + i)
        built[kind] = build_model(tiny(kind)).eval()
    return built


def left_padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of `lengths` tokens, left-padded (pad id 0) to the longest: (ids, mask) (B, T)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


@torch.no_grad()
def recomputed_greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The oracle: argmax of a full forward over the growing sequence (no cache), one row (T,) -> (T + steps,)."""
    seq = prompt[None]
    for _ in range(steps):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0]


# ---- the static cache, uncompiled: logits equal a full forward --------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_static_decoder_logits_equal_full_forward(models, kind):
    """Prefill of a left-padded batch, then single-token steps at device-side positions over the whole buffer: each
    step's logits equal the full forward's at that position (fp32, 1e-5 on logits of size ~1), and every cache
    buffer keeps its address (what a CUDA graph replays)."""
    model = models[kind]
    ids, mask = left_padded([11, 6, 9], seed=1)
    full = model(ids, attention_mask=mask).logits
    decoder = Decoder(model, batch=3, max_len=16, compile=False)
    buffers = [t for layer in decoder.cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    addresses = [t.data_ptr() for t in buffers]
    steps = [decoder.prefill(ids[:, :7], mask[:, :7])]
    steps += [decoder.step(ids[:, t]) for t in range(7, 11)]
    assert (torch.stack(steps, 1) - full[:, 6:11]).abs().max() <= 1e-5
    assert [t.data_ptr() for t in buffers] == addresses
    assert int(decoder.cache.position) == 11 and decoder.cache.valid.sum(1).tolist() == [11, 6, 9]


# ---- compiled generation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_greedy_equals_eager_and_recomputation(models, kind):
    """compile=True (static cache, compiled prefill bucket and step) gives the eager path's tokens and those of a
    full forward over the growing sequence, token for token, for rows of different prompt lengths; further calls
    with other prompt lengths, padding or none, and lengths reuse both graphs: no recompile at any position."""
    model = models[kind]
    ids, mask = left_padded([5, 9, 2], seed=2)
    before = counters["stats"]["unique_graphs"]
    compiled = model.generate(ids, 10, temperature=0, attention_mask=mask, compile=True, sync_every=4)
    # per block kind, one prefill bucket and one step, each compiled at most twice (the first block of a forward
    # builds the mask the next ones reuse): 4 for these two-layer models, whatever their depth (0 if built before)
    assert counters["stats"]["unique_graphs"] - before <= 4
    assert torch.equal(compiled, model.generate(ids, 10, temperature=0, attention_mask=mask))
    for row, n in enumerate([5, 9, 2]):
        assert torch.equal(compiled[row, 9 - n :], recomputed_greedy(model, ids[row, 9 - n :], 10))

    ids, mask = left_padded([12, 3, 7], seed=3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = model.generate(ids, 13, temperature=0, attention_mask=mask, compile=True)
        assert torch.equal(again, model.generate(ids, 13, temperature=0, attention_mask=mask))
        again = model.generate(ids[:, :3], 7, temperature=0, compile=True)  # no padding: the bucket pads it
        assert torch.equal(again, model.generate(ids[:, :3], 7, temperature=0))
    assert cached_decoder(model, 3, 12, 13) is cached_decoder(model, 3, 9, 10)  # same batch and cache bucket


def test_compiled_sampling_equals_eager(models):
    """Temperature, top-k and top-p with a seeded generator draw the same tokens compiled as eager."""
    model = models["moe"]
    ids, mask = left_padded([6, 3, 8], seed=4)
    options = dict(temperature=0.8, top_k=20, top_p=0.9, attention_mask=mask)
    eager = model.generate(ids, 12, generator=torch.Generator().manual_seed(5), **options)
    compiled = model.generate(ids, 12, generator=torch.Generator().manual_seed(5), compile=True, **options)
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager, model.generate(ids, 12, temperature=0, attention_mask=mask))  # it did sample


@pytest.mark.parametrize("compile", [False, True])
def test_stream_and_eos(models, compile):
    """`stream` gets each step's tokens (B,) in order: they begin with exactly the returned new tokens, and the
    further steps (the loop looks at the device every sync_every=3 steps) are eos in every row. Rows that emitted eos
    repeat it; the result ends at the step where the last row finished."""
    model = models["dense"]
    ids, mask = left_padded([4, 7, 2], seed=6)
    greedy = model.generate(ids, 20, temperature=0, attention_mask=mask)[:, 7:].tolist()

    def last_row_done(token: int) -> int:  # the step count at which every row has emitted `token`
        return max(row.index(token) for row in greedy) + 1

    # an eos every row reaches, at a step the host does not look at: some all-eos steps get streamed past the end
    shared = set.intersection(*(set(row) for row in greedy))
    eos = next(t for t in sorted(shared, key=last_row_done) if last_row_done(t) % 3)
    steps = []
    out = model.generate(
        ids, 20, temperature=0, attention_mask=mask, eos=eos, stream=steps.append, sync_every=3, compile=compile
    )
    streamed, new = torch.stack(steps, 1), out[:, 7:]
    assert all(s.shape == (3,) for s in steps) and torch.equal(streamed[:, : new.shape[1]], new)
    assert streamed.shape[1] - new.shape[1] < 3 and (streamed[:, new.shape[1] :] == eos).all()
    assert new.shape[1] == last_row_done(eos) < streamed.shape[1]
    for row, tokens in enumerate(new.tolist()):
        first = tokens.index(eos)
        assert tokens[: first + 1] == greedy[row][: first + 1] and set(tokens[first:]) == {eos}


# ---- argument checks -------------------------------------------------------------------------------------------
BAD_REQUESTS = [  # (generate arguments, what the one ValueError must name)
    (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "at least one token"),
    (dict(input_ids=torch.tensor([1, 2, 3])), r"ids\[None\]"),
    (dict(input_ids=torch.tensor([[1, VOCAB]])), "vocab_size"),
    (dict(input_ids=torch.tensor([[-1, 2]])), "vocab_size"),
    (dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer"),
    (dict(max_new_tokens=61), "max_seq_len"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(attention_mask=torch.ones(2, 5)), "attention_mask must have the prompt's shape"),
    (dict(attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])), "left padding"),
    (dict(attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])), "without any real token"),
    (dict(eos=VOCAB), "eos"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(sync_every=0), "sync_every"),
]


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("request_args,names", BAD_REQUESTS)
def test_bad_generate_arguments_raise_one_clear_error(models, request_args, names, compile):
    args = dict(input_ids=torch.ones(2, 4, dtype=torch.long), max_new_tokens=5) | request_args
    with pytest.raises(ValueError, match=names) as info:
        models["dense"].generate(args.pop("input_ids"), args.pop("max_new_tokens"), compile=compile, **args)
    assert "torch" not in info.traceback[-1].path.parts  # raised by the library's own check, not deep in torch


def test_forward_rejects_bad_ids_and_overlong_sequences():
    torch.manual_seed(7)
    model = build_model(tiny("dense")).eval()
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[3, VOCAB]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache = model.new_cache(1, 80)
    model(torch.zeros(1, 60, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):  # cached + new
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    dynamic = build_model(tiny("dense", rope_scaling={"type": "dynamic", "factor": 2.0})).eval()
    assert dynamic(torch.zeros(1, 65, dtype=torch.long)).logits.shape == (1, 65, VOCAB)  # NTK runs past it


def test_decoders_are_not_copied_with_the_model(models):
    model = models["dense"]
    model.generate(torch.ones(3, 3, dtype=torch.long), 2, temperature=0, compile=True)  # the tests' decoder
    assert model._decoders and "_decoders" not in vars(copy.deepcopy(model))


# ---- GPU: CUDA graphs ------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_cuda_graph_generate_equals_eager_fp32(kind):
    """On CUDA, compile=True replays the decode step as one CUDA graph (MoE layers on the fused expert kernels):
    the eager path's tokens in fp32, and a second call replays the same graph without compiling."""
    torch.manual_seed(8)
    model = build_model(tiny(kind), device="cuda").eval()
    ids, mask = (t.cuda() for t in left_padded([5, 9, 2], seed=9))
    compiled = model.generate(ids, 12, temperature=0, attention_mask=mask, compile=True)
    assert torch.equal(compiled, model.generate(ids, 12, temperature=0, attention_mask=mask))
    decoder = cached_decoder(model, 3, 9, 12)
    graph = decoder._graph
    assert graph is not None
    before = counters["stats"]["unique_graphs"]
    again = model.generate(ids, 12, temperature=0, attention_mask=mask, compile=True)
    assert torch.equal(again, compiled) and decoder._graph is graph
    assert counters["stats"]["unique_graphs"] == before


@gpu
@needs_cuda
@pytest.mark.parametrize("mode,group_size", [("int8", 128), ("int4", 32)])
def test_gpu_cuda_graph_quantized_generate_equals_eager(mode, group_size):
    """A quantized MoE model (its matmuls and experts on the dequantising Triton kernels) decodes on the CUDA graph
    to the eager path's tokens (fp32 activations and scales)."""
    torch.manual_seed(14)
    model = quantize(
        build_model(tiny("moe", dim=64, ffn_dim=64, moe={"ffn_dim": 64}), device="cuda").eval(), mode, group_size
    )
    ids, mask = (t.cuda() for t in left_padded([5, 9, 2], seed=15))
    compiled = model.generate(ids, 12, temperature=0, attention_mask=mask, compile=True)
    assert torch.equal(compiled, model.generate(ids, 12, temperature=0, attention_mask=mask))
    assert cached_decoder(model, 3, 9, 12)._graph is not None


@gpu
@needs_cuda
def test_gpu_cuda_graph_moe_bf16_tracks_eager():
    """OLMoE-like bf16 MoE on a CUDA graph. Compiled bf16 rounds differently from eager bf16, so the tokens are
    compared on logits: teacher-forced along eager's greedy tokens, the compiled logits stay within twice eager's own
    distance from fp32 (plus 1e-2), at every step."""
    torch.manual_seed(10)
    model = build_model(tiny("moe", dim=64, n_kv_heads=4), device="cuda").eval()
    ids, mask = (t.cuda() for t in left_padded([5, 9, 2], seed=11))
    tokens = model.to(torch.bfloat16).generate(ids, 8, temperature=0, attention_mask=mask)

    def teacher_forced(decoder: Decoder) -> torch.Tensor:
        logits = [decoder.prefill(ids, mask.bool()).float()]
        logits += [decoder.step(tokens[:, t]).float() for t in range(9, 9 + 7)]
        return torch.stack(logits, 1)

    compiled = teacher_forced(Decoder(model, 3, 32))
    eager = teacher_forced(Decoder(model, 3, 32, compile=False))
    reference = teacher_forced(Decoder(model.float(), 3, 32, compile=False))
    assert (compiled - reference).abs().amax() <= 2 * (eager - reference).abs().amax() + 1e-2


@gpu
@needs_cuda
def test_gpu_decode_loop_never_waits_for_the_device():
    """Steps on the CUDA graph, greedy picks and eos bookkeeping run with no host synchronisation."""
    torch.manual_seed(12)
    model = build_model(tiny("dense"), device="cuda").eval()
    ids, mask = (t.cuda() for t in left_padded([5, 9], seed=13))
    decoder = Decoder(model, 2, 32)
    logits = decoder.prefill(ids, mask.bool())
    finished = torch.zeros(2, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            token = logits.argmax(-1).masked_fill(finished, 3)
            finished |= token == 3
            logits = decoder.step(token)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits).all()
