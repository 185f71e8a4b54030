import json
import os
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from dfastllm.models import load_model
from dfastllm.checkpoints import CheckpointDownloadError, is_transient, resolve_checkpoint
from dfastllm.testing import write_tiny_llada

pytestmark = pytest.mark.timeout(60)


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_llada_single_file_and_sharded_load_the_same_weights(llada_dir, tmp_path):
    single = load_model(llada_dir)
    sharded_dir = write_tiny_llada(tmp_path / "sharded", seed=1, shard=True)
    assert os.path.isfile(os.path.join(sharded_dir, "model.safetensors.index.json"))
    sharded = load_model(sharded_dir)
    a, b = single.model.state_dict(), sharded.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)

    tok = single.tokenizer
    assert single.family == "llada" and single.model.logits_shift == 0
    assert single.mask_token_id == tok.backend.token_to_id("<|mdm_mask|>")
    assert single.eos_token_id == single.pad_token_id == tok.backend.token_to_id("<|endoftext|>")
    assert single.eot_token_id == tok.backend.token_to_id("<|eot_id|>")
    assert single.config.vocab_size == 320 == single.model.output.weight.shape[0]


def test_dream_loads_with_its_special_tokens(dream_dir):
    loaded = load_model(dream_dir)
    tok = loaded.tokenizer
    assert loaded.family == "dream" and loaded.model.logits_shift == 1
    assert loaded.mask_token_id == tok.backend.token_to_id("<|mask|>")
    assert loaded.eos_token_id == tok.backend.token_to_id("<|endoftext|>")
    assert loaded.eot_token_id == tok.backend.token_to_id("<|im_end|>")
    c = loaded.config
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (320, 64, 2, 4, 2, 16)


