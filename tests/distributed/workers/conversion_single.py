"""HF <-> megatron conversion checks that need one process (a world of one), many per launch.

usage: python conversion_single.py convert WORKDIR      (after the pytest fixture wrote WORKDIR/hf/*)
       python conversion_single.py export-resaved WORKDIR  (after conversion_layouts.py)

``convert`` (per family: llama, qwen2, qwen3, mistral):
  * HF -> megatron through the command line (``cli.hf_to_megatron_main``);
  * the checkpoint, loaded with the foundation's ``checkpoint.load_model`` into a TP1/PP1 GPTModel:
    fp32 logits vs transformers (eager) within ATOL_TP1;
  * megatron -> HF (tiny shard size: sharded + index): every tensor bit-exact vs the original (read with
    the safetensors library), no extra/missing names; transformers loads the export (config.json round
    trip) and gives bit-identical logits;
  * bf16: auto keeps bf16 in the checkpoint; fp32 checkpoint exported as bf16; both bit-exact; the
    bf16 checkpoint passes the (fp32) verifier;
  * training checkpoints (the trainer's ``save_training`` with optimizer and teacher; a model under a
    key prefix) export the student bit-exact;
  * the verifier passes the good checkpoint; a deliberately broken mapping (k and v swapped in
    ``merge_qkv`` only) and a *symmetric* break (swapped in merge and split: the HF round trip is then
    bit-exact) are both caught by it;
  * Mistral: the verifier refuses sequences longer than the sliding window.
``export-resaved``: every checkpoint re-saved by the layout worker exports bit-exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.distributed.workers.common import causal_inputs  # noqa: E402
from tests.hf_fixtures import FAMILIES, load_hf_model  # noqa: E402

# fp32, same weights, same op order up to fused vs separate qkv/fc1 matmuls: measured 0.0 for three
# families and ~1.5e-6 for Qwen3 (q/k norm after a different matmul split); 1e-5 leaves headroom.
ATOL_TP1 = 1e-5
SEQ, BATCH = 48, 2


def tokens_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(11))


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_bit_exact(original: Path, exported: Path, what: str, *, tied: bool) -> int:
    a, b = hf_tensors(original), hf_tensors(exported)
    if tied:
        a.pop("lm_head.weight", None)  # a tied export carries no lm_head (transformers re-ties it)
    assert set(a) == set(b), f"{what}: names differ: {sorted(set(a) ^ set(b))[:8]}"
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{what}: {name} dtype {a[name].dtype} vs {b[name].dtype}"
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"
    return len(a)


def megatron_tp1_logits(megatron_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_opsd.checkpoint import load_model, read_model_json
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    cfg = read_model_json(megatron_dir)
    runtime = init_parallel(ParallelConfig(), seed=5)  # random init first: loading must overwrite it
    [model] = build_model(cfg, runtime)
    load_model([model], megatron_dir)
    pos, mask = causal_inputs(tokens)
    with torch.no_grad():
        logits = model(tokens, pos, mask)
    runtime.destroy()
    return logits[..., :cfg.vocab_size]


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf_model(directory)(input_ids=tokens, use_cache=False).logits


def check_family(work: Path, family: str) -> None:
    from megatron_opsd.conversion.cli import hf_to_megatron_main, megatron_to_hf_main
    from megatron_opsd.models.description import ModelConfig

    hf, meg, back = work / "hf" / family, work / "meg" / family, work / "hf_back" / family
    hf_to_megatron_main(["--hf-dir", str(hf), "--out", str(meg), "--tp", "2", "--pp", "2"])
    cfg = ModelConfig.from_hf(hf)
    tokens = tokens_for(cfg.vocab_size)
    reference = hf_logits(hf, tokens)
    err = (megatron_tp1_logits(meg, tokens) - reference).abs().max().item()
    assert err <= ATOL_TP1, f"{family}: TP1 logits differ from HF by {err}"

    megatron_to_hf_main(["--megatron-dir", str(meg), "--out", str(back), "--max-shard-size", "60KB"])
    assert (back / "model.safetensors.index.json").is_file(), f"{family}: tiny shard size did not shard"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / name).is_file(), f"{family}: {name} not carried through"
    count = assert_bit_exact(hf, back, family, tied=cfg.tie_word_embeddings)
    same = torch.equal(hf_logits(back, tokens), reference)
    assert same, f"{family}: transformers on the exported checkpoint gives different logits"
    print(f"{family:<8} hf->megatron->hf bit-exact ({count} tensors); TP1 max|dlogit| vs HF={err:.2e}; "
          "exported config reloads with identical logits", flush=True)


def check_dtypes(work: Path) -> None:
    from megatron.core import dist_checkpointing

    from megatron_opsd.conversion.cli import hf_to_megatron_main, megatron_to_hf_main
    from megatron_opsd.conversion.verify import verify

    hf = work / "hf" / "qwen2_bf16"
    for dtype, export_dtype in (("auto", "auto"), ("fp32", "bf16")):
        meg, back = work / "meg" / f"bf16_{dtype}", work / "hf_back" / f"bf16_{dtype}"
        hf_to_megatron_main(["--hf-dir", str(hf), "--out", str(meg), "--dtype", dtype])
        stored = dist_checkpointing.load_tensors_metadata(str(meg))["embedding.word_embeddings.weight"].dtype
        expected = torch.bfloat16 if dtype == "auto" else torch.float32
        assert stored == expected, f"--dtype {dtype}: checkpoint stores {stored}"
        megatron_to_hf_main(["--megatron-dir", str(meg), "--out", str(back), "--dtype", export_dtype])
        assert_bit_exact(hf, back, f"bf16 via {dtype}", tied=False)
    # the verifier runs both sides in fp32: bf16 weights upcast exactly on both sides
    comparison, passed = verify(hf, work / "meg" / "bf16_auto", seq_len=SEQ, atol=ATOL_TP1, log=lambda *a: None)
    assert passed and comparison.max_abs_diff <= ATOL_TP1, comparison
    print("bf16     auto keeps bf16; fp32 checkpoint -> bf16 export; both bit-exact; bf16 checkpoint verifies "
          f"({comparison.line()})", flush=True)

    # An fp32 model converted to bf16: the verifier compares against the HF weights rounded to bf16
    # (what a correct conversion holds) and says so; the fp32 tolerance still applies.
    from megatron_opsd.conversion.megatron_to_hf import convert_megatron_to_hf

    hf32, meg16 = work / "hf" / "qwen2", work / "meg" / "qwen2_as_bf16"
    hf_to_megatron_main(["--hf-dir", str(hf32), "--out", str(meg16), "--dtype", "bf16"])
    lines = []
    comparison, passed = verify(hf32, meg16, seq_len=SEQ, atol=ATOL_TP1, log=lines.append)
    assert passed and "bfloat16 checkpoint vs HF weights rounded to bfloat16" in lines[-1], lines
    print(f"bf16     conversion of an fp32 model verifies against bf16-rounded HF weights: {lines[-1]}", flush=True)
    # Export keeps the stored dtype by default; a narrower --dtype warns with the measured rounding.
    for export_dtype in ("auto", "bf16"):
        lines = []
        back = work / "hf_back" / f"qwen2_fp32_as_{export_dtype}"
        convert_megatron_to_hf(work / "meg" / "qwen2", back, dtype=export_dtype, log=lines.append)
        stored = {t.dtype for t in hf_tensors(back).values()}
        warned = [line for line in lines if "rounds the checkpoint's fp32 weights: max |change|" in line]
        if export_dtype == "auto":
            assert stored == {torch.float32} and not warned, (stored, lines)
        else:
            assert stored == {torch.bfloat16} and len(warned) == 1, (stored, lines)
            print(f"export   fp32 checkpoint: auto keeps fp32; --dtype bf16 warns: {warned[0]}", flush=True)
    check_bf16_run_export(work)


def check_bf16_run_export(work: Path) -> None:
    """A bf16 model keeps its norms in fp32, and training moves them off the bf16 grid: the export
    (bf16 by default) says how much rounding them costs, measured."""
    from megatron_opsd.checkpoint import load_model, read_model_json, save_model
    from megatron_opsd.conversion.megatron_to_hf import convert_megatron_to_hf
    from megatron_opsd.models.provider import ModelBuildConfig, build_model
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    source, trained = work / "meg" / "bf16_auto", work / "meg" / "bf16_trained_norm"
    cfg = read_model_json(source)
    runtime = init_parallel(ParallelConfig(), seed=3)
    [model] = build_model(cfg, runtime, ModelBuildConfig(dtype="bf16"))
    load_model([model], source)
    norm = model.decoder.final_layernorm.weight
    assert norm.dtype == torch.float32, norm.dtype
    with torch.no_grad():
        norm.add_(3e-4)  # an update far below bf16's resolution near 1 (2**-7)
    save_model([model], cfg, trained)
    runtime.destroy()
    lines = []
    back = work / "hf_back" / "bf16_trained_norm"
    convert_megatron_to_hf(trained, back, with_tokenizer=False, log=lines.append)
    exported = hf_tensors(back)
    assert exported["model.norm.weight"].dtype == torch.bfloat16
    warned = [line for line in lines if "exporting bf16 rounds the checkpoint's fp32 weights" in line]
    assert len(warned) == 1 and "model.norm.weight" in warned[0], lines
    measured = float(warned[0].split("max |change| ")[1].split()[0])
    assert 1e-5 < measured <= 2**-8, warned  # the update's size up to bf16 rounding (half a step at 1-2)
    print(f"export   bf16 run whose fp32 norms moved: {warned[0]}", flush=True)


def check_training_checkpoint(work: Path) -> None:
    """Training checkpoints: the trainer's own format (``checkpoint.save_training``: student model
    without a prefix, distributed-optimizer state, a *different* teacher under ``teacher.``, RNG,
    common state, model.json), and a model stored under a ``model.`` key prefix next to other tensors.
    Only the student's weights may come out, bit-exact."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_opsd.checkpoint import (_materialise_optimizer_state, load_model, read_model_json, save_training,
                                          write_model_json)
    from megatron_opsd.conversion.cli import megatron_to_hf_main
    from megatron_opsd.engine import OptimConfig, build_optimizer, wrap_ddp
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    family = "qwen3"
    source, original = work / "meg" / family, work / "hf" / family
    cfg = read_model_json(source)

    runtime = init_parallel(ParallelConfig(), seed=2)
    student = build_model(cfg, runtime)
    load_model(student, source)
    teacher = build_model(cfg, runtime)  # random weights: exporting them would fail the comparison
    ddp = wrap_ddp(student, runtime)
    # Adam state exists only after a step: megatron's dummy step (zero gradients; no weight decay, so
    # the weights do not move) creates it, as the trainer's first step would.
    optimizer = build_optimizer(ddp, runtime, OptimConfig(weight_decay=0.0))
    _materialise_optimizer_state(optimizer)
    # the run's saved config names its tokenizer (here the converted model, which carries one)
    trained = save_training(work / "train" / "run", 10, chunks=ddp, optimizer=optimizer, teacher_chunks=teacher,
                            runtime=runtime, model=cfg, keep_last=0,
                            common={"config": {"data": {"tokenizer_path": str(source)}, "train": {"load": None}}})
    runtime.destroy()
    keys = dist_checkpointing.load_tensors_metadata(str(trained)).keys()
    assert any(k.startswith("teacher.") for k in keys) and any(k.startswith("optimizer") for k in keys), keys

    runtime = init_parallel(ParallelConfig(), seed=2)
    [model] = build_model(cfg, runtime)
    load_model([model], source)
    extra = torch.arange(6, dtype=torch.float32)
    prefixed = work / "train" / "prefix_model"
    prefixed.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(prefix="model."),
                             "optimizer": {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.exp_avg", extra)},
                             "iteration": 7}, str(prefixed))
    write_model_json(cfg, prefixed)
    runtime.destroy()

    # the trainer's checkpoint root (step directories + `latest`) stands for its latest step
    assert trained.parent == work / "train" / "run" and (trained.parent / "latest").is_file()
    for name, directory in (("trainer", trained.parent), ("prefix", prefixed)):
        back = work / "hf_back" / f"train_{name}"
        megatron_to_hf_main(["--megatron-dir", str(directory), "--out", str(back), "--tokenizer-dir", str(original)])
        assert_bit_exact(original, back, f"training checkpoint ({name})", tied=True)

    # Without --tokenizer-dir: the trainer's checkpoint finds the tokenizer through its saved config;
    # the bare one (no tokenizer, no config) is refused before anything is written.
    import transformers

    back = work / "hf_back" / "train_tokenizer_found"
    megatron_to_hf_main(["--megatron-dir", str(trained.parent), "--out", str(back)])
    found = transformers.AutoTokenizer.from_pretrained(back)
    assert found.get_vocab() == transformers.AutoTokenizer.from_pretrained(original).get_vocab()
    refused = work / "hf_back" / "train_no_tokenizer"
    try:
        megatron_to_hf_main(["--megatron-dir", str(prefixed), "--out", str(refused)])
    except ValueError as exc:
        assert "--tokenizer-dir" in str(exc) and not refused.exists(), exc
    else:
        raise AssertionError("export without any tokenizer was not refused")
    print("training checkpoint export carries the run's tokenizer (from its saved config); none: refused",
          flush=True)
    print("training checkpoint (trainer format with optimizer and teacher; model under 'model.') "
          "exports the student bit-exact", flush=True)

    # The verifier reads training checkpoints too (run root and step directory): their optimizer and
    # teacher tensors are checkpoint keys the model does not request, which is no error.
    from megatron_opsd.conversion.verify import verify

    for name, directory in (("run root", trained.parent), ("step directory", trained)):
        comparison, passed = verify(original, directory, seq_len=SEQ, atol=ATOL_TP1, log=lambda *a: None)
        assert passed and comparison.max_abs_diff <= ATOL_TP1, (name, comparison)
    print(f"verifier on a training checkpoint (run root and step directory): {comparison.line()}", flush=True)


