import json

import pytest

import make_random_model as m


def test_8b_preset_has_llama_3_1_8b_parameter_count_and_shards():
    specs = m.tensor_specs(m.PRESETS["llama-3.1-8b"])
    # Llama-3.1-8B: 8,030,261,248 parameters, 291 tensors.
    assert sum(spec.nbytes for spec in specs) == 8_030_261_248 * 2
    assert len(specs) == 291
    shards = m.plan_shards(specs, 5_000_000_000)
    assert len(shards) == 4
    assert all(sum(s.nbytes for s in shard) <= 5_000_000_000 for shard in shards)
    assert [s for shard in shards for s in shard] == specs


def test_shapes_follow_grouped_query_attention():
    shapes = {spec.name: spec.shape for spec in m.tensor_specs(m.PRESETS["llama-3.1-8b"])}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4096, 4096)
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (4096, 14336)
    assert shapes["lm_head.weight"] == (128256, 4096)
    assert shapes["model.norm.weight"] == (4096,)


def test_a_tensor_larger_than_a_shard_gets_its_own():
    specs = [m.TensorSpec("a", (10,)), m.TensorSpec("b", (100,)), m.TensorSpec("c", (5,)), m.TensorSpec("d", (5,))]
    shards = m.plan_shards(specs, 40)
    assert [[s.name for s in shard] for shard in shards] == [["a"], ["b"], ["c", "d"]]


def test_index_maps_every_tensor_to_its_file():
    specs = m.tensor_specs(m.PRESETS["tiny"])
    shards = m.plan_shards(specs, 100_000_000)
    index = m.weight_index(shards)
    assert set(index["weight_map"]) == {spec.name for spec in specs}
    assert index["weight_map"]["model.embed_tokens.weight"] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(spec.nbytes for spec in specs)


def test_missing_tokenizer_fails_before_writing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_tokenizer.sh"):
        m.make_model(tmp_path / "out", "tiny", tmp_path / "nothing", 0.02, 0, 5.0, "cpu")
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_tiny_model_is_written_in_hugging_face_layout(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors = pytest.importorskip("safetensors.torch")
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    for name in m.TOKENIZER_FILES:
        (tokenizer_dir / name).write_text("{}")
    out = tmp_path / "model"
    m.make_model(out, "tiny", tokenizer_dir, 0.02, 0, 0.05, "cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    loaded = {}
    for file in files:
        loaded.update(safetensors.load_file(str(out / file)))
    assert set(loaded) == set(index["weight_map"])
    q = loaded["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16 and tuple(q.shape) == (256, 256)
    assert 0.015 < q.float().std().item() < 0.025
    assert torch.all(loaded["model.norm.weight"] == 1)


def test_70b_preset_has_llama_3_1_70b_parameter_count():
    specs = m.tensor_specs(m.PRESETS["llama-3.1-70b"])
    # Llama-3.1-70B: 70,553,706,496 parameters.
    assert sum(spec.nbytes for spec in specs) == 70_553_706_496 * 2


@pytest.mark.parametrize("quantize", ["awq", "gptq"])
def test_int4_layouts_take_a_quarter_of_the_linear_bytes(quantize):
    config = m.PRESETS["llama-3.1-8b"]
    dense = {s.name: s for s in m.tensor_specs(config)}
    packed = {s.name: s for s in m.tensor_specs(config, quantize)}
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.weight" not in packed
    qweight = packed[f"{q}.qweight"]
    assert qweight.shape == ((4096, 512) if quantize == "awq" else (512, 4096))
    assert qweight.nbytes * 4 == dense[f"{q}.weight"].nbytes
    assert packed[f"{q}.scales"].shape == (32, 4096)
    assert packed["lm_head.weight"] == dense["lm_head.weight"]


def test_quantized_tiny_model_is_written_with_its_config(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors = pytest.importorskip("safetensors.torch")
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    for name in m.TOKENIZER_FILES:
        (tokenizer_dir / name).write_text("{}")
    for quantize in ["awq", "gptq", "fp8"]:
        out = tmp_path / quantize
        m.make_model(out, "tiny", tokenizer_dir, 0.02, 0, 5.0, "cpu", quantize)
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"] == m.QUANTIZATION_CONFIGS[quantize]
        index = json.loads((out / "model.safetensors.index.json").read_text())
        loaded = {}
        for file in sorted(set(index["weight_map"].values())):
            loaded.update(safetensors.load_file(str(out / file)))
        q = "model.layers.0.self_attn.q_proj"
        if quantize == "fp8":
            assert loaded[f"{q}.weight"].dtype == torch.float8_e4m3fn
        else:
            assert loaded[f"{q}.qweight"].dtype == torch.int32
            assert loaded[f"{q}.scales"].dtype == torch.float16