def test_unknown_model_type_names_file_and_value(llada_dir, tmp_path):
    d = _copy(llada_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*'mamba'"):
        load_model(d)


def test_mask_id_disagreeing_with_the_tokenizer_is_refused(llada_dir, tmp_path):
    d = _copy(llada_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["mask_token_id"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: mask_token_id"):
        load_model(d)


def _rewrite_weights(d, edit):
    path = str(d / "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def test_missing_tensor_is_named(llada_dir, tmp_path):
    d = _copy(llada_dir, tmp_path)
    _rewrite_weights(d, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.transformer\.blocks\.1\.up_proj\.weight"):
        load_model(d)


def test_wrong_shape_names_file_and_tensor(llada_dir, tmp_path):
    d = _copy(llada_dir, tmp_path)

    def shrink(t):
        t["model.transformer.blocks.0.k_proj.weight"] = t["model.transformer.blocks.0.k_proj.weight"][:8]
    path = _rewrite_weights(d, shrink)
    with pytest.raises(ValueError, match=rf"{path}: tensor model\.transformer\.blocks\.0\.k_proj\.weight "
                                         r"has shape \[8, 64\], expected \[64, 64\]"):
        load_model(d)


def test_unexpected_tensor_is_named(llada_dir, tmp_path):
    d = _copy(llada_dir, tmp_path)
    path = _rewrite_weights(d, lambda t: t.update({"model.transformer.extra.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=rf"{path}: unexpected tensor model\.transformer\.extra\.weight"):
        load_model(d)


def test_missing_tokenizer_and_shard_are_named(llada_gqa_dir, tmp_path):
    d = _copy(llada_gqa_dir, tmp_path)
    os.remove(d / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003\.safetensors"):
        load_model(d)
    os.remove(d / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_model(d)


def test_missing_directory_is_not_sent_to_the_hub(tmp_path):
    def download(repo_id):
        raise AssertionError("a local path must not reach the hub")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"), download=download)


def _http_error(status):
    request = httpx.Request("GET", "https://huggingface.co/api/models/x/y")
    return httpx.HTTPStatusError(f"HTTP {status}", request=request,
                                 response=httpx.Response(status, request=request))


def test_hub_id_goes_through_the_download_function(llada_dir):
    calls = []
    loaded = load_model("org/tiny-llada", download=lambda repo_id: calls.append(repo_id) or llada_dir)
    assert calls == ["org/tiny-llada"] and loaded.family == "llada" and loaded.path == llada_dir


def test_hub_download_retries_transient_errors_with_backoff(llada_dir):
    failures = [ConnectionResetError("reset"), TimeoutError("timed out"), _http_error(503),
                httpx.ConnectTimeout("connect timeout"), OSError("disk hiccup")]
    calls, sleeps = [], []

    def flaky_download(repo_id):
        calls.append(repo_id)
        if failures:
            raise failures.pop(0)
        return llada_dir

    assert resolve_checkpoint("org/tiny", download=flaky_download, attempts=6, base_delay_s=1.0,
                              max_delay_s=3.0, sleep=sleeps.append) == llada_dir
    assert calls == ["org/tiny"] * 6
    # Full jitter under a doubling, capped bound: uniform(0, min(3, 1 * 2^(attempt-1))).
    assert len(sleeps) == 5 and all(0 <= s <= cap for s, cap in zip(sleeps, [1, 2, 3, 3, 3]))
    assert len(set(sleeps)) > 1  # jittered, not a fixed schedule


def test_hub_download_gives_up(llada_dir):
    calls = []

    def download(repo_id, error):
        calls.append(repo_id)
        raise error

    for permanent in (_http_error(404), _http_error(401), ValueError("bad repo id")):
        calls.clear()
        with pytest.raises(CheckpointDownloadError, match="org/x .*after 1 attempt") as info:
            resolve_checkpoint("org/x", download=lambda r: download(r, permanent), sleep=lambda s: None)
        assert info.value.__cause__ is permanent and len(calls) == 1  # no retry

    calls.clear()
    with pytest.raises(CheckpointDownloadError, match="after 4 attempt") as info:
        resolve_checkpoint("org/x", download=lambda r: download(r, ConnectionError("down")),
                           attempts=4, sleep=lambda s: None)
    assert isinstance(info.value.__cause__, ConnectionError) and len(calls) == 4


def test_transient_classification_of_hub_errors():
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    assert is_transient(_http_error(429)) and is_transient(_http_error(502))
    assert not is_transient(_http_error(403))
    assert not is_transient(OfflineModeIsEnabled("HF_HUB_OFFLINE=1"))
    assert not is_transient(FileNotFoundError("x"))
    wrapped = LocalEntryNotFoundError("cannot find the requested files in the local cache")
    wrapped.__cause__ = httpx.ConnectError("connection refused")
    assert is_transient(wrapped)


@pytest.mark.parametrize("fixture", ["llada_gqa_dir", "dream_dir"])
def test_fused_projections_hold_the_checkpoint_parts(fixture, request):
    """q|k|v (with Dream's biases) and gate|up are one matrix each, and every
    checkpoint tensor reads back unchanged through its part's name."""
    from dfastllm.models import dream, llada
    directory = request.getfixturevalue(fixture)
    loaded = load_model(directory)
    table = {"llada": llada, "dream": dream}[loaded.family].checkpoint_names(loaded.config)
    tensors = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            tensors |= load_file(os.path.join(directory, f))
    parts = loaded.model.checkpoint_parameters()
    assert sorted(table.values()) == sorted(parts)
    for ckpt, ours in table.items():
        torch.testing.assert_close(parts[ours], tensors[ckpt], atol=0, rtol=0)
    attn, mlp = loaded.model.layers[0].attn, loaded.model.layers[0].mlp
    c = loaded.config
    assert attn.wqkv.weight.shape == ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.d_model)
    assert (attn.wqkv.bias is not None) == (loaded.family == "dream")
    assert mlp.w_gate_up.weight.shape == (2 * c.mlp_hidden, c.d_model)
    assert not hasattr(attn, "wq") and not hasattr(mlp, "w_up")