def check_verifier(work: Path) -> None:
    from megatron_opsd.conversion.cli import hf_to_megatron_main, megatron_to_hf_main
    from megatron_opsd.conversion.verify import verify
    from megatron_opsd.models import hf_mapping

    family = "qwen2"
    hf = work / "hf" / family
    good, passed = verify(hf, work / "meg" / family, seq_len=SEQ, atol=ATOL_TP1, log=lambda *a: None)
    assert passed and good.max_abs_diff <= ATOL_TP1 and good.argmax_agreement == 1.0, good

    merge, split = hf_mapping.merge_qkv, hf_mapping.split_qkv

    def merge_swapped(q, k, v, cfg):
        return merge(q, v, k, cfg)

    def split_swapped(qkv, cfg):
        q, k, v = split(qkv, cfg)
        return q, v, k

    results = {}
    for mode in ("import-only", "symmetric"):
        hf_mapping.merge_qkv = merge_swapped
        if mode == "symmetric":
            hf_mapping.split_qkv = split_swapped
        try:
            broken = work / "meg" / f"broken_{mode}"
            hf_to_megatron_main(["--hf-dir", str(hf), "--out", str(broken)])
            back = work / "hf_back" / f"broken_{mode}"
            megatron_to_hf_main(["--megatron-dir", str(broken), "--out", str(back)])
        finally:
            hf_mapping.merge_qkv, hf_mapping.split_qkv = merge, split
        try:
            assert_bit_exact(hf, back, mode, tied=False)
            round_trip = "bit-exact"
        except AssertionError:
            round_trip = "differs"
        bad, passed = verify(hf, broken, seq_len=SEQ, atol=1e-4, log=lambda *a: None)
        assert not passed, f"verifier passed a broken ({mode}) mapping: {bad}"
        results[mode] = (round_trip, bad)
    assert results["symmetric"][0] == "bit-exact", "the symmetric break should survive a round trip"
    print(f"verifier good qwen2: {good.line()}", flush=True)
    for mode, (round_trip, bad) in results.items():
        print(f"verifier broken k<->v ({mode}; round trip {round_trip}): caught, {bad.line()}", flush=True)

    try:
        verify(work / "hf" / "mistral", work / "meg" / "mistral", seq_len=80, log=lambda *a: None)
    except ValueError as exc:
        assert "sliding_window=64" in str(exc), exc
        print("mistral: sequences longer than the sliding window are refused", flush=True)
    else:
        raise AssertionError("verify accepted seq_len 80 > mistral sliding_window 64")


def export_resaved(work: Path) -> None:
    from megatron_opsd.checkpoint import read_model_json
    from megatron_opsd.conversion.cli import megatron_to_hf_main

    dirs = sorted(d for d in (work / "resaved").iterdir() if d.is_dir())
    assert dirs, "no re-saved checkpoints"
    for directory in dirs:
        family = directory.name.split("_")[0]
        back = work / "hf_back_resaved" / directory.name
        megatron_to_hf_main(["--megatron-dir", str(directory), "--out", str(back),
                             "--tokenizer-dir", str(work / "hf" / family)])
        tied = read_model_json(directory).tie_word_embeddings
        count = assert_bit_exact(work / "hf" / family, back, directory.name, tied=tied)
        print(f"resaved {directory.name:<20} -> hf bit-exact ({count} tensors)", flush=True)
    print(f"export-resaved: {len(dirs)} checkpoints bit-exact", flush=True)


def main() -> None:
    mode, work = sys.argv[1], Path(sys.argv[2])
    if mode == "convert":
        for family in FAMILIES:
            check_family(work, family)
        check_dtypes(work)
        check_training_checkpoint(work)
        check_verifier(work)
        print("conversion single: all checks passed", flush=True)
    elif mode == "export-resaved":
        export_resaved(work)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
